//! The headless command line: `train`, `infer`, `eval` and `demo`, over the same engine the app
//! uses. Results go to standard output (JSON), progress bars and messages to standard error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::engine::StopFlag;
use crate::engine::dataset::decode::decode_image;
use crate::engine::dataset::import::{
    ImageRole, ImportOptions, collect_image_files, import_items, is_mvtec_layout, items_with_role,
    scan_mvtec,
};
use crate::engine::dataset::prepare::{DatasetCache, DatasetSettings};
use crate::engine::demo::{DemoSpec, write_demo_dataset};
use crate::engine::device::{DevicePreference, select_device};
use crate::engine::inference::{Class, Inspection, Inspector, Thresholds};
use crate::engine::metrics::{
    ConfusionMatrix, MapWithMask, PixelRocAccumulator, RocCurve, auroc, f1_best_threshold,
    histogram, pro_score, roc_curve, threshold_for_false_alarm_rate,
};
use crate::engine::model::{Framework, ModelFile};
use crate::engine::project::Project;
use crate::engine::training::{
    StopReason, TrainEvent, TrainRequest, TrainingSettings, TrainingSummary, spawn_training,
};
use crate::engine::visual::overlay;

/// Inkspect: learn what a good part looks like from good images, then flag anything abnormal.
#[derive(Debug, Parser)]
#[command(name = "inkspect", version, about)]
pub struct Cli {
    /// Where to run models: auto (a real GPU when present), cpu or gpu. Also INKSPECT_DEVICE.
    #[arg(long, global = true, value_enum, default_value_t = DevicePreference::Auto)]
    pub device: DevicePreference,
    /// What to do; without a command the desktop app opens.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model from a folder of good images (or an MVTec-layout folder's train/good).
    Train(TrainArgs),
    /// Inspect images or folders with a trained model; prints one JSON object per image.
    Infer(InferArgs),
    /// Evaluate a model on an MVTec-layout category folder; prints one JSON object.
    Eval(EvalArgs),
    /// Write the synthetic wafer-die demo dataset (MVTec layout) to a folder.
    Demo(DemoArgs),
    /// Train with the defaults and evaluate every MVTec-layout category under the given roots;
    /// prints one table (category, framework, image and pixel AUROC, training s, ms/image).
    BenchQuality(BenchQualityArgs),
    /// Measure import, training and inspection speed (and, with --pytorch, side by side with
    /// PyTorch); prints a table and one JSON line.
    Bench(crate::bench::BenchArgs),
    /// Open the desktop app on a project file (or an empty project).
    App {
        /// Project file (.inkspect) to open.
        project: Option<PathBuf>,
    },
}

/// Arguments of `inkspect train`. Settings not given come from the project (with `--project`)
/// or the defaults.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Folder (searched recursively) of good images, or an MVTec-layout category folder.
    #[arg(long, required_unless_present = "project", conflicts_with = "project")]
    pub data: Option<PathBuf>,
    /// Train a project (.inkspect) on its good training images and record the model in it.
    #[arg(long)]
    pub project: Option<PathBuf>,
    /// Model file to write (.ink); with `--project` defaults to the project's model.
    #[arg(long, required_unless_present = "project")]
    pub model: Option<PathBuf>,
    /// Continue the interrupted training whose checkpoint (`<model>.checkpoint`) is beside the
    /// model file.
    #[arg(long)]
    pub resume: bool,
    /// Model type: `patch_memory` or `conv_autoencoder` [default: the project's, else
    /// patch_memory].
    #[arg(long, value_parser = parse_framework)]
    pub framework: Option<Framework>,
    /// Training image size in pixels (square side, rounded to a multiple of 16) [default: 320].
    #[arg(long)]
    pub size: Option<u32>,
    /// Complexity index 1-100 (model capacity) [default: 20].
    #[arg(long)]
    pub complexity: Option<u32>,
    /// Maximum number of epochs [default: 10].
    #[arg(long)]
    pub epochs: Option<u32>,
    /// Stop at the first epoch whose validation error is at or below this (0 = never) [default: 0].
    #[arg(long)]
    pub error_threshold: Option<f64>,
    /// Adam learning rate [default: 0.002].
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Images per step [default: 8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Random seed [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
}

impl TrainArgs {
    /// The settings to train with: flags given on the command line override `base`.
    fn settings(
        &self,
        base: (DatasetSettings, TrainingSettings),
    ) -> (DatasetSettings, TrainingSettings) {
        let (d, t) = base;
        (
            DatasetSettings {
                image_size_px: self.size.unwrap_or(d.image_size_px),
                complexity: self.complexity.unwrap_or(d.complexity),
            },
            TrainingSettings {
                max_epochs: self.epochs.unwrap_or(t.max_epochs),
                error_threshold: self.error_threshold.unwrap_or(t.error_threshold),
                learning_rate: self.learning_rate.unwrap_or(t.learning_rate),
                batch_size: self.batch_size.unwrap_or(t.batch_size),
                seed: self.seed.unwrap_or(t.seed),
            },
        )
    }
}

/// Arguments of `inkspect infer`.
#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model file (.ink).
    #[arg(long)]
    pub model: PathBuf,
    /// Images or folders (searched recursively).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Segmentation threshold (default: the model's suggestion).
    #[arg(long)]
    pub seg_threshold: Option<f32>,
    /// Classification threshold (default: the model's suggestion).
    #[arg(long)]
    pub cls_threshold: Option<f32>,
    /// Write a heatmap overlay PNG per image into this folder.
    #[arg(long)]
    pub heatmaps: Option<PathBuf>,
    /// Also write the results as CSV to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Images per model call.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

/// Arguments of `inkspect eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model file (.ink).
    #[arg(long)]
    pub model: PathBuf,
    /// MVTec-layout category folder (test/good, test/<defect>, ground_truth/<defect>).
    #[arg(long)]
    pub data: PathBuf,
    /// Segmentation threshold (default: the model's suggestion).
    #[arg(long)]
    pub seg_threshold: Option<f32>,
    /// Classification threshold (default: the model's suggestion).
    #[arg(long)]
    pub cls_threshold: Option<f32>,
    /// Images per model call.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

/// Arguments of `inkspect bench-quality`.
#[derive(Debug, Args)]
pub struct BenchQualityArgs {
    /// MVTec-layout category folders, or folders holding them.
    #[arg(required = true)]
    pub roots: Vec<PathBuf>,
    /// Also write the table (Markdown) to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model types to run, comma-separated (`patch_memory`, `conv_autoencoder`) [default: the
    /// default framework].
    #[arg(long, value_parser = parse_framework, value_delimiter = ',')]
    pub framework: Vec<Framework>,
    /// Complexity index (1-100) of every model [default: the project default].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub complexity: Option<u32>,
}

/// Reads a framework name for clap.
fn parse_framework(name: &str) -> std::result::Result<Framework, String> {
    Framework::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Framework::ALL.iter().map(|f| f.name()).collect();
        format!(
            "unknown framework {name:?}; use one of {}",
            names.join(", ")
        )
    })
}

/// Arguments of `inkspect demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder to write into (created).
    pub dir: PathBuf,
    /// Image side in pixels.
    #[arg(long, default_value_t = DemoSpec::default().size_px)]
    pub size: u32,
    /// Colour dies instead of mono.
    #[arg(long)]
    pub colour: bool,
}

/// Runs a parsed command line. `None` (no subcommand) is handled by the caller (the app).
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Train(args)) => train(args, cli.device),
        Some(Command::Infer(args)) => infer(args, cli.device),
        Some(Command::Eval(args)) => eval(args, cli.device),
        Some(Command::Demo(args)) => demo(args),
        Some(Command::BenchQuality(args)) => bench_quality(args, cli.device),
        Some(Command::Bench(args)) => crate::bench::run(&args, &select_device(cli.device)),
        Some(Command::App { project }) => open_app(project),
        None => open_app(Some(demo_project()?)),
    }
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
        )
        .expect("static template is valid")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn train(args: TrainArgs, device: DevicePreference) -> Result<()> {
    let Some(data) = &args.data else {
        return train_project(args, device);
    };
    let folder = if is_mvtec_layout(data) {
        data.join("train").join("good")
    } else {
        data.clone()
    };
    let (files, failures) = collect_image_files(std::slice::from_ref(&folder));
    for f in &failures {
        eprintln!("warning: {}", f.reason);
    }
    if files.is_empty() {
        bail!(
            "{}: no images found (supported: png, jpg, bmp, tif)",
            folder.display()
        );
    }
    let (dataset, training) = args.settings(Default::default());
    let cache = DatasetCache::default();
    let pb = bar(files.len() as u64, "importing");
    // Importing decodes every file once; it also fills the prepared-image cache so that training
    // does not decode again.
    let options = ImportOptions {
        prepare: Some((dataset.effective_size_px(), cache.clone())),
        known_hashes: Default::default(),
    };
    let report = import_items(
        &items_with_role(files, ImageRole::TrainGood),
        &options,
        &|done, _| pb.set_position(done as u64),
        &StopFlag::new(),
    );
    pb.finish_and_clear();
    for f in &report.failures {
        eprintln!("skipped: {}", f.reason);
    }
    if !report.duplicates.is_empty() {
        eprintln!(
            "skipped {} duplicate images (same content)",
            report.duplicates.len()
        );
    }
    if let Some(first) = report.enlarged.first() {
        eprintln!(
            "warning: {} images are smaller than the training size ({} px) and are enlarged (first: {})",
            report.enlarged.len(),
            dataset.effective_size_px(),
            first.display()
        );
    }
    let compute = select_device(device);
    let request = TrainRequest {
        framework: args.framework.unwrap_or_default(),
        images: report.imported,
        dataset,
        training,
        model_path: args
            .model
            .clone()
            .expect("clap requires --model without --project"),
        cache,
        device: compute,
        resume: args.resume,
        memory_budget_bytes: None,
    };
    run_training(request).map(|_| ())
}

/// `inkspect train --project`: trains on the project's good training images with its settings
/// (flags override them) and records the model in the project file.
fn train_project(args: TrainArgs, device: DevicePreference) -> Result<()> {
    let project_path = args
        .project
        .clone()
        .expect("clap requires --data or --project");
    let project = Project::load(&project_path)?;
    let (dataset, training) = args.settings((project.dataset, project.training));
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(|| project.model_path_or_default(&project_path));
    let images: Vec<_> = project
        .images_with_role(ImageRole::TrainGood)
        .cloned()
        .collect();
    let request = TrainRequest {
        framework: args.framework.unwrap_or(project.framework),
        images,
        dataset,
        training,
        model_path: model_path.clone(),
        cache: DatasetCache::default(),
        device: select_device(device),
        resume: args.resume,
        memory_budget_bytes: None,
    };
    run_training(request)?;
    // Re-read the project so that edits saved while training ran are kept.
    let mut project = Project::load(&project_path)?;
    project.model_path = Some(model_path);
    // Thresholds tuned on the previous model are in other units: use the new model's suggestion.
    project.thresholds = None;
    project.save(&project_path)?;
    eprintln!("project updated: {}", project_path.display());
    Ok(())
}

/// Runs a training with progress on the terminal and its summary as JSON on standard output.
fn run_training(request: TrainRequest) -> Result<TrainingSummary> {
    eprintln!(
        "{} good images, size {} px, complexity {}, device: {}{}",
        request.images.len(),
        request.dataset.effective_size_px(),
        request.dataset.effective_complexity(),
        request.device.description,
        if request.resume { ", resuming" } else { "" }
    );
    // Ctrl-C or kill ends the process; model and checkpoint files are written atomically, so
    // neither is ever half-written, and `--resume` continues from the last finished epoch.
    let handle = spawn_training(request);
    let mut pb: Option<ProgressBar> = None;
    for event in handle.events.iter() {
        match event {
            TrainEvent::Preparing { done, total } => {
                let p = pb.get_or_insert_with(|| bar(total as u64, "preparing"));
                p.set_position(done as u64);
            }
            TrainEvent::Warning { message } => eprintln!("warning: {message}"),
            TrainEvent::Started {
                n_train,
                n_validation,
                max_epochs,
                parameters,
                ..
            } => {
                if let Some(p) = pb.take() {
                    p.finish_and_clear();
                }
                eprintln!(
                    "training on {n_train} images, validating on {n_validation}, {parameters} parameters"
                );
                pb = Some(bar(u64::from(max_epochs), "epochs"));
            }
            TrainEvent::Batch {
                epoch,
                batch,
                batches,
                loss,
                images_per_sec,
                ..
            } => {
                if let Some(p) = &pb {
                    p.set_message(format!(
                        "ep {epoch} {batch}/{batches} loss {loss:.5} {images_per_sec:.1} img/s"
                    ));
                }
            }
            TrainEvent::Epoch(r) => {
                let line = format!(
                    "epoch {:>3}/{}: train {:.6}  validation {:.6}  {:.1} img/s  {:.0} s",
                    r.epoch,
                    r.max_epochs,
                    r.train_loss,
                    r.validation_loss,
                    r.images_per_sec,
                    r.elapsed_secs
                );
                match &pb {
                    Some(p) if !p.is_hidden() => {
                        p.set_position(u64::from(r.epoch));
                        p.println(line);
                    }
                    _ => eprintln!("{line}"),
                }
            }
            TrainEvent::Finished {
                summary,
                model_path,
                thresholds,
            } => {
                if let Some(p) = pb.take() {
                    p.finish_and_clear();
                }
                let why = match summary.stop_reason {
                    StopReason::MaxEpochs => "all epochs ran".to_string(),
                    StopReason::ErrorThreshold => format!(
                        "stopped early at epoch {}: validation error reached the error threshold",
                        summary.epochs_run
                    ),
                };
                eprintln!(
                    "model written to {} ({why}; {:.1} s training, {:.1} s preparing)",
                    model_path.display(),
                    summary.train_secs,
                    summary.prepare_secs
                );
                println!(
                    "{}",
                    json!({
                        "model": model_path,
                        "epochs_run": summary.epochs_run,
                        "stop_reason": summary.stop_reason,
                        "train_secs": summary.train_secs,
                        "prepare_secs": summary.prepare_secs,
                        "final_train_loss": summary.history.last().map(|r| r.train_loss),
                        "final_validation_loss": summary.history.last().map(|r| r.validation_loss),
                        "n_train": summary.n_train,
                        "n_validation": summary.n_validation,
                        "device": summary.device,
                        "suggested_thresholds": thresholds,
                    })
                );
            }
            TrainEvent::Cancelled { epochs_done } => {
                eprintln!("cancelled after {epochs_done} epochs; no model written")
            }
            TrainEvent::Failed { .. } => {
                if let Some(p) = pb.take() {
                    p.finish_and_clear();
                }
            }
        }
    }
    match handle.thread.join() {
        Ok(Ok(summary)) => Ok(summary),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => bail!("the training thread crashed"),
    }
}

fn thresholds_for(inspector: &Inspector, seg: Option<f32>, cls: Option<f32>) -> Thresholds {
    let s = inspector.suggested_thresholds();
    Thresholds {
        segmentation: seg.unwrap_or(s.segmentation),
        classification: cls.unwrap_or(s.classification),
    }
}

/// The JSON object printed for one inspected image.
pub fn inspection_json(path: &Path, ins: &Inspection) -> serde_json::Value {
    json!({
        "image": path,
        "width": ins.map.width,
        "height": ins.map.height,
        "score": ins.score,
        "class": ins.class.label(),
        "class_id": ins.class_id(),
        "region": {
            "area_px": ins.region.area_px,
            "components": ins.region.components.iter().map(|c| json!({
                "bbox": c.bbox,
                "area_px": c.area_px,
            })).collect::<Vec<_>>(),
        },
    })
}

fn infer(args: InferArgs, device: DevicePreference) -> Result<()> {
    let compute = select_device(device);
    let inspector = Inspector::load(&args.model, &compute.device)?;
    let thresholds = thresholds_for(&inspector, args.seg_threshold, args.cls_threshold);
    let (files, failures) = collect_image_files(&args.inputs);
    for f in &failures {
        eprintln!("skipped: {}", f.reason);
    }
    if let Some(dir) = &args.heatmaps {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    let mut csv = match &args.csv {
        Some(p) => Some(
            std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?,
        ),
        None => None,
    };
    if let Some(f) = &mut csv {
        writeln!(f, "image,score,class,class_id,area_px,components,bboxes")?;
    }
    eprintln!(
        "{} images, device: {}, thresholds: segmentation {:.6}, classification {:.6}",
        files.len(),
        compute.description,
        thresholds.segmentation,
        thresholds.classification
    );
    let pb = bar(files.len() as u64, "inspecting");
    let start = Instant::now();
    let mut n_ok = 0usize;
    let mut n_failed = 0usize;
    let mut stdout = std::io::stdout().lock();
    let mut write_err: Option<anyhow::Error> = None;
    inspector.inspect_files(&files, thresholds, args.batch_size, &mut |(
        path,
        result,
    )| {
        pb.inc(1);
        match result {
            Ok(ins) => {
                n_ok += 1;
                let line = inspection_json(&path, &ins);
                let _ = writeln!(stdout, "{line}");
                if let Some(f) = &mut csv {
                    let boxes: Vec<String> = ins
                        .region
                        .components
                        .iter()
                        .map(|c| format!("{} {} {} {}", c.bbox[0], c.bbox[1], c.bbox[2], c.bbox[3]))
                        .collect();
                    let _ = writeln!(
                        f,
                        "\"{}\",{},{},{},{},{},\"{}\"",
                        path.display().to_string().replace('"', "\"\""),
                        ins.score,
                        ins.class.label(),
                        ins.class_id(),
                        ins.region.area_px,
                        ins.region.components.len(),
                        boxes.join(";")
                    );
                }
                if let Some(dir) = &args.heatmaps
                    && let Err(e) = write_heatmap(dir, &path, &ins)
                {
                    write_err.get_or_insert(e);
                }
            }
            Err(e) => {
                n_failed += 1;
                if pb.is_hidden() {
                    eprintln!("skipped: {e}");
                } else {
                    pb.println(format!("skipped: {e}"));
                }
            }
        }
    });
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{n_ok} inspected, {n_failed} unreadable, {:.1} ms/image (decode + model + map + region)",
        1000.0 * secs / n_ok.max(1) as f64
    );
    if let Some(e) = write_err {
        return Err(e);
    }
    Ok(())
}

fn write_heatmap(dir: &Path, path: &Path, ins: &Inspection) -> Result<()> {
    let image = decode_image(path)?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let out = dir.join(format!("{stem}_heatmap.png"));
    overlay(&image, ins, 0.6)
        .save(&out)
        .with_context(|| format!("{}: cannot write heatmap", out.display()))?;
    Ok(())
}

fn eval(args: EvalArgs, device: DevicePreference) -> Result<()> {
    if !args.data.join("test").is_dir() {
        bail!(
            "{}: not an MVTec-layout category folder (expected test/good and test/<defect>)",
            args.data.display()
        );
    }
    let compute = select_device(device);
    let inspector = Inspector::load(&args.model, &compute.device)?;
    let thresholds = thresholds_for(&inspector, args.seg_threshold, args.cls_threshold);
    let mut report = evaluate(&inspector, &args.data, thresholds, args.batch_size)?;
    report["model"] = json!(args.model);
    report["device"] = json!(compute.description);
    println!("{report}");
    Ok(())
}

/// Evaluates `inspector` on the test images of the MVTec-layout category folder `data` at
/// `thresholds`; returns the figures `inkspect eval` prints.
fn evaluate(
    inspector: &Inspector,
    data: &Path,
    thresholds: Thresholds,
    batch_size: usize,
) -> Result<serde_json::Value> {
    let items: Vec<_> = scan_mvtec(data)
        .items
        .into_iter()
        .filter(|i| i.role != ImageRole::TrainGood)
        .collect();
    let paths: Vec<PathBuf> = items.iter().map(|i| i.path.clone()).collect();
    let pb = bar(paths.len() as u64, "evaluating");
    let mut good_scores = Vec::new();
    let mut nok_scores = Vec::new();
    let hi = pixel_range_hi(inspector);
    // Normalised maps go below zero (less error than usual); the range covers that too.
    let mut pixel = PixelRocAccumulator::new(-hi / 10.0, hi, 1 << 16);
    let mut n_with_masks = 0usize;
    let mut pro_maps: Vec<(Vec<f32>, Vec<bool>, usize, usize)> = Vec::new();
    let mut failures = Vec::new();
    let mut per_kind: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let start = Instant::now();
    let mut index = 0usize;
    inspector.inspect_files(&paths, thresholds, batch_size, &mut |(path, result)| {
        let item = &items[index];
        index += 1;
        pb.inc(1);
        let ins = match result {
            Ok(ins) => ins,
            Err(e) => {
                failures.push(e.to_string());
                return;
            }
        };
        let kind = item.defect_kind.clone().unwrap_or_else(|| "good".into());
        let entry = per_kind.entry(kind).or_default();
        entry.0 += 1;
        if ins.class == Class::Nok {
            entry.1 += 1;
        }
        let mask: Option<Vec<bool>> = match item.role {
            ImageRole::TestGood => Some(vec![false; ins.map.values.len()]),
            _ => item
                .mask
                .as_ref()
                .and_then(|m| load_mask(m, ins.map.width, ins.map.height)),
        };
        if let Some(mask) = mask {
            if item.role == ImageRole::TestNok {
                n_with_masks += 1;
            }
            if let Err(e) = pixel.add(&ins.map.values, &mask) {
                failures.push(format!("{}: {e}", path.display()));
            }
            pro_maps.push(strided_map(
                &ins.map.values,
                &mask,
                ins.map.width as usize,
                ins.map.height as usize,
            ));
        }
        if item.role == ImageRole::TestGood {
            good_scores.push(ins.score);
        } else {
            nok_scores.push(ins.score);
        }
    });
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    for f in &failures {
        eprintln!("skipped: {f}");
    }
    let confusion =
        ConfusionMatrix::at_threshold(&good_scores, &nok_scores, thresholds.classification);
    let pixel_auroc = if n_with_masks > 0 {
        pixel.auroc()
    } else {
        None
    };
    let n = good_scores.len() + nok_scores.len();
    let pro = if n_with_masks > 0 {
        let maps: Vec<MapWithMask<'_>> = pro_maps
            .iter()
            .map(|(scores, mask, width, height)| MapWithMask {
                scores,
                mask,
                width: *width,
                height: *height,
            })
            .collect();
        pro_score(&maps, PRO_FPR_LIMIT)
    } else {
        None
    };
    Ok(json!({
            "data": data,
            "image_auroc": auroc(&good_scores, &nok_scores),
            "pixel_auroc": pixel_auroc,
            "pro_30": pro,
            "n_good": good_scores.len(),
            "n_nok": nok_scores.len(),
            "n_nok_with_masks": n_with_masks,
            "n_unreadable": failures.len(),
            "thresholds": thresholds,
            "confusion_matrix": confusion,
            "f1": confusion.f1(),
            "precision": confusion.precision(),
            "recall": confusion.recall(),
            "accuracy": confusion.accuracy(),
            "false_alarm_rate": confusion.false_alarm_rate(),
            "escape_rate": confusion.escape_rate(),
            "f1_best": f1_best_threshold(&good_scores, &nok_scores)
                .map(|(threshold, f1)| json!({"threshold": threshold, "f1": f1})),
            "threshold_for_1pct_false_alarms": threshold_for_false_alarm_rate(&good_scores, 0.01),
            "score_histogram": score_histogram(&good_scores, &nok_scores, thresholds.classification),
            "roc_curve": roc_curve(&good_scores, &nok_scores).map(|c| roc_points(&c, 200)),
            "flagged_nok_per_kind": per_kind.iter().map(|(k, (n, f))| (k.clone(), json!({"images": n, "flagged_nok": f}))).collect::<serde_json::Map<_, _>>(),
            "ms_per_image": 1000.0 * secs / n.max(1) as f64,
    }))
}

/// `inkspect bench-quality`: trains with the defaults and evaluates every MVTec-layout category
/// under the given roots; prints (and optionally writes) one Markdown table.
fn bench_quality(args: BenchQualityArgs, device: DevicePreference) -> Result<()> {
    let mut categories: Vec<PathBuf> = Vec::new();
    for root in &args.roots {
        if is_mvtec_layout(root) {
            categories.push(root.clone());
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(root)
                .with_context(|| format!("cannot read {}", root.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_mvtec_layout(p))
                .collect();
            if found.is_empty() {
                bail!(
                    "{}: no MVTec-layout category found (train/good and test/)",
                    root.display()
                );
            }
            found.sort();
            categories.extend(found);
        }
    }
    let compute = select_device(device);
    let work = tempfile::tempdir()?;
    let mut rows = vec![
        "| category | framework | image AUROC | pixel AUROC | training s | inference ms/image |"
            .to_string(),
        "|---|---|---|---|---|---|".to_string(),
    ];
    let frameworks = if args.framework.is_empty() {
        vec![Framework::default()]
    } else {
        args.framework.clone()
    };
    // Per framework: sums and counts of image and pixel AUROC.
    let mut sums = vec![(0.0f64, 0usize, 0.0f64, 0usize); frameworks.len()];
    for (i, category) in categories.iter().enumerate() {
        let name = category
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        eprintln!("[{}/{}] {name}", i + 1, categories.len());
        let (files, _) = collect_image_files(&[category.join("train").join("good")]);
        let mut dataset = DatasetSettings::default();
        if let Some(complexity) = args.complexity {
            dataset.complexity = complexity;
        }
        let cache = DatasetCache::default();
        let report = import_items(
            &items_with_role(files, ImageRole::TrainGood),
            &ImportOptions {
                prepare: Some((dataset.effective_size_px(), cache.clone())),
                known_hashes: Default::default(),
            },
            &|_, _| {},
            &StopFlag::new(),
        );
        for (framework, sum) in frameworks.iter().zip(sums.iter_mut()) {
            let model_path = work.path().join(format!("{i}-{}.ink", framework.name()));
            let summary = run_training(TrainRequest {
                framework: *framework,
                images: report.imported.clone(),
                dataset,
                training: TrainingSettings::default(),
                model_path: model_path.clone(),
                cache: cache.clone(),
                device: compute.clone(),
                resume: false,
                memory_budget_bytes: None,
            })?;
            let inspector = Inspector::load(&model_path, &compute.device)?;
            let figures = evaluate(&inspector, category, inspector.suggested_thresholds(), 8)?;
            let image = figures["image_auroc"].as_f64();
            let pixel = figures["pixel_auroc"].as_f64();
            if let Some(v) = image {
                sum.0 += v;
                sum.1 += 1;
            }
            if let Some(v) = pixel {
                sum.2 += v;
                sum.3 += 1;
            }
            let f = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.3}"));
            let row = format!(
                "| {name} | {} | {} | {} | {:.0} | {:.1} |",
                framework.display_name(),
                f(image),
                f(pixel),
                summary.train_secs + summary.prepare_secs,
                figures["ms_per_image"].as_f64().unwrap_or(f64::NAN)
            );
            eprintln!("{row}");
            rows.push(row);
        }
    }
    let mean = |s: f64, n: usize| {
        if n > 0 {
            format!("{:.3}", s / n as f64)
        } else {
            "–".into()
        }
    };
    for (framework, (si, ni, sp, np)) in frameworks.iter().zip(sums) {
        rows.push(format!(
            "| **mean of {}** | {} | **{}** | **{}** | | |",
            categories.len(),
            framework.display_name(),
            mean(si, ni),
            mean(sp, np)
        ));
    }
    let table = rows.join("\n");
    println!("{table}");
    if let Some(out) = &args.out {
        crate::engine::atomic_write(out, format!("{table}\n").as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

/// Score histograms of good and nok test images over one shared range (30 bins).
fn score_histogram(good: &[f32], nok: &[f32], threshold: f32) -> serde_json::Value {
    let hi = good.iter().chain(nok).copied().fold(threshold, f32::max) * 1.05;
    let lo = good.iter().chain(nok).copied().fold(0.0f32, f32::min);
    json!({
        "lo": lo,
        "hi": hi,
        "good": histogram(good, lo, hi, 30).counts,
        "nok": histogram(nok, lo, hi, 30).counts,
    })
}

/// The ROC curve as `[false-alarm rate, detection rate, threshold]` rows, thinned to at most
/// `max_points` (always keeping both ends); the infinite first threshold is written as null.
fn roc_points(curve: &RocCurve, max_points: usize) -> Vec<serde_json::Value> {
    let n = curve.points.len();
    let step = n.div_ceil(max_points.max(2)).max(1);
    curve
        .points
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i + 1 == n)
        .map(|(_, p)| json!([p.fpr, p.tpr, p.threshold.is_finite().then_some(p.threshold)]))
        .collect()
}

/// Upper end of the pixel-AUROC histogram: anomaly values above it share the last bin. Chosen far
/// above the scores of good images so that the ranking that matters is kept.
fn pixel_range_hi(inspector: &Inspector) -> f32 {
    let max_val = inspector
        .header
        .validation_scores
        .iter()
        .copied()
        .fold(0.0f32, f32::max)
        .max(inspector.suggested_thresholds().classification);
    (max_val * 50.0).max(1e-3)
}

/// Loads a ground-truth mask (non-zero = defect) resized to `width x height` (nearest neighbour).
/// PRO is integrated up to this false-positive rate (the usual 30 %).
const PRO_FPR_LIMIT: f64 = 0.3;

/// Largest side of the maps PRO is computed on (maps are subsampled with an integer stride, so
/// that a few hundred camera-size images fit in memory).
const PRO_MAX_SIDE: usize = 256;

/// `scores` and `mask` subsampled with the smallest integer stride that brings both sides to at
/// most [`PRO_MAX_SIDE`]: (scores, mask, width, height).
fn strided_map(
    scores: &[f32],
    mask: &[bool],
    width: usize,
    height: usize,
) -> (Vec<f32>, Vec<bool>, usize, usize) {
    let stride = width.max(height).div_ceil(PRO_MAX_SIDE).max(1);
    let (w, h) = (width.div_ceil(stride), height.div_ceil(stride));
    let mut s = Vec::with_capacity(w * h);
    let mut m = Vec::with_capacity(w * h);
    for y in (0..height).step_by(stride) {
        for x in (0..width).step_by(stride) {
            s.push(scores[y * width + x]);
            m.push(mask[y * width + x]);
        }
    }
    (s, m, w, h)
}

fn load_mask(path: &Path, width: u32, height: u32) -> Option<Vec<bool>> {
    let mask = match decode_image(path) {
        Ok(m) => m.to_mode(crate::engine::dataset::decode::ColourMode::Mono),
        Err(e) => {
            eprintln!("skipped mask: {e}");
            return None;
        }
    };
    let gray = image::GrayImage::from_raw(mask.width, mask.height, mask.pixels)?;
    let gray = if (gray.width(), gray.height()) == (width, height) {
        gray
    } else {
        image::imageops::resize(&gray, width, height, image::imageops::FilterType::Nearest)
    };
    Some(gray.into_raw().into_iter().map(|v| v > 127).collect())
}

fn demo(args: DemoArgs) -> Result<()> {
    let spec = DemoSpec {
        size_px: args.size,
        colour: args.colour,
        ..DemoSpec::default()
    };
    let summary = write_demo_dataset(&args.dir, &spec)?;
    eprintln!(
        "demo dataset written to {}: {} good training images, {} good and {} nok test images (with masks)",
        summary.root.display(),
        summary.n_train_good,
        summary.n_test_good,
        summary.n_test_nok
    );
    Ok(())
}

#[cfg(feature = "app")]
fn open_app(project: Option<PathBuf>) -> Result<()> {
    crate::ui::run_app(project).map_err(|e| anyhow::anyhow!("the desktop app could not start: {e}"))
}

#[cfg(not(feature = "app"))]
fn open_app(_project: Option<PathBuf>) -> Result<()> {
    bail!("this build of Inkspect has no desktop app (built without the `app` feature)")
}

/// Folder of the demo project: `$INKSPECT_DEMO_DIR`, else `datasets/demo` in the source tree when
/// it can be written, else `<data dir>/demo`.
pub fn demo_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("INKSPECT_DEMO_DIR") {
        return PathBuf::from(d);
    }
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets");
    if in_repo.is_dir() && std::fs::metadata(&in_repo).is_ok_and(|m| !m.permissions().readonly()) {
        return in_repo.join("demo");
    }
    crate::engine::data_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("demo")
}

/// The trained model shipped with the sources for the demo project, if present.
pub fn bundled_demo_model() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join("demo.ink");
    p.is_file().then_some(p)
}

/// Returns the demo project file, creating the demo dataset and project on first use (the
/// bundled trained model is used when present, so the Evaluation tab works at once).
pub fn demo_project() -> Result<PathBuf> {
    let root = demo_dir();
    let file = root.join("demo.inkspect");
    if file.is_file() {
        // Demo projects written by the first versions used the shipped model itself: give them
        // their own copy, so that training there never rewrites the file in the sources.
        if let (Ok(mut project), Some(bundled)) = (
            crate::engine::project::Project::load(&file),
            bundled_demo_model(),
        ) && project.model_path.as_deref() == Some(bundled.as_path())
        {
            let copy = root.join("demo.ink");
            std::fs::copy(&bundled, &copy).with_context(|| {
                format!("cannot copy {} to {}", bundled.display(), copy.display())
            })?;
            project.model_path = Some(copy);
            project.save(&file)?;
        }
        return Ok(file);
    }
    let images = root.join("images");
    if !images.join("train").join("good").is_dir() {
        eprintln!(
            "writing the demo dataset to {} (first start only)",
            images.display()
        );
        write_demo_dataset(&images, &DemoSpec::default())?;
    }
    let items = scan_mvtec(&images).items;
    let report = import_items(
        &items,
        &ImportOptions::default(),
        &|_, _| {},
        &StopFlag::new(),
    );
    let mut project = crate::engine::project::Project::new("Demo wafer dies");
    project.add_imported(&report);
    project.dataset = DatasetSettings {
        image_size_px: DemoSpec::default().size_px,
        complexity: DatasetSettings::default().complexity,
    };
    // A copy of the bundled model, so that training in the demo project never rewrites the file
    // shipped with the sources.
    project.model_path = match bundled_demo_model() {
        Some(bundled) => {
            if let Ok(header) = ModelFile::read_header(&bundled) {
                project.framework = header.framework;
            }
            let copy = root.join("demo.ink");
            std::fs::copy(&bundled, &copy).with_context(|| {
                format!("cannot copy {} to {}", bundled.display(), copy.display())
            })?;
            Some(copy)
        }
        None => None,
    };
    project.save(&file)?;
    Ok(file)
}
