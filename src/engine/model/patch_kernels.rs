//! Hand-written CPU kernels for the patch memory on `flex` (forward only, nothing is trained):
//! the extractor's 3x3 convolution, ReLU and 2x2 average pooling in one pass; the patch features
//! (level 3 upsampled onto level 2, 3x3 neighbour mean) written patch by patch; and the nearest
//! remembered patch found tile by tile, without a full distance matrix. They compute what the
//! burn operations in [`patch_memory`](super::patch_memory) compute, which the tests check.
//!
//! Measured on `flex` before them (a batch of 8 mono 160 px extractor inputs): the first
//! convolution ran at about 2 GFLOP/s (107 ms), upsampling, concatenation and averaging took
//! about 100 ms, and the search 560 ms.

use rayon::prelude::*;

use super::conv_kernels::{Operand, matmul};

/// Floats of column matrix worked on at once (fits the per-core L2 cache).
const BAND_FLOATS: usize = 64 * 1024;
/// Queries compared with the memory at once by one thread.
const QUERY_TILE: usize = 128;
/// Remembered patches compared with a query tile at once.
const MEMORY_CHUNK: usize = 1024;

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

/// One level of the extractor: 3x3 convolution (padding 1, no bias), ReLU, 2x2 average pooling.
/// `x [batch, inputs, h, w]`, `weight [outputs, inputs, 3, 3]` → `[batch, outputs, h/2, w/2]`.
pub fn conv3x3_relu_pool(s: LevelShape, x: &[f32], weight: &[f32]) -> Vec<f32> {
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
    let threads = if s.batch >= rayon::current_num_threads() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    };
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

/// Distance from every query row (`queries [n, dim]`) to its nearest row of `memory [m, dim]`,
/// through `|q|^2 - 2 q.m + |m|^2` (clamped at zero): `[n]`.
pub fn nearest_distances(queries: &[f32], memory: &[f32], dim: usize) -> Vec<f32> {
    let n = queries.len() / dim.max(1);
    let m = memory.len() / dim.max(1);
    let mut out = vec![f32::INFINITY; n];
    if n == 0 || m == 0 {
        return out;
    }
    let squares = |rows: &[f32]| -> Vec<f32> {
        rows.chunks_exact(dim)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect()
    };
    let memory_sq = squares(memory);
    out.par_chunks_mut(QUERY_TILE)
        .enumerate()
        .for_each(|(t, best)| {
            let start = t * QUERY_TILE;
            let tile = &queries[start * dim..(start + best.len()) * dim];
            let mut dots = vec![0.0f32; best.len() * MEMORY_CHUNK];
            for m0 in (0..m).step_by(MEMORY_CHUNK) {
                let mc = MEMORY_CHUNK.min(m - m0);
                matmul(
                    &mut dots,
                    mc,
                    best.len(),
                    mc,
                    dim,
                    Operand::rows(tile, dim),
                    Operand::transposed(&memory[m0 * dim..(m0 + mc) * dim], dim),
                    false,
                    gemm::Parallelism::None,
                );
                let sq = &memory_sq[m0..m0 + mc];
                for (b, row) in best.iter_mut().zip(dots.chunks_exact(mc)) {
                    let nearest = row
                        .iter()
                        .zip(sq)
                        .map(|(&d, &s)| s - 2.0 * d)
                        .fold(f32::INFINITY, f32::min);
                    *b = b.min(nearest);
                }
            }
            let query_sq = squares(tile);
            for (b, q) in best.iter_mut().zip(query_sq) {
                *b = (*b + q).max(0.0).sqrt();
            }
        });
    out
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
        // 8 inputs at 64 x 60: 5 bands of pooled rows; and an odd size.
        for (inputs, height, width) in [(8, 64, 60), (2, 9, 7)] {
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
    fn nearest_distances_match_brute_force_over_tiles_and_chunks() {
        let dim = 5;
        let (n, m) = (300, 2100); // 3 query tiles, 3 memory chunks
        let value = |i: usize| ((i * 2654435761) % 1000) as f32 / 250.0 - 2.0;
        let queries: Vec<f32> = (0..n * dim).map(value).collect();
        let memory: Vec<f32> = (0..m * dim).map(|i| value(i + 7)).collect();
        let ours = nearest_distances(&queries, &memory, dim);
        for (q, &d) in queries.chunks_exact(dim).zip(&ours) {
            let best = memory
                .chunks_exact(dim)
                .map(|r| r.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum::<f32>())
                .fold(f32::INFINITY, f32::min)
                .sqrt();
            assert!((d - best).abs() <= 1e-3 * (1.0 + best), "{d} vs {best}");
        }
    }
}
