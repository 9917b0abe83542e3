//! Training checkpoints (`<model>.checkpoint`): written atomically after every epoch so that a
//! training that was cancelled, crashed or killed can be resumed where it stopped. A checkpoint
//! holds the network, the optimiser state and the epoch history, plus what it was trained on, so
//! that a resume with other images or another network shape is refused instead of mixing them.

use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use burn::prelude::Device;
use burn::tensor::Bytes;
use serde::{Deserialize, Serialize};

use super::file::{
    decode_container, network_bytes, network_from_bytes, parse_header, read_container_header,
    read_file, save_container,
};
use super::{AutoencoderSpec, ConvAutoencoder, Framework, ModelFileError};
use crate::engine::dataset::decode::ColourMode;
use crate::engine::training::{EpochReport, TrainingSettings};

const MAGIC: &[u8; 16] = b"INKSPECT-CHECKPT";

/// Version of the checkpoint layout written by this build.
pub const CHECKPOINT_FORMAT_VERSION: u32 = 1;

/// Where the checkpoint of the model written to `model_path` lives.
pub fn checkpoint_path(model_path: &Path) -> PathBuf {
    crate::engine::path_with_suffix(model_path, ".checkpoint")
}

/// What a checkpoint was trained on and how far it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointHeader {
    /// Model type.
    pub framework: Framework,
    /// Network shape.
    pub autoencoder: AutoencoderSpec,
    /// Colour mode.
    pub mode: ColourMode,
    /// Side of the square model input in pixels.
    pub image_size_px: u32,
    /// Complexity index.
    pub complexity: u32,
    /// Fingerprint of the training images (see [`dataset_fingerprint`]).
    pub dataset_fingerprint: String,
    /// Settings of the run that wrote it.
    pub settings: TrainingSettings,
    /// Epochs completed.
    pub epochs_done: u32,
    /// One report per completed epoch.
    pub history: Vec<EpochReport>,
    /// Seconds spent preparing images in the run that wrote it.
    pub prepare_secs: f64,
    /// Version of Inkspect that wrote it.
    pub inkspect_version: String,
}

/// A checkpoint in memory.
#[derive(Debug)]
pub struct Checkpoint {
    /// Description.
    pub header: CheckpointHeader,
    /// The network after `header.epochs_done` epochs.
    pub network: ConvAutoencoder,
    /// The optimiser state (burnpack bytes), restored with [`Checkpoint::restore_optimizer`].
    pub optimizer_state: Vec<u8>,
}

impl Checkpoint {
    /// Captures `network` and `optimizer` after an epoch.
    pub fn capture(
        header: CheckpointHeader,
        network: &ConvAutoencoder,
        optimizer: &ModuleOptimizer,
    ) -> Result<Checkpoint, String> {
        let optimizer_state = optimizer.into_bytes().map_err(|e| e.to_string())?.to_vec();
        Ok(Checkpoint {
            header,
            network: network.clone(),
            optimizer_state,
        })
    }

    /// Writes the checkpoint atomically.
    pub fn save(&self, path: &Path) -> Result<(), ModelFileError> {
        let weights = network_bytes(&self.network).map_err(|reason| ModelFileError::Corrupt {
            path: path.to_path_buf(),
            reason,
        })?;
        save_container(
            path,
            MAGIC,
            CHECKPOINT_FORMAT_VERSION,
            &self.header,
            &[&weights, &self.optimizer_state],
        )
    }

    /// Reads only the header.
    pub fn read_header(path: &Path) -> Result<CheckpointHeader, ModelFileError> {
        read_container_header(path, MAGIC, CHECKPOINT_FORMAT_VERSION, 3)
    }

    /// Loads a checkpoint onto `device` (an autodiff device to continue training).
    pub fn load(path: &Path, device: &Device) -> Result<Checkpoint, ModelFileError> {
        let bytes = read_file(path)?;
        let sections = decode_container(&bytes, MAGIC, CHECKPOINT_FORMAT_VERSION, 3, path)?;
        let header: CheckpointHeader = parse_header(sections[0], path)?;
        if header.history.len() != header.epochs_done as usize {
            return Err(ModelFileError::Corrupt {
                path: path.to_path_buf(),
                reason: "epoch history does not match the epochs done".into(),
            });
        }
        let network = network_from_bytes(&header.autoencoder, sections[1], device, path)?;
        Ok(Checkpoint {
            header,
            network,
            optimizer_state: sections[2].to_vec(),
        })
    }

    /// Restores the optimiser state into `optimizer` (made by the same configuration).
    pub fn restore_optimizer(
        &self,
        optimizer: ModuleOptimizer,
        path: &Path,
    ) -> Result<ModuleOptimizer, ModelFileError> {
        optimizer
            .from_bytes(Bytes::from_bytes_vec(self.optimizer_state.clone()))
            .map_err(|e| ModelFileError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("optimiser state is not valid: {e}"),
            })
    }
}

/// A fingerprint of a set of images given by their content hashes (order does not matter).
pub fn dataset_fingerprint<'a>(content_hashes: impl IntoIterator<Item = &'a str>) -> String {
    let mut hashes: Vec<&str> = content_hashes.into_iter().collect();
    hashes.sort_unstable();
    let joined = hashes.join("\n");
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(joined.as_bytes()))
}
