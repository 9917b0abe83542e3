//! Pictures of results shared by the command line and the app: the anomaly heatmap blended over the
//! image with the abnormal region outlined.

use crate::engine::dataset::decode::{ColourMode, DecodedImage};
use crate::engine::inference::Inspection;

/// Colour of the region outline (RGB).
pub const OUTLINE_RGB: [u8; 3] = [255, 32, 32];

/// A perceptually ordered heat colour for `t` in `[0, 1]` (black-purple-orange-yellow, like
/// "inferno").
pub fn heat_colour(t: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [0.0, 0.0, 0.02],
        [0.34, 0.06, 0.43],
        [0.73, 0.21, 0.33],
        [0.98, 0.55, 0.04],
        [0.99, 1.0, 0.64],
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        1.0
    };
    let x = t * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f32;
    let c = |k: usize| ((STOPS[i][k] + (STOPS[i + 1][k] - STOPS[i][k]) * f) * 255.0).round() as u8;
    [c(0), c(1), c(2)]
}

/// How strongly the heatmap shows at a pixel with anomaly `value`, given the segmentation
/// threshold: invisible below half the threshold, fully visible from twice the threshold.
pub fn heat_fraction(value: f32, segmentation_threshold: f32) -> f32 {
    let t = segmentation_threshold.max(f32::MIN_POSITIVE);
    ((value / t - 0.5) / 1.5).clamp(0.0, 1.0)
}

/// Whether pixel `i` of a `width`-wide mask lies on the region's edge (set, with an unset or
/// out-of-image 4-neighbour).
pub fn is_outline(mask: &[bool], width: usize, i: usize) -> bool {
    if !mask[i] {
        return false;
    }
    let height = mask.len() / width;
    let (x, y) = (i % width, i / width);
    x == 0
        || y == 0
        || x + 1 == width
        || y + 1 == height
        || !mask[i - 1]
        || !mask[i + 1]
        || !mask[i - width]
        || !mask[i + width]
}

/// The image with the heatmap blended over it (up to `opacity`) and the region outlined.
pub fn overlay(image: &DecodedImage, inspection: &Inspection, opacity: f32) -> image::RgbImage {
    let (w, h) = (image.width as usize, image.height as usize);
    let seg = inspection.thresholds.segmentation;
    let mut out = image::RgbImage::new(image.width, image.height);
    for (i, px) in out.pixels_mut().enumerate() {
        let base = match image.mode {
            ColourMode::Mono => [image.pixels[i]; 3],
            ColourMode::Colour => [
                image.pixels[3 * i],
                image.pixels[3 * i + 1],
                image.pixels[3 * i + 2],
            ],
        };
        let v = inspection.map.values.get(i).copied().unwrap_or(0.0);
        let a = heat_fraction(v, seg) * opacity;
        let heat = heat_colour(heat_fraction(v, seg));
        let mut rgb = [0u8; 3];
        for k in 0..3 {
            rgb[k] = (f32::from(base[k]) * (1.0 - a) + f32::from(heat[k]) * a).round() as u8;
        }
        if inspection.region.mask.len() == w * h && is_outline(&inspection.region.mask, w, i) {
            rgb = OUTLINE_RGB;
        }
        *px = image::Rgb(rgb);
    }
    out
}
