"""Inner rules with state across inner steps (optax-style): inner Adam, chained with learned rules, first and
second order, vmap == loop == float64 central difference."""

from __future__ import annotations

import pytest
import torch
from meta_gradcheck import (
    assert_every_tensor_matches_central_differences,
    assert_first_order_matches_frozen_inner_gradients,
    assert_vmap_equals_loop,
)

from metagrad.algorithms import MAML, Reptile
from metagrad.inner import LSLR, SGD, Adam, Chain
from metagrad.models import MLP
from metagrad.tasks import Sinusoid

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_inner_adam_is_the_textbook_formula_with_bias_correction():
    g = {"w": torch.tensor([0.5, -2.0], dtype=F64)}
    for beta1 in (0.0, 0.9):
        rule = Adam(0.1, beta1=beta1, beta2=0.99, eps=1e-8)
        state = rule.init_state(g)
        m = v = torch.zeros(2, dtype=F64)
        for t in range(1, 4):
            grad = g["w"] * t
            update, state = rule.update_with_state({"w": grad}, state, {}, t - 1)
            m = beta1 * m + (1 - beta1) * grad
            v = 0.99 * v + 0.01 * grad**2
            expected = 0.1 * (m / (1 - beta1**t)) / ((v / (1 - 0.99**t)).sqrt() + 1e-8)
            torch.testing.assert_close(update["w"], expected, rtol=1e-12, atol=0)
        assert state["adam.t"].item() == 3
    with pytest.raises(TypeError, match="stateful"):
        Adam(0.1).update(g, 0, {})


def test_stateless_rules_pass_state_through_and_chains_merge_it():
    g = {"w": torch.ones(3)}
    rule = Chain(Adam(0.1), LSLR(0.5, steps=2))
    meta = rule.init(g)
    state = rule.init_state(g)
    assert set(state) == {"adam.v.w", "adam.t"}
    update, state = rule.update_with_state(g, state, meta, 0)
    # Adam's first step moves by lr (sign of g), then LSLR scales it by its rate 0.5
    torch.testing.assert_close(update["w"], torch.full((3,), 0.05), rtol=1e-5, atol=0)  # float32 exp(log 0.5)
    assert SGD(0.1).update_with_state(g, {"x": torch.zeros(())}, {}, 0)[1].keys() == {"x"}


RULES = {
    "adam": lambda: Adam(0.05, beta1=0.5),
    # A stateful rule chained with a learned one: the meta-gradient reaches LSLR's per-step rates through Adam's
    # normalised steps.
    "adam_lslr": lambda: Chain(Adam(0.05, beta1=0.5), LSLR(0.7, steps=3)),
}


def _maml_with(rule: str, vectorize: bool, first_order: bool) -> MAML:
    torch.manual_seed(0)
    model = MLP(1, (8, 8), 1, "tanh").double()
    learner = MAML(model, RULES[rule](), inner_steps=3, first_order=first_order, vectorize=vectorize)
    g = gen(2)
    for k, v in learner.meta_state.items():  # learned rates apart from their common start
        learner.meta_state[k] = v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
    return learner.double()


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("rule", list(RULES))
def test_maml_through_inner_adam_vmap_equals_loop_equals_central_difference(rule, first_order):
    batch = Sinusoid().sample(3, 5, 5, gen(0)).to("cpu", F64)
    vec, loop = _maml_with(rule, True, first_order), _maml_with(rule, False, first_order)
    gv, mv, _ = vec.meta_gradient(batch, 0)
    gl, ml, _ = loop.meta_gradient(batch, 0)
    assert loop.schedule(0)[1] == first_order and set(mv) == set(loop.meta_state)
    assert (rule == "adam_lslr") == bool(mv)  # LSLR's rates are learned
    assert_vmap_equals_loop({**gv, **mv}, {**gl, **ml}, rel=1e-10)
    # Each tensor on its own (a 1e-4 error in any one fails); first order with the inner gradients frozen, from
    # which Adam's moments are then recomputed.
    if first_order:
        assert_first_order_matches_frozen_inner_gradients(loop, batch, gv, mv)
    else:
        assert_every_tensor_matches_central_differences(loop, batch, gv, mv)


def test_reptile_takes_any_rule_and_keeps_its_state_in_extra_state():
    learner = Reptile(MLP(), Adam(0.01, beta1=0.9), inner_steps=2)
    assert {k.split(".")[1] for k in learner.extra_state if k != "adam.t"} == {"v", "m"}
    learner.backward(Sinusoid().sample(4, 5, 5, gen(0)))
    assert learner.extra_state["adam.t"].item() == 2
    assert all(learner.extra_state[f"adam.v.{k}"].abs().sum() > 0 for k in learner.fast)
    assert isinstance(learner.eval_rule, SGD)


def test_second_order_through_inner_adam_is_finite_where_an_inner_gradient_is_exactly_zero():
    torch.manual_seed(0)
    model = MLP(1, (8,), 1, "relu").double()
    with torch.no_grad():
        model[0].bias[:3] = -100.0  # dead units: their inner gradients are exactly 0
    learner = MAML(model, Adam(0.05), inner_steps=2)
    gp, _, _ = learner.meta_gradient(Sinusoid().sample(3, 5, 5, gen(0)).to("cpu", F64), 0)
    assert all(torch.isfinite(g).all() for g in gp.values())
