//! Anomaly-detection models ("frameworks"), the mapping from the complexity index to their size,
//! and the self-describing model file.

pub mod autoencoder;
pub mod checkpoint;
pub mod file;

use serde::{Deserialize, Serialize};

pub use autoencoder::{AutoencoderSpec, ConvAutoencoder};
pub use checkpoint::{Checkpoint, CheckpointHeader, checkpoint_path, dataset_fingerprint};
pub use file::{ModelFile, ModelFileError, ModelHeader};

/// The model types a project can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framework {
    /// Convolutional autoencoder scored by reconstruction error.
    #[default]
    ConvAutoencoder,
}

impl Framework {
    /// Every framework, for choosers.
    pub const ALL: [Framework; 1] = [Framework::ConvAutoencoder];

    /// Name shown to users.
    pub fn display_name(self) -> &'static str {
        match self {
            Framework::ConvAutoencoder => "Convolutional autoencoder",
        }
    }

    /// One-line description shown to users.
    pub fn description(self) -> &'static str {
        match self {
            Framework::ConvAutoencoder => {
                "Learns to redraw good images; what it cannot redraw is abnormal. Fast, finds \
                 clear defects (dirt, particles, chips, bold scratches)."
            }
        }
    }
}

/// The one mapping from the complexity index (1-100) to the autoencoder's shape.
///
/// Base width `w = round(4 + 0.6 * complexity)` (complexity 1 gives 5, 20 gives 16, 50 gives 34,
/// 100 gives 64); the four encoder levels have `w, 2w, 4w, 4w` channels and the bottleneck
/// `max(4, w / 2)` channels at 1/16 of the image side. Compute grows with `w^2`; the bottleneck
/// grows with `w` so that higher complexity reconstructs finer detail.
pub fn autoencoder_spec_for(complexity: u32, channels: usize) -> AutoencoderSpec {
    let complexity = complexity.clamp(1, 100) as f64;
    let w = (4.0 + 0.6 * complexity).round() as usize;
    AutoencoderSpec {
        channels,
        widths: vec![w, 2 * w, 4 * w, 4 * w],
        latent_channels: (w / 2).max(4),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complexity_grows_capacity_monotonically() {
        let mut last = 0;
        for c in [1, 5, 20, 50, 100] {
            let n = autoencoder_spec_for(c, 1).parameter_count();
            assert!(n > last, "complexity {c}: {n} <= {last}");
            last = n;
        }
        assert_eq!(autoencoder_spec_for(20, 1).widths, vec![16, 32, 64, 64]);
        assert_eq!(autoencoder_spec_for(0, 3).widths[0], 5);
    }
}
