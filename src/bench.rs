//! `inkspect bench`: the hot paths measured on generated images, printed as a table, and (with
//! `--pytorch`) side by side with the PyTorch twin of the model in `benches/`. Figures are
//! printed, never asserted.
//!
//! 1. Import: read + hash + decode + downscale of 1208 x 1308 mono PNGs to the training size.
//! 2. Training: a real one-epoch training run (`engine::training::train`) on generated images;
//!    images/s of the epoch, achieved GFLOP/s and the process's peak memory while it ran.
//! 3. Inspection: the model on prepared images in batches (what PyTorch's twin times), and whole
//!    files (decode, model, full-resolution map, region, verdict) in batches and one at a time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::engine::StopFlag;
use crate::engine::dataset::decode::{ColourMode, decode_image};
use crate::engine::dataset::import::{
    ImageRole, ImportOptions, ImportedImage, import_items, items_with_role,
};
use crate::engine::dataset::prepare::{DatasetCache, DatasetSettings, PreparedImage};
use crate::engine::device::ComputeDevice;
use crate::engine::inference::{Inspector, anomaly_maps_at_model_size, raw_anomaly_maps};
use crate::engine::model::{
    AutoencoderSpec, Framework, autoencoder_spec_for, patch_memory_spec_for,
};
use crate::engine::training::{
    TrainRequest, TrainingSettings, TrainingSummary, estimate_fit_memory, estimate_training_memory,
    train,
};

/// What to measure.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Training image size in pixels.
    #[arg(long, default_value_t = 320)]
    pub size: u32,
    /// Complexity index.
    #[arg(long, default_value_t = 20)]
    pub complexity: u32,
    /// Images per batch (training and inspection).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Camera-size images (1208 x 1308 mono PNG) generated for the import and inspection runs.
    #[arg(long, default_value_t = 64)]
    pub camera_images: usize,
    /// Images in the training run (the peak-memory figure is for 400).
    #[arg(long, default_value_t = 400)]
    pub train_images: usize,
    /// Also run `benches/pytorch_autoencoder.py` with the same sizes and print the ratios.
    #[arg(long)]
    pub pytorch: bool,
    /// Python interpreter for `--pytorch`.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Also write the table (Markdown) to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Side of the generated camera images, as in the product brief (1208 x 1308 mono).
const CAMERA_W: u32 = 1208;
const CAMERA_H: u32 = 1308;

/// Runs the benchmark and prints the table (and one JSON line with every figure).
pub fn run(args: &BenchArgs, device: &ComputeDevice) -> Result<()> {
    let work = tempfile::tempdir().context("cannot create a temporary folder")?;
    let spec = autoencoder_spec_for(args.complexity, 1);
    let size = DatasetSettings {
        image_size_px: args.size,
        complexity: args.complexity,
    }
    .effective_size_px();
    let threads = rayon::current_num_threads();
    eprintln!(
        "bench: {size} px, complexity {}, batch {}, {} parameters, {}",
        args.complexity,
        args.batch,
        spec.parameter_count(),
        device.description
    );

    // 1. Import.
    let camera = work.path().join("camera");
    let camera_files = write_images(&camera, args.camera_images, CAMERA_W, CAMERA_H)?;
    let cache = DatasetCache::in_dir(work.path().join("cache"));
    let start = Instant::now();
    let report = import_items(
        &items_with_role(camera_files.clone(), ImageRole::TrainGood),
        &ImportOptions {
            prepare: Some((size, cache)),
            known_hashes: Default::default(),
        },
        &|_, _| {},
        &StopFlag::new(),
    );
    let import_secs = start.elapsed().as_secs_f64();
    if !report.failures.is_empty() {
        bail!("import failed: {}", report.failures[0].reason);
    }
    let import_per_sec = camera_files.len() as f64 / import_secs;
    eprintln!("import: {import_per_sec:.1} images/s");

    // 2. Training (one epoch, real training code), peak memory of the process while it runs.
    let train_dir = work.path().join("train");
    let train_files = write_images(&train_dir, args.train_images, size, size)?;
    let train_cache = DatasetCache::in_dir(work.path().join("train-cache"));
    let imported = import_items(
        &items_with_role(train_files, ImageRole::TrainGood),
        &ImportOptions {
            prepare: Some((size, train_cache.clone())),
            known_hashes: Default::default(),
        },
        &|_, _| {},
        &StopFlag::new(),
    );
    let model_path = work.path().join("bench.ink");
    reset_peak_memory();
    let memory_before = peak_memory_bytes();
    let summary = train_once(
        Framework::ConvAutoencoder,
        &imported.imported,
        &train_cache,
        &model_path,
        args,
        size,
        device,
    )?;
    let peak_training = peak_memory_bytes();
    let train_per_sec = summary.history[0].images_per_sec;
    let forward_gflop = forward_gflop_per_image(&spec, size);
    let train_gflops = 3.0 * forward_gflop * train_per_sec;
    let peak_gflops = cpu_peak_gflops(threads);
    eprintln!("training: {train_per_sec:.2} images/s, {train_gflops:.1} GFLOP/s");

    // 3. Inspection.
    let inspector = Inspector::load(&model_path, &device.device)?;
    let prepared: Vec<PreparedImage> = camera_files
        .iter()
        .take(args.batch * 4)
        .map(|p| decode_image(p).map(|d| PreparedImage::from_decoded(&d, size, ColourMode::Mono)))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&PreparedImage> = prepared.iter().collect();
    let network = inspector.network();
    let _ = anomaly_maps_at_model_size(
        network,
        &refs[..args.batch.min(refs.len())],
        &device.device,
        None,
    );
    // The same work as the PyTorch script (the model and the error map, read back), median of
    // `INSPECTION_PASSES` passes as there.
    let model_ms = median_pass_ms(refs.len(), || {
        for chunk in refs.chunks(args.batch) {
            let _ = raw_anomaly_maps(network, chunk, &device.device).into_data();
        }
    });
    // What inspection uses: plus resizing to model size and smoothing.
    let smoothed_ms = median_pass_ms(refs.len(), || {
        for chunk in refs.chunks(args.batch) {
            let _ = anomaly_maps_at_model_size(network, chunk, &device.device, None);
        }
    });
    let thresholds = inspector.suggested_thresholds();
    let start = Instant::now();
    let mut n = 0usize;
    inspector.inspect_files(&camera_files, thresholds, args.batch, &mut |(_, r)| {
        n += usize::from(r.is_ok());
    });
    let files_ms = 1000.0 * start.elapsed().as_secs_f64() / n.max(1) as f64;
    let single: Vec<PathBuf> = camera_files.iter().take(8).cloned().collect();
    let start = Instant::now();
    inspector.inspect_files(&single, thresholds, 1, &mut |_| {});
    let single_ms = 1000.0 * start.elapsed().as_secs_f64() / single.len() as f64;
    eprintln!(
        "inspection: model {model_ms:.1} ms/image, smoothed {smoothed_ms:.1}, files {files_ms:.1} ms/image"
    );

    // 4. The patch memory: fit on the same images, then the same inspections.
    let pm_path = work.path().join("bench-pm.ink");
    reset_peak_memory();
    let pm_summary = train_once(
        Framework::PatchMemory,
        &imported.imported,
        &train_cache,
        &pm_path,
        args,
        size,
        device,
    )?;
    let pm_peak = peak_memory_bytes();
    let pm_fit_secs = pm_summary.train_secs;
    let pm_inspector = Inspector::load(&pm_path, &device.device)?;
    let pm_model_ms = median_pass_ms(refs.len(), || {
        for chunk in refs.chunks(args.batch) {
            let _ = anomaly_maps_at_model_size(pm_inspector.network(), chunk, &device.device, None);
        }
    });
    let start = Instant::now();
    let mut n = 0usize;
    pm_inspector.inspect_files(&camera_files, thresholds, args.batch, &mut |(_, r)| {
        n += usize::from(r.is_ok());
    });
    let pm_files_ms = 1000.0 * start.elapsed().as_secs_f64() / n.max(1) as f64;
    eprintln!(
        "patch memory: fit {pm_fit_secs:.1} s, model {pm_model_ms:.1} ms/image, files {pm_files_ms:.1} ms/image"
    );

    let mut figures = json!({
        "device": device.description,
        "threads": threads,
        "size": size,
        "complexity": args.complexity,
        "batch": args.batch,
        "parameters": spec.parameter_count(),
        "import_images_per_sec": import_per_sec,
        "train_images_per_sec": train_per_sec,
        "train_gflops_per_sec": train_gflops,
        "cpu_peak_gflops_per_sec": peak_gflops,
        "forward_gflop_per_image": forward_gflop,
        "train_images": args.train_images,
        "train_peak_memory_mib": peak_training.map(|b| b as f64 / 1048576.0),
        "train_memory_estimate_mib": estimate_training_memory(&spec, size, args.batch, args.train_images).total_bytes as f64 / 1048576.0,
        "memory_before_training_mib": memory_before.map(|b| b as f64 / 1048576.0),
        "infer_model_ms_per_image": model_ms,
        "infer_smoothed_ms_per_image": smoothed_ms,
        "inspect_file_ms_per_image_batched": files_ms,
        "inspect_file_ms_single": single_ms,
        "patch_memory": {
            "fit_secs": pm_fit_secs,
            "fit_images_per_sec": pm_summary.history[0].images_per_sec,
            "fit_peak_memory_mib": pm_peak.map(|b| b as f64 / 1048576.0),
            "fit_memory_estimate_mib": estimate_fit_memory(
                &patch_memory_spec_for(args.complexity, 1),
                size,
                args.batch,
                args.train_images,
            )
            .total_bytes as f64
                / 1048576.0,
            "infer_model_ms_per_image": pm_model_ms,
            "inspect_file_ms_per_image_batched": pm_files_ms,
        },
    });
    let torch = if args.pytorch {
        Some(run_pytorch(args, size)?)
    } else {
        None
    };
    let table = table(&figures, torch.as_ref());
    if let Some(t) = &torch {
        figures["pytorch"] = t.clone();
    }
    println!("{table}");
    println!("{figures}");
    if let Some(out) = &args.out {
        crate::engine::atomic_write(out, table.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

/// One real training run of `framework` (one epoch for the autoencoder) on the imported images,
/// writing `model_path`.
fn train_once(
    framework: Framework,
    images: &[ImportedImage],
    cache: &DatasetCache,
    model_path: &Path,
    args: &BenchArgs,
    size: u32,
    device: &ComputeDevice,
) -> Result<TrainingSummary> {
    // Room for every event of one epoch, so the training never waits on this unread channel;
    // the summary has the figures.
    let (tx, _rx) = std::sync::mpsc::sync_channel(100_000);
    Ok(train(
        TrainRequest {
            framework,
            images: images.to_vec(),
            dataset: DatasetSettings {
                image_size_px: size,
                complexity: args.complexity,
            },
            training: TrainingSettings {
                max_epochs: 1,
                batch_size: args.batch,
                ..Default::default()
            },
            model_path: model_path.to_path_buf(),
            cache: cache.clone(),
            device: device.clone(),
            resume: false,
            memory_budget_bytes: None,
        },
        &tx,
        &StopFlag::new(),
    )?)
}

fn table(f: &Value, torch: Option<&Value>) -> String {
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut rows = vec![
        "| measure | inkspect | PyTorch | ratio (≥ 1: inkspect as fast or faster) |".to_string(),
        "|---|---|---|---|".to_string(),
    ];
    let t = |key: &str| torch.map(|t| num(&t[key]));
    let ratio = |a: f64, b: Option<f64>, higher_better: bool| match b {
        Some(b) if higher_better => format!("{:.2}", a / b),
        Some(b) => format!("{:.2}", b / a),
        None => "–".into(),
    };
    let opt = |v: Option<f64>, prec: usize| v.map_or("–".into(), |v| format!("{v:.prec$}"));
    let train = num(&f["train_images_per_sec"]);
    rows.push(format!(
        "| training, images/s ({} px, complexity {}, batch {}) | {train:.2} | {} | {} |",
        f["size"],
        f["complexity"],
        f["batch"],
        opt(t("train_images_per_sec"), 2),
        ratio(train, t("train_images_per_sec"), true)
    ));
    let gf = num(&f["train_gflops_per_sec"]);
    rows.push(format!(
        "| training, achieved GFLOP/s (CPU peak ≈ {:.0}) | {gf:.1} | {} | {} |",
        num(&f["cpu_peak_gflops_per_sec"]),
        opt(t("train_gflops_per_sec"), 1),
        ratio(gf, t("train_gflops_per_sec"), true)
    ));
    let model = num(&f["infer_model_ms_per_image"]);
    rows.push(format!(
        "| inspection, model + error map, ms/image (batch {}) | {model:.1} | {} | {} |",
        f["batch"],
        opt(t("infer_ms_per_image"), 1),
        ratio(model, t("infer_ms_per_image"), false)
    ));
    rows.push(format!(
        "| same plus smoothing the map (what inspection computes), ms/image | {:.1} | – | – |",
        num(&f["infer_smoothed_ms_per_image"])
    ));
    rows.push(format!(
        "| inspection of 1208x1308 files (decode, model, full-size map, region, verdict), ms/image, batch {} | {:.1} | – | – |",
        f["batch"],
        num(&f["inspect_file_ms_per_image_batched"])
    ));
    rows.push(format!(
        "| same, one image at a time, ms/image | {:.1} | – | – |",
        num(&f["inspect_file_ms_single"])
    ));
    rows.push(format!(
        "| import of 1208x1308 PNGs (read, hash, decode, downscale, cache), images/s | {:.1} | – | – |",
        num(&f["import_images_per_sec"])
    ));
    rows.push(format!(
        "| peak memory of the process while training {} images, MiB (estimate checked before a run: {:.0}) | {} | – | – |",
        f["train_images"],
        num(&f["train_memory_estimate_mib"]),
        opt(f["train_peak_memory_mib"].as_f64(), 0)
    ));
    let pm = &f["patch_memory"];
    rows.push(format!(
        "| patch memory: fit {} images (features, memory, validation scores), s | {:.1} ({:.1} images/s) | – | – |",
        f["train_images"],
        num(&pm["fit_secs"]),
        num(&pm["fit_images_per_sec"])
    ));
    rows.push(format!(
        "| patch memory: inspection, model + distance map, ms/image (batch {}) | {:.1} | – | – |",
        f["batch"],
        num(&pm["infer_model_ms_per_image"])
    ));
    rows.push(format!(
        "| patch memory: inspection of 1208x1308 files, ms/image, batch {} | {:.1} | – | – |",
        f["batch"],
        num(&pm["inspect_file_ms_per_image_batched"])
    ));
    rows.push(format!(
        "| patch memory: peak memory of the process while fitting, MiB (estimate checked before a run: {:.0}) | {} | – | – |",
        num(&pm["fit_memory_estimate_mib"]),
        opt(pm["fit_peak_memory_mib"].as_f64(), 0)
    ));
    rows.join("\n")
}

fn run_pytorch(args: &BenchArgs, size: u32) -> Result<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches")
        .join("pytorch_autoencoder.py");
    eprintln!("running {} ...", script.display());
    let out = std::process::Command::new(&args.python)
        .arg(&script)
        .args(["--size", &size.to_string()])
        .args(["--complexity", &args.complexity.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .output()
        .with_context(|| format!("cannot run {} (is Python installed?)", args.python))?;
    if !out.status.success() {
        bail!(
            "{} failed (is torch installed? `pip install torch`): {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("unexpected output from the script: {line}"))
}

/// Writes `n` distinct mono PNGs of `w x h` with die-like structure (generation is not timed).
fn write_images(dir: &Path, n: usize, w: u32, h: u32) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    (0..n)
        .into_par_iter()
        .map(|i| {
            let img = image::GrayImage::from_fn(w, h, |x, y| {
                let grid = if (x / 24 + y / 24) % 2 == 0 { 150 } else { 110 };
                let noise =
                    ((x.wrapping_mul(73) ^ y.wrapping_mul(151) ^ (i as u32 * 977)) % 23) as u8;
                image::Luma([grid + noise])
            });
            let path = dir.join(format!("{i:04}.png"));
            img.save(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(path)
        })
        .collect()
}

/// Forward GFLOP of one image (2 FLOP per multiply-add of every convolution).
pub fn forward_gflop_per_image(spec: &AutoencoderSpec, size: u32) -> f64 {
    let area = |level: usize| ((size >> level) as f64).powi(2);
    let levels = spec.widths.len();
    let mut macs = 0.0;
    let mut c_in = spec.channels as f64;
    for (i, &w) in spec.widths.iter().enumerate() {
        macs += c_in * w as f64 * 16.0 * area(i + 1);
        c_in = w as f64;
    }
    macs += 2.0 * c_in * spec.latent_channels as f64 * area(levels);
    let mut outs: Vec<usize> = spec.widths.iter().rev().skip(1).copied().collect();
    outs.push(spec.channels);
    for (j, &o) in outs.iter().enumerate() {
        // A transposed convolution costs input positions x in x out x 16.
        macs += c_in * o as f64 * 16.0 * area(levels - j);
        c_in = o as f64;
    }
    2.0 * macs / 1e9
}

/// Peak single-precision GFLOP/s of `cores` AVX2+FMA cores (32 FLOP per cycle) at the fastest
/// clock `/proc/cpuinfo` reports.
fn cpu_peak_gflops(cores: usize) -> f64 {
    let mhz = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .filter(|l| l.starts_with("cpu MHz"))
                .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
                .reduce(f64::max)
        })
        .unwrap_or(2500.0);
    cores as f64 * 32.0 * mhz / 1000.0
}

/// Resets the process's peak-memory mark (Linux), so the next reading covers what follows.
fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident memory (Linux `VmHWM`), bytes.
fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Passes over the inspection images; the median pass is reported (as in the PyTorch script).
const INSPECTION_PASSES: usize = 5;

/// Median over [`INSPECTION_PASSES`] runs of `pass`, in ms per image of the `images` it covers.
fn median_pass_ms(images: usize, mut pass: impl FnMut()) -> f64 {
    let mut ms: Vec<f64> = (0..INSPECTION_PASSES)
        .map(|_| {
            let start = Instant::now();
            pass();
            1000.0 * start.elapsed().as_secs_f64() / images.max(1) as f64
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}
