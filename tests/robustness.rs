//! Nothing lost, nothing crashes: bad image files, damaged projects, models and checkpoints,
//! diverging and oversized trainings, two trainings of one model, and a training killed with
//! SIGKILL and resumed. Every bad file is generated here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use image::{GrayAlphaImage, GrayImage, ImageBuffer, Luma, Rgb, RgbImage, RgbaImage};
use inkspect::engine::StopFlag;
use inkspect::engine::dataset::decode::{ColourMode, MAX_IMAGE_PIXELS, decode_image};
use inkspect::engine::dataset::import::{
    ImageRole, ImportOptions, ImportReport, collect_image_files, import_items, items_with_role,
};
use inkspect::engine::dataset::prepare::{DatasetCache, DatasetSettings};
use inkspect::engine::demo::{DemoSpec, write_demo_dataset};
use inkspect::engine::device::cpu_device;
use inkspect::engine::model::{
    Checkpoint, Framework, ModelFile, autoencoder_spec_for, checkpoint_path, patch_memory_spec_for,
};
use inkspect::engine::project::{Project, ProjectError};
use inkspect::engine::training::{
    TrainError, TrainEvent, TrainRequest, TrainingSettings, estimate_fit_memory,
    estimate_training_memory, spawn_training, train,
};

// ---------------------------------------------------------------------------------------------
// Generated bad and unusual files

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG whose header claims `side x side` pixels but which holds almost no data.
fn png_bomb(side: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    out
}

fn encoded(img: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn grey(w: u32, h: u32, seed: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        Luma([((x * 7 + y * 13 + seed * 31) % 251) as u8])
    })
}

/// An 8-bit palette PNG (colour type 3).
fn palette_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]);
        let mut writer = enc.write_header().unwrap();
        let data: Vec<u8> = (0..w * h).map(|i| (i % 4) as u8).collect();
        writer.write_image_data(&data).unwrap();
    }
    out
}

/// A CMYK JPEG.
fn cmyk_jpeg(w: u16, h: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let data: Vec<u8> = (0..u32::from(w) * u32::from(h))
        .flat_map(|i| [(i % 200) as u8, 40, 90, 10])
        .collect();
    jpeg_encoder::Encoder::new(&mut out, 90)
        .encode(&data, w, h, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    out
}

/// A grey JPEG `w x h` whose EXIF orientation says "rotate 90° clockwise" (6).
fn rotated_jpeg(w: u16, h: u16) -> Vec<u8> {
    let mut exif = b"Exif\0\0II*\0\x08\0\0\0\x01\0".to_vec();
    exif.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0]);
    exif.extend_from_slice(&[0, 0, 0, 0]);
    let mut out = Vec::new();
    let data: Vec<u8> = (0..u32::from(w) * u32::from(h))
        .map(|i| (i % 256) as u8)
        .collect();
    let mut enc = jpeg_encoder::Encoder::new(&mut out, 90);
    enc.add_app_segment(1, &exif).unwrap();
    enc.encode(&data, w, h, jpeg_encoder::ColorType::Luma)
        .unwrap();
    out
}

/// Writes the folder of bad and unusual files; returns (bad file names, good file names).
fn write_bad_folder(dir: &Path) -> (Vec<&'static str>, Vec<&'static str>) {
    use image::ImageFormat::{Jpeg, Png, Tiff};
    std::fs::create_dir_all(dir).unwrap();
    let w = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    let g = image::DynamicImage::ImageLuma8(grey(48, 40, 1));
    let png = encoded(&g, Png);
    let jpg = encoded(&g, Jpeg);
    let tif = encoded(&g, Tiff);
    w(
        "text pretending.png",
        b"this is a text file, not an image\n",
    );
    w("zero bytes.jpg", b"");
    w("truncated.png", &png[..png.len() / 2]);
    w("truncated.jpg", &jpg[..jpg.len() / 3]);
    w("truncated.tif", &tif[..tif.len() / 2]);
    w("bomb.png", &png_bomb(200_000));
    // A folder whose name looks like an image is walked into, not read.
    std::fs::create_dir_all(dir.join("a folder.png")).unwrap();
    // Good but unusual.
    w("good.png", &png);
    w("zz copy of good.png", &png);
    let deep =
        ImageBuffer::<Luma<u16>, _>::from_fn(40, 40, |x, y| Luma([(x * 1500 + y * 7) as u16]));
    w(
        "sixteen bit.png",
        &encoded(&image::DynamicImage::ImageLuma16(deep), Png),
    );
    w("palette.png", &palette_png(40, 40));
    let rgba = RgbaImage::from_fn(40, 40, |x, y| {
        image::Rgba([x as u8 * 6, y as u8 * 6, 90, 128])
    });
    w(
        "alpha.png",
        &encoded(&image::DynamicImage::ImageRgba8(rgba), Png),
    );
    let ga = GrayAlphaImage::from_fn(40, 40, |x, _| image::LumaA([x as u8 * 6, 200]));
    w(
        "grey alpha.png",
        &encoded(&image::DynamicImage::ImageLumaA8(ga), Png),
    );
    w("cmyk.jpg", &cmyk_jpeg(40, 32));
    w("rotated.jpg", &rotated_jpeg(64, 40));
    w(
        "tiny.bmp",
        &encoded(
            &image::DynamicImage::ImageLuma8(grey(6, 5, 3)),
            image::ImageFormat::Bmp,
        ),
    );
    w(
        "ünïcödé – name 画像.tif",
        &encoded(&image::DynamicImage::ImageLuma8(grey(40, 40, 9)), Tiff),
    );
    (
        vec![
            "text pretending.png",
            "zero bytes.jpg",
            "truncated.png",
            "truncated.jpg",
            "truncated.tif",
            "bomb.png",
        ],
        vec![
            "good.png",
            "sixteen bit.png",
            "palette.png",
            "alpha.png",
            "grey alpha.png",
            "cmyk.jpg",
            "rotated.jpg",
            "tiny.bmp",
            "ünïcödé – name 画像.tif",
        ],
    )
}

fn import(files: Vec<PathBuf>, cache: &DatasetCache, size: u32) -> ImportReport {
    import_items(
        &items_with_role(files, ImageRole::TrainGood),
        &ImportOptions {
            prepare: Some((size, cache.clone())),
            known_hashes: Default::default(),
        },
        &|_, _| {},
        &StopFlag::new(),
    )
}

#[test]
fn every_bad_file_is_reported_by_name_and_every_unusual_good_one_imported() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("camera pc dump");
    let (bad, good) = write_bad_folder(&folder);
    let (files, walk_failures) = collect_image_files(std::slice::from_ref(&folder));
    assert!(walk_failures.is_empty(), "{walk_failures:?}");
    let cache = DatasetCache::in_dir(dir.path().join("cache"));
    let report = import(files, &cache, 32);
    let reasons: Vec<&str> = report.failures.iter().map(|f| f.reason.as_str()).collect();
    for name in &bad {
        assert!(
            reasons.iter().any(|r| r.contains(name)),
            "{name} is not reported by name: {reasons:?}"
        );
    }
    assert_eq!(report.failures.len(), bad.len(), "{reasons:?}");
    let bomb = reasons.iter().find(|r| r.contains("bomb.png")).unwrap();
    assert!(
        bomb.contains("too large") && bomb.contains(&MAX_IMAGE_PIXELS.to_string()),
        "{bomb}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("zero bytes.jpg") && r.contains("empty"))
    );
    let imported: Vec<String> = report
        .imported
        .iter()
        .map(|i| i.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for name in &good {
        assert!(
            imported.contains(&name.to_string()),
            "{name} not imported: {imported:?}"
        );
    }
    assert_eq!(report.duplicates.len(), 1, "the copy has the same content");
    let by_name = |n: &str| {
        report
            .imported
            .iter()
            .find(|i| i.path.ends_with(n))
            .unwrap()
    };
    assert_eq!(by_name("sixteen bit.png").mode, ColourMode::Mono);
    assert_eq!(by_name("grey alpha.png").mode, ColourMode::Mono);
    assert_eq!(by_name("palette.png").mode, ColourMode::Colour);
    assert_eq!(by_name("alpha.png").mode, ColourMode::Colour);
    assert_eq!(by_name("cmyk.jpg").mode, ColourMode::Colour);
    let rotated = by_name("rotated.jpg");
    assert_eq!(
        (rotated.width, rotated.height),
        (40, 64),
        "EXIF orientation applied"
    );
    assert_eq!(report.enlarged.len(), 1, "{:?}", report.enlarged);
    assert!(report.enlarged[0].ends_with("tiny.bmp"));
    // 16-bit data keeps its range when scaled to 8 bits.
    let deep = decode_image(&folder.join("sixteen bit.png")).unwrap();
    assert!(deep.pixels.iter().copied().max().unwrap() > 200);
}

#[test]
fn unreadable_files_are_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("locked.png");
    std::fs::write(
        &file,
        encoded(
            &image::DynamicImage::ImageLuma8(grey(16, 16, 2)),
            image::ImageFormat::Png,
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let report = import(vec![file.clone()], &DatasetCache::disabled(), 32);
    if std::fs::read(&file).is_ok() {
        // Running as root: permissions do not stop reading, so the file imports.
        eprintln!("running with privileges that ignore file permissions; checked the import only");
        assert_eq!(report.imported.len(), 1);
    } else {
        assert_eq!(report.failures.len(), 1);
        let r = &report.failures[0].reason;
        assert!(r.contains("locked.png") && r.contains("ermission"), "{r}");
    }
    // A folder given where a file is expected.
    let folder = dir.path().join("folder.png");
    std::fs::create_dir_all(&folder).unwrap();
    let report = import(vec![folder], &DatasetCache::disabled(), 32);
    assert!(
        report.failures[0].reason.contains("folder.png"),
        "{:?}",
        report.failures
    );
    // A path that vanished between listing and reading.
    let gone = dir.path().join("gone.png");
    let report = import(vec![gone], &DatasetCache::disabled(), 32);
    assert!(report.failures[0].reason.contains("gone.png"));
}

#[test]
fn a_folder_of_10000_files_imports_with_progress_and_cancels_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("many");
    std::fs::create_dir_all(&folder).unwrap();
    for i in 0..10_000u32 {
        let img = image::DynamicImage::ImageLuma8(grey(8, 8, i));
        std::fs::write(
            folder.join(format!("{i:05}.png")),
            encoded(&img, image::ImageFormat::Png),
        )
        .unwrap();
    }
    let (files, _) = collect_image_files(&[folder]);
    assert_eq!(files.len(), 10_000);
    let items = items_with_role(files, ImageRole::TrainGood);

    let calls = std::sync::atomic::AtomicUsize::new(0);
    let report = import_items(
        &items,
        &ImportOptions::default(),
        &|_, total| {
            assert_eq!(total, 10_000);
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        },
        &StopFlag::new(),
    );
    assert_eq!(calls.into_inner(), 10_000, "progress for every file");
    assert!(!report.cancelled);
    // Content differs only by seed modulo 251: the rest are reported as duplicates.
    assert_eq!(report.imported.len() + report.duplicates.len(), 10_000);

    let stop = StopFlag::new();
    let report = import_items(
        &items,
        &ImportOptions::default(),
        &|done, _| {
            if done >= 500 {
                stop.set();
            }
        },
        &stop,
    );
    assert!(report.cancelled);
    let handled = report.imported.len() + report.duplicates.len() + report.failures.len();
    assert!(
        handled < 1_000,
        "cancel stops within a few files per thread, not {handled}"
    );
}

#[test]
fn mono_images_in_a_colour_dataset_become_three_equal_channels() {
    let mode = ColourMode::for_dataset([ColourMode::Mono, ColourMode::Colour]);
    assert_eq!(mode, ColourMode::Colour);
    let g = inkspect::engine::dataset::decode::from_dynamic(image::DynamicImage::ImageLuma8(grey(
        20, 20, 4,
    )));
    let planar = g.resize_planar(16, mode);
    let plane = 16 * 16;
    assert_eq!(planar.len(), 3 * plane);
    assert_eq!(planar[..plane], planar[plane..2 * plane]);
    assert_eq!(planar[..plane], planar[2 * plane..]);
    // Colour images whose channels are all equal count as mono.
    let rgb = RgbImage::from_fn(10, 10, |x, _| Rgb([x as u8; 3]));
    let d = inkspect::engine::dataset::decode::from_dynamic(image::DynamicImage::ImageRgb8(rgb));
    assert_eq!(d.mode, ColourMode::Mono);
}

// ---------------------------------------------------------------------------------------------
// Projects and models

#[test]
fn a_damaged_project_is_a_clear_error_and_its_backup_opens() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("line 3 – dies.inkspect");
    let mut p = Project::new("first");
    p.save(&file).unwrap();
    p.name = "second".into();
    p.save(&file).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = Project::load(&file).unwrap_err();
    assert!(matches!(e, ProjectError::Invalid { .. }));
    assert!(e.to_string().contains("line 3 – dies.inkspect"), "{e}");
    let backup = Project::load(&dir.path().join("line 3 – dies.inkspect.bak")).unwrap();
    assert_eq!(backup.name, "first");
    std::fs::write(&file, b"").unwrap();
    assert!(matches!(
        Project::load(&file),
        Err(ProjectError::Invalid { .. })
    ));
    std::fs::write(&file, [0xff, 0xfe, 0x00, 0x01]).unwrap();
    assert!(matches!(
        Project::load(&file),
        Err(ProjectError::Invalid { .. })
    ));
    std::fs::write(&file, br#"{"format_version": 7}"#).unwrap();
    let e = Project::load(&file).unwrap_err();
    assert!(e.to_string().contains("update Inkspect"), "{e}");
    // Saving never leaves temporary files behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

/// A tiny trained model and its file bytes.
fn trained_model(dir: &Path) -> (PathBuf, Vec<u8>, TrainRequest) {
    let demo = dir.join("demo");
    write_demo_dataset(&demo, &DemoSpec::tiny()).unwrap();
    let cache = DatasetCache::in_dir(dir.join("cache"));
    let (files, _) = collect_image_files(&[demo.join("train/good")]);
    let report = import(files, &cache, 32);
    let model = dir.join("model.ink");
    let req = TrainRequest {
        framework: Framework::ConvAutoencoder,
        images: report.imported,
        dataset: DatasetSettings {
            image_size_px: 32,
            complexity: 5,
        },
        training: TrainingSettings {
            max_epochs: 2,
            ..Default::default()
        },
        model_path: model.clone(),
        cache,
        device: cpu_device(),
        resume: false,
        memory_budget_bytes: None,
    };
    let (tx, _rx) = std::sync::mpsc::sync_channel(10_000);
    train(req.clone(), &tx, &StopFlag::new()).unwrap();
    let bytes = std::fs::read(&model).unwrap();
    (model, bytes, req)
}

#[test]
fn damaged_model_files_are_clear_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (model, autoencoder_bytes, req) = trained_model(dir.path());
    let device = cpu_device().device;
    assert!(ModelFile::load(&model, &device).is_ok());
    // The same damage to a patch memory model (another network section in the same container).
    let patch_memory = dir.path().join("pm.ink");
    let pm_req = TrainRequest {
        framework: Framework::PatchMemory,
        model_path: patch_memory.clone(),
        ..req
    };
    let (tx, _rx) = std::sync::mpsc::sync_channel(10_000);
    train(pm_req, &tx, &StopFlag::new()).unwrap();
    assert!(ModelFile::load(&patch_memory, &device).is_ok());
    let pm_bytes = std::fs::read(&patch_memory).unwrap();
    let bad = dir.path().join("bad.ink");
    for bytes in [autoencoder_bytes, pm_bytes] {
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("truncated", bytes[..bytes.len() / 2].to_vec()),
            ("one byte short", bytes[..bytes.len() - 1].to_vec()),
            ("not a model", b"PK\x03\x04 a zip file".to_vec()),
        ];
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 0x40;
        cases.push(("one bit flipped", flipped));
        let mut newer = bytes.clone();
        newer[16..20].copy_from_slice(&99u32.to_le_bytes());
        cases.push(("newer version", newer));
        for (what, data) in cases {
            std::fs::write(&bad, &data).unwrap();
            let e = ModelFile::load(&bad, &device).expect_err(what);
            assert!(e.to_string().contains("bad.ink"), "{what}: {e}");
        }
        std::fs::write(&bad, {
            let mut b = bytes.clone();
            b[16..20].copy_from_slice(&99u32.to_le_bytes());
            b
        })
        .unwrap();
        assert!(
            ModelFile::load(&bad, &device)
                .unwrap_err()
                .to_string()
                .contains("update Inkspect")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Training

fn run(
    req: TrainRequest,
    stop_after_epoch: Option<u32>,
) -> (Result<(), TrainError>, Vec<TrainEvent>) {
    let handle = spawn_training(req);
    let mut events = Vec::new();
    for e in handle.events.iter() {
        if let (TrainEvent::Epoch(r), Some(n)) = (&e, stop_after_epoch)
            && r.epoch >= n
        {
            handle.stop.set();
        }
        events.push(e);
    }
    (handle.thread.join().unwrap().map(|_| ()), events)
}

#[test]
fn an_interrupted_training_resumes_to_the_same_result_and_mismatches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, base) = trained_model(dir.path());
    let straight = TrainRequest {
        model_path: dir.path().join("straight.ink"),
        training: TrainingSettings {
            max_epochs: 3,
            ..base.training
        },
        ..base.clone()
    };
    let (r, _) = run(straight.clone(), None);
    r.unwrap();
    assert!(
        !checkpoint_path(&straight.model_path).exists(),
        "removed once the model is written"
    );
    let straight_header = ModelFile::read_header(&straight.model_path).unwrap();

    let interrupted = TrainRequest {
        model_path: dir.path().join("resumed.ink"),
        ..straight.clone()
    };
    let ckpt = checkpoint_path(&interrupted.model_path);
    let (r, _) = run(interrupted.clone(), Some(1));
    assert!(
        matches!(r, Err(TrainError::Cancelled { epochs_done: 1 })),
        "{r:?}"
    );
    assert!(
        !interrupted.model_path.exists(),
        "no model from a cancelled run"
    );
    assert_eq!(Checkpoint::read_header(&ckpt).unwrap().epochs_done, 1);

    // Another network shape or other images: refused, checkpoint kept.
    let other_shape = TrainRequest {
        resume: true,
        dataset: DatasetSettings {
            complexity: 9,
            ..interrupted.dataset
        },
        ..interrupted.clone()
    };
    let (r, _) = run(other_shape, None);
    assert!(
        matches!(r, Err(TrainError::CheckpointMismatch { .. })),
        "{r:?}"
    );
    let mut fewer = interrupted.clone();
    fewer.resume = true;
    fewer.images.pop();
    let (r, _) = run(fewer, None);
    let e = r.unwrap_err();
    assert!(e.to_string().contains("training images changed"), "{e}");

    let (r, events) = run(
        TrainRequest {
            resume: true,
            ..interrupted.clone()
        },
        None,
    );
    r.unwrap();
    let epochs: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Epoch(r) => Some(r.epoch),
            _ => None,
        })
        .collect();
    assert_eq!(epochs, vec![2, 3], "only the missing epochs run");
    let resumed = ModelFile::read_header(&interrupted.model_path).unwrap();
    assert_eq!(resumed.training.history.len(), 3);
    for (a, b) in straight_header
        .training
        .history
        .iter()
        .zip(&resumed.training.history)
    {
        let rel = (a.train_loss - b.train_loss).abs() / a.train_loss;
        assert!(
            rel < 1e-3,
            "epoch {}: {} vs {}",
            a.epoch,
            a.train_loss,
            b.train_loss
        );
    }
    assert!(!ckpt.exists());
    let (r, _) = run(
        TrainRequest {
            resume: true,
            ..interrupted.clone()
        },
        None,
    );
    assert!(matches!(r, Err(TrainError::NoCheckpoint { .. })), "{r:?}");
    // A damaged checkpoint is a clear error.
    std::fs::write(&ckpt, b"INKSPECT-CHECKPT garbage").unwrap();
    let (r, _) = run(
        TrainRequest {
            resume: true,
            ..interrupted
        },
        None,
    );
    let e = r.unwrap_err();
    assert!(e.to_string().contains("resumed.ink.checkpoint"), "{e}");
}

#[test]
fn diverging_oversized_and_concurrent_trainings_are_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let (model, bytes, base) = trained_model(dir.path());

    let diverging = TrainRequest {
        training: TrainingSettings {
            learning_rate: 1e30,
            max_epochs: 5,
            ..base.training
        },
        ..base.clone()
    };
    let (r, events) = run(diverging, None);
    let e = r.unwrap_err();
    assert!(matches!(e, TrainError::Diverged { .. }), "{e}");
    assert!(e.to_string().contains("lower the learning rate"), "{e}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TrainEvent::Failed { .. }))
    );
    assert_eq!(
        std::fs::read(&model).unwrap(),
        bytes,
        "the previous model is untouched"
    );

    let oversized = TrainRequest {
        memory_budget_bytes: Some(64 * 1024 * 1024),
        ..base.clone()
    };
    let (r, _) = run(oversized, None);
    let e = r.unwrap_err();
    assert!(matches!(e, TrainError::NotEnoughMemory { .. }), "{e}");
    assert!(
        e.to_string().contains("GiB") && e.to_string().contains("lower"),
        "{e}"
    );

    // While one training runs, a second one of the same model is refused.
    let long = TrainRequest {
        training: TrainingSettings {
            max_epochs: 500,
            ..base.training
        },
        ..base.clone()
    };
    let first = spawn_training(long.clone());
    loop {
        match first.events.recv_timeout(Duration::from_secs(60)).unwrap() {
            TrainEvent::Started { .. } => break,
            TrainEvent::Preparing { .. } | TrainEvent::Warning { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let (r, _) = run(long.clone(), None);
    let e = r.unwrap_err();
    assert!(matches!(e, TrainError::Busy { .. }), "{e}");
    assert!(e.to_string().contains("model.ink"), "{e}");
    first.stop.set();
    assert!(matches!(
        first.thread.join().unwrap(),
        Err(TrainError::Cancelled { .. })
    ));
    assert_eq!(std::fs::read(&model).unwrap(), bytes);
}

#[test]
fn the_memory_estimate_grows_with_size_batch_and_images() {
    let spec = autoencoder_spec_for(20, 1);
    let base = estimate_training_memory(&spec, 320, 8, 400);
    assert!(estimate_training_memory(&spec, 640, 8, 400).total_bytes > 3 * base.total_bytes / 2);
    assert!(
        estimate_training_memory(&spec, 320, 16, 400).activations_bytes > base.activations_bytes
    );
    assert!(estimate_training_memory(&spec, 320, 8, 4000).images_bytes == 10 * base.images_bytes);
    assert!(base.total_bytes < 2 * 1024 * 1024 * 1024, "{base:?}");
    // The patch memory's fit: more images and a larger memory need more.
    let pm = patch_memory_spec_for(20, 1);
    let fit = estimate_fit_memory(&pm, 320, 8, 400);
    assert!(estimate_fit_memory(&pm, 320, 8, 4000).images_bytes == 10 * fit.images_bytes);
    assert!(
        estimate_fit_memory(&patch_memory_spec_for(100, 1), 320, 8, 400).parameters_bytes
            > fit.parameters_bytes
    );
    assert!(fit.total_bytes < 2 * 1024 * 1024 * 1024, "{fit:?}");
}

/// `kill -9` of a command-line training: the project and the previous model survive, the lock
/// does not block the next run, and `--resume` finishes from the last checkpoint.
#[test]
fn a_training_killed_with_sigkill_leaves_everything_intact_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _, base) = trained_model(dir.path());
    let project_file = dir.path().join("dies.inkspect");
    let mut project = Project::new("dies");
    project.framework = Framework::ConvAutoencoder;
    project.images = base.images.clone();
    project.dataset = base.dataset;
    project.training.max_epochs = 400;
    project.model_path = Some(model.clone());
    project.save(&project_file).unwrap();
    let project_bytes = std::fs::read(&project_file).unwrap();
    let model_bytes = std::fs::read(&model).unwrap();
    let ckpt = checkpoint_path(&model);
    let inkspect = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_inkspect"));
        c.args(args)
            .env("INKSPECT_CACHE_DIR", dir.path().join("cache"))
            .env("INKSPECT_DEVICE", "cpu")
            .stdin(Stdio::null());
        c
    };
    let project_arg = project_file.to_str().unwrap();
    let mut child = inkspect(&["train", "--project", project_arg])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let epochs_before_kill = loop {
        if let Ok(h) = Checkpoint::read_header(&ckpt)
            && h.epochs_done >= 2
        {
            break h.epochs_done;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the training ended early"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Mid-epoch, then SIGKILL.
    std::thread::sleep(Duration::from_millis(150));
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());

    assert_eq!(
        std::fs::read(&project_file).unwrap(),
        project_bytes,
        "project untouched"
    );
    assert_eq!(
        std::fs::read(&model).unwrap(),
        model_bytes,
        "previous model untouched"
    );
    let reopened = Project::load(&project_file).unwrap();
    assert_eq!(reopened.images.len(), base.images.len());
    assert!(ModelFile::load(&model, &cpu_device().device).is_ok());
    let ckpt_epochs = Checkpoint::read_header(&ckpt).unwrap().epochs_done;
    assert!(ckpt_epochs >= epochs_before_kill);

    let target = (ckpt_epochs + 1).to_string();
    let out = inkspect(&[
        "train",
        "--project",
        project_arg,
        "--resume",
        "--epochs",
        &target,
    ])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming"), "{stderr}");
    let header = ModelFile::read_header(&model).unwrap();
    assert_eq!(header.training.history.len() as u32, ckpt_epochs + 1);
    assert!(!ckpt.exists());
    let mut lock = model.as_os_str().to_owned();
    lock.push(".lock");
    assert!(
        !Path::new(&lock).exists(),
        "the lock file is removed after a clean run"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(summary["epochs_run"], ckpt_epochs + 1);
    let _ = std::io::stderr().flush();
}
