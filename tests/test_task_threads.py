"""Tasks on several CPU threads at once (metagrad.task_threads): the one-thread task loop's meta-gradient to the bit,
for every model and algorithm that takes that path, and the one-task-at-a-time loop wherever tasks share
something."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from metagrad.algorithms import CAVIA, IMAML, MAML, MAMLEnhanced, ProtoNet, Reptile
from metagrad.algorithms import base as learner_base
from metagrad.algorithms.cavia import ContextNetwork
from metagrad.config import load_config
from metagrad.errors import ConfigError
from metagrad.inner import SGD, Chain
from metagrad.models import MLP, Conv4, ResNet12, norm
from metagrad.task_threads import current_module, run_tasks, shell
from metagrad.tasks import TaskBatch


def _images(tasks: int, ways: int, size: int, channels: int = 1, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(tasks, ways, channels, size, size, generator=g)
    qx = torch.randn(tasks, 2 * ways, channels, size, size, generator=g)
    sy = torch.arange(ways).repeat(tasks, 1)
    return TaskBatch(sx, sy, qx, torch.arange(ways).repeat(tasks, 2))


def _points(tasks: int, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sx, qx = torch.randn(tasks, 5, 1, generator=g), torch.randn(tasks, 7, 1, generator=g)
    return TaskBatch(sx, torch.sin(3 * sx), qx, torch.sin(3 * qx))


CE = {"loss": "cross_entropy"}
CASES = {
    "conv4_pool_maml": lambda: (MAML(Conv4(1, 3, 8, 16), inner_steps=2, **CE), _images(5, 3, 16)),
    "conv4_stride_per_step_maml": lambda: (
        MAML(Conv4(1, 3, 8, 16, bn="per_step", steps=2, downsample="stride"), inner_steps=2, **CE),
        _images(5, 3, 16),
    ),
    "conv4_enhanced": lambda: (MAMLEnhanced(Conv4(1, 3, 8, 16), inner_steps=2, **CE), _images(5, 3, 16)),
    "conv4_fomaml": lambda: (MAML(Conv4(1, 3, 8, 16), inner_steps=2, first_order=True, **CE), _images(5, 3, 16)),
    "conv4_imaml": lambda: (IMAML(Conv4(1, 3, 8, 16), inner_steps=1, cg_steps=2, **CE), _images(4, 3, 16)),
    "conv4_protonet": lambda: (ProtoNet(Conv4(1, 3, 8, 16), ways=3), _images(5, 3, 16)),
    "resnet12_maml": lambda: (MAML(ResNet12(3, 2, (3, 4, 4, 5)), inner_steps=1, **CE), _images(3, 2, 16, 3)),
    "mlp_loop_maml": lambda: (MAML(MLP(), inner_steps=2, vectorize=False), _points(6)),
    # A researcher's own CNN (stock BatchNorm2d with running statistics, made exact; InstanceNorm2d), also in
    # channels-last memory (the precise batch-norm path), and ResNet-12 with running statistics.
    "user_cnn_maml": lambda: (MAML(_user_cnn(), inner_steps=2, **CE), _images(4, 2, 8)),
    "user_cnn_channels_last_maml": lambda: (
        MAML(_user_cnn().to(memory_format=torch.channels_last), inner_steps=2, **CE), _images(4, 2, 8)),
    "resnet12_running_maml": lambda: (
        MAML(ResNet12(3, 2, (3, 4, 4, 5), running_statistics=True), inner_steps=1, **CE), _images(3, 2, 16, 3)),
    "conv4_reptile": lambda: (Reptile(Conv4(1, 3, 8, 16), inner_steps=2, **CE), _images(5, 3, 16)),
    # CAVIA's context goes in by a forward hook, which feeds the context of the shell being called on its thread.
    "conv4_cavia_film": lambda: (
        CAVIA(ContextNetwork(Conv4(1, 3, 8, 16), 2, "film", "norms.2"), inner_steps=2, **CE), _images(5, 3, 16)),
    "mlp_cavia_concat_loop": lambda: (CAVIA(ContextNetwork(MLP(), 2), inner_steps=2, vectorize=False), _points(6)),
}


def _user_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.SiLU(), nn.AvgPool2d(2),
        nn.Conv2d(3, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(12, 2),
    )  # fmt: skip


def _spy(monkeypatch, probes: list[set[int]] | None = None) -> list[set[int]]:
    """Record, per run_tasks call that runs tasks side by side, the threads its tasks ran on (and in ``probes``,
    per call that runs one task alone on a task thread: the probe before a learner's first such call)."""
    calls: list[set[int]] = []

    def spying(fn, items, threads, model, combine=None):
        seen: set[int] = set()
        (calls if threads > 1 else probes if probes is not None else []).append(seen)

        def recorded(item):
            seen.add(threading.get_ident())
            return fn(item)

        return run_tasks(recorded, items, threads, model, combine)

    monkeypatch.setattr(learner_base, "run_tasks", spying)
    return calls


def _meta_gradient(learner, batch, task_threads, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        learner.task_threads = task_threads
        torch.manual_seed(0)
        return learner.meta_gradient(batch)
    finally:
        torch.set_num_threads(before)


def _assert_identical(a, b) -> None:
    for tree_a, tree_b in zip(a, b, strict=True):
        assert tree_a.keys() == tree_b.keys()
        for k in tree_a:
            assert torch.equal(tree_a[k], tree_b[k]), k


@pytest.mark.parametrize("case", list(CASES))
def test_tasks_on_threads_give_the_one_thread_loop_bit_for_bit(case, monkeypatch):
    learner, batch = CASES[case]()
    reference = _meta_gradient(learner, batch, 1, 1)  # one task at a time, one thread
    probes: list[set[int]] = []
    calls = _spy(monkeypatch, probes)
    first = _meta_gradient(learner, batch, 3, 2)  # its first task alone on a task thread (the probe), then the rest
    assert len(probes) == 1 and len(calls) == 1
    threaded = _meta_gradient(learner, batch, 3, 2)
    assert len(probes) == 1 and len(calls) == 2
    assert learner.task_loop == "side by side on 3 threads"
    # Every task ran on a task thread, never on the caller's.
    assert all(seen and threading.get_ident() not in seen for seen in probes + calls)
    _assert_identical(reference, first)
    _assert_identical(reference, threaded)


class _ScaledByBias:
    """A researcher's forward hook that reads the module it is called with (on a task thread, the shell holding the
    task's weights) and declares so."""

    thread_safe_tasks = True

    def __call__(self, module, inputs, output):
        return output * (1 + 0.1 * torch.tanh(module.bias.mean()))


def test_a_users_hook_that_declares_thread_safe_tasks_runs_side_by_side_on_the_tasks_weights(monkeypatch):
    learner, batch = CASES["conv4_pool_maml"]()
    learner.model.convs[1].register_forward_hook(_ScaledByBias())
    reference = _meta_gradient(learner, batch, 1, 1)
    calls = _spy(monkeypatch)
    _assert_identical(reference, _meta_gradient(learner, batch, 3, 2))
    _assert_identical(reference, _meta_gradient(learner, batch, 3, 2))
    assert len(calls) == 2 and learner.task_loop == "side by side on 3 threads"


def test_a_cavia_wrapper_pickled_before_it_kept_its_feed_still_feeds_each_threads_shell(monkeypatch):
    learner, batch = CASES["conv4_cavia_film"]()
    reference = _meta_gradient(learner, batch, 1, 1)
    del learner.model.__dict__["_context_feed"]  # as a ContextNetwork pickled by an earlier version
    old = pickle.loads(pickle.dumps(learner))
    (feed,) = old.model.net.get_submodule("norms.2")._forward_hooks.values()
    assert old.model.__dict__["_context_feed"] is feed and feed.owner is old.model
    calls = _spy(monkeypatch)
    _assert_identical(reference, _meta_gradient(old, batch, 3, 2))
    _assert_identical(reference, _meta_gradient(old, batch, 3, 2))
    assert len(calls) == 2


@pytest.mark.parametrize("case", ["conv4_pool_maml", "conv4_stride_per_step_maml", "conv4_imaml"])
def test_evaluation_curves_on_threads_are_the_one_thread_loops(case, monkeypatch):
    learner, batch = CASES[case]()
    learner.eval()
    torch.set_num_threads(1)
    learner.task_threads = 1
    reference = learner.adaptation_curve(batch, steps=3)
    calls = _spy(monkeypatch)
    torch.set_num_threads(2)
    learner.task_threads = "auto"
    first = learner.adaptation_curve(batch, steps=3)  # (after the probe's task)
    curves = learner.adaptation_curve(batch, steps=3)
    assert len(calls) == 2 and all(seen and threading.get_ident() not in seen for seen in calls)
    assert torch.equal(reference, first) and torch.equal(reference, curves)


def test_the_caller_keeps_its_threads_and_the_tasks_take_the_rest():
    learner, batch = CASES["conv4_pool_maml"]()
    seen: list[int] = []
    forward = learner_base.MetaLearner._forward

    def counting(self, *args):
        if threading.current_thread() is not threading.main_thread():
            seen.append(torch.get_num_threads())
        return forward(self, *args)

    torch.set_num_threads(2)
    learner.task_threads = 4
    learner._forward = counting.__get__(learner)
    learner.meta_gradient(batch)
    assert set(seen) == {1}  # four threads over five tasks: one intra-op thread each, the probe's task too
    assert torch.get_num_threads() == 2
    seen.clear()
    fields = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    learner.meta_gradient(TaskBatch(*(t[:2] for t in fields)))
    assert set(seen) == {1}  # four threads over two tasks: still one each (see run_tasks)
    assert torch.get_num_threads() == 2


def _twice(learner, batch, **kwargs):
    learner.task_threads = 2
    for _ in range(2):  # the first call probes
        out = learner.meta_gradient(batch, **kwargs)
    return out


class _ListedLayers(nn.Module):
    """Reaches its layers through a plain list too: a thread's shell would call the original layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(1, 8), nn.Linear(8, 1)
        self.__dict__["order"] = [self.a, self.b]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.order[1](torch.tanh(self.order[0](x)))


class _CountsCalls(nn.Module):
    """Writes a buffer in every forward pass (outside autograd): tasks on threads would share it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.calls += 1
        return self.net(x)


class _DrawsNoise(nn.Module):
    """Draws from the global generator without being marked random."""

    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + 0.01 * torch.randn_like(x))


class _OwnMAML(MAML):
    """A user's subclass, whose per-task code metagrad cannot vouch for."""


class _OwnSGD(SGD):
    """A user's inner rule, likewise (also inside a Chain)."""


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_tasks_that_share_something_run_one_after_another_and_say_why(monkeypatch):
    calls = _spy(monkeypatch)
    learner, batch = CASES["conv4_pool_maml"]()
    assert learner.task_loop == "no meta-gradient yet"

    def says(learner, why):  # learner.task_loop (which `metagrad train` prints) tells why
        assert learner.task_loop.endswith(why), learner.task_loop

    for hook in (learner.model.register_forward_hook(lambda m, a, o: None),
                 learner.model.register_full_backward_hook(lambda m, gi, go: None)):  # fmt: skip
        _twice(learner, batch)
        says(learner, "one task at a time: the network has a hook")
        hook.remove()
    vmapped = MAML(Conv4(1, 3, 8, 16), inner_steps=1, vectorize=True, **CE)
    _twice(vmapped, batch)
    says(vmapped, "vectorised (vmap)")
    dropout = MAML(nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.5), nn.Linear(8, 1)), inner_steps=1, vectorize=False)
    _twice(dropout, _points(4), generator=torch.Generator().manual_seed(0))
    says(dropout, "the network draws random numbers in training (dropout), in task order")
    counts = MAML(_CountsCalls(), inner_steps=1, vectorize=False)
    counts.task_threads = 2
    counts.meta_gradient(_points(4))  # the probe's call itself: its other tasks ran one at a time
    says(counts, "one task at a time: a task wrote a buffer or drew from the global random number generator "
         "(the probe)")  # fmt: skip
    for model, why in ((_ListedLayers(), "the network.order holds a part of the network outside its registered "
                        "modules and tensors"),
                       (_CountsCalls(), "a task wrote a buffer or drew from the global random number generator "
                        "(the probe)"),
                       (_DrawsNoise(), "drew from the global random number generator (the probe)")):  # fmt: skip
        shared = MAML(model, inner_steps=1, vectorize=False)
        _twice(shared, _points(4))
        says(shared, why)
    own = _OwnMAML(MLP(), inner_steps=1, vectorize=False)
    _twice(own, _points(4))
    says(own, "_OwnMAML is defined outside metagrad and does not declare thread_safe_tasks = True")
    chained = MAML(MLP(), Chain(_OwnSGD(0.1)), inner_steps=1, vectorize=False)
    _twice(chained, _points(4))
    says(chained, "_OwnSGD is defined outside metagrad and does not declare thread_safe_tasks = True")
    plain = MAML(MLP(), inner_steps=1, vectorize=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _twice(plain, _points(4))
    says(plain, "one task at a time: autocast is on")
    plain.task_threads = 1
    plain.meta_gradient(_points(4))
    says(plain, "one task at a time: task_threads = 1")
    fields = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    fresh, _ = CASES["conv4_pool_maml"]()
    _twice(fresh, TaskBatch(*(t[:2] for t in fields)))
    says(fresh, "two tasks (the first call of three or more probes whether tasks share anything)")
    assert calls == []
    _twice(learner, batch)
    assert len(calls) == 2  # (the same learner without its hooks)
    assert learner.task_loop == "side by side on 2 threads"
    compiled = MAML(MLP(), inner_steps=1, vectorize=False)
    compiled.compile(backend="eager")
    _twice(compiled, _points(4))
    assert len(calls) == 2  # a compiled step keeps one task at a time
    says(compiled, "one task at a time in the compiled step (torch.compile is not thread-safe in PyTorch 2.13)")
    _OwnMAML.thread_safe_tasks = True  # a subclass that vouches for its per-task code
    try:
        _twice(_OwnMAML(MLP(), inner_steps=1, vectorize=False), _points(4))
    finally:
        del _OwnMAML.thread_safe_tasks
    assert len(calls) == 4


def test_a_network_that_writes_a_buffer_gives_the_one_thread_loops_result():
    torch.set_num_threads(1)  # (task_threads = 2 below; the probe's task runs on one thread, as here)
    torch.manual_seed(0)
    serial = MAML(_CountsCalls(), inner_steps=1, vectorize=False)
    torch.manual_seed(0)
    threaded = MAML(_CountsCalls(), inner_steps=1, vectorize=False)
    serial.task_threads, threaded.task_threads = 1, 2
    for _ in range(3):
        expected, got = serial.meta_gradient(_points(6)), threaded.meta_gradient(_points(6))
        _assert_identical(expected, got)
        assert threaded.model.calls == serial.model.calls  # every pass counted, none lost to a race


class _FailsOnOneTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 99.0).any()):
            raise ValueError("task with the marked point")
        return self.net(x)


def test_a_failing_task_raises_as_in_the_loop_and_leaves_nothing_running(monkeypatch):
    learner = MAML(_FailsOnOneTask(), inner_steps=1, vectorize=False)
    learner.task_threads = 2
    batch = _points(8)
    learner.meta_gradient(batch)  # (the probe)
    calls = _spy(monkeypatch)
    batch.support_x[5, 0, 0] = 99.0
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="marked point"):
        learner.meta_gradient(batch)
    assert len(calls) == 1 and threading.get_ident() not in calls[0]
    assert torch.get_num_threads() == threads
    batch.support_x[5, 0, 0] = 0.0
    assert learner.meta_gradient(batch)[2]["loss"].isfinite()


def test_each_task_runs_its_own_shell_and_the_callers_batch_norm_mode():
    model = Conv4(1, 3, 8, 16)
    twin = shell(model)
    assert twin is not model and all(a is not b for a, b in zip(twin.modules(), model.modules(), strict=True))
    assert dict(twin.named_parameters()).keys() == dict(model.named_parameters()).keys()
    assert all(a is b for a, b in zip(twin.parameters(), model.parameters(), strict=True))
    assert all(a is b for a, b in zip(twin.buffers(), model.buffers(), strict=True))
    assert current_module(model) is model

    def look(_: int):
        return current_module(model) is not model, norm.current_mode()

    with norm.statistics("running", False, True):
        seen = list(run_tasks(look, [0, 1, 2], 2, model))
        assert norm.current_mode() == ("running", False, True)
    assert seen == [(True, ("running", False, True))] * 3
    assert norm.current_mode() == (None, None, False)
    other = threading.Thread(target=lambda: seen.append(norm.current_mode()))
    with norm.statistics("running", False, True):
        other.start()
        other.join()
    assert seen[-1] == (None, None, False)  # another thread's mode is its own


@pytest.mark.parametrize("value", [0, -1, True, "all", 1.5])
def test_task_threads_refuses_what_is_not_a_number_of_threads(value):
    learner = MAML(MLP(), inner_steps=1)
    with pytest.raises(ConfigError, match="task_threads"):
        learner.task_threads = value


def test_the_config_sets_task_threads():
    from metagrad.build import build_learner

    assert build_learner(load_config(None, ["train.task_threads=3"])).task_threads == 3
    assert build_learner(load_config(None, [])).task_threads == "auto"
    with pytest.raises(ConfigError, match="task_threads"):
        build_learner(load_config(None, ["train.task_threads=0"]))


def _child_meta_gradient(queue) -> None:
    # One intra-op thread in the child: GNU OpenMP's threads, which the parent used, hang a forked child's
    # parallel regions (as without task threads).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    learner, batch = CASES["mlp_loop_maml"]()
    queue.put(float(_twice(learner, batch)[2]["loss"]))


def test_a_forked_child_runs_tasks_on_threads_of_its_own():
    import multiprocessing

    torch.manual_seed(0)
    learner, batch = CASES["mlp_loop_maml"]()
    expected = float(_twice(learner, batch)[2]["loss"])  # the parent's pool threads now exist
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_meta_gradient, args=(queue,))
    child.start()
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0, "the child waited on the parent's pool threads"
    assert queue.get(timeout=5) == expected


def test_results_are_combined_in_the_items_order_on_the_task_threads():
    import time

    model = MLP()
    order: list[tuple[int, bool]] = []

    def slow_first(i: int) -> int:
        time.sleep(0.05 * (3 - i))  # the last item finishes first
        return i

    def combine(i: int) -> None:
        order.append((i, threading.current_thread() is threading.main_thread()))

    assert run_tasks(slow_first, [0, 1, 2, 3], 4, model, combine) == []
    assert order == [(0, False), (1, False), (2, False), (3, False)]
    assert run_tasks(slow_first, [0, 1, 2, 3], 4, model) == [0, 1, 2, 3]

    def fails(i: int) -> int:
        time.sleep(0.05 * (3 - i))
        if i in (1, 3):
            raise ValueError(f"item {i}")
        return i

    order.clear()
    with pytest.raises(ValueError, match="item 1"):  # the first in order, though item 3 failed sooner
        run_tasks(fails, [0, 1, 2, 3], 4, model, combine)
    assert [i for i, _ in order] == [0]  # nothing combined past the failure


def test_the_same_threads_run_every_call_and_a_grown_pool_replaces_its_threads_first(monkeypatch):
    """The probe's one-thread call and the next two-thread call run on the same pool's threads (each keeps its
    allocator heap: a new thread started beside a live old one took a heap of its own, and the process's peak grew
    by a task's activations). Past the cores, a larger pool replaces the old one only once its threads have
    ended."""
    from metagrad import task_threads

    model = MLP()
    monkeypatch.setattr(task_threads, "_POOL", None)
    monkeypatch.setattr(task_threads, "usable_cores", lambda: 2)
    seen: list[set[threading.Thread]] = []
    both = threading.Barrier(2, timeout=10)  # the two-thread call's first two items meet: one on each thread

    def record(i: int) -> int:
        seen[-1].add(threading.current_thread())
        if len(items) > 1 and i < 2:
            both.wait()
        return i

    for threads, items in ((1, [0]), (2, [0, 1, 2, 3]), (1, [0])):
        seen.append(set())
        run_tasks(record, items, threads, model)
    assert len(seen[1]) == 2 and seen[0] <= seen[1] and seen[2] <= seen[1]

    old = set().union(*seen)
    alive: list[bool] = []

    def check(i: int) -> int:
        alive.append(any(t.is_alive() for t in old))
        return i

    try:
        run_tasks(check, list(range(6)), 3, model)  # more than the pool holds
        assert alive and not any(alive), "a new pool thread ran beside the old pool's"

        def nested(i: int) -> int:  # a task's own call that grows the pool cannot wait for its own thread
            return sum(run_tasks(lambda j: j, [i] * 4, 4, model))

        assert run_tasks(nested, [1, 2], 3, model) == [4, 8]
    finally:
        task_threads._POOL.shutdown(wait=True)  # (the pools made here; monkeypatch restores the suite's)


ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"Omniglot data not found at {OMNIGLOT}")
def test_a_training_run_on_two_threads_has_the_one_thread_runs_weights(tmp_path, monkeypatch):
    """`metagrad train` of the strided 20-way config (eager), on one thread and on two: every weight equal to the
    bit after three Adam steps, the two-thread run with its tasks side by side."""
    from metagrad import train

    overrides = ["train.iterations=3", "train.compile=false", "model.channels=8", "task.ways=5", "task.queries=2",
                 "train.meta_batch=4", f"task.data={OMNIGLOT}", "train.val_every=100000", "train.log_every=1",
                 "train.checkpoint_every=100000", "train.val_tasks=4"]  # fmt: skip
    calls = _spy(monkeypatch)
    states, loops = {}, {}
    for threads in (1, 2):
        cfg = load_config(ROOT / "configs/omniglot/maml_20way_strided.toml", [*overrides, f"train.threads={threads}"])
        learner = train(cfg, tmp_path / str(threads), progress=False).learner
        states[threads], loops[threads] = learner.state_dict(), learner.task_loop
    assert len(calls) >= 2  # the two-thread run's iterations after the probe went to task threads
    one = "one task at a time: one CPU thread (torch.get_num_threads() is 1: train.threads sets it)"
    assert loops == {1: one, 2: "side by side on 2 threads"}
    assert states[1].keys() == states[2].keys()
    assert all(torch.equal(states[1][k], states[2][k]) for k in states[1])
