"""iMAML: the CG meta-gradient against the exact implicit gradient (dense, float64), vmap == loop, evaluation on
the proximal problem, options and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, hessian

from metagrad.algorithms import IMAML, MAML
from metagrad.algorithms.imaml import conjugate_gradient
from metagrad.build import build_learner
from metagrad.config import load_config
from metagrad.errors import ConfigError
from metagrad.inner import Adam
from metagrad.inner.lslr import LSLR
from metagrad.models import MLP, Conv4
from metagrad.tasks import Sinusoid, TaskBatch

F64 = torch.float64


def tiny_mlp(seed: int = 0, hidden: tuple[int, ...] = (4,)) -> MLP:
    model = MLP(1, hidden, 1, "tanh").to(F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


def batch(b: int = 2, k: int = 5, q: int = 6, seed: int = 0) -> TaskBatch:
    return Sinusoid(amplitude=(0.5, 1.0)).sample(b, k, q, torch.Generator().manual_seed(seed)).to("cpu", F64)


def learner(steps: int = 150, lam: float = 2.0, cg_steps: int = 20, **kw) -> IMAML:
    # lr 0.15, λ = 2: gradient descent on these proximal problems reaches float64 precision in 150 steps.
    return IMAML(tiny_mlp(), inner_lr=0.15, inner_steps=steps, lam=lam, cg_steps=cg_steps, **kw)


def flat(d: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([d[k].reshape(-1) for k in names])


def unflat(v: torch.Tensor, like: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for k in names:
        n = like[k].numel()
        out[k] = v[i : i + n].reshape(like[k].shape)
        i += n
    return out


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def dense_implicit(lrn: IMAML, b: TaskBatch, loss=_mse, check=None) -> torch.Tensor:
    """The tasks' mean of (I + H/λ)⁻¹ ∇L_query at each task's inner solution φ (``lrn.solve_inner``), flat, with H
    the dense float64 Hessian of the support loss (``torch.func.hessian``: forward over reverse, where iMAML's
    Hessian-vector products are reverse over reverse). ``check(phi, support, a)`` sees each task's φ (flat), its
    support loss and I + H/λ."""
    theta = {k: v.detach() for k, v in lrn.params.items()}
    names = list(theta)
    expected = torch.zeros(sum(v.numel() for v in theta.values()), dtype=F64)
    for i in range(len(b)):
        phi = flat(lrn.solve_inner(theta, {}, b.support_x[i], b.support_y[i]), names)

        def support(v, i=i):
            return loss(functional_call(lrn.model, unflat(v, theta, names), (b.support_x[i],)), b.support_y[i])

        def query(v, i=i):
            return loss(functional_call(lrn.model, unflat(v, theta, names), (b.query_x[i],)), b.query_y[i])

        a = torch.eye(len(phi), dtype=F64) + hessian(support)(phi) / lrn.lam
        if check is not None:
            check(phi, support, a)
        expected += torch.linalg.solve(a, grad(query)(phi)) / len(b)
    return expected


def test_meta_gradient_matches_the_dense_implicit_gradient():
    """Inner problem solved to convergence, (I + H/λ) built and solved densely in float64: relative error < 1e-4."""
    lrn, b = learner(), batch()
    gp, _, _ = lrn.meta_gradient(b)
    names = list(lrn.params)
    theta = flat({k: v.detach() for k, v in lrn.params.items()}, names)

    def solved(phi, support, a):  # the inner problem is solved, so the implicit formula is exact
        assert (grad(support)(phi) + lrn.lam * (phi - theta)).abs().max() < 1e-10

    expected = dense_implicit(lrn, b, check=solved)
    got = flat(gp, names)
    assert ((got - expected).norm() / expected.norm()) < 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_meta_gradient_with_an_inner_adam_matches_the_dense_implicit_formula():
    """The inner problem solved by Adam (``algorithm.inner_optimizer = "adam"``): the implicit meta-gradient depends
    on the solution only, so the CG meta-gradient equals (I + H/λ)⁻¹ ∇L_query at the φ Adam reached."""
    lrn, b = IMAML(tiny_mlp(), Adam(0.05), inner_steps=40, lam=2.0, cg_steps=20), batch()
    gp, _, _ = lrn.meta_gradient(b)
    names = list(lrn.params)
    theta = flat({k: v.detach() for k, v in lrn.params.items()}, names)

    def moved(phi, support, a):
        assert (phi - theta).abs().max() > 1e-3

    torch.testing.assert_close(flat(gp, names), dense_implicit(lrn, b, check=moved), rtol=1e-8, atol=1e-12)


def test_conv4_meta_gradient_matches_the_dense_implicit_formula():
    """Through Conv-4's batch norms, ReLUs and max-pooling: the CG meta-gradient (one task at a time) equals the
    dense implicit formula at the same inner solution. λ = 100 makes I + H/λ positive definite here (H is
    indefinite through batch norm), so that 25 CG steps solve it."""
    torch.manual_seed(0)
    model = Conv4(ways=2, hidden=3, image_size=16).to(F64)
    g = torch.Generator().manual_seed(0)
    sx = torch.rand(2, 4, 1, 16, 16, generator=g, dtype=F64)
    qx = torch.rand(2, 4, 1, 16, 16, generator=g, dtype=F64)
    y = torch.tensor([0, 0, 1, 1]).expand(2, -1).clone()
    b = TaskBatch(sx, y, qx, y)
    lrn = IMAML(model, inner_lr=0.008, inner_steps=20, lam=100.0, cg_steps=25, loss="cross_entropy", vectorize=False)
    gp, _, _ = lrn.meta_gradient(b)

    def definite(phi, support, a):
        assert torch.linalg.eigvalsh(a).min() > 0.5

    expected = dense_implicit(lrn, b, torch.nn.functional.cross_entropy, definite)
    torch.testing.assert_close(flat(gp, list(lrn.params)), expected, rtol=1e-8, atol=1e-12)


def _converged_query_loss(lrn: IMAML, theta: dict[str, torch.Tensor], b: TaskBatch) -> torch.Tensor:
    losses = []
    for i in range(len(b)):
        phi = lrn.solve_inner(theta, {}, b.support_x[i], b.support_y[i])
        losses.append(lrn.loss(phi, b.query_x[i], b.query_y[i]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("adapt_only", [None, ["2."]], ids=["all", "last_layer"])
def test_meta_gradient_is_the_derivative_of_the_converged_query_loss(adapt_only):
    """Central difference of L_query(φ*(θ)) with φ* solved to convergence; with adapt_only, the layers the inner
    loop leaves alone get the mixed second-derivative term too."""
    lrn, b = learner(adapt_only=adapt_only), batch(seed=3)
    gp, _, _ = lrn.meta_gradient(b)
    theta = {k: v.detach() for k, v in lrn.params.items()}
    g = torch.Generator().manual_seed(5)
    d = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in theta.items()}
    h = 1e-5
    plus = _converged_query_loss(lrn, {k: v + h * d[k] for k, v in theta.items()}, b)
    minus = _converged_query_loss(lrn, {k: v - h * d[k] for k, v in theta.items()}, b)
    fd = (plus - minus) / (2 * h)
    analytic = sum((gp[k] * d[k]).sum() for k in d)
    torch.testing.assert_close(analytic, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("make", ["mlp", "conv4"])
def test_vmap_equals_loop(make):
    def build(vectorize: bool) -> tuple[IMAML, TaskBatch]:
        torch.manual_seed(0)
        if make == "mlp":
            return IMAML(tiny_mlp(hidden=(6, 6)), inner_lr=0.05, inner_steps=3, vectorize=vectorize), batch(3)
        # Conv-4 (transductive batch norm) through the Hessian-vector products: 1 step, 2 CG steps keep it quick.
        model = Conv4(ways=2, hidden=3, image_size=16).to(F64)
        g = torch.Generator().manual_seed(0)
        sx = torch.rand(2, 4, 1, 16, 16, generator=g, dtype=F64)
        qx = torch.rand(2, 4, 1, 16, 16, generator=g, dtype=F64)
        y = torch.tensor([0, 0, 1, 1]).expand(2, -1).clone()
        lrn = IMAML(model, inner_lr=0.3, inner_steps=1, cg_steps=2, loss="cross_entropy", vectorize=vectorize)
        return lrn, TaskBatch(sx, y, qx, y)

    (vec, b), (loop, _) = build(True), build(False)
    gv, _, mv = vec.meta_gradient(b)
    gl, _, ml = loop.meta_gradient(b)
    scale = max(v.abs().max() for v in gl.values())
    for k in gl:
        torch.testing.assert_close(gv[k], gl[k], rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(mv["loss"], ml["loss"])
    torch.testing.assert_close(vec.adaptation_curve(b, 2), loop.adaptation_curve(b, 2))


def test_conjugate_gradient_solves_a_dense_system_and_survives_a_zero_right_hand_side():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=F64)
    a = m @ m.T + torch.eye(6, dtype=F64)
    rhs = {"x": torch.randn(6, generator=g, dtype=F64)}
    x = conjugate_gradient(lambda v: {"x": a @ v["x"]}, rhs, 6)["x"]
    torch.testing.assert_close(x, torch.linalg.solve(a, rhs["x"]))
    zero = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": torch.zeros(6, dtype=F64)}, 3)["x"]
    assert torch.equal(zero, torch.zeros(6, dtype=F64))


def test_the_meta_gradient_depends_on_the_last_iterate_only():
    """Nothing of the inner loop is differentiated (why memory does not grow with the steps): the meta-gradient is
    that of the last iterate alone, so the same φ reached in more steps gives the same gradient."""
    lrn = learner()
    b = batch(1)
    theta = {k: v.detach() for k, v in lrn.params.items()}
    phi = lrn.solve_inner(theta, {}, b.support_x[0], b.support_y[0])
    g1, _, _ = lrn.meta_gradient(b)
    more = learner(steps=200)  # already converged at 150: the same φ, the same gradient
    g2, _, _ = more.meta_gradient(b)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-9, atol=1e-12)
    assert lrn.adapt(b.support_x[0], b.support_y[0]).keys() == phi.keys()


def test_evaluation_adapts_on_the_proximal_problem():
    """A strong proximal term (λ large) keeps the adapted weights near θ; plain SGD would move them further."""
    b = batch(1)
    strong = IMAML(tiny_mlp(), inner_lr=0.01, inner_steps=5, lam=50.0)
    plain = MAML(tiny_mlp(), inner_lr=0.01, inner_steps=5)
    theta = {k: v.detach() for k, v in strong.params.items()}

    def moved(lrn) -> float:
        phi = lrn.adapt(b.support_x[0], b.support_y[0])
        return sum(((phi[k] - theta[k]) ** 2).sum() for k in theta).item()

    assert 0 < moved(strong) < 0.5 * moved(plain)
    curve = strong.adaptation_curve(b, 3)
    assert curve.shape == (1, 4) and torch.isfinite(curve).all()


def test_options_are_checked():
    with pytest.raises(ConfigError, match="lam"):
        IMAML(tiny_mlp(), lam=0.0)
    with pytest.raises(ConfigError, match="cg_steps"):
        IMAML(tiny_mlp(), cg_steps=0)
    with pytest.raises(ConfigError, match="per_step"):
        IMAML(Conv4(ways=2, hidden=3, image_size=16, bn="per_step", steps=2), loss="cross_entropy")
    with pytest.raises(ConfigError, match="learned tensors"):
        IMAML(tiny_mlp(), LSLR(0.1, 2))
    for bad in ("algorithm.lam=0", "algorithm.cg_steps=0", "algorithm.cg_damping=-1", "algorithm.inner_steps=0",
                "algorithm.inner_optimizer=rmsprop"):  # fmt: skip
        with pytest.raises(ConfigError):
            load_config(None, ["algorithm.name=imaml", bad])
    built = build_learner(load_config(None, ["algorithm.name=imaml", "algorithm.lam=0.5", "algorithm.cg_steps=3",
                                             "algorithm.cg_damping=0.1"]))  # fmt: skip
    assert (built.lam, built.cg_steps, built.cg_damping) == (0.5, 3, 0.1)


def test_damping_changes_the_solve():
    b = batch(1)
    g0, _, _ = learner(steps=5).meta_gradient(b)
    g1, _, _ = learner(steps=5, cg_damping=0.5).meta_gradient(b)
    assert not torch.allclose(g0["0.weight"], g1["0.weight"])


def test_vectorize_k_differentiates_k_tasks_at_a_time():
    """vectorize=k: chunks of k tasks (memory of one chunk), the same meta-gradient and metrics as all at once."""
    b = batch(5)
    whole = IMAML(tiny_mlp(hidden=(6, 6)), inner_lr=0.05, inner_steps=3, vectorize=True)
    chunked = IMAML(tiny_mlp(hidden=(6, 6)), inner_lr=0.05, inner_steps=3, vectorize=2)
    sizes = []
    map_tasks = chunked.map_tasks

    def spy(fn, shared, tasks):
        sizes.append(tasks[0].shape[0])
        return map_tasks(fn, shared, tasks)

    chunked.map_tasks = spy
    gw, _, mw = whole.meta_gradient(b)
    gc, _, mc = chunked.meta_gradient(b)
    assert sizes == [2, 2, 1]
    for k in gw:
        torch.testing.assert_close(gc[k], gw[k], rtol=1e-12, atol=1e-14)
    for k in mw:
        torch.testing.assert_close(mc[k], mw[k], rtol=1e-12, atol=1e-14)


def test_compiled_meta_gradient_is_one_graph_and_the_eager_one():
    """The inner solve (with the line search), the Hessian-vector products and CG are branch-free: compiled, the
    implicit meta-gradient is one graph, in float64 the eager one (AOTAutograd's capture, as Inductor gets it)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = (learner(steps=2, cg_steps=2, line_search=1) for _ in range(2))
    compiled.compile(backend="aot_eager", fullgraph=True)
    b = batch()
    (ge, _, me), (gc, _, mc) = eager.meta_gradient(b), compiled.meta_gradient(b)
    assert counters["stats"]["unique_graphs"] == 1
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=1e-12, atol=1e-14, msg=k)
    torch.testing.assert_close(mc["loss"], me["loss"], rtol=1e-12, atol=0)


def _proximal_objective(lrn: IMAML, phi: dict, theta: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(lrn.inner_objective(theta, {k: phi[k] for k in lrn.fast}, x, y, 0, theta))


def test_line_search_never_increases_the_proximal_objective_where_fixed_steps_diverge():
    """Inner lr 2.0 on a task with amplitude up to 5 overshoots: plain steps blow up the proximal objective,
    backtracking (the longest of lr, lr/2, ... that satisfies Armijo's condition) decreases it at every step."""
    b = Sinusoid(amplitude=(4.0, 5.0)).sample(1, 10, 5, torch.Generator().manual_seed(3)).to("cpu", F64)
    x, y = b.support_x[0], b.support_y[0]
    plain = IMAML(tiny_mlp(hidden=(8,)), inner_lr=2.0, inner_steps=1, lam=1.0)
    searched = IMAML(tiny_mlp(hidden=(8,)), inner_lr=2.0, inner_steps=1, lam=1.0, line_search=12)
    theta = {k: v.detach() for k, v in plain.params.items()}
    start = _proximal_objective(plain, theta, theta, x, y)
    values = {}
    for name, lrn in (("plain", plain), ("searched", searched)):
        phi, trace = theta, [start]
        for _ in range(6):
            phi, _ = lrn.inner_step(phi, {}, x, y, 0, lrn.rule, True, None, theta)
            trace.append(_proximal_objective(lrn, phi, theta, x, y))
        values[name] = trace
    assert values["plain"][-1] > 10 * start  # the fixed step diverges on this task
    assert all(b < a for a, b in zip(values["searched"], values["searched"][1:], strict=False))


def test_line_search_is_a_no_op_where_the_full_step_is_accepted_and_matches_vmap():
    """Small steps pass Armijo's test at once: the same iterates as without the search. With a step that needs
    shortening on some tasks and not others, vmap equals the loop (the search is per task)."""
    b = batch(3)
    g0, _, _ = learner(steps=5).meta_gradient(b)
    g1, _, _ = learner(steps=5, line_search=4).meta_gradient(b)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-12, atol=1e-14)
    big = Sinusoid(amplitude=(0.5, 5.0)).sample(4, 10, 5, torch.Generator().manual_seed(4)).to("cpu", F64)

    def run(vectorize: bool, lr: float = 1.0, steps: int = 3) -> dict:
        lrn = IMAML(tiny_mlp(hidden=(6,)), inner_lr=lr, inner_steps=steps, lam=1.0, line_search=6, vectorize=vectorize)
        return lrn.meta_gradient(big)[0]

    for lr, steps in ((1.0, 3), (0.3, 1)):  # at lr 0.3 one task halves its first step and three take it whole
        gv, gl = run(True, lr, steps), run(False, lr, steps)
        for k in gl:
            torch.testing.assert_close(gv[k], gl[k], rtol=1e-10, atol=1e-12)
    gl = run(False)
    plain = IMAML(tiny_mlp(hidden=(6,)), inner_lr=1.0, inner_steps=3, lam=1.0).meta_gradient(big)[0]
    assert not torch.allclose(plain["0.weight"], gl["0.weight"])  # the search did shorten steps here
    lrn = IMAML(tiny_mlp(hidden=(6,)), inner_lr=0.3, inner_steps=1, lam=1.0, line_search=6)
    theta = {k: v.detach() for k, v in lrn.params.items()}
    moved = []
    for i in range(len(big)):
        x, y = big.support_x[i], big.support_y[i]
        phi, _ = lrn.inner_step(theta, {}, x, y, 0, lrn.rule, True, None, theta)
        g = grad(lambda a, x=x, y=y: lrn.inner_objective(theta, a, x, y, 0, theta))(theta)
        moved.append(float((theta["0.weight"] - phi["0.weight"]).norm() / g["0.weight"].norm()))  # lr · t
    assert len({round(t, 6) for t in moved}) > 1  # a different step length on different tasks
    with pytest.raises(ConfigError, match="line_search"):
        IMAML(tiny_mlp(), line_search=-1)
    with pytest.raises(ConfigError, match="line_search"):
        load_config(None, ["algorithm.name=imaml", "algorithm.line_search=-1"])
