"""The house check of a meta-gradient, shared by the test files: vmap == loop, and each tensor against its own
float64 central difference of the meta-loss (first order: with the inner gradients frozen)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from metagrad.algorithms.base import MetaLearner
from metagrad.tasks.base import TaskBatch


@contextlib.contextmanager
def one_task_at_a_time(learner: MetaLearner):
    """The reference meta-losses of a central difference, one task at a time on this thread: they check the
    meta-gradient, not the task threads (whose own tests compare them bit for bit), and forward passes of tiny
    float64 networks gain nothing from threads."""
    task_threads, learner.task_threads = learner.task_threads, 1
    try:
        yield
    finally:
        learner.task_threads = task_threads


def assert_vmap_equals_loop(vec: dict, loop: dict, rel: float = 1e-9) -> float:
    """Every entry of ``vec`` equals ``loop``'s to ``rel`` of the largest entry; returns that largest entry."""
    scale = max(g.abs().max() for g in loop.values())
    for k in loop:
        torch.testing.assert_close(vec[k], loop[k], rtol=0, atol=rel * scale, msg=lambda m, k=k: f"{k}: {m}")
    return float(scale)


def assert_every_tensor_matches_central_differences(
    learner: MetaLearner, batch: TaskBatch, gp: dict, gm: dict, *, seed: int = 3, h: float = 1e-6,
    rtol: float = 1e-6, atol: float = 1e-9,
    randomness: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> None:  # fmt: skip
    """Each tensor's own directional derivative (a unit direction in that tensor alone, see :func:`_every_tensor`)
    equals a float64 central difference of the meta-loss to ``rtol``: a wrong derivative in a tensor whose gradient
    is small beside the others' is caught too, which one direction through all of them cannot promise. Two
    meta-losses a tensor, more at a kink. ``randomness``: the context each meta-loss runs in (a seeded one, for
    dropout: the same masks every time)."""
    weights, first_order = learner.schedule(0)
    tasks = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)

    def meta_loss(p: dict, m: dict) -> torch.Tensor:
        with torch.no_grad(), randomness(), one_task_at_a_time(learner):
            return learner.meta_loss(p, m, tasks, weights, first_order)[0]

    _every_tensor(learner, meta_loss, {**gp, **gm}, seed, h, rtol, atol)


def assert_first_order_matches_frozen_inner_gradients(
    learner: MetaLearner, batch: TaskBatch, gp: dict, gm: dict, *, seed: int = 3, h: float = 1e-6,
    rtol: float = 1e-6, atol: float = 1e-9,
    randomness: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> None:  # fmt: skip
    """A first-order meta-gradient (``learner`` trains first order; its tasks run one after another) equals, tensor
    by tensor, float64 central differences of the meta-loss with every inner gradient frozen at its value at the
    learner's own weights: the inner rule's updates are replayed from the recorded gradients (their dependence on
    the rule's learned tensors, e.g. learned rates, stays), which is what first order differentiates.
    ``randomness``: as :func:`assert_every_tensor_matches_central_differences`'s (also around the recording)."""
    weights, first_order = learner.schedule(0)
    assert first_order and not learner.vmapped, "a first-order learner running its tasks in a loop"
    tasks = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    rule, recorded, replay = learner.rule, [], []
    update = rule.update_with_state

    def frozen(grads: dict, state: dict, meta: dict, step: int) -> tuple[dict, dict]:
        if recording:
            recorded.append({k: v.detach() for k, v in grads.items()})
        else:  # the recorded inner gradients, in the order they were taken
            grads = replay.pop(0)
        return update(grads, state, meta, step)

    rule.update_with_state = frozen
    # The replay follows the order the gradients were taken in: one task at a time (not side by side on threads).
    task_threads, learner.task_threads = learner.task_threads, 1
    try:
        recording = True
        with torch.no_grad(), randomness():
            learner.meta_loss(dict(learner.params), dict(learner.meta_state), tasks, weights, True)
        recording = False
        assert recorded, "the inner rule was called"

        def meta_loss(p: dict, m: dict) -> torch.Tensor:
            replay[:] = recorded
            with torch.no_grad(), randomness():
                out = learner.meta_loss(p, m, tasks, weights, True)[0]
            assert not replay, "every recorded inner gradient replayed"
            return out

        _every_tensor(learner, meta_loss, {**gp, **gm}, seed, h, rtol, atol)
    finally:
        del rule.update_with_state
        learner.task_threads = task_threads


RESOLVED = 3e-5  # a tensor's gradient norm above which its check must resolve a 1e-4 relative error
# The gradient's share of each direction tried in turn: a kink that the gradient points at is crossed by every
# direction that leans on the gradient, so the later ones lean less.
LEANS = (1.0, 0.5, 0.25, 0.0)


def _every_tensor(
    learner: MetaLearner, meta_loss: Callable[[dict, dict], torch.Tensor], grads: dict, seed: int, h: float,
    rtol: float, atol: float,
) -> None:  # fmt: skip
    """Each tensor of ``grads`` (which must be every tensor the meta-step trains) against a central difference of
    ``meta_loss`` along a unit direction in that tensor alone: half a random direction, half the gradient's own,
    so that the directional derivative is about the gradient's norm and a relative error of 1e-4 in the tensor
    shows above the tolerance. Asserted, for every tensor whose gradient norm exceeds ``RESOLVED`` (below it,
    atol hides such an error: a conv bias that batch norm cancels, whose gradient is rounding).

    A network of ReLUs and max-pooling has a meta-loss that is smooth only piecewise, and second order even jumps
    where an inner gradient does. Where the central difference disagrees, the one at h / 2 tells a kink between
    -h and h (the two disagree too) from a wrong derivative (they agree): at a kink the differences at h / 10
    and h / 20 are tried, then another direction, leaning less on the gradient (``LEANS``)."""
    params, meta = dict(learner.params), dict(learner.meta_state)
    trained = set(learner.trainable) | {k for k, v in meta.items() if v.requires_grad}
    assert set(grads) == trained, f"gradients for {sorted(set(grads) ^ trained)} missing or extra"
    g = torch.Generator().manual_seed(seed)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(abs(a - b) <= atol + rtol * abs(b))

    for k, grad in grads.items():
        size = grad.norm()
        for lean in LEANS:
            d = torch.randn(grad.shape, generator=g, dtype=grad.dtype)
            d /= d.norm()
            if size > 0 and lean > 0:  # (the random part on the gradient's side: the sum is at least as long)
                d = (d if (d * grad).sum() >= 0 else -d) + lean * grad / size
                d /= d.norm()

            def difference(step: float, k: str = k, d: torch.Tensor = d) -> torch.Tensor:
                def f(t: float) -> torch.Tensor:
                    p = {**params, k: params[k] + t * d} if k in params else params
                    m = {**meta, k: meta[k] + t * d} if k in meta else meta
                    return meta_loss(p, m)

                return (f(step) - f(-step)) / (2 * step)

            analytic = (grad * d).sum()
            for step in (h, h / 10):  # (a jump nearer than h may be farther than h / 10: rounding is still 1e-9)
                fd = difference(step)
                if close(analytic, fd) or close(fd, difference(step / 2)):
                    break
            else:  # a kink at both steps: another direction
                continue
            break
        torch.testing.assert_close(analytic, fd, rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
        if size > RESOLVED:
            assert 1e-4 * abs(analytic) > rtol * abs(fd) + atol, f"{k}: the tolerance cannot resolve a 1e-4 error"
