//! Hand-written CPU kernels for the autoencoder's layers: 4x4 convolutions of stride 2 and
//! padding 1 (the encoder) and their transposes (the decoder), with the bias and the activation
//! fused in, forward and backward.
//!
//! burn's `flex` backend computes the gradients of these layers through generic fallbacks (a
//! transposed convolution for the input gradient, a convolution with the batch as channels for the
//! weight gradient) that reach 2-13 GFLOP/s on this project's 2-core machine. Here every pass is
//! one `im2col` / `col2im` copy and one matrix product per image through the `gemm` crate (the
//! same one `flex` uses for its forward convolutions), with the images of a batch spread over
//! threads. Plain slices in, plain vectors out: no burn types, so the kernels are testable alone.

use rayon::prelude::*;

/// Kernel side of every layer.
pub const KERNEL: usize = 4;
/// Taps per input channel (`KERNEL * KERNEL`).
const TAPS: usize = KERNEL * KERNEL;

/// The activation fused after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None: the layer's raw output.
    Identity,
    /// Leaky ReLU with slope [`LEAKY_SLOPE`] below zero.
    LeakyRelu,
    /// The logistic sigmoid.
    Sigmoid,
}

/// Slope of the leaky ReLU below zero.
pub const LEAKY_SLOPE: f32 = 0.2;

impl Activation {
    fn apply(self, v: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::LeakyRelu => v
                .iter_mut()
                .for_each(|x| *x = if *x < 0.0 { *x * LEAKY_SLOPE } else { *x }),
            Activation::Sigmoid => v.iter_mut().for_each(|x| *x = 1.0 / (1.0 + (-*x).exp())),
        }
    }

    /// Gradient before the activation, from the gradient after it and the activation's output
    /// (each of these activations' derivatives is a function of its output).
    fn backward(self, output: &[f32], grad: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::LeakyRelu => grad
                .iter_mut()
                .zip(output)
                .for_each(|(g, &y)| *g = if y < 0.0 { *g * LEAKY_SLOPE } else { *g }),
            Activation::Sigmoid => grad
                .iter_mut()
                .zip(output)
                .for_each(|(g, &y)| *g *= y * (1.0 - y)),
        }
    }
}

/// Side of the output of a 4x4, stride-2, padding-1 convolution over `side` pixels (`side / 2`
/// for even sides).
pub fn down_side(side: usize) -> usize {
    (side + 2).saturating_sub(KERNEL) / 2 + 1
}

/// Side of the output of the transposed layer over `side` pixels (`2 * side`).
pub fn up_side(side: usize) -> usize {
    2 * side
}

/// Shape of one layer call: batch and channels, image sides on the large (full-resolution) side
/// of the layer, whichever direction it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    /// Images in the batch.
    pub batch: usize,
    /// Channels on the large side (the encoder layer's input, the decoder layer's output).
    pub wide_channels: usize,
    /// Channels on the small side (the encoder layer's output, the decoder layer's input).
    pub narrow_channels: usize,
    /// Height of the large side.
    pub height: usize,
    /// Width of the large side.
    pub width: usize,
}

impl LayerShape {
    fn wide_plane(&self) -> usize {
        self.height * self.width
    }
    fn narrow_plane(&self) -> usize {
        down_side(self.height) * down_side(self.width)
    }
    fn wide_len(&self) -> usize {
        self.wide_channels * self.wide_plane()
    }
    fn narrow_len(&self) -> usize {
        self.narrow_channels * self.narrow_plane()
    }
    /// Rows of the column matrix: one per wide channel and tap.
    fn taps(&self) -> usize {
        self.wide_channels * TAPS
    }
}

/// Range of output columns `o` whose input column `2 o + tap - 1` lies inside `0..side`.
fn valid_range(tap: usize, side: usize, out_side: usize) -> (usize, usize) {
    let lo = usize::from(tap == 0);
    let hi = if side + 1 >= tap {
        ((side + 1 - tap).div_ceil(2)).min(out_side)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// Floats of column matrix worked on at once: 256 KiB, half of this machine's per-core L2 cache.
const BAND_FLOATS: usize = 64 * 1024;
/// The same for the decoder's forward pass, whose products have few inner terms: larger bands
/// measured faster there (layers at 40 and 80 px: 6.0 → 4.8 and 9.5 → 8.7 ms per batch of 8).
const UP_FORWARD_FLOATS: usize = 256 * 1024;

/// A band of output rows on the narrow side, whose column matrix is built and used at once so it
/// stays in cache.
type Band = std::ops::Range<usize>;

/// Splits the narrow side's rows into bands of about `floats` column-matrix floats.
fn bands(s: &LayerShape, floats: usize) -> Vec<Band> {
    let (ho, wo) = (down_side(s.height), down_side(s.width));
    let rows = (floats / (s.taps() * wo).max(1)).clamp(1, ho.max(1));
    (0..ho)
        .step_by(rows)
        .map(|r| r..(r + rows).min(ho))
        .collect()
}

/// One image row split into its even and odd pixels: each of the four horizontal taps of a
/// stride-2 layer reads one of them, shifted, as a contiguous run.
struct RowSplit {
    even: Vec<f32>,
    odd: Vec<f32>,
}

impl RowSplit {
    fn new(w: usize) -> Self {
        RowSplit {
            even: vec![0.0; w.div_ceil(2) + 1],
            odd: vec![0.0; w / 2 + 1],
        }
    }

    /// Splits `row` into its even and odd columns (whole pairs first, so that the loop
    /// vectorises; a per-pair bounds check kept it scalar and made it most of `im2col`).
    fn load(&mut self, row: &[f32]) {
        let pairs = row.chunks_exact(2);
        if let [last] = pairs.remainder() {
            self.even[row.len() / 2] = *last;
        }
        for ((e, o), pair) in self.even.iter_mut().zip(self.odd.iter_mut()).zip(pairs) {
            *e = pair[0];
            *o = pair[1];
        }
    }

    fn clear(&mut self) {
        self.even.fill(0.0);
        self.odd.fill(0.0);
    }

    /// Adds the even and odd columns back onto `row` (the inverse of [`RowSplit::load`]).
    fn add_to(&self, row: &mut [f32]) {
        let half = row.len() / 2;
        let mut pairs = row.chunks_exact_mut(2);
        for ((pair, e), o) in (&mut pairs).zip(&self.even).zip(&self.odd) {
            pair[0] += e;
            pair[1] += o;
        }
        if let [last] = pairs.into_remainder() {
            *last += self.even[half];
        }
    }

    /// The half-row that tap `kx` reads, and `shift`: output column `o` reads input column
    /// `2 o + kx - 1`, which is the half-row's entry `o + shift - 1`.
    fn tap(&mut self, kx: usize) -> (&mut [f32], usize) {
        match kx {
            0 => (&mut self.odd, 0),
            1 => (&mut self.even, 1),
            2 => (&mut self.odd, 1),
            _ => (&mut self.even, 2),
        }
    }
}

/// Copies the 4x4 patches under the output rows `band` of `image` (`[channels, h, w]`) into the
/// columns of `cols` (`[channels * 16, band.len() * wo]`), zero outside the image.
fn im2col(image: &[f32], channels: usize, h: usize, w: usize, band: Band, cols: &mut [f32]) {
    let wo = down_side(w);
    let n = band.len() * wo;
    let mut split = RowSplit::new(w);
    for c in 0..channels {
        let plane = &image[c * h * w..(c + 1) * h * w];
        for ky in 0..KERNEL {
            for (r, oy) in band.clone().enumerate() {
                let base = (c * TAPS + ky * KERNEL) * n + r * wo;
                let iy = 2 * oy + ky;
                if iy == 0 || iy > h {
                    for kx in 0..KERNEL {
                        cols[base + kx * n..][..wo].fill(0.0);
                    }
                    continue;
                }
                split.load(&plane[(iy - 1) * w..iy * w]);
                for kx in 0..KERNEL {
                    let out = &mut cols[base + kx * n..][..wo];
                    let (lo, hi) = valid_range(kx, w, wo);
                    let (half, shift) = split.tap(kx);
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    out[lo..hi].copy_from_slice(&half[lo + shift - 1..hi + shift - 1]);
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds every column entry of `band` back onto its pixel of `image`
/// (`[channels, h, w]`, which the caller zeroes or pre-fills).
fn col2im(cols: &[f32], channels: usize, h: usize, w: usize, band: Band, image: &mut [f32]) {
    let wo = down_side(w);
    let n = band.len() * wo;
    let mut split = RowSplit::new(w);
    for c in 0..channels {
        let plane = &mut image[c * h * w..(c + 1) * h * w];
        for ky in 0..KERNEL {
            for (r, oy) in band.clone().enumerate() {
                let iy = 2 * oy + ky;
                if iy == 0 || iy > h {
                    continue;
                }
                let base = (c * TAPS + ky * KERNEL) * n + r * wo;
                split.clear();
                for kx in 0..KERNEL {
                    let src = &cols[base + kx * n..][..wo];
                    let (lo, hi) = valid_range(kx, w, wo);
                    let (half, shift) = split.tap(kx);
                    half[lo + shift - 1..hi + shift - 1]
                        .iter_mut()
                        .zip(&src[lo..hi])
                        .for_each(|(a, v)| *a += v);
                }
                split.add_to(&mut plane[(iy - 1) * w..iy * w]);
            }
        }
    }
}

/// A matrix operand of [`matmul`]: a pointer-free view with row and column strides.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Operand<'a> {
    /// A row-major matrix of `cols` columns.
    pub(super) fn rows(data: &'a [f32], cols: usize) -> Self {
        Operand {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// Columns from `start` on of a row-major matrix whose rows are `row_stride` apart.
    pub(super) fn band(data: &'a [f32], row_stride: usize, start: usize) -> Self {
        Operand {
            data: &data[start..],
            row_stride,
            col_stride: 1,
        }
    }
    /// This matrix transposed.
    fn t(self) -> Self {
        Operand {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
    /// The transpose of a row-major matrix of `cols_of_stored` columns.
    pub(super) fn transposed(data: &'a [f32], cols_of_stored: usize) -> Self {
        Operand {
            data,
            row_stride: 1,
            col_stride: cols_of_stored,
        }
    }
}

/// `dst (m x n, rows dst_row_stride apart) (+)= lhs (m x k) * rhs (k x n)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    dst: &mut [f32],
    dst_row_stride: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: Operand,
    rhs: Operand,
    accumulate: bool,
    threads: gemm::Parallelism,
) {
    let extent = |o: &Operand, rows: usize, cols: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * o.row_stride + (cols - 1) * o.col_stride + 1
        }
    };
    let dst_view = Operand {
        data: dst,
        row_stride: dst_row_stride,
        col_stride: 1,
    };
    assert!(
        dst.len() >= extent(&dst_view, m, n),
        "matmul: destination too small"
    );
    assert!(
        lhs.data.len() >= extent(&lhs, m, k),
        "matmul: lhs too small"
    );
    assert!(
        rhs.data.len() >= extent(&rhs, k, n),
        "matmul: rhs too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above keep every index gemm reads or writes inside the slices; `dst`
    // is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            threads,
        );
    }
}

/// How a batch is spread over threads: whole images per thread when there are enough images,
/// else each matrix product is split.
pub(super) fn gemm_threads(batch: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if batch >= threads || threads == 1 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    }
}

/// Runs `per_image` over the batch (in parallel when the batch fills the threads).
fn for_each_image<F>(batch: usize, out: &mut [f32], per_image: F)
where
    F: Fn(usize, &mut [f32]) + Send + Sync,
{
    let len = out.len() / batch.max(1);
    if len == 0 {
        return;
    }
    if matches!(gemm_threads(batch), gemm::Parallelism::None) {
        out.par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, o)| per_image(i, o));
    } else {
        out.chunks_mut(len)
            .enumerate()
            .for_each(|(i, o)| per_image(i, o));
    }
}

/// Encoder layer forward: `x [batch, wide, h, w]`, `weight [narrow, wide, 4, 4]`,
/// `bias [narrow]` → `[batch, narrow, h/2, w/2]`.
pub fn down_forward(
    s: LayerShape,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    act: Activation,
) -> Vec<f32> {
    let image = LayerShape { batch: 1, ..s };
    batch_forward(
        s.batch,
        x,
        s.wide_len(),
        s.narrow_len(),
        |xi, threads, y| down_image(image, xi, weight, bias, act, threads, y),
    )
}

/// [`down_forward`] of one image (`s.batch` is ignored) into `y`, on `threads`.
pub fn down_image(
    s: LayerShape,
    xi: &[f32],
    weight: &[f32],
    bias: &[f32],
    act: Activation,
    threads: gemm::Parallelism,
    y: &mut [f32],
) {
    let (p, k, wo) = (s.narrow_plane(), s.taps(), down_side(s.width));
    let bands = bands(&s, BAND_FLOATS);
    let mut cols = vec![0.0f32; k * bands[0].len() * wo];
    for band in &bands {
        let bn = band.len() * wo;
        let segments = band.start * wo..band.end * wo;
        for (chunk, &b) in y.chunks_exact_mut(p).zip(bias) {
            chunk[segments.clone()].fill(b);
        }
        im2col(
            xi,
            s.wide_channels,
            s.height,
            s.width,
            band.clone(),
            &mut cols,
        );
        matmul(
            &mut y[band.start * wo..],
            p,
            s.narrow_channels,
            bn,
            k,
            Operand::rows(weight, k),
            Operand::rows(&cols, bn),
            true,
            threads,
        );
        // The band's outputs are final and still in cache.
        for chunk in y.chunks_exact_mut(p) {
            act.apply(&mut chunk[segments.clone()]);
        }
    }
}

/// Decoder layer forward: `x [batch, narrow, h/2, w/2]`, `weight [narrow, wide, 4, 4]` (burn's
/// transposed-convolution layout), `bias [wide]` → `[batch, wide, h, w]`.
pub fn up_forward(
    s: LayerShape,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    act: Activation,
) -> Vec<f32> {
    let image = LayerShape { batch: 1, ..s };
    batch_forward(
        s.batch,
        x,
        s.narrow_len(),
        s.wide_len(),
        |xi, threads, y| up_image(image, xi, weight, bias, act, threads, y),
    )
}

/// Runs `per_image` (input, threads for its products, zeroed output) over a batch of inputs of
/// `in_len` values into a new batch of outputs of `out_len` values.
fn batch_forward<F>(
    batch: usize,
    x: &[f32],
    in_len: usize,
    out_len: usize,
    per_image: F,
) -> Vec<f32>
where
    F: Fn(&[f32], gemm::Parallelism, &mut [f32]) + Send + Sync,
{
    let threads = gemm_threads(batch);
    let mut out = vec![0.0f32; batch * out_len];
    for_each_image(batch, &mut out, |i, y| {
        per_image(&x[i * in_len..][..in_len], threads, y)
    });
    out
}

/// [`up_forward`] of one image (`s.batch` is ignored) into `y` (zeroed), on `threads`.
pub fn up_image(
    s: LayerShape,
    xi: &[f32],
    weight: &[f32],
    bias: &[f32],
    act: Activation,
    threads: gemm::Parallelism,
    y: &mut [f32],
) {
    let (p, k, wo) = (s.narrow_plane(), s.taps(), down_side(s.width));
    let bands = bands(&s, UP_FORWARD_FLOATS);
    let mut cols = vec![0.0f32; k * bands[0].len() * wo];
    // Output rows before `final_rows` have all their terms; the bias and the activation go on
    // them while they are still in cache.
    let mut final_rows = 0;
    for band in &bands {
        let bn = band.len() * wo;
        matmul(
            &mut cols,
            bn,
            k,
            bn,
            s.narrow_channels,
            Operand::transposed(weight, k),
            Operand::band(xi, p, band.start * wo),
            false,
            threads,
        );
        col2im(&cols, s.wide_channels, s.height, s.width, band.clone(), y);
        // Row `r` takes terms from narrow rows up to (r + 1) / 2.
        let ready = if band.end == down_side(s.height) {
            s.height
        } else {
            (2 * band.end - 1).min(s.height)
        };
        for (plane, &b) in y.chunks_exact_mut(s.wide_plane()).zip(bias) {
            let rows = &mut plane[final_rows * s.width..ready * s.width];
            rows.iter_mut().for_each(|v| *v += b);
            act.apply(rows);
        }
        final_rows = ready;
    }
}

/// A 1x1 convolution of one image: `x [inputs, pixels]`, `weight [outputs, inputs]`, `bias
/// [outputs]` → `[outputs, pixels]`, then `act`.
pub fn pointwise_image(
    x: &[f32],
    inputs: usize,
    weight: &[f32],
    bias: &[f32],
    act: Activation,
) -> Vec<f32> {
    let outputs = bias.len();
    let pixels = x.len() / inputs.max(1);
    let mut y = vec![0.0f32; outputs * pixels];
    for (chunk, &b) in y.chunks_exact_mut(pixels.max(1)).zip(bias) {
        chunk.fill(b);
    }
    matmul(
        &mut y,
        pixels,
        outputs,
        pixels,
        inputs,
        Operand::rows(weight, inputs),
        Operand::rows(x, pixels),
        true,
        gemm::Parallelism::None,
    );
    act.apply(&mut y);
    y
}

/// Gradients of one layer call.
#[derive(Debug, Clone)]
pub struct LayerGrads {
    /// Gradient of the input, when asked for.
    pub input: Option<Vec<f32>>,
    /// Gradient of the weight (the weight's layout).
    pub weight: Vec<f32>,
    /// Gradient of the bias.
    pub bias: Vec<f32>,
}

/// Sums the per-thread partial weight gradients (each transposed, `[taps, rows]`) and bias
/// gradients; returns the weight gradient as `[rows, taps]`, the weight's own layout.
fn sum_partials(
    parts: Vec<(Vec<f32>, Vec<f32>)>,
    taps: usize,
    rows: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut transposed = vec![0.0f32; taps * rows];
    let mut b: Vec<f32> = Vec::new();
    for (pw, pb) in parts {
        transposed.iter_mut().zip(&pw).for_each(|(a, v)| *a += v);
        if b.is_empty() {
            b = vec![0.0; pb.len()];
        }
        b.iter_mut().zip(&pb).for_each(|(a, v)| *a += v);
    }
    let mut w = vec![0.0f32; taps * rows];
    for (t, row) in transposed.chunks_exact(rows.max(1)).enumerate() {
        for (r, &v) in row.iter().enumerate() {
            w[r * taps + t] = v;
        }
    }
    (w, b)
}

/// Splits the batch into one contiguous run of images per thread.
fn image_runs(batch: usize) -> Vec<std::ops::Range<usize>> {
    let runs = if matches!(gemm_threads(batch), gemm::Parallelism::None) {
        rayon::current_num_threads().min(batch).max(1)
    } else {
        1
    };
    (0..runs)
        .map(|r| r * batch / runs..(r + 1) * batch / runs)
        .collect()
}

/// The sizes one layer's backward pass works with, per image.
struct BackwardSizes {
    /// Values of the layer's output (and its gradient).
    output: usize,
    /// Values of one output channel.
    output_plane: usize,
    /// Values of the layer's input (and its gradient).
    input: usize,
    /// Values of the (transposed) weight gradient.
    weight: usize,
    /// Values of the column matrix of one band.
    cols: usize,
}

/// What a backward pass computes for one image: from the gradient before the activation (`dz`),
/// add its weight gradient to `dw` (transposed) and, when asked, write its input gradient `dx`;
/// `cols` is scratch space.
type ImageBackward<'a> =
    dyn Fn(usize, &[f32], &mut [f32], &mut [f32], Option<&mut [f32]>) + Sync + 'a;

/// Runs a layer's backward pass over the batch, whole images per thread: the gradient before the
/// activation and the bias gradient here, the rest in `per_image`. Returns the input gradient
/// (when wanted) and the summed per-thread weight (transposed, `[taps, rows]`) and bias gradients.
#[allow(clippy::too_many_arguments)]
fn backward_batch(
    batch: usize,
    sizes: BackwardSizes,
    output: &[f32],
    output_grad: &[f32],
    act: Activation,
    want_input_grad: bool,
    (taps, rows): (usize, usize),
    per_image: &ImageBackward,
) -> LayerGrads {
    let mut input_grad = want_input_grad.then(|| vec![0.0f32; batch * sizes.input]);
    let input_grad_ptr = input_grad
        .as_mut()
        .map(|g| SharedOut(g.as_mut_ptr(), g.len()));
    let channels = sizes.output / sizes.output_plane.max(1);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = image_runs(batch)
        .into_par_iter()
        .map(|run| {
            let mut dw = vec![0.0f32; sizes.weight];
            let mut db = vec![0.0f32; channels];
            let mut cols = vec![0.0f32; sizes.cols];
            let mut dz = vec![0.0f32; sizes.output];
            for i in run {
                let range = i * sizes.output..(i + 1) * sizes.output;
                dz.copy_from_slice(&output_grad[range.clone()]);
                act.backward(&output[range], &mut dz);
                for (b, chunk) in db.iter_mut().zip(dz.chunks_exact(sizes.output_plane)) {
                    *b += chunk.iter().sum::<f32>();
                }
                // SAFETY: each image writes only its own disjoint range of the input gradient.
                let dx = input_grad_ptr.map(|g| unsafe { g.range(i * sizes.input, sizes.input) });
                per_image(i, &dz, &mut dw, &mut cols, dx);
            }
            (dw, db)
        })
        .collect();
    let (weight, bias) = sum_partials(parts, taps, rows);
    LayerGrads {
        input: input_grad,
        weight,
        bias,
    }
}

/// Encoder layer backward, from its input `x`, `weight`, its (activated) `output` and the
/// gradient of that output.
pub fn down_backward(
    s: LayerShape,
    x: &[f32],
    weight: &[f32],
    output: &[f32],
    output_grad: &[f32],
    act: Activation,
    want_input_grad: bool,
) -> LayerGrads {
    let (p, k, co, wo) = (
        s.narrow_plane(),
        s.taps(),
        s.narrow_channels,
        down_side(s.width),
    );
    let threads = gemm_threads(s.batch);
    let bands = bands(&s, BAND_FLOATS);
    let sizes = BackwardSizes {
        output: s.narrow_len(),
        output_plane: p,
        input: s.wide_len(),
        weight: co * k,
        cols: k * bands[0].len() * wo,
    };
    let per_image =
        |i: usize, dz: &[f32], dw: &mut [f32], cols: &mut [f32], mut dx: Option<&mut [f32]>| {
            let xi = &x[i * s.wide_len()..][..s.wide_len()];
            for band in &bands {
                let bn = band.len() * wo;
                let dz_band = Operand::band(dz, p, band.start * wo);
                im2col(xi, s.wide_channels, s.height, s.width, band.clone(), cols);
                // The weight gradient transposed (`[k, co]`): this product's shape runs 1.3-1.7x
                // faster in gemm than `[co, k]` (measured on these layers).
                matmul(
                    dw,
                    co,
                    k,
                    co,
                    bn,
                    Operand::rows(cols, bn),
                    dz_band.t(),
                    true,
                    threads,
                );
                if let Some(dx) = dx.as_deref_mut() {
                    matmul(
                        cols,
                        bn,
                        k,
                        bn,
                        co,
                        Operand::transposed(weight, k),
                        dz_band,
                        false,
                        threads,
                    );
                    col2im(cols, s.wide_channels, s.height, s.width, band.clone(), dx);
                }
            }
        };
    backward_batch(
        s.batch,
        sizes,
        output,
        output_grad,
        act,
        want_input_grad,
        (k, co),
        &per_image,
    )
}

/// Decoder layer backward, from its input `x`, `weight`, its (activated) `output` and the
/// gradient of that output.
pub fn up_backward(
    s: LayerShape,
    x: &[f32],
    weight: &[f32],
    output: &[f32],
    output_grad: &[f32],
    act: Activation,
    want_input_grad: bool,
) -> LayerGrads {
    let (p, k, wo) = (s.narrow_plane(), s.taps(), down_side(s.width));
    let (ci, co) = (s.narrow_channels, s.wide_channels);
    let threads = gemm_threads(s.batch);
    let bands = bands(&s, BAND_FLOATS);
    let sizes = BackwardSizes {
        output: s.wide_len(),
        output_plane: s.wide_plane(),
        input: s.narrow_len(),
        weight: ci * k,
        cols: k * bands[0].len() * wo,
    };
    let per_image =
        |i: usize, dz: &[f32], dw: &mut [f32], cols: &mut [f32], mut dx: Option<&mut [f32]>| {
            let xi = &x[i * s.narrow_len()..][..s.narrow_len()];
            for band in &bands {
                let bn = band.len() * wo;
                im2col(dz, co, s.height, s.width, band.clone(), cols);
                // Transposed (`[k, ci]`), as in `down_backward`.
                let x_band = Operand::band(xi, p, band.start * wo);
                matmul(
                    dw,
                    ci,
                    k,
                    ci,
                    bn,
                    Operand::rows(cols, bn),
                    x_band.t(),
                    true,
                    threads,
                );
                if let Some(dx) = dx.as_deref_mut() {
                    matmul(
                        &mut dx[band.start * wo..],
                        p,
                        ci,
                        bn,
                        k,
                        Operand::rows(weight, k),
                        Operand::rows(cols, bn),
                        false,
                        threads,
                    );
                }
            }
        };
    backward_batch(
        s.batch,
        sizes,
        output,
        output_grad,
        act,
        want_input_grad,
        (k, ci),
        &per_image,
    )
}

/// A raw view of an output buffer that threads fill in disjoint ranges.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32, usize);

// SAFETY: only used to hand disjoint ranges of one buffer to different threads.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// No two live slices from the same buffer may overlap, and none may outlive the buffer.
    unsafe fn range<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        assert!(start + len <= self.1, "range outside the buffer");
        // SAFETY: inside the buffer (asserted); disjointness is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ranges_match_a_bounds_check() {
        for side in 1..12 {
            let out = down_side(side);
            for tap in 0..KERNEL {
                let expect: Vec<usize> = (0..out)
                    .filter(|&o| (2 * o + tap) >= 1 && 2 * o + tap - 1 < side)
                    .collect();
                let (lo, hi) = valid_range(tap, side, out);
                assert_eq!(
                    (lo..hi).collect::<Vec<_>>(),
                    expect,
                    "side {side} tap {tap}"
                );
            }
        }
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        for (c, h, w) in [(2, 6, 8), (3, 7, 9)] {
            check_adjoint(c, h, w);
        }
    }

    fn check_adjoint(c: usize, h: usize, w: usize) {
        let image: Vec<f32> = (0..c * h * w)
            .map(|i| ((i * 7) % 11) as f32 - 5.0)
            .collect();
        let n = down_side(h) * down_side(w) * c * TAPS;
        let probe: Vec<f32> = (0..n).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
        let mut cols = vec![0.0; n];
        im2col(&image, c, h, w, 0..down_side(h), &mut cols);
        let mut back = vec![0.0; image.len()];
        col2im(&probe, c, h, w, 0..down_side(h), &mut back);
        let lhs: f32 = cols.iter().zip(&probe).map(|(a, b)| a * b).sum();
        let rhs: f32 = image.iter().zip(&back).map(|(a, b)| a * b).sum();
        assert_eq!(lhs, rhs);
    }
}
