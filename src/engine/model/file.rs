//! The model file (`.ink`): one self-describing file holding the framework, its shape, the dataset
//! settings it was trained with, the suggested thresholds, a training summary and the weights.
//!
//! Layout: 16-byte magic `INKSPECT-MODEL\0\0`, `u32` format version, `u64` header length, header
//! (JSON), `u64` weights length, weights (burnpack), `u64` xxh3-64 checksum of everything before
//! it. All integers little-endian. Written atomically.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::prelude::Device;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;
use serde::{Deserialize, Serialize};

use super::{AutoencoderSpec, ConvAutoencoder, Framework};
use crate::engine::dataset::decode::ColourMode;
use crate::engine::inference::Thresholds;
use crate::engine::training::TrainingSummary;

const MAGIC: &[u8; 16] = b"INKSPECT-MODEL\0\0";

/// Version of the model file layout written by this build.
pub const MODEL_FORMAT_VERSION: u32 = 1;

/// Everything in a model file except the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelHeader {
    /// Model type.
    pub framework: Framework,
    /// Shape of the autoencoder.
    pub autoencoder: AutoencoderSpec,
    /// Colour mode the model works in.
    pub mode: ColourMode,
    /// Side of the square model input in pixels.
    pub image_size_px: u32,
    /// Complexity index it was built with.
    pub complexity: u32,
    /// Thresholds suggested from the validation good images.
    pub suggested_thresholds: Thresholds,
    /// Anomaly scores of the validation good images (for threshold tools and histograms).
    pub validation_scores: Vec<f32>,
    /// Per-pixel error statistics of the training images that anomaly maps are relative to.
    #[serde(default)]
    pub error_stats: Option<crate::engine::inference::ErrorStats>,
    /// How training went.
    pub training: TrainingSummary,
    /// Version of Inkspect that wrote the file.
    pub inkspect_version: String,
}

/// A model loaded from, or ready to be written to, a model file.
#[derive(Debug)]
pub struct ModelFile {
    /// Description and settings.
    pub header: ModelHeader,
    /// The trained network.
    pub network: ConvAutoencoder,
}

/// Why a model file could not be read or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// Not an Inkspect model file.
    #[error("{path}: not an Inkspect model file")]
    NotAModel {
        /// The file.
        path: PathBuf,
    },
    /// Written by a newer Inkspect.
    #[error(
        "{path}: model format version {found} is newer than this Inkspect supports ({MODEL_FORMAT_VERSION}); update Inkspect"
    )]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
    },
    /// Truncated or damaged.
    #[error("{path}: model file is damaged ({reason}); train the model again")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ModelFile {
    /// Writes the model file atomically (a crash leaves the previous file intact).
    pub fn save(&self, path: &Path) -> Result<(), ModelFileError> {
        let corrupt = |reason: String| ModelFileError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let header = serde_json::to_vec_pretty(&self.header).map_err(|e| corrupt(e.to_string()))?;
        let weights = self
            .network
            .clone()
            .into_record()
            .into_bytes()
            .map_err(|e| corrupt(e.to_string()))?;
        let mut out = Vec::with_capacity(header.len() + weights.len() + 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&MODEL_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&(weights.len() as u64).to_le_bytes());
        out.extend_from_slice(&weights);
        let checksum = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        crate::engine::atomic_write(path, &out).map_err(|source| ModelFileError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads only the header (fast; no weights are loaded).
    pub fn read_header(path: &Path) -> Result<ModelHeader, ModelFileError> {
        let bytes = read(path)?;
        Ok(parse(&bytes, path)?.0)
    }

    /// Loads a model file onto `device` (inference device; call on an autodiff device to keep
    /// training).
    pub fn load(path: &Path, device: &Device) -> Result<ModelFile, ModelFileError> {
        let bytes = read(path)?;
        let (header, weights) = parse(&bytes, path)?;
        let corrupt = |reason: String| ModelFileError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if header.autoencoder.widths.is_empty()
            || header.autoencoder.widths.len() > 8
            || header
                .autoencoder
                .widths
                .iter()
                .any(|&w| w == 0 || w > 4096)
            || !(1..=4).contains(&header.autoencoder.channels)
            || header.autoencoder.latent_channels == 0
            || header.autoencoder.latent_channels > 4096
        {
            return Err(corrupt("impossible network shape in header".into()));
        }
        let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(weights.to_vec()))
            .map_err(|e| corrupt(e.to_string()))?;
        let network = header
            .autoencoder
            .init(device)
            .try_load_record(record)
            .map_err(|e| corrupt(e.to_string()))?;
        Ok(ModelFile { header, network })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ModelFileError> {
    std::fs::read(path).map_err(|source| ModelFileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<(ModelHeader, &'a [u8]), ModelFileError> {
    let corrupt = |reason: &str| ModelFileError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < 16 || &bytes[..16] != MAGIC {
        return Err(ModelFileError::NotAModel {
            path: path.to_path_buf(),
        });
    }
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    let version = u32_at(16).ok_or_else(|| corrupt("truncated before the version"))?;
    if version > MODEL_FORMAT_VERSION {
        return Err(ModelFileError::TooNew {
            path: path.to_path_buf(),
            found: version,
        });
    }
    if bytes.len() < 8 + 20 {
        return Err(corrupt("truncated"));
    }
    let body_end = bytes.len() - 8;
    let stored = u64_at(body_end).ok_or_else(|| corrupt("truncated"))?;
    if xxhash_rust::xxh3::xxh3_64(&bytes[..body_end]) != stored {
        return Err(corrupt(
            "checksum mismatch: the file is truncated or was modified",
        ));
    }
    let header_len = u64_at(20).ok_or_else(|| corrupt("truncated header length"))? as usize;
    let header_start = 28usize;
    let header_end = header_start
        .checked_add(header_len)
        .filter(|&e| e <= body_end)
        .ok_or_else(|| corrupt("header length beyond the end of the file"))?;
    let header: ModelHeader = serde_json::from_slice(&bytes[header_start..header_end])
        .map_err(|e| corrupt(&format!("header is not valid: {e}")))?;
    let weights_len =
        u64_at(header_end).ok_or_else(|| corrupt("truncated weights length"))? as usize;
    let weights_start = header_end + 8;
    let weights_end = weights_start
        .checked_add(weights_len)
        .filter(|&e| e == body_end)
        .ok_or_else(|| corrupt("weights length does not match the file size"))?;
    Ok((header, &bytes[weights_start..weights_end]))
}
