"""CAVIA: the context is the only thing the inner loop adapts, from zero; exact first- and second-order
meta-gradients (vmap == loop == float64 central difference) for the sinusoid MLP (concatenated context) and
Conv-4 (FiLM); checkpoints."""

from __future__ import annotations

import pytest
import torch
from meta_gradcheck import (
    assert_every_tensor_matches_central_differences,
    assert_first_order_matches_frozen_inner_gradients,
    assert_vmap_equals_loop,
)

from metagrad.algorithms import CAVIA, ContextNetwork
from metagrad.algorithms.cavia import CONTEXT
from metagrad.build import build_learner
from metagrad.config import load_config
from metagrad.errors import ConfigError
from metagrad.models import MLP, Conv4
from metagrad.run import load_learner
from metagrad.tasks import Sinusoid, TaskBatch
from metagrad.train import train

F64 = torch.float64


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != CONTEXT:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))


def mlp_case(vectorize: bool, first_order: bool) -> tuple[CAVIA, TaskBatch]:
    net = ContextNetwork(MLP(1, (6, 6), 1, "tanh").to(F64), context=3)
    _randomise(net, 0)
    lrn = CAVIA(net, inner_lr=0.4, inner_steps=2, first_order=first_order, vectorize=vectorize)
    return lrn, Sinusoid().sample(3, 5, 6, torch.Generator().manual_seed(1)).to("cpu", F64)


def conv_case(vectorize: bool, first_order: bool) -> tuple[CAVIA, TaskBatch]:
    torch.manual_seed(0)
    net = ContextNetwork(Conv4(ways=2, hidden=3, image_size=16).to(F64), context=2, conditioning="film",
                         layer="norms.2")  # fmt: skip
    _randomise(net, 0)
    lrn = CAVIA(net, inner_lr=0.5, inner_steps=2, first_order=first_order, loss="cross_entropy",
                vectorize=vectorize)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    sx = torch.rand(2, 4, 1, 16, 16, generator=g, dtype=F64)
    qx = torch.rand(2, 4, 1, 16, 16, generator=g, dtype=F64)
    y = torch.tensor([0, 0, 1, 1]).expand(2, -1).clone()
    return lrn, TaskBatch(sx, y, qx, y)


CASES = {"mlp_concat": mlp_case, "conv4_film": conv_case}


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("case", list(CASES))
def test_meta_gradient_vmap_equals_loop_equals_central_difference(case, first_order):
    vec, b = CASES[case](True, first_order)
    loop, _ = CASES[case](False, first_order)
    gv, _, mv = vec.meta_gradient(b)
    gl, _, ml = loop.meta_gradient(b)
    assert CONTEXT not in gv and set(gv) == set(loop.params) - {CONTEXT}  # the context is not meta-learned
    assert_vmap_equals_loop(gv, gl, rel=1e-10)
    torch.testing.assert_close(mv["loss"], ml["loss"], rtol=1e-12, atol=0)

    # Each tensor against its own central difference (one direction through all of them let a 1e-4 error in
    # FiLM's weight through); first order with the inner gradients frozen.
    if not first_order:
        assert_every_tensor_matches_central_differences(loop, b, gv, {})
        return
    assert_first_order_matches_frozen_inner_gradients(loop, b, gv, {})
    # And as CAVIA states it: the adapted context held fixed, the query loss differentiated at it.
    theta = {k: v.detach() for k, v in loop.params.items()}
    g = torch.Generator().manual_seed(2)
    d = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in theta.items() if k != CONTEXT}
    fixed = [loop.adapt(b.support_x[i], b.support_y[i])[CONTEXT] for i in range(len(b))]

    def f(t: float) -> torch.Tensor:
        p = {k: v + t * d[k] if k in d else v for k, v in theta.items()}
        with torch.no_grad():
            return torch.stack([loop.loss({**p, CONTEXT: fixed[i]}, b.query_x[i], b.query_y[i], loop.inner_steps)
                                for i in range(len(b))]).mean()  # fmt: skip

    fd = (f(1e-6) - f(-1e-6)) / 2e-6
    torch.testing.assert_close(sum((gv[k] * d[k]).sum() for k in d), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_inner_loop_moves_the_context_only_and_its_gradient_is_a_finite_difference(case):
    lrn, b = CASES[case](True, False)
    lrn.rule.lr = 1.0  # one step of lr 1: the context moves by minus its support gradient
    sx, sy = b.support_x[0], b.support_y[0]
    adapted = lrn.adapt(sx, sy, steps=1)
    for k, v in lrn.params.items():
        if k != CONTEXT:
            assert torch.equal(adapted[k], v.detach()), f"{k} moved in the inner loop"
    assert torch.equal(lrn.params[CONTEXT], torch.zeros_like(lrn.params[CONTEXT]))
    assert adapted[CONTEXT].abs().max() > 0
    theta = {k: v.detach() for k, v in lrn.params.items()}
    h = 1e-6
    for i in range(theta[CONTEXT].numel()):
        e = torch.zeros_like(theta[CONTEXT])
        e[i] = h
        with torch.no_grad():
            fd = (lrn.loss({**theta, CONTEXT: e}, sx, sy) - lrn.loss({**theta, CONTEXT: -e}, sx, sy)) / (2 * h)
        torch.testing.assert_close(-adapted[CONTEXT][i], fd, rtol=1e-6, atol=1e-10)


def test_every_task_starts_from_a_zero_context():
    lrn, b = mlp_case(True, False)
    gp, _, metrics = lrn.meta_gradient(b)
    with torch.no_grad():
        lrn.params[CONTEXT] = torch.ones(3, dtype=F64)  # whatever the module holds, adaptation starts at 0
    gp2, _, metrics2 = lrn.meta_gradient(b)
    torch.testing.assert_close(metrics["loss"], metrics2["loss"])
    for k in gp:
        torch.testing.assert_close(gp[k], gp2[k])
    a = lrn.adapt(b.support_x[0], b.support_y[0], steps=0)
    assert torch.equal(a[CONTEXT], torch.zeros(3, dtype=F64))


def test_concat_is_concatenation_to_the_input():
    net = ContextNetwork(MLP(2, (4,), 1), context=3)
    x, c = torch.randn(5, 2), torch.randn(3)
    first = net.net[0]
    widened = torch.nn.Linear(5, 4)
    with torch.no_grad():
        widened.weight.copy_(torch.cat([first.weight, net.context_weight], 1))
        widened.bias.copy_(first.bias)
        net.context.copy_(c)
        expected = net.net[2](net.net[1](widened(torch.cat([x, c.expand(5, 3)], 1))))
        torch.testing.assert_close(net(x), expected)
    assert len(net.net[0]._forward_hooks) == 1  # registered once, not for each pass
    with pytest.raises(ConfigError, match="already feeds a ContextNetwork still in use"):
        ContextNetwork(net.net, context=2)  # one layer, one context: two would both be fed in


def test_options_are_checked():
    with pytest.raises(ConfigError, match="ContextNetwork"):
        CAVIA(MLP())
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        ContextNetwork(Conv4(ways=2, hidden=3, image_size=16), 2, "film", "nope")
    with pytest.raises(ConfigError, match="nn.Linear"):
        ContextNetwork(Conv4(ways=2, hidden=3, image_size=16), 2, "concat", "convs.0")
    for bad in ("algorithm.context=0", "algorithm.conditioning=add", "algorithm.inner_steps=0"):
        with pytest.raises(ConfigError):
            load_config(None, ["algorithm.name=cavia", bad])
    built = build_learner(load_config(None, ["algorithm.name=cavia", "algorithm.context=4"]))
    assert built.model.conditioning == "concat" and built.params[CONTEXT].shape == (4,) and built.fast == [CONTEXT]


def test_training_checkpoint_round_trip(tmp_path):
    overrides = ["algorithm.name=cavia", "train.iterations=6", "train.meta_batch=4", "train.val_every=3",
                 "train.checkpoint_every=3", "train.val_tasks=8", "train.compile=false", "eval.steps=2"]  # fmt: skip
    result = train(load_config(None, overrides), tmp_path / "run", progress=False)
    assert torch.equal(result.learner.params[CONTEXT], torch.zeros(5))  # never meta-learned
    _, loaded, meta = load_learner(tmp_path / "run")
    assert meta["iteration"] == 6
    for k, v in result.learner.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    b = Sinusoid().sample(2, 5, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.adaptation_curve(b, 2), result.learner.adaptation_curve(b, 2))


@pytest.mark.parametrize("layer", ["convs.0", "convs.2"])
def test_film_on_a_convolution_adapts_the_context(layer):
    """FiLM hooks the module's forward: Conv-4's convolutions must be called as modules (their fast path lives in
    their own forward), else the context would receive no gradient and adapt to nothing."""
    torch.manual_seed(0)
    net = ContextNetwork(Conv4(1, 3, hidden=4, image_size=16), 2, "film", layer)
    lrn = CAVIA(net, inner_lr=0.5, inner_steps=1, loss="cross_entropy")
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(2, 3, 1, 16, 16, generator=g), torch.randn(2, 6, 1, 16, 16, generator=g)
    batch = TaskBatch(sx, torch.arange(3).repeat(2, 1), qx, torch.arange(3).repeat(2, 2))
    adapted = lrn.adapt(batch.support_x[0], batch.support_y[0])
    assert adapted[CONTEXT].abs().sum() > 0


class _Direct(torch.nn.Module):  # uses its layer's weights without calling it
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(1, 4)
        self.out = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(torch.nn.functional.linear(x, self.hidden.weight, self.hidden.bias)))


def test_a_context_layer_the_network_never_calls_is_refused():
    net = ContextNetwork(_Direct(), 2, "film", "hidden")
    with pytest.raises(ConfigError, match="never called"):
        net(torch.randn(3, 1))


def test_compiled_meta_step_is_one_graph_and_exact():
    """The context's hook is registered once, outside the compiled step: registering it at every pass stopped
    Dynamo there (inside vmap and grad), so the compiled meta-step ran in pieces, and with the ``eager`` backend it
    failed. Compiled, the meta-gradient is the eager one (float64)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    lrn, b = mlp_case(True, False)
    expected = lrn.meta_gradient(b, 0)
    lrn.compile(backend="eager")
    got = lrn.meta_gradient(b, 0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    for want, have in zip(expected[:2], got[:2], strict=True):
        assert want.keys() == have.keys()
        for k in want:
            torch.testing.assert_close(have[k], want[k], rtol=1e-12, atol=1e-12)


def test_a_never_called_context_layer_is_refused_before_compiling_with_a_loss_of_ones_own():
    """The check runs on an eager forward pass: CAVIA makes one per input shape before its compiled step, also
    where a loss of the user's skips the check of the targets."""
    net = ContextNetwork(_Direct(), 2, "film", "hidden")
    lrn = CAVIA(net, inner_lr=0.1, loss=lambda out, y: ((out - y) ** 2).mean())
    lrn.compile(backend="eager")
    with pytest.raises(ConfigError, match="never called"):
        lrn.meta_gradient(Sinusoid().sample(2, 3, 3, torch.Generator().manual_seed(0)), 0)


def test_the_hook_follows_its_wrapper_through_copies_and_lets_a_network_go():
    """The context's hook holds its wrapper weakly: copies of the wrapper feed their own context, a copy of the
    network alone is the plain network, and a wrapper no longer in use (a failed wrap) lets the network be wrapped
    again, where one still in use is refused until its unwrap()."""
    import copy
    import io

    torch.manual_seed(0)
    net = MLP(1, (6,), 1)
    with pytest.raises(ConfigError):
        CAVIA(ContextNetwork(net, 3, "film", "0"), inner_steps=-1)  # built, then the learner refused
    wrapper = ContextNetwork(net, 3, "film", "0")  # the failed wrap's hook no longer counts
    with torch.no_grad():
        wrapper.film.bias.normal_()  # a trained FiLM: the zero context still shifts the layer
    x = torch.randn(5, 1)
    out = wrapper(x)
    buffer = io.BytesIO()
    torch.save(wrapper, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(wrapper), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(twin(x), out)
        with torch.no_grad():
            twin.film.bias.zero_()
        assert not torch.allclose(twin(x), out)  # its own context and FiLM, not the original's
    plain = copy.deepcopy(wrapper).unwrap()
    torch.testing.assert_close(copy.deepcopy(wrapper.net)(x), plain(x))  # the network copied alone: plain
    assert not torch.allclose(plain(x), out)
    with pytest.raises(ConfigError, match="still in use"):
        ContextNetwork(net, 3, "film", "0")
    assert wrapper.unwrap() is net and not net[0]._forward_hooks
    with pytest.raises(ConfigError, match="unwrapped"):
        wrapper(x)
    torch.testing.assert_close(net(x), plain(x))
    ContextNetwork(net, 3, "film", "0")  # free again
