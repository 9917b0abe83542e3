//! Dataset preparation: images downscaled to the training size, kept in a compact on-disk cache of
//! 8-bit planar pixels keyed by content hash, and a deterministic train/validation split.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::decode::{ColourMode, DecodeError, DecodedImage, decode_image_bytes};
use crate::engine::StopFlag;

/// Default training image size in pixels (square side).
pub const DEFAULT_IMAGE_SIZE_PX: u32 = 320;
/// Default complexity index.
pub const DEFAULT_COMPLEXITY: u32 = 20;
/// Smallest and largest complexity index.
pub const COMPLEXITY_RANGE: std::ops::RangeInclusive<u32> = 1..=100;
/// Smallest and largest training image size in pixels.
pub const IMAGE_SIZE_RANGE_PX: std::ops::RangeInclusive<u32> = 32..=1024;
/// Fraction of the good images held out for validation.
pub const VALIDATION_FRACTION: f64 = 0.1;

/// How images are prepared for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DatasetSettings {
    /// Side of the square training image in pixels. Rounded to a multiple of 16 by
    /// [`DatasetSettings::effective_size_px`] because the models halve it four times.
    pub image_size_px: u32,
    /// Model capacity, 1 (smallest) to 100 (largest); see `model::widths_for_complexity`.
    pub complexity: u32,
}

impl Default for DatasetSettings {
    fn default() -> Self {
        Self {
            image_size_px: DEFAULT_IMAGE_SIZE_PX,
            complexity: DEFAULT_COMPLEXITY,
        }
    }
}

impl DatasetSettings {
    /// The size actually used: clamped to [`IMAGE_SIZE_RANGE_PX`] and rounded to the nearest
    /// multiple of 16.
    pub fn effective_size_px(&self) -> u32 {
        let clamped = self
            .image_size_px
            .clamp(*IMAGE_SIZE_RANGE_PX.start(), *IMAGE_SIZE_RANGE_PX.end());
        ((clamped + 8) / 16 * 16).max(32)
    }

    /// The complexity actually used, clamped to [`COMPLEXITY_RANGE`].
    pub fn effective_complexity(&self) -> u32 {
        self.complexity
            .clamp(*COMPLEXITY_RANGE.start(), *COMPLEXITY_RANGE.end())
    }
}

/// Content hash of file bytes: xxh3-128 as 32 hex digits.
pub fn content_hash(bytes: &[u8]) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))
}

/// An image prepared for the model: `size x size`, 8-bit, planar `[channels, size, size]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedImage {
    /// Side in pixels.
    pub size_px: u32,
    /// Mono or colour.
    pub mode: ColourMode,
    /// Pixels, planar `[channels, size, size]`.
    pub pixels: Vec<u8>,
}

impl PreparedImage {
    /// Prepares a decoded image for the model.
    pub fn from_decoded(image: &DecodedImage, size_px: u32, mode: ColourMode) -> Self {
        Self {
            size_px,
            mode,
            pixels: image.resize_planar(size_px, mode),
        }
    }
}

/// Version of the downscaling in [`DecodedImage::resized`]; part of every cache entry's name, so
/// that a changed resampler never mixes with entries made by an older one.
const RESAMPLER_VERSION: u32 = 2;

/// The on-disk cache of prepared images. A missing or unwritable cache only costs time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetCache {
    dir: Option<PathBuf>,
}

impl Default for DatasetCache {
    /// `$INKSPECT_CACHE_DIR`, else `$XDG_CACHE_HOME/inkspect/prepared`, else
    /// `~/.cache/inkspect/prepared`.
    fn default() -> Self {
        let dir = std::env::var_os("INKSPECT_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME")
                    .map(|d| PathBuf::from(d).join("inkspect").join("prepared"))
            })
            .or_else(|| {
                std::env::var_os("HOME").map(|h| {
                    PathBuf::from(h)
                        .join(".cache")
                        .join("inkspect")
                        .join("prepared")
                })
            });
        Self { dir }
    }
}

impl DatasetCache {
    /// A cache in `dir`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: Some(dir.into()),
        }
    }

    /// A cache that stores nothing.
    pub fn disabled() -> Self {
        Self { dir: None }
    }

    /// The folder, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn entry_path(&self, hash: &str, size_px: u32, mode: ColourMode) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| {
            d.join(format!(
                "{hash}-{size_px}-{}-{RESAMPLER_VERSION}.u8",
                mode.channels()
            ))
        })
    }

    /// The cached pixels for this content hash, size and mode, if present and intact.
    pub fn load(&self, hash: &str, size_px: u32, mode: ColourMode) -> Option<PreparedImage> {
        let path = self.entry_path(hash, size_px, mode)?;
        let pixels = std::fs::read(path).ok()?;
        (pixels.len() == mode.channels() * (size_px * size_px) as usize).then_some(PreparedImage {
            size_px,
            mode,
            pixels,
        })
    }

    /// Stores a prepared image (atomically: temporary file, then rename). Errors are logged and
    /// ignored.
    pub fn store(&self, hash: &str, image: &PreparedImage) {
        let Some(path) = self.entry_path(hash, image.size_px, image.mode) else {
            return;
        };
        if path.exists() {
            return;
        }
        // A torn entry (power loss) has the wrong length and is ignored by `load`.
        if let Err(e) = crate::engine::atomic_write_unsynced(&path, &image.pixels) {
            log::warn!("cannot write cache entry {}: {e}", path.display());
        }
    }

    /// Prepares and stores a decoded image unless it is cached already.
    pub fn store_from_decoded(
        &self,
        hash: &str,
        size_px: u32,
        mode: ColourMode,
        image: &DecodedImage,
    ) {
        if let Some(path) = self.entry_path(hash, size_px, mode)
            && !path.exists()
        {
            self.store(hash, &PreparedImage::from_decoded(image, size_px, mode));
        }
    }
}

/// Loads one image prepared at `size_px` in `mode`, from the cache when possible, else by decoding
/// the file (and filling the cache).
pub fn prepare_file(
    path: &Path,
    size_px: u32,
    mode: ColourMode,
    cache: &DatasetCache,
) -> Result<PreparedImage, DecodeError> {
    let bytes = std::fs::read(path).map_err(|source| DecodeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let hash = content_hash(&bytes);
    if let Some(hit) = cache.load(&hash, size_px, mode) {
        return Ok(hit);
    }
    let decoded = decode_image_bytes(&bytes, path)?;
    let prepared = PreparedImage::from_decoded(&decoded, size_px, mode);
    cache.store(&hash, &prepared);
    Ok(prepared)
}

/// Prepares many files in parallel. Returns, in input order, each file's result; `None` for files
/// skipped because `stop` was set. `progress` gets (done, total).
pub fn prepare_files(
    paths: &[PathBuf],
    size_px: u32,
    mode: ColourMode,
    cache: &DatasetCache,
    progress: &(dyn Fn(usize, usize) + Sync),
    stop: &StopFlag,
) -> Vec<Option<Result<PreparedImage, DecodeError>>> {
    let done = AtomicUsize::new(0);
    paths
        .par_iter()
        .map(|path| {
            if stop.is_set() {
                return None;
            }
            let r = prepare_file(path, size_px, mode, cache);
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, paths.len());
            Some(r)
        })
        .collect()
}

/// A split of `n` good images into training and validation indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Indices of training images, ascending.
    pub train: Vec<usize>,
    /// Indices of validation images, ascending.
    pub validation: Vec<usize>,
}

/// Deterministic split: each image's key (its content hash) is hashed with `seed`, and the
/// [`VALIDATION_FRACTION`] of images with the smallest hashes (at least 1 when there are 4 or more
/// images, else none) go to validation. The same images and seed give the same split whatever
/// their order, and adding images moves few others.
pub fn split_train_validation(keys: &[String], seed: u64) -> Split {
    let n = keys.len();
    let n_val = if n >= 4 {
        ((n as f64 * VALIDATION_FRACTION).round() as usize).max(1)
    } else {
        0
    };
    let mut order: Vec<(u64, usize)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (xxhash_rust::xxh3::xxh3_64_with_seed(k.as_bytes(), seed), i))
        .collect();
    order.sort_unstable();
    let mut validation: Vec<usize> = order[..n_val].iter().map(|&(_, i)| i).collect();
    let mut train: Vec<usize> = order[n_val..].iter().map(|&(_, i)| i).collect();
    validation.sort_unstable();
    train.sort_unstable();
    Split { train, validation }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_order_independent_and_about_ten_percent() {
        let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
        let a = split_train_validation(&keys, 1);
        assert_eq!(a.validation.len(), 5);
        assert_eq!(a.train.len(), 45);
        let mut reversed = keys.clone();
        reversed.reverse();
        let b = split_train_validation(&reversed, 1);
        let names = |s: &Split, k: &[String]| {
            let mut v: Vec<String> = s.validation.iter().map(|&i| k[i].clone()).collect();
            v.sort();
            v
        };
        assert_eq!(names(&a, &keys), names(&b, &reversed));
        assert_ne!(split_train_validation(&keys, 2).validation, a.validation);
        assert!(split_train_validation(&keys[..3], 1).validation.is_empty());
    }

    #[test]
    fn effective_size_is_a_multiple_of_16_in_range() {
        let s = |px| {
            DatasetSettings {
                image_size_px: px,
                complexity: 20,
            }
            .effective_size_px()
        };
        assert_eq!(s(320), 320);
        assert_eq!(s(300), 304);
        assert_eq!(s(1), 32);
        assert_eq!(s(5000), 1024);
    }

    #[test]
    fn cache_round_trips_and_rejects_wrong_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DatasetCache::in_dir(dir.path());
        let img = PreparedImage {
            size_px: 4,
            mode: ColourMode::Mono,
            pixels: (0..16).collect(),
        };
        cache.store("abc", &img);
        assert_eq!(cache.load("abc", 4, ColourMode::Mono), Some(img));
        assert_eq!(cache.load("abc", 4, ColourMode::Colour), None);
        std::fs::write(dir.path().join("bad-4-1.u8"), [1, 2, 3]).unwrap();
        assert_eq!(cache.load("bad", 4, ColourMode::Mono), None);
    }
}
