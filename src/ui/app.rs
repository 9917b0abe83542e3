//! The eframe app: owns the state, applies [`Command`]s once per frame, drains background events
//! (import, training, evaluation) and renders the project bar, the tabs, dialogs and toasts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eframe::egui::{self, Color32, RichText};

use super::notifications::Notifier;
use super::style;
use super::thumbnails::{ThumbnailCache, color_image};
use crate::engine::StopFlag;
use crate::engine::dataset::decode::{DecodedImage, decode_image};
use crate::engine::dataset::import::{
    ImageRole, ImportFailure, ImportItem, ImportOptions, ImportReport, collect_image_files,
    import_items, is_mvtec_layout, items_with_role, scan_mvtec,
};
use crate::engine::dataset::prepare::{DatasetCache, DatasetSettings};
use crate::engine::device::{ComputeDevice, DevicePreference, select_device};
use crate::engine::inference::{Inspection, Inspector, Thresholds};
use crate::engine::model::{Checkpoint, CheckpointHeader, Framework, ModelFile, checkpoint_path};
use crate::engine::project::{MODEL_EXTENSION, Project, backup_path, file_stem_for};
use crate::engine::training::{
    EpochReport, StopReason, TrainEvent, TrainRequest, TrainingHandle, TrainingSettings,
    TrainingSummary, spawn_training,
};

/// The tabs of the main window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    /// Images, size, complexity.
    Dataset,
    /// Epochs, error threshold, the run.
    Training,
    /// Results and thresholds.
    Evaluation,
}

/// Everything the UI can ask the app to do. Widgets only send these; [`InkspectApp::apply`]
/// changes state.
#[derive(Debug, Clone)]
pub enum Command {
    /// Start an empty project (asks nothing; unsaved changes are guarded by the caller).
    NewProject,
    /// Open a project file.
    OpenProject(PathBuf),
    /// Save to the current file (or ask for one).
    SaveProject,
    /// Save to a new file.
    SaveProjectAs(PathBuf),
    /// Choose the model type.
    SetFramework(Framework),
    /// Import files or folders (MVTec-layout folders keep their own roles) with this role.
    Import {
        /// Files or folders.
        paths: Vec<PathBuf>,
        /// Role for plain files and folders.
        role: ImageRole,
    },
    /// Stop a running import.
    CancelImport,
    /// Remove images by index in the project.
    RemoveImages(Vec<usize>),
    /// Change image size / complexity.
    SetDataset(DatasetSettings),
    /// Change epochs, error threshold and optimiser settings.
    SetTraining(TrainingSettings),
    /// Start training in the background (`resume`: continue from the checkpoint).
    StartTraining {
        /// Continue the interrupted training instead of starting afresh.
        resume: bool,
    },
    /// Open the backup (`.bak`) of a project file that could not be read, in its place.
    OpenBackup(PathBuf),
    /// Cancel the running training.
    CancelTraining,
    /// Score every test image with the trained model.
    RunEvaluation,
    /// Show one image (index in the project) in the viewer.
    SelectImage(usize),
    /// Set both thresholds.
    SetThresholds(Thresholds),
    /// Go back to the model's suggested thresholds.
    SuggestThresholds,
    /// Switch tab.
    SwitchTab(Tab),
    /// Quit now, without asking again.
    QuitNow,
}

/// A message shown briefly in the corner.
#[derive(Debug, Clone)]
pub struct Toast {
    /// Text.
    pub text: String,
    /// Whether it reports a problem.
    pub is_error: bool,
    /// When it disappears.
    pub until: Instant,
}

/// A running import.
pub struct ImportTask {
    /// Progress (done, total) written by the worker.
    pub progress: Arc<Mutex<(usize, usize)>>,
    /// Cancels the import.
    pub stop: StopFlag,
    /// The result.
    pub result: Receiver<ImportReport>,
}

/// The running (or last) training as the UI shows it.
pub struct TrainingView {
    /// The worker, while it runs.
    pub handle: Option<TrainingHandle>,
    /// Epoch reports so far.
    pub history: Vec<EpochReport>,
    /// Epochs planned.
    pub max_epochs: u32,
    /// Current epoch and batch progress: (epoch, batch, batches).
    pub batch: Option<(u32, usize, usize)>,
    /// Latest throughput, images per second.
    pub images_per_sec: f64,
    /// Latest estimate of seconds left.
    pub eta_secs: f64,
    /// Status line ("Preparing images 12/200", "Epoch 3 of 30", "Finished").
    pub status: String,
    /// Set when the run ended.
    pub outcome: Option<TrainingOutcome>,
    /// Warnings (skipped images).
    pub warnings: Vec<String>,
}

/// How a training run ended.
#[derive(Debug, Clone)]
pub enum TrainingOutcome {
    /// Model written.
    Finished(TrainingSummary),
    /// Cancelled by the user.
    Cancelled,
    /// Failed with this message.
    Failed(String),
}

/// Background inspection results.
pub enum EvalEvent {
    /// Score of one image (index in the project).
    Score(usize, Result<f32, String>),
    /// A full inspection of one image for the viewer.
    Inspected(usize, Box<(DecodedImage, Inspection)>),
    /// A full inspection failed.
    InspectFailed(usize, String),
    /// All requested scores are done.
    ScoresDone,
}

/// The image shown in the viewer with its inspection.
pub struct ViewerImage {
    /// Index in the project.
    pub index: usize,
    /// The decoded image.
    pub decoded: DecodedImage,
    /// Its inspection (region and class follow the current thresholds).
    pub inspection: Inspection,
    /// Texture of the plain image.
    pub plain: egui::TextureHandle,
    /// Texture of the image with heatmap and outline at `overlay_thresholds`.
    pub overlay: egui::TextureHandle,
    /// Thresholds the overlay texture was drawn with.
    pub overlay_thresholds: Thresholds,
}

/// Evaluation state.
pub struct EvaluationState {
    /// The loaded model, shared with inspection threads.
    pub inspector: Option<Arc<Mutex<Inspector>>>,
    /// Model file the inspector was loaded from.
    pub inspector_path: Option<PathBuf>,
    /// Scores by project image index.
    pub scores: HashMap<usize, Result<f32, String>>,
    /// Background results.
    pub events: Option<Receiver<EvalEvent>>,
    /// Sender for background results.
    pub sender: Sender<EvalEvent>,
    /// Scoring in progress: (done, total).
    pub scoring: Option<(usize, usize)>,
    /// Selected image index.
    pub selected: Option<usize>,
    /// The image in the viewer.
    pub viewer: Option<ViewerImage>,
    /// Whether the heatmap overlay is shown.
    pub show_overlay: bool,
    /// Whether an inspection for the viewer is running.
    pub inspecting: bool,
    /// Sort the list by score, highest first.
    pub sort_by_score: bool,
    /// Target rate, percent, of the "false alarms ≤" and "escapes ≤" threshold choices.
    pub target_rate_pct: f64,
    /// Viewer zoom/pan rectangle (egui Scene).
    pub scene_rect: egui::Rect,
}

/// Files dropped onto the evaluation tab, waiting for the user to say good or nok.
#[derive(Debug, Clone, Default)]
pub struct PendingDrop {
    /// The dropped paths.
    pub paths: Vec<PathBuf>,
}

/// The app state and runtime resources.
pub struct InkspectApp {
    /// The open project.
    pub project: Project,
    /// Its file, once saved or opened.
    pub project_path: Option<PathBuf>,
    /// Unsaved changes.
    pub dirty: bool,
    /// Current tab.
    pub tab: Tab,
    /// Recently opened projects, newest first.
    pub recent: Vec<PathBuf>,
    /// Where the recent list is stored (none in tests).
    pub recent_file: Option<PathBuf>,
    /// Commands queued by widgets, applied in `logic`.
    pub queue: Vec<Command>,
    /// Results of file dialogs (running on their own threads).
    pub dialog_tx: Sender<Command>,
    dialog_rx: Receiver<Command>,
    /// Running import.
    pub import: Option<ImportTask>,
    /// Files the last imports could not read.
    pub import_failures: Vec<ImportFailure>,
    /// Duplicates skipped by the last import.
    pub import_duplicates: usize,
    /// The running or last training.
    pub training: Option<TrainingView>,
    /// Evaluation state.
    pub evaluation: EvaluationState,
    /// Thumbnails.
    pub thumbnails: ThumbnailCache,
    /// Selected images on the dataset tab (project indices).
    pub dataset_selection: std::collections::BTreeSet<usize>,
    /// Toasts.
    pub toasts: Vec<Toast>,
    /// Desktop notifications.
    pub notifier: Box<dyn Notifier>,
    /// Notifications sent (summary, body), for the log and tests.
    pub notifications_sent: Vec<(String, String)>,
    /// The compute device (probed once, on first need).
    pub device: Option<ComputeDevice>,
    /// Prepared-image cache.
    pub cache: DatasetCache,
    /// The close-confirmation dialog is open.
    pub confirm_close: bool,
    /// The "discard unsaved changes and start a new project?" dialog is open.
    pub confirm_new: bool,
    /// Dropped files waiting for a role.
    pub pending_drop: Option<PendingDrop>,
    /// Error to show in a dialog (e.g. a project that cannot be opened).
    pub error_dialog: Option<ErrorDialog>,
    /// The checkpoint of an interrupted training of this project's model, if one exists.
    pub checkpoint: Option<CheckpointHeader>,
    /// Duration of the last `ui` call, milliseconds.
    pub last_ui_ms: f32,
    /// Longest `ui` call while a training ran, milliseconds.
    pub max_ui_ms_while_training: f32,
    /// Whole frames (UI and rendering, from eframe) while a training ran: (count, sum ms, max ms).
    pub frames_while_training: (u32, f32, f32),
    /// Dataset-tab preview: (image index, size) it was made for, original and downscaled textures.
    pub preview: Option<((usize, u32), egui::TextureHandle, egui::TextureHandle)>,
    /// A preview being decoded off the UI thread: its key and where the result arrives.
    pub preview_job: Option<((usize, u32), Receiver<PreviewResult>)>,
    last_title: String,
    quitting: bool,
}

impl InkspectApp {
    /// A new app with an empty project.
    pub fn new(cc: &eframe::CreationContext<'_>, notifier: Box<dyn Notifier>) -> Self {
        let recent_file = config_dir().map(|d| d.join("recent.json"));
        let recent = recent_file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice::<Vec<PathBuf>>(&b).ok())
            .unwrap_or_default();
        Self::with_parts(&cc.egui_ctx, notifier, recent_file, recent)
    }

    /// A new app for tests: no recent-projects file, the given notifier.
    pub fn for_tests(ctx: &egui::Context, notifier: Box<dyn Notifier>) -> Self {
        Self::with_parts(ctx, notifier, None, Vec::new())
    }

    fn with_parts(
        ctx: &egui::Context,
        notifier: Box<dyn Notifier>,
        recent_file: Option<PathBuf>,
        recent: Vec<PathBuf>,
    ) -> Self {
        let (dialog_tx, dialog_rx) = channel();
        let (eval_tx, _) = channel();
        Self {
            project: Project::new("Untitled"),
            project_path: None,
            dirty: false,
            tab: Tab::Dataset,
            recent,
            recent_file,
            queue: Vec::new(),
            dialog_tx,
            dialog_rx,
            import: None,
            import_failures: Vec::new(),
            import_duplicates: 0,
            training: None,
            evaluation: EvaluationState {
                inspector: None,
                inspector_path: None,
                scores: HashMap::new(),
                events: None,
                sender: eval_tx,
                scoring: None,
                selected: None,
                viewer: None,
                show_overlay: true,
                inspecting: false,
                sort_by_score: true,
                target_rate_pct: 1.0,
                scene_rect: egui::Rect::ZERO,
            },
            thumbnails: ThumbnailCache::new(ctx),
            dataset_selection: Default::default(),
            toasts: Vec::new(),
            notifier,
            notifications_sent: Vec::new(),
            device: None,
            cache: DatasetCache::default(),
            confirm_close: false,
            confirm_new: false,
            pending_drop: None,
            error_dialog: None,
            checkpoint: None,
            last_ui_ms: 0.0,
            max_ui_ms_while_training: 0.0,
            frames_while_training: (0, 0.0, 0.0),
            preview: None,
            preview_job: None,
            last_title: String::new(),
            quitting: false,
        }
    }

    /// Queues a command (applied at the start of the next frame).
    pub fn send(&mut self, command: Command) {
        self.queue.push(command);
    }

    /// Whether a training is running.
    pub fn is_training(&self) -> bool {
        self.training.as_ref().is_some_and(|t| t.handle.is_some())
    }

    /// The thresholds in force: the user's, else the model's suggestion.
    pub fn thresholds(&self) -> Option<Thresholds> {
        self.project.thresholds.or_else(|| {
            self.evaluation
                .inspector
                .as_ref()
                .and_then(|i| i.lock().ok().map(|i| i.suggested_thresholds()))
        })
    }

    /// Shows a toast.
    pub fn toast(&mut self, text: impl Into<String>, is_error: bool) {
        let text = text.into();
        if is_error {
            log::warn!("{text}");
        } else {
            log::info!("{text}");
        }
        self.toasts.push(Toast {
            text,
            is_error,
            until: Instant::now() + Duration::from_secs(if is_error { 8 } else { 4 }),
        });
    }

    /// The compute device, probed on first use.
    pub fn device(&mut self) -> ComputeDevice {
        self.device
            .get_or_insert_with(|| select_device(DevicePreference::Auto))
            .clone()
    }

    /// Where a new model for this project is written.
    pub fn default_model_path(&self) -> PathBuf {
        let stem = file_stem_for(&self.project.name);
        match &self.project_path {
            Some(p) => self.project.model_path_or_default(p),
            None if self.project.model_path.is_some() => {
                self.project.model_path.clone().unwrap_or_default()
            }
            None => data_dir()
                .unwrap_or_else(std::env::temp_dir)
                .join("models")
                .join(format!("{stem}-{}.{MODEL_EXTENSION}", unix_secs())),
        }
    }

    /// Applies every queued command and drains background events. Called once per frame.
    pub fn update_state(&mut self, ctx: &egui::Context) {
        while let Ok(cmd) = self.dialog_rx.try_recv() {
            self.queue.push(cmd);
        }
        let commands = std::mem::take(&mut self.queue);
        for cmd in commands {
            self.apply(ctx, cmd);
        }
        self.poll_import();
        self.poll_training();
        self.poll_evaluation(ctx);
        self.thumbnails.poll(ctx);
        self.toasts.retain(|t| t.until > Instant::now());
        if self.import.is_some()
            || self.is_training()
            || self.evaluation.scoring.is_some()
            || self.evaluation.inspecting
        {
            ctx.request_repaint_after(Duration::from_millis(100));
        }
        if let Some(t) = self.toasts.iter().map(|t| t.until).min() {
            ctx.request_repaint_after(
                t.saturating_duration_since(Instant::now()) + Duration::from_millis(10),
            );
        }
    }

    /// Applies one command.
    pub fn apply(&mut self, ctx: &egui::Context, cmd: Command) {
        match cmd {
            Command::NewProject => {
                self.replace_project(Project::new("Untitled"), None);
            }
            Command::OpenProject(path) => match Project::load(&path) {
                Ok(project) => {
                    let missing = project.missing_files();
                    self.replace_project(project, Some(path.clone()));
                    self.remember_recent(&path);
                    if !missing.is_empty() {
                        self.toast(
                            format!(
                                "{} image files of this project are missing (first: {})",
                                missing.len(),
                                missing[0].display()
                            ),
                            true,
                        );
                    }
                    if self.project.model_path.is_some() {
                        self.load_inspector();
                    }
                }
                Err(e) => {
                    let mut message = e.to_string();
                    let bak = backup_path(&path);
                    let has_backup = bak.is_file();
                    if has_backup {
                        message.push_str(&format!(
                            "\n\nA backup of the previous save exists: {}",
                            bak.display()
                        ));
                    }
                    self.error_dialog = Some(ErrorDialog {
                        message,
                        backup_of: has_backup.then(|| path.clone()),
                    });
                }
            },
            Command::SaveProject => match self.project_path.clone() {
                Some(path) => self.save_to(&path),
                None => self.dialog_save_as(),
            },
            Command::SaveProjectAs(path) => {
                let path = if path.extension().is_none() {
                    path.with_extension(crate::engine::project::PROJECT_EXTENSION)
                } else {
                    path
                };
                if self.project.name == "Untitled"
                    && let Some(stem) = path.file_stem()
                {
                    self.project.name = stem.to_string_lossy().into_owned();
                }
                self.save_to(&path);
            }
            Command::SetFramework(f) => {
                if self.project.framework != f {
                    self.project.framework = f;
                    self.dirty = true;
                }
            }
            Command::Import { paths, role } => self.start_import(paths, role),
            Command::CancelImport => {
                if let Some(t) = &self.import {
                    t.stop.set();
                }
            }
            Command::RemoveImages(mut indices) => {
                indices.sort_unstable();
                indices.dedup();
                for &i in indices.iter().rev() {
                    if i < self.project.images.len() {
                        self.project.images.remove(i);
                    }
                }
                self.dataset_selection.clear();
                self.evaluation.scores.clear();
                self.evaluation.selected = None;
                self.evaluation.viewer = None;
                self.preview = None;
                self.dirty = true;
            }
            Command::SetDataset(d) => {
                if self.project.dataset != d {
                    self.project.dataset = d;
                    self.dirty = true;
                }
            }
            Command::SetTraining(t) => {
                if self.project.training != t {
                    self.project.training = t;
                    self.dirty = true;
                }
            }
            Command::StartTraining { resume } => self.start_training(resume),
            Command::OpenBackup(path) => match Project::load(&backup_path(&path)) {
                Ok(project) => {
                    self.replace_project(project, Some(path.clone()));
                    self.dirty = true;
                    self.toast(
                        format!(
                            "Opened the backup of {}; save to replace the damaged file",
                            path.display()
                        ),
                        false,
                    );
                }
                Err(e) => {
                    self.error_dialog = Some(ErrorDialog {
                        message: format!("The backup cannot be opened either: {e}"),
                        backup_of: None,
                    })
                }
            },
            Command::CancelTraining => {
                if let Some(h) = self.training.as_ref().and_then(|t| t.handle.as_ref()) {
                    h.stop.set();
                    if let Some(t) = &mut self.training {
                        t.status = "Cancelling…".into();
                    }
                }
            }
            Command::RunEvaluation => self.start_scoring(),
            Command::SelectImage(i) => self.select_image(ctx, i),
            Command::SetThresholds(t) => {
                if self.project.thresholds != Some(t) {
                    self.project.thresholds = Some(t);
                    self.dirty = true;
                    self.apply_thresholds_to_viewer(ctx);
                }
            }
            Command::SuggestThresholds => {
                if self.project.thresholds.is_some() {
                    self.project.thresholds = None;
                    self.dirty = true;
                }
                self.apply_thresholds_to_viewer(ctx);
            }
            Command::SwitchTab(tab) => self.tab = tab,
            Command::QuitNow => {
                if let Some(h) = self.training.as_ref().and_then(|t| t.handle.as_ref()) {
                    h.stop.set();
                }
                self.quitting = true;
                self.confirm_close = false;
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            }
        }
    }

    fn replace_project(&mut self, project: Project, path: Option<PathBuf>) {
        self.project = project;
        self.project_path = path;
        self.dirty = false;
        self.dataset_selection.clear();
        self.import_failures.clear();
        self.training = None;
        self.preview = None;
        self.evaluation.inspector = None;
        self.evaluation.inspector_path = None;
        self.evaluation.scores.clear();
        self.evaluation.selected = None;
        self.evaluation.viewer = None;
        self.evaluation.events = None;
        self.evaluation.scoring = None;
        self.refresh_checkpoint();
    }

    /// Looks for the checkpoint of an interrupted training of this project's model.
    pub fn refresh_checkpoint(&mut self) {
        self.checkpoint = self
            .project_path
            .as_ref()
            .map(|_| checkpoint_path(&self.default_model_path()))
            .and_then(|p| Checkpoint::read_header(&p).ok());
    }

    fn save_to(&mut self, path: &Path) {
        match self.project.save(path) {
            Ok(()) => {
                self.project_path = Some(path.to_path_buf());
                self.dirty = false;
                self.remember_recent(path);
                self.refresh_checkpoint();
                self.toast(format!("Saved {}", path.display()), false);
            }
            Err(e) => self.toast(format!("Could not save: {e}"), true),
        }
    }

    fn remember_recent(&mut self, path: &Path) {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        self.recent.retain(|p| p != &abs);
        self.recent.insert(0, abs);
        self.recent.truncate(10);
        if let Some(file) = &self.recent_file
            && let Ok(json) = serde_json::to_vec_pretty(&self.recent)
            && let Err(e) = crate::engine::atomic_write(file, &json)
        {
            log::warn!("cannot store recent projects in {}: {e}", file.display());
        }
    }

    /// Opens a native "save as" dialog on its own thread.
    pub fn dialog_save_as(&self) {
        let tx = self.dialog_tx.clone();
        let name = format!(
            "{}.{}",
            file_stem_for(&self.project.name),
            crate::engine::project::PROJECT_EXTENSION
        );
        std::thread::spawn(move || {
            if let Some(p) = rfd::FileDialog::new()
                .set_title("Save project as")
                .set_file_name(name)
                .add_filter(
                    "Inkspect project",
                    &[crate::engine::project::PROJECT_EXTENSION],
                )
                .save_file()
            {
                let _ = tx.send(Command::SaveProjectAs(p));
            }
        });
    }

    /// Opens a native "open project" dialog on its own thread.
    pub fn dialog_open(&self) {
        let tx = self.dialog_tx.clone();
        std::thread::spawn(move || {
            if let Some(p) = rfd::FileDialog::new()
                .set_title("Open project")
                .add_filter(
                    "Inkspect project",
                    &[crate::engine::project::PROJECT_EXTENSION],
                )
                .pick_file()
            {
                let _ = tx.send(Command::OpenProject(p));
            }
        });
    }

    /// Opens a native file (or folder) picker for importing images with `role`.
    pub fn dialog_import(&self, role: ImageRole, folder: bool) {
        let tx = self.dialog_tx.clone();
        std::thread::spawn(move || {
            let dialog =
                rfd::FileDialog::new().set_title(format!("Import {} images", role.label()));
            let paths = if folder {
                dialog.pick_folder().map(|p| vec![p])
            } else {
                dialog
                    .add_filter(
                        "Images",
                        crate::engine::dataset::decode::SUPPORTED_EXTENSIONS,
                    )
                    .pick_files()
            };
            if let Some(paths) = paths {
                let _ = tx.send(Command::Import { paths, role });
            }
        });
    }

    fn start_import(&mut self, paths: Vec<PathBuf>, role: ImageRole) {
        if self.import.is_some() {
            self.toast("An import is already running", true);
            return;
        }
        let known = self.project.content_hashes();
        let size = self.project.dataset.effective_size_px();
        let cache = self.cache.clone();
        let progress = Arc::new(Mutex::new((0usize, 0usize)));
        let stop = StopFlag::new();
        let (tx, rx) = channel();
        let worker_progress = Arc::clone(&progress);
        let worker_stop = stop.clone();
        std::thread::spawn(move || {
            let mut items: Vec<ImportItem> = Vec::new();
            let mut plain = Vec::new();
            for p in paths {
                if p.is_dir() && is_mvtec_layout(&p) {
                    items.extend(scan_mvtec(&p).items);
                } else {
                    plain.push(p);
                }
            }
            let (files, failures) = collect_image_files(&plain);
            items.extend(items_with_role(files, role));
            if let Ok(mut p) = worker_progress.lock() {
                *p = (0, items.len());
            }
            let options = ImportOptions {
                prepare: (role == ImageRole::TrainGood).then_some((size, cache)),
                known_hashes: known,
            };
            let mut report = import_items(
                &items,
                &options,
                &|done, total| {
                    if let Ok(mut p) = worker_progress.lock() {
                        *p = (done, total);
                    }
                },
                &worker_stop,
            );
            report.failures.splice(0..0, failures);
            let _ = tx.send(report);
        });
        self.import = Some(ImportTask {
            progress,
            stop,
            result: rx,
        });
    }

    fn poll_import(&mut self) {
        let Some(task) = &self.import else { return };
        let report = match task.result.try_recv() {
            Ok(r) => r,
            Err(std::sync::mpsc::TryRecvError::Empty) => return,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                self.import = None;
                self.toast("The import stopped unexpectedly", true);
                return;
            }
        };
        self.import = None;
        let added = self.project.add_imported(&report);
        if added > 0 {
            self.dirty = true;
        }
        self.import_duplicates = report.duplicates.len();
        let n_failed = report.failures.len();
        self.import_failures.extend(report.failures);
        let mut msg = format!("Imported {added} images");
        if n_failed > 0 {
            msg.push_str(&format!(", {n_failed} could not be read (see the list)"));
        }
        if !report.duplicates.is_empty() {
            msg.push_str(&format!(", {} duplicates skipped", report.duplicates.len()));
        }
        if let Some(first) = report.enlarged.first() {
            msg.push_str(&format!(
                "; {} are smaller than the training size and will be enlarged (first: {})",
                report.enlarged.len(),
                first.display()
            ));
        }
        if report.cancelled {
            msg.push_str(" (cancelled)");
        }
        self.toast(msg, n_failed > 0);
    }

    fn start_training(&mut self, resume: bool) {
        if self.is_training() {
            return;
        }
        let images: Vec<_> = self
            .project
            .images_with_role(ImageRole::TrainGood)
            .cloned()
            .collect();
        if images.len() < crate::engine::training::MIN_TRAINING_IMAGES {
            self.toast(
                "Import at least 2 good images on the Dataset tab before training",
                true,
            );
            return;
        }
        let request = TrainRequest {
            framework: self.project.framework,
            images,
            dataset: self.project.dataset,
            training: self.project.training,
            model_path: self.default_model_path(),
            cache: self.cache.clone(),
            device: self.device(),
            resume,
            memory_budget_bytes: None,
        };
        let max_epochs = request.training.max_epochs;
        self.max_ui_ms_while_training = 0.0;
        self.frames_while_training = (0, 0.0, 0.0);
        self.training = Some(TrainingView {
            handle: Some(spawn_training(request)),
            history: Vec::new(),
            max_epochs,
            batch: None,
            images_per_sec: 0.0,
            eta_secs: 0.0,
            status: "Starting…".into(),
            outcome: None,
            warnings: Vec::new(),
        });
    }

    fn poll_training(&mut self) {
        let Some(view) = &mut self.training else {
            return;
        };
        let Some(handle) = &view.handle else { return };
        let mut finished: Option<(PathBuf, TrainingSummary)> = None;
        let mut ended = false;
        let mut notify: Option<(String, String)> = None;
        loop {
            let event = match handle.events.try_recv() {
                Ok(e) => e,
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    ended = true;
                    if view.outcome.is_none() {
                        view.outcome = Some(TrainingOutcome::Failed(
                            "the training stopped unexpectedly".into(),
                        ));
                    }
                    break;
                }
            };
            match event {
                TrainEvent::Preparing { done, total } => {
                    view.status = format!("Preparing images {done}/{total}");
                }
                TrainEvent::Warning { message } => view.warnings.push(message),
                TrainEvent::Started {
                    n_train,
                    n_validation,
                    device,
                    ..
                } => {
                    view.status = format!(
                        "Training on {n_train} images (validating on {n_validation}), {device}"
                    );
                }
                TrainEvent::Batch {
                    epoch,
                    batch,
                    batches,
                    images_per_sec,
                    eta_secs,
                    ..
                } => {
                    view.batch = Some((epoch, batch, batches));
                    view.images_per_sec = images_per_sec;
                    view.eta_secs = eta_secs;
                }
                TrainEvent::Epoch(r) => {
                    view.images_per_sec = r.images_per_sec;
                    view.eta_secs = r.eta_secs;
                    view.history.push(r);
                }
                TrainEvent::Finished {
                    summary,
                    model_path,
                    ..
                } => {
                    let why = match summary.stop_reason {
                        StopReason::MaxEpochs => format!("after {} epochs", summary.epochs_run),
                        StopReason::ErrorThreshold => format!(
                            "early at epoch {}: the error threshold was reached",
                            summary.epochs_run
                        ),
                    };
                    view.status = format!("Finished {why}");
                    notify = Some((
                        format!("Inkspect: model ready – {}", self.project.name),
                        format!("Training of \"{}\" finished {why}.", self.project.name),
                    ));
                    view.outcome = Some(TrainingOutcome::Finished(summary.clone()));
                    finished = Some((model_path, summary));
                    ended = true;
                }
                TrainEvent::Cancelled { epochs_done } => {
                    view.status = format!(
                        "Cancelled after {epochs_done} epochs; the previous model is unchanged{}",
                        if epochs_done > 0 {
                            " (Resume continues from the last finished epoch)"
                        } else {
                            ""
                        }
                    );
                    view.outcome = Some(TrainingOutcome::Cancelled);
                    notify = Some((
                        format!("Inkspect: training cancelled – {}", self.project.name),
                        format!(
                            "Training of \"{}\" was cancelled after {epochs_done} epochs.",
                            self.project.name
                        ),
                    ));
                    ended = true;
                }
                TrainEvent::Failed { message } => {
                    view.status = format!("Failed: {message}");
                    view.outcome = Some(TrainingOutcome::Failed(message.clone()));
                    notify = Some((
                        format!("Inkspect: training failed – {}", self.project.name),
                        message,
                    ));
                    ended = true;
                }
            }
        }
        if ended {
            view.handle = None;
            let (n, sum, max) = self.frames_while_training;
            if n > 0 {
                log::warn!(
                    "frame time while training (UI + rendering): mean {:.2} ms, max {:.2} ms over {n} frames",
                    sum / n as f32,
                    max
                );
            }
        }
        if let Some((summary, body)) = notify {
            let is_error = !matches!(view.outcome, Some(TrainingOutcome::Finished(_)));
            self.toast(format!("{summary}. {body}"), is_error);
            if let Err(e) = self.notifier.notify(&summary, &body) {
                log::warn!("desktop notification not shown ({e}); the in-app message stands in");
            }
            self.notifications_sent.push((summary, body));
        }
        if let Some((path, _)) = finished {
            self.project.model_path = Some(path);
            // Thresholds of an older model are in other units: use the new model's suggestion.
            self.project.thresholds = None;
            self.dirty = true;
            if let Some(p) = self.project_path.clone() {
                self.save_to(&p);
            }
            self.load_inspector();
        }
        if ended {
            self.refresh_checkpoint();
        }
    }

    /// Loads the project's model for evaluation (errors become a toast).
    pub fn load_inspector(&mut self) {
        self.evaluation.inspector = None;
        self.evaluation.scores.clear();
        self.evaluation.viewer = None;
        let Some(path) = self.project.model_path.clone() else {
            return;
        };
        let device = self.device();
        match Inspector::load(&path, &device.device) {
            Ok(inspector) => {
                self.evaluation.inspector = Some(Arc::new(Mutex::new(inspector)));
                self.evaluation.inspector_path = Some(path);
            }
            Err(e) => self.toast(format!("Cannot load the model: {e}"), true),
        }
    }

    /// Header of the project's model, if loaded.
    pub fn model_header(&self) -> Option<crate::engine::model::ModelHeader> {
        self.evaluation
            .inspector
            .as_ref()
            .and_then(|i| i.lock().ok().map(|i| i.header.clone()))
            .or_else(|| {
                self.project
                    .model_path
                    .as_ref()
                    .and_then(|p| ModelFile::read_header(p).ok())
            })
    }

    fn ensure_eval_channel(&mut self) {
        if self.evaluation.events.is_none() {
            let (tx, rx) = channel();
            self.evaluation.sender = tx;
            self.evaluation.events = Some(rx);
        }
    }

    fn start_scoring(&mut self) {
        if self.evaluation.inspector.is_none() {
            self.load_inspector();
        }
        let Some(inspector) = self.evaluation.inspector.clone() else {
            self.toast("Train a model first (Training tab)", true);
            return;
        };
        if self.evaluation.scoring.is_some() {
            return;
        }
        let jobs: Vec<(usize, PathBuf)> = self
            .project
            .images
            .iter()
            .enumerate()
            .filter(|(_, i)| i.role != ImageRole::TrainGood)
            .map(|(k, i)| (k, i.path.clone()))
            .collect();
        if jobs.is_empty() {
            self.toast(
                "Import test images (good and nok) to evaluate the model",
                true,
            );
            return;
        }
        self.ensure_eval_channel();
        self.evaluation.scores.clear();
        self.evaluation.scoring = Some((0, jobs.len()));
        let tx = self.evaluation.sender.clone();
        std::thread::spawn(move || {
            for chunk in jobs.chunks(8) {
                let paths: Vec<PathBuf> = chunk.iter().map(|(_, p)| p.clone()).collect();
                let Ok(inspector) = inspector.lock() else {
                    return;
                };
                let thresholds = inspector.suggested_thresholds();
                let mut k = 0;
                let mut out = Vec::new();
                inspector.inspect_files(&paths, thresholds, 8, &mut |(_, r)| {
                    out.push((chunk[k].0, r.map(|i| i.score).map_err(|e| e.to_string())));
                    k += 1;
                });
                drop(inspector);
                for (idx, r) in out {
                    if tx.send(EvalEvent::Score(idx, r)).is_err() {
                        return;
                    }
                }
            }
            let _ = tx.send(EvalEvent::ScoresDone);
        });
    }

    fn select_image(&mut self, _ctx: &egui::Context, index: usize) {
        self.evaluation.selected = Some(index);
        if self.evaluation.inspector.is_none() && self.project.model_path.is_some() {
            self.load_inspector();
        }
        let Some(inspector) = self.evaluation.inspector.clone() else {
            return;
        };
        let Some(image) = self.project.images.get(index) else {
            return;
        };
        let path = image.path.clone();
        self.ensure_eval_channel();
        self.evaluation.inspecting = true;
        let tx = self.evaluation.sender.clone();
        std::thread::spawn(move || {
            let result = decode_image(&path)
                .map_err(|e| e.to_string())
                .and_then(|decoded| {
                    let inspector = inspector
                        .lock()
                        .map_err(|_| "model lock poisoned".to_string())?;
                    let ins = inspector.inspect(&decoded, inspector.suggested_thresholds());
                    Ok((decoded, ins))
                });
            let _ = tx.send(match result {
                Ok(pair) => EvalEvent::Inspected(index, Box::new(pair)),
                Err(e) => EvalEvent::InspectFailed(index, e),
            });
        });
    }

    fn poll_evaluation(&mut self, ctx: &egui::Context) {
        let Some(rx) = &self.evaluation.events else {
            return;
        };
        let mut events = Vec::new();
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        for e in events {
            match e {
                EvalEvent::Score(i, r) => {
                    self.evaluation.scores.insert(i, r);
                    if let Some((done, _)) = &mut self.evaluation.scoring {
                        *done += 1;
                    }
                }
                EvalEvent::ScoresDone => {
                    self.evaluation.scoring = None;
                    let failed = self
                        .evaluation
                        .scores
                        .values()
                        .filter(|r| r.is_err())
                        .count();
                    if failed > 0 {
                        self.toast(format!("{failed} test images could not be read"), true);
                    }
                }
                EvalEvent::Inspected(i, pair) => {
                    self.evaluation.inspecting = false;
                    if self.evaluation.selected != Some(i) {
                        continue;
                    }
                    let (decoded, mut inspection) = *pair;
                    self.evaluation.scores.insert(i, Ok(inspection.score));
                    let thresholds = self.thresholds().unwrap_or(inspection.thresholds);
                    inspection.apply_thresholds(thresholds);
                    let plain = ctx.load_texture(
                        "viewer-plain",
                        color_image(&decoded),
                        egui::TextureOptions::LINEAR,
                    );
                    let over = overlay_image(&decoded, &inspection);
                    let overlay =
                        ctx.load_texture("viewer-overlay", over, egui::TextureOptions::LINEAR);
                    let same_size = self.evaluation.viewer.as_ref().is_some_and(|v| {
                        (v.decoded.width, v.decoded.height) == (decoded.width, decoded.height)
                    });
                    if !same_size {
                        self.evaluation.scene_rect = egui::Rect::ZERO;
                    }
                    self.evaluation.viewer = Some(ViewerImage {
                        index: i,
                        decoded,
                        inspection,
                        plain,
                        overlay,
                        overlay_thresholds: thresholds,
                    });
                }
                EvalEvent::InspectFailed(i, msg) => {
                    self.evaluation.inspecting = false;
                    self.evaluation.scores.insert(i, Err(msg.clone()));
                    self.toast(msg, true);
                }
            }
        }
    }

    fn apply_thresholds_to_viewer(&mut self, _ctx: &egui::Context) {
        let Some(t) = self.thresholds() else { return };
        if let Some(v) = &mut self.evaluation.viewer {
            v.inspection.apply_thresholds(t);
            if v.overlay_thresholds != t {
                v.overlay.set(
                    overlay_image(&v.decoded, &v.inspection),
                    egui::TextureOptions::LINEAR,
                );
                v.overlay_thresholds = t;
            }
        }
    }

    fn title(&self) -> String {
        let file = self
            .project_path
            .as_ref()
            .map(|p| format!(" ({})", p.display()))
            .unwrap_or_default();
        format!(
            "{}{} – Inkspect{}",
            self.project.name,
            if self.dirty { " *" } else { "" },
            file
        )
    }

    fn handle_close_request(&mut self, ctx: &egui::Context) {
        if self.quitting {
            return;
        }
        if ctx.input(|i| i.viewport().close_requested()) && (self.dirty || self.is_training()) {
            ctx.send_viewport_cmd(egui::ViewportCommand::CancelClose);
            self.confirm_close = true;
        }
    }

    fn handle_dropped_files(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .collect()
        });
        if dropped.is_empty() {
            return;
        }
        match self.tab {
            Tab::Evaluation => self.pending_drop = Some(PendingDrop { paths: dropped }),
            _ => self.send(Command::Import {
                paths: dropped,
                role: ImageRole::TrainGood,
            }),
        }
    }

    fn project_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            if ui
                .button("New")
                .on_hover_text("Start a new, empty project")
                .clicked()
            {
                if self.dirty {
                    self.confirm_new = true;
                } else {
                    self.send(Command::NewProject);
                }
            }
            if ui.button("Open…").clicked() {
                self.dialog_open();
            }
            if ui.button("Save").clicked() {
                self.send(Command::SaveProject);
            }
            if ui.button("Save as…").clicked() {
                self.dialog_save_as();
            }
            ui.menu_button("Recent", |ui| {
                if self.recent.is_empty() {
                    ui.label("No recent projects");
                }
                for p in self.recent.clone() {
                    if ui.button(p.display().to_string()).clicked() {
                        self.send(Command::OpenProject(p));
                        ui.close();
                    }
                }
            });
            ui.separator();
            let mut framework = self.project.framework;
            egui::ComboBox::from_label("Framework")
                .selected_text(framework.display_name())
                .show_ui(ui, |ui| {
                    for f in Framework::ALL {
                        ui.selectable_value(&mut framework, f, f.display_name())
                            .on_hover_text(f.description());
                    }
                });
            if framework != self.project.framework {
                self.send(Command::SetFramework(framework));
            }
            ui.separator();
            let name = format!(
                "{}{}",
                self.project.name,
                if self.dirty { " *" } else { "" }
            );
            ui.label(RichText::new(name).strong())
                .on_hover_text(if self.dirty {
                    "Unsaved changes"
                } else {
                    "All changes saved"
                });
        });
        ui.add_space(2.0);
        ui.horizontal(|ui| {
            for (tab, label) in [
                (Tab::Dataset, "1  Dataset"),
                (Tab::Training, "2  Training"),
                (Tab::Evaluation, "3  Evaluation"),
            ] {
                if ui
                    .selectable_label(self.tab == tab, RichText::new(label).size(16.0))
                    .clicked()
                {
                    self.send(Command::SwitchTab(tab));
                }
            }
        });
    }

    fn status_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            let c = self.project.counts();
            ui.label(format!(
                "{} train good · {} test good · {} test nok",
                c.train_good, c.test_good, c.test_nok
            ));
            ui.separator();
            match &self.project.model_path {
                Some(p) => ui.label(format!("Model: {}", p.display())),
                None => ui.label("No model yet"),
            };
            if let Some(d) = &self.device {
                ui.separator();
                ui.label(&d.description);
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                ui.label(format!("UI {:.1} ms", self.last_ui_ms))
                    .on_hover_text("Time spent building the last frame");
            });
        });
    }

    fn dialogs(&mut self, ui: &mut egui::Ui) {
        if self.confirm_close {
            let training = self.is_training();
            let dirty = self.dirty;
            let resp = egui::Modal::new(egui::Id::unique("confirm-close")).show(ui.ctx(), |ui| {
                ui.heading("Quit Inkspect?");
                if training {
                    ui.label("A training is running. Quitting cancels it; the previous model stays as it was.");
                }
                if dirty {
                    ui.label("The project has unsaved changes.");
                }
                ui.horizontal(|ui| {
                    if dirty && ui.button("Save and quit").clicked() {
                        self.send(Command::SaveProject);
                        self.send(Command::QuitNow);
                    }
                    if ui.button(if dirty { "Quit without saving" } else { "Quit" }).clicked() {
                        self.send(Command::QuitNow);
                    }
                    if ui.button("Cancel").clicked() {
                        ui.close();
                    }
                });
            });
            if resp.should_close() {
                self.confirm_close = false;
            }
        }
        if self.confirm_new {
            let resp = egui::Modal::new(egui::Id::unique("confirm-new")).show(ui.ctx(), |ui| {
                ui.heading("Start a new project?");
                ui.label("The current project has unsaved changes.");
                ui.horizontal(|ui| {
                    if ui.button("Save, then new").clicked() {
                        self.send(Command::SaveProject);
                        self.send(Command::NewProject);
                        ui.close();
                    }
                    if ui.button("Discard changes").clicked() {
                        self.send(Command::NewProject);
                        ui.close();
                    }
                    if ui.button("Cancel").clicked() {
                        ui.close();
                    }
                });
            });
            if resp.should_close() {
                self.confirm_new = false;
            }
        }
        if let Some(drop) = self.pending_drop.clone() {
            let resp = egui::Modal::new(egui::Id::unique("drop-role")).show(ui.ctx(), |ui| {
                ui.heading(format!(
                    "Import {} dropped items as test images",
                    drop.paths.len()
                ));
                ui.label("Are these good parts or defective (nok) parts?");
                ui.horizontal(|ui| {
                    if ui.button("Good").clicked() {
                        self.send(Command::Import {
                            paths: drop.paths.clone(),
                            role: ImageRole::TestGood,
                        });
                        ui.close();
                    }
                    if ui.button("Nok (defective)").clicked() {
                        self.send(Command::Import {
                            paths: drop.paths.clone(),
                            role: ImageRole::TestNok,
                        });
                        ui.close();
                    }
                    if ui.button("Cancel").clicked() {
                        ui.close();
                    }
                });
            });
            if resp.should_close() {
                self.pending_drop = None;
            }
        }
        if let Some(dialog) = self.error_dialog.clone() {
            let resp = egui::Modal::new(egui::Id::unique("error")).show(ui.ctx(), |ui| {
                ui.heading("Something went wrong");
                ui.label(&dialog.message);
                ui.horizontal(|ui| {
                    if let Some(path) = &dialog.backup_of
                        && ui.button("Open backup").clicked()
                    {
                        self.send(Command::OpenBackup(path.clone()));
                        ui.close();
                    }
                    if ui.button("OK").clicked() {
                        ui.close();
                    }
                });
            });
            if resp.should_close() {
                self.error_dialog = None;
            }
        }
    }

    fn show_toasts(&mut self, ui: &mut egui::Ui) {
        if self.toasts.is_empty() {
            return;
        }
        egui::Area::new(egui::Id::unique("toasts"))
            .anchor(egui::Align2::RIGHT_BOTTOM, [-12.0, -36.0])
            .order(egui::Order::Foreground)
            .interactable(false)
            .show(ui.ctx(), |ui| {
                for t in &self.toasts {
                    egui::Frame::popup(ui.style()).show(ui, |ui| {
                        ui.set_max_width(420.0);
                        let colour = if t.is_error {
                            style::WARN
                        } else {
                            Color32::LIGHT_GRAY
                        };
                        ui.label(RichText::new(&t.text).color(colour));
                    });
                }
            });
    }
}

impl eframe::App for InkspectApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.handle_dropped_files(ctx);
        self.update_state(ctx);
        self.handle_close_request(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let start = Instant::now();
        if self.is_training()
            && let Some(cpu) = frame.info().cpu_usage
        {
            let ms = cpu * 1000.0;
            let (n, sum, max) = self.frames_while_training;
            self.frames_while_training = (n + 1, sum + ms, max.max(ms));
        }
        let title = self.title();
        if title != self.last_title {
            ui.send_viewport_cmd(egui::ViewportCommand::Title(title.clone()));
            self.last_title = title;
        }
        egui::Panel::top("project-bar").show(ui, |ui| self.project_bar(ui));
        egui::Panel::bottom("status-bar").show(ui, |ui| self.status_bar(ui));
        match self.tab {
            Tab::Dataset => super::dataset_tab::show(self, ui),
            Tab::Training => super::training_tab::show(self, ui),
            Tab::Evaluation => super::evaluation_tab::show(self, ui),
        }
        self.dialogs(ui);
        self.show_toasts(ui);
        self.last_ui_ms = start.elapsed().as_secs_f32() * 1000.0;
        if self.is_training() {
            self.max_ui_ms_while_training = self.max_ui_ms_while_training.max(self.last_ui_ms);
        }
    }

    fn on_exit(&mut self) {
        if let Some(h) = self.training.as_mut().and_then(|t| t.handle.take()) {
            h.stop.set();
            // The worker checks the flag before every batch: wait for it to end cleanly (the
            // checkpoint of its last finished epoch stays, for a resume).
            let deadline = Instant::now() + Duration::from_secs(10);
            while !h.thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if h.thread.is_finished() {
                let _ = h.thread.join();
            } else {
                log::warn!("the training did not stop within 10 s; exiting anyway");
            }
        }
    }
}

/// An error shown in a dialog.
#[derive(Debug, Clone)]
pub struct ErrorDialog {
    /// What went wrong, naming the file.
    pub message: String,
    /// The project file whose `.bak` backup the dialog offers to open.
    pub backup_of: Option<PathBuf>,
}

/// A decoded preview (original, downscaled) or why the image cannot be read.
pub type PreviewResult = Result<(egui::ColorImage, egui::ColorImage), String>;

/// The viewer's overlay picture (heatmap and region outline over the image).
pub fn overlay_image(decoded: &DecodedImage, inspection: &Inspection) -> egui::ColorImage {
    let rgb = crate::engine::visual::overlay(decoded, inspection, 0.6);
    egui::ColorImage::from_rgb([rgb.width() as usize, rgb.height() as usize], rgb.as_raw())
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `$INKSPECT_CONFIG_DIR`, else `$XDG_CONFIG_HOME/inkspect`, else `~/.config/inkspect`.
pub fn config_dir() -> Option<PathBuf> {
    std::env::var_os("INKSPECT_CONFIG_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CONFIG_HOME").map(|d| PathBuf::from(d).join("inkspect")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config").join("inkspect"))
        })
}

pub use crate::engine::data_dir;
