"""The training update replayed from a graph (metagrad.cuda_graph, train.cuda_graphs), on the CPU with a stand-in
that calls the captured body again at every replay: what goes into the graph's inputs, when a graph is captured
again, the guard and the fallbacks. tests/test_cuda.py runs the same comparisons through real CUDA graphs."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from test_fused_update import CASES, assert_close_runs, cfg_of

from metagrad import Trainer
from metagrad.cuda_graph import CapturedFunction, ReplayedCalls
from metagrad.errors import DivergenceError
from metagrad.fused_update import unfused_reason

GRAPHED_CASES = {
    **CASES,
    # The multi-step loss's weights change every epoch of 2 iterations: an input of the graph, not a constant.
    "enhanced-msl": [
        "algorithm.name=maml_enhanced", "algorithm.inner_steps=2", "algorithm.multi_step_loss=true",
        "algorithm.epoch_iterations=2", "algorithm.msl_epochs=2", "train.meta_lr=0.01",
    ],  # fmt: skip
    # First order for the first 3 iterations, then second: another graph.
    "maml-first-order-first": ["algorithm.first_order_iterations=3", "train.meta_lr=0.01"],
    # Tasks vmapped 3 at a time (4 tasks: chunks of 3 and 1), summed inside the graph.
    "maml-chunks": ["train.vectorize=3", "algorithm.inner_steps=2", "train.meta_lr=0.01"],
}


def graphed_trainer(tmp_path: Path, name: str, overrides: list[str], graph: type = ReplayedCalls) -> Trainer:
    trainer = Trainer(cfg_of(*overrides), tmp_path / name)
    trainer._capture = graph
    return trainer


def separate_trainer(tmp_path: Path, name: str, overrides: list[str]) -> Trainer:
    return Trainer(cfg_of(*overrides, "train.fused_update=false"), tmp_path / name)


def replays(trainer: Trainer) -> int:
    return sum(entry.graph.replays for entry in trainer._fused.graphs._captured.values())


def run_both(graphed: Trainer, separate: Trainer, steps: int, rtol: float = 1e-12, strict: bool = True) -> None:
    """``steps`` training steps of each, their metrics compared (``strict``: any warning is an error)."""
    with warnings.catch_warnings():
        if strict:
            warnings.simplefilter("error")  # e.g. the LR scheduler's "step() before optimizer.step()"
        for _ in range(steps):
            mg, ms = graphed.step(), separate.step()
            assert mg.keys() == ms.keys()
            for k in mg:
                assert math.isclose(mg[k], ms[k], rel_tol=rtol, abs_tol=1e-300), k


@pytest.mark.parametrize("case", list(GRAPHED_CASES))
def test_the_replayed_update_trains_as_the_separate_parts(tmp_path: Path, case: str) -> None:
    graphed = graphed_trainer(tmp_path, "graphed", GRAPHED_CASES[case])
    separate = separate_trainer(tmp_path, "separate", GRAPHED_CASES[case])
    run_both(graphed, separate, 6)
    assert graphed._fused is not None and graphed._fused.graphs is not None and separate._fused is None
    assert graphed.learner._compiled is None  # a graph needs no compile
    # One eager call, then a capture and replays; a new key (first to second order, the multi-step loss's end)
    # starts over.
    captures = 2 if case in ("maml-first-order-first", "enhanced-msl") else 1
    assert graphed._fused.graphs.captures == captures and graphed._fused.graphs.failed is None
    assert replays(graphed) == 6 - 2 * captures + captures  # a capture replays at once
    assert_close_runs(graphed, separate)
    if case.startswith("reptile"):  # the inner Adam's state carried over through the graph's writes
        a, b = graphed.learner.extra_state, separate.learner.extra_state
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=0, msg=k)


def test_new_optimizer_state_is_captured_again(tmp_path: Path) -> None:
    """A graph writes the memory it was captured on: after load_state_dict (a resume) Adam's state is new tensors,
    which a stale graph would never update."""
    overrides = ["train.meta_lr=0.01", "train.lr_schedule=cosine"]
    graphed = graphed_trainer(tmp_path, "graphed", overrides)
    separate = separate_trainer(tmp_path, "separate", overrides)
    run_both(graphed, separate, 3)
    for trainer in (graphed, separate):
        trainer.optimizer.load_state_dict(copy.deepcopy(trainer.optimizer.state_dict()))
    run_both(graphed, separate, 4)
    assert graphed._fused.graphs.captures == 2
    assert_close_runs(graphed, separate)


def change_inner_lr(trainer: Trainer) -> None:
    trainer.learner.rule.lr = 0.02  # a Python number the update reads: fixed in a graph at its capture


def test_a_changed_setting_is_captured_again(tmp_path: Path) -> None:
    overrides = ["train.meta_lr=0.01"]
    graphed = graphed_trainer(tmp_path, "graphed", overrides)
    separate = separate_trainer(tmp_path, "separate", overrides)
    run_both(graphed, separate, 3)
    for trainer in (graphed, separate):
        change_inner_lr(trainer)
    run_both(graphed, separate, 3)
    assert graphed._fused.graphs.captures == 2
    assert_close_runs(graphed, separate)


def test_every_public_setting_keys_the_graph_and_a_counter_does_not(tmp_path: Path) -> None:
    from metagrad.fused_update import _settings

    learner = graphed_trainer(tmp_path, "settings", []).learner
    before = _settings(learner)
    for name, value in (("autocast", torch.bfloat16), ("autocast", torch.float16), ("tf32", True),
                        ("inner_steps", 3), ("vectorize", False)):  # fmt: skip
        setattr(learner, name, value)
        assert _settings(learner) != before, name
        before = _settings(learner)
    learner.rule.rates = [0.1, 0.2]  # a list of numbers: a setting too
    assert _settings(learner) != before
    before = _settings(learner)
    learner.rule.rates = [0.1, 0.3]
    assert _settings(learner) != before
    before = _settings(learner)
    learner._calls = 7  # a private counter: not a setting
    assert _settings(learner) == before


def test_a_changed_task_family_is_captured_again(tmp_path: Path) -> None:
    """The sinusoid tasks are assembled inside the graph: their ranges are fixed there, as the learner's settings."""
    overrides = ["train.meta_lr=0.01"]
    graphed = graphed_trainer(tmp_path, "graphed", overrides)
    separate = separate_trainer(tmp_path, "separate", overrides)
    assert graphed._assembled_in_graph()
    run_both(graphed, separate, 3)
    for trainer in (graphed, separate):
        trainer.tasks.amplitude = (4.0, 5.0)
    run_both(graphed, separate, 3)
    assert graphed._fused.graphs.captures == 2
    assert_close_runs(graphed, separate)


def test_state_on_another_device_runs_eagerly_and_says_so_once() -> None:
    state = torch.zeros(3)
    f = CapturedFunction(torch.device("cpu"), graph=ReplayedCalls)

    def body(x: list[torch.Tensor]) -> torch.Tensor:
        state.add_(x[0])
        return state.clone()

    meta = torch.empty(2, device="meta")  # (a tensor the capture would not see written)
    with pytest.warns(RuntimeWarning, match="state is on meta"):
        f("k", body, [torch.ones(3)], [state, meta])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        for _ in range(3):
            f("k", body, [torch.ones(3)], [state, meta])
    assert f.captures == 0 and f.failed is None and torch.equal(state, torch.full((3,), 4.0))
    for _ in range(2):  # the state back on the device: captured as usual
        f("k", body, [torch.ones(3)], [state])
    assert f.captures == 1


def test_a_checkpoint_resumes_into_a_new_graph(tmp_path: Path) -> None:
    overrides = ["train.meta_lr=0.01", "train.lr_schedule=cosine"]
    straight = separate_trainer(tmp_path, "straight", overrides)
    for _ in range(6):
        straight.step()
    first = graphed_trainer(tmp_path, "switch", overrides)
    for _ in range(3):
        first.step()
    first.save()
    first.close()
    resumed = graphed_trainer(tmp_path, "switch", overrides)
    resumed.resume()
    for _ in range(3):
        resumed.step()
    assert resumed._fused.graphs.captures == 1
    assert_close_runs(straight, resumed)


def test_a_non_finite_replay_changes_nothing(tmp_path: Path) -> None:
    trainer = graphed_trainer(tmp_path, "nan", ["train.meta_lr=0.01"])
    for _ in range(3):
        trainer.step()
    assert replays(trainer) == 2
    with torch.no_grad():
        next(trainer.learner.parameters()).mul_(1e200)
    before = {k: v.clone() for k, v in trainer.learner.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in trainer.optimizer.state_dict()["state"].items()}
    with pytest.raises(DivergenceError, match="at iteration 4: meta-loss"):
        trainer.step()
    assert replays(trainer) == 3
    for k, v in trainer.learner.state_dict().items():
        assert torch.equal(v, before[k]), k
    for i, state in trainer.optimizer.state_dict()["state"].items():
        for k, v in state.items():
            assert torch.equal(v, moments[i][k]), (i, k)


class _Refusing(ReplayedCalls):
    def capture(self, body, static) -> None:  # noqa: ANN001 - the protocol's
        raise RuntimeError("operation not permitted when stream is capturing\nmore")


def test_a_failed_capture_warns_once_and_trains_eagerly(tmp_path: Path) -> None:
    overrides = ["train.meta_lr=0.01", "train.lr_schedule=cosine"]
    graphed = graphed_trainer(tmp_path, "graphed", overrides, graph=_Refusing)
    separate = separate_trainer(tmp_path, "separate", overrides)
    graphed.step(), separate.step()
    with pytest.warns(RuntimeWarning, match="CUDA graph failed .RuntimeError: operation not permitted"):
        graphed.step()
    separate.step()
    run_both(graphed, separate, 2)  # (no second warning: run_both turns warnings into errors)
    assert graphed._fused.graphs.failed.startswith("RuntimeError")
    assert_close_runs(graphed, separate)


def test_dropout_is_not_replayed(tmp_path: Path) -> None:
    trainer = graphed_trainer(tmp_path, "dropout", ["train.meta_lr=0.01"])
    learner, optimizer = trainer.learner, trainer.optimizer
    assert unfused_reason(learner, optimizer, 4, 1, graphed=True) is None
    assert "not compiled" in unfused_reason(learner, optimizer, 4, 1)
    learner.random = True
    assert "random numbers" in unfused_reason(learner, optimizer, 4, 1, graphed=True)
    trainer.step()
    assert trainer._fused is None


def test_captured_function_copies_inputs_and_keys_python_values() -> None:
    calls = []

    def body_of(scale: float):
        def body(x: list[torch.Tensor]) -> torch.Tensor:
            calls.append(scale)
            state.add_(x[0] * scale)
            return state.clone()

        return body

    state = torch.zeros(3)
    f = CapturedFunction(torch.device("cpu"), graph=ReplayedCalls)
    for i in range(4):
        out = f(("scale", 2.0), body_of(2.0), [torch.full((3,), float(i))], [state])
    assert torch.equal(out, torch.full((3,), 2.0 * (0 + 1 + 2 + 3)))
    f(("scale", 3.0), body_of(3.0), [torch.ones(3)], [state])  # another key: eager first
    assert f.captures == 1 and calls[-1] == 3.0
    f(("scale", 2.0), body_of(2.0), [torch.ones(1)], [state])  # another shape: another key
    assert f.captures == 1
    state = torch.zeros(3)  # new memory: captured again
    f(("scale", 2.0), body_of(2.0), [torch.ones(3)], [state])
    f(("scale", 2.0), body_of(2.0), [torch.ones(3)], [state])
    assert f.captures == 2 and torch.equal(state, torch.full((3,), 4.0))


def test_the_trainer_says_how_its_update_ran(tmp_path: Path) -> None:
    """Trainer.update (metagrad train prints it): a GPU user learns whether the graph replays, and why not."""
    overrides = ["train.meta_lr=0.01"]
    graphed = graphed_trainer(tmp_path, "graphed", overrides)
    assert graphed.update == "no step yet"
    graphed.step()
    assert graphed.update == "eagerly in one call (a CUDA graph captures it at the next step)"
    for _ in range(2):
        graphed.step()
    assert graphed.update == "replayed from a CUDA graph (captured 1 time)"
    graphed.learner.random = True  # (what a dropout layer sets): not replayed from now on
    graphed.step()
    assert graphed.update.startswith("separate parts (the network draws random numbers")
    refused = graphed_trainer(tmp_path, "refused", overrides, graph=_Refusing)
    with pytest.warns(RuntimeWarning, match="CUDA graph failed"):
        for _ in range(2):
            refused.step()
    assert refused.update.startswith("eagerly in one call: the CUDA graph capture failed (RuntimeError: operation")
    separate = separate_trainer(tmp_path, "separate", overrides)
    separate.step()
    assert separate.update == "separate parts (train.fused_update = false)"
    plain = Trainer(cfg_of(*overrides, "train.device=cpu"), tmp_path / "plain")  # (also where a GPU is)
    plain.step()
    assert plain.update == "separate parts (the learner is not compiled)"
    # A checkpoint records it too (trainer.json), also for a run that was interrupted before its summary.
    import json

    checkpoint = graphed_trainer(tmp_path, "saved", overrides)
    for _ in range(2):
        checkpoint.step()
    meta = json.loads((checkpoint.save() / "trainer.json").read_text())
    assert meta["update"] == "replayed from a CUDA graph (captured 1 time)"


def test_graphs_on_a_learner_off_the_gpu_is_a_clear_error() -> None:
    from metagrad import MAML, MLP
    from metagrad.errors import ConfigError
    from metagrad.fused_update import FusedUpdate

    learner = MAML(MLP(1, [8], 1), inner_lr=0.01)
    optimizer = torch.optim.Adam(learner.parameters())
    with pytest.raises(ConfigError, match="graphs=True replays CUDA graphs, but the learner is on cpu"):
        FusedUpdate(learner, optimizer, clip=None, graphs=True)


def update_pair(learner, batches, graph: type | None = ReplayedCalls, optimizer=None):  # noqa: ANN001, ANN201
    """``learner`` (and a copy) trained on ``batches`` by FusedUpdate(graphs=True) and by the separate parts."""
    from metagrad.fused_update import FusedUpdate

    reference = copy.deepcopy(learner)
    make = optimizer or (lambda m: torch.optim.Adam(m.parameters(), lr=0.01, fused=True))
    opt, ref_opt = make(learner), make(reference)
    assert unfused_reason(learner, opt, len(batches[0]), 1, graphed=True) is None
    update = FusedUpdate(learner, opt, None, graphs=True, **({} if graph is None else {"graph": graph}))
    for i, batch in enumerate(batches):
        norm, finite, values = update(batch, i, None)
        ref_opt.zero_grad()
        metrics = reference.backward(batch, i)
        ref_opt.step()
        assert finite
        assert math.isclose(values["loss"], metrics["loss"].item(), rel_tol=1e-10)
    return update, learner, reference


def conv4_update_pair(
    bn: str, graph: type | None = ReplayedCalls, device: str = "cpu", steps: int = 5, vectorize: bool = True
):  # fmt: skip
    """A small Conv-4 trained ``steps`` times by FusedUpdate(graphs=True) and by the separate parts, float64."""
    from metagrad.build import build_learner
    from metagrad.config import load_config
    from metagrad.tasks import TaskBatch
    from metagrad.train import _optimizer

    overrides = ["task.name=omniglot", "model.name=conv4", "model.channels=4", "task.image_size=16", "task.ways=3",
                 "algorithm.inner_steps=2", "train.meta_lr=0.01", f"model.bn={bn}"]  # fmt: skip
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    learner = build_learner(cfg).to(device, torch.float64)
    learner.vectorize = vectorize  # (True: the GPU's "auto"; on the CPU "auto" loops over a network that convolves)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        sx, qx = torch.rand(4, 3, 1, 16, 16, generator=g), torch.rand(4, 6, 1, 16, 16, generator=g)
        sy, qy = torch.tensor([[0, 1, 2]] * 4), torch.tensor([[0, 0, 1, 1, 2, 2]] * 4)
        batches.append(TaskBatch(sx, sy, qx, qy).to(device, torch.float64))
    return update_pair(learner, batches, graph, optimizer=lambda m: _optimizer(cfg, m))


def assert_same_state(learner: torch.nn.Module, reference: torch.nn.Module, noisy=lambda k: False) -> None:  # noqa: ANN001
    """Every tensor of the two learners to 1e-10; ``noisy(name)``: a bias before a norm layer, whose meta-gradient
    is 0 up to rounding, which Adam divides by the rounding's own square root (moves of 1e-10 here are noise), and
    the running means that carry it."""
    for (k, a), b in zip(learner.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-8 if noisy(k) else 1e-12, msg=k)


def assert_same_conv4(learner: torch.nn.Module, reference: torch.nn.Module) -> None:
    assert_same_state(learner, reference, lambda k: (k.startswith("model.convs.") and k.endswith(".bias"))
                      or ".running_" in k)  # fmt: skip


def test_running_statistics_are_tracked_inside_the_replayed_update() -> None:
    """MAML++'s per-step batch norm (model.bn = "per_step", the miniImageNet and CIFAR-FS MAML Enhanced configs):
    the eager update in a graph folds the batch into the running statistics as learner.backward does."""
    update, learner, reference = conv4_update_pair("per_step")
    assert update.graphs.captures == 1 and learner.tracks_statistics
    running = dict(learner.model.named_buffers())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in running.items() if "running_mean" in k)
    assert_same_conv4(learner, reference)


def test_the_task_loop_replays_too() -> None:
    """vectorize=False in a graph: the tasks' plain convolutions one after another, all launched by one replay."""
    update, learner, reference = conv4_update_pair("transductive", vectorize=False, steps=3)
    assert update.graphs.captures == 1 and not learner.vmapped
    assert_same_conv4(learner, reference)


def users_cnn_pair(momentum: float | None, graph: type | None = ReplayedCalls, device: str = "cpu"):  # noqa: ANN201
    """A researcher's own network (stock BatchNorm2d with running statistics, InstanceNorm) trained by the update
    in a graph and by the separate parts."""
    from test_norm import _image_batch, _user_cnn

    from metagrad import MAML

    torch.manual_seed(0)
    net = _user_cnn()
    net[1].momentum = momentum
    learner = MAML(net, inner_lr=0.3, inner_steps=2, loss="cross_entropy").to(device, torch.float64)
    learner.vectorize = True
    batches = [_image_batch() for _ in range(4)]
    for i, b in enumerate(batches):  # different images every step
        b.support_x.add_(0.1 * i)
        b.query_x.mul_(1 + 0.1 * i)
    update, learner, reference = update_pair(learner, [b.to(device) for b in batches], graph)
    assert update.graphs.captures == 1 and update.graphs.failed is None and learner.tracks_statistics
    assert int(learner.model[1].num_batches_tracked) > 0
    assert_same_state(learner, reference, lambda k: k in ("model.0.bias", "model.4.bias", "model.1.running_mean"))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_users_cnn_with_running_statistics_replays_as_the_separate_parts(momentum: float | None) -> None:
    """The same path as the shipped models. momentum=None (a cumulative average) folds without reading a count on
    the host, which a capture may not do (tests/test_cuda.py captures it for real)."""
    users_cnn_pair(momentum)


def test_a_users_task_family_assembled_in_the_graph_trains_as_the_separate_parts(tmp_path: Path) -> None:
    """docs/extending.md's optional draw/assemble pair on a family of the user's: assembled inside the replayed
    update as the sinusoid is."""
    from test_fused_update import _Lines

    graphed = graphed_trainer(tmp_path, "graphed", ["train.meta_lr=0.01"])
    separate = separate_trainer(tmp_path, "separate", ["train.meta_lr=0.01"])
    for trainer in (graphed, separate):
        trainer.tasks = _Lines()
    assert graphed._assembled_in_graph()
    run_both(graphed, separate, 4)
    assert graphed._fused.graphs.captures == 1
    assert_close_runs(graphed, separate)
