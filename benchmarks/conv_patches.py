"""One 3x3 convolution of Conv-4, differentiated as MAML's second order does (forward, the input's gradient with
``create_graph``, then the backward pass through that gradient), timed for each way ``Conv3x3`` can compute it:

* ``convolution``: the library's convolution (oneDNN on the CPU, cuDNN on a GPU), ``Conv3x3.products = False``;
* ``blocks``: one matrix product over 3x3 patches gathered in ``(kh, kw, c)`` blocks, whose backward pass is
  written out (``Conv3x3.patches = "blocks"``, the default);
* ``blocks-autograd``: the blocks with their backward pass left to autograd (what the written-out one is worth);
* ``shifts``: the same product over patches interleaved in the weight's order, differentiated by autograd.

    python benchmarks/conv_patches.py                         # the CPU, one thread
    python benchmarks/conv_patches.py --device cuda --images 1920

Each shape is ``--images`` images of ``--channels`` channels at each ``--sizes``; the ways run in turn,
``--rounds`` times, and each row is the median of its rounds (milliseconds per call). One convolution outside
``vmap``: under ``vmap`` (per-task weights) the convolution becomes a grouped one, which this does not measure
(``benchmarks/conv4.py`` does, on the whole meta-iteration).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import AutogradPatches

from metagrad.models import conv4
from metagrad.models.conv4 import Conv3x3

WAYS = ("convolution", "blocks", "blocks-autograd", "shifts")


def _call(conv: Conv3x3, x: torch.Tensor) -> None:
    out = conv(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    grad.sum().backward()


def time_way(way: str, channels: int, images: int, size: int, device: torch.device, seconds: float) -> float:
    """Milliseconds per call of ``way`` (see the module docstring) on one shape."""
    torch.manual_seed(0)
    conv = Conv3x3(channels, 64).to(device)
    conv.products = way != "convolution"
    if way != "convolution":
        conv.patches = way.removesuffix("-autograd")
    x = torch.randn(images, channels, size, size, device=device)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    written_out = conv4._Patches
    if way == "blocks-autograd":
        conv4._Patches = AutogradPatches
    try:
        _call(conv, x)
        sync()
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            _call(conv, x)
            calls += 1
        sync()
    finally:
        conv4._Patches = written_out
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--images", type=int, default=80, help="images per call (5-way 1-shot, 15 queries: 80)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[14, 7])
    ap.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=1.0, help="timed seconds per way and round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"one Conv3x3({args.channels}, 64), forward + input gradient + backward through it, {args.images} images, "
          f"{device}, {args.threads} thread(s); ms per call, median of {args.rounds} rounds")  # fmt: skip
    for size in args.sizes:
        times: dict[str, list[float]] = {way: [] for way in args.ways}
        for _ in range(args.rounds):
            for way in args.ways:
                times[way].append(time_way(way, args.channels, args.images, size, device, args.seconds))
        row = "  ".join(f"{way} {statistics.median(t):8.2f}" for way, t in times.items())
        print(f"  {size:>3}x{size:<3} {row}")


if __name__ == "__main__":
    main()
