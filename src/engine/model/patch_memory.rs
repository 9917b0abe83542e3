//! Patch memory: every patch of an image is described by a small fixed convolutional feature
//! extractor and compared with a memory of patches from the good images; the distance to the
//! nearest good patch is the anomaly map. Nothing is trained by gradient descent: fitting reads
//! the good images once, so it takes seconds, and it finds what no good image shows anywhere,
//! wherever it appears (textures need not be aligned). The idea is PatchCore's (Roth et al. 2022)
//! with a random, seeded extractor instead of a downloaded pretrained one, which Inkspect cannot
//! use; local contrast normalisation in front of it makes the features follow texture rather than
//! lighting.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::{avg_pool2d, interpolate};
use burn::tensor::ops::{AvgPoolOptions, InterpolateMode, InterpolateOptions};
use serde::{Deserialize, Serialize};

use super::conv_ops::uses_kernels;
use super::patch_kernels;
use crate::engine::dataset::prepare::PreparedImage;

/// Rows of the query matrix compared with the memory at once (bounds the distance matrix to
/// `QUERY_CHUNK x memory` floats).
const QUERY_CHUNK: usize = 1024;

/// Shape of a [`PatchMemory`]; saved in the model file so the file is self-describing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchMemorySpec {
    /// Image channels (1 mono, 3 colour).
    pub channels: usize,
    /// Output channels of the three extractor levels (each a 3x3 convolution, ReLU and 2x2
    /// average pooling); the features are levels 2 and 3, so a patch feature has
    /// `widths[1] + widths[2]` values.
    pub widths: Vec<usize>,
    /// Good patches kept in the memory.
    pub memory_patches: usize,
    /// Side in pixels (odd) of the window of the local contrast normalisation, at the
    /// extractor's resolution.
    pub contrast_window_px: usize,
    /// Added to the local standard deviation before dividing by it (pixel values in `[0, 1]`):
    /// a tenth of the good images' pixel standard deviation, set when fitting, so that flat
    /// areas do not turn noise into texture.
    pub contrast_floor: f32,
    /// The extractor sees the model input shrunk by this factor (2: a 320 px input is described
    /// at 160 px), which sets how large a patch is relative to the image and keeps inspection
    /// fast. Patches are 4 extractor pixels apart.
    pub input_shrink: usize,
}

impl PatchMemorySpec {
    /// Values per patch feature.
    pub fn feature_dim(&self) -> usize {
        self.widths.iter().skip(1).sum()
    }

    /// Builds the module with a seeded random extractor (Kaiming normal weights) and an empty
    /// (zero) memory on `device`. Seed the device first for a reproducible extractor.
    pub fn init(&self, device: &Device) -> PatchMemory {
        let mut convs = Vec::new();
        let mut c_in = self.channels;
        for &w in &self.widths {
            convs.push(
                Conv2dConfig::new([c_in, w], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_initializer(Initializer::KaimingNormal {
                        gain: 2f64.sqrt(),
                        fan_out_only: false,
                    })
                    .with_bias(false)
                    .init(device),
            );
            c_in = w;
        }
        let memory = Tensor::zeros([self.memory_patches, self.feature_dim()], device);
        PatchMemory {
            convs,
            memory: Param::from_tensor(memory),
            contrast_window_px: self.contrast_window_px,
            contrast_floor: self.contrast_floor,
            input_shrink: self.input_shrink,
            search: SearchCache::default(),
        }
    }

    /// Number of stored values (extractor weights and memory).
    pub fn parameter_count(&self) -> usize {
        let mut n = 0;
        let mut c = self.channels;
        for &w in &self.widths {
            n += c * w * 9;
            c = w;
        }
        n + self.memory_patches * self.feature_dim()
    }

    /// Checks that the shape is one this build could have written (guards loaders against
    /// absurd allocations from a damaged header).
    pub fn is_plausible(&self) -> bool {
        self.widths.len() == 3
            && self.widths.iter().all(|&w| (1..=1024).contains(&w))
            && (1..=4).contains(&self.channels)
            && (1..=1_000_000).contains(&self.memory_patches)
            && self.contrast_window_px % 2 == 1
            && self.contrast_window_px <= 1025
            && self.contrast_floor.is_finite()
            && self.contrast_floor > 0.0
            && (1..=8).contains(&self.input_shrink)
    }
}

/// The patch memory module: extractor weights and the memory `[memory_patches, feature_dim]`.
#[derive(Module, Debug)]
pub struct PatchMemory {
    convs: Vec<Conv2d>,
    memory: Param<Tensor<2>>,
    contrast_window_px: usize,
    contrast_floor: f32,
    input_shrink: usize,
    /// The memory's search index on the CPU, built on first use and rebuilt when the memory
    /// changes (not saved: a second or less to build).
    #[module(skip)]
    search: SearchCache,
}

/// The cached [`patch_kernels::MemoryIndex`] of a patch memory, shared by its clones.
type SearchCache =
    std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<patch_kernels::MemoryIndex>>>>;

impl PatchMemory {
    /// The extractor's input for `images` (all of one size and mode): each image shrunk by
    /// `input_shrink` (box average) and contrast-normalised per channel,
    /// `(v - local mean) / (local std + contrast_floor)` over a `contrast_window_px` window.
    /// `[batch, channels, size / shrink, size / shrink]`.
    pub fn input(&self, images: &[&PreparedImage], device: &Device) -> Tensor<4> {
        let size = images.first().map_or(0, |i| i.size_px as usize);
        let channels = images.first().map_or(1, |i| i.mode.channels());
        let shrink = self.input_shrink.max(1);
        let side = (size / shrink).max(1);
        use rayon::prelude::*;
        let data: Vec<f32> = images
            .par_iter()
            .flat_map_iter(|img| {
                (0..channels).flat_map(move |c| {
                    let plane = &img.pixels[c * size * size..(c + 1) * size * size];
                    let small = shrink_plane(plane, size, shrink);
                    contrast_normalise(&small, side, self.contrast_window_px, self.contrast_floor)
                })
            })
            .collect();
        Tensor::from_data(
            TensorData::new(data, [images.len(), channels, side, side]),
            device,
        )
    }

    /// Patch features of an extractor input ([`PatchMemory::input`], side `s`):
    /// `[batch, feature_dim, s / 4, s / 4]`.
    pub fn features(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input;
        let mut levels = Vec::with_capacity(self.convs.len());
        for conv in &self.convs {
            x = avg_pool2d(relu(conv.forward(x)), AvgPoolOptions::new([2, 2]));
            levels.push(x.clone());
        }
        let mut levels = levels.into_iter().skip(1);
        let Some(fine) = levels.next() else {
            return x;
        };
        let [_, _, h, w] = fine.dims();
        let mut parts = vec![fine];
        for coarse in levels {
            parts.push(interpolate(
                coarse,
                InterpolateOptions::new(InterpolateMode::Bilinear).with_output_size([h, w]),
            ));
        }
        // Each patch feature also describes its 3x3 neighbourhood. Zeros beyond the border count
        // in the mean, which keeps border patches apart from interior ones (measured on
        // PA_BRG03_TL: image AUROC 0.97 against 0.75 when they do not count).
        avg_pool2d(
            Tensor::cat(parts, 1),
            AvgPoolOptions::new([3, 3])
                .with_stride([1, 1])
                .with_padding([1, 1])
                .with_count_include_pad(true),
        )
    }

    /// Patch features of an extractor input ([`PatchMemory::input`], side `s`) patch by patch:
    /// the values (`[batch * h * w, feature_dim]`) and `[batch, h, w]`, `h = w = s / 4`. On the
    /// `flex` CPU backend through the kernels of [`patch_kernels`], elsewhere through
    /// [`PatchMemory::features`].
    pub fn patch_rows(&self, input: Tensor<4>) -> (Vec<f32>, [usize; 3]) {
        if self.runs_kernels(&input) {
            self.patch_rows_by_kernels(input)
        } else {
            let features = self.features(input);
            let [b, _, h, w] = features.dims();
            let rows = features.permute([0, 2, 3, 1]).into_data();
            (rows.try_to_vec::<f32>().unwrap_or_default(), [b, h, w])
        }
    }

    /// Whether `input` goes through the CPU kernels: on `flex`, with the two extractor levels
    /// (or more) that the patch features take.
    fn runs_kernels(&self, input: &Tensor<4>) -> bool {
        uses_kernels(&input.device()) && self.convs.len() >= 2
    }

    /// [`PatchMemory::patch_rows`] through the CPU kernels (at least two extractor levels).
    fn patch_rows_by_kernels(&self, input: Tensor<4>) -> (Vec<f32>, [usize; 3]) {
        let [batch, channels, height, width] = input.dims();
        let x = input.into_data().try_to_vec::<f32>().unwrap_or_default();
        let mut shape = patch_kernels::LevelShape {
            batch,
            inputs: channels,
            outputs: 0,
            height,
            width,
        };
        // Each level's output, its channels and side; each level reads the one before.
        let mut levels: Vec<(Vec<f32>, usize, (usize, usize))> =
            Vec::with_capacity(self.convs.len());
        for conv in &self.convs {
            let weight = conv
                .weight
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap_or_default();
            shape.outputs = conv.weight.dims()[0];
            let level_input = levels.last().map_or(&x, |(values, _, _)| values);
            let output = patch_kernels::conv3x3_relu_pool(shape, level_input, &weight);
            (shape.inputs, shape.height, shape.width) =
                (shape.outputs, shape.height / 2, shape.width / 2);
            levels.push((output, shape.outputs, (shape.height, shape.width)));
        }
        let (fine, c_fine, fine_side) = &levels[1];
        let none = Vec::new();
        let (coarse, c_coarse, coarse_side) = levels
            .get(2)
            .map_or((&none, 0, (1, 1)), |(v, c, s)| (v, *c, *s));
        let (fine_len, coarse_len) = (
            c_fine * fine_side.0 * fine_side.1,
            c_coarse * coarse_side.0 * coarse_side.1,
        );
        use rayon::prelude::*;
        let rows: Vec<f32> = (0..batch)
            .into_par_iter()
            .flat_map_iter(|i| {
                patch_kernels::patch_rows(
                    &fine[i * fine_len..(i + 1) * fine_len],
                    *c_fine,
                    &coarse[(i * coarse_len).min(coarse.len())
                        ..((i + 1) * coarse_len).min(coarse.len())],
                    c_coarse,
                    *fine_side,
                    coarse_side,
                )
            })
            .collect();
        (rows, [batch, fine_side.0, fine_side.1])
    }

    /// Distance of every patch of an extractor input ([`PatchMemory::input`], side `s`) to its
    /// nearest good patch in the memory: `[batch, 1, s / 4, s / 4]`.
    pub fn distances(&self, input: Tensor<4>) -> Tensor<4> {
        if self.runs_kernels(&input) {
            self.distances_by_kernels(input)
        } else {
            self.distances_by_burn(input)
        }
    }

    /// [`PatchMemory::distances`] through the CPU kernels.
    fn distances_by_kernels(&self, input: Tensor<4>) -> Tensor<4> {
        let device = input.device();
        let (rows, [b, h, w]) = self.patch_rows_by_kernels(input);
        let memory = self.memory.val();
        let dim = memory.dims()[1];
        let memory = memory.into_data().try_to_vec::<f32>().unwrap_or_default();
        let index = self.search_index(&memory, dim);
        let nearest = index.nearest(&memory, &rows);
        Tensor::from_data(TensorData::new(nearest, [b, 1, h, w]), &device)
    }

    /// The search index of `memory` (this module's memory as values), from the cache when it
    /// still matches.
    fn search_index(
        &self,
        memory: &[f32],
        dim: usize,
    ) -> std::sync::Arc<patch_kernels::MemoryIndex> {
        let mut cache = self
            .search
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match cache.as_ref() {
            Some(index) if index.is_for(memory, dim) => index.clone(),
            _ => {
                let index = std::sync::Arc::new(patch_kernels::MemoryIndex::build(memory, dim));
                *cache = Some(index.clone());
                index
            }
        }
    }

    /// [`PatchMemory::distances`] through burn's operations (any device).
    fn distances_by_burn(&self, input: Tensor<4>) -> Tensor<4> {
        let features = self.features(input);
        let [b, d, h, w] = features.dims();
        let queries = features.permute([0, 2, 3, 1]).reshape([b * h * w, d]);
        let memory = self.memory.val();
        let memory_t = memory.clone().transpose();
        let memory_sq = memory.square().sum_dim(1).transpose(); // [1, n]
        let rows = b * h * w;
        let mut nearest = Vec::with_capacity(rows.div_ceil(QUERY_CHUNK));
        for start in (0..rows).step_by(QUERY_CHUNK) {
            let end = (start + QUERY_CHUNK).min(rows);
            let q = queries.clone().slice([start..end, 0..d]);
            let q_sq = q.clone().square().sum_dim(1); // [m, 1]
            let d2 = q.matmul(memory_t.clone()).mul_scalar(-2.0) + q_sq + memory_sq.clone();
            nearest.push(d2.min_dim(1));
        }
        Tensor::cat(nearest, 0)
            .clamp_min(0.0)
            .sqrt()
            .reshape([b, 1, h, w])
    }

    /// Replaces the memory with `patches` (`[memory_patches, feature_dim]`).
    pub fn with_memory(mut self, patches: Tensor<2>) -> PatchMemory {
        self.memory = Param::from_tensor(patches);
        self.search = SearchCache::default();
        self
    }
}

/// A `size x size` plane shrunk by `factor` (mean of each `factor x factor` block), as values
/// in `[0, 1]`.
fn shrink_plane(plane: &[u8], size: usize, factor: usize) -> Vec<f32> {
    let side = (size / factor).max(1);
    let f = factor.min(size).max(1);
    let scale = 1.0 / (255.0 * (f * f) as f32);
    let mut out = vec![0.0f32; side * side];
    for y in 0..side {
        for x in 0..side {
            let mut sum = 0u32;
            for dy in 0..f {
                let row = &plane[(y * f + dy) * size + x * f..];
                sum += row[..f].iter().map(|&v| u32::from(v)).sum::<u32>();
            }
            out[y * side + x] = sum as f32 * scale;
        }
    }
    out
}

/// Local contrast normalisation of a `side x side` plane: `c = v - mean`, then
/// `c / (rms + floor)`, where `mean` is the mean of `v` and `rms` the root mean square of `c` over
/// the `window x window` neighbourhood clipped to the plane (box sums from summed-area tables, so
/// the cost does not grow with the window).
fn contrast_normalise(plane: &[f32], side: usize, window: usize, floor: f32) -> Vec<f32> {
    let centred: Vec<f32> = plane
        .iter()
        .zip(box_mean(plane, side, window))
        .map(|(&v, m)| v - m)
        .collect();
    let squares: Vec<f32> = centred.iter().map(|c| c * c).collect();
    centred
        .iter()
        .zip(box_mean(&squares, side, window))
        .map(|(&c, ms)| c / (ms.max(0.0).sqrt() + floor))
        .collect()
}

/// Mean of every `window x window` neighbourhood (clipped to the plane) of a `side x side` plane.
fn box_mean(plane: &[f32], side: usize, window: usize) -> Vec<f32> {
    let stride = side + 1;
    let mut sum = vec![0.0f64; stride * stride];
    for y in 0..side {
        let mut row = 0.0f64;
        for x in 0..side {
            row += f64::from(plane[y * side + x]);
            sum[(y + 1) * stride + x + 1] = sum[y * stride + x + 1] + row;
        }
    }
    let r = window / 2;
    let mut out = vec![0.0f32; side * side];
    for y in 0..side {
        let (y0, y1) = (y.saturating_sub(r), (y + r + 1).min(side));
        for x in 0..side {
            let (x0, x1) = (x.saturating_sub(r), (x + r + 1).min(side));
            let n = ((y1 - y0) * (x1 - x0)) as f64;
            let total = sum[y1 * stride + x1] - sum[y0 * stride + x1] - sum[y1 * stride + x0]
                + sum[y0 * stride + x0];
            out[y * side + x] = (total / n) as f32;
        }
    }
    out
}

/// A tenth of the standard deviation of all pixel values of `images` (in `[0, 1]`, at least
/// 1e-3): the [`PatchMemorySpec::contrast_floor`] fitted to them.
pub fn contrast_floor_for(images: &[&PreparedImage]) -> f32 {
    let (mut n, mut sum, mut sum_sq) = (0f64, 0f64, 0f64);
    for img in images {
        for &v in &img.pixels {
            let v = f64::from(v) / 255.0;
            n += 1.0;
            sum += v;
            sum_sq += v * v;
        }
    }
    if n == 0.0 {
        return 1e-3;
    }
    let mean = sum / n;
    let std = (sum_sq / n - mean * mean).max(0.0).sqrt();
    ((0.1 * std) as f32).max(1e-3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PatchMemorySpec {
        PatchMemorySpec {
            channels: 1,
            widths: vec![4, 6, 8],
            memory_patches: 16,
            contrast_window_px: 7,
            contrast_floor: 0.01,
            input_shrink: 2,
        }
    }

    #[test]
    fn features_have_the_documented_shape_and_a_remembered_patch_is_at_distance_zero() {
        let device = Device::flex();
        let s = spec();
        assert!(s.is_plausible());
        let model = s.init(&device);
        let input = Tensor::<4>::random(
            [1, 1, 32, 32],
            burn::tensor::Distribution::Uniform(0.0, 1.0),
            &device,
        );
        let f = model.features(input.clone());
        assert_eq!(f.dims(), [1, 14, 8, 8]);
        let all = f.permute([0, 2, 3, 1]).reshape([64, 14]);
        let model = model.with_memory(all.slice([0..16, 0..14]));
        let d: Vec<f32> = model
            .distances(input)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(d.len(), 64);
        assert!(d[..16].iter().all(|&v| v < 1e-2), "{:?}", &d[..16]);
        assert!(d[16..].iter().any(|&v| v > 1e-2));
    }

    #[test]
    fn kernels_compute_what_burns_operations_compute() {
        let device = Device::flex();
        let s = PatchMemorySpec {
            widths: vec![5, 6, 7],
            memory_patches: 40,
            ..spec()
        };
        let model = s.init(&device);
        let input = Tensor::<4>::random(
            [3, 1, 36, 28],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let (rows, [b, h, w]) = model.patch_rows_by_kernels(input.clone());
        let features = model.features(input.clone());
        assert_eq!(features.dims(), [b, 13, h, w]);
        let reference = features
            .permute([0, 2, 3, 1])
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(rows.len(), reference.len());
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * (1.0 + b.abs());
        for (i, (a, r)) in rows.iter().zip(&reference).enumerate() {
            assert!(close(*a, *r), "feature {i}: kernels {a}, burn {r}");
        }
        let memory = Tensor::<2>::random(
            [40, 13],
            burn::tensor::Distribution::Normal(0.0, 0.3),
            &device,
        );
        let model = model.with_memory(memory);
        let by_kernels = model.distances_by_kernels(input.clone()).into_data();
        let by_burn = model.distances_by_burn(input).into_data();
        let (k, r) = (
            by_kernels.as_slice::<f32>().unwrap(),
            by_burn.as_slice::<f32>().unwrap(),
        );
        assert_eq!(k.len(), b * h * w);
        for (i, (a, r)) in k.iter().zip(r).enumerate() {
            assert!(
                (a - r).abs() <= 1e-3 * (1.0 + r.abs()),
                "distance {i}: kernels {a}, burn {r}"
            );
        }
    }

    #[test]
    fn contrast_normalisation_removes_brightness_and_contrast() {
        let side = 16;
        let plane: Vec<f32> = (0..side * side)
            .map(|i| ((i * 7919) % 13) as f32 / 13.0)
            .collect();
        let brighter: Vec<f32> = plane.iter().map(|v| 0.2 + 0.5 * v).collect();
        let a = contrast_normalise(&plane, side, 5, 1e-6);
        let b = contrast_normalise(&brighter, side, 5, 1e-6);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-3, "{x} {y}");
        }
        let flat = contrast_normalise(&[0.5; 64], 8, 3, 0.01);
        assert!(flat.iter().all(|v| v.abs() < 1e-6));
        assert_eq!(shrink_plane(&[0, 255, 255, 0], 2, 2), vec![0.5]);
    }
}
