"""A function's GPU work captured once in a CUDA graph and replayed (``torch.cuda.CUDAGraph``), without
``torch.compile``: what :class:`~metagrad.Trainer` runs a whole training update through on a GPU
(``train.cuda_graphs``, :mod:`metagrad.fused_update`).

An eager meta-step launches hundreds of small kernels from Python, one at a time (the sinusoid MLP's: a few
microseconds of arithmetic each), so a GPU spends most of an iteration waiting for the host. A replayed graph
launches them all at once, at the cost of a capture the size of one call, where Inductor's CUDA graphs
(``compile(mode="reduce-overhead")``) first compile the step: minutes for Conv-4 (``docs/results.md``).

A graph replays the same kernels on the same memory with the values found there at replay. So the function must
be a pure function of two kinds of tensors, and of values the caller's ``key`` names:

- ``inputs``: tensors whose values change from call to call (the tasks, the learning rates). The graph reads its
  own copies; every call copies the new values in (from the host too) before the replay.
- ``state``: tensors read and written in place, the same memory at every call (the weights, the optimizer's
  moments). A call whose state lives elsewhere (a resumed optimizer's new state, a learner moved) captures again.

Anything else the function reads (a Python number, a shape, a branch taken) is fixed in the graph at capture,
and must be in ``key``. The function may not synchronise with the host (``.item()``, printing a tensor), draw
random numbers, or allocate memory that outlives the call except its outputs, which live in the graph's memory
and are overwritten by the next replay: read them before the next call.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["CapturedFunction", "Graph", "ReplayedCalls"]


class Graph(Protocol):
    """What :class:`CapturedFunction` needs of a graph: ``capture`` records ``body(static)`` without running its
    kernels; ``replay`` runs them; ``output`` is what ``body`` returned, valid after a replay."""

    output: Any

    def capture(self, body: Callable[[list[Tensor]], Any], static: list[Tensor]) -> None: ...

    def replay(self) -> None: ...


class _CUDAGraph:
    """``torch.cuda.CUDAGraph``, captured on PyTorch's side stream into the memory pool ``pool`` (shared by the
    graphs of one :class:`CapturedFunction`)."""

    def __init__(self, pool: Any = None) -> None:
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self, body: Callable[[list[Tensor]], Any], static: list[Tensor]) -> None:
        # Python's garbage collector stays off during the capture: collecting another CUDA graph there (Inductor's,
        # a dropped learner's) destroys it, a call a capture may not meet, and the capture fails (seen on an H100).
        # Thread-local errors, as Inductor's own graphs capture: the autograd engine's device thread may allocate.
        collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
                self.output = body(static)
        except BaseException:
            # A failed capture can leave its side stream current (torch.cuda.graph's exit stops at the failure):
            # later work must be ordered on the caller's stream again.
            torch.cuda.set_stream(stream)
            with contextlib.suppress(Exception):  # (the capture's own error is the one to report)
                torch.cuda.synchronize()
            raise
        finally:
            if collecting:
                gc.enable()

    def replay(self) -> None:
        self.graph.replay()


class ReplayedCalls:
    """A stand-in for a CUDA graph on any device, for tests: ``replay`` calls the captured body on the static
    inputs. It checks what :class:`CapturedFunction` does around a graph (which tensors are copied in, when a new
    graph is captured), not what a real capture fixes."""

    def __init__(self) -> None:
        self.replays = 0

    def capture(self, body: Callable[[list[Tensor]], Any], static: list[Tensor]) -> None:
        self._body, self._static = body, static

    def replay(self) -> None:
        self.replays += 1
        self.output = self._body(self._static)


@dataclass
class _Captured:
    graph: Graph
    static: list[Tensor]
    where: tuple[tuple[int, torch.Size], ...]  # the state's memory (address and shape) at capture


class CapturedFunction:
    """``call(key, body, inputs, state)``: ``body(inputs)`` run from a graph captured for ``key`` (see the module
    docstring for what ``inputs``, ``state`` and ``key`` must cover). The first call of a key runs ``body``
    eagerly (PyTorch initialises its libraries lazily, which a capture may not do; and a real call is no waste);
    the second captures it and replays the graph; later ones copy the inputs in and replay. ``device``: where the
    graph runs (inputs elsewhere are copied there). At most ``keep`` graphs are kept, the least recently used
    dropped. If a capture fails, the reason is warned once and every later call runs eagerly (:attr:`failed`).

    The graphs share one memory pool, so that a graph kept for a key that may not come back (the first-order
    phase's) holds no memory of its own: one graph's scratch memory is another's, which is safe because replays
    run one at a time on one stream and each replay's outputs are read before the next (the contract above).
    ``graph``: makes a graph (tests: :class:`ReplayedCalls`); by default a CUDA graph in the shared pool."""

    def __init__(self, device: torch.device, graph: Callable[[], Graph] | None = None, keep: int = 4) -> None:
        self.device, self.keep = torch.device(device), keep
        self._graph = graph if graph is not None else self._cuda_graph
        self._pool: Any = None
        self._outside = False  # warned that the state lives on another device
        self._captured: OrderedDict[Hashable, _Captured] = OrderedDict()
        self._warm: set[Hashable] = set()
        self.failed: str | None = None
        self.captures = 0

    def _cuda_graph(self) -> Graph:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return _CUDAGraph(self._pool)

    def __call__(
        self, key: Hashable, body: Callable[[list[Tensor]], Any], inputs: Sequence[Tensor], state: Sequence[Tensor]
    ) -> Any:
        key = (key, tuple((tuple(x.shape), x.dtype) for x in inputs))
        # (The shapes too: freed memory may come back at the same address as a tensor of another size.)
        where = tuple((t.data_ptr(), t.shape) for t in state)
        entry = self._captured.get(key)
        if entry is not None and entry.where == where:
            for s, x in zip(entry.static, inputs, strict=True):
                s.copy_(x, non_blocking=True)
            entry.graph.replay()
            self._captured.move_to_end(key)
            return entry.graph.output
        here = [x.to(self.device, non_blocking=True) for x in inputs]
        outside = next((t.device for t in state if t.device != self.device), None)
        if outside is not None:  # a graph records only the device's kernels: a write elsewhere would happen once
            if not self._outside:
                self._outside = True
                warnings.warn(f"the update is not captured in a CUDA graph while its state is on {outside}, not "
                              f"{self.device}: it runs eagerly", RuntimeWarning, stacklevel=3)  # fmt: skip
            return body(here)
        if self.failed is not None or (key, where) not in self._warm:
            if len(self._warm) >= 64:  # (keys that never came back)
                self._warm.clear()
            self._warm.add((key, where))
            return body(here)
        static = [torch.empty_like(x).copy_(x) for x in here]  # (fresh memory: ``here`` may be the caller's)
        try:
            graph = self._graph()
            graph.capture(body, static)
        except Exception as e:  # noqa: BLE001 - any failure: nothing ran, the call runs eagerly below
            self.failed = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
            warnings.warn(
                f"capturing the update in a CUDA graph failed ({self.failed}): it runs eagerly from now on "
                "(train.cuda_graphs = false runs it so from the start)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._captured.clear()
            return body(here)
        self.captures += 1
        self._captured.pop(key, None)  # (the same key on other state: its graph is stale)
        self._captured[key] = _Captured(graph, static, where)
        while len(self._captured) > self.keep:
            self._captured.popitem(last=False)
        graph.replay()
        return graph.output
