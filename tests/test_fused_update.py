"""The update fused into the compiled meta-step (metagrad.fused_update): the same training as the separate
parts (meta-gradient, guard and clip, torch.optim step), in float64 to rounding, on the optimizer's own state;
the guard still leaves everything untouched; anything it does not cover takes the separate path."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from metagrad import Trainer
from metagrad.config import Config, load_config
from metagrad.errors import DivergenceError
from metagrad.fused_update import assembles, unfused_reason
from metagrad.tasks import Sinusoid, TaskBatch

TINY = [
    "model.hidden=[8,8]",
    "train.meta_batch=4",
    "train.log_every=2",
    "train.val_every=1000",
    "train.val_tasks=4",
    "train.checkpoint_every=1000",
    "train.threads=1",
    "train.dtype=float64",
    "train.iterations=100",
]


def cfg_of(*overrides: str) -> Config:
    return load_config(overrides=[*TINY, *overrides])


def trainer_of(tmp_path: Path, name: str, overrides: list[str], fused: bool, backend: str | None = "aot_eager"
               ) -> Trainer:  # fmt: skip
    cfg = cfg_of(*overrides, f"train.fused_update={str(fused).lower()}")
    trainer = Trainer(cfg, tmp_path / name)
    # Compiled by hand (aot_eager: no C++ build), as train.compile would with Inductor: the same fused graph.
    if backend is not None:
        trainer.learner.compile(backend=backend)
    return trainer


def state_of(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict]:
    return trainer.learner.state_dict(), trainer.optimizer.state_dict()


def assert_close_runs(a: Trainer, b: Trainer, rtol: float = 1e-12) -> None:
    (la, oa), (lb, ob) = state_of(a), state_of(b)
    assert la.keys() == lb.keys()
    for k in la:
        torch.testing.assert_close(la[k], lb[k], rtol=rtol, atol=rtol * la[k].abs().max().item(), msg=k)
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i, state in oa["state"].items():
        assert state.keys() == ob["state"][i].keys()
        for name, t in state.items():
            u = ob["state"][i][name]
            assert (t.dtype, t.device, t.shape) == (u.dtype, u.device, u.shape), (i, name)
            torch.testing.assert_close(t, u, rtol=rtol, atol=rtol * t.abs().max().item(), msg=f"{i} {name}")


CASES = {
    # With a bound every step's norm exceeds, so that the clipping acts.
    "maml-adam-cosine-clipped": [
        "algorithm.inner_steps=2", "train.lr_schedule=cosine", "train.meta_lr=0.01", "train.grad_clip=1e-3",
    ],  # fmt: skip
    # Learned per-step rates and curvature: a second parameter group with its own learning rate.
    "enhanced": [
        "algorithm.name=maml_enhanced", "algorithm.inner_steps=2", "train.meta_lr=0.01", "train.meta_state_lr=0.003",
    ],  # fmt: skip
    "metasgd-sgd": ["algorithm.name=metasgd", "train.optimizer=sgd", "train.meta_lr=0.01"],
    # The optimizer holds the context, which gets no meta-gradient: torch.optim skips it, and so must the update.
    "cavia": ["algorithm.name=cavia", "algorithm.inner_steps=2", "train.meta_lr=0.01"],
    # A meta-step of its own (_fused_gradient): mini-batches drawn after the tasks, the inner Adam's state persisted.
    "reptile-inner-adam": [
        "algorithm.name=reptile", "algorithm.inner_steps=2", "algorithm.inner_optimizer=adam",
        "algorithm.inner_batch=5", "train.optimizer=sgd", "train.meta_lr=1.0", "train.lr_schedule=linear",
        "train.meta_lr_final=0.0",
    ],  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_fused_update_trains_as_the_separate_parts(tmp_path: Path, case: str) -> None:
    fused = trainer_of(tmp_path, "fused", CASES[case], fused=True)
    separate = trainer_of(tmp_path, "separate", CASES[case], fused=False, backend=None)  # eager: the reference
    if case == "enhanced":  # Adam's other hyper-parameters, per group
        for trainer in (fused, separate):
            trainer.optimizer.param_groups[0].update(betas=(0.5, 0.95), eps=1e-3)
            trainer.optimizer.param_groups[1].update(betas=(0.8, 0.9), eps=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. the LR scheduler's "step() before optimizer.step()"
        for _ in range(3):
            mf, ms = fused.step(), separate.step()
            assert mf.keys() == ms.keys()
            for k in mf:
                assert math.isclose(mf[k], ms[k], rel_tol=1e-12, abs_tol=1e-300), k
    assert fused._fused is not None and separate._fused is None
    assert fused._assembled_in_graph()  # the sinusoid tasks were assembled inside the compiled update
    assert_close_runs(fused, separate)
    if "clipped" in case:
        assert mf["grad_norm"] > 1e-3  # the bound acted
    if case.startswith("reptile"):  # the inner Adam's state carried over, as the separate path writes it
        a, b = fused.learner.extra_state, separate.learner.extra_state
        assert a.keys() == b.keys() and a
        for k in a:
            assert not torch.equal(a[k], torch.zeros_like(a[k])), k
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=0, msg=k)
    if case == "cavia":
        context = fused.learner.params["context"]
        assert torch.equal(context, torch.zeros_like(context)) and context not in fused.optimizer.state
    fused.close()
    separate.close()


def test_inductor_fuses_the_update_as_the_eager_parts(tmp_path: Path) -> None:
    """The real path (train.compile: Inductor, its in-place updates of inputs) against no compile at all."""
    overrides = ["train.meta_lr=0.01", "train.lr_schedule=linear", "train.compile=true"]
    cfg = cfg_of(*overrides)
    fused = Trainer(cfg, tmp_path / "fused")
    reference = Trainer(cfg_of(*overrides[:-1]), tmp_path / "eager")
    for _ in range(3):
        fused.step()
        reference.step()
    assert fused._fused is not None and reference._fused is None
    assert_close_runs(fused, reference)


def test_a_checkpoint_moves_between_the_fused_and_the_separate_update(tmp_path: Path) -> None:
    overrides = ["train.lr_schedule=cosine", "train.meta_lr=0.01"]
    straight = trainer_of(tmp_path, "straight", overrides, fused=True)
    for _ in range(4):
        straight.step()
    first = trainer_of(tmp_path, "switch", overrides, fused=True)
    for _ in range(2):
        first.step()
    first.save()
    first.close()
    resumed = trainer_of(tmp_path, "switch", overrides, fused=False, backend=None)  # eager: the reference
    resumed.resume()
    for _ in range(2):
        resumed.step()
    assert resumed._fused is None
    assert_close_runs(straight, resumed)


def test_a_changed_setting_builds_a_new_fused_update(tmp_path: Path) -> None:
    trainer = trainer_of(tmp_path, "rebuild", ["train.meta_lr=0.01"], fused=True)
    trainer.step()
    first = trainer._fused
    trainer.cfg.train.grad_clip = 1e-3
    trainer.step()
    assert trainer._fused is not first and trainer._fused.clip == 1e-3
    second = trainer._fused
    trainer.learner.compile(backend="eager")  # compiled again, other options: a new update compiled like it
    trainer.step()
    assert trainer._fused is not second and trainer._fused._source is trainer.learner._compiled


def test_a_non_finite_first_step_creates_no_optimizer_state(tmp_path: Path) -> None:
    trainer = trainer_of(tmp_path, "nan-first", ["train.meta_lr=0.01"], fused=True)
    with torch.no_grad():
        next(trainer.learner.parameters()).mul_(1e200)
    with pytest.raises(DivergenceError, match="at iteration 1: meta-loss"):
        trainer.step()
    assert trainer._fused is not None and not trainer.optimizer.state


def test_a_non_finite_step_changes_nothing(tmp_path: Path) -> None:
    trainer = trainer_of(tmp_path, "nan", ["train.meta_lr=0.01"], fused=True)
    trainer.step()
    with torch.no_grad():
        next(trainer.learner.parameters()).mul_(1e200)  # the forward pass overflows to inf
    before = {k: v.clone() for k, v in trainer.learner.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in trainer.optimizer.state_dict()["state"].items()}
    with pytest.raises(DivergenceError, match="at iteration 2: meta-loss"):
        trainer.step()
    assert trainer._fused is not None
    for k, v in trainer.learner.state_dict().items():
        assert torch.equal(v, before[k]), k
    for i, state in trainer.optimizer.state_dict()["state"].items():
        for k, v in state.items():
            assert torch.equal(v, moments[i][k]), (i, k)
    assert trainer.iteration == 1


def test_what_is_not_fused_takes_the_separate_path(tmp_path: Path) -> None:
    trainer = trainer_of(tmp_path, "t", ["train.meta_lr=0.01"], fused=True)
    learner, optimizer = trainer.learner, trainer.optimizer
    assert unfused_reason(learner, optimizer, 4, 1) is None
    assert "all-reduced" in unfused_reason(learner, optimizer, 4, 2)
    learner.vectorize = 2
    assert "chunks" in unfused_reason(learner, optimizer, 4, 1)
    learner.vectorize = True
    optimizer.param_groups[0]["weight_decay"] = 1e-4
    assert "weight_decay" in unfused_reason(learner, optimizer, 4, 1)
    trainer.step()  # the separate update, which decays the weights
    assert trainer._fused is None
    optimizer.param_groups[0]["weight_decay"] = 0
    trainer.step()
    assert trainer._fused is not None
    handle = optimizer.register_step_post_hook(lambda *a: None)
    assert "hooks" in unfused_reason(learner, optimizer, 4, 1)
    calls = []
    handle.remove()
    handle = optimizer.register_step_post_hook(lambda *a: calls.append(1))
    trainer.step()
    assert calls == [1]  # the user's hook ran: the separate update
    handle.remove()
    trainer.optimizer = torch.optim.RMSprop(learner.parameters(), lr=1e-3)
    assert "RMSprop" in unfused_reason(learner, trainer.optimizer, 4, 1)
    momentum = torch.optim.SGD(learner.parameters(), lr=1e-3, momentum=0.9)
    assert "momentum" in unfused_reason(learner, momentum, 4, 1)
    for key, value in (("amsgrad", True), ("maximize", True), ("capturable", True), ("lr", torch.tensor(0.1)),
                       ("lr", math.inf)):  # fmt: skip
        group = torch.optim.Adam(learner.parameters(), lr=1e-3)
        group.param_groups[0][key] = value
        assert unfused_reason(learner, group, 4, 1) is not None, key
    frozen = torch.optim.Adam(learner.parameters(), lr=1e-3)
    next(learner.parameters()).requires_grad_(False)
    assert "frozen" in unfused_reason(learner, frozen, 4, 1)
    next(learner.parameters()).requires_grad_(True)
    foreign = torch.optim.Adam([*learner.parameters(), torch.nn.Parameter(torch.zeros(2))])
    assert "not the learner's" in unfused_reason(learner, foreign, 4, 1)
    eager = Trainer(cfg_of(), tmp_path / "eager")
    assert "not compiled" in unfused_reason(eager.learner, eager.optimizer, 4, 1)
    eager.step()
    assert eager._fused is None


class _OwnSampling(Sinusoid):
    """A user's family that changes `sample` and inherits `draw`/`assemble`: they no longer describe its tasks."""

    def sample(self, batch_size: int, shots: int, queries: int, generator: torch.Generator, scoring: str = "paper"):
        batch = super().sample(batch_size, shots, queries, generator, scoring)
        return TaskBatch(batch.support_x, -batch.support_y, batch.query_x, -batch.query_y, batch.info)


class _Delegating:
    """A wrapper family that serves everything but `sample` through __getattr__."""

    def __init__(self) -> None:
        self.inner, self.name = Sinusoid(), "delegating"

    def sample(self, *args, **kwargs):
        return self.inner.sample(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)


def test_tasks_assembled_in_the_graph_are_the_eager_tasks(tmp_path: Path) -> None:
    """The same fused training with the tasks assembled in the graph and sampled eagerly: bit for bit under
    aot_eager (eager kernels), in float64 where no rounding to float32 hides a difference."""
    overrides = ["task.noise=0.1", "train.meta_lr=0.01", "algorithm.inner_steps=2"]
    inside, outside = (trainer_of(tmp_path, name, overrides, fused=True) for name in ("inside", "outside"))
    outside._assembled_in_graph = lambda: False
    for _ in range(3):
        a, b = inside.step(), outside.step()
        assert a == b
    assert inside._fused is not None and outside._fused is not None
    for (k, v), w in zip(inside.learner.state_dict().items(), outside.learner.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert torch.equal(inside.generator.get_state(), outside.generator.get_state())


class _Lines:
    """A user's own regression family (not the sinusoid's) offering the optional draw/assemble pair."""

    name = "lines"

    def draw(self, batch_size: int, shots: int, queries: int, generator: torch.Generator) -> tuple[torch.Tensor]:
        return (torch.rand(batch_size * (2 + shots + queries), generator=generator, dtype=torch.float64),)

    def assemble(self, draws: tuple[torch.Tensor], batch_size: int, shots: int, queries: int) -> TaskBatch:
        (u,) = draws
        b, dtype = batch_size, torch.get_default_dtype()
        slope, offset = (u[:b] * 4 - 2)[:, None, None], (u[b : 2 * b] * 2 - 1)[:, None, None]
        x = (u[2 * b :] * 10 - 5).view(b, shots + queries, 1)
        y = slope * x + offset
        info = {"slope": slope.flatten().to(dtype)}
        sx, qx, sy, qy = x[:, :shots], x[:, shots:], y[:, :shots], y[:, shots:]
        return TaskBatch(sx.to(dtype), sy.to(dtype), qx.to(dtype), qy.to(dtype), info)

    def sample(self, batch_size: int, shots: int, queries: int, generator: torch.Generator) -> TaskBatch:
        return self.assemble(self.draw(batch_size, shots, queries, generator), batch_size, shots, queries)


def test_a_users_family_with_draw_and_assemble_trains_in_the_graph_as_sampled_eagerly(tmp_path: Path) -> None:
    """docs/extending.md's optional pair on a family of the user's: assembled inside the compiled update, it
    trains bit for bit as the same family sampled eagerly (float64, aot_eager)."""
    inside, outside = (trainer_of(tmp_path, name, ["train.meta_lr=0.01"], fused=True) for name in ("in", "out"))
    for trainer in (inside, outside):
        trainer.tasks = _Lines()
    outside._assembled_in_graph = lambda: False
    assert assembles(inside.tasks) and inside._assembled_in_graph()
    for _ in range(3):
        assert inside.step() == outside.step()
    assert inside._fused is not None and outside._fused is not None
    for (k, v), w in zip(inside.learner.state_dict().items(), outside.learner.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert torch.equal(inside.generator.get_state(), outside.generator.get_state())


def test_only_a_family_whose_sample_is_draw_then_assemble_is_assembled_in_the_graph(tmp_path: Path) -> None:
    assert assembles(Sinusoid()) and not assembles(_OwnSampling())
    assert not assembles(_Delegating())  # draw and assemble from __getattr__: whose sample is it?
    patched = Sinusoid()
    patched.sample = lambda *args, **kwargs: None  # on the instance
    assert not assembles(patched)

    class Later(Sinusoid):
        pass

    assert assembles(Later())  # (the answer for the class is now cached)
    Later.sample = lambda self, *args, **kwargs: None  # replaced on the class afterwards: no longer assembled
    assert not assembles(Later())

    @dataclass
    class Unhashable:  # a callable object as the method (a dataclass with eq: not hashable)
        def __call__(self, *args, **kwargs):
            return None

    Later.sample = Unhashable()
    assert not assembles(Later())
    trainer = trainer_of(tmp_path, "own", ["train.meta_lr=0.01"], fused=True)
    trainer.tasks = _OwnSampling()
    assert not trainer._assembled_in_graph()
    batches = []
    trainer.learner._check_batch = lambda batch, named: batches.append(batch)  # sees the batch it trains on
    state = trainer.generator.get_state()
    trainer.step()
    expected = _OwnSampling().sample(4, trainer.cfg.task.shots, trainer.cfg.task.queries,
                                     torch.Generator().set_state(state))  # fmt: skip
    assert trainer._fused is not None and len(batches) == 1
    assert torch.equal(batches[0].support_y, expected.support_y.to(torch.float64))


def test_an_optimizer_of_some_tensors_clips_by_the_norm_of_all(tmp_path: Path) -> None:
    """The separate path's norm (guard, clipping, grad_norm) covers every gradient the learner writes, also those
    of tensors the optimizer does not hold (here Meta-SGD's learned rates, kept fixed by the user)."""
    overrides = [*CASES["metasgd-sgd"], "train.optimizer=adam", "train.grad_clip=1e-3"]
    runs = []
    for fused in (True, False):
        trainer = trainer_of(tmp_path, f"some-{fused}", overrides, fused=fused)
        trainer.optimizer = torch.optim.Adam(trainer.learner.model.parameters(), lr=0.01, fused=True)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda i: 1.0)
        runs.append((trainer, [trainer.step() for _ in range(2)]))
    (fused, mf), (separate, ms) = runs
    assert fused._fused is not None and separate._fused is None
    for a, b in zip(mf, ms, strict=True):
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-12)
    assert_close_runs(fused, separate)


def _with_model(trainer: Trainer, model: torch.nn.Module, compiled: bool = True) -> Trainer:
    """``trainer`` training MAML on a user's own network (float64, compiled with aot_eager unless not
    ``compiled``: the eager reference)."""
    trainer.learner = type(trainer.learner)(model.double(), inner_lr=0.01, vectorize=True)
    if compiled:
        trainer.learner.compile(backend="aot_eager")
    trainer.optimizer = torch.optim.Adam(trainer.learner.parameters(), lr=0.05, fused=True)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda i: 1.0)
    return trainer


def test_a_users_module_with_dropout_and_layer_norm_trains_as_the_separate_parts(tmp_path: Path) -> None:
    """A user's nn.Module through the fused update: layer norm (swapped for metagrad's exact one) and dropout (a
    mask per task, seeded from the trainer's generator after the task draws), as the separate path trains it."""
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(),
                                    torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))  # fmt: skip
        trainer = _with_model(trainer_of(tmp_path, f"user-{fused}", [], fused=fused, backend=None), model, fused)
        runs.append((trainer, [trainer.step() for _ in range(3)]))
    (fused, mf), (separate, ms) = runs
    assert fused._fused is not None and separate._fused is None and fused.learner.random
    for a, b in zip(mf, ms, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-12)
    assert_close_runs(fused, separate)


def test_running_statistics_take_the_separate_path(tmp_path: Path) -> None:
    """learner.backward folds the batch into batch-norm running statistics before the optimizer's step, with the
    weights the meta-gradient used: such a learner keeps the separate update."""
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 1))  # fmt: skip
        trainer = _with_model(trainer_of(tmp_path, f"bn-{fused}", [], fused=fused), model)
        assert fused is False or "running statistics" in unfused_reason(trainer.learner, trainer.optimizer, 4, 1)
        for _ in range(2):
            trainer.step()
        runs.append(trainer)
    assert runs[0]._fused is None
    assert_close_runs(*runs)


class _Scaled(torch.nn.Module):
    """A network with a learned scalar: a 0-dim parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.net(x)


def test_a_scalar_parameter_trains_as_the_separate_parts(tmp_path: Path) -> None:
    """A 0-dim float64 parameter and its Adam moments: Dynamo drops in-place writes to such inputs (the canary
    below), so the fused update writes them through one-element views."""
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        trainer = _with_model(trainer_of(tmp_path, f"scalar-{fused}", [], fused=fused, backend=None), _Scaled(), fused)
        for _ in range(3):
            trainer.step()
        runs.append(trainer)
    assert runs[0]._fused is not None and runs[1]._fused is None
    assert runs[0].learner.params["scale"].item() != 1.5  # it trained
    assert_close_runs(*runs)


def test_canary_dynamo_still_drops_writes_to_0_dim_float64_inputs() -> None:
    """PyTorch 2.13: ``t.copy_(...)`` on a 0-dim float64 CPU input of a function compiled with AOTAutograd's
    backends is lost, without a word. Fails the day PyTorch keeps the write: ``fused_update._assign`` may then
    write directly."""

    def bump(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t.copy_(t + x.sum())
        return x * 2

    t = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        torch.compile(bump, backend="aot_eager")(t, torch.ones(2, dtype=torch.float64))
    assert t.item() == 0.0, "Dynamo now keeps in-place writes to 0-dim float64 inputs: drop _assign's view"


def test_reptile_adapting_some_weights_moves_only_those_as_the_separate_parts(tmp_path: Path) -> None:
    """Reptile moves only the weights its inner loop adapts (adapt_only): the optimizer's other tensors get no
    update and no state, fused as separately; a subclass with a meta-step of its own keeps the separate path."""
    from metagrad.algorithms import Reptile
    from metagrad.models import MLP

    runs = []
    for fused in (True, False):
        trainer = trainer_of(tmp_path, f"reptile-{fused}", ["algorithm.name=reptile", "algorithm.inner_steps=2"],
                             fused=fused, backend=None)  # fmt: skip
        torch.manual_seed(0)
        trainer.learner = Reptile(MLP(1, (8, 8), 1).double(), inner_steps=2, inner_batch=5, adapt_only=["4."])
        if fused:
            trainer.learner.compile(backend="aot_eager")
        trainer.optimizer = torch.optim.SGD(trainer.learner.parameters(), lr=0.5)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda i: 1.0)
        before = {k: v.clone() for k, v in trainer.learner.params.items()}
        for _ in range(2):
            trainer.step()
        runs.append(trainer)
        moved = {k for k, v in trainer.learner.params.items() if not torch.equal(v, before[k])}
        assert moved == {"4.weight", "4.bias"}, moved
    assert runs[0]._fused is not None and runs[1]._fused is None
    assert_close_runs(*runs)

    class OwnStep(Reptile):
        def _meta_step(self, *args, **kwargs):  # e.g. a scaled move: the inherited fused form knows nothing of it
            return super()._meta_step(*args, **kwargs)

    own = OwnStep(MLP(1, (4,), 1))
    own.compile(backend="aot_eager")
    assert "own meta-step" in unfused_reason(own, torch.optim.SGD(own.parameters(), lr=0.1), 4, 1)
