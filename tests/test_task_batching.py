"""How tasks are batched (vmap, a loop, chunks of k) and what the meta-step computes besides the gradient.

Every path must give the same meta-gradient; the fast Conv-4 forward (channels-last, ReLU after pooling, the
first convolution as a matrix product) must be the textbook network, value and derivatives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from metagrad.algorithms.maml import MAML
from metagrad.errors import ConfigError, ModelError
from metagrad.models.conv4 import Conv3x3, Conv4
from metagrad.tasks.base import TaskBatch


def _mlp_batch(tasks: int = 5) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(tasks, 4, 1, generator=g), torch.randn(tasks, 6, 1, generator=g)
    return TaskBatch(sx, torch.sin(3 * sx), qx, torch.sin(3 * qx))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))


@pytest.mark.parametrize("vectorize", [False, 1, 2, 3, 5, 64])
def test_every_chunk_size_gives_the_all_task_vmap_meta_gradient(vectorize):
    batch = _mlp_batch(5)
    ref = MAML(_mlp(), inner_lr=0.1, inner_steps=2, vectorize=True).double()
    other = MAML(_mlp(), inner_lr=0.1, inner_steps=2, vectorize=vectorize).double()
    assert other.vmapped == (vectorize not in (False, 1))
    b = batch.to("cpu", torch.float64)
    g_ref, _, m_ref = ref.meta_gradient(b)
    g, _, m = other.meta_gradient(b)
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-10, atol=1e-12)
    for k in m_ref:
        torch.testing.assert_close(m[k], m_ref[k], rtol=1e-10, atol=1e-12)


def test_auto_loops_over_tasks_for_convolutional_networks_on_the_cpu_only():
    assert MAML(_mlp(), inner_steps=1).vmapped
    conv = MAML(Conv4(hidden=4), inner_steps=1, loss="cross_entropy")
    assert not conv.vmapped
    assert MAML(Conv4(hidden=4), inner_steps=1, loss="cross_entropy", vectorize=True).vmapped
    conv.to("meta")  # any device but the CPU (a GPU): one task at a time would be many tiny kernel launches
    assert conv.vmapped


@pytest.mark.parametrize("bad", [0, -2, "fast", 1.5, None])
def test_a_bad_vectorize_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="vectorize"):
        MAML(_mlp(), inner_steps=1, vectorize=bad)


def test_diagnostics_off_drops_pre_loss_and_changes_nothing_else():
    batch = _mlp_batch(4)
    on = MAML(_mlp(), inner_lr=0.1, inner_steps=1)
    off = MAML(_mlp(), inner_lr=0.1, inner_steps=1)
    off.diagnostics = False
    g_on, _, m_on = on.meta_gradient(batch)
    g_off, _, m_off = off.meta_gradient(batch)
    assert "pre_loss" in m_on and "pre_loss" not in m_off
    for k in g_on:
        torch.testing.assert_close(g_off[k], g_on[k], rtol=0, atol=0)
    assert torch.equal(m_on["loss"], m_off["loss"])


class _Textbook(nn.Module):
    """Conv-4 as the papers write it: NCHW, conv -> batch norm -> ReLU -> max-pool, PyTorch's own layers."""

    def __init__(self, net: Conv4) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        strided = self.net.downsample == "stride"  # (the MAML code's Omniglot network: no pooling, a mean)
        for conv, norm in zip(self.net.convs, self.net.norms, strict=True):
            x = F.conv2d(x, conv.weight, conv.bias, stride=2 if strided else 1, padding=1)
            x = F.batch_norm(x, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
            x = F.relu(x) if strided else F.max_pool2d(F.relu(x), 2)
        return self.net.head(x.mean((2, 3)) if strided else x.flatten(1))


@pytest.mark.parametrize(
    ("in_channels", "products", "patches", "downsample"),
    [(1, None, "blocks", "pool"), (3, None, "blocks", "pool"), (8, None, "blocks", "pool"),
     (8, True, "blocks", "pool"), (3, True, "shifts", "pool"), (8, True, "shifts", "pool"),
     (1, None, "blocks", "stride"), (8, None, "blocks", "stride"), (3, True, "blocks", "stride"),
     (3, True, "shifts", "stride")],
)  # fmt: skip
def test_fast_conv4_forward_is_the_textbook_network_to_second_order(in_channels, products, patches, downsample):
    """Value, gradient and a Hessian-vector product of a loss through Conv-4 equal the textbook layers' (float64),
    for the matrix-product first convolution (1 and 3 channels) and the plain one (8 channels), and with every
    convolution a matrix product (``Conv3x3.products = True``) over patches gathered each way; pooling or, as
    the MAML code's Omniglot network, strided convolutions (at 28x28 and 27x27, an odd side too: a 2x2 last map,
    whose mean the head reads)."""
    torch.manual_seed(0)
    side = 16 if downsample == "pool" else 27 if in_channels == 3 else 28
    model = Conv4(in_channels, 3, hidden=6, image_size=side, downsample=downsample).double()
    for conv in model.convs:
        conv.products, conv.patches = products, patches
    x = torch.randn(5, in_channels, side, side, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    params = {k: v.detach() for k, v in model.named_parameters()}
    v = {k: torch.randn_like(p) for k, p in params.items()}

    textbook = _Textbook(model)

    def loss_fast(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def loss_ref(p):
        return F.cross_entropy(functional_call(textbook, {f"net.{k}": t for k, t in p.items()}, (x,)), y)

    def hvp(loss):
        return grad(lambda p: sum((grad(loss)(p)[k] * v[k]).sum() for k in p))(params)

    torch.testing.assert_close(loss_fast(params), loss_ref(params), rtol=1e-12, atol=1e-12)
    for a, b in ((grad(loss_fast)(params), grad(loss_ref)(params)), (hvp(loss_fast), hvp(loss_ref))):
        for k in params:
            torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_conv4_as_matrix_products_under_vmap_is_the_loop_to_second_order(downsample):
    """Every convolution a product (per-task weights under vmap: one batched product over the tasks), its patches
    gathered each way: the second-order meta-gradient equals the task loop's and the plain convolutions'
    (float64), for the pooling and the strided network."""
    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=6, image_size=16, downsample=downsample).double()
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(torch.randn(3, 3, 1, 16, 16, generator=g, dtype=torch.float64), torch.tensor([[0, 1, 2]] * 3),
                      torch.randn(3, 6, 1, 16, 16, generator=g, dtype=torch.float64),
                      torch.tensor([[0, 0, 1, 1, 2, 2]] * 3))  # fmt: skip
    grads = []
    for products, patches, vectorize in ((True, "blocks", True), (True, "blocks", False), (False, "blocks", True),
                                         (True, "shifts", True), (True, "shifts", False)):  # fmt: skip
        for conv in model.convs:
            conv.products, conv.patches = products, patches
        learner = MAML(model, inner_lr=0.1, inner_steps=2, loss="cross_entropy", vectorize=vectorize)
        grads.append(learner.meta_gradient(batch)[0])
    for other in grads[1:]:
        for k in grads[0]:
            torch.testing.assert_close(grads[0][k], other[k], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("stride", [1, 2])
def test_the_patches_gather_and_its_written_out_adjoint_are_exact_to_third_order(stride):
    """``_Patches``, the gather and its scatter (the default patches' backward pass): each is the other's adjoint,
    so gradcheck and gradgradcheck hold (float64), under vmap the derivatives to third order are the loop's, and
    forward mode gives the same map; at stride 1 and at stride 2 (the strided network), an odd padded side
    included."""
    from torch.autograd import gradcheck, gradgradcheck
    from torch.func import jacrev, jvp, vmap

    from metagrad.models.conv4 import _gather, _Patches, _scatter

    size = (5, 6)  # the padded sides: [2, 5, 6, 3] is a 3x4 image's padding (a 4x4 or 3x4 output at stride 2...)

    def gather(x):
        return _Patches.apply(x, stride, 0, 0)

    def scatter(x):
        return _Patches.apply(x, stride, *size)

    def plain_scatter(x):
        return _scatter(x, stride, size)

    g = torch.Generator().manual_seed(0)
    padded = torch.randn(2, *size, 3, generator=g, dtype=torch.float64, requires_grad=True)
    out = _gather(padded.detach(), stride).shape
    assert out == ((2, 3, 4, 9, 3) if stride == 1 else (2, 2, 2, 9, 3))
    patches = torch.randn(out, generator=g, dtype=torch.float64, requires_grad=True)
    for f, x in ((gather, padded), (scatter, patches)):
        assert gradcheck(f, (x,)) and gradgradcheck(f, (x,))
    # The adjoint identity <gather(a), b> = <a, scatter(b)>, and the values are the plain slices'.
    a, b = padded.detach(), patches.detach()
    torch.testing.assert_close((_gather(a, stride) * b).sum(), (a * plain_scatter(b)).sum(), rtol=1e-13, atol=0)
    # view (1, 2) of patch (1, 1) is pixel (1 + stride, 2 + stride)
    torch.testing.assert_close(_gather(a, stride)[:, 1, 1, 5], a[:, 1 + stride, 2 + stride])
    # Third order through the pair under vmap, against the loop: d/dx of a Hessian-vector product.
    xs = torch.randn(3, 2, *size, 3, generator=g, dtype=torch.float64)
    u = torch.randn(2, *size, 3, generator=g, dtype=torch.float64)

    def loss(x):
        return (gather(x).sin() ** 2).sum()

    def third(x):
        hvp = jacrev(lambda y: (jacrev(loss)(y) * u).sum())
        return jacrev(lambda y: (hvp(y) * u).sum())(x)

    def plain(x):
        return (_gather(x, stride).sin() ** 2).sum()

    def third_plain(x):
        hvp = jacrev(lambda y: (jacrev(plain)(y) * u).sum())
        return jacrev(lambda y: (hvp(y) * u).sum())(x)

    batched = vmap(third)(xs)
    for i in range(3):
        torch.testing.assert_close(batched[i], third_plain(xs[i]), rtol=1e-12, atol=1e-12)
    # Forward mode, and forward over reverse (a Hessian-vector product as jvp of grad), batched.
    for f, plain_f, x in ((gather, lambda t: _gather(t, stride), a), (scatter, plain_scatter, b)):
        t = torch.randn(x.shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(jvp(f, (x,), (t,))[1], plain_f(t), rtol=0, atol=0)
    hvp = vmap(lambda x, t: jvp(jacrev(loss), (x,), (t,))[1])(xs, xs.flip(0))
    hvp_plain = torch.stack([jvp(jacrev(plain), (x,), (t,))[1] for x, t in zip(xs, xs.flip(0), strict=True)])
    torch.testing.assert_close(hvp, hvp_plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_forward_mode_through_the_product_convolution_with_live_parameters(stride):
    """Forward over reverse through a product convolution whose weight is a live ``nn.Parameter`` (the scatter's
    input then requires grad: views of its output taken before an in-place addition are stale to autograd), and
    reverse over that: each equals the same through ``F.conv2d`` (float64)."""
    from torch.func import jvp

    from metagrad.models.conv4 import _scatter

    torch.manual_seed(0)
    conv = Conv3x3(2, 3, stride=stride).double()
    conv.products = True
    x, t, u = (torch.randn(2, 2, 7, 6, dtype=torch.float64) for _ in range(3))

    def fast(y):
        return (conv(y).sin() ** 2).sum()

    def ref(y):
        return (F.conv2d(y, conv.weight, conv.bias, stride=stride, padding=1).sin() ** 2).sum()

    def hvp(f, y):  # forward over reverse
        return jvp(grad(f), (y,), (t,))[1]

    def third(f):  # reverse over that
        return grad(lambda y: (hvp(f, y) * u).sum())(x)

    torch.testing.assert_close(hvp(fast, x), hvp(ref, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(third(fast), third(ref), rtol=1e-12, atol=1e-12)
    patches = torch.randn(1, 2, 2, 9, 1, dtype=torch.float64, requires_grad=True)
    _scatter(patches, stride, (5, 5)).sum().backward()  # (refused when the views were taken up front)
    assert torch.equal(patches.grad, torch.ones_like(patches))


def test_conv4_as_matrix_products_compiles_under_vmap():
    """A compiled step (train.compile, also inside a GPU's CUDA graph) traces the products' patches: Dynamo cannot
    vmap the blocks' custom autograd function, so compiled they are left to autograd, with the same numbers.
    (Dynamo's eager backend: the tracing is what failed; Inductor's kernels add minutes here.)"""
    import copy

    torch.manual_seed(0)
    model = Conv4(1, 3, hidden=4, image_size=16).double()
    for conv in model.convs:
        conv.products = True
    g = torch.Generator().manual_seed(1)
    batch = TaskBatch(torch.randn(3, 3, 1, 16, 16, generator=g, dtype=torch.float64), torch.tensor([[0, 1, 2]] * 3),
                      torch.randn(3, 6, 1, 16, 16, generator=g, dtype=torch.float64),
                      torch.tensor([[0, 0, 1, 1, 2, 2]] * 3))  # fmt: skip
    eager = MAML(model, inner_lr=0.1, inner_steps=1, loss="cross_entropy", vectorize=True)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="eager")
    expected, got = eager.meta_gradient(batch)[0], compiled.meta_gradient(batch)[0]
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-12, atol=1e-14, msg=k)


def test_the_model_products_option_sets_every_convolution():
    """``model.products`` (config and CLI): "auto" leaves each convolution's own choice, true or false sets all
    four; anything else is one ConfigError naming the key."""
    from types import SimpleNamespace

    from metagrad.config import load_config
    from metagrad.models.conv4 import Conv4Config

    spec = SimpleNamespace(input_shape=(1, 16, 16), outputs=3, inner_steps=1)
    for value, expected in (("auto", None), (True, True), (False, False)):
        model = Conv4.from_config(Conv4Config(channels=4, products=value), spec)
        assert [conv.products for conv in model.convs] == [expected] * 4
    with pytest.raises(ConfigError, match='model.products must be "auto", true or false'):
        Conv4.from_config(Conv4Config(channels=4, products="always"), spec)
    base = ["task.name=omniglot", "model.name=conv4"]
    assert load_config(None, [*base, "model.products=false"]).model.products is False
    with pytest.raises(ConfigError, match="model.products must be"):
        load_config(None, [*base, "model.products=3"])


def test_the_model_downsample_option_builds_the_strided_network():
    """``model.downsample = "stride"`` (config and CLI) is the MAML code's Omniglot network: four stride-2
    convolutions and no pooling, the head on the mean of the last map; a bad value is one ConfigError."""
    from types import SimpleNamespace

    from metagrad.config import load_config
    from metagrad.models.conv4 import Conv4Config

    spec = SimpleNamespace(input_shape=(1, 28, 28), outputs=5, inner_steps=1)
    strided = Conv4.from_config(Conv4Config(channels=4, downsample="stride"), spec)
    assert [conv.stride for conv in strided.convs] == [(2, 2)] * 4 and strided.head.in_features == 4
    assert strided(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    pooled = Conv4.from_config(Conv4Config(channels=4), spec)
    assert [conv.stride for conv in pooled.convs] == [(1, 1)] * 4
    with pytest.raises(ConfigError, match="model.downsample must be one of 'pool', 'stride'"):
        Conv4.from_config(Conv4Config(channels=4, downsample="strided"), spec)
    base = ["task.name=omniglot", "model.name=conv4"]
    assert load_config(None, [*base, "model.downsample=stride"]).model.downsample == "stride"
    with pytest.raises(ConfigError, match="model.downsample = 'avg' is not one of pool, stride"):
        load_config(None, [*base, "model.downsample=avg"])
    with pytest.raises(ValueError, match="downsample must be one of"):
        Conv4(downsample="avg")


def test_an_unknown_way_to_gather_patches_is_named():
    conv = Conv3x3(1, 4)
    conv.patches = "im2col"
    with pytest.raises(ModelError, match="Conv3x3.patches must be one of"):
        conv(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
@pytest.mark.parametrize(("tasks", "ranks"), [(5, 2), (7, 3), (4, 4), (6, 2)])
def test_the_plain_mean_over_shards_is_the_whole_batch_even_when_uneven(algorithm, tasks, ranks):
    """What the all-reduce computes (the plain mean over ranks of each rank's shard result) equals one process's
    meta-gradient and metrics, for shards that differ in size (torchrun with 25 tasks on 2 processes)."""
    from metagrad.algorithms.reptile import Reptile

    def build():
        if algorithm == "maml":
            return MAML(_mlp(), inner_lr=0.1, inner_steps=2).double()
        return Reptile(_mlp(), inner_lr=0.05, inner_steps=2, inner_batch=3).double()

    batch = _mlp_batch(tasks).to("cpu", torch.float64)
    one = build()
    want, _, want_metrics = one.meta_gradient(batch, 0, torch.Generator().manual_seed(1))
    shards = [build().meta_gradient(batch, 0, torch.Generator().manual_seed(1), shard=(r, ranks))
              for r in range(ranks)]  # fmt: skip
    for k in want:
        torch.testing.assert_close(sum(s[0][k] for s in shards) / ranks, want[k], rtol=1e-10, atol=1e-12)
    for k in want_metrics:
        torch.testing.assert_close(sum(s[2][k] for s in shards) / ranks, want_metrics[k], rtol=1e-10, atol=1e-12)


def test_fewer_tasks_than_shards_is_refused():
    from metagrad.tasks.base import shard_bounds

    assert [shard_bounds(5, 2, r) for r in (0, 1)] == [(0, 3), (3, 5)]
    with pytest.raises(ValueError, match="at least one"):
        shard_bounds(2, 3, 0)


def test_conv4_calls_its_convolutions_as_modules():
    """Hooks on Conv-4's layers run (a user's, CAVIA's FiLM, the learner's failing-module report)."""
    model = Conv4(hidden=4)
    fired = []
    for i, conv in enumerate(model.convs):
        conv.register_forward_hook(lambda module, args, out, i=i: fired.append(i))
    model(torch.randn(2, 1, 28, 28))
    assert fired == [0, 1, 2, 3]
    assert all(isinstance(c, nn.Conv2d) for c in model.convs)


def test_gradients_are_strided_like_their_parameters_so_fused_optimizers_step_right():
    """Channels-last convolutions return channels-last weight gradients; backward() must hand .grad over in the
    parameter's layout (PyTorch's contract), or a fused Adam silently applies a scrambled update."""
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.randn(2, 3, 1, 16, 16, generator=g), torch.arange(3).repeat(2, 1),
                      torch.randn(2, 6, 1, 16, 16, generator=g), torch.arange(3).repeat(2, 2))  # fmt: skip
    steps = {}
    for fused in (False, True):
        torch.manual_seed(0)
        learner = MAML(Conv4(1, 3, hidden=8, image_size=16), inner_lr=0.1, inner_steps=1, loss="cross_entropy")
        opt = torch.optim.Adam(learner.parameters(), lr=0.1, fused=fused or None)
        learner.backward(batch)
        assert all(p.grad.stride() == p.stride() for p in learner.parameters())
        opt.step()
        steps[fused] = {k: v.detach().clone() for k, v in learner.model.named_parameters()}
    for k in steps[False]:
        torch.testing.assert_close(steps[True][k], steps[False][k], rtol=1e-5, atol=1e-6)
