"""Meta-learning algorithms: exact meta-gradients, batching paths, schedules, Reptile, adaptation."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from meta_gradcheck import (
    assert_every_tensor_matches_central_differences,
    assert_first_order_matches_frozen_inner_gradients,
)

from metagrad.algorithms import MAML, MAMLEnhanced, MetaSGD, Reptile, multi_step_weights
from metagrad.models import MLP
from metagrad.tasks import Sinusoid, TaskBatch

F64 = torch.float64


# ----- helpers ---------------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_mlp(seed: int = 0, hidden: tuple[int, ...] = (8, 8), dtype: torch.dtype = F64) -> MLP:
    """A tanh MLP whose weights come from a private generator (never the global RNG)."""
    model = MLP(1, hidden, 1, "tanh").to(dtype)
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=F64).to(dtype))
    return model


def make_batch(seed: int = 0, b: int = 4, k: int = 5, q: int = 7, dtype: torch.dtype = F64) -> TaskBatch:
    return Sinusoid().sample(b, k, q, gen(seed)).to("cpu", dtype)


def tasks_of(batch: TaskBatch) -> tuple[torch.Tensor, ...]:
    return (batch.support_x, batch.support_y, batch.query_x, batch.query_y)


def manual_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP written out by hand: Linear layers at indices 0, 2, 4, ... with tanh between them."""
    layers = sorted({int(k.split(".")[0]) for k in params})
    h = x
    for j, i in enumerate(layers):
        h = h @ params[f"{i}.weight"].T + params[f"{i}.bias"]
        if j < len(layers) - 1:
            h = torch.tanh(h)
    return h


def mse(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((manual_forward(params, x) - y) ** 2).mean()


def sgd_steps(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    steps: int,
    create_graph: bool,
) -> list[dict[str, torch.Tensor]]:
    """Plain-autograd SGD; returns the weights after each step. ``create_graph=False`` detaches the gradients."""
    out = []
    p = dict(params)
    for _ in range(steps):
        grads = torch.autograd.grad(mse(p, x, y), list(p.values()), create_graph=create_graph)
        p = {k: v - lr * g for (k, v), g in zip(p.items(), grads, strict=True)}
        out.append(p)
    return out


def leaf_params(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_() for k, v in learner.params.items()}


def assert_trees_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def central_fd(
    f: Callable[[dict[str, torch.Tensor]], float],
    tree: dict[str, torch.Tensor],
    entries: list[tuple[str, tuple[int, ...]]],
    h: float = 1e-5,
) -> list[float]:
    out = []
    for key, idx in entries:
        vals = []
        for sign in (1.0, -1.0):
            t = dict(tree)
            t[key] = tree[key].detach().clone()
            t[key][idx] += sign * h
            vals.append(f(t))
        out.append((vals[0] - vals[1]) / (2 * h))
    return out


def randomise_meta_state(learner, seed: int, scale: float = 0.15) -> None:
    g = gen(seed)
    for k, v in learner.meta_state.items():
        learner.meta_state[k] = v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)


PARAM_ENTRIES = [
    ("0.weight", (3, 0)),
    ("0.bias", (5,)),
    ("2.weight", (1, 4)),
    ("2.weight", (6, 7)),
    ("2.bias", (2,)),
    ("4.weight", (0, 2)),
    ("4.bias", (0,)),
]


# ----- MAML: exact second order -----------------------------------------------------------------------------


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_maml_meta_gradient_matches_finite_differences(inner_steps):
    learner = MAML(tiny_mlp(0), inner_lr=0.3, inner_steps=inner_steps)
    batch = make_batch(1)
    tasks = tasks_of(batch)
    gp, gm, metrics = learner.meta_gradient(batch, 0)
    assert gm == {}
    assert set(gp) == set(learner.params)

    def f(params):
        return learner.meta_loss(params, learner.meta_state, tasks, None, False)[0].item()

    fd = central_fd(f, learner.params, PARAM_ENTRIES)
    analytic = [gp[k][i].item() for k, i in PARAM_ENTRIES]
    torch.testing.assert_close(torch.tensor(analytic), torch.tensor(fd), rtol=1e-6, atol=1e-9)
    assert metrics["loss"].item() == pytest.approx(f(learner.params), rel=1e-12)


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_maml_matches_autograd_second_order_reference(inner_steps):
    lr = 0.2
    learner = MAML(tiny_mlp(1), inner_lr=lr, inner_steps=inner_steps)
    batch = make_batch(2)
    gp, _, metrics = learner.meta_gradient(batch, 0)

    theta = leaf_params(learner)
    total, pre, post = 0.0, 0.0, 0.0
    for i in range(len(batch)):
        sx, sy, qx, qy = (t[i] for t in tasks_of(batch))
        phi = sgd_steps(theta, sx, sy, lr, inner_steps, create_graph=True)[-1]
        loss = mse(phi, qx, qy)
        total = total + loss / len(batch)
        pre += mse(theta, qx, qy).item() / len(batch)
        post += loss.item() / len(batch)
    ref = dict(zip(theta, torch.autograd.grad(total, list(theta.values())), strict=True))
    assert_trees_close(gp, ref, rtol=1e-10, atol=1e-12)
    assert metrics["loss"].item() == pytest.approx(total.item(), rel=1e-12)
    assert metrics["pre_loss"].item() == pytest.approx(pre, rel=1e-12)
    assert metrics["post_loss"].item() == pytest.approx(post, rel=1e-12)


def test_maml_zero_inner_steps_is_query_loss_gradient():
    learner = MAML(tiny_mlp(2), inner_lr=0.3, inner_steps=0)
    batch = make_batch(3)
    gp, _, metrics = learner.meta_gradient(batch, 0)
    theta = leaf_params(learner)
    loss = sum(mse(theta, batch.query_x[i], batch.query_y[i]) for i in range(len(batch))) / len(batch)
    ref = dict(zip(theta, torch.autograd.grad(loss, list(theta.values())), strict=True))
    assert_trees_close(gp, ref, rtol=1e-10, atol=1e-12)
    assert metrics["loss"].item() == pytest.approx(loss.item(), rel=1e-12)


# ----- first-order MAML -----------------------------------------------------------------------------------


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_fomaml_matches_detached_autograd_reference_and_differs_from_second_order(inner_steps):
    lr = 0.3
    model = tiny_mlp(3)
    fo = MAML(copy.deepcopy(model), inner_lr=lr, inner_steps=inner_steps, first_order=True)
    so = MAML(copy.deepcopy(model), inner_lr=lr, inner_steps=inner_steps)
    assert fo.name == "fomaml"
    batch = make_batch(4)
    gp_fo, _, metrics = fo.meta_gradient(batch, 0)
    gp_so, _, _ = so.meta_gradient(batch, 0)

    theta = leaf_params(fo)
    total = 0.0
    for i in range(len(batch)):
        sx, sy, qx, qy = (t[i] for t in tasks_of(batch))
        phi = sgd_steps(theta, sx, sy, lr, inner_steps, create_graph=False)[-1]
        total = total + mse(phi, qx, qy) / len(batch)
    ref = dict(zip(theta, torch.autograd.grad(total, list(theta.values())), strict=True))
    assert_trees_close(gp_fo, ref, rtol=1e-10, atol=1e-12)
    assert metrics["loss"].item() == pytest.approx(total.item(), rel=1e-12)
    # Same loss value, different gradient.
    diff = sum((gp_fo[k] - gp_so[k]).norm() ** 2 for k in gp_fo) ** 0.5
    scale = sum(gp_so[k].norm() ** 2 for k in gp_so) ** 0.5
    assert diff > 1e-3 * scale


def test_fomaml_gradient_is_query_gradient_at_adapted_weights_for_one_step():
    # With one step, FOMAML's gradient is ∇φ L_query(φ), evaluated at φ = θ − α∇θ L_support(θ).
    lr = 0.25
    learner = MAML(tiny_mlp(4), inner_lr=lr, inner_steps=1, first_order=True)
    batch = make_batch(5, b=1)
    gp, _, _ = learner.meta_gradient(batch, 0)
    sx, sy, qx, qy = (t[0] for t in tasks_of(batch))
    theta = leaf_params(learner)
    phi = {k: v.detach().requires_grad_() for k, v in sgd_steps(theta, sx, sy, lr, 1, False)[-1].items()}
    ref = dict(zip(phi, torch.autograd.grad(mse(phi, qx, qy), list(phi.values())), strict=True))
    assert_trees_close(gp, ref, rtol=1e-10, atol=1e-12)


# ----- vmap vs loop ---------------------------------------------------------------------------------------


LEARNERS: dict[str, Callable[..., object]] = {
    "maml": lambda m, v: MAML(m, inner_lr=0.1, inner_steps=2, vectorize=v),
    "fomaml": lambda m, v: MAML(m, inner_lr=0.1, inner_steps=2, first_order=True, vectorize=v),
    "maml_msl": lambda m, v: MAML(m, inner_lr=0.1, inner_steps=3, multi_step_loss=True, vectorize=v),
    "metasgd": lambda m, v: MetaSGD(m, inner_lr=0.1, inner_steps=2, vectorize=v),
    "enhanced": lambda m, v: MAMLEnhanced(m, inner_lr=0.1, inner_steps=3, vectorize=v),
    "enhanced_fo": lambda m, v: MAMLEnhanced(m, inner_lr=0.1, inner_steps=2, first_order=True, vectorize=v),
    "enhanced_per_layer_nocurv": lambda m, v: MAMLEnhanced(
        m, inner_lr=0.1, inner_steps=2, per_layer=True, curvature=False, vectorize=v
    ),
}


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_vmap_equals_loop(name):
    model = tiny_mlp(5)
    vec = LEARNERS[name](copy.deepcopy(model), True)
    loop = LEARNERS[name](copy.deepcopy(model), False)
    randomise_meta_state(vec, seed=6)
    randomise_meta_state(loop, seed=6)
    batch = make_batch(7, b=5)
    gp_v, gm_v, m_v = vec.meta_gradient(batch, 3)
    gp_l, gm_l, m_l = loop.meta_gradient(batch, 3)
    assert_trees_close(gp_v, gp_l, rtol=1e-10, atol=1e-12)
    assert_trees_close(gm_v, gm_l, rtol=1e-10, atol=1e-12)
    assert set(gm_v) == set(vec.meta_state)
    assert_trees_close(m_v, m_l, rtol=1e-10, atol=1e-12)
    assert any(g.abs().max() > 0 for g in gp_v.values())
    # Every tensor against its own central difference (at iteration 0, whose schedule the reference uses):
    # first order with the inner gradients frozen.
    gp, gm, _ = loop.meta_gradient(batch, 0)
    if loop.schedule(0)[1]:
        assert_first_order_matches_frozen_inner_gradients(loop, batch, gp, gm)
    else:
        assert_every_tensor_matches_central_differences(loop, batch, gp, gm)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_reptile_vmap_equals_loop(optimizer):
    model = tiny_mlp(8)
    kw = {"inner_lr": 0.02, "inner_steps": 3, "inner_batch": 6, "inner_optimizer": optimizer}
    vec = Reptile(copy.deepcopy(model), vectorize=True, **kw)
    loop = Reptile(copy.deepcopy(model), vectorize=False, **kw)
    batch = make_batch(9, b=4, k=5, q=5)
    for it in range(2):  # the second call uses the persisted Adam state
        d_v, gm_v, m_v = vec.meta_gradient(batch, it, gen(100 + it))
        d_l, gm_l, m_l = loop.meta_gradient(batch, it, gen(100 + it))
        assert gm_v == {} and gm_l == {}
        assert_trees_close(d_v, d_l, rtol=1e-10, atol=1e-12)
        assert_trees_close(m_v, m_l, rtol=1e-10, atol=1e-12)
        assert_trees_close(vec.extra_state, loop.extra_state, rtol=1e-10, atol=1e-12)


# ----- enhanced/Meta-SGD at initialisation reduce to MAML ---------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"inner_steps": 1},
        {"inner_steps": 3},
        {"inner_steps": 2, "per_layer": True},
        {"inner_steps": 2, "curvature": False},
        {"inner_steps": 2, "parameterization": "raw"},
    ],
)
def test_enhanced_at_init_equals_maml(kwargs):
    model = tiny_mlp(10)
    steps = kwargs["inner_steps"]
    enh = MAMLEnhanced(copy.deepcopy(model), inner_lr=0.07, multi_step_loss=False, **kwargs)
    maml = MAML(copy.deepcopy(model), inner_lr=0.07, inner_steps=steps)
    batch = make_batch(11)
    gp_e, gm_e, m_e = enh.meta_gradient(batch, 0)
    gp_m, _, m_m = maml.meta_gradient(batch, 0)
    assert_trees_close(gp_e, gp_m, rtol=1e-12, atol=1e-12)
    assert m_e["loss"].item() == pytest.approx(m_m["loss"].item(), rel=1e-12)
    assert set(gm_e) == set(enh.meta_state) and len(gm_e) > 0


def test_enhanced_multi_step_loss_at_init_equals_maml_multi_step_loss():
    model = tiny_mlp(12)
    enh = MAMLEnhanced(copy.deepcopy(model), inner_lr=0.07, inner_steps=3, msl_epochs=5, epoch_iterations=10)
    maml = MAML(
        copy.deepcopy(model), inner_lr=0.07, inner_steps=3, multi_step_loss=True, msl_epochs=5, epoch_iterations=10
    )
    batch = make_batch(13)
    gp_e, _, m_e = enh.meta_gradient(batch, 20)
    gp_m, _, m_m = maml.meta_gradient(batch, 20)
    assert_trees_close(gp_e, gp_m, rtol=1e-12, atol=1e-12)
    assert m_e["loss"].item() == pytest.approx(m_m["loss"].item(), rel=1e-12)


@pytest.mark.parametrize("parameterization", ["log", "raw"])
def test_metasgd_at_init_equals_maml(parameterization):
    model = tiny_mlp(14)
    msgd = MetaSGD(copy.deepcopy(model), inner_lr=0.05, inner_steps=2, parameterization=parameterization)
    maml = MAML(copy.deepcopy(model), inner_lr=0.05, inner_steps=2)
    assert msgd.name == "metasgd"
    batch = make_batch(15)
    gp_s, gm_s, _ = msgd.meta_gradient(batch, 0)
    gp_m, _, _ = maml.meta_gradient(batch, 0)
    assert_trees_close(gp_s, gp_m, rtol=1e-12, atol=1e-12)
    assert {k.removeprefix("metasgd.") for k in gm_s} == set(msgd.params)


def test_enhanced_learned_state_changes_the_gradient():
    # The converse of the init tests: once the learned state moves away from init, the result differs.
    model = tiny_mlp(10)
    enh = MAMLEnhanced(copy.deepcopy(model), inner_lr=0.07, inner_steps=2, multi_step_loss=False)
    maml = MAML(copy.deepcopy(model), inner_lr=0.07, inner_steps=2)
    randomise_meta_state(enh, seed=1)
    batch = make_batch(11)
    gp_e, _, _ = enh.meta_gradient(batch, 0)
    gp_m, _, _ = maml.meta_gradient(batch, 0)
    assert not torch.allclose(gp_e["2.weight"], gp_m["2.weight"], rtol=1e-4)


# ----- meta-gradient with respect to the learned inner-rule state ----------------------------------------


META_CASES = {
    "enhanced": (
        lambda m: MAMLEnhanced(m, inner_lr=0.15, inner_steps=2, multi_step_loss=False),
        [
            ("curvature.0.weight.out", (2, 5)),
            ("curvature.0.weight.in", (0, 0)),
            ("curvature.2.weight.in", (3, 1)),
            ("curvature.2.weight.out", (0, 0)),
            ("curvature.4.weight.in", (6, 2)),
            ("curvature.0.bias.vec", (4,)),
            ("curvature.4.bias.vec", (0,)),
            ("lslr.2.weight", (0,)),
            ("lslr.2.weight", (1,)),
            ("lslr.4.bias", (1,)),
            ("lslr.0.weight", (0,)),
        ],
    ),
    "enhanced_msl_per_layer_raw": (
        lambda m: MAMLEnhanced(
            m, inner_lr=0.15, inner_steps=3, per_layer=True, parameterization="raw", msl_epochs=4, epoch_iterations=1
        ),
        [("lslr.0", (0,)), ("lslr.2", (1,)), ("lslr.4", (2,)), ("curvature.2.weight.out", (5, 3))],
    ),
    "metasgd": (
        lambda m: MetaSGD(m, inner_lr=0.15, inner_steps=2),
        [
            ("metasgd.0.weight", (3, 0)),
            ("metasgd.2.weight", (1, 6)),
            ("metasgd.2.bias", (4,)),
            ("metasgd.4.bias", (0,)),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(META_CASES))
def test_meta_state_gradient_matches_finite_differences(name):
    factory, entries = META_CASES[name]
    learner = factory(tiny_mlp(16))
    randomise_meta_state(learner, seed=17, scale=0.1)
    batch = make_batch(18)
    tasks = tasks_of(batch)
    iteration = 2
    weights, first_order = learner.schedule(iteration)
    assert not first_order
    gp, gm, _ = learner.meta_gradient(batch, iteration)

    def f(meta):
        return learner.meta_loss(learner.params, meta, tasks, weights, False)[0].item()

    fd = central_fd(f, learner.meta_state, entries)
    analytic = [gm[k][i].item() for k, i in entries]
    torch.testing.assert_close(torch.tensor(analytic), torch.tensor(fd), rtol=1e-6, atol=1e-9)
    assert max(abs(a) for a in analytic) > 1e-3  # the check is not vacuous

    # And the weights' gradient is consistent under the same (non-trivial) learned state.
    def fp(params):
        return learner.meta_loss(params, learner.meta_state, tasks, weights, False)[0].item()

    fdp = central_fd(fp, learner.params, PARAM_ENTRIES[:4])
    torch.testing.assert_close(
        torch.tensor([gp[k][i].item() for k, i in PARAM_ENTRIES[:4]]), torch.tensor(fdp), rtol=1e-6, atol=1e-9
    )


def test_unused_lslr_steps_get_zero_gradient():
    # LSLR trained for 3 steps, but a learner running 2 inner steps never touches the third rate.
    from metagrad.inner import LSLR

    learner = MAML(tiny_mlp(19), LSLR(0.1, 3), inner_steps=2)
    _, gm, _ = learner.meta_gradient(make_batch(20), 0)
    for v in gm.values():
        assert v[2].item() == 0.0
        assert v[:2].abs().min() > 0


# ----- MAML++ multi-step loss -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0, [0.2, 0.2, 0.2, 0.2, 0.2]),
        (5, [0.1, 0.1, 0.1, 0.1, 0.6]),
        (10, [0.006, 0.006, 0.006, 0.006, 0.976]),
        (100, [0.006, 0.006, 0.006, 0.006, 0.976]),
        (2, [0.16, 0.16, 0.16, 0.16, 0.36]),
    ],
)
def test_multi_step_weights_hand_values(epoch, expected):
    w = multi_step_weights(5, epoch, 10)
    assert w == pytest.approx(expected, abs=1e-12)


def test_multi_step_weights_formula_and_sum():
    for n in range(2, 9):
        w0 = multi_step_weights(n, 0, 7)
        assert len(w0) == n
        assert sum(w0) == pytest.approx(1.0, abs=1e-12)
        assert w0 == pytest.approx([1 / n] * n)
        for e in range(0, 12):
            w = multi_step_weights(n, e, 7)
            nf = max(1 / n - e / (n * 7), 0.03 / n)
            fin = min(1 / n + e * (n - 1) / (n * 7), 1 - 0.03 * (n - 1) / n)
            assert w == pytest.approx([nf] * (n - 1) + [fin], abs=1e-12)
            assert w[-1] >= w[0]


def test_multi_step_weights_edge_cases():
    assert multi_step_weights(1, 0, 10) == [1.0]
    assert multi_step_weights(1, 50, 10) == [1.0]
    assert multi_step_weights(3, 1, 4) == pytest.approx([0.25, 0.25, 0.5])
    # anneal_epochs of 0 is treated as 1
    assert multi_step_weights(2, 1, 0) == pytest.approx([0.015, 0.985])
    with pytest.raises(ValueError):
        multi_step_weights(0, 0, 10)


def test_maml_multi_step_loss_uses_weighted_per_step_losses():
    lr, steps = 0.2, 3
    learner = MAML(
        tiny_mlp(21), inner_lr=lr, inner_steps=steps, multi_step_loss=True, msl_epochs=4, epoch_iterations=10
    )
    assert learner.multi_step_loss
    iteration = 25  # epoch 2 of 4: weights [1/6, 1/6, 2/3]
    weights, first_order = learner.schedule(iteration)
    assert not first_order
    assert weights.dtype == F64
    torch.testing.assert_close(weights, torch.tensor([1 / 6, 1 / 6, 2 / 3], dtype=F64))
    batch = make_batch(22)
    gp, _, metrics = learner.meta_gradient(batch, iteration)

    theta = leaf_params(learner)
    total = 0.0
    post = 0.0
    for i in range(len(batch)):
        sx, sy, qx, qy = (t[i] for t in tasks_of(batch))
        phis = sgd_steps(theta, sx, sy, lr, steps, create_graph=True)
        per_step = [mse(p, qx, qy) for p in phis]
        total = total + (per_step[0] / 6 + per_step[1] / 6 + 2 * per_step[2] / 3) / len(batch)
        post += per_step[-1].item() / len(batch)
    assert metrics["loss"].item() == pytest.approx(total.item(), rel=1e-12)
    assert metrics["post_loss"].item() == pytest.approx(post, rel=1e-12)
    ref = dict(zip(theta, torch.autograd.grad(total, list(theta.values())), strict=True))
    assert_trees_close(gp, ref, rtol=1e-10, atol=1e-12)
    # A different epoch changes the weights and so the loss.
    _, _, other = learner.meta_gradient(batch, 5)
    assert other["loss"].item() != pytest.approx(metrics["loss"].item(), rel=1e-6)
    # After its msl_epochs the last step's loss alone trains, as in MAML++'s code.
    _, _, late = learner.meta_gradient(batch, 1000)
    assert late["loss"].item() == pytest.approx(post, rel=1e-12)


def test_the_multi_step_loss_ends_after_its_epochs():
    learner = MAML(tiny_mlp(21), inner_steps=3, multi_step_loss=True, msl_epochs=4, epoch_iterations=10)
    assert learner.schedule(39)[0] is not None  # epoch 3 of 4
    last = torch.tensor(multi_step_weights(3, 3, 4), dtype=F64)
    torch.testing.assert_close(learner.schedule(39)[0], last)
    assert learner.schedule(40)[0] is None and learner.schedule(10**6)[0] is None
    assert MAML(tiny_mlp(21), inner_steps=3, multi_step_loss=True, msl_epochs=0).schedule(0)[0] is None


def test_multi_step_loss_off_for_a_single_step():
    learner = MAML(tiny_mlp(0), inner_steps=1, multi_step_loss=True)
    assert learner.multi_step_loss  # recorded as asked; over one step it is the plain loss
    assert learner.schedule(0)[0] is None


# ----- derivative-order annealing -------------------------------------------------------------------------


def test_first_order_iterations_schedule():
    learner = MAML(tiny_mlp(23), inner_lr=0.3, inner_steps=2, first_order_iterations=100)
    assert learner.schedule(0)[1] is True
    assert learner.schedule(99)[1] is True
    assert learner.schedule(100)[1] is False
    assert learner.schedule(5000)[1] is False
    always = MAML(tiny_mlp(23), inner_steps=2, first_order=True, first_order_iterations=100)
    assert always.schedule(0)[1] and always.schedule(10_000)[1]
    never = MAML(tiny_mlp(23), inner_steps=2)
    assert never.schedule(0)[1] is False


def test_first_order_iterations_switches_the_gradient():
    model = tiny_mlp(23)
    annealed = MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=2, first_order_iterations=100)
    fo = MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=2, first_order=True)
    so = MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=2)
    batch = make_batch(24)
    assert_trees_close(annealed.meta_gradient(batch, 50)[0], fo.meta_gradient(batch, 50)[0], rtol=1e-12, atol=0)
    assert_trees_close(annealed.meta_gradient(batch, 100)[0], so.meta_gradient(batch, 100)[0], rtol=1e-12, atol=0)


# ----- Reptile ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner_batch", [12, 100])
def test_reptile_sgd_matches_hand_computation(inner_batch):
    lr, steps = 0.1, 2
    learner = Reptile(tiny_mlp(25, hidden=(3,)), inner_lr=lr, inner_steps=steps, inner_batch=inner_batch)
    batch = make_batch(26, b=3, k=5, q=7)  # 12 pooled points: every step uses all of them, permuted
    delta, gm, metrics = learner.meta_gradient(batch, 0, gen(27))
    assert gm == {}

    theta = leaf_params(learner)
    phis, pre, post = [], 0.0, 0.0
    for i in range(len(batch)):
        x = torch.cat([batch.support_x[i], batch.query_x[i]])
        y = torch.cat([batch.support_y[i], batch.query_y[i]])
        phi = sgd_steps(theta, x, y, lr, steps, create_graph=False)[-1]
        phis.append(phi)
        pre += mse(theta, x, y).item() / len(batch)
        post += mse(phi, x, y).item() / len(batch)
    expected = {k: (theta[k] - torch.stack([p[k] for p in phis]).mean(0)).detach() for k in theta}
    assert_trees_close(delta, expected, rtol=1e-10, atol=1e-13)
    assert metrics["loss"].item() == pytest.approx(post, rel=1e-10)
    assert metrics["pre_loss"].item() == pytest.approx(pre, rel=1e-10)
    # The learner's own weights are not moved by meta_gradient (the trainer applies the step).
    assert_trees_close(learner.params, {k: v.detach() for k, v in theta.items()}, rtol=0, atol=0)


def test_reptile_minibatches_follow_the_generator():
    model = tiny_mlp(28, hidden=(3,))
    learner = Reptile(model, inner_lr=0.1, inner_steps=3, inner_batch=4)
    batch = make_batch(29, b=3, k=5, q=5)
    a, _, _ = learner.meta_gradient(batch, 0, gen(1))
    b, _, _ = learner.meta_gradient(batch, 0, gen(1))
    c, _, _ = learner.meta_gradient(batch, 0, gen(2))
    assert_trees_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a["0.weight"], c["0.weight"])
    # Hand computation with the same draws: sorted random keys pick 4 points of 10 per task and step.
    keys = torch.rand((3, 3, 10), generator=gen(1))
    idx = keys.argsort(dim=-1)[..., :4]
    theta = leaf_params(learner)
    phis = []
    for i in range(3):
        x = torch.cat([batch.support_x[i], batch.query_x[i]])
        y = torch.cat([batch.support_y[i], batch.query_y[i]])
        p = theta
        for s in range(3):
            p = sgd_steps(p, x[idx[i, s]], y[idx[i, s]], 0.1, 1, create_graph=False)[-1]
        phis.append(p)
    expected = {k: (theta[k] - torch.stack([p[k] for p in phis]).mean(0)).detach() for k in theta}
    assert_trees_close(a, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("persist", [True, False])
def test_reptile_adam_matches_hand_computation(persist):
    lr, steps, beta2, eps = 0.01, 2, 0.9, 1e-8
    learner = Reptile(
        tiny_mlp(30, hidden=(3,)),
        inner_lr=lr,
        inner_steps=steps,
        inner_batch=50,
        inner_optimizer="adam",
        beta2=beta2,
        eps=eps,
        persist_inner_state=persist,
    )
    assert learner.extra_state["adam.t"].item() == 0
    batch = make_batch(31, b=2, k=4, q=4)
    theta = {k: v.detach().clone() for k, v in learner.params.items()}
    v0 = {k: torch.zeros_like(p) for k, p in theta.items()}
    t0 = 0
    for call in range(2):
        delta, _, _ = learner.meta_gradient(batch, call, gen(32 + call))
        phis, vs = [], []
        for i in range(2):
            x = torch.cat([batch.support_x[i], batch.query_x[i]])
            y = torch.cat([batch.support_y[i], batch.query_y[i]])
            p = {k: t.clone().requires_grad_() for k, t in theta.items()}
            v = dict(v0)
            for s in range(steps):
                grads = torch.autograd.grad(mse(p, x, y), list(p.values()))
                g = dict(zip(p, grads, strict=True))
                v = {k: beta2 * v[k] + (1 - beta2) * g[k] ** 2 for k in p}
                corr = 1 - beta2 ** (t0 + s + 1)
                p = {k: (p[k] - lr * g[k] / ((v[k] / corr).sqrt() + eps)).detach().requires_grad_() for k in p}
            phis.append(p)
            vs.append(v)
        expected = {k: theta[k] - torch.stack([p[k].detach() for p in phis]).mean(0) for k in theta}
        assert_trees_close(delta, expected, rtol=1e-9, atol=1e-13)
        if persist:
            v0 = {k: torch.stack([v[k] for v in vs]).mean(0) for k in theta}
            t0 += steps
        for k in theta:
            torch.testing.assert_close(learner.extra_state[f"adam.v.{k}"], v0[k], rtol=1e-10, atol=1e-15)
        assert learner.extra_state["adam.t"].item() == t0
    # On a first step Adam with β1 = 0 moves every weight by about ±lr.
    assert delta["0.weight"].abs().max() <= 2 * steps * lr


def test_reptile_validation():
    with pytest.raises(ValueError):
        Reptile(tiny_mlp(0), inner_optimizer="rmsprop")
    with pytest.raises(ValueError):
        Reptile(tiny_mlp(0), inner_batch=0)


def test_reptile_adapt_uses_plain_sgd_at_inner_lr():
    learner = Reptile(tiny_mlp(33), inner_lr=0.05, inner_steps=4, inner_optimizer="adam")
    batch = make_batch(34, b=1)
    sx, sy = batch.support_x[0], batch.support_y[0]
    got = learner.adapt(sx, sy, 3)
    expected = sgd_steps(leaf_params(learner), sx, sy, 0.05, 3, create_graph=False)[-1]
    assert_trees_close(got, {k: v.detach() for k, v in expected.items()}, rtol=1e-12, atol=1e-14)


# ----- adaptation and evaluation ------------------------------------------------------------------------------


def test_adapt_equals_manual_sgd():
    learner = MAML(tiny_mlp(35), inner_lr=0.1, inner_steps=2)
    batch = make_batch(36, b=1)
    sx, sy = batch.support_x[0], batch.support_y[0]
    theta = leaf_params(learner)
    manual = [{k: v.detach() for k, v in p.items()} for p in sgd_steps(theta, sx, sy, 0.1, 4, create_graph=False)]
    assert_trees_close(learner.adapt(sx, sy, 4), manual[3], rtol=1e-12, atol=1e-14)
    assert_trees_close(learner.adapt(sx, sy), manual[1], rtol=1e-12, atol=1e-14)  # default: inner_steps
    adapted = learner.adapt(sx, sy, 4)
    assert all(not v.requires_grad for v in adapted.values())
    # Adapting does not touch the initialisation.
    assert_trees_close(learner.params, {k: v.detach() for k, v in theta.items()}, rtol=0, atol=0)
    # Adapting reduces the support loss.
    assert mse(adapted, sx, sy) < mse(learner.params, sx, sy)


def test_adapt_zero_steps_returns_initialisation():
    learner = MAML(tiny_mlp(37), inner_lr=0.1, inner_steps=2)
    batch = make_batch(38, b=1)
    p = learner.adapt(batch.support_x[0], batch.support_y[0], 0)
    assert_trees_close(p, learner.params, rtol=0, atol=0)
    with pytest.raises(ValueError):
        learner.adapt(batch.support_x[0], batch.support_y[0], -1)


def test_adapt_from_given_params():
    learner = MAML(tiny_mlp(37), inner_lr=0.1, inner_steps=2)
    other = {k: v + 0.1 for k, v in learner.params.items()}
    batch = make_batch(38, b=1)
    sx, sy = batch.support_x[0], batch.support_y[0]
    manual = sgd_steps({k: v.clone().requires_grad_() for k, v in other.items()}, sx, sy, 0.1, 2, False)[-1]
    got = learner.adapt(sx, sy, 2, params=other)
    assert_trees_close(got, {k: v.detach() for k, v in manual.items()}, rtol=1e-12, atol=1e-14)


def test_adapt_uses_learned_metasgd_rates():
    learner = MetaSGD(tiny_mlp(39), inner_lr=0.1, inner_steps=1)
    randomise_meta_state(learner, seed=40, scale=0.5)
    batch = make_batch(41, b=1)
    sx, sy = batch.support_x[0], batch.support_y[0]
    theta = leaf_params(learner)
    grads = dict(zip(theta, torch.autograd.grad(mse(theta, sx, sy), list(theta.values())), strict=True))
    expected = {k: (theta[k] - learner.meta_state[f"metasgd.{k}"].exp() * grads[k]).detach() for k in theta}
    assert_trees_close(learner.adapt(sx, sy, 1), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beyond", ["stop", "last"])
def test_adapt_and_curve_use_per_step_lslr_rates(beyond):
    # LSLR trained for 2 steps: adaptation uses rate 0, then rate 1; later steps reuse rate 1 ("last") or
    # leave the weights where they are ("stop").
    learner = MAMLEnhanced(
        tiny_mlp(39), inner_lr=0.1, inner_steps=2, curvature=False, multi_step_loss=False, beyond=beyond
    )
    g = gen(40)
    for k in list(learner.meta_state):
        learner.meta_state[k] = torch.tensor([0.05, 0.3], dtype=F64).log() + 0.1 * torch.randn(2, generator=g)
    batch = make_batch(41, b=2)
    sx, sy, qx, qy = (t[0] for t in tasks_of(batch))
    p = leaf_params(learner)
    losses = [mse(p, qx, qy).item()]
    for s in range(4):
        grads = dict(zip(p, torch.autograd.grad(mse(p, sx, sy), list(p.values())), strict=True))
        if s >= 2 and beyond == "stop":
            rate = {k: 0.0 for k in p}
        else:
            rate = {k: learner.meta_state[f"lslr.{k}"][min(s, 1)].exp() for k in p}
        p = {k: (p[k] - rate[k] * grads[k]).detach().requires_grad_() for k in p}
        losses.append(mse(p, qx, qy).item())
    assert_trees_close(learner.adapt(sx, sy, 4), {k: v.detach() for k, v in p.items()}, rtol=1e-12, atol=1e-14)
    curve = learner.adaptation_curve(batch, 4)
    torch.testing.assert_close(curve[0], torch.tensor(losses, dtype=F64), rtol=1e-10, atol=0)
    if beyond == "stop":
        assert curve[0, 2] == curve[0, 3] == curve[0, 4]
    else:
        assert curve[0, 3] != curve[0, 2]


def test_predict_shape_and_values():
    learner = MAML(tiny_mlp(42), inner_lr=0.1, inner_steps=1)
    x = torch.linspace(-5, 5, 17, dtype=F64)[:, None]
    out = learner.predict(x)
    assert out.shape == (17, 1)
    assert not out.requires_grad
    torch.testing.assert_close(out, manual_forward(learner.params, x), rtol=1e-12, atol=1e-14)
    batch = make_batch(43, b=1)
    adapted = learner.adapt(batch.support_x[0], batch.support_y[0], 2)
    torch.testing.assert_close(learner.predict(x, adapted), manual_forward(adapted, x), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(learner.predict(x, adapted), out)


@pytest.mark.parametrize("vectorize", [True, False])
def test_adaptation_curve(vectorize):
    steps = 3
    learner = MAML(tiny_mlp(44), inner_lr=0.1, inner_steps=1, vectorize=vectorize)
    batch = make_batch(45, b=5)
    curve = learner.adaptation_curve(batch, steps)
    assert curve.shape == (5, steps + 1)
    assert not curve.requires_grad
    for i in range(5):
        sx, sy, qx, qy = (t[i] for t in tasks_of(batch))
        pre = ((learner.predict(qx) - qy) ** 2).mean()
        assert curve[i, 0].item() == pytest.approx(pre.item(), rel=1e-12)
        for s in range(1, steps + 1):
            p = learner.adapt(sx, sy, s)
            assert curve[i, s].item() == pytest.approx(mse(p, qx, qy).item(), rel=1e-10)
    # Chunking does not change the numbers.
    torch.testing.assert_close(learner.adaptation_curve(batch, steps, chunk=2), curve, rtol=1e-12, atol=0)
    assert learner.adaptation_curve(batch, 0).shape == (5, 1)


# ----- construction and dtype moves ---------------------------------------------------------------------------


def test_learner_validation():
    with pytest.raises(ValueError):
        MAML(tiny_mlp(0), inner_steps=-1)
    with pytest.raises(ValueError):
        MAML(tiny_mlp(0), loss="hinge")


def test_learner_to_dtype():
    learner = MAMLEnhanced(tiny_mlp(46, dtype=torch.float32), inner_lr=0.1, inner_steps=2)
    assert all(v.dtype == torch.float32 for v in learner.meta_state.values())
    learner.to("cpu", F64)
    for tree in learner.state_tensors().values():
        for v in tree.values():
            assert v.dtype == F64
    gp, gm, _ = learner.meta_gradient(make_batch(47), 0)
    assert all(v.dtype == F64 for v in gp.values()) and all(v.dtype == F64 for v in gm.values())


def test_meta_gradient_does_not_mutate_state():
    learner = MAMLEnhanced(tiny_mlp(48), inner_lr=0.1, inner_steps=2)
    before = {k: v.clone() for k, v in {**learner.params, **learner.meta_state}.items()}
    learner.meta_gradient(make_batch(49), 0)
    after = {**learner.params, **learner.meta_state}
    assert_trees_close(after, before, rtol=0, atol=0)


# ----- torch.compile ---------------------------------------------------------------------------------------------
# Inductor's compiled MAML step against eager: tests/test_module.py (float32) and tests/test_matmul_orientation.py
# (float64, with the graph passes).

COMPILE_LEARNERS = {
    "enhanced": lambda m: MAMLEnhanced(m, inner_lr=0.1, inner_steps=2),
    "reptile": lambda m: Reptile(m, inner_lr=0.1, inner_steps=2, inner_batch=4),
}


@pytest.mark.parametrize("name", sorted(COMPILE_LEARNERS))
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_graph_capture_equals_eager(name):
    # The same capture (dynamo + AOTAutograd through grad/vmap) without inductor's code generation: fast.
    torch._dynamo.reset()
    model = tiny_mlp(52, dtype=torch.float32)
    eager = COMPILE_LEARNERS[name](copy.deepcopy(model))
    compiled = COMPILE_LEARNERS[name](copy.deepcopy(model))
    randomise_meta_state(eager, seed=53)
    randomise_meta_state(compiled, seed=53)
    compiled.compile(backend="aot_eager", fullgraph=True)
    batch = make_batch(54, dtype=torch.float32)
    gp_e, gm_e, m_e = eager.meta_gradient(batch, 0, gen(55))
    gp_c, gm_c, m_c = compiled.meta_gradient(batch, 0, gen(55))
    assert_trees_close(gp_c, gp_e, rtol=1e-5, atol=1e-6)
    assert_trees_close(gm_c, gm_e, rtol=1e-5, atol=1e-6)
    assert_trees_close(m_c, m_e, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
