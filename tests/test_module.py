"""The learner as a PyTorch module: ordinary networks (BatchNorm with running statistics, dropout, frozen parts),
``backward()`` into ``.grad``, state that never goes stale, and clear errors for bad batches and models."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from meta_gradcheck import assert_every_tensor_matches_central_differences
from torch import nn

from metagrad import MAML, CompileError, DataError, MAMLEnhanced, MetaSGD, ModelError, Reptile
from metagrad.models import MLP
from metagrad.tasks import Sinusoid, TaskBatch

F64 = torch.float64
DATA = Path(__file__).resolve().parents[2] / "shared/data/omniglot"
ZIPS = ("images_background_small1.zip", "images_background_small2.zip")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cnn(dropout: float = 0.2, seed: int = 0) -> nn.Sequential:
    """An ordinary researcher's CNN for 28x28 images: stock BatchNorm2d (running statistics) and Dropout."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(6, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(24, 5),
    )  # fmt: skip


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    """5-way 1-shot episodes of real Omniglot characters (or, without the data, random images)."""
    if all((DATA / z).is_file() for z in ZIPS):
        from metagrad.tasks.episodes import EpisodeSampler
        from metagrad.tasks.omniglot import load_omniglot

        images, labels, _ = load_omniglot(DATA, cache_dir=tmp_path_factory.mktemp("cache"))
        sampler = EpisodeSampler(images, labels, ways=5)
        return lambda b, seed: sampler.sample(b, 1, 2, gen(seed))
    pytest.skip(f"Omniglot subset not found at {DATA}")


ALGORITHMS = {
    "maml": lambda m: MAML(m, inner_lr=0.4, loss="cross_entropy"),
    "fomaml": lambda m: MAML(m, inner_lr=0.4, first_order=True, loss="cross_entropy"),
    "reptile": lambda m: Reptile(m, inner_lr=0.1, inner_steps=2, inner_batch=5, loss="cross_entropy"),
    "metasgd": lambda m: MetaSGD(m, inner_lr=0.4, loss="cross_entropy"),
    "maml_enhanced": lambda m: MAMLEnhanced(m, inner_lr=0.1, inner_steps=2, loss="cross_entropy"),
}


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_ordinary_cnn_trains_with_every_algorithm_and_tracks_running_statistics(name, episodes):
    learner = ALGORITHMS[name](cnn())
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    g = gen(0)
    bn = learner.model[1]
    start = {k: v.clone() for k, v in learner.state_dict().items()}
    for it in range(2):
        opt.zero_grad()
        metrics = learner.backward(episodes(4, it), generator=g)
        opt.step()
    assert torch.isfinite(metrics["loss"])
    assert not torch.equal(learner.model[0].weight, start["model.0.weight"])  # the user's module is trained
    assert int(bn.num_batches_tracked) > 0 and not torch.equal(bn.running_mean, start["model.1.running_mean"])
    # Evaluation never writes the running statistics, in either mode, and gives the same numbers twice.
    trained = {k: v.clone() for k, v in learner.state_dict().items()}
    batch = episodes(3, 100)
    for mode in (learner.train, learner.eval):
        mode()
        first = learner.adaptation_curve(batch, 2)
        assert torch.equal(first, learner.adaptation_curve(batch, 2))
        assert all(torch.equal(v, learner.state_dict()[k]) for k, v in trained.items())
    # The same numbers after save -> load into a fresh learner.
    fresh = ALGORITHMS[name](cnn(seed=1))
    fresh.load_state_dict(learner.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh.adaptation_curve(batch, 2), first, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["maml", "maml_enhanced", "reptile"])
def test_ordinary_cnn_vmap_equals_loop_with_dropout_off(name, episodes):
    batch = episodes(3, 0)
    grads = []
    for vectorize in (True, False):
        learner = ALGORITHMS[name](cnn(dropout=0.0))
        learner.vectorize = vectorize
        gp, gm, metrics = learner.meta_gradient(batch, 0, gen(5))
        grads.append({**gp, **gm, "loss": metrics["loss"]})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-6)


def test_ordinary_cnn_meta_gradient_equals_float64_central_difference(episodes):
    """Second-order MAML through stock BatchNorm2d (smooth activations, so the difference crosses no kink)."""
    model = cnn(dropout=0.0)
    model[2], model[6] = nn.Tanh(), nn.Tanh()
    learner = MAML(model, inner_lr=0.4, inner_steps=2, loss="cross_entropy").double()
    batch = episodes(2, 0).to("cpu", F64)
    batch = TaskBatch(batch.support_x[..., ::2, ::2], batch.support_y, batch.query_x[..., ::2, ::2], batch.query_y)
    gp, gm, _ = learner.meta_gradient(batch, 0)
    assert_every_tensor_matches_central_differences(learner, batch, gp, gm)


def test_dropout_draws_per_task_from_the_generator_and_is_off_in_adaptation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 1))
    learner = MAML(model, inner_lr=0.01)
    one = Sinusoid().sample(1, 5, 5, gen(0))
    same = TaskBatch(*(t.expand(4, *t.shape[1:]) for t in (one.support_x, one.support_y, one.query_x, one.query_y)))

    def per_task_losses(seed: int) -> torch.Tensor:
        with learner._task_randomness(gen(seed), torch.device("cpu")):
            tasks = (same.support_x, same.support_y, same.query_x, same.query_y)
            return learner.map_tasks(lambda p, t: learner.loss(p, t[2], t[3]), (dict(learner.params),), tasks)

    losses = per_task_losses(0)
    assert losses.unique().numel() == 4  # four identical tasks, four different dropout masks
    assert torch.equal(losses, per_task_losses(0))  # seeded by the trainer's generator
    state = torch.get_rng_state()
    a, b = learner.meta_gradient(same, 0, gen(1)), learner.meta_gradient(same, 0, gen(1))
    assert torch.equal(a[2]["loss"], b[2]["loss"]) and torch.equal(state, torch.get_rng_state())
    x = torch.linspace(-5, 5, 20)[:, None]
    assert torch.equal(learner.predict(x), learner.predict(x))  # off unless asked
    adapted = learner.adapt(one.support_x[0], one.support_y[0], steps=2)
    assert torch.equal(
        learner.predict(x, adapted), learner.predict(x, learner.adapt(one.support_x[0], one.support_y[0], steps=2))
    )
    assert not torch.equal(learner.predict(x, dropout=True), learner.predict(x, dropout=True))
    assert learner.model.training  # restored


def test_dropout_training_resumes_bit_identically():
    """Train 6 steps straight, or 3, save everything (state_dict, optimizer, generator), load into a fresh
    learner and train 3 more: the same weights, bit for bit."""

    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        learner = MAMLEnhanced(model, inner_steps=2)
        return learner, torch.optim.Adam(learner.parameters(), lr=1e-2)

    def run(learner, opt, g, start, stop):
        for it in range(start, stop):
            opt.zero_grad()
            learner.backward(Sinusoid().sample(4, 5, 5, g), it, g)
            opt.step()

    straight, opt = fresh()
    g = gen(7)
    run(straight, opt, g, 0, 6)
    first, opt = fresh()
    g = gen(7)
    run(first, opt, g, 0, 3)
    saved = copy.deepcopy((first.state_dict(), opt.state_dict(), g.get_state()))
    torch.manual_seed(123)  # the global RNG must not matter
    second, opt2 = fresh()
    second.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    g2 = torch.Generator()
    g2.set_state(saved[2])
    run(second, opt2, g2, 3, 6)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, second.state_dict()[k]), k


def test_module_calls_mean_what_pytorch_users_expect():
    learner = MAMLEnhanced(MLP(), inner_steps=2)
    names = [n for n, _ in learner.named_parameters()]
    assert any(n.startswith("model.") for n in names) and any(n.startswith("rule.") for n in names)
    assert {id(p) for p in learner.parameters()} == {id(p) for p in learner.model.parameters()} | {
        id(p) for p in learner.rule.parameters()
    }
    opt = torch.optim.Adam([{"params": learner.model.parameters()}, {"params": learner.rule.parameters(), "lr": 0.1}])
    learner.to(torch.float64)  # in place, after the optimizer was made: it must keep working
    assert all(p.dtype == F64 for p in learner.parameters())
    before = learner.model[0].weight.clone()
    opt.zero_grad()
    learner.backward(Sinusoid().sample(4, 5, 5, gen(0)).to("cpu", F64))
    opt.step()
    assert not torch.equal(before, learner.model[0].weight)
    x = torch.linspace(-3, 3, 7, dtype=F64)[:, None]
    torch.testing.assert_close(learner(x), learner.model(x))
    assert learner.double() is learner and learner.eval() is learner and not learner.model.training
    learner.train()
    assert learner.model.training
    # state_dict round trip, rule tensors included
    other = MAMLEnhanced(MLP(), inner_steps=2).double()
    other.load_state_dict(learner.state_dict())
    for k, v in learner.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    # the live views write through
    learner.params["0.bias"] = torch.zeros(40, dtype=F64)
    assert torch.equal(learner.model[0].bias, torch.zeros(40, dtype=F64))


def test_backward_accumulates_and_works_with_schedulers_and_clipping():
    learner = MAML(MLP(), inner_lr=0.01)
    batch = Sinusoid().sample(4, 5, 5, gen(0))
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    gp, _, _ = learner.meta_gradient(batch, 0)
    learner.backward(batch)
    learner.backward(batch)  # accumulates, as loss.backward() does
    for k, g in gp.items():
        torch.testing.assert_close(learner.params[k].grad, 2 * g)
    torch.nn.utils.clip_grad_norm_(learner.parameters(), 1e-3)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05 and learner.iteration == 2


def test_frozen_backbone_gets_no_gradient_and_does_not_move():
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    for p in model[:4].parameters():
        p.requires_grad_(False)
    for cls in (MAML, MAMLEnhanced, Reptile):
        learner = cls(copy.deepcopy(model))
        assert learner.fast == ["4.weight", "4.bias"]
        frozen = {k: v.clone() for k, v in learner.params.items() if not v.requires_grad}
        opt = torch.optim.Adam(learner.parameters(), lr=0.1)
        for it in range(2):
            opt.zero_grad()
            learner.backward(Sinusoid().sample(4, 5, 5, gen(it)))
            opt.step()
        for k, v in frozen.items():
            assert learner.params[k].grad is None and torch.equal(learner.params[k], v), (cls.__name__, k)
        adapted = learner.adapt(*Sinusoid().sample(1, 5, 5, gen(9)).support_x, torch.zeros(5, 1), steps=3)
        assert all(torch.equal(adapted[k], v) for k, v in frozen.items())
        assert not torch.equal(adapted["4.weight"], learner.params["4.weight"])


def test_adapt_only_takes_a_module_or_a_predicate_and_tied_weights_work():
    model = MLP()
    head = MAML(model, adapt_only=model[4])
    assert head.fast == ["4.weight", "4.bias"]
    assert copy.deepcopy(head).fast == ["4.weight", "4.bias"]  # chosen by name: a copy's parameters are new objects
    assert MAML(MLP(), adapt_only=lambda name, p: name.endswith("bias")).fast == ["0.bias", "2.bias", "4.bias"]
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False))
    tied[2].weight = tied[0].weight
    learner = MAML(tied, inner_lr=0.1)
    batch = TaskBatch(*(torch.randn(2, 5, 4, generator=gen(i)) for i in range(4)))
    gp, _, _ = learner.meta_gradient(batch, 0)
    assert list(gp) == ["0.weight"] and gp["0.weight"].abs().sum() > 0


def test_loss_and_metric_can_be_any_callable():
    def huber(pred, y):
        return torch.nn.functional.huber_loss(pred, y, delta=0.5)

    learner = MAML(MLP(), loss=huber)
    batch = Sinusoid().sample(3, 5, 5, gen(0))
    assert learner.loss_name == "huber" and learner.metric_name == "huber"
    assert torch.isfinite(learner.backward(batch)["loss"])
    assert learner.adaptation_curve(batch, 1).shape == (3, 2)
    mae = MAML(MLP(), metric=lambda p, y: (p - y).abs().mean())
    assert mae.metric_name == "lambda" and not mae.metric_higher_is_better


BAD_BATCHES = {
    "B differs": (lambda b: TaskBatch(b.support_x, b.support_y[:2], b.query_x, b.query_y), "number of tasks"),
    "no support points": (lambda b: TaskBatch(b.support_x[:, :0], b.support_y[:, :0], b.query_x, b.query_y), "K >= 1"),
    "no query points": (lambda b: TaskBatch(b.support_x, b.support_y, b.query_x[:, :0], b.query_y[:, :0]), "Q >= 1"),
    "y shaped [B, K]": (lambda b: TaskBatch(b.support_x, b.support_y[..., 0], b.query_x, b.query_y), "shape"),
    "x and y disagree on K": (lambda b: TaskBatch(b.support_x, b.support_y[:, :3], b.query_x, b.query_y), "points"),
    "float64 batch, float32 learner": (lambda b: b.to("cpu", F64), "batch.to"),
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_task_batches_give_a_clear_error(case):
    make, match = BAD_BATCHES[case]
    learner = MAML(MLP())
    with pytest.raises(DataError, match=match):
        learner.backward(make(Sinusoid().sample(3, 5, 5, gen(0))))


def test_bad_labels_and_a_batch_given_to_adapt_give_a_clear_error():
    learner = MAML(nn.Sequential(nn.Flatten(), nn.Linear(16, 5)), loss="cross_entropy")
    x = torch.rand(2, 5, 4, 4)
    labels = torch.tensor([[0, 1, 2, 3, 7]] * 2)
    with pytest.raises(DataError, match=r"support_y holds labels in \[0, 7\] .* labels must be in \[0, 5\)"):
        learner.backward(TaskBatch(x, labels, x, labels.clamp_max(4)))
    # Both fields' ranges come from one read: each error names its own field and range.
    with pytest.raises(DataError, match=r"query_y holds labels in \[-1, 3\]"):
        learner.backward(TaskBatch(x, labels.clamp_max(4), x, labels.clamp_max(3) - (labels == 0).long()))
    with pytest.raises(DataError, match="integer class labels"):
        learner.backward(TaskBatch(x, labels.float(), x, labels.float()))
    good = torch.tensor([[0, 1, 2, 3, 4]] * 2)
    learner.backward(TaskBatch(x, good, x, good))
    with pytest.raises(DataError, match="a batch of tasks"):
        learner.adapt(x, good)
    with pytest.raises(DataError, match="not a TaskBatch"):
        learner.adapt(TaskBatch(x, good, x, good), good)


def test_what_torch_func_cannot_run_is_one_clear_error_naming_the_module():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x

    class Noise(nn.Module):
        def forward(self, x):
            return x + torch.randn_like(x)

    batch = Sinusoid().sample(2, 5, 5, gen(0))
    for module, match in ((Counter(), "in place"), (Noise(), "stochastic = True")):
        learner = MAML(nn.Sequential(nn.Linear(1, 8), module, nn.Linear(8, 1)))
        with pytest.raises(ModelError, match=rf"module 1 \({type(module).__name__}\).*{match}"):
            learner.meta_gradient(batch, 0)
    Noise.stochastic = True  # marked: every task draws its own noise
    assert torch.isfinite(MAML(nn.Sequential(nn.Linear(1, 8), Noise(), nn.Linear(8, 1))).backward(batch)["loss"])


@pytest.mark.parametrize("vectorize", [True, False])
def test_in_place_writes_from_the_graph_are_one_clear_error_on_both_paths(vectorize):
    """A buffer updated in place from the activations (a running average) and an in-place activation whose input
    the derivative needs are refused with a ModelError naming the module, vmapped or in the task loop (which
    differentiates with torch.autograd); the buffer keeps no graph afterwards (it would chain every later
    iteration's graph onto it)."""

    class Average(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(8))

        def forward(self, x):
            self.mean.mul_(0.9).add_(0.1 * x.mean(0))
            return x

    batch = Sinusoid().sample(2, 5, 5, gen(0))
    learner = MAML(nn.Sequential(nn.Linear(1, 8), Average(), nn.Tanh(), nn.Linear(8, 1)), vectorize=vectorize)
    with pytest.raises(ModelError, match=r"module 1 \(Average\).*in place"):
        learner.meta_gradient(batch, 0)
    assert learner.model[1].mean.grad_fn is None
    copy.deepcopy(learner)
    learner = MAML(nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.ReLU(inplace=True), nn.Linear(8, 1)),
                   vectorize=vectorize)  # fmt: skip
    with pytest.raises(ModelError, match="in place"):
        learner.meta_gradient(batch, 0)


def test_the_task_loop_under_inference_mode_and_no_grad_gives_the_same_numbers():
    """torch.autograd records nothing in inference mode: the task loop then takes torch.func's transforms, whose
    numbers it gives everywhere else (meta-gradient, adaptation)."""
    batch = Sinusoid().sample(2, 5, 5, gen(0))
    learner = MAML(MLP(), inner_lr=0.1, inner_steps=2, vectorize=False)
    want, adapted = learner.meta_gradient(batch, 0)[0], learner.adapt(batch.support_x[0], batch.support_y[0])
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            got = learner.meta_gradient(batch, 0)[0]
            moved = learner.adapt(batch.support_x[0], batch.support_y[0])
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
            torch.testing.assert_close(moved[k], adapted[k], rtol=1e-6, atol=1e-7, msg=k)
        assert any(not torch.equal(moved[k], learner.params[k]) for k in moved)


def test_an_inner_objective_that_also_reads_the_weights_is_differentiated_as_torch_func_does():
    """The inner gradient is with respect to the adapted weights alone, also at the first step, where they are the
    same tensors as ``params`` (the task loop differentiates a view of them)."""

    class Anchored(MAML):
        def inner_objective(self, params, adapted, x, y, step, anchor=None):
            pull = sum((adapted[k] * params[k]).sum() for k in adapted)
            return super().inner_objective(params, adapted, x, y, step, anchor) + 0.5 * pull

    batch = Sinusoid().sample(3, 5, 5, gen(0))
    torch.manual_seed(0)
    vec = Anchored(MLP(), inner_lr=0.1, inner_steps=2, vectorize=True).double()
    loop = copy.deepcopy(vec)
    loop.vectorize = False
    b = batch.to("cpu", torch.float64)
    want, got = vec.meta_gradient(b, 0)[0], loop.meta_gradient(b, 0)[0]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


def test_compiled_module_path_equals_eager_with_dropout_off():
    batch = Sinusoid().sample(4, 5, 5, gen(0))
    eager = MAML(MLP(), inner_lr=0.01)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    for learner in (eager, compiled):
        learner.backward(batch)
    for (k, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=k)


def _adapt_biases(name: str, p: torch.Tensor) -> bool:
    return name.endswith("bias")


@pytest.mark.parametrize(
    "make",
    [
        lambda: MAML(MLP(), inner_lr=0.1),
        lambda: MAMLEnhanced(MLP(), inner_steps=2),
        lambda: MetaSGD(MLP()),
        lambda: Reptile(MLP()),
        lambda: MAML((m := MLP()), adapt_only=m[4]),  # ANIL: a module, kept by name
        lambda: MAML(MLP(), adapt_only=_adapt_biases),
        lambda: MAML(MLP(), adapt_only=["2.", "4."]),
    ],
    ids=["maml", "enhanced", "metasgd", "reptile", "anil-module", "predicate", "prefixes"],
)
def test_a_learner_pickles_as_pytorch_modules_do(make, tmp_path: Path) -> None:
    """torch.save(learner) / torch.load: the same tensors, the same adapted parameters and the same meta-gradient;
    a compiled learner comes back compiled with its options."""
    learner = make()
    compiled = isinstance(learner, MAML) and learner.fast == learner.trainable  # one case is enough (Dynamo's time)
    if compiled:
        learner.compile(backend="eager")
    torch.save(learner, tmp_path / "learner.pt")
    loaded = torch.load(tmp_path / "learner.pt", weights_only=False)
    assert type(loaded) is type(learner) and loaded.fast == learner.fast
    assert (loaded._compiled is not None) == compiled and loaded._compile_options == learner._compile_options
    for k, v in learner.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    batch = Sinusoid().sample(3, 5, 5, gen(4))
    # To float32 rounding: oneMKL's products may differ in the last bit with the buffers' alignment (Reptile's
    # meta-gradient does from one call to the next on the same learner).
    for a, b in zip(learner.meta_gradient(batch, 0), loaded.meta_gradient(batch, 0), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_a_compiler_backends_failure_is_a_compile_error_not_blamed_on_the_network():
    """A backend that fails (here one of the user's own, as Inductor does with options it cannot honour) is one
    CompileError naming the backend and its error, whatever its text says: before, any text with "vmap" in it read
    as a network that vmap cannot batch, with the wrong fix (vectorize=False)."""

    def failing(gm: torch.fx.GraphModule, example_inputs: list) -> None:
        raise RuntimeError("No choices to select (a made-up error that mentions vmap and an in-place operation)")

    batch = Sinusoid().sample(2, 5, 5, gen(0))
    learner = MAML(MLP(1, [8], 1), inner_lr=0.01)
    learner.compile(backend=failing)
    torch._dynamo.reset()
    try:
        with pytest.raises(CompileError, match=r"backend 'failing' could not compile MAML's meta-step.*choices") as e:
            learner.meta_gradient(batch, 0)
        assert isinstance(e.value.__cause__, torch._dynamo.exc.BackendCompilerFailed)  # the backend's traceback
    finally:
        torch._dynamo.reset()
