//! The convolutional autoencoder: four stride-2 convolutions down to a narrow bottleneck, four
//! transposed convolutions back up. Trained on good images only, it reconstructs what it has seen;
//! what it cannot reconstruct is abnormal.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::prelude::*;
use burn::tensor::activation::leaky_relu;
use serde::{Deserialize, Serialize};

use super::conv_kernels::{Activation, LEAKY_SLOPE};
use super::conv_ops::{conv_down, conv_up};

/// Shape of a [`ConvAutoencoder`]; saved in the model file so the file is self-describing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoencoderSpec {
    /// Image channels (1 mono, 3 colour).
    pub channels: usize,
    /// Output channels of each stride-2 encoder level (the decoder mirrors them).
    pub widths: Vec<usize>,
    /// Channels of the bottleneck code (at 1/16 of the image side).
    pub latent_channels: usize,
}

impl AutoencoderSpec {
    /// Builds the module with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> ConvAutoencoder {
        let mut encoder = Vec::new();
        let mut c_in = self.channels;
        for &w in &self.widths {
            encoder.push(
                Conv2dConfig::new([c_in, w], [4, 4])
                    .with_stride([2, 2])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init(device),
            );
            c_in = w;
        }
        let deepest = *self.widths.last().unwrap_or(&self.channels);
        let to_latent = Conv2dConfig::new([deepest, self.latent_channels], [1, 1]).init(device);
        let from_latent = Conv2dConfig::new([self.latent_channels, deepest], [1, 1]).init(device);
        let mut decoder = Vec::new();
        let mut outs: Vec<usize> = self.widths.iter().rev().skip(1).copied().collect();
        outs.push(self.channels);
        let mut c_in = deepest;
        for w in outs {
            decoder.push(
                ConvTranspose2dConfig::new([c_in, w], [4, 4])
                    .with_stride([2, 2])
                    .with_padding([1, 1])
                    .init(device),
            );
            c_in = w;
        }
        ConvAutoencoder {
            encoder,
            to_latent,
            from_latent,
            decoder,
        }
    }

    /// Number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        let conv = |i: usize, o: usize, k: usize| i * o * k * k + o;
        let mut n = 0;
        let mut c = self.channels;
        for &w in &self.widths {
            n += 2 * conv(c, w, 4) - w + c; // encoder conv + its mirrored decoder conv
            c = w;
        }
        n + 2 * conv(c, self.latent_channels, 1) - self.latent_channels + c
    }

    /// How many times the side is halved (the image side must be a multiple of `2^levels`).
    pub fn levels(&self) -> usize {
        self.widths.len()
    }
}

/// The autoencoder module. Input and output: `[batch, channels, size, size]`, values in `[0, 1]`.
#[derive(Module, Debug)]
pub struct ConvAutoencoder {
    encoder: Vec<Conv2d>,
    to_latent: Conv2d,
    from_latent: Conv2d,
    decoder: Vec<ConvTranspose2d>,
}

/// The activation of decoder layer `i` of `0..=last`: leaky ReLU, and a sigmoid on the last one
/// (the reconstruction, in 0..1).
fn decoder_activation(i: usize, last: usize) -> Activation {
    if i < last {
        Activation::LeakyRelu
    } else {
        Activation::Sigmoid
    }
}

/// A layer's weight and bias as plain values.
fn values_of(
    weight: &burn::module::Param<Tensor<4>>,
    bias: &Option<burn::module::Param<Tensor<1>>>,
) -> (Vec<f32>, Vec<f32>) {
    let weight_values = weight
        .val()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    let bias_values = bias
        .as_ref()
        .map(|b| b.val().into_data().try_to_vec::<f32>().unwrap_or_default())
        .unwrap_or_else(|| vec![0.0; weight.dims()[0]]);
    (weight_values, bias_values)
}

impl ConvAutoencoder {
    /// Per-pixel squared reconstruction error averaged over channels, `[batch, size * size]`, of
    /// `images` (`[batch, channels, size, size]`, values in `[0, 1]`) through the CPU kernels of
    /// [`conv_kernels`](super::conv_kernels): each image goes through the whole network on one
    /// thread, so its activations stay in that core's cache instead of a batch's passing through
    /// memory between layers. Computes what [`ConvAutoencoder::forward`] and the error do.
    pub fn error_maps_by_kernels(
        &self,
        images: &[f32],
        batch: usize,
        channels: usize,
        size: usize,
    ) -> Vec<f32> {
        use super::conv_kernels::{
            LayerShape, down_image, gemm_threads, pointwise_image, up_image,
        };
        use rayon::prelude::*;
        let plane = size * size;
        let encoder: Vec<_> = self
            .encoder
            .iter()
            .map(|c| values_of(&c.weight, &c.bias))
            .collect();
        let decoder: Vec<_> = self
            .decoder
            .iter()
            .map(|c| values_of(&c.weight, &c.bias))
            .collect();
        let to_latent = values_of(&self.to_latent.weight, &self.to_latent.bias);
        let from_latent = values_of(&self.from_latent.weight, &self.from_latent.bias);
        // Whole images per thread when the batch fills the threads, else split each product.
        let threads = gemm_threads(batch);
        let mut maps = vec![0.0f32; batch * plane];
        maps.par_chunks_mut(plane.max(1))
            .zip(images.par_chunks(channels * plane).take(batch))
            .for_each(|(map, image)| {
                let (mut x, mut c, mut side) = (image.to_vec(), channels, size);
                for (conv, (w, b)) in self.encoder.iter().zip(&encoder) {
                    let out_c = conv.weight.dims()[0];
                    let s = LayerShape {
                        batch: 1,
                        wide_channels: c,
                        narrow_channels: out_c,
                        height: side,
                        width: side,
                    };
                    side = super::conv_kernels::down_side(side);
                    let mut y = vec![0.0f32; out_c * side * side];
                    down_image(s, &x, w, b, Activation::LeakyRelu, threads, &mut y);
                    (x, c) = (y, out_c);
                }
                x = pointwise_image(&x, c, &to_latent.0, &to_latent.1, Activation::LeakyRelu);
                c = to_latent.1.len();
                x = pointwise_image(&x, c, &from_latent.0, &from_latent.1, Activation::LeakyRelu);
                c = from_latent.1.len();
                let last = self.decoder.len().saturating_sub(1);
                for (i, (conv, (w, b))) in self.decoder.iter().zip(&decoder).enumerate() {
                    let out_c = conv.weight.dims()[1];
                    let wide = super::conv_kernels::up_side(side);
                    let s = LayerShape {
                        batch: 1,
                        wide_channels: out_c,
                        narrow_channels: c,
                        height: wide,
                        width: wide,
                    };
                    let act = decoder_activation(i, last);
                    let mut y = vec![0.0f32; out_c * wide * wide];
                    up_image(s, &x, w, b, act, threads, &mut y);
                    (x, c, side) = (y, out_c, wide);
                }
                let scale = 1.0 / channels as f32;
                for ch in 0..channels {
                    let (out, input) = (
                        &x[ch * plane..(ch + 1) * plane],
                        &image[ch * plane..(ch + 1) * plane],
                    );
                    for ((m, o), i) in map.iter_mut().zip(out).zip(input) {
                        *m += (o - i) * (o - i) * scale;
                    }
                }
            });
        maps
    }

    /// Reconstruction of `images` (`[batch, channels, size, size]`, values in `[0, 1]`).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        let slope = f64::from(LEAKY_SLOPE);
        let mut x = images;
        for conv in &self.encoder {
            x = conv_down(conv, x, Activation::LeakyRelu);
        }
        x = leaky_relu(self.to_latent.forward(x), slope);
        x = leaky_relu(self.from_latent.forward(x), slope);
        let last = self.decoder.len().saturating_sub(1);
        for (i, deconv) in self.decoder.iter().enumerate() {
            x = conv_up(deconv, x, decoder_activation(i, last));
        }
        x
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn kernel_error_maps_match_burns_forward() {
        let device = Device::flex();
        for channels in [1, 3] {
            let ae = crate::engine::model::autoencoder_spec_for(5, channels).init(&device);
            let input = Tensor::<4>::random(
                [3, channels, 32, 32],
                Distribution::Uniform(0.0, 1.0),
                &device,
            );
            let reference = (ae.forward(input.clone()) - input.clone())
                .square()
                .mean_dim(1);
            let reference = reference.into_data().try_to_vec::<f32>().unwrap();
            let values = input.into_data().try_to_vec::<f32>().unwrap();
            let maps = ae.error_maps_by_kernels(&values, 3, channels, 32);
            assert_eq!(maps.len(), reference.len());
            for (i, (a, b)) in maps.iter().zip(&reference).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                    "{channels} channels, pixel {i}: {a} vs {b}"
                );
            }
        }
    }
}
