"""Few-shot sinusoid regression (Finn, Abbeel & Levine 2017, section 5.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metagrad.registry import register_task
from metagrad.tasks.base import TaskBatch

__all__ = ["Sinusoid", "SinusoidConfig", "OracleSinusoid", "SCORINGS", "DENSE_POINTS"]

SCORINGS = ("dense", "paper")
DENSE_POINTS = 100


def _check_range(name: str, r: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(r[0]), float(r[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"{name} must be a finite range [low, high] with low < high, got {list(r)}")
    return lo, hi


def _scaled(u: Tensor, r: tuple[float, float]) -> Tensor:
    """Uniforms in [0, 1) mapped onto ``r`` (the same arithmetic for ``sample`` and ``assemble``: bit for bit)."""
    return u * (r[1] - r[0]) + r[0]


@dataclass
class SinusoidConfig:
    """``[task]`` options of the sinusoid family (``name = "sinusoid"``)."""

    shots: int = 10
    queries: int = 10
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    noise: float = 0.0


@register_task("sinusoid", config=SinusoidConfig)
@dataclass
class Sinusoid:
    """y = A·sin(x − φ) with A ~ U[amplitude], φ ~ U[phase], x ~ U[x_range], plus optional Gaussian noise.

    Sampled as batched tensors [B, K, 1]; every random number comes from the generator passed in.
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    noise: float = 0.0
    name: str = "sinusoid"
    input_features = 1
    loss = "mse"
    outputs = 1

    @classmethod
    def from_config(cls, options: SinusoidConfig, split: str = "test") -> Sinusoid:
        """Every split draws from the same family (the tasks are infinitely many)."""
        o = options
        return cls(tuple(o.amplitude), tuple(o.phase), tuple(o.x_range), o.noise)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.input_features,)

    @classmethod
    def spec(cls, options: Any) -> tuple[tuple[int, ...], int]:
        return (cls.input_features,), cls.outputs

    def __post_init__(self) -> None:
        self.amplitude = _check_range("amplitude", self.amplitude)
        self.phase = _check_range("phase", self.phase)
        self.x_range = _check_range("x_range", self.x_range)
        if not math.isfinite(self.noise) or self.noise < 0:
            raise ValueError(f"noise must be a finite standard deviation >= 0, got {self.noise}")

    def _uniform(self, shape: tuple[int, ...], r: tuple[float, float], g: torch.Generator) -> Tensor:
        return _scaled(torch.rand(shape, generator=g, dtype=torch.float64), r)

    def function(self, x: Tensor, amplitude: Tensor, phase: Tensor) -> Tensor:
        """The noise-free curves: ``x`` [B, N, 1], ``amplitude`` and ``phase`` [B]."""
        return amplitude[:, None, None] * torch.sin(x - phase[:, None, None])

    def inputs(self, x: Tensor, info: dict[str, Tensor]) -> Tensor:
        """What the network sees for points ``x`` [B, N, 1] of tasks with parameters ``info``."""
        return x

    def curve(self, x: Tensor, info: dict[str, Tensor]) -> Tensor:
        """The noise-free targets at points ``x`` [B, N, 1] of the tasks ``info`` describes (with ``x_range``, what
        the example-fit figures of ``eval --plot`` and ``compare`` draw)."""
        return self.function(x, info["amplitude"], info["phase"])

    def evaluation_tasks(self, n: int, shots: int, queries: int, scoring: str, generator: torch.Generator) -> TaskBatch:
        """The fixed test tasks the evaluator scores: ``dense`` on the 100-point noise-free grid, ``paper`` on
        ``shots`` query points drawn like the support (the MAML authors' code); ``queries`` is not used."""
        return self.sample(n, shots, shots, generator, scoring=scoring)

    def _targets(self, x: Tensor, a: Tensor, p: Tensor, g: torch.Generator) -> Tensor:
        y = self.function(x, a, p)
        if self.noise > 0:
            y = y + self.noise * torch.randn(y.shape, generator=g, dtype=y.dtype)
        return y

    def sample(
        self, batch_size: int, shots: int, queries: int, generator: torch.Generator, scoring: str = "paper"
    ) -> TaskBatch:
        """Draw tasks. ``scoring="paper"`` draws the queries like the support (the MAML authors' code);
        ``"dense"`` uses ``DENSE_POINTS`` evenly spaced noise-free query points over ``x_range`` instead
        (``queries`` is then ignored)."""
        if batch_size <= 0 or shots <= 0 or queries <= 0:
            raise ValueError(f"batch size, shots and queries must be positive, got {batch_size}, {shots}, {queries}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        if scoring == "paper":
            return self.assemble(self.draw(batch_size, shots, queries, generator), batch_size, shots, queries)
        g = generator
        a = self._uniform((batch_size,), self.amplitude, g)
        p = self._uniform((batch_size,), self.phase, g)
        sx = self._uniform((batch_size, shots, 1), self.x_range, g)
        sy = self._targets(sx, a, p, g)
        grid = torch.linspace(*self.x_range, DENSE_POINTS, dtype=torch.float64)
        qx = grid.expand(batch_size, DENSE_POINTS)[..., None].clone()
        qy = self.function(qx, a, p)
        return self._batch(sx, sy, qx, qy, a, p)

    def draw(self, batch_size: int, shots: int, queries: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """Every random number of ``sample(batch_size, shots, queries, generator)``, in the generator's order:
        uniforms in [0, 1) for the amplitudes, phases and support points, the support noise, the query points'
        uniforms, the query noise (standard normals). Without noise, the two uniforms' calls only (they then follow
        each other, and one call gives the same numbers). For ``"paper"`` scoring, the one training uses:
        ``"dense"`` scoring draws apart, so a subclass that overrides this changes the training tasks only."""
        g, b = generator, batch_size
        if self.noise == 0:
            return (torch.rand(b * (2 + shots + queries), generator=g, dtype=torch.float64),)
        first = torch.rand(b * (2 + shots), generator=g, dtype=torch.float64)
        noise_s = torch.randn(b * shots, generator=g, dtype=torch.float64)
        query = torch.rand(b * queries, generator=g, dtype=torch.float64)
        noise_q = torch.randn(b * queries, generator=g, dtype=torch.float64)
        return first, noise_s, query, noise_q

    def assemble(self, draws: tuple[Tensor, ...], batch_size: int, shots: int, queries: int) -> TaskBatch:
        """The tasks that ``draws`` (from :meth:`draw`) stand for: tensor arithmetic only, no generator, so that a
        compiled training step can run it inside its graph (``metagrad.fused_update``). Bit for bit the tasks of
        :meth:`sample`, as one ``torch.rand`` call gives the numbers of several in a row (eagerly; in a compiled
        graph Inductor's float64 ``sin`` may differ in the last bit)."""
        b = batch_size
        if len(draws) == 1:  # no noise: one call drew the support's numbers and then the queries'
            first, query = draws[0][: b * (2 + shots)], draws[0][b * (2 + shots) :]
        else:
            first, noise_s, query, noise_q = draws

        a, p = _scaled(first[:b], self.amplitude), _scaled(first[b : 2 * b], self.phase)
        sx = _scaled(first[2 * b :], self.x_range).view(b, shots, 1)
        qx = _scaled(query, self.x_range).view(b, queries, 1)
        sy, qy = self.function(sx, a, p), self.function(qx, a, p)
        if self.noise > 0:
            sy = sy + self.noise * noise_s.view(b, shots, 1)
            qy = qy + self.noise * noise_q.view(b, queries, 1)
        return self._batch(sx, sy, qx, qy, a, p)

    def _batch(self, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, a: Tensor, p: Tensor) -> TaskBatch:
        f = torch.get_default_dtype()
        info = {"amplitude": a.to(f), "phase": p.to(f)}
        return TaskBatch(self.inputs(sx.to(f), info), sy.to(f), self.inputs(qx.to(f), info), qy.to(f), info)


@dataclass
class OracleSinusoid(Sinusoid):
    """The same tasks (same random draws) with inputs ``[x, A, φ]``: the MAML paper's oracle baseline."""

    input_features = 3

    def inputs(self, x: Tensor, info: dict[str, Tensor]) -> Tensor:
        params = torch.stack([info["amplitude"], info["phase"]], dim=-1).to(x)  # [B, 2]
        return torch.cat([x, params[:, None, :].expand(*x.shape[:2], 2)], dim=-1)
