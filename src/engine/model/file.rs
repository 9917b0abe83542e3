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

use super::{AutoencoderSpec, ConvAutoencoder, Framework, PatchMemory, PatchMemorySpec};
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
    /// Shape of the autoencoder (autoencoder models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoencoder: Option<AutoencoderSpec>,
    /// Shape of the patch memory (patch memory models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_memory: Option<PatchMemorySpec>,
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

/// The network of a model, one variant per [`Framework`]. One is held per loaded model, so the
/// size difference of the variants does not matter.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Network {
    /// A convolutional autoencoder.
    Autoencoder(ConvAutoencoder),
    /// A patch memory.
    PatchMemory(PatchMemory),
}

impl Network {
    /// The network's weights as burnpack bytes.
    fn to_bytes(&self) -> Result<Vec<u8>, String> {
        match self {
            Network::Autoencoder(n) => network_bytes(n),
            Network::PatchMemory(n) => network_bytes(n),
        }
    }

    /// The same network ready for inference (no gradient tracking).
    pub fn valid(&self) -> Network {
        match self {
            Network::Autoencoder(n) => Network::Autoencoder(n.valid()),
            Network::PatchMemory(n) => Network::PatchMemory(n.valid()),
        }
    }
}

/// A model loaded from, or ready to be written to, a model file.
#[derive(Debug)]
pub struct ModelFile {
    /// Description and settings.
    pub header: ModelHeader,
    /// The trained network.
    pub network: Network,
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
        let weights = self
            .network
            .to_bytes()
            .map_err(|reason| ModelFileError::Corrupt {
                path: path.to_path_buf(),
                reason,
            })?;
        save_container(path, MAGIC, MODEL_FORMAT_VERSION, &self.header, &[&weights])
    }

    /// Reads only the header (fast; no weights are loaded).
    pub fn read_header(path: &Path) -> Result<ModelHeader, ModelFileError> {
        read_container_header(path, MAGIC, MODEL_FORMAT_VERSION, 2)
    }

    /// Loads a model file onto `device` (inference device; call on an autodiff device to keep
    /// training).
    pub fn load(path: &Path, device: &Device) -> Result<ModelFile, ModelFileError> {
        let bytes = read_file(path)?;
        Self::from_bytes(&bytes, path, device)
    }

    /// Parses the bytes of a model file; `path` is only used in error messages.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        device: &Device,
    ) -> Result<ModelFile, ModelFileError> {
        let sections = decode_container(bytes, MAGIC, MODEL_FORMAT_VERSION, 2, path)?;
        let header: ModelHeader = parse_header(sections[0], path)?;
        let network = match (header.framework, &header.autoencoder, &header.patch_memory) {
            (Framework::ConvAutoencoder, Some(spec), _) => {
                Network::Autoencoder(network_from_bytes(spec, sections[1], device, path)?)
            }
            (Framework::PatchMemory, _, Some(spec)) => {
                Network::PatchMemory(patch_memory_from_bytes(spec, sections[1], device, path)?)
            }
            _ => {
                return Err(ModelFileError::Corrupt {
                    path: path.to_path_buf(),
                    reason: "the header has no network shape for its framework".into(),
                });
            }
        };
        Ok(ModelFile { header, network })
    }
}

/// Writes a container atomically: `header` as JSON, then the `sections` (weights first).
pub(crate) fn save_container<H: Serialize>(
    path: &Path,
    magic: &[u8; 16],
    version: u32,
    header: &H,
    extra: &[&[u8]],
) -> Result<(), ModelFileError> {
    let header = serde_json::to_vec_pretty(header).map_err(|e| ModelFileError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut sections: Vec<&[u8]> = vec![&header];
    sections.extend_from_slice(extra);
    let out = encode_container(magic, version, &sections);
    crate::engine::atomic_write(path, &out).map_err(|source| ModelFileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads only the JSON header of a container file with `n_sections` sections.
pub(crate) fn read_container_header<H: serde::de::DeserializeOwned>(
    path: &Path,
    magic: &[u8; 16],
    version: u32,
    n_sections: usize,
) -> Result<H, ModelFileError> {
    let bytes = read_file(path)?;
    let sections = decode_container(&bytes, magic, version, n_sections, path)?;
    parse_header(sections[0], path)
}

/// The weights of `network` as burnpack bytes.
pub(crate) fn network_bytes<M: Module>(network: &M) -> Result<Vec<u8>, String> {
    network
        .clone()
        .into_record()
        .into_bytes()
        .map(|b| b.to_vec())
        .map_err(|e| e.to_string())
}

/// A network of shape `spec` with the weights in `weights` (burnpack), checking the shape first
/// so that a damaged header cannot ask for an absurd allocation.
pub(crate) fn network_from_bytes(
    spec: &AutoencoderSpec,
    weights: &[u8],
    device: &Device,
    path: &Path,
) -> Result<ConvAutoencoder, ModelFileError> {
    let corrupt = |reason: String| ModelFileError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if spec.widths.is_empty()
        || spec.widths.len() > 8
        || spec.widths.iter().any(|&w| w == 0 || w > 4096)
        || !(1..=4).contains(&spec.channels)
        || spec.latent_channels == 0
        || spec.latent_channels > 4096
    {
        return Err(corrupt("impossible network shape in header".into()));
    }
    load_weights(spec.init(device), weights, path)
}

/// A patch memory of shape `spec` with the weights in `weights` (burnpack), shape checked first.
pub(crate) fn patch_memory_from_bytes(
    spec: &PatchMemorySpec,
    weights: &[u8],
    device: &Device,
    path: &Path,
) -> Result<PatchMemory, ModelFileError> {
    if !spec.is_plausible() {
        return Err(ModelFileError::Corrupt {
            path: path.to_path_buf(),
            reason: "impossible network shape in header".into(),
        });
    }
    load_weights(spec.init(device), weights, path)
}

/// Loads burnpack `weights` into `module`, which must have their shape.
fn load_weights<M: Module>(module: M, weights: &[u8], path: &Path) -> Result<M, ModelFileError> {
    let corrupt = |reason: String| ModelFileError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(weights.to_vec()))
        .map_err(|e| corrupt(e.to_string()))?;
    module
        .try_load_record(record)
        .map_err(|e| corrupt(e.to_string()))
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, ModelFileError> {
    std::fs::read(path).map_err(|source| ModelFileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn parse_header<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
) -> Result<T, ModelFileError> {
    serde_json::from_slice(bytes).map_err(|e| ModelFileError::Corrupt {
        path: path.to_path_buf(),
        reason: format!("header is not valid: {e}"),
    })
}

/// Lays out a container file: 16-byte `magic`, `u32` version, then each section as a `u64` length
/// and its bytes, then a `u64` xxh3-64 checksum of everything before it (little-endian).
pub(crate) fn encode_container(magic: &[u8; 16], version: u32, sections: &[&[u8]]) -> Vec<u8> {
    let len: usize = sections.iter().map(|s| s.len() + 8).sum();
    let mut out = Vec::with_capacity(len + 32);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    for s in sections {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
    }
    let checksum = container_checksum(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

/// The checksum stored at the end of a container file: xxh3-64 of everything before it.
pub fn container_checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Checks and splits a file laid out by [`encode_container`] into its `n_sections` sections.
pub(crate) fn decode_container<'a>(
    bytes: &'a [u8],
    magic: &[u8; 16],
    max_version: u32,
    n_sections: usize,
    path: &Path,
) -> Result<Vec<&'a [u8]>, ModelFileError> {
    let corrupt = |reason: &str| ModelFileError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < 16 || &bytes[..16] != magic {
        return Err(ModelFileError::NotAModel {
            path: path.to_path_buf(),
        });
    }
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    let version = bytes
        .get(16..20)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
        .ok_or_else(|| corrupt("truncated before the version"))?;
    if version > max_version {
        return Err(ModelFileError::TooNew {
            path: path.to_path_buf(),
            found: version,
        });
    }
    if bytes.len() < 20 + 8 {
        return Err(corrupt("truncated"));
    }
    let body_end = bytes.len() - 8;
    let stored = u64_at(body_end).ok_or_else(|| corrupt("truncated"))?;
    if container_checksum(&bytes[..body_end]) != stored {
        return Err(corrupt(
            "checksum mismatch: the file is truncated or was modified",
        ));
    }
    let mut sections = Vec::with_capacity(n_sections);
    let mut at = 20usize;
    for i in 0..n_sections {
        let len = u64_at(at).ok_or_else(|| corrupt("truncated section length"))?;
        let start = at + 8;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e <= body_end)
            .ok_or_else(|| corrupt("section length beyond the end of the file"))?;
        sections.push(&bytes[start..end]);
        at = end;
        if i + 1 == n_sections && at != body_end {
            return Err(corrupt("unexpected bytes after the last section"));
        }
    }
    Ok(sections)
}
