#!/usr/bin/env python3
"""PyTorch (CPU) twin of Inkspect's convolutional autoencoder, for speed comparisons.

It builds exactly the network of src/engine/model/autoencoder.rs with the widths of
`autoencoder_spec_for` (src/engine/model/mod.rs): four Conv2d(k4, s2, p1) levels of widths
w, 2w, 4w, 4w (w = round(4 + 0.6 * complexity)), a 1x1 bottleneck of max(4, w // 2) channels
there and back, four mirrored ConvTranspose2d(k4, s2, p1) levels, leaky ReLU (0.2) after every
layer but the last, sigmoid at the end. It trains it the way src/engine/training.rs does
(MSE loss, Adam with burn's defaults, lr 2e-3) on random images and times inspection (forward
plus the per-pixel squared error averaged over channels, as in src/engine/inference.rs).

Install: `pip install torch` (the CPU wheel is enough). Run: `python3 benches/pytorch_autoencoder.py`.
Prints one line of JSON on stdout; everything else goes to stderr.
"""
import argparse
import json
import math
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

SLOPE = 0.2


def spec_for(complexity, channels):
    """Mirror of `autoencoder_spec_for`: (widths, latent channels)."""
    c = min(max(complexity, 1), 100)
    w = math.floor(4 + 0.6 * c + 0.5)  # Rust rounds half away from zero
    return [w, 2 * w, 4 * w, 4 * w], max(4, w // 2)


class ConvAutoencoder(nn.Module):
    def __init__(self, channels, widths, latent):
        super().__init__()
        ins = [channels] + widths[:-1]
        self.encoder = nn.ModuleList(nn.Conv2d(i, o, 4, 2, 1) for i, o in zip(ins, widths))
        deepest = widths[-1]
        self.to_latent = nn.Conv2d(deepest, latent, 1)
        self.from_latent = nn.Conv2d(latent, deepest, 1)
        outs = widths[::-1][1:] + [channels]
        dec_ins = [deepest] + outs[:-1]
        self.decoder = nn.ModuleList(nn.ConvTranspose2d(i, o, 4, 2, 1) for i, o in zip(dec_ins, outs))

    def forward(self, x):
        for conv in self.encoder:
            x = F.leaky_relu(conv(x), SLOPE)
        x = F.leaky_relu(self.to_latent(x), SLOPE)
        x = F.leaky_relu(self.from_latent(x), SLOPE)
        for i, deconv in enumerate(self.decoder):
            x = deconv(x)
            if i < len(self.decoder) - 1:
                x = F.leaky_relu(x, SLOPE)
        return torch.sigmoid(x)


def rust_parameter_count(channels, widths, latent):
    """Mirror of `AutoencoderSpec::parameter_count`."""
    conv = lambda i, o, k: i * o * k * k + o
    n, c = 0, channels
    for w in widths:
        n += 2 * conv(c, w, 4) - w + c  # encoder conv + its mirrored decoder conv
        c = w
    return n + 2 * conv(c, latent, 1) - latent + c


def forward_macs(size, channels, widths, latent):
    """Multiply-accumulates of the convolutions (biases excluded) for one image."""
    macs, c, side = 0, channels, size
    for w in widths:
        side //= 2
        macs += 2 * c * w * 16 * side * side  # encoder conv and its mirrored transposed conv
        c = w
    return macs + 2 * c * latent * side * side  # the two 1x1 bottleneck convs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--complexity", type=int, default=20)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-images", type=int, default=64, help="random images per epoch")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="timed training steps")
    p.add_argument("--infer-images", type=int, default=32)
    p.add_argument("--infer-passes", type=int, default=5,
                   help="passes over the inspection images; the median pass is reported")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.size % 16:
        p.error("--size must be a multiple of 16")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    widths, latent = spec_for(a.complexity, a.channels)
    model = ConvAutoencoder(a.channels, widths, latent)
    params = sum(t.numel() for t in model.parameters())
    expected = rust_parameter_count(a.channels, widths, latent)
    if params != expected:
        sys.exit(f"parameter count {params} != Inkspect's {expected}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, widths {widths}, "
          f"latent {latent}, {params} parameters", file=sys.stderr)

    # Training: burn's AdamConfig defaults are betas (0.9, 0.999), epsilon 1e-5.
    data = torch.rand(a.train_images, a.channels, a.size, a.size)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.999), eps=1e-5)
    model.train()
    batches = [data[i:i + a.batch] for i in range(0, a.train_images, a.batch)]
    done, t0 = 0, None
    for step in range(a.warmup_steps + a.steps):
        if step == a.warmup_steps:
            t0, done = time.perf_counter(), 0
        x = batches[step % len(batches)]
        loss = (model(x) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # Inkspect reads the loss back every step too
        done += x.shape[0]
    train_s = time.perf_counter() - t0
    train_ips = done / train_s

    # Inspection: forward plus the squared error map averaged over channels.
    model.eval()
    images = torch.rand(a.infer_images, a.channels, a.size, a.size)
    with torch.inference_mode():
        x = images[:a.batch]
        (model(x) - x).square().mean(dim=1, keepdim=True).sum().item()  # warm-up
        passes = []
        for _ in range(a.infer_passes):
            t0 = time.perf_counter()
            for i in range(0, a.infer_images, a.batch):
                x = images[i:i + a.batch]
                (model(x) - x).square().mean(dim=1, keepdim=True).sum().item()
            passes.append((time.perf_counter() - t0) * 1000 / a.infer_images)
        infer_ms = sorted(passes)[len(passes) // 2]  # the median pass, as Inkspect's bench

    fwd_gflop = 2 * forward_macs(a.size, a.channels, widths, latent) / 1e9
    print(json.dumps({
        "framework": "pytorch", "torch_version": torch.__version__,
        "threads": torch.get_num_threads(), "size": a.size, "complexity": a.complexity,
        "channels": a.channels, "batch": a.batch, "parameters": params,
        "train_images_per_sec": round(train_ips, 3),
        "infer_ms_per_image": round(infer_ms, 3),
        "forward_gflop_per_image": round(fwd_gflop, 4),
        "train_gflops_per_sec": round(3 * fwd_gflop * train_ips, 3),
    }))


if __name__ == "__main__":
    main()
