//! Inspection: one image in, one [`Inspection`] out (anomaly map at the image's own resolution,
//! anomaly score, abnormal region, class and class ID). Thresholds are inputs here, never part of
//! the model, so the GUI can move them and re-derive regions and verdicts without re-running the
//! network ([`Inspection::apply_thresholds`]).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::engine::dataset::decode::{ColourMode, DecodeError, DecodedImage, decode_image};
use crate::engine::dataset::prepare::PreparedImage;
use crate::engine::metrics::{Component, connected_components, quantile};
use crate::engine::model::conv_ops::uses_kernels;
use crate::engine::model::{ModelFile, ModelHeader, Network};

/// Quantile of the validation good images' scores used as the suggested classification threshold.
pub const SUGGESTED_SCORE_QUANTILE: f64 = 0.99;

/// The two thresholds, in anomaly-map units: how many "typical variations" ([`ErrorStats`]) the
/// smoothed reconstruction error of a pixel lies above its usual value on good images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// A pixel whose anomaly value is at or above this is abnormal (part of the region).
    pub segmentation: f32,
    /// An image whose anomaly score is at or above this is nok.
    pub classification: f32,
}

/// Suggests thresholds from the scores of validation good images: the classification threshold is
/// the [`SUGGESTED_SCORE_QUANTILE`] quantile of those scores (so roughly 1 % of good images would be
/// flagged), and the segmentation threshold equals it, so that a pixel is abnormal when it alone
/// would make the image nok, and an image is nok exactly when it has an abnormal region. `None`
/// without validation scores.
pub fn suggest_thresholds(validation_scores: &[f32]) -> Option<Thresholds> {
    let t = quantile(validation_scores, SUGGESTED_SCORE_QUANTILE)?;
    Some(Thresholds {
        segmentation: t,
        classification: t,
    })
}

/// The verdict for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Looks like the good images.
    Good,
    /// Not ok: abnormal.
    Nok,
}

impl Class {
    /// Classification ID: good = 0, nok = 1.
    pub fn id(self) -> u8 {
        match self {
            Class::Good => 0,
            Class::Nok => 1,
        }
    }

    /// "good" or "nok".
    pub fn label(self) -> &'static str {
        match self {
            Class::Good => "good",
            Class::Nok => "nok",
        }
    }
}

/// A per-pixel anomaly map, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyMap {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height` anomaly values (higher = more abnormal).
    pub values: Vec<f32>,
}

/// The abnormal region: pixels at or above the segmentation threshold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Region {
    /// Abnormal pixels, row-major, same size as the anomaly map.
    pub mask: Vec<bool>,
    /// Number of abnormal pixels.
    pub area_px: u64,
    /// 8-connected parts of the region, largest first, with area and bounding box.
    pub components: Vec<Component>,
}

impl Region {
    /// The region of `map` at `threshold`.
    pub fn from_map(map: &AnomalyMap, threshold: f32) -> Region {
        let mask: Vec<bool> = map.values.iter().map(|&v| v >= threshold).collect();
        let area_px = mask.iter().filter(|&&m| m).count() as u64;
        let components = if area_px == 0 {
            Vec::new()
        } else {
            connected_components(&mask, map.width as usize, map.height as usize)
        };
        Region {
            mask,
            area_px,
            components,
        }
    }
}

/// The result of inspecting one image.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// Anomaly map at the inspected image's resolution.
    pub map: AnomalyMap,
    /// Anomaly score: the maximum of the anomaly map at model resolution.
    pub score: f32,
    /// Thresholds the region and class were derived with.
    pub thresholds: Thresholds,
    /// Abnormal region at the segmentation threshold.
    pub region: Region,
    /// Verdict at the classification threshold.
    pub class: Class,
}

impl Inspection {
    /// Builds an inspection from a map and score at the given thresholds.
    pub fn new(map: AnomalyMap, score: f32, thresholds: Thresholds) -> Inspection {
        let region = Region::from_map(&map, thresholds.segmentation);
        let class = classify(score, thresholds.classification);
        Inspection {
            map,
            score,
            thresholds,
            region,
            class,
        }
    }

    /// Re-derives region and class for new thresholds, without re-running the model. The region is
    /// only recomputed when the segmentation threshold changed.
    pub fn apply_thresholds(&mut self, thresholds: Thresholds) {
        if thresholds.segmentation != self.thresholds.segmentation {
            self.region = Region::from_map(&self.map, thresholds.segmentation);
        }
        self.class = classify(self.score, thresholds.classification);
        self.thresholds = thresholds;
    }

    /// Classification ID: good = 0, nok = 1.
    pub fn class_id(&self) -> u8 {
        self.class.id()
    }
}

/// The verdict for a score: nok when `score >= classification_threshold` (NaN scores are nok).
pub fn classify(score: f32, classification_threshold: f32) -> Class {
    if score >= classification_threshold || score.is_nan() {
        Class::Nok
    } else {
        Class::Good
    }
}

/// Converts prepared images into one model input batch `[batch, channels, size, size]`, values in
/// `[0, 1]`. All images must have the same size and mode.
pub fn batch_tensor(images: &[&PreparedImage], device: &Device) -> Tensor<4> {
    let size = images.first().map(|i| i.size_px as usize).unwrap_or(0);
    let channels = images.first().map(|i| i.mode.channels()).unwrap_or(1);
    let mut data = Vec::with_capacity(images.len() * channels * size * size);
    for img in images {
        data.extend(img.pixels.iter().map(|&v| f32::from(v) / 255.0));
    }
    Tensor::from_data(
        TensorData::new(data, [images.len(), channels, size, size]),
        device,
    )
}

/// Gaussian smoothing applied to the raw anomaly map before scoring: sigma in pixels at model
/// resolution, `max(1, size / 128)` for the autoencoder's pixel errors and twice that for the
/// patch memory's distances, whose patches overlap already.
pub fn smoothing_sigma_px(network: &Network, size_px: u32) -> f32 {
    let base = (size_px as f32 / 128.0).max(1.0);
    match network {
        Network::Autoencoder(_) => base,
        Network::PatchMemory(_) => 2.0 * base,
    }
}

/// Per-pixel statistics of the smoothed reconstruction error of the training good images, at
/// model resolution. Anomaly maps are expressed relative to them: places the model always redraws
/// poorly (fine texture, sharp pattern edges) stop looking abnormal, and what remains is what good
/// images do not show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorStats {
    /// Mean error per pixel (`size * size`).
    pub mean: Vec<f32>,
    /// Standard deviation of the error per pixel (`size * size`).
    pub std: Vec<f32>,
    /// Added to every standard deviation: the mean of `std`, so that pixels that hardly vary do
    /// not turn noise into huge values.
    pub std_floor: f32,
}

impl ErrorStats {
    /// Statistics of `maps` (each `size * size`); `None` without maps.
    pub fn from_maps(maps: impl IntoIterator<Item = Vec<f32>>) -> Option<ErrorStats> {
        let mut n = 0f64;
        let mut mean: Vec<f64> = Vec::new();
        let mut m2: Vec<f64> = Vec::new();
        for map in maps {
            if mean.is_empty() {
                mean = vec![0.0; map.len()];
                m2 = vec![0.0; map.len()];
            }
            if map.len() != mean.len() {
                continue;
            }
            n += 1.0;
            for (i, &v) in map.iter().enumerate() {
                let d = f64::from(v) - mean[i];
                mean[i] += d / n;
                m2[i] += d * (f64::from(v) - mean[i]);
            }
        }
        if n < 1.0 {
            return None;
        }
        let std: Vec<f32> = m2.iter().map(|&m| (m / n).sqrt() as f32).collect();
        let std_floor =
            (std.iter().map(|&s| f64::from(s)).sum::<f64>() / std.len().max(1) as f64) as f32;
        Some(ErrorStats {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
            std_floor: std_floor.max(1e-12),
        })
    }

    /// Rewrites a smoothed error map as `(error - mean) / (std + std_floor)`, per pixel.
    pub fn normalize(&self, map: &mut [f32]) {
        if map.len() != self.mean.len() {
            return;
        }
        for ((v, m), s) in map.iter_mut().zip(&self.mean).zip(&self.std) {
            *v = (*v - m) / (s + self.std_floor);
        }
    }
}

/// Raw anomaly maps `[batch, 1, h, w]` of prepared images (one size and mode): the squared
/// reconstruction error averaged over channels (autoencoder, `h = w = size`) or the distance of
/// each patch to the nearest good one (patch memory, `h = w = size / (4 * input_shrink)`).
pub fn raw_anomaly_maps(
    network: &Network,
    images: &[&PreparedImage],
    device: &Device,
) -> Tensor<4> {
    match network {
        Network::Autoencoder(n) if uses_kernels(device) => {
            let input = batch_tensor(images, device);
            let [b, c, h, w] = input.dims();
            let values = input.into_data().try_to_vec::<f32>().unwrap_or_default();
            let maps = n.error_maps_by_kernels(&values, b, c, h);
            Tensor::from_data(TensorData::new(maps, [b, 1, h, w]), device)
        }
        Network::Autoencoder(n) => {
            let input = batch_tensor(images, device);
            (n.forward(input.clone()) - input).square().mean_dim(1)
        }
        Network::PatchMemory(n) => n.distances(n.input(images, device)),
    }
}

/// Smoothed anomaly maps at model resolution (`size * size` values each) for a batch of prepared
/// images: [`raw_anomaly_maps`] brought to model size, Gaussian smoothed
/// ([`smoothing_sigma_px`]), and, when `stats` are given, normalised by them
/// ([`ErrorStats::normalize`]).
pub fn anomaly_maps_at_model_size(
    network: &Network,
    images: &[&PreparedImage],
    device: &Device,
    stats: Option<&ErrorStats>,
) -> Vec<Vec<f32>> {
    if images.is_empty() {
        return Vec::new();
    }
    let size = images[0].size_px as usize;
    let raw = raw_anomaly_maps(network, images, device);
    let [_, _, h, w] = raw.dims();
    let values: Vec<f32> = raw.into_data().try_to_vec::<f32>().unwrap_or_default();
    let sigma = smoothing_sigma_px(network, size as u32);
    use rayon::prelude::*;
    values
        .par_chunks_exact(h * w)
        .map(|m| {
            let full;
            let m = if (h, w) == (size, size) {
                m
            } else {
                full = resize_map(m, w, h, size as u32, size as u32);
                &full
            };
            let mut map = gaussian_blur(m, size, size, sigma);
            if let Some(stats) = stats {
                stats.normalize(&mut map);
            }
            map
        })
        .collect()
}

/// Anomaly maps of prepared images computed `batch_size` at a time (see
/// [`anomaly_maps_at_model_size`]).
pub fn anomaly_maps_batched<'a>(
    network: &'a Network,
    images: &'a [&'a PreparedImage],
    batch_size: usize,
    device: &'a Device,
    stats: Option<&'a ErrorStats>,
) -> impl Iterator<Item = Vec<f32>> + 'a {
    images
        .chunks(batch_size.max(1))
        .flat_map(move |chunk| anomaly_maps_at_model_size(network, chunk, device, stats))
}

/// Anomaly scores (maximum of the anomaly map at model resolution) of prepared images. Used for
/// validation images and threshold suggestions.
pub fn image_scores(
    network: &Network,
    images: &[&PreparedImage],
    batch_size: usize,
    device: &Device,
    stats: Option<&ErrorStats>,
) -> Vec<f32> {
    anomaly_maps_batched(network, images, batch_size, device, stats)
        .map(|m| m.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .collect()
}

/// The normalised taps of a Gaussian of `sigma`, over `ceil(3 sigma)` on either side.
fn gaussian_taps(sigma: f32) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil() as isize;
    let taps: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = taps.iter().sum();
    taps.iter().map(|k| k / sum).collect()
}

/// Separable Gaussian blur of a row-major `width x height` map (edges clamp). Each pass adds the
/// taps in order over whole rows (so the loops vectorise); every value is the same sum, in the
/// same order, as a per-pixel loop over the taps.
pub fn gaussian_blur(values: &[f32], width: usize, height: usize, sigma: f32) -> Vec<f32> {
    let kernel = gaussian_taps(sigma);
    let radius = (kernel.len() / 2) as isize;
    if width == 0 || height == 0 {
        return vec![0.0; values.len()];
    }
    let r = radius as usize;
    // Horizontal: each row padded with copies of its edge pixels, then the taps slide over it.
    let mut tmp = vec![0.0f32; values.len()];
    let mut padded = vec![0.0f32; width + 2 * r];
    for (row, out) in values.chunks_exact(width).zip(tmp.chunks_exact_mut(width)) {
        padded[..r].fill(row[0]);
        padded[r..r + width].copy_from_slice(row);
        padded[r + width..].fill(row[width - 1]);
        for (k, &w) in kernel.iter().enumerate() {
            out.iter_mut()
                .zip(&padded[k..k + width])
                .for_each(|(o, &v)| *o += w * v);
        }
    }
    // Vertical: each output row adds whole (clamped) input rows, tap by tap.
    let mut out = vec![0.0f32; values.len()];
    for (y, out_row) in out.chunks_exact_mut(width).enumerate() {
        for (k, &w) in kernel.iter().enumerate() {
            let src_y = (y as isize + k as isize - radius).clamp(0, height as isize - 1) as usize;
            out_row
                .iter_mut()
                .zip(&tmp[src_y * width..(src_y + 1) * width])
                .for_each(|(o, &v)| *o += w * v);
        }
    }
    out
}

/// Bilinear resize of a row-major map to `width x height` (pixel centres aligned).
pub fn resize_map(
    values: &[f32],
    from_w: usize,
    from_h: usize,
    width: u32,
    height: u32,
) -> Vec<f32> {
    let (w, h) = (width as usize, height as usize);
    let sx = from_w as f32 / w as f32;
    let sy = from_h as f32 / h as f32;
    let mut out = vec![0.0f32; w * h];
    let xs: Vec<(usize, usize, f32)> = (0..w)
        .map(|x| {
            let fx = ((x as f32 + 0.5) * sx - 0.5).clamp(0.0, (from_w - 1) as f32);
            let x0 = fx.floor() as usize;
            (x0, (x0 + 1).min(from_w - 1), fx - x0 as f32)
        })
        .collect();
    for y in 0..h {
        let fy = ((y as f32 + 0.5) * sy - 0.5).clamp(0.0, (from_h - 1) as f32);
        let y0 = fy.floor() as usize;
        let y1 = (y0 + 1).min(from_h - 1);
        let ty = fy - y0 as f32;
        let (r0, r1) = (&values[y0 * from_w..], &values[y1 * from_w..]);
        for (x, &(x0, x1, tx)) in xs.iter().enumerate() {
            let top = r0[x0] + (r0[x1] - r0[x0]) * tx;
            let bottom = r1[x0] + (r1[x1] - r1[x0]) * tx;
            out[y * w + x] = top + (bottom - top) * ty;
        }
    }
    out
}

/// A loaded model ready to inspect images.
#[derive(Debug)]
pub struct Inspector {
    /// The model file's header (settings, suggested thresholds).
    pub header: ModelHeader,
    network: Network,
    device: Device,
}

/// An inspected file, or why it could not be inspected.
pub type FileInspection = (PathBuf, Result<Inspection, DecodeError>);

impl Inspector {
    /// Loads a model file for inspection on `device`.
    pub fn load(
        path: &Path,
        device: &Device,
    ) -> Result<Inspector, crate::engine::model::ModelFileError> {
        let file = ModelFile::load(path, device)?;
        Ok(Self::from_model(file, device))
    }

    /// Wraps an already loaded model.
    pub fn from_model(file: ModelFile, device: &Device) -> Inspector {
        Inspector {
            header: file.header,
            network: file.network.valid(),
            device: device.clone(),
        }
    }

    /// The network (inference mode).
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The model's suggested thresholds.
    pub fn suggested_thresholds(&self) -> Thresholds {
        self.header.suggested_thresholds
    }

    /// Colour mode of the model's input.
    pub fn mode(&self) -> ColourMode {
        self.header.mode
    }

    /// Inspects decoded images in one batch.
    pub fn inspect_images(
        &self,
        images: &[&DecodedImage],
        thresholds: Thresholds,
    ) -> Vec<Inspection> {
        let size = self.header.image_size_px;
        let prepared: Vec<PreparedImage> = images
            .iter()
            .map(|img| PreparedImage::from_decoded(img, size, self.header.mode))
            .collect();
        let refs: Vec<&PreparedImage> = prepared.iter().collect();
        let maps = anomaly_maps_at_model_size(
            &self.network,
            &refs,
            &self.device,
            self.header.error_stats.as_ref(),
        );
        // Upsampling to full resolution and region extraction are per image: in parallel.
        use rayon::prelude::*;
        maps.into_par_iter()
            .zip(images.par_iter())
            .map(|(small, img)| {
                let score = small.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let values =
                    resize_map(&small, size as usize, size as usize, img.width, img.height);
                let map = AnomalyMap {
                    width: img.width,
                    height: img.height,
                    values,
                };
                Inspection::new(map, score, thresholds)
            })
            .collect()
    }

    /// Inspects one decoded image.
    pub fn inspect(&self, image: &DecodedImage, thresholds: Thresholds) -> Inspection {
        self.inspect_images(&[image], thresholds)
            .pop()
            .expect("one image in, one inspection out")
    }

    /// Anomaly scores of prepared images (see [`image_scores`]).
    pub fn scores_of_prepared(&self, images: &[&PreparedImage], batch_size: usize) -> Vec<f32> {
        image_scores(
            &self.network,
            images,
            batch_size,
            &self.device,
            self.header.error_stats.as_ref(),
        )
    }

    /// Decodes and inspects files, `batch_size` at a time (decoding in parallel). Unreadable files
    /// give an error naming them; the others proceed. `on_result` is called in input order.
    pub fn inspect_files(
        &self,
        paths: &[PathBuf],
        thresholds: Thresholds,
        batch_size: usize,
        on_result: &mut dyn FnMut(FileInspection),
    ) {
        use rayon::prelude::*;
        for chunk in paths.chunks(batch_size.max(1)) {
            let decoded: Vec<Result<DecodedImage, DecodeError>> =
                chunk.par_iter().map(|p| decode_image(p)).collect();
            let ok: Vec<&DecodedImage> = decoded.iter().filter_map(|d| d.as_ref().ok()).collect();
            let mut inspections = self.inspect_images(&ok, thresholds).into_iter();
            for (path, d) in chunk.iter().zip(decoded) {
                let result = match d {
                    Ok(_) => Ok(inspections
                        .next()
                        .expect("one inspection per decoded image")),
                    Err(e) => Err(e),
                };
                on_result((path.clone(), result));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_flip_class_and_region_without_rerunning() {
        let mut values = vec![0.0f32; 100];
        values[55] = 1.0;
        values[56] = 0.6;
        let map = AnomalyMap {
            width: 10,
            height: 10,
            values,
        };
        let t = Thresholds {
            segmentation: 0.5,
            classification: 0.8,
        };
        let mut ins = Inspection::new(map, 1.0, t);
        assert_eq!(ins.class, Class::Nok);
        assert_eq!(ins.class_id(), 1);
        assert_eq!(ins.region.area_px, 2);
        assert_eq!(ins.region.components.len(), 1);
        assert_eq!(ins.region.components[0].bbox, [5, 5, 2, 1]);
        ins.apply_thresholds(Thresholds {
            segmentation: 0.9,
            classification: 1.5,
        });
        assert_eq!(ins.class, Class::Good);
        assert_eq!(ins.class_id(), 0);
        assert_eq!(ins.region.area_px, 1);
    }

    #[test]
    fn blur_keeps_mass_and_resize_keeps_constant_maps() {
        let mut v = vec![0.0f32; 21 * 21];
        v[10 * 21 + 10] = 1.0;
        let b = gaussian_blur(&v, 21, 21, 2.0);
        let total: f32 = b.iter().sum();
        assert!((total - 1.0).abs() < 1e-3, "{total}");
        assert!(b[10 * 21 + 10] < 1.0 && b[10 * 21 + 10] > b[10 * 21 + 12]);
        let r = resize_map(&[2.0; 16], 4, 4, 13, 7);
        assert!(r.iter().all(|&x| (x - 2.0).abs() < 1e-6));
        // Clamped edges, per pixel and tap by tap: the same sums in the same order.
        let (w, h, sigma) = (9usize, 5usize, 1.5f32);
        let m: Vec<f32> = (0..w * h).map(|i| ((i * 37) % 11) as f32).collect();
        let k = gaussian_taps(sigma);
        let radius = (k.len() / 2) as isize;
        let at = |v: &[f32], x: isize, y: isize| {
            v[y.clamp(0, h as isize - 1) as usize * w + x.clamp(0, w as isize - 1) as usize]
        };
        let pass = |v: &[f32], horizontal: bool| -> Vec<f32> {
            (0..w * h)
                .map(|i| {
                    let (x, y) = ((i % w) as isize, (i / w) as isize);
                    k.iter().enumerate().fold(0.0, |acc, (j, wt)| {
                        let d = j as isize - radius;
                        acc + wt
                            * if horizontal {
                                at(v, x + d, y)
                            } else {
                                at(v, x, y + d)
                            }
                    })
                })
                .collect()
        };
        assert_eq!(gaussian_blur(&m, w, h, sigma), pass(&pass(&m, true), false));
    }

    #[test]
    fn suggestion_is_the_documented_quantile() {
        let scores: Vec<f32> = (1..=101).map(|i| i as f32).collect();
        let t = suggest_thresholds(&scores).unwrap();
        assert!((t.classification - 100.0).abs() < 1e-4);
        assert_eq!(t.segmentation, t.classification);
        assert!(suggest_thresholds(&[]).is_none());
    }
}
