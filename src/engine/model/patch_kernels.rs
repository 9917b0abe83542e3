//! Hand-written CPU kernels for the patch memory on `flex` (forward only, nothing is trained):
//! the extractor's 3x3 convolution, ReLU and 2x2 average pooling in one pass (by Winograd
//! F(2x2, 3x3) for the wide levels); the patch features
//! (level 3 upsampled onto level 2, 3x3 neighbour mean) written patch by patch; and the nearest
//! remembered patch found exactly, pruning with bounds from the memory's principal directions.
//! They compute what the burn operations in [`patch_memory`](super::patch_memory) compute, which
//! the tests check.
//!
//! Measured on `flex` before them (a batch of 8 mono 160 px extractor inputs): the first
//! convolution ran at about 2 GFLOP/s (107 ms), upsampling, concatenation and averaging took
//! about 100 ms, and the search 560 ms.

use rayon::prelude::*;

use super::conv_kernels::{Operand, matmul};

/// Floats of column matrix worked on at once (fits the per-core L2 cache).
const BAND_FLOATS: usize = 64 * 1024;

/// Shape of one extractor level: input `[batch, inputs, height, width]`, `outputs` channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelShape {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub inputs: usize,
    /// Output channels.
    pub outputs: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
}

/// Fewest input channels for which a level runs as Winograd F(2x2, 3x3); below it (the first
/// level, 1 or 3 inputs) the products are too thin for the transforms to pay.
const WINOGRAD_MIN_INPUTS: usize = 16;
/// Floats of transformed inputs and products worked on at once (measured: 128 K floats left the
/// products too thin, 40 tiles wide, and 2 M gained nothing over this).
const WINOGRAD_BAND_FLOATS: usize = 512 * 1024;

/// One level of the extractor: 3x3 convolution (padding 1, no bias), ReLU, 2x2 average pooling.
/// `x [batch, inputs, h, w]`, `weight [outputs, inputs, 3, 3]` → `[batch, outputs, h/2, w/2]`.
pub fn conv3x3_relu_pool(s: LevelShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
    if s.inputs >= WINOGRAD_MIN_INPUTS {
        winograd_relu_pool(s, x, weight)
    } else {
        direct_relu_pool(s, x, weight)
    }
}

/// Threads for each image's products: none when the batch already keeps every core busy.
fn product_threads(batch: usize) -> gemm::Parallelism {
    if batch >= rayon::current_num_threads() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// The 16 transformed 3x3 kernels of Winograd F(2x2, 3x3), `U = G g G^T`:
/// `[16, outputs, inputs]` from `weight [outputs, inputs, 3, 3]`.
fn winograd_weights(inputs: usize, outputs: usize, weight: &[f32]) -> Vec<f32> {
    const G: [[f32; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let pairs = inputs * outputs;
    let mut u = vec![0.0f32; 16 * pairs];
    for (pair, g) in weight.chunks_exact(9).enumerate().take(pairs) {
        for a in 0..4 {
            for b in 0..4 {
                let mut sum = 0.0f32;
                for i in 0..3 {
                    for j in 0..3 {
                        sum += G[a][i] * g[i * 3 + j] * G[b][j];
                    }
                }
                u[(a * 4 + b) * pairs + pair] = sum;
            }
        }
    }
    u
}

/// [`conv3x3_relu_pool`] by Winograd F(2x2, 3x3): each 2x2 output tile, which is also the
/// pooling window, comes from 16 products instead of 36 per input and output channel (the
/// products run as 16 matrix products per band of tile rows); the transforms run along whole
/// rows, split into even and odd columns so that they vectorise. Same result up to rounding.
fn winograd_relu_pool(s: LevelShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let (h, w) = (s.height, s.width);
    let (hp, wp) = (h / 2, w / 2);
    let (ni, no) = (s.inputs, s.outputs);
    let (in_len, out_len) = (ni * h * w, no * hp * wp);
    let mut out = vec![0.0f32; s.batch * out_len];
    if out_len == 0 {
        return out;
    }
    let u = winograd_weights(ni, no, weight);
    let band_rows = (WINOGRAD_BAND_FLOATS / (16 * (ni + no) * wp)).clamp(1, hp);
    let cap = band_rows * wp;
    let threads = product_threads(s.batch);
    // Padded row: input column `ix` at `ix + 1`, zero at both ends, even length.
    let pw = 2 * wp + 4;
    let half = pw / 2;
    out.par_chunks_mut(out_len)
        .enumerate()
        .for_each(|(img, y)| {
            let xi = &x[img * in_len..(img + 1) * in_len];
            let mut v = vec![0.0f32; 16 * ni * cap];
            let mut m = vec![0.0f32; 16 * no * cap];
            let mut rows = vec![0.0f32; 4 * pw];
            let mut split_even = vec![0.0f32; 4 * half];
            let mut split_odd = vec![0.0f32; 4 * half];
            let mut even = vec![0.0f32; 4 * half];
            let mut odd = vec![0.0f32; 4 * half];
            let mut s0 = vec![0.0f32; 4 * wp];
            let mut s1 = vec![0.0f32; 4 * wp];
            for r0 in (0..hp).step_by(band_rows) {
                let r1 = (r0 + band_rows).min(hp);
                let tiles = (r1 - r0) * wp;
                for c in 0..ni {
                    let plane = &xi[c * h * w..(c + 1) * h * w];
                    for ty in r0..r1 {
                        // Input rows 2 ty - 1 .. 2 ty + 2, zero outside the image.
                        rows.fill(0.0);
                        for a in 0..4 {
                            let iy = 2 * ty + a;
                            if iy >= 1 && iy <= h {
                                rows[a * pw + 1..a * pw + 1 + w]
                                    .copy_from_slice(&plane[(iy - 1) * w..iy * w]);
                            }
                        }
                        // Each row split into even and odd columns, then B^T d down the columns of
                        // both halves (plain passes over slices, so that they vectorise).
                        for a in 0..4 {
                            let row = &rows[a * pw..(a + 1) * pw];
                            let (e, o) = (&mut split_even[a * half..], &mut split_odd[a * half..]);
                            for (k, pair) in row.chunks_exact(2).enumerate() {
                                e[k] = pair[0];
                                o[k] = pair[1];
                            }
                        }
                        for (source, target) in [(&split_even, &mut even), (&split_odd, &mut odd)] {
                            let (d0, rest) = source.split_at(half);
                            let (d1, rest) = rest.split_at(half);
                            let (d2, d3) = rest.split_at(half);
                            let (t0, rest) = target.split_at_mut(half);
                            let (t1, rest) = rest.split_at_mut(half);
                            let (t2, t3) = rest.split_at_mut(half);
                            for i in 0..half {
                                t0[i] = d0[i] - d2[i];
                                t1[i] = d1[i] + d2[i];
                                t2[i] = d2[i] - d1[i];
                                t3[i] = d1[i] - d3[i];
                            }
                        }
                        // (.) B along the rows: tile tx reads columns E[tx], O[tx], E[tx+1], O[tx+1].
                        let base = (ty - r0) * wp;
                        for a in 0..4 {
                            let e = &even[a * half..(a + 1) * half];
                            let o = &odd[a * half..(a + 1) * half];
                            for b in 0..4 {
                                let dst = &mut v[((a * 4 + b) * ni + c) * cap + base..][..wp];
                                let (e0, e1, o0, o1) = (&e[..wp], &e[1..=wp], &o[..wp], &o[1..=wp]);
                                for tx in 0..wp {
                                    dst[tx] = match b {
                                        0 => e0[tx] - e1[tx],
                                        1 => o0[tx] + e1[tx],
                                        2 => e1[tx] - o0[tx],
                                        _ => o0[tx] - o1[tx],
                                    };
                                }
                            }
                        }
                    }
                }
                for k in 0..16 {
                    matmul(
                        &mut m[k * no * cap..(k + 1) * no * cap],
                        cap,
                        no,
                        tiles,
                        ni,
                        Operand::rows(&u[k * no * ni..(k + 1) * no * ni], ni),
                        Operand::rows(&v[k * ni * cap..(k + 1) * ni * cap], cap),
                        false,
                        threads,
                    );
                }
                // A^T M A per tile, then ReLU and the 2x2 average.
                for o in 0..no {
                    for ty in r0..r1 {
                        let base = (ty - r0) * wp;
                        let mk = |k: usize| &m[(k * no + o) * cap + base..][..wp];
                        // A^T down the columns: s0 = M0 + M1 + M2, s1 = M1 - M2 - M3 (rows of M).
                        for b in 0..4 {
                            let (m0, m1, m2, m3) = (mk(b), mk(4 + b), mk(8 + b), mk(12 + b));
                            let (r0, r1) = (&mut s0[b * wp..][..wp], &mut s1[b * wp..][..wp]);
                            for tx in 0..wp {
                                r0[tx] = m0[tx] + m1[tx] + m2[tx];
                                r1[tx] = m1[tx] - m2[tx] - m3[tx];
                            }
                        }
                        // (.) A along the rows, then ReLU and the 2x2 average.
                        let dst = &mut y[(o * hp + ty) * wp..][..wp];
                        let (a0, a1, a2, a3) = (
                            &s0[..wp],
                            &s0[wp..2 * wp],
                            &s0[2 * wp..3 * wp],
                            &s0[3 * wp..],
                        );
                        let (b0, b1, b2, b3) = (
                            &s1[..wp],
                            &s1[wp..2 * wp],
                            &s1[2 * wp..3 * wp],
                            &s1[3 * wp..],
                        );
                        for tx in 0..wp {
                            let y00 = a0[tx] + a1[tx] + a2[tx];
                            let y01 = a1[tx] - a2[tx] - a3[tx];
                            let y10 = b0[tx] + b1[tx] + b2[tx];
                            let y11 = b1[tx] - b2[tx] - b3[tx];
                            dst[tx] =
                                0.25 * (y00.max(0.0) + y01.max(0.0) + y10.max(0.0) + y11.max(0.0));
                        }
                    }
                }
            }
        });
    out
}

/// [`conv3x3_relu_pool`] as one `im2col` and product per band of pooled rows.
fn direct_relu_pool(s: LevelShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let (h, w) = (s.height, s.width);
    let (hp, wp) = (h / 2, w / 2);
    let k = s.inputs * 9;
    let in_len = s.inputs * h * w;
    let out_len = s.outputs * hp * wp;
    let mut out = vec![0.0f32; s.batch * out_len];
    if out_len == 0 {
        return out;
    }
    // Pooled rows per band: each needs two convolution rows of `w` columns.
    let band_rows = (BAND_FLOATS / (k * 2 * w).max(1)).clamp(1, hp.max(1));
    let threads = product_threads(s.batch);
    out.par_chunks_mut(out_len).enumerate().for_each(|(i, y)| {
        let xi = &x[i * in_len..(i + 1) * in_len];
        let mut cols = vec![0.0f32; k * 2 * band_rows * w];
        let mut conv = vec![0.0f32; s.outputs * 2 * band_rows * w];
        for r0 in (0..hp).step_by(band_rows) {
            let r1 = (r0 + band_rows).min(hp);
            let rows = 2 * r0..2 * r1;
            let n = rows.len() * w;
            im2col3(xi, s.inputs, h, w, rows, &mut cols);
            matmul(
                &mut conv,
                n,
                s.outputs,
                n,
                k,
                Operand::rows(weight, k),
                Operand::rows(&cols, n),
                false,
                threads,
            );
            for c in 0..s.outputs {
                let plane = &conv[c * n..(c + 1) * n];
                for r in r0..r1 {
                    let top = &plane[(2 * (r - r0)) * w..][..w];
                    let bottom = &plane[(2 * (r - r0) + 1) * w..][..w];
                    let dst = &mut y[(c * hp + r) * wp..][..wp];
                    for (o, d) in dst.iter_mut().enumerate() {
                        let sum = top[2 * o].max(0.0)
                            + top[2 * o + 1].max(0.0)
                            + bottom[2 * o].max(0.0)
                            + bottom[2 * o + 1].max(0.0);
                        *d = 0.25 * sum;
                    }
                }
            }
        }
    });
    out
}

/// The 3x3 neighbourhoods (zero outside) of the image rows `rows` of `image`
/// (`[channels, h, w]`) as columns: `cols [channels * 9, rows.len() * w]`.
fn im2col3(
    image: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    rows: std::ops::Range<usize>,
    cols: &mut [f32],
) {
    let n = rows.len() * w;
    for c in 0..channels {
        let plane = &image[c * h * w..(c + 1) * h * w];
        for ky in 0..3 {
            for kx in 0..3 {
                let out_row = &mut cols[(c * 9 + ky * 3 + kx) * n..][..n];
                for (r, y) in rows.clone().enumerate() {
                    let out = &mut out_row[r * w..(r + 1) * w];
                    let iy = y + ky;
                    if iy == 0 || iy > h {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[(iy - 1) * w..iy * w];
                    match kx {
                        0 => {
                            out[0] = 0.0;
                            out[1..].copy_from_slice(&src[..w - 1]);
                        }
                        1 => out.copy_from_slice(src),
                        _ => {
                            out[..w - 1].copy_from_slice(&src[1..]);
                            out[w - 1] = 0.0;
                        }
                    }
                }
            }
        }
    }
}

/// Source taps of a bilinear resize with corners aligned (burn's default, computed as burn's
/// `flex` backend does): for each output index, the two input indices and the second's weight.
fn bilinear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32)> {
    let ratio = (input as f64 - 1.0) / (output.max(1) - 1).max(1) as f64;
    (0..output)
        .map(|o| {
            let at = o as f64 * ratio;
            let low = at.floor().max(0.0) as usize;
            let high = (low + 1).min(input - 1);
            (low, high, (at - low as f64).max(0.0) as f32)
        })
        .collect()
}

/// Patch features of one image, patch by patch: `fine [c_fine, h, w]` and `coarse
/// [c_coarse, hc, wc]` (bilinearly resized to `h x w`, corners aligned) side by side, each value
/// the mean of its 3x3 neighbours with zeros beyond the border (always divided by 9).
/// Returns `[h * w, c_fine + c_coarse]`.
pub fn patch_rows(
    fine: &[f32],
    c_fine: usize,
    coarse: &[f32],
    c_coarse: usize,
    (h, w): (usize, usize),
    (hc, wc): (usize, usize),
) -> Vec<f32> {
    let dim = c_fine + c_coarse;
    let plane = h * w;
    let mut stacked = vec![0.0f32; dim * plane];
    stacked[..c_fine * plane].copy_from_slice(&fine[..c_fine * plane]);
    if c_coarse > 0 {
        let (ty, tx) = (bilinear_taps(hc, h), bilinear_taps(wc, w));
        for c in 0..c_coarse {
            let src = &coarse[c * hc * wc..(c + 1) * hc * wc];
            let dst = &mut stacked[(c_fine + c) * plane..(c_fine + c + 1) * plane];
            for (oy, &(y0, y1, wy)) in ty.iter().enumerate() {
                for (ox, &(x0, x1, wx)) in tx.iter().enumerate() {
                    let (a, b) = (src[y0 * wc + x0], src[y0 * wc + x1]);
                    let (c2, d) = (src[y1 * wc + x0], src[y1 * wc + x1]);
                    dst[oy * w + ox] = a * (1.0 - wx) * (1.0 - wy)
                        + b * wx * (1.0 - wy)
                        + c2 * (1.0 - wx) * wy
                        + d * wx * wy;
                }
            }
        }
    }
    // 3x3 mean with zero padding: horizontal sums, then vertical, written patch-major.
    let mut rows = vec![0.0f32; plane * dim];
    let mut across = vec![0.0f32; plane];
    for c in 0..dim {
        let src = &stacked[c * plane..(c + 1) * plane];
        for y in 0..h {
            let row = &src[y * w..(y + 1) * w];
            for x in 0..w {
                let left = if x > 0 { row[x - 1] } else { 0.0 };
                let right = if x + 1 < w { row[x + 1] } else { 0.0 };
                across[y * w + x] = left + row[x] + right;
            }
        }
        for y in 0..h {
            for x in 0..w {
                let up = if y > 0 { across[(y - 1) * w + x] } else { 0.0 };
                let down = if y + 1 < h {
                    across[(y + 1) * w + x]
                } else {
                    0.0
                };
                rows[(y * w + x) * dim + c] = (up + across[y * w + x] + down) / 9.0;
            }
        }
    }
    rows
}

/// Directions of the search subspace: distances there are lower bounds of the full ones.
const SEARCH_DIMS: usize = 32;
/// Subspace iterations towards the memory's principal directions.
const SEARCH_ITERATIONS: usize = 12;
/// Queries searched together (their bound matrix, 64 x 5,000 floats, stays in cache).
const SEARCH_TILE: usize = 64;
/// Leading directions of the first, cheaper bound, computed for every remembered patch; the
/// rest of the subspace is added only for those it does not rule out.
const HEAD_DIMS: usize = 16;
/// The rest of a tile is searched by full products once more than this fraction (1 / n) of the
/// memory has needed the full distance, on average per query so far.
const DENSE_FRACTION: usize = 16;
/// Remembered patches compared with a query tile at once in a full product.
const MEMORY_CHUNK: usize = 1024;

/// `a . b` with eight independent partial sums, so that the loop vectorises (a plain `f32` sum
/// must keep its order and cannot).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() - a.len() % 8);
    let (b8, b_rest) = b.split_at(a8.len().min(b.len()));
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Remembered patches whose bounds are computed and tested as one block.
const SCAN_BLOCK: usize = 16;

/// Squared distance `|q|^2 + |row|^2 - 2 q.row` from its parts.
#[inline(always)]
fn squared_distance(q: &[f32], q_sq: f32, row: &[f32], row_sq: f32) -> f32 {
    q_sq + row_sq - 2.0 * dot(q, row)
}

/// Nearest distances of a tile of queries by full products with the memory, a chunk of
/// [`MEMORY_CHUNK`] rows at a time (and the same `|q|^2 + |m|^2 - 2 q.m`), into `nearest`.
fn dense_nearest(tile: &[f32], memory: &[f32], memory_sq: &[f32], dim: usize, nearest: &mut [f32]) {
    let m = memory_sq.len();
    let mut best = vec![f32::INFINITY; nearest.len()];
    let mut dots = vec![0.0f32; nearest.len() * MEMORY_CHUNK.min(m)];
    for m0 in (0..m).step_by(MEMORY_CHUNK) {
        let mc = MEMORY_CHUNK.min(m - m0);
        matmul(
            &mut dots,
            mc,
            nearest.len(),
            mc,
            dim,
            Operand::rows(tile, dim),
            Operand::transposed(&memory[m0 * dim..(m0 + mc) * dim], dim),
            false,
            gemm::Parallelism::None,
        );
        let sq = &memory_sq[m0..m0 + mc];
        for (b, row) in best.iter_mut().zip(dots.chunks_exact(mc)) {
            let lowest = row
                .iter()
                .zip(sq)
                .map(|(&d, &s)| s - 2.0 * d)
                .fold(f32::INFINITY, f32::min);
            *b = b.min(lowest);
        }
    }
    for ((out, b), q) in nearest.iter_mut().zip(best).zip(tile.chunks_exact(dim)) {
        *out = (b + dot(q, q)).max(0.0).sqrt();
    }
}

/// A patch memory prepared for exact nearest-neighbour search with pruning. Its rows are also
/// projected onto an orthonormal basis of their 32 principal directions; a distance there never
/// exceeds the full one, so a remembered patch whose projected distance is already above the best
/// full distance found cannot be the nearest and is skipped. Measured with the prototype (memory
/// of 5,000, 384 values): the 32 directions keep 95-98 % of the variance, and 7-12 patches per
/// query remain to be compared in full, instead of 5,000; this search, which checks the first
/// 16 directions before the rest, compared about 24 per query on PA_BRG03_TL.
#[derive(Debug, Clone)]
pub struct MemoryIndex {
    dim: usize,
    /// Directions kept (at most [`SEARCH_DIMS`]).
    directions: usize,
    /// Orthonormal basis, `[dim, directions]`.
    basis: Vec<f32>,
    /// The memory projected onto it, `[rows, directions]`, then zero rows up to a whole number
    /// of [`SCAN_BLOCK`]s.
    projected: Vec<f32>,
    /// Squared norms of the projected rows' first [`HEAD_DIMS`] values (infinite for the padding).
    head_sq: Vec<f32>,
    /// Squared norms of the projected rows' other values.
    tail_sq: Vec<f32>,
    /// Squared norms of the full rows.
    memory_sq: Vec<f32>,
    /// xxh3 of the memory's values, to tell whether the index still belongs to a memory.
    key: u64,
}

/// Squared norm of each row of `rows` (`[n, dim]`).
fn squared_norms(rows: &[f32], dim: usize) -> Vec<f32> {
    rows.chunks_exact(dim.max(1)).map(|r| dot(r, r)).collect()
}

/// Hash of a memory's values, to tell whether an index still belongs to it.
fn memory_key(memory: &[f32]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(memory))
}

impl MemoryIndex {
    /// Builds the index of `memory` (`[rows, dim]`).
    pub fn build(memory: &[f32], dim: usize) -> MemoryIndex {
        let rows = memory.len() / dim.max(1);
        let parallel = gemm::Parallelism::Rayon(rayon::current_num_threads());
        // Covariance (times rows) of the memory: M^T M - rows * mean mean^T.
        let mut cov = vec![0.0f32; dim * dim];
        matmul(
            &mut cov,
            dim,
            dim,
            dim,
            rows,
            Operand::transposed(memory, dim),
            Operand::rows(memory, dim),
            false,
            parallel,
        );
        let mut mean = vec![0.0f64; dim];
        for row in memory.chunks_exact(dim.max(1)) {
            mean.iter_mut()
                .zip(row)
                .for_each(|(m, &v)| *m += f64::from(v));
        }
        mean.iter_mut().for_each(|m| *m /= rows.max(1) as f64);
        for (i, row) in cov.chunks_exact_mut(dim.max(1)).enumerate() {
            for (j, c) in row.iter_mut().enumerate() {
                *c -= (rows as f64 * mean[i] * mean[j]) as f32;
            }
        }
        // Subspace iteration from a fixed start; the basis is orthonormal whether or not it has
        // converged, which is all the bound needs.
        let wanted = SEARCH_DIMS.min(dim);
        let mut basis: Vec<f32> = (0..dim * wanted)
            .map(|i| ((i.wrapping_mul(2654435761) % 2001) as f32 / 1000.0) - 1.0)
            .collect();
        let mut directions = orthonormalise(&mut basis, dim, wanted);
        for _ in 0..SEARCH_ITERATIONS {
            let mut next = vec![0.0f32; dim * directions];
            matmul(
                &mut next,
                directions,
                dim,
                directions,
                dim,
                Operand::rows(&cov, dim),
                Operand::rows(&basis, directions),
                false,
                gemm::Parallelism::None,
            );
            directions = orthonormalise(&mut next, dim, directions);
            basis = next;
        }
        let mut projected = vec![0.0f32; rows * directions];
        matmul(
            &mut projected,
            directions,
            rows,
            directions,
            dim,
            Operand::rows(memory, dim),
            Operand::rows(&basis, directions),
            false,
            parallel,
        );
        // Padded to whole scan blocks with rows that no bound lets through.
        let padded = rows.div_ceil(SCAN_BLOCK) * SCAN_BLOCK;
        projected.resize(padded * directions, 0.0);
        let head = HEAD_DIMS.min(directions);
        let (mut head_sq, mut tail_sq): (Vec<f32>, Vec<f32>) = projected
            .chunks_exact(directions.max(1))
            .map(|p| (dot(&p[..head], &p[..head]), dot(&p[head..], &p[head..])))
            .unzip();
        head_sq[rows..].fill(f32::INFINITY);
        tail_sq[rows..].fill(0.0);
        MemoryIndex {
            dim,
            directions,
            head_sq,
            tail_sq,
            basis,
            projected,
            memory_sq: squared_norms(memory, dim),
            key: memory_key(memory),
        }
    }

    /// Whether this index was built from `memory`.
    pub fn is_for(&self, memory: &[f32], dim: usize) -> bool {
        self.dim == dim
            && self.memory_sq.len() * dim == memory.len()
            && self.key == memory_key(memory)
    }

    /// Distance from every query row (`[n, dim]`) to its nearest row of `memory` (the one the
    /// index was built from): `[n]`. Exact: the same minimum as comparing with every row, up to
    /// rounding.
    pub fn nearest(&self, memory: &[f32], queries: &[f32]) -> Vec<f32> {
        let dim = self.dim;
        assert_eq!(
            memory.len(),
            self.memory_sq.len() * dim,
            "the memory is not the one the search index was built from"
        );
        let n = queries.len() / dim.max(1);
        let mut out = vec![f32::INFINITY; n];
        if n == 0 || self.memory_sq.is_empty() {
            return out;
        }
        let max_memory_sq = self.memory_sq.iter().fold(0.0f32, |a, &b| a.max(b));
        out.par_chunks_mut(SEARCH_TILE)
            .enumerate()
            .for_each(|(t, nearest)| {
                let start = t * SEARCH_TILE;
                let tile = &queries[start * dim..(start + nearest.len()) * dim];
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: this CPU has the features the function is compiled for.
                    unsafe { self.search_tile_avx2(memory, tile, max_memory_sq, nearest) };
                    return;
                }
                self.search_tile(memory, tile, max_memory_sq, nearest);
            });
        out
    }

    /// [`MemoryIndex::search_tile`] compiled for AVX2 (8 floats per instruction instead of the
    /// baseline's 4).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn search_tile_avx2(
        &self,
        memory: &[f32],
        tile: &[f32],
        max_memory_sq: f32,
        nearest: &mut [f32],
    ) {
        self.search_tile(memory, tile, max_memory_sq, nearest);
    }

    /// The nearest distances of one tile of queries (`[nearest.len(), dim]`) into `nearest`.
    /// Each query starts from the previous query's nearest patch (neighbouring patches look
    /// alike), then scans the cheap bounds of the leading directions; the patches they do not
    /// rule out get the whole subspace's bound, and the ones that still pass the full distance.
    /// When the bounds rule out too little, the rest of the tile is searched by full products.
    #[inline(always)]
    fn search_tile(&self, memory: &[f32], tile: &[f32], max_memory_sq: f32, nearest: &mut [f32]) {
        let (dim, r) = (self.dim, self.directions);
        let head = HEAD_DIMS.min(r);
        let m = self.memory_sq.len();
        let queries = nearest.len();
        let mut qp = vec![0.0f32; queries * r];
        matmul(
            &mut qp,
            r,
            queries,
            r,
            dim,
            Operand::rows(tile, dim),
            Operand::rows(&self.basis, r),
            false,
            gemm::Parallelism::None,
        );
        let padded = self.head_sq.len();
        let mut dots = vec![0.0f32; queries * padded];
        matmul(
            &mut dots,
            padded,
            queries,
            padded,
            head,
            Operand::rows(&qp, r),
            Operand::transposed(&self.projected, r),
            false,
            gemm::Parallelism::None,
        );
        let memory_row = |j: usize| &memory[j * dim..(j + 1) * dim];
        // The first query starts from the patch nearest in the leading directions.
        let mut guess = 0;
        let mut least = f32::INFINITY;
        for (j, (&s, &d)) in self.head_sq.iter().zip(&dots[..padded]).enumerate() {
            if s - 2.0 * d < least {
                least = s - 2.0 * d;
                guess = j;
            }
        }
        let mut full_distances = 0usize;
        for k in 0..queries {
            if full_distances > (k + 1) * m / DENSE_FRACTION {
                // Features the subspace describes poorly: full products for the rest.
                dense_nearest(
                    &tile[k * dim..],
                    memory,
                    &self.memory_sq,
                    dim,
                    &mut nearest[k..],
                );
                break;
            }
            let q = &tile[k * dim..(k + 1) * dim];
            let q_sq = dot(q, q);
            let (qh, qt) = qp[k * r..(k + 1) * r].split_at(head);
            let (qh_sq, qt_sq) = (dot(qh, qh), dot(qt, qt));
            // Rounding margin of the expanded squared distances.
            let margin = 1e-4 * (q_sq + max_memory_sq);
            let mut best = squared_distance(q, q_sq, memory_row(guess), self.memory_sq[guess]);
            // With v_j = |p_j|^2 - 2 qh.p_j over the leading directions, the bound there is
            // qh_sq + v_j, so a patch can only be nearer when v_j < best + margin - qh_sq.
            let mut limit = best + margin - qh_sq;
            let dots_k = &dots[k * padded..(k + 1) * padded];
            for (b, (d, s)) in dots_k
                .chunks_exact(SCAN_BLOCK)
                .zip(self.head_sq.chunks_exact(SCAN_BLOCK))
                .enumerate()
            {
                // One vector comparison rules out almost every block.
                let mut values = [0.0f32; SCAN_BLOCK];
                let mut any = false;
                for i in 0..SCAN_BLOCK {
                    values[i] = s[i] - 2.0 * d[i];
                    any |= values[i] < limit;
                }
                if !any {
                    continue;
                }
                for (i, &v) in values.iter().enumerate() {
                    if v >= limit {
                        continue;
                    }
                    // The whole subspace: the leading part plus the rest (orthogonal to it).
                    let j = b * SCAN_BLOCK + i;
                    let pt = &self.projected[j * r + head..(j + 1) * r];
                    if qh_sq + v + squared_distance(qt, qt_sq, pt, self.tail_sq[j]) < best + margin
                    {
                        full_distances += 1;
                        let d = squared_distance(q, q_sq, memory_row(j), self.memory_sq[j]);
                        if d < best {
                            best = d;
                            guess = j;
                            limit = best + margin - qh_sq;
                        }
                    }
                }
            }
            nearest[k] = best.max(0.0).sqrt();
        }
    }
}

/// Orthonormalises the first `columns` columns of `basis` (`[dim, columns]`, row-major) in place
/// by modified Gram-Schmidt in f64, moving the ones that are (numerically) dependent on earlier
/// ones out; returns how many remain (they come first).
fn orthonormalise(basis: &mut Vec<f32>, dim: usize, columns: usize) -> usize {
    let mut kept: Vec<Vec<f64>> = Vec::with_capacity(columns);
    for c in 0..columns {
        let mut v: Vec<f64> = (0..dim)
            .map(|i| f64::from(basis[i * columns + c]))
            .collect();
        let norm_before = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for _ in 0..2 {
            for u in &kept {
                let proj: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(a, b)| *a -= proj * b);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-6 * norm_before.max(f64::MIN_POSITIVE) && norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
            kept.push(v);
        }
    }
    let r = kept.len();
    let mut out = vec![0.0f32; dim * r];
    for (c, v) in kept.iter().enumerate() {
        for (i, &x) in v.iter().enumerate() {
            out[i * r + c] = x as f32;
        }
    }
    *basis = out;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3x3 convolution (zero padding), ReLU and 2x2 mean, pixel by pixel.
    fn reference(s: LevelShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
        let (h, w) = (s.height, s.width);
        let conv = |b: usize, o: usize, y: usize, xx: usize| -> f32 {
            let mut acc = 0.0;
            for i in 0..s.inputs {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (iy, ix) =
                            (y as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            let v = x[((b * s.inputs + i) * h + iy as usize) * w + ix as usize];
                            acc += v * weight[((o * s.inputs + i) * 3 + ky) * 3 + kx];
                        }
                    }
                }
            }
            acc.max(0.0)
        };
        let mut out = Vec::new();
        for b in 0..s.batch {
            for o in 0..s.outputs {
                for y in 0..h / 2 {
                    for xx in 0..w / 2 {
                        let sum = conv(b, o, 2 * y, 2 * xx)
                            + conv(b, o, 2 * y, 2 * xx + 1)
                            + conv(b, o, 2 * y + 1, 2 * xx)
                            + conv(b, o, 2 * y + 1, 2 * xx + 1);
                        out.push(0.25 * sum);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn fused_level_matches_a_pixel_by_pixel_reference_over_several_bands() {
        // 8 inputs at 64 x 60: 5 bands of pooled rows; an odd size; and the Winograd path at
        // an odd size and over several bands of tile rows.
        for (inputs, height, width) in [(8, 64, 60), (2, 9, 7), (16, 11, 9), (20, 160, 150)] {
            let s = LevelShape {
                batch: 2,
                inputs,
                outputs: 6,
                height,
                width,
            };
            let x: Vec<f32> = (0..s.batch * inputs * height * width)
                .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let weight: Vec<f32> = (0..6 * inputs * 9)
                .map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5)
                .collect();
            let ours = conv3x3_relu_pool(s, &x, &weight);
            let expected = reference(s, &x, &weight);
            assert_eq!(ours.len(), expected.len());
            for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn the_pruned_search_finds_the_same_nearest_patches_as_brute_force() {
        // Rows in a few clusters (strong shared directions) told apart by noise in every
        // direction, so that the nearest row often lies outside the subspace's first pick; a
        // memory smaller than the search subspace; and plain noise in many directions, which
        // the subspace describes too poorly to prune (the full products, over several chunks).
        let value = |i: usize| {
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            (h % 2000) as f32 / 1000.0 - 1.0
        };
        #[derive(Clone, Copy, PartialEq)]
        enum Rows {
            /// Five clusters with noise in every direction.
            Clustered,
            /// Six hidden factors plus a little noise: what the subspace describes well, so
            /// that the bounds do the work.
            FewFactors,
            /// Noise only.
            Noise,
        }
        let cases = [
            (48, 1500, 200, Rows::Clustered),
            (48, 1500, 300, Rows::FewFactors),
            (6, 4, 30, Rows::Clustered),
            (96, 2100, 150, Rows::Noise),
        ];
        for (dim, m, n, kind) in cases {
            let row = |seed: usize, dim: usize| -> Vec<f32> {
                let noise = |k: usize| value(seed * 131 + k + 7);
                match kind {
                    Rows::Clustered => (0..dim)
                        .map(|k| 3.0 * value((seed % 5) * 1000 + k) + 0.5 * noise(k))
                        .collect(),
                    Rows::FewFactors => (0..dim)
                        .map(|k| {
                            (0..6)
                                .map(|f| value(seed * 17 + f + 3) * value(50_000 + f * 100 + k))
                                .sum::<f32>()
                                + 0.02 * noise(k)
                        })
                        .collect(),
                    Rows::Noise => (0..dim).map(|k| 0.5 * noise(k)).collect(),
                }
            };
            let memory: Vec<f32> = (0..m).flat_map(|j| row(j, dim)).collect();
            let queries: Vec<f32> = (0..n).flat_map(|j| row(j + 100_000, dim)).collect();
            let index = MemoryIndex::build(&memory, dim);
            assert!(index.is_for(&memory, dim));
            let pruned = index.nearest(&memory, &queries);
            let brute: Vec<f32> = queries
                .chunks_exact(dim)
                .map(|q| {
                    memory
                        .chunks_exact(dim)
                        .map(|r| r.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum::<f32>())
                        .fold(f32::INFINITY, f32::min)
                        .sqrt()
                })
                .collect();
            // Squared distances come from |q|^2 + |m|^2 - 2 q.m on both sides: compare them
            // within the rounding of those terms.
            let largest =
                |rows: &[f32]| squared_norms(rows, dim).into_iter().fold(0.0f32, f32::max);
            let tolerance = 1e-5 * (largest(&memory) + largest(&queries));
            for (i, (a, b)) in pruned.iter().zip(&brute).enumerate() {
                assert!((a * a - b * b).abs() <= tolerance, "query {i}: {a} vs {b}");
            }
        }
        let mut other: Vec<f32> = (0..40).map(value).collect();
        let index = MemoryIndex::build(&other, 4);
        other[3] += 1.0;
        assert!(!index.is_for(&other, 4));
    }
}
