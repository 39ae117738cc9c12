"""The learner's cached parameter index follows every structural change of the network, and the module API that
reads it (``zero_grad``, ``backward``, ``meta_gradient``) sees the network as it is now."""

from __future__ import annotations

import torch
from torch import nn

from metagrad import MAML, MetaSGD, TaskBatch
from metagrad.named import ParameterIndex


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))


def _batch(tasks: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, 4, 1, generator=g)
    return TaskBatch(x, torch.sin(x), x + 0.5, torch.sin(x + 0.5))


def test_index_equals_named_parameters_after_every_structural_change() -> None:
    net = _net()
    index = ParameterIndex(net)

    def same() -> None:
        expected = dict(net.named_parameters())
        got = index()
        assert list(got) == list(expected)
        assert all(got[k] is expected[k] for k in expected)

    same()
    net[0].weight = nn.Parameter(torch.zeros(8, 1))  # a parameter replaced
    same()
    net.append(nn.Linear(1, 1))  # a submodule added
    same()
    del net[3]  # a submodule deleted
    same()
    net[2].bias = None  # a parameter removed
    same()
    net[2].register_parameter("extra", nn.Parameter(torch.ones(2)))  # one added
    same()
    net[0] = nn.Linear(1, 8)  # a submodule replaced in place of another
    same()
    state = {k: v.clone() for k, v in _net().state_dict().items()}
    fresh = _net()
    index = ParameterIndex(fresh)
    index()
    fresh.load_state_dict(state, assign=True)  # new Parameter objects
    assert all(index()[k] is v for k, v in fresh.named_parameters())
    before = index()
    fresh.double()  # in place: the same objects, nothing to rebuild
    assert index() is before and index()["0.weight"].dtype == torch.float64


def test_index_follows_renames_and_copies() -> None:
    import copy

    net = _net()
    index = ParameterIndex(net)
    index()
    net.add_module("head", net._modules.pop("2"))  # renamed: the same objects in the same order
    assert list(index()) == list(dict(net.named_parameters())) and "head.weight" in index()
    p = net[0]._parameters
    p["bias"], p["weight"] = p.pop("weight"), p.pop("bias")  # names swapped between the same two objects
    assert all(index()[k] is v for k, v in net.named_parameters())
    learner = MAML(_net(), inner_lr=0.1, inner_steps=1, vectorize=False)
    learner.backward(_batch(), 0)
    for twin in (copy.deepcopy(learner),):  # (a learner does not pickle: its adapt_only selector is a closure)
        twin.zero_grad()
        twin.backward(_batch(), 0)
        assert all(p.grad is not None for p in twin.model.parameters())
        assert all(a is not b for a, b in zip(twin.model.parameters(), learner.model.parameters(), strict=True))
        torch.testing.assert_close(twin.model[0].weight.grad, learner.model[0].weight.grad)


def test_module_api_sees_a_replaced_parameter() -> None:
    learner = MAML(_net(), inner_lr=0.1, inner_steps=1, vectorize=False)
    batch = _batch()
    learner.backward(batch, 0)
    replaced = nn.Parameter(learner.model[2].weight.detach().clone())
    learner.model[2].weight = replaced
    learner.zero_grad()
    learner.backward(batch, 0)
    assert replaced.grad is not None  # the new parameter, not the old one, got the meta-gradient
    gp, _, _ = learner.meta_gradient(batch, 0)
    torch.testing.assert_close(gp["2.weight"], replaced.grad)


def test_zero_grad_clears_the_rules_learned_tensors_too() -> None:
    learner = MetaSGD(_net(), inner_lr=0.1, inner_steps=1, vectorize=False)
    learner.backward(_batch(), 0)
    assert all(p.grad is not None for p in learner.parameters())
    learner.zero_grad()
    assert all(p.grad is None for p in learner.parameters())
    learner.backward(_batch(), 0)
    learner.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in learner.parameters())
