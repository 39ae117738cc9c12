"""The learner's float32 arithmetic: cuDNN's TF32 off on the GPU unless asked for, and float32-precise batch
norms by default (PyTorch's channels-last CPU kernel computes less precise float32 statistics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metagrad.models.norm as norm
from metagrad import MAML
from metagrad.build import build_learner
from metagrad.config import load_config
from metagrad.models import Conv4
from metagrad.models.norm import BatchNorm2d
from metagrad.tasks import TaskBatch
from metagrad.transforms import in_inner_pass

_TF32_PROBE = """
import sys, torch
from metagrad.numerics import tf32
setting = sys.argv[1]
if setting == "matmul-high":
    torch.set_float32_matmul_precision("high")
elif setting == "new-api":
    torch.backends.fp32_precision = "tf32"
cudnn = torch.backends.cudnn


def state():
    return (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, torch.backends.fp32_precision)


def conv_tf32():
    if torch.backends.fp32_precision == "none":
        return cudnn.allow_tf32
    return cudnn.conv.fp32_precision == "tf32"


before, matmul = state(), torch.backends.cuda.matmul.fp32_precision
for enabled in (False, True):
    with tf32(enabled):
        assert conv_tf32() is enabled, (setting, enabled)
        assert torch.compile(lambda x: x * 2, backend="eager")(torch.ones(2)).sum().item() == 4.0
    assert state() == before, (setting, state(), before)
try:
    with tf32(not conv_tf32()):
        raise KeyError("boom")
except KeyError:
    pass
assert state() == before and torch.backends.cuda.matmul.fp32_precision == matmul
if setting == "new-api":  # convolutions still inherit the process's choice after the blocks
    torch.backends.fp32_precision = "ieee"
    assert cudnn.conv.fp32_precision == "ieee", cudnn.conv.fp32_precision
print("ok")
"""


def test_tf32_context_switches_cudnn_and_restores_it_whatever_api_the_process_uses() -> None:
    """In a fresh process each, run side by side (each one's start is mostly importing torch): PyTorch 2.13 raises
    when code mixes its legacy and new TF32 settings."""
    import subprocess
    import sys

    settings = ("default", "matmul-high", "new-api")
    procs = {
        s: subprocess.Popen([sys.executable, "-c", _TF32_PROBE, s], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
        for s in settings
    }
    failures = {}
    for setting, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        if proc.returncode != 0 or not out.strip().endswith("ok"):
            failures[setting] = err[-2000:]
    assert not failures, failures


def test_config_keys_reach_the_learner() -> None:
    cfg = load_config(None, ["train.tf32=true", "train.precise_norms=false"])
    learner = build_learner(cfg)
    assert learner.tf32 is True and learner.precise_norms is False
    default = build_learner(load_config(None, []))
    assert default.tf32 is False and default.precise_norms is True


def _episodes(tasks: int = 2, size: int = 16) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    # Images on a bright background (as Omniglot's): large per-channel means after the first convolution.
    sx = 1 - 0.3 * torch.rand(tasks, 4, 1, size, size, generator=g)
    qx = 1 - 0.3 * torch.rand(tasks, 6, 1, size, size, generator=g)
    sy, qy = torch.tensor([[0, 0, 1, 1]] * tasks), torch.tensor([[0, 0, 0, 1, 1, 1]] * tasks)
    return TaskBatch(sx, sy, qx, qy)


def _learner(vectorize: bool, first_order: bool = False) -> MAML:
    torch.manual_seed(0)
    model = Conv4(ways=2, hidden=8, image_size=16)  # 8 filters: oneDNN convolutions after the first
    return MAML(model, inner_lr=0.4, inner_steps=1, loss="cross_entropy", vectorize=vectorize, first_order=first_order)


def test_precise_norms_take_the_precise_function_on_channels_last_and_keep_the_layout(monkeypatch) -> None:
    calls = {"precise": 0, "fused": []}
    fused, precise = F.batch_norm, norm._PreciseBatchNorm.apply

    def recording_fused(x, *args, **kwargs):
        if kwargs.get("training", args[4] if len(args) > 4 else False):  # PyTorch's own statistics
            calls["fused"].append("nchw" if x.is_contiguous() else "channels_last")
        return fused(x, *args, **kwargs)

    def recording_precise(*args):
        calls["precise"] += 1
        return precise(*args)

    monkeypatch.setattr(norm.F, "batch_norm", recording_fused)
    monkeypatch.setattr(norm._PreciseBatchNorm, "apply", recording_precise)
    learner, batch = _learner(False), _episodes()
    learner.meta_gradient(batch)
    # Conv-4's query passes are channels-last (for its pooling): their batch norms took the precise function,
    # whose normalisation is PyTorch's eval-mode kernel on the same layout, with no copy. Its inner-loop
    # (support) passes run NCHW on the CPU, where PyTorch's training-mode kernel is precise.
    assert calls["precise"] > 0 and set(calls["fused"]) == {"nchw"}
    calls["precise"], calls["fused"] = 0, []
    learner.precise_norms = False
    learner.meta_gradient(batch)
    assert calls["precise"] == 0 and set(calls["fused"]) == {"channels_last", "nchw"}  # PyTorch's own kernel
    assert norm._MODE.precise is False, "the choice must not leak out of the learner's calls"
    assert not in_inner_pass(), "nor the inner pass"
    for layer, layout, shape in (
        (BatchNorm2d(3), torch.channels_last, (2, 3, 4, 4)),
        (norm.BatchNorm3d(3, affine=False, track_running_stats=False), torch.channels_last_3d, (2, 3, 4, 4, 4)),
    ):
        x = torch.randn(*shape).contiguous(memory_format=layout)
        calls["precise"] = 0
        with norm.statistics("batch", False, precise=True):
            out = layer(x)
        assert calls["precise"] == 1 and out.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out, fused(x, None, None, layer.weight, layer.bias, training=True))
    calls["precise"] = 0
    with norm.statistics("batch", False, precise=True):
        BatchNorm2d(3)(torch.randn(2, 3, 4, 4))  # NCHW: PyTorch's kernel is precise there
        # Half precision: PyTorch's kernel, which accumulates in float32 and accepts float32 parameters.
        BatchNorm2d(3)(torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last).bfloat16())
    assert calls["precise"] == 0


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dims", [4, 5])
def test_precise_batch_norm_function_is_exact_first_and_second_order(affine: bool, dims: int) -> None:
    """float64 central differences (gradcheck, gradgradcheck) of the precise function's value, gradient and the
    gradient's derivative, on channels-last input: its backward is PyTorch's, given the precise statistics."""
    g = torch.Generator().manual_seed(0)
    layout = torch.channels_last if dims == 4 else torch.channels_last_3d
    shape = (3, 2, 3, 4) if dims == 4 else (3, 2, 2, 3, 2)
    x = (1.5 + torch.randn(*shape, generator=g, dtype=torch.float64)).contiguous(memory_format=layout)
    x.requires_grad_(True)
    w = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).requires_grad_(affine)
    b = torch.randn(2, generator=g, dtype=torch.float64).requires_grad_(affine)
    inputs = (x, w, b) if affine else (x,)

    def bn(x, w=None, b=None):
        return norm._PreciseBatchNorm.apply(x, w, b, 1e-5)[0]

    torch.testing.assert_close(bn(*inputs), F.batch_norm(*(x, None, None, *inputs[1:]), training=True))
    assert torch.autograd.gradcheck(bn, inputs)
    assert torch.autograd.gradgradcheck(bn, inputs)
    # An incoming gradient in another layout (NCHW) than the output's: the same first and second derivatives as
    # PyTorch's kernel (exact to second order where no vmap is active).
    c = torch.randn(*shape, generator=g, dtype=torch.float64)
    derivatives = []
    for f in (bn, lambda *t: F.batch_norm(*(t[0], None, None, *t[1:]), training=True)):
        first = torch.autograd.grad((f(*inputs) * c).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum((d * d).sum() for d in first), inputs, materialize_grads=True)
        derivatives.append(first + second)
    for got, want in zip(*derivatives, strict=True):
        torch.testing.assert_close(got, want)


def test_precise_batch_norm_on_channels_last_is_float32_precise_and_pytorchs_kernel_is_not() -> None:
    """58,800 values a channel (a Conv-4's first layer on 75 Omniglot images), channels-last: within float32
    rounding of float64 when precise. The second half is a canary: the day PyTorch's channels-last CPU kernel
    accumulates precisely it fails, and ``precise_norms`` can go."""
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([0.3, -0.7, 1.3, 2.9], dtype=torch.float64)[:, None, None]
    x = means + 0.2 * torch.randn(75, 4, 28, 28, generator=g, dtype=torch.float64)
    ref = F.batch_norm(x, None, None, training=True)
    layer = BatchNorm2d(4, affine=False, track_running_stats=False)
    errors, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel's error shrinks with more threads (5x at 16): measure it on one
    try:
        for precise in (True, False):
            with norm.statistics("batch", False, precise=precise):
                out = layer(x.float().contiguous(memory_format=torch.channels_last))
            assert out.is_contiguous(memory_format=torch.channels_last)
            errors[precise] = float((out.double() - ref).norm() / ref.norm())
    finally:
        torch.set_num_threads(threads)
    assert errors[True] <= 1e-6
    # 130 times further off on PyTorch 2.13 at one thread (3.0e-5 against 2.3e-7)
    assert errors[False] > 5 * errors[True], f"PyTorch's channels-last CPU batch norm is precise now: {errors}"


@pytest.mark.parametrize("first_order", [False, True])
def test_float32_loop_and_vmap_are_close_to_float64(first_order: bool) -> None:
    """Conv-4's meta-gradient in float32, loop and vmap, against float64 (second order and first order). On
    these small images PyTorch's channels-last kernel is precise enough too: the test above tells them apart."""
    batch = _episodes()
    ref = _learner(False, first_order).double().meta_gradient(batch.to("cpu", torch.float64))[0]
    keys = [k for k in ref if not (k.startswith("convs.") and k.endswith(".bias"))]  # exactly 0 (batch norm)
    flat_ref = torch.cat([ref[k].flatten() for k in keys])
    for vectorize in (False, True):
        got = _learner(vectorize, first_order).meta_gradient(batch)[0]
        flat = torch.cat([got[k].double().flatten() for k in keys])
        assert (flat - flat_ref).norm() <= 1e-4 * flat_ref.norm()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_learner_calls_run_without_tf32_on_cuda_unless_asked() -> None:
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.allow_tf32)
            return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), Probe(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 1, 16, 16))  # (builds the lazy layer, outside the learner: PyTorch's own settings)
    seen.clear()
    learner = MAML(model, inner_lr=0.1, inner_steps=1, loss="cross_entropy").cuda()
    batch = _episodes().to("cuda")
    before = torch.backends.cudnn.allow_tf32
    learner.meta_gradient(batch)
    learner.adapt(batch.support_x[0], batch.support_y[0])
    assert seen and not any(seen)
    seen.clear()
    learner.tf32 = True
    learner.meta_gradient(batch)
    assert seen and all(seen)
    assert torch.backends.cudnn.allow_tf32 == before


def test_inner_pass_hint_is_per_thread_and_restored_after_an_error() -> None:
    """The layout hint Conv-4 reads (metagrad.transforms.inner_pass): another thread's passes never see it, and
    an exception inside the inner step leaves it off."""
    import threading

    from metagrad.transforms import inner_pass

    seen = []
    with inner_pass():
        worker = threading.Thread(target=lambda: seen.append(in_inner_pass()))
        worker.start()
        worker.join()
        seen.append(in_inner_pass())
    assert seen == [False, True] and not in_inner_pass()
    learner = _learner(False)
    calls = []

    def failing(*args, **kwargs):
        calls.append(in_inner_pass())
        raise RuntimeError("boom")

    learner.inner_objective = failing
    with pytest.raises(RuntimeError, match="boom"):
        learner.meta_gradient(_episodes())
    # (The task loop's failure in torch.autograd is rerun once under torch.func, for an explanation.)
    assert calls and all(calls) and not in_inner_pass()
