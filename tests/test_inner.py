"""Inner-loop update rules: SGD, LSLR, Meta-SGD, Meta-Curvature and their composition."""

from __future__ import annotations

import math

import pytest
import torch

from metagrad.inner import LSLR, SGD, Chain, Curvature, InnerRule, MetaSGD
from metagrad.inner.rates import decode_rate, encode_rate

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=F64)


def randomise(meta: dict[str, torch.Tensor], seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in meta.items()}


def mlp_like_params() -> dict[str, torch.Tensor]:
    return {
        "0.weight": rand(4, 3, seed=1),
        "0.bias": rand(4, seed=2),
        "2.weight": rand(2, 4, seed=3),
        "2.bias": rand(2, seed=4),
    }


# ----- SGD -------------------------------------------------------------------------------------------------


def test_sgd_scales_by_lr():
    g = mlp_like_params()
    rule = SGD(0.37)
    assert rule.init(g) == {}
    for step in (0, 3):
        out = rule.update(g, step, {})
        assert set(out) == set(g)
        for k in g:
            torch.testing.assert_close(out[k], 0.37 * g[k], rtol=0, atol=0)


def test_sgd_zero_lr_allowed():
    out = SGD(0.0).update({"w": rand(3, seed=0)}, 0, {})
    assert torch.equal(out["w"], torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("lr", [-0.01, float("nan"), float("inf")])
def test_sgd_invalid_lr_raises(lr):
    with pytest.raises(ValueError):
        SGD(lr)


# ----- rate encoding --------------------------------------------------------------------------------------


def test_rate_encoding_roundtrip():
    like = torch.zeros(1, dtype=F64)
    stored = encode_rate(0.05, (3,), "log", like)
    assert stored.dtype == F64 and stored.shape == (3,)
    torch.testing.assert_close(stored, torch.full((3,), math.log(0.05), dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(decode_rate(stored, "log"), torch.full((3,), 0.05, dtype=F64))
    raw = encode_rate(0.05, (2, 2), "raw", like)
    assert torch.equal(raw, torch.full((2, 2), 0.05, dtype=F64))
    assert torch.equal(decode_rate(raw, "raw"), raw)


@pytest.mark.parametrize("lr, par", [(0.0, "log"), (-0.1, "raw"), (float("nan"), "log"), (0.1, "exp")])
def test_rate_encoding_invalid(lr, par):
    with pytest.raises(ValueError):
        encode_rate(lr, (1,), par, torch.zeros(1))


# ----- LSLR ------------------------------------------------------------------------------------------------


def test_lslr_init_log_parameterisation():
    params = mlp_like_params()
    rule = LSLR(0.02, 4)
    meta = rule.init(params)
    assert set(meta) == {f"lslr.{k}" for k in params}
    for k, v in meta.items():
        assert v.shape == (4,)
        assert v.dtype == F64
        torch.testing.assert_close(v, torch.full((4,), math.log(0.02), dtype=F64), rtol=0, atol=0)
        torch.testing.assert_close(rule.rates(meta, k[len("lslr.") :]), torch.full((4,), 0.02, dtype=F64))


def test_lslr_update_at_init_equals_sgd():
    params = mlp_like_params()
    rule = LSLR(0.02, 3, beyond="last")
    meta = rule.init(params)
    for step in range(5):
        out = rule.update(params, step, meta)
        for k in params:
            torch.testing.assert_close(out[k], 0.02 * params[k], rtol=1e-14, atol=0)


def lslr_distinct_rates(rule: LSLR, params) -> tuple[dict, dict]:
    """Distinct log-stored rates for every tensor and step: (decoded rates, meta)."""
    meta = rule.init(params)
    rates = {k: torch.tensor([0.1, 0.2, 0.3], dtype=F64) * (i + 1) for i, k in enumerate(sorted(meta))}
    return rates, {k: rates[k].log() for k in meta}


@pytest.mark.parametrize("beyond", ["stop", "last"])
def test_lslr_per_step_selection(beyond):
    params = mlp_like_params()
    rule = LSLR(0.02, 3, beyond=beyond)
    rates, meta = lslr_distinct_rates(rule, params)
    for step in range(3):
        out = rule.update(params, step, meta)
        for k in params:
            expect = rates[f"lslr.{k}"][step] * params[k]
            torch.testing.assert_close(out[k], expect, rtol=1e-14, atol=0)


def test_lslr_beyond_last_reuses_last_rate():
    params = mlp_like_params()
    rule = LSLR(0.02, 3, beyond="last")
    rates, meta = lslr_distinct_rates(rule, params)
    for step in (3, 4, 10):
        out = rule.update(params, step, meta)
        for k in params:
            torch.testing.assert_close(out[k], rates[f"lslr.{k}"][2] * params[k], rtol=1e-14, atol=0)


def test_lslr_beyond_stop_is_the_default_and_stops_adaptation():
    params = mlp_like_params()
    rule = LSLR(0.02, 3)
    assert rule.beyond == "stop"
    rates, meta = lslr_distinct_rates(rule, params)
    torch.testing.assert_close(rule.update(params, 2, meta)["0.weight"], rates["lslr.0.weight"][2] * params["0.weight"])
    for step in (3, 4, 10):
        out = rule.update(params, step, meta)
        assert set(out) == set(params)
        for k in params:
            assert out[k].shape == params[k].shape
            assert torch.equal(out[k], torch.zeros_like(params[k]))


def test_lslr_raw_parameterisation():
    params = mlp_like_params()
    rule = LSLR(0.05, 2, parameterization="raw", beyond="last")
    meta = rule.init(params)
    for v in meta.values():
        assert torch.equal(v, torch.full((2,), 0.05, dtype=F64))
    meta = {k: torch.tensor([0.5, -0.25], dtype=F64) for k in meta}
    for step, r in [(0, 0.5), (1, -0.25), (4, -0.25)]:
        out = rule.update(params, step, meta)
        for k in params:
            torch.testing.assert_close(out[k], r * params[k], rtol=0, atol=0)


def test_lslr_per_layer_shares_key_between_weight_and_bias():
    params = mlp_like_params()
    rule = LSLR(0.1, 2, per_layer=True)
    meta = rule.init(params)
    assert set(meta) == {"lslr.0", "lslr.2"}
    assert rule.key("0.weight") == rule.key("0.bias") == "lslr.0"
    assert rule.key("2.weight") == "lslr.2"
    meta = {"lslr.0": torch.tensor([0.5, 0.7], dtype=F64).log(), "lslr.2": torch.tensor([3.0, 4.0]).double().log()}
    out = rule.update(params, 1, meta)
    torch.testing.assert_close(out["0.weight"], 0.7 * params["0.weight"])
    torch.testing.assert_close(out["0.bias"], 0.7 * params["0.bias"])
    torch.testing.assert_close(out["2.weight"], 4.0 * params["2.weight"])
    torch.testing.assert_close(out["2.bias"], 4.0 * params["2.bias"])


def test_lslr_per_tensor_keys_are_distinct():
    rule = LSLR(0.1, 2)
    assert rule.key("0.weight") != rule.key("0.bias")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1, "steps": 0},
        {"lr": -0.1, "steps": 2},
        {"lr": 0.0, "steps": 2},
        {"lr": 0.1, "steps": 2, "parameterization": "softplus"},
        {"lr": 0.1, "steps": 2, "beyond": "first"},
    ],
)
def test_lslr_invalid_raises(kwargs):
    with pytest.raises(ValueError):
        LSLR(**kwargs)


def test_lslr_gradient_flows_to_rates():
    params = mlp_like_params()
    rule = LSLR(0.1, 2)
    meta = {k: v.clone().requires_grad_() for k, v in rule.init(params).items()}
    out = rule.update(params, 1, meta)
    out["0.weight"].sum().backward()
    g = meta["lslr.0.weight"].grad
    # d/dlogr (r * sum G) = r * sum G, only for the step used.
    torch.testing.assert_close(g, torch.tensor([0.0, 0.1 * params["0.weight"].sum().item()], dtype=F64))
    assert meta["lslr.0.bias"].grad is None


# ----- Meta-SGD ---------------------------------------------------------------------------------------------


def test_metasgd_init_shapes_and_values():
    params = mlp_like_params()
    meta = MetaSGD(0.03).init(params)
    assert set(meta) == {f"metasgd.{k}" for k in params}
    for k, p in params.items():
        v = meta[f"metasgd.{k}"]
        assert v.shape == p.shape and v.dtype == p.dtype
        torch.testing.assert_close(v, torch.full(p.shape, math.log(0.03), dtype=F64), rtol=0, atol=0)


def test_metasgd_elementwise_log_rates():
    params = mlp_like_params()
    grads = {k: rand(*p.shape, seed=10 + i) for i, (k, p) in enumerate(params.items())}
    rule = MetaSGD(0.03)
    meta = randomise(rule.init(params), seed=5, scale=1.0)
    for step in (0, 7):
        out = rule.update(grads, step, meta)
        for k in params:
            torch.testing.assert_close(out[k], meta[f"metasgd.{k}"].exp() * grads[k], rtol=1e-14, atol=0)
    # Element-wise: one entry's rate only affects that entry.
    meta2 = dict(meta)
    meta2["metasgd.0.weight"] = meta["metasgd.0.weight"].clone()
    meta2["metasgd.0.weight"][1, 2] += math.log(2.0)
    a, b = rule.update(grads, 0, meta)["0.weight"], rule.update(grads, 0, meta2)["0.weight"]
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[1, 2] = True
    assert torch.equal(a[~mask], b[~mask])
    torch.testing.assert_close(b[1, 2], 2 * a[1, 2])


def test_metasgd_raw_parameterisation():
    params = mlp_like_params()
    rule = MetaSGD(0.03, parameterization="raw")
    meta = rule.init(params)
    assert torch.equal(meta["metasgd.0.bias"], torch.full((4,), 0.03, dtype=F64))
    meta = randomise(meta, seed=2)
    out = rule.update(params, 0, meta)
    for k in params:
        torch.testing.assert_close(out[k], meta[f"metasgd.{k}"] * params[k], rtol=0, atol=0)


@pytest.mark.parametrize("lr, par", [(0.0, "log"), (-1.0, "raw"), (0.1, "other")])
def test_metasgd_invalid_raises(lr, par):
    with pytest.raises(ValueError):
        MetaSGD(lr, parameterization=par)


# ----- Meta-Curvature -------------------------------------------------------------------------------------


def test_curvature_init_keys_and_identity():
    params = {"lin.weight": rand(5, 3, seed=0), "lin.bias": rand(5, seed=1), "conv.weight": rand(4, 2, 3, 2, seed=2)}
    meta = Curvature().init(params)
    assert set(meta) == {
        "curvature.lin.weight.out",
        "curvature.lin.weight.in",
        "curvature.lin.bias.vec",
        "curvature.conv.weight.out",
        "curvature.conv.weight.in",
        "curvature.conv.weight.f",
    }
    assert torch.equal(meta["curvature.lin.weight.out"], torch.eye(5, dtype=F64))
    assert torch.equal(meta["curvature.lin.weight.in"], torch.eye(3, dtype=F64))
    assert torch.equal(meta["curvature.lin.bias.vec"], torch.ones(5, dtype=F64))
    assert torch.equal(meta["curvature.conv.weight.out"], torch.eye(4, dtype=F64))
    assert torch.equal(meta["curvature.conv.weight.in"], torch.eye(2, dtype=F64))
    assert torch.equal(meta["curvature.conv.weight.f"], torch.eye(6, dtype=F64))
    for v in meta.values():
        assert v.dtype == F64


def test_curvature_identity_returns_gradient_unchanged():
    params = {"lin.weight": rand(5, 3, seed=0), "lin.bias": rand(5, seed=1), "conv.weight": rand(4, 2, 3, 2, seed=2)}
    rule = Curvature()
    meta = rule.init(params)
    out = rule.update(params, 0, meta)
    for k in params:
        assert out[k].shape == params[k].shape
        torch.testing.assert_close(out[k], params[k], rtol=0, atol=0)


def test_curvature_linear_matches_dense_kronecker():
    g = rand(5, 3, seed=0)
    m_out, m_in = rand(5, 5, seed=1), rand(3, 3, seed=2)
    rule = Curvature()
    out = rule.update({"w": g}, 0, {"curvature.w.out": m_out, "curvature.w.in": m_in})["w"]
    assert out.shape == (5, 3)
    torch.testing.assert_close(out, m_out @ g @ m_in, rtol=1e-12, atol=1e-12)
    dense = torch.kron(m_out, m_in.T.contiguous())  # acts on the row-major vec(G)
    torch.testing.assert_close(out.reshape(-1), dense @ g.reshape(-1), rtol=1e-12, atol=1e-12)
    # Not symmetric in the factors: swapping the transpose gives a different answer.
    assert not torch.allclose(out.reshape(-1), torch.kron(m_out, m_in) @ g.reshape(-1))


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (3, 2, 5), (2, 3, 2, 2, 2)])
def test_curvature_conv_matches_dense_kronecker(shape):
    o, i = shape[:2]
    f = math.prod(shape[2:])
    g = rand(*shape, seed=0)
    m_out, m_in, m_f = rand(o, o, seed=1), rand(i, i, seed=2), rand(f, f, seed=3)
    meta = {"curvature.c.out": m_out, "curvature.c.in": m_in, "curvature.c.f": m_f}
    out = Curvature().update({"c": g}, 0, meta)["c"]
    assert out.shape == g.shape
    # (M_out ⊗ M_inᵀ ⊗ M_fᵀ) acting on the row-major vec(G), as documented.
    dense = torch.kron(m_out, torch.kron(m_in.T.contiguous(), m_f.T.contiguous()))
    torch.testing.assert_close(out.reshape(-1), dense @ g.reshape(-1), rtol=1e-12, atol=1e-12)
    # Independent loop form of the mode products.
    flat = g.reshape(o, i, f)
    ref = torch.zeros(o, i, f, dtype=F64)
    for a in range(o):
        for b in range(i):
            for c in range(f):
                ref[a, b, c] = (m_out[a, :, None, None] * flat * m_in.T[b, None, :, None] * m_f.T[c]).sum()
    torch.testing.assert_close(out.reshape(o, i, f), ref, rtol=1e-12, atol=1e-12)


def test_curvature_vector_is_elementwise():
    g = rand(6, seed=0)
    v = rand(6, seed=1)
    out = Curvature().update({"b": g}, 3, {"curvature.b.vec": v})["b"]
    torch.testing.assert_close(out, v * g, rtol=0, atol=0)


def test_curvature_shared_by_all_steps():
    params = mlp_like_params()
    rule = Curvature()
    meta = randomise(rule.init(params), seed=3)
    a, b = rule.update(params, 0, meta), rule.update(params, 4, meta)
    for k in params:
        assert torch.equal(a[k], b[k])
        assert not torch.allclose(a[k], params[k])


# ----- Chain -------------------------------------------------------------------------------------------------


def test_chain_curvature_then_lslr():
    params = mlp_like_params()
    grads = {k: rand(*p.shape, seed=20 + i) for i, (k, p) in enumerate(params.items())}
    curv, lslr = Curvature(), LSLR(0.01, 3, beyond="last")
    rule = Chain(curv, lslr)
    meta = rule.init(params)
    assert set(meta) == set(curv.init(params)) | set(lslr.init(params))
    meta = randomise(meta, seed=8)
    for step in (0, 2, 5):
        out = rule.update(grads, step, meta)
        mc = curv.update(grads, step, meta)
        s = min(step, 2)
        for k in params:
            rate = meta[f"lslr.{k}"][s].exp()
            torch.testing.assert_close(out[k], rate * mc[k], rtol=1e-13, atol=1e-15)
            assert not torch.allclose(out[k], rate * grads[k])
    w = grads["0.weight"]
    expect = meta["lslr.0.weight"][1].exp() * (meta["curvature.0.weight.out"] @ w @ meta["curvature.0.weight.in"])
    torch.testing.assert_close(rule.update(grads, 1, meta)["0.weight"], expect)


def test_chain_applies_in_order():
    class Add(InnerRule):
        def __init__(self, c: float) -> None:
            self.c = c

        def update(self, grads, step, meta):
            return {k: g + self.c for k, g in grads.items()}

    x = {"w": torch.tensor([1.0], dtype=F64)}
    # (x + 1) * 3 vs x * 3 + 1
    assert Chain(Add(1.0), SGD(3.0)).update(x, 0, {})["w"].item() == 6.0
    assert Chain(SGD(3.0), Add(1.0)).update(x, 0, {})["w"].item() == 4.0


def test_chain_duplicate_keys_raise():
    params = mlp_like_params()
    with pytest.raises(ValueError):
        Chain(LSLR(0.1, 2), LSLR(0.2, 3)).init(params)
    with pytest.raises(ValueError):
        Chain(Curvature(), Curvature()).init(params)
    # Distinct rules compose fine.
    assert len(Chain(Curvature(), MetaSGD(0.1)).init(params)) == 6 + 4


def test_chain_needs_a_rule():
    with pytest.raises(ValueError):
        Chain()


def test_base_rule_update_not_implemented():
    with pytest.raises(NotImplementedError):
        InnerRule().update({}, 0, {})
    assert InnerRule().init({"w": torch.zeros(1)}) == {}
