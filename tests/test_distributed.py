"""Data-parallel training over 2 gloo processes equals one process with the same total meta-batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metagrad.build import build_learner
from metagrad.distributed import all_reduce_mean, init_world, shutdown_world
from metagrad.presets import preset
from metagrad.run import load_learner
from metagrad.tasks import Sinusoid

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")

ALGORITHMS = ("maml", "maml_enhanced", "reptile")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(algorithm: str):
    cfg = preset(algorithm, "tiny")
    cfg.model.hidden = [16, 16]
    cfg.algorithm.inner_steps = 2
    if algorithm == "reptile":
        cfg.algorithm.inner_optimizer = "adam"
    return cfg


def _grads(algorithm: str, shard: tuple[int, int]) -> dict[str, torch.Tensor]:
    learner = build_learner(_config(algorithm)).to("cpu", torch.float64)
    batch = Sinusoid().sample(8, 5, 5, torch.Generator().manual_seed(0)).to("cpu", torch.float64)
    gp, gm, _ = learner.meta_gradient(batch, 0, torch.Generator().manual_seed(1), shard)
    out = {f"p.{k}": v for k, v in gp.items()} | {f"m.{k}": v for k, v in gm.items()}
    return out | {f"x.{k}": v for k, v in learner.extra_state.items()}


def _worker(rank: int, port: int, queue) -> None:
    # Started as torchrun starts a rank: its environment, and a store that the parent hosts (like torchrun's agent),
    # so that no rank has to bind a port that was free a moment ago.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                      RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")  # fmt: skip
    torch.set_num_threads(1)
    world, _ = init_world(torch.device("cpu"))
    group = weakref.ref(dist.group.WORLD)
    try:
        for algorithm in ALGORITHMS:
            grads = _grads(algorithm, (rank, 2))  # imports torch._dynamo, as torch.optim does in training
            reduced = all_reduce_mean(list(grads.values()), world)
            if rank == 0:
                queue.put(("grads", algorithm, {k: v.numpy().copy() for k, v in zip(grads, reduced, strict=True)}))
    finally:
        shutdown_world(world)
    queue.put(("teardown", rank, _left_after_shutdown(group)))


def _left_after_shutdown(group: weakref.ref) -> list[str]:
    """What of the process group outlives shutdown_world. Gloo's worker threads stop only when the group is freed;
    alive when the interpreter finalizes, one of them can abort the process ("terminate called without an active
    exception"), so a run that trained correctly would still fail, at random."""
    left = [] if group() is None else ["the process group object (still referenced)"]
    if os.path.isdir("/proc/self/task"):  # Linux: the threads themselves, by name
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
            if "gloo" in name:
                left.append(f"thread {name}")
    return left


def test_two_ranks_meta_gradient_equals_one_process() -> None:
    """MAML, MAML Enhanced (learned rates and curvature) and Reptile with inner Adam state, in one process pair,
    which then leaves the process group completely (no gloo thread left to abort the process at exit)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    procs = [ctx.Process(target=_worker, args=(r, store.port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    messages = [queue.get(timeout=180) for _ in range(len(ALGORITHMS) + 2)]  # numpy arrays: plain pickles
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert {rank: left for kind, rank, left in messages if kind == "teardown"} == {0: [], 1: []}
    results = {algorithm: got for kind, algorithm, got in messages if kind == "grads"}
    for algorithm in ALGORITHMS:
        _check(results[algorithm], _grads(algorithm, (0, 1)))


def _check(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(torch.from_numpy(got[k]), want[k], rtol=1e-10, atol=1e-12, msg=k)


def test_torchrun_and_a_two_node_rendezvous_train_as_one_process(tmp_path) -> None:
    """Uneven shards (7 tasks on 2 ranks: 4 and 3) train as one process does, launched as one node
    (``--standalone``) and as docs/scaling.md's multi-node launch with two 'nodes' on this machine (one torchrun
    each, c10d rendezvous, one shared run directory). The three runs go side by side: each start is mostly
    importing torch."""
    overrides = ["train.iterations=12", "train.meta_batch=7", "train.val_every=6", "train.checkpoint_every=6",
                 "train.threads=1", "model.hidden=[16, 16]", "algorithm.inner_steps=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {name: tmp_path / name for name in ("one", "standalone", "nodes")}
    train = ["-m", "metagrad", "train", "--no-progress", *overrides, "--out"]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{_free_port()}", "--rdzv-id", "test"]
    nodes = [*torchrun, "--nnodes", "2", "--nproc_per_node", "1", *rendezvous, *train, str(runs["nodes"])]
    commands = {
        "one": [sys.executable, *train, str(runs["one"])],
        "standalone": [*torchrun, "--standalone", "--nproc_per_node", "2", *train, str(runs["standalone"])],
        "node a": nodes,
        "node b": nodes,
    }
    # Output to files, not pipes: a full pipe would stall a node while the test waits on its rendezvous partner.
    logs = {k: (tmp_path / f"{k}.out", tmp_path / f"{k}.err") for k in commands}
    procs = {}
    try:
        for k, c in commands.items():
            with logs[k][0].open("w") as out, logs[k][1].open("w") as err:
                procs[k] = subprocess.Popen(c, env=env, stdout=out, stderr=err, text=True)
        codes = {k: p.wait(timeout=300) for k, p in procs.items()}
    finally:  # a hung or failed launch leaves no process behind
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    outputs = {k: (o.read_text(), e.read_text()) for k, (o, e) in logs.items()}
    assert codes == dict.fromkeys(procs, 0), {k: err[-2000:] for k, (_, err) in outputs.items()}
    assert outputs["standalone"][0].count("trained maml") == 1  # rank 0 alone reports
    assert outputs["node a"][0].count("trained maml") + outputs["node b"][0].count("trained maml") == 1
    _, a, meta_a = load_learner(runs["one"])
    for name in ("standalone", "nodes"):
        _, b, meta_b = load_learner(runs[name])
        assert meta_a["iteration"] == meta_b["iteration"] == 12
        for k in a.params:
            torch.testing.assert_close(b.params[k], a.params[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
        lines = (runs[name] / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == len(set(lines))  # one writer


def test_torchrun_bad_input_is_one_line_once_and_every_rank_exits(tmp_path) -> None:
    """An error that rank 0 alone can see (a non-empty --out) or that every rank sees (fewer tasks than ranks)
    stops every rank at once; metagrad's line is printed once, before torchrun's own failure report, rank 0
    exits 2, and nothing is written. The two launches go side by side (each start is mostly importing torch)."""
    cases = {4: "is not empty and is not a metagrad run", 1: "train.meta_batch=1 is below the 2 ranks' one task each"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    procs = {}
    try:
        for meta_batch in cases:
            run = tmp_path / f"r{meta_batch}"
            run.mkdir()
            (run / "mine.txt").write_text("keep")
            args = ["--out", str(run), "--no-progress", "train.threads=1", f"train.meta_batch={meta_batch}"]
            with (tmp_path / f"{meta_batch}.err").open("w") as err:
                procs[meta_batch] = subprocess.Popen([*launch, "-m", "metagrad", "train", *args], env=env,
                                                     stdout=subprocess.DEVNULL, stderr=err, text=True)  # fmt: skip
        codes = {k: p.wait(timeout=120) for k, p in procs.items()}
    finally:  # a hung launch leaves no process behind
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for meta_batch, expected in cases.items():
        run, stderr = tmp_path / f"r{meta_batch}", (tmp_path / f"{meta_batch}.err").read_text()
        assert codes[meta_batch] != 0
        ours = [line for line in stderr.splitlines() if line.startswith("metagrad train:")]
        assert len(ours) == 1 and expected in ours[0], stderr[-3000:]
        assert stderr.index(ours[0]) < stderr.index("ChildFailedError")
        assert "exitcode  : 2" in stderr and "metagrad/" not in stderr  # no traceback from metagrad itself
        assert (run / "mine.txt").read_text() == "keep" and sorted(p.name for p in run.iterdir()) == ["mine.txt"]
