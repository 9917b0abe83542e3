//! The autoencoder's 4x4 stride-2 layers as a burn backend extension: on the `flex` CPU backend
//! (with or without autodiff) they run the hand-written kernels of
//! [`conv_kernels`](super::conv_kernels), forward and backward; on any other device (a GPU) they
//! are burn's own convolution modules.

use super::conv_kernels::{self, Activation, LayerGrads, LayerShape};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::nn::conv::{Conv2d, ConvTranspose2d};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::{leaky_relu, sigmoid};

/// Which way a layer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A 4x4 stride-2 convolution (halves the side).
    Down,
    /// Its transpose (doubles the side).
    Up,
}

/// A 4x4, stride-2, padding-1 layer with its bias and activation, as one backend operation.
#[backend_extension(Flex, Autodiff)]
pub trait StridedConvOps: Backend {
    /// `x [batch, c_in, h, w]`; `weight` in burn's layout for the direction (`[c_out, c_in, 4, 4]`
    /// down, `[c_in, c_out, 4, 4]` up); `bias [c_out]`.
    fn strided_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        direction: Direction,
        activation: Activation,
    ) -> FloatTensor<Self>;
}

/// The layer's shape from its input and weight shapes.
fn layer_shape(x: &[usize], weight: &[usize], direction: Direction) -> LayerShape {
    let (batch, h, w) = (x[0], x[2], x[3]);
    match direction {
        Direction::Down => LayerShape {
            batch,
            wide_channels: x[1],
            narrow_channels: weight[0],
            height: h,
            width: w,
        },
        Direction::Up => LayerShape {
            batch,
            wide_channels: weight[1],
            narrow_channels: x[1],
            height: conv_kernels::up_side(h),
            width: conv_kernels::up_side(w),
        },
    }
}

/// Output shape of a layer call.
fn output_dims(s: LayerShape, direction: Direction) -> [usize; 4] {
    match direction {
        Direction::Down => [
            s.batch,
            s.narrow_channels,
            conv_kernels::down_side(s.height),
            conv_kernels::down_side(s.width),
        ],
        Direction::Up => [s.batch, s.wide_channels, s.height, s.width],
    }
}

/// A contiguous f32 copy (or the tensor itself when it already is one).
fn contiguous(t: &FlexTensor) -> FlexTensor {
    assert_eq!(
        t.dtype(),
        burn::tensor::DType::F32,
        "the autoencoder kernels compute in f32"
    );
    t.to_contiguous()
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("a contiguous f32 tensor (made by `contiguous`)")
}

fn flex_tensor(values: Vec<f32>, dims: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, dims))
}

impl StridedConvOps for Flex {
    fn strided_conv(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        direction: Direction,
        activation: Activation,
    ) -> FlexTensor {
        let s = layer_shape(&x.shape(), &weight.shape(), direction);
        let (x, weight, bias) = (contiguous(&x), contiguous(&weight), contiguous(&bias));
        let run = match direction {
            Direction::Down => conv_kernels::down_forward,
            Direction::Up => conv_kernels::up_forward,
        };
        let out = run(s, values(&x), values(&weight), values(&bias), activation);
        flex_tensor(out, output_dims(s, direction).to_vec())
    }
}

/// The backward pass of [`StridedConvOps::strided_conv`] on `flex`.
#[derive(Debug)]
struct StridedConvBackward;

/// What the backward pass keeps: input, weight, output, direction, activation.
type StridedConvState = (FlexTensor, FlexTensor, FlexTensor, Direction, Activation);

impl Backward<Flex, 3> for StridedConvBackward {
    type State = StridedConvState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let output_grad = contiguous(&grads.consume::<Flex>(&ops.node));
        let (x, weight, output, direction, activation) = ops.state;
        let (x_dims, w_dims) = (x.shape().to_vec(), weight.shape().to_vec());
        let s = layer_shape(&x_dims, &w_dims, direction);
        let (x, weight, output) = (contiguous(&x), contiguous(&weight), contiguous(&output));
        let run = match direction {
            Direction::Down => conv_kernels::down_backward,
            Direction::Up => conv_kernels::up_backward,
        };
        let LayerGrads {
            input,
            weight: weight_grad,
            bias: bias_grad,
        } = run(
            s,
            values(&x),
            values(&weight),
            values(&output),
            values(&output_grad),
            activation,
            node_x.is_some(),
        );
        if let (Some(node), Some(grad)) = (node_x, input) {
            grads.register::<Flex>(node.id, flex_tensor(grad, x_dims));
        }
        if let Some(node) = node_weight {
            grads.register::<Flex>(node.id, flex_tensor(weight_grad, w_dims));
        }
        if let Some(node) = node_bias {
            let len = bias_grad.len();
            grads.register::<Flex>(node.id, flex_tensor(bias_grad, vec![len]));
        }
    }
}

impl<C: CheckpointStrategy> StridedConvOps for Autodiff<Flex, C> {
    fn strided_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        direction: Direction,
        activation: Activation,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), weight.node(), bias.node()];
        let (x, weight) = (x.into_primitive(), weight.into_primitive());
        let output = Flex::strided_conv(
            x.clone(),
            weight.clone(),
            bias.into_primitive(),
            direction,
            activation,
        );
        match StridedConvBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((x, weight, output.clone(), direction, activation), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }
}

/// Whether `device` runs the hand-written kernels (the `flex` CPU backend, with or without
/// autodiff).
pub fn uses_kernels(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        burn::backend::DispatchDevice::Flex(_)
    )
}

fn apply(x: Tensor<4>, activation: Activation) -> Tensor<4> {
    match activation {
        Activation::Identity => x,
        Activation::LeakyRelu => leaky_relu(x, conv_kernels::LEAKY_SLOPE as f64),
        Activation::Sigmoid => sigmoid(x),
    }
}

fn through_kernels(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    direction: Direction,
    activation: Activation,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as StridedConvOps>::strided_conv(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        direction,
        activation,
    ))
}

/// An encoder layer (4x4, stride 2, padding 1, with bias) followed by `activation`.
pub fn conv_down(conv: &Conv2d, x: Tensor<4>, activation: Activation) -> Tensor<4> {
    match &conv.bias {
        Some(bias) if uses_kernels(&x.device()) => through_kernels(
            x,
            conv.weight.val(),
            bias.val(),
            Direction::Down,
            activation,
        ),
        _ => apply(conv.forward(x), activation),
    }
}

/// A decoder layer (transposed 4x4, stride 2, padding 1, with bias) followed by `activation`.
pub fn conv_up(conv: &ConvTranspose2d, x: Tensor<4>, activation: Activation) -> Tensor<4> {
    match &conv.bias {
        Some(bias) if uses_kernels(&x.device()) => {
            through_kernels(x, conv.weight.val(), bias.val(), Direction::Up, activation)
        }
        _ => apply(conv.forward(x), activation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::{Conv2dConfig, ConvTranspose2dConfig};
    use burn::tensor::Distribution;

    fn assert_close(kernels: Tensor<4>, burn: Tensor<4>, what: &str) {
        let (a, b) = (kernels.into_data(), burn.into_data());
        let (a, b) = (a.as_slice::<f32>().unwrap(), b.as_slice::<f32>().unwrap());
        assert_eq!(a.len(), b.len(), "{what}: length");
        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * scale,
                "{what}[{i}]: {x} vs burn {y}"
            );
        }
    }

    /// Forward output and the gradients of input, weight and bias of `layer` on both paths.
    fn check<F, G>(dims: [usize; 4], layer: F, reference: G, what: &str)
    where
        F: Fn(Tensor<4>) -> Tensor<4>,
        G: Fn(Tensor<4>) -> Tensor<4>,
    {
        let device = Device::flex().autodiff();
        let x = Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device).require_grad();
        let run = |f: &dyn Fn(Tensor<4>) -> Tensor<4>| {
            let out = f(x.clone());
            let probe = Tensor::<4>::ones(out.shape(), &device).mul_scalar(0.5)
                + out.clone().detach().mul_scalar(0.25);
            let grads = (out.clone() * probe).sum().backward();
            let dx = x.grad(&grads).expect("input gradient");
            (out.detach(), Tensor::<4>::from_inner(dx), grads)
        };
        let (out_k, dx_k, _) = run(&layer);
        let (out_b, dx_b, _) = run(&reference);
        assert_close(out_k, out_b, &format!("{what} output"));
        assert_close(dx_k, dx_b, &format!("{what} input gradient"));
    }

    #[test]
    fn kernel_layers_match_burns_forward_and_input_gradient() {
        let device = Device::flex().autodiff();
        assert!(uses_kernels(&device) && uses_kernels(&Device::flex()));
        let down = Conv2dConfig::new([2, 3], [4, 4])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let up = ConvTranspose2dConfig::new([3, 2], [4, 4])
            .with_stride([2, 2])
            .with_padding([1, 1])
            .init(&device);
        for batch in [1, 3] {
            for act in [
                Activation::LeakyRelu,
                Activation::Sigmoid,
                Activation::Identity,
            ] {
                // Even sides, and odd ones (the general column-to-image path).
                for [h, w] in [[10, 14], [9, 11]] {
                    check(
                        [batch, 2, h, w],
                        |x| conv_down(&down, x, act),
                        |x| apply(down.forward(x), act),
                        &format!("down {act:?} batch {batch} {h}x{w}"),
                    );
                }
                check(
                    [batch, 3, 5, 7],
                    |x| conv_up(&up, x, act),
                    |x| apply(up.forward(x), act),
                    &format!("up {act:?} batch {batch}"),
                );
            }
        }
    }

    #[test]
    fn kernel_layers_match_burns_weight_and_bias_gradients() {
        // Small images (one band of rows) and large ones (several bands in every pass).
        check_gradients([3, 3, 12, 8], 4);
        check_gradients([2, 16, 128, 96], 4);
    }

    fn check_gradients(dims: [usize; 4], narrow: usize) {
        let device = Device::flex().autodiff();
        let wide = dims[1];
        let down = Conv2dConfig::new([wide, narrow], [4, 4])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let up = ConvTranspose2dConfig::new([narrow, wide], [4, 4])
            .with_stride([2, 2])
            .with_padding([1, 1])
            .init(&device);
        let x = Tensor::<4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
        let grads_of = |use_kernels: bool| {
            let act = Activation::LeakyRelu;
            let y = if use_kernels {
                conv_up(&up, conv_down(&down, x.clone(), act), Activation::Sigmoid)
            } else {
                let h = apply(down.forward(x.clone()), act);
                apply(up.forward(h), Activation::Sigmoid)
            };
            let grads = (y - x.clone()).powi_scalar(2).mean().backward();
            let g4 = |p: &burn::module::Param<Tensor<4>>| {
                Tensor::<4>::from_inner(p.val().grad(&grads).expect("weight gradient"))
            };
            let g1 = |p: &Option<burn::module::Param<Tensor<1>>>| {
                let b = p
                    .as_ref()
                    .expect("bias")
                    .val()
                    .grad(&grads)
                    .expect("bias gradient");
                Tensor::<1>::from_inner(b).reshape([1, 1, 1, -1])
            };
            [
                g4(&down.weight),
                g1(&down.bias),
                g4(&up.weight),
                g1(&up.bias),
            ]
        };
        let names = ["down weight", "down bias", "up weight", "up bias"];
        for ((k, b), name) in grads_of(true).into_iter().zip(grads_of(false)).zip(names) {
            assert_close(k, b, name);
        }
    }
}
