//! End-to-end engine tests on synthetic images generated here (no external data): import, train,
//! early stop, cancel, reload, inspect, mono and colour.

use std::path::{Path, PathBuf};

use inkspect::engine::StopFlag;
use inkspect::engine::dataset::decode::ColourMode;
use inkspect::engine::dataset::import::{
    ImageRole, ImportOptions, ImportReport, collect_image_files, import_items, items_with_role,
    scan_mvtec,
};
use inkspect::engine::dataset::prepare::{DatasetCache, DatasetSettings, split_train_validation};
use inkspect::engine::demo::{DemoSpec, write_demo_dataset};
use inkspect::engine::device::cpu_device;
use inkspect::engine::inference::{Class, Inspector};
use inkspect::engine::metrics::auroc;
use inkspect::engine::model::{Framework, ModelFile};
use inkspect::engine::training::{
    EpochReport, StopReason, TrainEvent, TrainRequest, TrainingSettings, spawn_training,
};

fn demo(dir: &Path, colour: bool) -> PathBuf {
    let spec = DemoSpec {
        colour,
        ..DemoSpec::tiny()
    };
    write_demo_dataset(dir, &spec).expect("demo dataset is written");
    dir.to_path_buf()
}

fn import_folder(folder: &Path, cache: &DatasetCache) -> ImportReport {
    let (files, failures) = collect_image_files(&[folder.to_path_buf()]);
    assert!(failures.is_empty(), "{failures:?}");
    import_items(
        &items_with_role(files, ImageRole::TrainGood),
        &ImportOptions {
            prepare: Some((64, cache.clone())),
            known_hashes: Default::default(),
        },
        &|_, _| {},
        &StopFlag::new(),
    )
}

/// A tiny demo dataset in a temporary folder with its good training images imported (and the
/// prepared-image cache filled): (folder guard, dataset root, cache, import report).
fn imported_demo(colour: bool) -> (tempfile::TempDir, PathBuf, DatasetCache, ImportReport) {
    let dir = tempfile::tempdir().unwrap();
    let root = demo(&dir.path().join("demo"), colour);
    let cache = DatasetCache::in_dir(dir.path().join("cache"));
    let report = import_folder(&root.join("train/good"), &cache);
    (dir, root, cache, report)
}

fn request(
    report: &ImportReport,
    model: &Path,
    cache: &DatasetCache,
    training: TrainingSettings,
) -> TrainRequest {
    TrainRequest {
        framework: Framework::ConvAutoencoder,
        images: report.imported.clone(),
        dataset: DatasetSettings {
            image_size_px: 64,
            complexity: 20,
        },
        training,
        model_path: model.to_path_buf(),
        cache: cache.clone(),
        device: cpu_device(),
        resume: false,
        memory_budget_bytes: None,
    }
}

/// Runs a training to the end and returns all its events.
fn run_to_end(req: TrainRequest) -> Vec<TrainEvent> {
    let handle = spawn_training(req);
    let events: Vec<TrainEvent> = handle.events.iter().collect();
    let _ = handle
        .thread
        .join()
        .expect("training thread does not panic");
    events
}

/// The epoch reports among `events`, in order.
fn epoch_reports(events: &[TrainEvent]) -> Vec<EpochReport> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Epoch(r) => Some(*r),
            _ => None,
        })
        .collect()
}

fn test_scores(inspector: &Inspector, root: &Path) -> (Vec<f32>, Vec<f32>, Vec<Class>) {
    let items: Vec<_> = scan_mvtec(root)
        .items
        .into_iter()
        .filter(|i| i.role != ImageRole::TrainGood)
        .collect();
    let paths: Vec<PathBuf> = items.iter().map(|i| i.path.clone()).collect();
    let thresholds = inspector.suggested_thresholds();
    let (mut good, mut nok, mut classes) = (Vec::new(), Vec::new(), Vec::new());
    let mut i = 0;
    inspector.inspect_files(&paths, thresholds, 4, &mut |(_, r)| {
        let ins = r.expect("demo images decode");
        if items[i].role == ImageRole::TestGood {
            good.push(ins.score);
        } else {
            nok.push(ins.score);
            classes.push(ins.class);
        }
        i += 1;
    });
    (good, nok, classes)
}

/// Scores the validation images (the deterministic split of the imported images, prepared at
/// `size` in the cache) with the reloaded model and checks them against the validation scores the
/// model file recorded when it was made, within `relative` tolerance.
fn assert_reloaded_scores_match(
    inspector: &Inspector,
    report: &ImportReport,
    cache: &DatasetCache,
    size: u32,
    relative: f32,
) {
    let keys: Vec<String> = report
        .imported
        .iter()
        .map(|i| i.content_hash.clone())
        .collect();
    let split = split_train_validation(&keys, TrainingSettings::default().seed);
    let prepared: Vec<_> = split
        .validation
        .iter()
        .map(|&i| {
            cache
                .load(&keys[i], size, inspector.mode())
                .expect("import or training filled the cache")
        })
        .collect();
    let refs: Vec<_> = prepared.iter().collect();
    let reloaded = inspector.scores_of_prepared(&refs, 4);
    let recorded = &inspector.header.validation_scores;
    assert_eq!(reloaded.len(), recorded.len());
    for (a, b) in reloaded.iter().zip(recorded) {
        assert!((a - b).abs() <= relative * b.abs().max(1e-3), "{a} vs {b}");
    }
}

#[test]
fn mono_training_separates_defects_reloads_identically_and_reports_progress() {
    let (dir, root, cache, report) = imported_demo(false);
    assert_eq!(report.imported.len(), DemoSpec::tiny().n_train_good);
    assert!(report.imported.iter().all(|i| i.mode == ColourMode::Mono));
    let model = dir.path().join("m.ink");
    let events = run_to_end(request(
        &report,
        &model,
        &cache,
        TrainingSettings {
            max_epochs: 40,
            batch_size: 4,
            ..TrainingSettings::default()
        },
    ));
    assert!(matches!(events.first(), Some(TrainEvent::Preparing { .. })));
    let epochs = epoch_reports(&events);
    assert_eq!(epochs.len(), 40);
    assert!(
        epochs.last().unwrap().train_loss < epochs[0].train_loss,
        "loss falls: {epochs:?}"
    );
    let Some(TrainEvent::Finished { summary, .. }) = events.last() else {
        panic!("last event is Finished: {:?}", events.last());
    };
    assert_eq!(summary.stop_reason, StopReason::MaxEpochs);

    let device = cpu_device().device;
    let inspector = Inspector::load(&model, &device).unwrap();
    let (good, nok, classes) = test_scores(&inspector, &root);
    let a = auroc(&good, &nok).unwrap();
    assert!(a >= 0.9, "image AUROC {a}: good {good:?} nok {nok:?}");
    assert!(classes.iter().filter(|&&c| c == Class::Nok).count() * 2 >= classes.len());

    // The reloaded network gives the scores the in-memory network computed before saving.
    assert_reloaded_scores_match(&inspector, &report, &cache, 64, 1e-5);
}

#[test]
fn patch_memory_fits_in_one_pass_separates_defects_and_reloads_identically() {
    for colour in [false, true] {
        let (dir, root, cache, report) = imported_demo(colour);
        let model = dir.path().join("pm.ink");
        let mut req = request(&report, &model, &cache, TrainingSettings::default());
        req.framework = Framework::PatchMemory;
        // The extractor sees the image halved: 128 px keeps the tiny dies' defects a few
        // patches wide.
        req.dataset.image_size_px = 128;
        let events = run_to_end(req);
        let epochs = epoch_reports(&events);
        assert_eq!(epochs.len(), 1, "fitted in one pass: {epochs:?}");
        let Some(TrainEvent::Finished { summary, .. }) = events.last() else {
            panic!("last event is Finished: {:?}", events.last());
        };
        assert_eq!(summary.epochs_run, 1);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, TrainEvent::Started { max_epochs: 1, .. })),
            "{events:?}"
        );

        let device = cpu_device().device;
        let inspector = Inspector::load(&model, &device).unwrap();
        let header = &inspector.header;
        assert_eq!(header.framework, Framework::PatchMemory);
        assert!(header.autoencoder.is_none());
        let spec = header.patch_memory.as_ref().expect("patch memory shape");
        assert_eq!(spec.channels, if colour { 3 } else { 1 });
        assert!(spec.memory_patches > 0 && spec.memory_patches <= 10_000);
        assert!(header.error_stats.is_none());
        let (good, nok, classes) = test_scores(&inspector, &root);
        let a = auroc(&good, &nok).unwrap();
        assert!(
            a >= 0.9,
            "colour {colour}: image AUROC {a}: good {good:?} nok {nok:?}"
        );
        assert!(classes.iter().filter(|&&c| c == Class::Nok).count() * 2 >= classes.len());

        // The reloaded memory scores the validation images as the fitted one did.
        assert_reloaded_scores_match(&inspector, &report, &cache, 128, 1e-4);
    }
}

#[test]
fn loose_error_threshold_stops_early_and_says_so() {
    let (dir, _root, cache, report) = imported_demo(false);
    let model = dir.path().join("m.ink");
    let events = run_to_end(request(
        &report,
        &model,
        &cache,
        TrainingSettings {
            max_epochs: 50,
            error_threshold: 0.5,
            ..TrainingSettings::default()
        },
    ));
    let Some(TrainEvent::Finished { summary, .. }) = events.last() else {
        panic!("finished: {:?}", events.last());
    };
    assert_eq!(summary.stop_reason, StopReason::ErrorThreshold);
    assert_eq!(summary.epochs_run, 1);
    let header = ModelFile::read_header(&model).unwrap();
    assert_eq!(header.training.stop_reason, StopReason::ErrorThreshold);
}

#[test]
fn cancel_stops_before_the_next_batch_and_keeps_the_previous_model() {
    let (dir, _root, cache, report) = imported_demo(false);
    let model = dir.path().join("m.ink");
    std::fs::write(&model, b"previous model").unwrap();
    let settings = TrainingSettings {
        max_epochs: 1000,
        batch_size: 1,
        ..TrainingSettings::default()
    };
    let handle = spawn_training(request(&report, &model, &cache, settings));
    let mut batches_after_stop = 0;
    let mut stopped = false;
    let mut last = None;
    for event in handle.events.iter() {
        match &event {
            TrainEvent::Batch { .. } | TrainEvent::Epoch(_) if !stopped => {
                handle.stop.set();
                stopped = true;
            }
            TrainEvent::Batch { .. } => batches_after_stop += 1,
            _ => {}
        }
        last = Some(event);
    }
    assert!(handle.thread.join().unwrap().is_err());
    assert!(matches!(last, Some(TrainEvent::Cancelled { epochs_done }) if epochs_done < 1000));
    assert!(
        batches_after_stop <= 1,
        "{batches_after_stop} batch events after the stop"
    );
    assert_eq!(std::fs::read(&model).unwrap(), b"previous model");

    // A stop set before the first batch trains nothing and writes nothing.
    let handle = spawn_training(request(
        &report,
        &dir.path().join("new.ink"),
        &cache,
        settings,
    ));
    handle.stop.set();
    let events: Vec<_> = handle.events.iter().collect();
    assert!(matches!(
        events.last(),
        Some(TrainEvent::Cancelled { epochs_done: 0 })
    ));
    assert!(!dir.path().join("new.ink").exists());
}

#[test]
fn colour_images_train_and_inspect_in_colour() {
    let (dir, root, cache, report) = imported_demo(true);
    assert!(report.imported.iter().all(|i| i.mode == ColourMode::Colour));
    let model = dir.path().join("c.ink");
    let events = run_to_end(request(
        &report,
        &model,
        &cache,
        TrainingSettings {
            max_epochs: 3,
            ..TrainingSettings::default()
        },
    ));
    assert!(
        matches!(events.last(), Some(TrainEvent::Finished { .. })),
        "{:?}",
        events.last()
    );
    let inspector = Inspector::load(&model, &cpu_device().device).unwrap();
    assert_eq!(inspector.mode(), ColourMode::Colour);
    assert_eq!(
        inspector.header.autoencoder.as_ref().map(|a| a.channels),
        Some(3)
    );
    let (good, nok, _) = test_scores(&inspector, &root);
    assert!(good.iter().chain(&nok).all(|s| s.is_finite() && *s >= 0.0));
}

#[test]
fn a_corrupt_file_is_reported_by_name_and_the_rest_imported() {
    let dir = tempfile::tempdir().unwrap();
    let root = demo(&dir.path().join("demo"), false);
    let folder = root.join("train/good");
    std::fs::write(folder.join("broken.png"), b"\x89PNG\r\n\x1a\n not really").unwrap();
    std::fs::write(folder.join("empty.jpg"), b"").unwrap();
    std::fs::copy(
        folder.join("good_000.png"),
        folder.join("copy of good_000.png"),
    )
    .unwrap();
    let (files, _) = collect_image_files(std::slice::from_ref(&folder));
    let report = import_items(
        &items_with_role(files, ImageRole::TrainGood),
        &ImportOptions::default(),
        &|_, _| {},
        &StopFlag::new(),
    );
    assert_eq!(report.imported.len(), DemoSpec::tiny().n_train_good);
    assert_eq!(report.failures.len(), 2);
    assert!(
        report
            .failures
            .iter()
            .any(|f| f.reason.contains("broken.png"))
    );
    assert!(
        report
            .failures
            .iter()
            .any(|f| f.reason.contains("empty.jpg"))
    );
    assert_eq!(report.duplicates.len(), 1);
}

#[test]
fn corrupt_model_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.ink");
    std::fs::write(&bad, b"not a model at all").unwrap();
    let e = Inspector::load(&bad, &cpu_device().device).unwrap_err();
    assert!(e.to_string().contains("bad.ink"), "{e}");
}

#[test]
fn mvtec_layout_scan_finds_roles_kinds_and_masks() {
    let dir = tempfile::tempdir().unwrap();
    let root = demo(&dir.path().join("demo"), false);
    let layout = scan_mvtec(&root);
    let spec = DemoSpec::tiny();
    let count = |r| layout.items.iter().filter(|i| i.role == r).count();
    assert_eq!(count(ImageRole::TrainGood), spec.n_train_good);
    assert_eq!(count(ImageRole::TestGood), spec.n_test_good);
    let nok: Vec<_> = layout
        .items
        .iter()
        .filter(|i| i.role == ImageRole::TestNok)
        .collect();
    assert_eq!(nok.len(), 4 * spec.n_test_nok_per_kind);
    assert!(
        nok.iter()
            .all(|i| i.mask.as_ref().is_some_and(|m| m.is_file()))
    );
    assert!(nok.iter().all(|i| i.defect_kind.is_some()));
}

/// Runs the `inkspect` binary with a private cache folder; returns (stdout, stderr), asserting success.
fn inkspect(args: &[&str], cache: &Path) -> (String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inkspect"))
        .args(args)
        .env("INKSPECT_CACHE_DIR", cache)
        .env("INKSPECT_DEVICE", "cpu")
        .output()
        .expect("the inkspect binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "inkspect {args:?} failed:\n{stderr}");
    (stdout, stderr)
}

#[test]
fn command_line_demo_train_infer_eval_print_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let data = dir.path().join("data");
    let model = dir.path().join("m.ink");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    inkspect(&["demo", &s(&data), "--size", "64"], &cache);
    let (train_out, _) = inkspect(
        &[
            "train",
            "--data",
            &s(&data),
            "--model",
            &s(&model),
            "--size",
            "64",
            "--framework",
            "conv_autoencoder",
            "--epochs",
            "3",
        ],
        &cache,
    );
    let train: serde_json::Value = serde_json::from_str(train_out.trim()).unwrap();
    assert_eq!(train["epochs_run"], 3);
    assert!(model.is_file());

    let heatmaps = dir.path().join("heatmaps");
    let csv = dir.path().join("r.csv");
    let nok = data.join("test").join("particle");
    let (infer_out, _) = inkspect(
        &[
            "infer",
            "--model",
            &s(&model),
            &s(&nok),
            "--heatmaps",
            &s(&heatmaps),
            "--csv",
            &s(&csv),
        ],
        &cache,
    );
    let lines: Vec<serde_json::Value> = infer_out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // `inkspect demo` writes the default counts (at the size asked for).
    assert_eq!(
        lines.len(),
        DemoSpec::default().n_test_nok_per_kind,
        "{infer_out}"
    );
    for l in &lines {
        assert!(l["score"].is_number() && l["image"].is_string());
        let class = l["class"].as_str().unwrap();
        assert_eq!(l["class_id"], if class == "nok" { 1 } else { 0 });
        assert!(l["region"]["area_px"].is_number() && l["region"]["components"].is_array());
    }
    assert_eq!(std::fs::read_dir(&heatmaps).unwrap().count(), lines.len());
    assert_eq!(
        std::fs::read_to_string(&csv).unwrap().lines().count(),
        lines.len() + 1
    );

    let (eval_out, _) = inkspect(
        &["eval", "--model", &s(&model), "--data", &s(&data)],
        &cache,
    );
    let eval: serde_json::Value = serde_json::from_str(eval_out.trim()).unwrap();
    assert_eq!(eval["n_good"], DemoSpec::default().n_test_good);
    assert_eq!(eval["n_nok"], 4 * DemoSpec::default().n_test_nok_per_kind);
    assert!(eval["image_auroc"].is_number() && eval["pixel_auroc"].is_number());
    assert!(eval["thresholds"]["classification"].is_number());
    assert!(eval["confusion_matrix"]["true_nok"].is_number());
    let roc = eval["roc_curve"].as_array().unwrap();
    assert_eq!(roc.first().unwrap()[0], 0.0);
    assert_eq!(roc.last().unwrap()[1], 1.0);
    let hist = &eval["score_histogram"];
    let total: u64 = ["good", "nok"]
        .iter()
        .flat_map(|k| {
            hist[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
        })
        .sum();
    assert_eq!(
        total,
        4 * DemoSpec::default().n_test_nok_per_kind as u64 + DemoSpec::default().n_test_good as u64
    );
    assert!(eval["f1_best"]["f1"].is_number());
}
