"""A task family's optional members (evaluation_tasks, curve) give it what the sinusoid family has, without any
code that asks for a family by name."""

from __future__ import annotations

from pathlib import Path

import torch

from metagrad import MAML, MLP, Sinusoid, TaskBatch, plots
from metagrad.evaluate import evaluate, fixed_tasks


class Line:
    """y = a·x on [-1, 1]: a user's 1-D regression family with neither optional member."""

    name = "line"
    loss = "mse"
    input_shape = (1,)
    outputs = 1
    x_range = (-1.0, 1.0)

    def sample(self, batch_size: int, shots: int, queries: int, generator: torch.Generator) -> TaskBatch:
        a = torch.rand(batch_size, 1, 1, generator=generator) * 2 - 1
        x = torch.rand(batch_size, shots + queries, 1, generator=generator) * 2 - 1
        info = {"a": a[:, 0, 0]}
        return TaskBatch(x[:, :shots], a * x[:, :shots], x[:, shots:], a * x[:, shots:], info)


class GridLine(Line):
    """The same family with a dense evaluation grid and its curve."""

    def evaluation_tasks(self, n: int, shots: int, queries: int, scoring: str, generator: torch.Generator):
        batch = self.sample(n, shots, 1, generator)
        grid = torch.linspace(-1, 1, 7).expand(n, 7)[..., None]
        a = batch.info["a"][:, None, None]
        return TaskBatch(batch.support_x, batch.support_y, grid, a * grid, batch.info)

    def curve(self, x: torch.Tensor, info: dict[str, torch.Tensor]) -> torch.Tensor:
        return info["a"][:, None, None].to(x) * x


def test_evaluation_tasks_decide_the_fixed_test_set() -> None:
    learner = MAML(MLP(hidden=(8,)), inner_lr=0.1, inner_steps=1)
    plain = fixed_tasks(Line(), 4, 3, "dense", queries=5)
    assert plain.query_x.shape == (4, 5, 1)  # sample() with `queries`
    grid = fixed_tasks(GridLine(), 4, 3, "dense", queries=5)
    assert grid.query_x.shape == (4, 7, 1) and torch.equal(grid.query_x[0, :, 0], torch.linspace(-1, 1, 7))
    # evaluate() scores those sets: the grid's curve is the mean over its 7 points.
    curve = learner.adaptation_curve(grid, 1)
    assert (
        evaluate(learner, GridLine(), shots=(3,), steps=1, tasks=4)["results"][0]["mse"]
        == curve.double().mean(0).tolist()
    )
    # The shipped family the same way: its dense grid and its K paper queries.
    assert fixed_tasks(Sinusoid(), 2, 5, "dense").query_x.shape == (2, 100, 1)
    assert fixed_tasks(Sinusoid(), 2, 5, "paper", queries=15).query_x.shape == (2, 5, 1)


def test_a_family_with_a_curve_gets_example_fits(tmp_path: Path, monkeypatch) -> None:
    drawn: list[str] = []
    real = plots.draw_fit
    monkeypatch.setattr(
        plots,
        "draw_fit",
        lambda ax, learner, dist, *a, **k: (drawn.append(dist.name), real(ax, learner, dist, *a, **k)),
    )
    learner = MAML(MLP(hidden=(8,)), inner_lr=0.1, inner_steps=1)
    for family in (Line(), GridLine()):
        result = evaluate(learner, family, shots=(3,), steps=1, tasks=4)
        plots.plot_eval(result, learner, family, tmp_path / f"{type(family).__name__}.png", examples=2)
    assert drawn == ["line", "line"]  # GridLine's two examples; Line has no curve to draw
    assert (tmp_path / "Line.png").stat().st_size > 0
