//! Finding image files (single files, folders, the MVTec AD layout) and importing them: each file is
//! read once, hashed, decoded to check it, and (optionally) downscaled into the prepared-image cache.
//! A bad file is reported by name and skipped; it never aborts the import.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::decode::{ColourMode, DecodeError, decode_image_bytes, has_image_extension};
use super::prepare::{DatasetCache, content_hash};
use crate::engine::StopFlag;

/// What an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageRole {
    /// A good image used for training (and, split off, validation).
    TrainGood,
    /// A good image kept for testing.
    TestGood,
    /// A defective (not ok) image kept for testing.
    TestNok,
}

impl ImageRole {
    /// Short human label ("train good", "test good", "test nok").
    pub fn label(self) -> &'static str {
        match self {
            ImageRole::TrainGood => "train good",
            ImageRole::TestGood => "test good",
            ImageRole::TestNok => "test nok",
        }
    }
}

/// A file to import with its role, defect kind and optional ground-truth mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportItem {
    /// The image file.
    pub path: PathBuf,
    /// Its role.
    pub role: ImageRole,
    /// Defect kind for nok images (the MVTec folder name), if known.
    pub defect_kind: Option<String>,
    /// Ground-truth mask (white = defect), if any.
    pub mask: Option<PathBuf>,
}

/// A successfully imported image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedImage {
    /// The image file.
    pub path: PathBuf,
    /// Its role.
    pub role: ImageRole,
    /// Defect kind for nok images, if known.
    #[serde(default)]
    pub defect_kind: Option<String>,
    /// Ground-truth mask, if any.
    #[serde(default)]
    pub mask: Option<PathBuf>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Mono or colour.
    pub mode: ColourMode,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Content hash of the file bytes (xxh3-128, hex).
    pub content_hash: String,
}

/// A file that could not be imported, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportFailure {
    /// The file (or folder).
    pub path: PathBuf,
    /// Human-readable reason, naming the file.
    pub reason: String,
}

/// Outcome of an import.
#[derive(Debug, Clone, Default)]
pub struct ImportReport {
    /// Images imported, in the order of the input list.
    pub imported: Vec<ImportedImage>,
    /// Files skipped, with reasons.
    pub failures: Vec<ImportFailure>,
    /// Files skipped because an identical file (same content hash) was already imported.
    pub duplicates: Vec<PathBuf>,
    /// Whether the import was cancelled before all files were processed.
    pub cancelled: bool,
    /// Imported images with a side shorter than the training size (only known when the import
    /// prepares images): they are enlarged for training and lose sharpness, so they are listed.
    pub enlarged: Vec<PathBuf>,
}

/// Lists the image files under `paths`: files are taken as they are (if they have an image
/// extension), folders are walked recursively. Sorted by path within each folder. Paths that do
/// not exist are reported.
pub fn collect_image_files(paths: &[PathBuf]) -> (Vec<PathBuf>, Vec<ImportFailure>) {
    let mut files = Vec::new();
    let mut failures = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = Vec::new();
            for entry in walkdir::WalkDir::new(path).follow_links(true) {
                match entry {
                    Ok(e) if e.file_type().is_file() && has_image_extension(e.path()) => {
                        found.push(e.into_path())
                    }
                    Ok(_) => {}
                    Err(err) => failures.push(ImportFailure {
                        path: err.path().unwrap_or(path).to_path_buf(),
                        reason: format!(
                            "{}: cannot read folder entry: {err}",
                            err.path().unwrap_or(path).display()
                        ),
                    }),
                }
            }
            found.sort();
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            failures.push(ImportFailure {
                path: path.clone(),
                reason: format!("{}: no such file or folder", path.display()),
            });
        }
    }
    (files, failures)
}

/// Images of a folder in the MVTec AD layout: `train/good`, `test/good`, `test/<defect kind>`,
/// `ground_truth/<defect kind>/<stem>_mask.png`.
#[derive(Debug, Clone, Default)]
pub struct MvtecLayout {
    /// Every image with its role, defect kind and mask.
    pub items: Vec<ImportItem>,
}

/// Whether `root` looks like an MVTec AD category folder (has `train/good` or `test`).
pub fn is_mvtec_layout(root: &Path) -> bool {
    root.join("train").join("good").is_dir() || root.join("test").join("good").is_dir()
}

/// Scans an MVTec AD category folder. Missing parts (no test folder, no masks) are fine.
pub fn scan_mvtec(root: &Path) -> MvtecLayout {
    let mut items = Vec::new();
    let list = |dir: &Path| -> Vec<PathBuf> {
        let (files, _) = collect_image_files(&[dir.to_path_buf()]);
        files
    };
    let train_good = root.join("train").join("good");
    if train_good.is_dir() {
        items.extend(list(&train_good).into_iter().map(|path| ImportItem {
            path,
            role: ImageRole::TrainGood,
            defect_kind: None,
            mask: None,
        }));
    }
    let test = root.join("test");
    if let Ok(entries) = std::fs::read_dir(&test) {
        let mut kinds: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        kinds.sort();
        for kind_dir in kinds {
            let kind = kind_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let good = kind == "good";
            for path in list(&kind_dir) {
                let mask = if good {
                    None
                } else {
                    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                    stem.map(|s| {
                        root.join("ground_truth")
                            .join(&kind)
                            .join(format!("{s}_mask.png"))
                    })
                    .filter(|m| m.is_file())
                };
                items.push(ImportItem {
                    path,
                    role: if good {
                        ImageRole::TestGood
                    } else {
                        ImageRole::TestNok
                    },
                    defect_kind: (!good).then(|| kind.clone()),
                    mask,
                });
            }
        }
    }
    MvtecLayout { items }
}

/// Settings of one import run.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// When set, each image is also downscaled to this size and stored in the cache, so that the
    /// first training does not decode it again.
    pub prepare: Option<(u32, DatasetCache)>,
    /// Content hashes already in the project: files with these hashes are reported as duplicates.
    pub known_hashes: std::collections::HashSet<String>,
}

/// Imports `items` in parallel (reading, hashing and decoding each file once). `progress` is called
/// with (files done, files total) from worker threads; `stop` cancels between files.
pub fn import_items(
    items: &[ImportItem],
    options: &ImportOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
    stop: &StopFlag,
) -> ImportReport {
    let done = AtomicUsize::new(0);
    let total = items.len();
    let results: Vec<Option<Result<ImportedImage, ImportFailure>>> = items
        .par_iter()
        .map(|item| {
            if stop.is_set() {
                return None;
            }
            let result = import_one(item, options);
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            progress(n, total);
            Some(result)
        })
        .collect();
    let mut report = ImportReport::default();
    let mut seen = options.known_hashes.clone();
    for result in results {
        match result {
            None => report.cancelled = true,
            Some(Ok(image)) => {
                if let Some((size, _)) = &options.prepare
                    && image.width.min(image.height) < *size
                {
                    report.enlarged.push(image.path.clone());
                }
                if seen.insert(image.content_hash.clone()) {
                    report.imported.push(image);
                } else {
                    report.duplicates.push(image.path);
                }
            }
            Some(Err(failure)) => report.failures.push(failure),
        }
    }
    report
}

fn import_one(item: &ImportItem, options: &ImportOptions) -> Result<ImportedImage, ImportFailure> {
    let fail = |e: DecodeError| ImportFailure {
        path: item.path.clone(),
        reason: e.to_string(),
    };
    let bytes = std::fs::read(&item.path).map_err(|source| {
        fail(DecodeError::Io {
            path: item.path.clone(),
            source,
        })
    })?;
    let hash = content_hash(&bytes);
    let decoded = decode_image_bytes(&bytes, &item.path).map_err(fail)?;
    if let Some((size, cache)) = &options.prepare {
        // The cache is an optimisation: failing to write it is not an import failure.
        cache.store_from_decoded(&hash, *size, decoded.mode, &decoded);
    }
    Ok(ImportedImage {
        path: item.path.clone(),
        role: item.role,
        defect_kind: item.defect_kind.clone(),
        mask: item.mask.clone(),
        width: decoded.width,
        height: decoded.height,
        mode: decoded.mode,
        file_bytes: bytes.len() as u64,
        content_hash: hash,
    })
}

/// Convenience: the items for plain files or folders, all with one role.
pub fn items_with_role(files: Vec<PathBuf>, role: ImageRole) -> Vec<ImportItem> {
    files
        .into_iter()
        .map(|path| ImportItem {
            path,
            role,
            defect_kind: None,
            mask: None,
        })
        .collect()
}
