//! Training on a worker thread: typed events over a channel, a stop flag checked before every
//! batch, early stop at the error threshold, and an atomically written model file. A failed or
//! cancelled run never touches the previous model file.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::engine::StopFlag;
use crate::engine::dataset::decode::ColourMode;
use crate::engine::dataset::import::ImportedImage;
use crate::engine::dataset::prepare::{
    DatasetCache, DatasetSettings, PreparedImage, prepare_file, split_train_validation,
};
use crate::engine::device::ComputeDevice;
use crate::engine::inference::{
    ErrorStats, Thresholds, anomaly_maps_batched, batch_tensor, image_scores, suggest_thresholds,
};
use crate::engine::model::{
    AutoencoderSpec, Checkpoint, CheckpointHeader, Framework, ModelFile, ModelHeader, Network,
    PatchMemorySpec, autoencoder_spec_for, checkpoint_path, dataset_fingerprint,
    patch_memory::contrast_floor_for, patch_memory_spec_for,
};

/// Progress events are sent at most this often (terminal events always go through).
pub const EVENT_INTERVAL: Duration = Duration::from_millis(250);

/// Capacity of the event channel made by [`spawn_training`].
pub const EVENT_CHANNEL_CAPACITY: usize = 256;

/// Fewest good images training accepts.
pub const MIN_TRAINING_IMAGES: usize = 2;

/// How to train.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingSettings {
    /// Most epochs to run.
    pub max_epochs: u32,
    /// Stop at the first epoch whose validation error (mean squared reconstruction error, pixel
    /// values in `[0, 1]`) is at or below this; 0 disables the early stop.
    pub error_threshold: f64,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Images per optimisation step.
    pub batch_size: usize,
    /// Seed for weights, shuffling and the validation split.
    pub seed: u64,
}

impl Default for TrainingSettings {
    fn default() -> Self {
        Self {
            max_epochs: 10,
            error_threshold: 0.0,
            learning_rate: 2e-3,
            batch_size: 8,
            seed: 42,
        }
    }
}

/// Why training ended successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// All epochs ran.
    MaxEpochs,
    /// The validation error reached the error threshold.
    ErrorThreshold,
}

/// Losses of one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// Epoch number, from 1.
    pub epoch: u32,
    /// Epochs planned.
    pub max_epochs: u32,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Validation error (training loss when there is no validation set).
    pub validation_loss: f64,
    /// Training throughput over the epoch, images per second.
    pub images_per_sec: f64,
    /// Seconds since training started (after preparation).
    pub elapsed_secs: f64,
    /// Estimated seconds left if all epochs run.
    pub eta_secs: f64,
}

/// Summary of a finished training, stored in the model file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Epochs that ran.
    pub epochs_run: u32,
    /// Settings used.
    pub settings: TrainingSettings,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Training images used.
    pub n_train: usize,
    /// Validation images used.
    pub n_validation: usize,
    /// Wall time of the epochs, seconds.
    pub train_secs: f64,
    /// Wall time decoding/preparing images, seconds.
    pub prepare_secs: f64,
    /// The device it ran on.
    pub device: String,
    /// One report per epoch.
    pub history: Vec<EpochReport>,
}

/// What the training worker reports.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Images are being decoded and downscaled.
    Preparing {
        /// Images done.
        done: usize,
        /// Images in all.
        total: usize,
    },
    /// A problem that does not stop training (e.g. an unreadable image, skipped).
    Warning {
        /// What happened, naming the file.
        message: String,
    },
    /// Training started.
    Started {
        /// Training images.
        n_train: usize,
        /// Validation images.
        n_validation: usize,
        /// Epochs planned.
        max_epochs: u32,
        /// Network parameters.
        parameters: usize,
        /// Device description.
        device: String,
    },
    /// Progress inside an epoch (throttled).
    Batch {
        /// Epoch number, from 1.
        epoch: u32,
        /// Batches done in this epoch.
        batch: usize,
        /// Batches per epoch.
        batches: usize,
        /// Current training loss (mean of this epoch so far).
        loss: f64,
        /// Throughput so far, images per second.
        images_per_sec: f64,
        /// Estimated seconds left if all epochs run.
        eta_secs: f64,
    },
    /// An epoch ended.
    Epoch(EpochReport),
    /// Training finished and the model file was written.
    Finished {
        /// The summary (also in the model file).
        summary: TrainingSummary,
        /// The model file written.
        model_path: PathBuf,
        /// Suggested thresholds.
        thresholds: Thresholds,
    },
    /// Stopped by the user; no model file was written.
    Cancelled {
        /// Epochs completed.
        epochs_done: u32,
    },
    /// Failed; no model file was written.
    Failed {
        /// What went wrong and what to change.
        message: String,
    },
}

impl TrainEvent {
    /// Whether this is the last event of a run.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            TrainEvent::Finished { .. } | TrainEvent::Cancelled { .. } | TrainEvent::Failed { .. }
        )
    }
}

/// Everything a training run needs.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// Model type.
    pub framework: Framework,
    /// The good images to learn from (validation is split off them).
    pub images: Vec<ImportedImage>,
    /// Image size and complexity.
    pub dataset: DatasetSettings,
    /// Epochs, error threshold and optimiser settings.
    pub training: TrainingSettings,
    /// Where to write the model file.
    pub model_path: PathBuf,
    /// Prepared-image cache.
    pub cache: DatasetCache,
    /// Where to compute.
    pub device: ComputeDevice,
    /// Continue from the checkpoint beside `model_path` instead of starting afresh.
    pub resume: bool,
    /// Memory the run may use, bytes; `None` means what the system reports as available.
    pub memory_budget_bytes: Option<u64>,
}

/// Why training could not produce a model.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Too few usable images.
    #[error("training needs at least {MIN_TRAINING_IMAGES} readable good images, found {found}")]
    TooFewImages {
        /// Usable images found.
        found: usize,
    },
    /// The loss became NaN or infinite.
    #[error(
        "training diverged at epoch {epoch} (loss is not a number); lower the learning rate (now {learning_rate}) or the complexity"
    )]
    Diverged {
        /// Epoch where it happened.
        epoch: u32,
        /// Learning rate used.
        learning_rate: f64,
    },
    /// The settings are unusable.
    #[error("invalid training settings: {0}")]
    InvalidSettings(String),
    /// Writing the model failed.
    #[error(transparent)]
    ModelFile(#[from] crate::engine::model::ModelFileError),
    /// Stopped by the user.
    #[error("training cancelled after {epochs_done} epochs")]
    Cancelled {
        /// Epochs completed.
        epochs_done: u32,
    },
    /// Another training is writing the same model.
    #[error(
        "another training is already running for {}; wait for it to end or cancel it",
        model_path.display()
    )]
    Busy {
        /// The model both would write.
        model_path: PathBuf,
    },
    /// The run would not fit in memory.
    #[error(
        "training would need about {:.1} GiB of memory but {:.1} GiB is available; lower the image size, the complexity or the batch size",
        *needed_bytes as f64 / GIB, *available_bytes as f64 / GIB
    )]
    NotEnoughMemory {
        /// Estimated need, bytes.
        needed_bytes: u64,
        /// Memory available, bytes.
        available_bytes: u64,
    },
    /// Resume was asked for but there is nothing to resume.
    #[error("no checkpoint to resume from: {} does not exist", path.display())]
    NoCheckpoint {
        /// Where the checkpoint would be.
        path: PathBuf,
    },
    /// The checkpoint belongs to other images or another network shape.
    #[error("cannot resume from {}: {reason}; start a new training instead", path.display())]
    CheckpointMismatch {
        /// The checkpoint.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// Reading or writing the checkpoint failed.
    #[error("checkpoint: {0}")]
    Checkpoint(crate::engine::model::ModelFileError),
    /// Creating the training lock failed.
    #[error("{}: cannot create the training lock: {source}", path.display())]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// A training running on a worker thread.
pub struct TrainingHandle {
    /// Events from the worker; the channel closes when it ends.
    pub events: Receiver<TrainEvent>,
    /// Set to cancel (checked before every batch).
    pub stop: StopFlag,
    /// The worker thread.
    pub thread: JoinHandle<Result<TrainingSummary, TrainError>>,
}

/// Starts [`train`] on a worker thread.
pub fn spawn_training(request: TrainRequest) -> TrainingHandle {
    let (tx, rx) = sync_channel(EVENT_CHANNEL_CAPACITY);
    let stop = StopFlag::new();
    let worker_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("inkspect-training".into())
        .spawn(move || train(request, &tx, &worker_stop))
        .expect("the OS can start a thread");
    TrainingHandle {
        events: rx,
        stop,
        thread,
    }
}

/// Sends events, dropping throttled ones the receiver has no room for; a closed receiver is
/// ignored (training carries on and still writes its model).
struct EventSink<'a> {
    tx: &'a SyncSender<TrainEvent>,
    last: Instant,
}

impl EventSink<'_> {
    fn always(&mut self, event: TrainEvent) {
        let _ = self.tx.send(event);
    }

    fn throttled(&mut self, event: TrainEvent) {
        if self.last.elapsed() >= EVENT_INTERVAL {
            self.last = Instant::now();
            if let Err(TrySendError::Full(_)) = self.tx.try_send(event) {
                log::debug!("training event dropped: receiver is behind");
            }
        }
    }
}

/// Trains a model on the calling thread, reporting through `events`, and writes the model file.
/// Every run ends with exactly one terminal event (Finished, Cancelled or Failed).
pub fn train(
    request: TrainRequest,
    events: &SyncSender<TrainEvent>,
    stop: &StopFlag,
) -> Result<TrainingSummary, TrainError> {
    let mut sink = EventSink {
        tx: events,
        last: Instant::now() - EVENT_INTERVAL,
    };
    let result = run(&request, &mut sink, stop);
    match &result {
        // `Finished` was sent by `run` once the model file was written.
        Ok(_) => {}
        Err(TrainError::Cancelled { epochs_done }) => sink.always(TrainEvent::Cancelled {
            epochs_done: *epochs_done,
        }),
        Err(e) => sink.always(TrainEvent::Failed {
            message: e.to_string(),
        }),
    }
    result
}

fn run(
    request: &TrainRequest,
    sink: &mut EventSink<'_>,
    stop: &StopFlag,
) -> Result<TrainingSummary, TrainError> {
    let settings = request.training;
    if settings.max_epochs == 0 {
        return Err(TrainError::InvalidSettings(
            "epochs must be at least 1".into(),
        ));
    }
    if settings.batch_size == 0 {
        return Err(TrainError::InvalidSettings(
            "batch size must be at least 1".into(),
        ));
    }
    if !(settings.learning_rate.is_finite() && settings.learning_rate > 0.0) {
        return Err(TrainError::InvalidSettings(
            "learning rate must be positive".into(),
        ));
    }
    let _lock = TrainingLock::acquire(&request.model_path)?;
    let size = request.dataset.effective_size_px();
    let mode = ColourMode::for_dataset(request.images.iter().map(|i| i.mode));
    let complexity = request.dataset.effective_complexity();
    let spec = autoencoder_spec_for(complexity, mode.channels());
    let batch_for_estimate = settings.batch_size.min(request.images.len().max(1));
    let estimate = match request.framework {
        Framework::ConvAutoencoder => {
            estimate_training_memory(&spec, size, batch_for_estimate, request.images.len())
        }
        Framework::PatchMemory => estimate_fit_memory(
            &patch_memory_spec_for(complexity, mode.channels()),
            size,
            batch_for_estimate,
            request.images.len(),
        ),
    };
    if let Some(available_bytes) = request.memory_budget_bytes.or_else(available_memory_bytes)
        && estimate.total_bytes > available_bytes
    {
        return Err(TrainError::NotEnoughMemory {
            needed_bytes: estimate.total_bytes,
            available_bytes,
        });
    }

    // Prepare (cache hits cost a file read; misses decode and downscale).
    let prepare_start = Instant::now();
    let total = request.images.len();
    let mut prepared: Vec<(String, PreparedImage)> = Vec::with_capacity(total);
    {
        use rayon::prelude::*;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let done = AtomicUsize::new(0);
        let tx = sink.tx;
        let progress_every = (total / 50).max(1);
        let results: Vec<_> = request
            .images
            .par_iter()
            .map(|img| {
                if stop.is_set() {
                    return None;
                }
                let r = match request.cache.load(&img.content_hash, size, mode) {
                    Some(hit) => Ok(hit),
                    None => prepare_file(&img.path, size, mode, &request.cache),
                };
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(progress_every) {
                    let _ = tx.try_send(TrainEvent::Preparing { done: n, total });
                }
                Some((img.content_hash.clone(), r))
            })
            .collect();
        for r in results {
            match r {
                None => return Err(TrainError::Cancelled { epochs_done: 0 }),
                Some((hash, Ok(p))) => prepared.push((hash, p)),
                Some((_, Err(e))) => sink.always(TrainEvent::Warning {
                    message: format!("skipped: {e}"),
                }),
            }
        }
        sink.always(TrainEvent::Preparing { done: total, total });
    }
    let prepare_secs = prepare_start.elapsed().as_secs_f64();
    if prepared.len() < MIN_TRAINING_IMAGES {
        return Err(TrainError::TooFewImages {
            found: prepared.len(),
        });
    }
    let keys: Vec<String> = prepared.iter().map(|(h, _)| h.clone()).collect();
    let split = split_train_validation(&keys, settings.seed);
    let train_set: Vec<&PreparedImage> = split.train.iter().map(|&i| &prepared[i].1).collect();
    let val_set: Vec<&PreparedImage> = split.validation.iter().map(|&i| &prepared[i].1).collect();

    if request.framework == Framework::PatchMemory {
        let fitted = fit_patch_memory(request, sink, stop, &train_set, &val_set, mode)?;
        let summary = TrainingSummary {
            epochs_run: 1,
            settings,
            stop_reason: StopReason::MaxEpochs,
            n_train: train_set.len(),
            n_validation: val_set.len(),
            train_secs: fitted.report.elapsed_secs,
            prepare_secs,
            device: request.device.description.clone(),
            history: vec![fitted.report],
        };
        let header = ModelHeader {
            framework: request.framework,
            autoencoder: None,
            patch_memory: Some(fitted.spec),
            mode,
            image_size_px: size,
            complexity,
            suggested_thresholds: fitted.thresholds,
            validation_scores: fitted.scores,
            error_stats: None,
            training: summary,
            inkspect_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        return save_model(
            request,
            sink,
            stop,
            ModelFile {
                header,
                network: fitted.network,
            },
        );
    }

    let fingerprint = dataset_fingerprint(keys.iter().map(String::as_str));
    let device = request.device.device.clone();
    let ad_device = device.clone().autodiff();
    device.seed(settings.seed);
    ad_device.seed(settings.seed);
    let ckpt_path = checkpoint_path(&request.model_path);
    let mut optimizer = AdamConfig::new().init();
    let mut history: Vec<EpochReport> = Vec::new();
    let mut network = if request.resume {
        if !ckpt_path.is_file() {
            return Err(TrainError::NoCheckpoint { path: ckpt_path });
        }
        let ckpt = Checkpoint::load(&ckpt_path, &ad_device).map_err(TrainError::Checkpoint)?;
        let h = &ckpt.header;
        let mismatch = if h.framework != request.framework || h.autoencoder != spec {
            Some("the network shape (framework or complexity) changed".to_string())
        } else if h.mode != mode || h.image_size_px != size {
            Some(format!(
                "the image size or colour mode changed ({} px {:?} then, {size} px {mode:?} now)",
                h.image_size_px, h.mode
            ))
        } else if h.dataset_fingerprint != fingerprint {
            Some("the training images changed".to_string())
        } else {
            None
        };
        if let Some(reason) = mismatch {
            return Err(TrainError::CheckpointMismatch {
                path: ckpt_path,
                reason,
            });
        }
        optimizer = ckpt
            .restore_optimizer(optimizer, &ckpt_path)
            .map_err(TrainError::Checkpoint)?;
        history = ckpt.header.history;
        ckpt.network
    } else {
        spec.init(&ad_device)
    };
    let first_epoch = history.len() as u32 + 1;
    let secs_before = history.last().map_or(0.0, |r| r.elapsed_secs);

    sink.always(TrainEvent::Started {
        n_train: train_set.len(),
        n_validation: val_set.len(),
        max_epochs: settings.max_epochs,
        parameters: spec.parameter_count(),
        device: request.device.description.clone(),
    });

    let batches = train_set.len().div_ceil(settings.batch_size);
    let train_start = Instant::now();
    let mut stop_reason = StopReason::MaxEpochs;
    let mut images_done_total = 0usize;
    let images_planned =
        settings.max_epochs.saturating_sub(first_epoch - 1) as usize * train_set.len();
    for epoch in first_epoch..=settings.max_epochs {
        // Seeded per epoch, so a resumed run shuffles as the uninterrupted one would have.
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(settings.seed.wrapping_add(u64::from(epoch)));
        let mut order: Vec<usize> = (0..train_set.len()).collect();
        order.shuffle(&mut rng);
        let epoch_start = Instant::now();
        let mut loss_sum = 0.0f64;
        let mut images_done = 0usize;
        for (b, chunk) in order.chunks(settings.batch_size).enumerate() {
            if stop.is_set() {
                return Err(TrainError::Cancelled {
                    epochs_done: epoch - 1,
                });
            }
            let batch: Vec<&PreparedImage> = chunk.iter().map(|&i| train_set[i]).collect();
            let input = batch_tensor(&batch, &ad_device);
            let recon = network.forward(input.clone());
            let loss = (recon - input).square().mean();
            let loss_value = f64::from(loss.clone().into_scalar::<f32>());
            if !loss_value.is_finite() {
                return Err(TrainError::Diverged {
                    epoch,
                    learning_rate: settings.learning_rate,
                });
            }
            let grads = GradientsParams::from_grads(loss.backward(), &network);
            network = optimizer.step(settings.learning_rate, network, grads);
            loss_sum += loss_value * batch.len() as f64;
            images_done += batch.len();
            images_done_total += batch.len();
            let elapsed = train_start.elapsed().as_secs_f64();
            let rate = images_done_total as f64 / elapsed.max(1e-9);
            let remaining = images_planned.saturating_sub(images_done_total) as f64;
            sink.throttled(TrainEvent::Batch {
                epoch,
                batch: b + 1,
                batches,
                loss: loss_sum / images_done as f64,
                images_per_sec: rate,
                eta_secs: remaining / rate.max(1e-9),
            });
        }
        let train_loss = loss_sum / images_done.max(1) as f64;
        let validation_loss = if val_set.is_empty() {
            train_loss
        } else {
            mean_squared_error(&network.valid(), &val_set, settings.batch_size, &device)
        };
        if !validation_loss.is_finite() {
            return Err(TrainError::Diverged {
                epoch,
                learning_rate: settings.learning_rate,
            });
        }
        let run_secs = train_start.elapsed().as_secs_f64();
        let per_epoch = run_secs / f64::from(epoch - first_epoch + 1);
        let report = EpochReport {
            epoch,
            max_epochs: settings.max_epochs,
            train_loss,
            validation_loss,
            images_per_sec: images_done as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9),
            elapsed_secs: secs_before + run_secs,
            eta_secs: per_epoch * f64::from(settings.max_epochs - epoch),
        };
        history.push(report);
        let header = CheckpointHeader {
            framework: request.framework,
            autoencoder: spec.clone(),
            mode,
            image_size_px: size,
            complexity: request.dataset.effective_complexity(),
            dataset_fingerprint: fingerprint.clone(),
            settings,
            epochs_done: epoch,
            history: history.clone(),
            prepare_secs,
            inkspect_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        Checkpoint::capture(header, &network, &optimizer)
            .map_err(|reason| {
                TrainError::Checkpoint(crate::engine::model::ModelFileError::Corrupt {
                    path: ckpt_path.clone(),
                    reason,
                })
            })?
            .save(&ckpt_path)
            .map_err(TrainError::Checkpoint)?;
        sink.always(TrainEvent::Epoch(report));
        if settings.error_threshold > 0.0 && validation_loss <= settings.error_threshold {
            stop_reason = StopReason::ErrorThreshold;
            break;
        }
    }
    let train_secs = secs_before + train_start.elapsed().as_secs_f64();

    // Validation scores give the suggested thresholds (training images when there is no
    // validation set, which makes the suggestion optimistic).
    let trained = network.valid();
    let summary = TrainingSummary {
        epochs_run: history.len() as u32,
        settings,
        stop_reason,
        n_train: train_set.len(),
        n_validation: val_set.len(),
        train_secs,
        prepare_secs,
        device: request.device.description.clone(),
        history,
    };
    // Per-pixel error statistics of the training images; the validation images, which neither
    // the model nor the statistics have seen, then give honest scores for the suggestion.
    let trained = Network::Autoencoder(trained);
    let error_stats = ErrorStats::from_maps(anomaly_maps_batched(
        &trained,
        &train_set,
        settings.batch_size,
        &device,
        None,
    ));
    let (scores, thresholds) = validation_scores(
        &trained,
        &train_set,
        &val_set,
        settings.batch_size,
        &device,
        error_stats.as_ref(),
    )?;
    let model = ModelFile {
        header: ModelHeader {
            framework: request.framework,
            autoencoder: Some(spec),
            patch_memory: None,
            mode,
            image_size_px: size,
            complexity,
            suggested_thresholds: thresholds,
            validation_scores: scores,
            error_stats,
            training: summary,
            inkspect_version: env!("CARGO_PKG_VERSION").to_string(),
        },
        network: trained,
    };
    save_model(request, sink, stop, model)
}

/// Writes the finished model (unless the run was stopped meanwhile), removes the checkpoint it
/// supersedes and sends `Finished`.
fn save_model(
    request: &TrainRequest,
    sink: &mut EventSink<'_>,
    stop: &StopFlag,
    model: ModelFile,
) -> Result<TrainingSummary, TrainError> {
    let summary = model.header.training.clone();
    if stop.is_set() {
        return Err(TrainError::Cancelled {
            epochs_done: summary.epochs_run,
        });
    }
    model.save(&request.model_path)?;
    // The model holds everything now; a checkpoint left behind would only invite a stale resume.
    let ckpt_path = checkpoint_path(&request.model_path);
    if let Err(e) = std::fs::remove_file(&ckpt_path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log::warn!("{}: cannot remove the checkpoint: {e}", ckpt_path.display());
    }
    sink.always(TrainEvent::Finished {
        summary: summary.clone(),
        model_path: request.model_path.clone(),
        thresholds: model.header.suggested_thresholds,
    });
    Ok(summary)
}

/// Scores of the validation images (the training images when there are none, which makes the
/// suggestion optimistic) and the thresholds suggested from them.
fn validation_scores(
    network: &Network,
    train_set: &[&PreparedImage],
    val_set: &[&PreparedImage],
    batch_size: usize,
    device: &Device,
    stats: Option<&ErrorStats>,
) -> Result<(Vec<f32>, Thresholds), TrainError> {
    let scoring_set = if val_set.is_empty() {
        train_set
    } else {
        val_set
    };
    let scores = image_scores(network, scoring_set, batch_size, device, stats);
    let thresholds = suggest_thresholds(&scores).ok_or(TrainError::TooFewImages {
        found: train_set.len() + val_set.len(),
    })?;
    Ok((scores, thresholds))
}

/// A fitted patch memory and what its validation images scored.
struct FittedPatchMemory {
    spec: PatchMemorySpec,
    network: Network,
    scores: Vec<f32>,
    thresholds: Thresholds,
    report: EpochReport,
}

/// Fits a patch memory: extracts the features of the training images batch by batch (progress
/// as batches of epoch 1 of 1), keeps an evenly spread random sample of their patches as the
/// memory, then scores the validation images (the training images when there are none).
fn fit_patch_memory(
    request: &TrainRequest,
    sink: &mut EventSink<'_>,
    stop: &StopFlag,
    train_set: &[&PreparedImage],
    val_set: &[&PreparedImage],
    mode: ColourMode,
) -> Result<FittedPatchMemory, TrainError> {
    let settings = request.training;
    let device = request.device.device.clone();
    device.seed(settings.seed);
    let mut spec = patch_memory_spec_for(request.dataset.effective_complexity(), mode.channels());
    spec.contrast_floor = contrast_floor_for(train_set);
    let extractor = spec.init(&device);
    let dim = spec.feature_dim();
    sink.always(TrainEvent::Started {
        n_train: train_set.len(),
        n_validation: val_set.len(),
        max_epochs: 1,
        parameters: spec.parameter_count(),
        device: request.device.description.clone(),
    });
    let start = Instant::now();
    let per_image = spec.memory_patches.div_ceil(train_set.len().max(1));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(settings.seed);
    let mut rows: Vec<f32> = Vec::with_capacity((per_image * train_set.len() + 1) * dim);
    let batches = train_set.len().div_ceil(settings.batch_size);
    let work = (train_set.len() + val_set.len()).max(1) as f64;
    for (b, chunk) in train_set.chunks(settings.batch_size).enumerate() {
        if stop.is_set() {
            return Err(TrainError::Cancelled { epochs_done: 0 });
        }
        let (values, [n, h, w]) = extractor.patch_rows(extractor.input(chunk, &device));
        let patches = h * w;
        for i in 0..n {
            for p in rand::seq::index::sample(&mut rng, patches, per_image.min(patches)) {
                let at = (i * patches + p) * dim;
                rows.extend_from_slice(&values[at..at + dim]);
            }
        }
        let done = (b + 1) * settings.batch_size;
        let elapsed = start.elapsed().as_secs_f64();
        let rate = done.min(train_set.len()) as f64 / elapsed.max(1e-9);
        sink.throttled(TrainEvent::Batch {
            epoch: 1,
            batch: b + 1,
            batches,
            loss: 0.0,
            images_per_sec: rate,
            eta_secs: (work - done as f64).max(0.0) / rate.max(1e-9),
        });
    }
    // Exactly `memory_patches` rows (fewer when the images hold fewer patches).
    let available = rows.len() / dim;
    if available > spec.memory_patches {
        let keep = rand::seq::index::sample(&mut rng, available, spec.memory_patches).into_vec();
        let mut kept = Vec::with_capacity(spec.memory_patches * dim);
        for r in keep {
            kept.extend_from_slice(&rows[r * dim..(r + 1) * dim]);
        }
        rows = kept;
    }
    spec.memory_patches = rows.len() / dim;
    let memory = Tensor::from_data(TensorData::new(rows, [spec.memory_patches, dim]), &device);
    let network = Network::PatchMemory(extractor.with_memory(memory));
    if stop.is_set() {
        return Err(TrainError::Cancelled { epochs_done: 0 });
    }
    let (scores, thresholds) = validation_scores(
        &network,
        train_set,
        val_set,
        settings.batch_size,
        &device,
        None,
    )?;
    let mean_score = scores.iter().map(|&s| f64::from(s)).sum::<f64>() / scores.len().max(1) as f64;
    let elapsed_secs = start.elapsed().as_secs_f64();
    let report = EpochReport {
        epoch: 1,
        max_epochs: 1,
        train_loss: mean_score,
        validation_loss: mean_score,
        images_per_sec: work / elapsed_secs.max(1e-9),
        elapsed_secs,
        eta_secs: 0.0,
    };
    sink.always(TrainEvent::Epoch(report));
    Ok(FittedPatchMemory {
        spec,
        network,
        scores,
        thresholds,
        report,
    })
}

/// Mean squared reconstruction error of `images` (pixel values in `[0, 1]`).
fn mean_squared_error(
    network: &crate::engine::model::ConvAutoencoder,
    images: &[&PreparedImage],
    batch_size: usize,
    device: &Device,
) -> f64 {
    let mut sum = 0.0f64;
    for chunk in images.chunks(batch_size.max(1)) {
        let input = batch_tensor(chunk, device);
        let recon = network.forward(input.clone());
        let mse = f64::from((recon - input).square().mean().into_scalar::<f32>());
        sum += mse * chunk.len() as f64;
    }
    sum / images.len().max(1) as f64
}

/// Holds the lock file `<model>.lock` while a training writes that model, so that two trainings
/// (two app windows, the app and the command line) never write the same model at once. The
/// operating system releases the lock when the process ends, even on `kill -9`.
struct TrainingLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl TrainingLock {
    fn acquire(model_path: &std::path::Path) -> Result<TrainingLock, TrainError> {
        let path = crate::engine::path_with_suffix(model_path, ".lock");
        let io = |source| TrainError::Lock {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(TrainingLock { path, _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(TrainError::Busy {
                model_path: model_path.to_path_buf(),
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }
}

impl Drop for TrainingLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Estimated memory of a training run, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Downscaled images held in memory.
    pub images_bytes: u64,
    /// Weights, gradients and the optimiser's two moments.
    pub parameters_bytes: u64,
    /// Activations kept for the backward pass and their gradients, for one batch.
    pub activations_bytes: u64,
    /// Everything, plus a fixed allowance for the program itself.
    pub total_bytes: u64,
}

/// Fixed allowance for the program, its libraries and thread stacks, bytes.
const BASE_MEMORY_BYTES: u64 = 200 * 1024 * 1024;

/// Estimates the memory a training of `spec` on `n_images` images of `size_px` needs with
/// batches of `batch` images (see [`MemoryEstimate`]). Checked against the available memory
/// before a run starts; measured peaks are in the README.
pub fn estimate_training_memory(
    spec: &AutoencoderSpec,
    size_px: u32,
    batch: usize,
    n_images: usize,
) -> MemoryEstimate {
    let side = |level: usize| (size_px as u64 >> level).max(1);
    let area = |level: usize| side(level) * side(level);
    let levels = spec.widths.len();
    let deepest = *spec.widths.last().unwrap_or(&spec.channels) as u64;
    // Float counts per image of every layer's output (the convolution work buffers of burn's
    // CPU backend are tiled and small next to these).
    let mut outputs = 0u64;
    for (i, &w) in spec.widths.iter().enumerate() {
        outputs += w as u64 * area(i + 1);
    }
    outputs += (spec.latent_channels as u64 + deepest) * area(levels);
    let mut decoder_outs: Vec<u64> = spec
        .widths
        .iter()
        .rev()
        .skip(1)
        .map(|&w| w as u64)
        .collect();
    decoder_outs.push(spec.channels as u64);
    for (j, &c_out) in decoder_outs.iter().enumerate() {
        outputs += c_out * area(levels - 1 - j);
    }
    // Kept for backward (convolution and activation inputs) plus their gradients: 4 copies,
    // 4 bytes each. Measured peaks are below this (README, `inkspect bench`).
    let activations_bytes = batch as u64 * outputs * 4 * 4;
    let parameters_bytes = spec.parameter_count() as u64 * 4 * 4;
    let images_bytes = n_images as u64 * area(0) * spec.channels as u64;
    MemoryEstimate {
        images_bytes,
        parameters_bytes,
        activations_bytes,
        total_bytes: BASE_MEMORY_BYTES + images_bytes + parameters_bytes + activations_bytes,
    }
}

/// Estimates the memory fitting a patch memory of `spec` needs: the images, the sampled patches
/// and the memory, the extractor's activations for a batch, and the distance matrix of one query
/// chunk.
pub fn estimate_fit_memory(
    spec: &PatchMemorySpec,
    size_px: u32,
    batch: usize,
    n_images: usize,
) -> MemoryEstimate {
    let area = u64::from(size_px) * u64::from(size_px);
    let images_bytes = n_images as u64 * area * spec.channels as u64;
    // Sampled rows plus the memory tensor and its transpose.
    let parameters_bytes = spec.parameter_count() as u64 * 4 * 3;
    let first = *spec.widths.first().unwrap_or(&1) as u64;
    // The extractor works on the input shrunk by `input_shrink`.
    let shrunk = area / (spec.input_shrink.max(1) as u64).pow(2);
    let activations_bytes = batch as u64 * shrunk * (first + spec.channels as u64 * 4) * 4 * 3
        + 1024 * spec.memory_patches as u64 * 4 * 3;
    MemoryEstimate {
        images_bytes,
        parameters_bytes,
        activations_bytes,
        total_bytes: BASE_MEMORY_BYTES + images_bytes + parameters_bytes + activations_bytes,
    }
}

/// Memory the system reports as available (Linux `MemAvailable`), bytes; `None` elsewhere.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
