"""``learner.autocast``: mixed-precision forward passes inside the transforms (off by default; benchmarks/precision.py
measures how far it moves the meta-gradient), batch norms kept in float32."""

from __future__ import annotations

import torch

from metagrad import MAML, TaskBatch
from metagrad.models import Conv4
from metagrad.models.norm import _full_precision


def _learner() -> MAML:
    torch.manual_seed(0)
    return MAML(Conv4(ways=2, hidden=4, image_size=16), inner_lr=0.3, inner_steps=1, loss="cross_entropy")


def _batch() -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 8, 1, 16, 16, generator=g)
    y = torch.tensor([0, 1] * 4).expand(2, -1).clone()
    return TaskBatch(x[:, :4], y[:, :4], x[:, 4:], y[:, 4:])


def test_autocast_runs_the_network_in_bfloat16_and_returns_float32_gradients() -> None:
    plain, mixed = _learner(), _learner()
    mixed.autocast = torch.bfloat16
    g32 = plain.meta_gradient(_batch())[0]
    g16 = mixed.meta_gradient(_batch())[0]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in g16.values())
    flat32 = torch.cat([g32[k].flatten() for k in g32])
    flat16 = torch.cat([g16[k].flatten() for k in g32])
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.9  # the same gradient, roughly...
    assert (flat32 - flat16).norm() > 1e-4 * flat32.norm()  # ...computed in another precision
    assert mixed.network(dict(mixed.params), _batch().query_x[0]).dtype == torch.float32


def test_batch_norm_statistics_stay_in_float32_under_autocast() -> None:
    x = torch.randn(4, 3, 5, 5).bfloat16()
    assert _full_precision(x).dtype == torch.bfloat16  # no autocast: left as it is
    with torch.autocast("cpu", torch.bfloat16):
        assert _full_precision(x).dtype == torch.float32
        assert _full_precision(x.float()).dtype == torch.float32


def test_autocast_with_per_step_batch_norm_trains_and_tracks_float32_statistics() -> None:
    torch.manual_seed(0)
    model = Conv4(ways=2, hidden=4, image_size=16, bn="per_step", steps=1)
    learner = MAML(model, inner_lr=0.3, inner_steps=1, loss="cross_entropy")
    learner.autocast = torch.bfloat16
    learner.backward(_batch(), 0)  # backward() also folds the batch into the running statistics
    stats = dict(learner.model.named_buffers())
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in stats.values() if v.is_floating_point())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in stats.items() if k.endswith("running_mean"))
