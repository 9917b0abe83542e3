//! Synthetic wafer-die demo dataset.
//!
//! Renders small greyscale (or tinted colour) images of a semiconductor die seen from above: a dark
//! street around a lighter die body that carries a repeating circuit-like pattern and a ring of bond
//! pads. Good dies vary only in exposure, a small shift, vignetting and sensor noise; defective dies
//! additionally carry one of four [`DefectKind`]s together with an exact pixel mask.
//!
//! [`write_demo_dataset`] lays the images out in the MVTec AD folder structure so that
//! `inkspect demo <dir>` gives a new user something to train on, and tests get small deterministic
//! images from [`render_die`] and [`DemoSpec::tiny`].

use std::path::{Path, PathBuf};

use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Kinds of synthetic defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DefectKind {
    /// A soft, irregular dark blotch with blurred edges.
    Dirt,
    /// A thin bright or dark line, straight or slightly curved.
    Scratch,
    /// A bite missing from the die edge, showing the street behind it.
    ChippedEdge,
    /// A small compact bright or dark blob with sharp edges.
    Particle,
}

impl DefectKind {
    /// All defect kinds, in a fixed order.
    pub const ALL: [DefectKind; 4] = [
        DefectKind::Dirt,
        DefectKind::Scratch,
        DefectKind::ChippedEdge,
        DefectKind::Particle,
    ];

    /// The folder (and file-name prefix) used for this kind in the dataset layout.
    pub fn folder_name(self) -> &'static str {
        match self {
            DefectKind::Dirt => "dirt",
            DefectKind::Scratch => "scratch",
            DefectKind::ChippedEdge => "chipped_edge",
            DefectKind::Particle => "particle",
        }
    }

    fn stream(self) -> u64 {
        match self {
            DefectKind::Dirt => 1,
            DefectKind::Scratch => 2,
            DefectKind::ChippedEdge => 3,
            DefectKind::Particle => 4,
        }
    }
}

/// Settings of the generated dataset.
#[derive(Debug, Clone)]
pub struct DemoSpec {
    /// Width and height of every image, in pixels.
    pub size_px: u32,
    /// Number of good dies in `train/good`.
    pub n_train_good: usize,
    /// Number of good dies in `test/good`.
    pub n_test_good: usize,
    /// Number of defective dies written for each [`DefectKind`] in `test/<kind>`.
    pub n_test_nok_per_kind: usize,
    /// `true` writes tinted RGB images, `false` greyscale ones.
    pub colour: bool,
    /// Seed of the whole dataset; the same seed gives identical files.
    pub seed: u64,
}

impl Default for DemoSpec {
    /// 256 px greyscale dies: 120 train good, 20 test good, 6 defective per kind, seed 7.
    fn default() -> Self {
        DemoSpec {
            size_px: 256,
            n_train_good: 120,
            n_test_good: 20,
            n_test_nok_per_kind: 6,
            colour: false,
            seed: 7,
        }
    }
}

impl DemoSpec {
    /// A small, fast dataset for tests: 64 px, 24 train good, 6 test good, 2 defective per kind.
    pub fn tiny() -> Self {
        DemoSpec {
            size_px: 64,
            n_train_good: 24,
            n_test_good: 6,
            n_test_nok_per_kind: 2,
            ..DemoSpec::default()
        }
    }
}

/// One rendered die: the image (Luma8 when mono, Rgb8 when colour) and, for a defective die, its
/// mask (Luma8, 0 normal / 255 defect, same size).
#[derive(Debug, Clone)]
pub struct RenderedDie {
    /// The die image.
    pub image: DynamicImage,
    /// The defect mask, `None` for a good die.
    pub mask: Option<GrayImage>,
}

/// What [`write_demo_dataset`] wrote.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    /// The dataset root folder.
    pub root: PathBuf,
    /// Number of images written to `train/good`.
    pub n_train_good: usize,
    /// Number of images written to `test/good`.
    pub n_test_good: usize,
    /// Number of defective images written under `test/<kind>`, all kinds together.
    pub n_test_nok: usize,
}

/// Failure while writing the demo dataset.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A folder or file could not be created or written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An image could not be encoded or saved.
    #[error("cannot save image {path}: {source}")]
    Image {
        /// The image path that failed.
        path: PathBuf,
        /// The underlying error.
        source: image::ImageError,
    },
}

// ---------------------------------------------------------------------------------------------
// Seeding
// ---------------------------------------------------------------------------------------------

/// SplitMix64 finaliser: a good 64-bit mixer.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Independent random stream `stream` for die `index` of dataset `seed`.
fn stream_rng(seed: u64, index: u64, stream: u64) -> ChaCha8Rng {
    let s = mix64(mix64(mix64(seed) ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93)) ^ stream);
    ChaCha8Rng::seed_from_u64(s)
}

// ---------------------------------------------------------------------------------------------
// Die geometry and clean rendering
// ---------------------------------------------------------------------------------------------

/// Grey level of the street (background) before gain and vignetting.
const STREET: f32 = 34.0;
/// Grey level of the bare die body.
const BODY: f32 = 100.0;
/// Grey level of the edge seal ring.
const SEAL: f32 = 140.0;
/// Grey level of the metal traces.
const TRACE: f32 = 148.0;
/// Grey level of the cell windows.
const WINDOW: f32 = 118.0;
/// Grey level of the bond pads.
const PAD: f32 = 206.0;
/// Grey levels a cell can take (chosen by a fixed hash of its grid position).
const CELL_LEVELS: [f32; 3] = [152.0, 166.0, 180.0];
/// Cells per side of the die's inner pattern.
const N_CELLS: usize = 6;
/// Bond pads per die edge.
const N_PADS: usize = 8;
/// Minimum absolute change (grey levels, before noise) that counts as a defect pixel.
const MASK_THRESHOLD: f32 = 10.0;
/// Standard deviation of the sensor noise, in grey levels.
const NOISE_SIGMA: f32 = 2.5;
/// Smallest image side rendered, in pixels.
const MIN_SIZE_PX: u32 = 8;

/// Fraction of the pixel `[p, p + 1)` covered by the interval `[a, b)`.
#[inline]
fn cover(p: f32, a: f32, b: f32) -> f32 {
    ((p + 1.0).min(b) - p.max(a)).clamp(0.0, 1.0)
}

#[inline]
fn lerp(a: f32, b: f32, t: f32) -> f32 {
    a + (b - a) * t
}

#[inline]
fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Where the die sits in one image and how it is lit.
#[derive(Debug, Clone, Copy)]
struct Die {
    size: u32,
    /// Left and top edge of the die body, in pixels (sub-pixel).
    x0: f32,
    y0: f32,
    /// Side of the die body, in pixels.
    side: f32,
    gain: f32,
    vignette: f32,
    vig_cx: f32,
    vig_cy: f32,
}

impl Die {
    fn new(size: u32, rng: &mut ChaCha8Rng) -> Die {
        let s = size as f32;
        let side = 0.85 * s;
        let margin = 0.5 * (s - side);
        let shift = 0.02 * s;
        Die {
            size,
            // Whole-pixel shifts keep good dies pixel-for-pixel alike once aligned.
            x0: margin + rng.random_range(-shift..=shift).round(),
            y0: margin + rng.random_range(-shift..=shift).round(),
            side,
            gain: 1.0 + rng.random_range(-0.08f32..=0.08),
            vignette: rng.random_range(0.08f32..0.14),
            vig_cx: s * (0.5 + rng.random_range(-0.05f32..0.05)),
            vig_cy: s * (0.5 + rng.random_range(-0.05f32..0.05)),
        }
    }

    /// Multiplicative illumination (gain times vignetting) at a pixel centre.
    #[inline]
    fn light(&self, x: f32, y: f32) -> f32 {
        let h = 0.5 * self.size as f32;
        let dx = (x - self.vig_cx) / h;
        let dy = (y - self.vig_cy) / h;
        self.gain * (1.0 - 0.5 * self.vignette * (dx * dx + dy * dy))
    }

    /// The street (background) grey level at a pixel, as it would look without the die.
    #[inline]
    fn background(&self, x: usize, y: usize) -> f32 {
        STREET * self.light(x as f32 + 0.5, y as f32 + 0.5)
    }

    /// Random point on the die body, at least `inset` (fraction of the side) from its edges.
    fn point_on_body(&self, rng: &mut ChaCha8Rng, inset: f32) -> (f32, f32) {
        let lo = inset * self.side;
        let hi = (1.0 - inset) * self.side;
        (
            self.x0 + rng.random_range(lo..hi),
            self.y0 + rng.random_range(lo..hi),
        )
    }
}

/// Per-row (or per-column) coverage profiles of the separable die pattern.
struct Profile {
    die: Vec<f32>,
    inner: Vec<f32>,
    seal_outer: Vec<f32>,
    seal_inner: Vec<f32>,
    cell: Vec<f32>,
    window: Vec<f32>,
    trace: Vec<f32>,
    pad: Vec<f32>,
    /// Coverage by the pad band along the low (left/top) and high (right/bottom) edge.
    band: Vec<f32>,
    cell_index: Vec<usize>,
}

impl Profile {
    fn new(size: u32, start: f32, side: f32) -> Profile {
        let n = size as usize;
        let inset = 0.09 * side;
        let in0 = start + inset;
        let in1 = start + side - inset;
        let period = (in1 - in0) / N_CELLS as f32;
        let trace_w = (0.08 * period).clamp(1.0_f32.min(0.15 * period), 0.15 * period);
        let seal_w = (0.006 * side).max(1.0);
        let so0 = start + 0.01 * side;
        let so1 = start + side - 0.01 * side;
        let pad0 = 0.03 * side;
        let pad1 = 0.07 * side;
        let pad_size = pad1 - pad0;
        let pad_pitch = (in1 - in0) / N_PADS as f32;

        let mut p = Profile {
            die: Vec::with_capacity(n),
            inner: Vec::with_capacity(n),
            seal_outer: Vec::with_capacity(n),
            seal_inner: Vec::with_capacity(n),
            cell: Vec::with_capacity(n),
            window: Vec::with_capacity(n),
            trace: Vec::with_capacity(n),
            pad: Vec::with_capacity(n),
            band: Vec::with_capacity(n),
            cell_index: Vec::with_capacity(n),
        };
        for i in 0..n {
            let x = i as f32;
            p.die.push(cover(x, start, start + side));
            p.inner.push(cover(x, in0, in1));
            p.seal_outer.push(cover(x, so0, so1));
            p.seal_inner.push(cover(x, so0 + seal_w, so1 - seal_w));
            let (mut cell, mut window, mut trace) = (0.0, 0.0, 0.0);
            for k in 0..N_CELLS {
                let b = in0 + k as f32 * period;
                cell += cover(x, b + 0.12 * period, b + 0.68 * period);
                window += cover(x, b + 0.28 * period, b + 0.52 * period);
                trace += cover(x, b + 0.80 * period, b + 0.80 * period + trace_w);
            }
            p.cell.push(cell);
            p.window.push(window);
            p.trace.push(trace);
            let mut pad = 0.0;
            for k in 0..N_PADS {
                let c = in0 + (k as f32 + 0.5) * pad_pitch;
                pad += cover(x, c - 0.5 * pad_size, c + 0.5 * pad_size);
            }
            p.pad.push(pad);
            p.band.push(
                cover(x, start + pad0, start + pad1)
                    + cover(x, start + side - pad1, start + side - pad0),
            );
            let k = ((x + 0.5 - in0) / period).floor();
            p.cell_index
                .push(k.clamp(0.0, (N_CELLS - 1) as f32) as usize);
        }
        p
    }
}

/// Fixed per-cell look: grey level and whether the cell has a darker window.
#[inline]
fn cell_look(i: usize, j: usize) -> (f32, bool) {
    let h = mix64((i * 31 + j * 17 + 5) as u64);
    (CELL_LEVELS[(h % 3) as usize], !(h >> 8).is_multiple_of(4))
}

/// Renders the noise-free, lit die into a row-major float buffer.
fn render_clean(die: &Die) -> Vec<f32> {
    let n = die.size as usize;
    let px = Profile::new(die.size, die.x0, die.side);
    let py = Profile::new(die.size, die.y0, die.side);
    let mut looks = [[(0.0f32, false); N_CELLS]; N_CELLS];
    for (j, row) in looks.iter_mut().enumerate() {
        for (i, look) in row.iter_mut().enumerate() {
            *look = cell_look(i, j);
        }
    }
    let mut out = Vec::with_capacity(n * n);
    for y in 0..n {
        let fy = y as f32 + 0.5;
        for x in 0..n {
            let mut v = STREET;
            let die_c = px.die[x] * py.die[y];
            if die_c > 0.0 {
                v = lerp(v, BODY, die_c);
                let seal =
                    px.seal_outer[x] * py.seal_outer[y] - px.seal_inner[x] * py.seal_inner[y];
                v = lerp(v, SEAL, seal.clamp(0.0, 1.0));
                let trace = (px.trace[x] * py.inner[y]).max(py.trace[y] * px.inner[x]);
                v = lerp(v, TRACE, trace);
                let cell = px.cell[x] * py.cell[y];
                if cell > 0.0 {
                    let (level, has_window) = looks[py.cell_index[y]][px.cell_index[x]];
                    v = lerp(v, level, cell);
                    if has_window {
                        v = lerp(v, WINDOW, px.window[x] * py.window[y]);
                    }
                }
                let pad = px.pad[x] * py.band[y] + py.pad[y] * px.band[x];
                v = lerp(v, PAD, pad.clamp(0.0, 1.0));
            }
            out.push(v * die.light(x as f32 + 0.5, fy));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Defects
// ---------------------------------------------------------------------------------------------

/// Inclusive pixel bounding box `[x0, x1) x [y0, y1)` clipped to the image.
fn bbox(size: u32, cx: f32, cy: f32, rx: f32, ry: f32) -> (usize, usize, usize, usize) {
    let s = size as f32;
    let lo = |c: f32, r: f32| (c - r).floor().clamp(0.0, s) as usize;
    let hi = |c: f32, r: f32| (c + r).ceil().clamp(0.0, s) as usize;
    (lo(cx, rx), hi(cx, rx), lo(cy, ry), hi(cy, ry))
}

/// A star-shaped outline: radius as a function of angle, as a sum of a few harmonics.
struct Blob {
    radius: f32,
    harmonics: Vec<(f32, f32, f32)>,
}

impl Blob {
    fn new(
        rng: &mut ChaCha8Rng,
        radius: f32,
        roughness: f32,
        orders: std::ops::Range<u32>,
    ) -> Blob {
        let harmonics = orders
            .map(|h| {
                let amp = rng.random_range(-roughness..roughness) / (h as f32).sqrt();
                (h as f32, amp, rng.random_range(0.0..std::f32::consts::TAU))
            })
            .collect();
        Blob { radius, harmonics }
    }

    #[inline]
    fn radius_at(&self, angle: f32) -> f32 {
        let mut f = 1.0;
        for &(h, a, phase) in &self.harmonics {
            f += a * (h * angle + phase).cos();
        }
        self.radius * f.max(0.3)
    }

    fn max_radius(&self) -> f32 {
        let total: f32 = self.harmonics.iter().map(|h| h.1.abs()).sum();
        self.radius * (1.0 + total) + 1.0
    }
}

fn add_dirt(img: &mut [f32], die: &Die, rng: &mut ChaCha8Rng) {
    let s = die.size as f32;
    let radius = (s * rng.random_range(0.03f32..0.08)).max(2.5);
    let (cx, cy) = die.point_on_body(rng, 0.12);
    let strength = rng.random_range(0.55f32..0.85);
    let n_lobes = rng.random_range(1..=3);
    let mut lobes = Vec::with_capacity(n_lobes);
    for k in 0..n_lobes {
        let (r, ox, oy) = if k == 0 {
            (radius, 0.0, 0.0)
        } else {
            let a = rng.random_range(0.0..std::f32::consts::TAU);
            let d = radius * rng.random_range(0.3f32..0.7);
            (
                radius * rng.random_range(0.4f32..0.75),
                d * a.cos(),
                d * a.sin(),
            )
        };
        lobes.push((cx + ox, cy + oy, Blob::new(rng, r, 0.3, 2..6)));
    }
    let reach = lobes
        .iter()
        .map(|(lx, ly, b)| ((lx - cx).hypot(ly - cy)) + b.max_radius())
        .fold(0.0f32, f32::max)
        + 1.0;
    let n = die.size as usize;
    let (xa, xb, ya, yb) = bbox(die.size, cx, cy, reach, reach);
    for y in ya..yb {
        for x in xa..xb {
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let mut alpha = 0.0f32;
            for (lx, ly, blob) in &lobes {
                let (dx, dy) = (fx - lx, fy - ly);
                let rho = dx.hypot(dy) / blob.radius_at(dy.atan2(dx));
                alpha = alpha.max(1.0 - smoothstep(0.45, 1.05, rho));
            }
            if alpha > 0.0 {
                let v = &mut img[y * n + x];
                *v = lerp(*v, *v * 0.25, alpha * strength);
            }
        }
    }
}

/// Distance from `p` to segment `a`-`b` and the position along it (0..1).
#[inline]
fn segment_distance(p: (f32, f32), a: (f32, f32), b: (f32, f32)) -> (f32, f32) {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = (dx * dx + dy * dy).max(1e-6);
    let t = (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0);
    let (qx, qy) = (a.0 + t * dx - p.0, a.1 + t * dy - p.1);
    ((qx * qx + qy * qy).sqrt(), t)
}

fn add_scratch(img: &mut [f32], die: &Die, rng: &mut ChaCha8Rng) {
    const SEGMENTS: usize = 16;
    let s = die.size as f32;
    let length = s * rng.random_range(0.2f32..0.5);
    let angle = rng.random_range(0.0..std::f32::consts::PI);
    let (ux, uy) = (angle.cos(), angle.sin());
    let half_x = 0.5 * length * ux.abs();
    let half_y = 0.5 * length * uy.abs();
    let m = 0.06 * die.side;
    let cx =
        die.x0 + rng.random_range((m + half_x)..(die.side - m - half_x).max(m + half_x + 1e-3));
    let cy =
        die.y0 + rng.random_range((m + half_y)..(die.side - m - half_y).max(m + half_y + 1e-3));
    let bend = if rng.random_bool(0.4) {
        0.0
    } else {
        rng.random_range(-0.12f32..0.12) * length
    };
    let width = (s / 256.0 * rng.random_range(1.0f32..2.0)).max(1.0);
    let bright = rng.random_bool(0.5);
    let amount = rng.random_range(70.0f32..110.0);

    let a = (cx - 0.5 * length * ux, cy - 0.5 * length * uy);
    let b = (cx + 0.5 * length * ux, cy + 0.5 * length * uy);
    let c = (cx - bend * uy, cy + bend * ux);
    let points: Vec<(f32, f32)> = (0..=SEGMENTS)
        .map(|k| {
            let t = k as f32 / SEGMENTS as f32;
            let (w0, w1, w2) = ((1.0 - t) * (1.0 - t), 2.0 * t * (1.0 - t), t * t);
            (
                w0 * a.0 + w1 * c.0 + w2 * b.0,
                w0 * a.1 + w1 * c.1 + w2 * b.1,
            )
        })
        .collect();
    let (min_x, max_x) = points.iter().fold((f32::MAX, f32::MIN), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let (min_y, max_y) = points.iter().fold((f32::MAX, f32::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let pad = width + 2.0;
    let (xa, xb, ya, yb) = bbox(
        die.size,
        0.5 * (min_x + max_x),
        0.5 * (min_y + max_y),
        0.5 * (max_x - min_x) + pad,
        0.5 * (max_y - min_y) + pad,
    );
    let n = die.size as usize;
    for y in ya..yb {
        for x in xa..xb {
            let p = (x as f32 + 0.5, y as f32 + 0.5);
            let (mut best, mut best_t) = (f32::MAX, 0.0);
            for (k, w) in points.windows(2).enumerate() {
                let (d, t) = segment_distance(p, w[0], w[1]);
                if d < best {
                    best = d;
                    best_t = (k as f32 + t) / SEGMENTS as f32;
                }
            }
            let alpha = (0.5 * width + 0.5 - best).clamp(0.0, 1.0);
            if alpha > 0.0 {
                // Fade a little towards the ends, like a real scratch.
                let taper = (best_t * (1.0 - best_t) * 10.0).clamp(0.45, 1.0);
                let v = &mut img[y * n + x];
                *v = if bright {
                    *v + alpha * taper * amount
                } else {
                    lerp(*v, *v * 0.3, alpha * taper)
                };
            }
        }
    }
}

fn add_chipped_edge(img: &mut [f32], die: &Die, rng: &mut ChaCha8Rng) {
    const VERTICES: usize = 9;
    let s = die.size as f32;
    let radius = (s * rng.random_range(0.05f32..0.09)).max(3.0);
    let along = die.side * rng.random_range(0.15f32..0.85);
    let out = radius * rng.random_range(0.0f32..0.35);
    let (cx, cy) = match rng.random_range(0..4) {
        0 => (die.x0 + along, die.y0 - out),
        1 => (die.x0 + along, die.y0 + die.side + out),
        2 => (die.x0 - out, die.y0 + along),
        _ => (die.x0 + die.side + out, die.y0 + along),
    };
    // An irregular polygon: radii at evenly spaced angles, linearly interpolated.
    let radii: Vec<f32> = (0..VERTICES)
        .map(|_| radius * rng.random_range(0.7f32..1.15))
        .collect();
    let rotation = rng.random_range(0.0..std::f32::consts::TAU);
    let reach = radius * 1.15 + 1.0;
    let n = die.size as usize;
    let (xa, xb, ya, yb) = bbox(die.size, cx, cy, reach, reach);
    for y in ya..yb {
        for x in xa..xb {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let dist = dx.hypot(dy);
            let pos = (dy.atan2(dx) + rotation).rem_euclid(std::f32::consts::TAU)
                / std::f32::consts::TAU
                * VERTICES as f32;
            let k = (pos.floor() as usize).min(VERTICES - 1);
            let r = lerp(radii[k], radii[(k + 1) % VERTICES], pos - k as f32);
            let alpha = (r - dist + 0.5).clamp(0.0, 1.0);
            if alpha > 0.0 {
                let bg = die.background(x, y);
                let v = &mut img[y * n + x];
                *v = lerp(*v, bg, alpha);
            }
        }
    }
}

fn add_particle(img: &mut [f32], die: &Die, rng: &mut ChaCha8Rng) {
    let s = die.size as f32;
    let radius = (s * rng.random_range(0.015f32..0.04)).max(2.0);
    let (cx, cy) = die.point_on_body(rng, 0.1);
    let blob = Blob::new(rng, radius, 0.12, 2..4);
    let bright = rng.random_bool(0.5);
    let reach = blob.max_radius() + 1.0;
    let n = die.size as usize;
    let (xa, xb, ya, yb) = bbox(die.size, cx, cy, reach, reach);
    for y in ya..yb {
        for x in xa..xb {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let dist = dx.hypot(dy);
            let r = blob.radius_at(dy.atan2(dx));
            let alpha = (r - dist + 0.5).clamp(0.0, 1.0);
            if alpha > 0.0 {
                let rho = (dist / r).min(1.0);
                let level = if bright {
                    248.0 - 30.0 * rho * rho
                } else {
                    14.0 + 18.0 * rho
                };
                let v = &mut img[y * n + x];
                *v = lerp(*v, level, alpha);
            }
        }
    }
}

/// Applies one defect to a copy of `clean`; returns the defective buffer and its mask.
fn apply_defect(
    clean: &[f32],
    die: &Die,
    kind: DefectKind,
    rng: &mut ChaCha8Rng,
) -> (Vec<f32>, Vec<u8>) {
    const ATTEMPTS: usize = 8;
    let mut result = (clean.to_vec(), vec![0u8; clean.len()]);
    for _ in 0..ATTEMPTS {
        let mut img = clean.to_vec();
        match kind {
            DefectKind::Dirt => add_dirt(&mut img, die, rng),
            DefectKind::Scratch => add_scratch(&mut img, die, rng),
            DefectKind::ChippedEdge => add_chipped_edge(&mut img, die, rng),
            DefectKind::Particle => add_particle(&mut img, die, rng),
        }
        let mut count = 0usize;
        let mask: Vec<u8> = img
            .iter()
            .zip(clean)
            .map(|(a, b)| {
                if (a - b).abs() >= MASK_THRESHOLD {
                    count += 1;
                    255
                } else {
                    0
                }
            })
            .collect();
        result = (img, mask);
        if count >= 3 {
            break;
        }
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Public rendering
// ---------------------------------------------------------------------------------------------

/// Approximately standard-normal value from one random word (Irwin-Hall sum of four uniforms).
#[inline]
fn normal_from(word: u64) -> f32 {
    let sum = (word & 0xFFFF) + ((word >> 16) & 0xFFFF) + ((word >> 32) & 0xFFFF) + (word >> 48);
    // Mean 2 * 65535, standard deviation 65536 / sqrt(3).
    (sum as f32 - 131_070.0) * (1.732_050_8 / 65_536.0)
}

/// Renders die number `index` of the stream given by `seed`; `defect` None means a good die.
/// Sizes below 8 px are rendered at 8 px.
///
/// The same arguments always give identical pixels. A defective die is the good die with the same
/// `seed` and `index` (same shift, lighting and noise) plus the defect, so the mask marks exactly
/// the pixels whose noise-free value changed by at least 10 grey levels.
pub fn render_die(
    size_px: u32,
    colour: bool,
    seed: u64,
    index: u64,
    defect: Option<DefectKind>,
) -> RenderedDie {
    let size_px = size_px.max(MIN_SIZE_PX);
    let n = size_px as usize;
    let mut rng = stream_rng(seed, index, 0);
    let die = Die::new(size_px, &mut rng);
    let clean = render_clean(&die);
    let (pixels, mask) = match defect {
        Some(kind) => {
            let mut drng = stream_rng(seed, index, kind.stream());
            let (img, mask) = apply_defect(&clean, &die, kind, &mut drng);
            (img, Some(mask))
        }
        None => (clean, None),
    };

    // Sensor noise comes from the die's own stream, so good and defective twins share it.
    let noisy = pixels
        .iter()
        .map(|&v| v + NOISE_SIGMA * normal_from(rng.next_u64()));
    let image = if colour {
        let mut rgb = Vec::with_capacity(n * n * 3);
        for v in noisy {
            // Dark areas lean green (substrate), bright ones copper (metal).
            let t = smoothstep(40.0, 210.0, v);
            let gains = [lerp(0.78, 1.12, t), lerp(1.0, 0.84, t), lerp(0.8, 0.56, t)];
            rgb.extend(
                gains
                    .iter()
                    .map(|g| (v * g).round().clamp(0.0, 255.0) as u8),
            );
        }
        DynamicImage::ImageRgb8(RgbImage::from_raw(size_px, size_px, rgb).expect("buffer size"))
    } else {
        let grey: Vec<u8> = noisy.map(|v| v.round().clamp(0.0, 255.0) as u8).collect();
        DynamicImage::ImageLuma8(GrayImage::from_raw(size_px, size_px, grey).expect("buffer size"))
    };
    RenderedDie {
        image,
        mask: mask.map(|m| GrayImage::from_raw(size_px, size_px, m).expect("buffer size")),
    }
}

// ---------------------------------------------------------------------------------------------
// Dataset writing
// ---------------------------------------------------------------------------------------------

fn create_dir(path: PathBuf) -> Result<(), DemoError> {
    std::fs::create_dir_all(&path).map_err(|source| DemoError::Io { path, source })
}

fn save_png(image: &DynamicImage, path: PathBuf) -> Result<(), DemoError> {
    image
        .save_with_format(&path, ImageFormat::Png)
        .map_err(|source| DemoError::Image { path, source })
}

/// Writes `<dir>/train/good/good_NNN.png`, `<dir>/test/good/good_NNN.png`,
/// `<dir>/test/<kind>/<kind>_NNN.png`, `<dir>/ground_truth/<kind>/<kind>_NNN_mask.png`, and a short
/// `<dir>/README.txt` saying what it is. Creates the folders; images are rendered in parallel.
///
/// Every image is a different die (distinct index); the same `spec` always gives identical files.
pub fn write_demo_dataset(dir: &Path, spec: &DemoSpec) -> Result<DemoSummary, DemoError> {
    create_dir(dir.join("train").join("good"))?;
    create_dir(dir.join("test").join("good"))?;
    for kind in DefectKind::ALL {
        create_dir(dir.join("test").join(kind.folder_name()))?;
        create_dir(dir.join("ground_truth").join(kind.folder_name()))?;
    }

    // (folder, file number, die index, defect)
    let mut jobs: Vec<(PathBuf, usize, u64, Option<DefectKind>)> = Vec::new();
    let mut index = 0u64;
    for i in 0..spec.n_train_good {
        jobs.push((dir.join("train").join("good"), i, index, None));
        index += 1;
    }
    for i in 0..spec.n_test_good {
        jobs.push((dir.join("test").join("good"), i, index, None));
        index += 1;
    }
    for kind in DefectKind::ALL {
        for i in 0..spec.n_test_nok_per_kind {
            jobs.push((
                dir.join("test").join(kind.folder_name()),
                i,
                index,
                Some(kind),
            ));
            index += 1;
        }
    }

    jobs.par_iter()
        .try_for_each(|(folder, number, index, defect)| {
            let die = render_die(spec.size_px, spec.colour, spec.seed, *index, *defect);
            let prefix = defect.map_or("good", DefectKind::folder_name);
            save_png(&die.image, folder.join(format!("{prefix}_{number:03}.png")))?;
            if let (Some(kind), Some(mask)) = (defect, die.mask) {
                let path = dir
                    .join("ground_truth")
                    .join(kind.folder_name())
                    .join(format!("{prefix}_{number:03}_mask.png"));
                save_png(&DynamicImage::ImageLuma8(mask), path)?;
            }
            Ok(())
        })?;

    let n_test_nok = spec.n_test_nok_per_kind * DefectKind::ALL.len();
    let readme = format!(
        "Inkspect demo dataset: synthetic wafer dies (seed {seed}, {size} x {size} px, {mode}).\n\
         \n\
         Generated by `inkspect demo`; no real data. Layout follows MVTec AD:\n\
         \x20 train/good/          {train} good dies to learn from\n\
         \x20 test/good/           {test_good} good dies for evaluation\n\
         \x20 test/<kind>/         {per_kind} defective dies per kind: dirt, scratch, chipped_edge, particle\n\
         \x20 ground_truth/<kind>/ one mask per defective die (white = defect)\n\
         \n\
         Good dies vary only in exposure, a small shift, vignetting and sensor noise.\n",
        seed = spec.seed,
        size = spec.size_px,
        mode = if spec.colour { "colour" } else { "greyscale" },
        train = spec.n_train_good,
        test_good = spec.n_test_good,
        per_kind = spec.n_test_nok_per_kind,
    );
    let readme_path = dir.join("README.txt");
    std::fs::write(&readme_path, readme).map_err(|source| DemoError::Io {
        path: readme_path,
        source,
    })?;

    Ok(DemoSummary {
        root: dir.to_path_buf(),
        n_train_good: spec.n_train_good,
        n_test_good: spec.n_test_good,
        n_test_nok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey(die: &RenderedDie) -> Vec<u8> {
        die.image.to_luma8().into_raw()
    }

    /// Mean absolute difference after the best integer shift and a global gain match.
    fn aligned_mad(a: &[u8], b: &[u8], size: usize) -> f64 {
        let r = (0.04 * size as f64).ceil() as isize + 1;
        let n = size as isize;
        let mut best = f64::MAX;
        for dy in -r..=r {
            for dx in -r..=r {
                let (mut sa, mut sb) = (0.0f64, 0.0f64);
                let mut pairs = Vec::new();
                for y in r..n - r {
                    for x in r..n - r {
                        let va = a[(y * n + x) as usize] as f64;
                        let vb = b[((y + dy) * n + x + dx) as usize] as f64;
                        sa += va;
                        sb += vb;
                        pairs.push((va, vb));
                    }
                }
                let scale = sa / sb;
                let mad = pairs
                    .iter()
                    .map(|(va, vb)| (va - vb * scale).abs())
                    .sum::<f64>()
                    / pairs.len() as f64;
                best = best.min(mad);
            }
        }
        best
    }

    #[test]
    fn rendering_is_deterministic() {
        for defect in [None, Some(DefectKind::Scratch), Some(DefectKind::Dirt)] {
            let a = render_die(64, false, 3, 5, defect);
            let b = render_die(64, false, 3, 5, defect);
            assert_eq!(a.image, b.image);
            assert_eq!(a.mask, b.mask);
        }
        let c = render_die(64, true, 3, 5, Some(DefectKind::Particle));
        let d = render_die(64, true, 3, 5, Some(DefectKind::Particle));
        assert_eq!(c.image, d.image);
        assert_eq!(c.mask, d.mask);
        // A different index or seed gives a different die, and a different defect placement.
        let base = grey(&render_die(64, false, 3, 5, None));
        assert_ne!(grey(&render_die(64, false, 3, 6, None)), base);
        assert_ne!(grey(&render_die(64, false, 4, 5, None)), base);
        assert_ne!(
            render_die(64, false, 3, 6, Some(DefectKind::Particle)).mask,
            c.mask
        );
    }

    #[test]
    fn good_dies_are_alike_and_defects_stand_out() {
        for size in [64u32, 256] {
            let reference = grey(&render_die(size, false, 7, 0, None));
            let mean = |v: &[u8]| v.iter().map(|&p| p as f64).sum::<f64>() / v.len() as f64;
            for index in 1..8 {
                let good = grey(&render_die(size, false, 7, index, None));
                let ratio = mean(&good) / mean(&reference);
                assert!(
                    (0.8..1.25).contains(&ratio),
                    "size {size}: brightness ratio {ratio}"
                );
                let d = aligned_mad(&reference, &good, size as usize);
                println!("size {size} index {index}: aligned mean abs diff {d:.2}");
                assert!(
                    d < 6.0,
                    "size {size} index {index}: good dies differ by {d}"
                );
            }
            for kind in DefectKind::ALL {
                for index in 0..5 {
                    let good = grey(&render_die(size, false, 7, index, None));
                    let bad = render_die(size, false, 7, index, Some(kind));
                    let mask = bad.mask.as_ref().expect("defective die has a mask");
                    let bad = grey(&bad);
                    let (mut inside, mut n_inside, mut outside) = (0u64, 0u64, 0u64);
                    for ((g, b), m) in good.iter().zip(&bad).zip(mask.as_raw()) {
                        if *m == 255 {
                            inside += g.abs_diff(*b) as u64;
                            n_inside += 1;
                        } else {
                            outside = outside.max(g.abs_diff(*b) as u64);
                        }
                    }
                    let mean_inside = inside as f64 / n_inside as f64;
                    assert!(
                        mean_inside > 20.0,
                        "{kind:?} size {size} index {index}: masked region differs by {mean_inside}"
                    );
                    assert!(
                        outside < MASK_THRESHOLD as u64 + 1,
                        "{kind:?} size {size} index {index}: unmasked pixel differs by {outside}"
                    );
                }
            }
        }
    }

    #[test]
    fn masks_are_non_empty_and_binary() {
        for size in [64u32, 256] {
            for kind in DefectKind::ALL {
                for index in 0..20 {
                    let die = render_die(size, false, 11, index, Some(kind));
                    let mask = die.mask.expect("mask");
                    assert_eq!(mask.dimensions(), (size, size));
                    assert!(mask.as_raw().iter().all(|&m| m == 0 || m == 255));
                    let count = mask.as_raw().iter().filter(|&&m| m == 255).count();
                    assert!(
                        count >= 3,
                        "{kind:?} size {size} index {index}: {count} mask px"
                    );
                }
            }
        }
        assert!(render_die(64, false, 11, 0, None).mask.is_none());
    }

    #[test]
    fn odd_sizes_render() {
        for size in [1u32, 8, 17, 33, 100, 512] {
            for defect in [None, Some(DefectKind::Dirt), Some(DefectKind::Scratch)]
                .into_iter()
                .chain([Some(DefectKind::ChippedEdge), Some(DefectKind::Particle)])
            {
                let die = render_die(size, true, 1, 2, defect);
                let side = size.max(MIN_SIZE_PX);
                assert_eq!(die.image.width(), side);
                assert_eq!(die.image.height(), side);
                if let Some(mask) = die.mask {
                    assert_eq!(mask.dimensions(), (side, side));
                    if size >= 32 {
                        assert!(mask.as_raw().contains(&255), "{defect:?} at {size} px");
                    }
                }
            }
        }
    }

    #[test]
    fn colour_gives_three_channels_with_same_mask() {
        let mono = render_die(64, false, 2, 1, Some(DefectKind::Scratch));
        let rgb = render_die(64, true, 2, 1, Some(DefectKind::Scratch));
        assert_eq!(rgb.image.color(), image::ColorType::Rgb8);
        assert_eq!(mono.image.color(), image::ColorType::L8);
        assert_eq!(rgb.mask, mono.mask);
        assert_eq!(rgb.image.width(), 64);
    }

    #[test]
    fn writes_dataset_with_expected_counts() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = DemoSpec::tiny();
        let summary = write_demo_dataset(tmp.path(), &spec).unwrap();
        assert_eq!(summary.n_train_good, 24);
        assert_eq!(summary.n_test_good, 6);
        assert_eq!(summary.n_test_nok, 8);
        let count = |p: PathBuf| std::fs::read_dir(p).unwrap().count();
        let root = tmp.path();
        assert_eq!(count(root.join("train/good")), 24);
        assert_eq!(count(root.join("test/good")), 6);
        for kind in DefectKind::ALL {
            assert_eq!(count(root.join("test").join(kind.folder_name())), 2);
            assert_eq!(count(root.join("ground_truth").join(kind.folder_name())), 2);
        }
        assert!(root.join("train/good/good_000.png").is_file());
        assert!(root.join("test/scratch/scratch_001.png").is_file());
        let mask = image::open(root.join("ground_truth/chipped_edge/chipped_edge_001_mask.png"))
            .unwrap()
            .to_luma8();
        assert_eq!(mask.dimensions(), (64, 64));
        assert!(root.join("README.txt").is_file());
        let img = image::open(root.join("test/good/good_000.png")).unwrap();
        assert_eq!(img.color(), image::ColorType::L8);
    }

    #[test]
    fn render_timing() {
        // Reports timing only; no assertion, since CI machines vary.
        let start = std::time::Instant::now();
        let runs = 20u64;
        for i in 0..runs {
            std::hint::black_box(render_die(
                256,
                false,
                1,
                i,
                Some(DefectKind::ALL[i as usize % 4]),
            ));
        }
        let per_256 = start.elapsed() / runs as u32;
        let start = std::time::Instant::now();
        for i in 0..runs {
            std::hint::black_box(render_die(64, false, 1, i, None));
        }
        let per_64 = start.elapsed() / runs as u32;
        println!("render_die: 256 px {per_256:?} per die, 64 px {per_64:?} per die");
    }
}
