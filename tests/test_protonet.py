"""Prototypical Networks: logits by hand, exact meta-gradients (vmap == loop == float64 central difference),
one evaluation point, regression refused, adapt/predict and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from meta_gradcheck import assert_every_tensor_matches_central_differences, assert_vmap_equals_loop
from torch import nn

from metagrad.algorithms import NotClassificationError, ProtoNet
from metagrad.algorithms.protonet import PROTOTYPES
from metagrad.build import build_learner
from metagrad.cli import main
from metagrad.config import load_config
from metagrad.errors import ConfigError, DataError
from metagrad.evaluate import format_table, summarize
from metagrad.models import MLP, Conv4
from metagrad.run import load_learner
from metagrad.task_threads import usable_cores
from metagrad.tasks import TaskBatch
from metagrad.train import train

F64 = torch.float64
OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def identity_embedding() -> nn.Linear:
    layer = nn.Linear(2, 2).to(F64)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
        layer.bias.zero_()
    return layer


def test_logits_are_negative_squared_distances_to_the_class_means():
    lrn = ProtoNet(identity_embedding(), ways=2)
    sx = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]], dtype=F64)  # class 0 mean (1, 0), class 1 (0, 2)
    sy = torch.tensor([0, 0, 1])
    qx = torch.tensor([[1.0, 1.0], [3.0, 0.0]], dtype=F64)
    expected = torch.tensor([[-1.0, -2.0], [-4.0, -13.0]], dtype=F64)
    torch.testing.assert_close(lrn.logits(dict(lrn.params), sx, sy, qx), expected)
    adapted = lrn.adapt(sx, sy)
    torch.testing.assert_close(adapted[PROTOTYPES], torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64))
    torch.testing.assert_close(lrn.predict(qx, adapted), expected)
    torch.testing.assert_close(lrn.predict(qx), qx)  # without prototypes: the embedding
    loss, _ = lrn.task_loss(dict(lrn.params), {}, (sx, sy, qx, torch.tensor([0, 0])), None, False)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(expected, torch.tensor([0, 0])))
    with pytest.raises(ConfigError, match="no inner loop"):
        lrn.adapt(sx, sy, steps=3)


def _case(vectorize: bool) -> tuple[ProtoNet, TaskBatch]:
    torch.manual_seed(0)
    model = Conv4(ways=3, hidden=3, image_size=16).to(F64)
    model.head = nn.Identity()
    lrn = ProtoNet(model, ways=3, vectorize=vectorize)
    g = torch.Generator().manual_seed(1)
    sx = torch.rand(2, 6, 1, 16, 16, generator=g, dtype=F64)
    qx = torch.rand(2, 6, 1, 16, 16, generator=g, dtype=F64)
    y = torch.tensor([0, 0, 1, 1, 2, 2]).expand(2, -1).clone()
    return lrn, TaskBatch(sx, y, qx, y)


def test_meta_gradient_vmap_equals_loop_equals_central_difference():
    (vec, b), (loop, _) = _case(True), _case(False)
    gv, gmv, mv = vec.meta_gradient(b)
    gl, _, ml = loop.meta_gradient(b)
    assert_vmap_equals_loop(gv, gl, rel=1e-10)
    torch.testing.assert_close(mv["loss"], ml["loss"], rtol=1e-12, atol=0)
    assert_every_tensor_matches_central_differences(loop, b, gv, gmv)
    # Evaluation: one point per task, whatever number of steps is asked for; vmap == loop.
    curve = vec.adaptation_curve(b, 10)
    assert curve.shape == (2, 1)
    torch.testing.assert_close(curve, loop.adaptation_curve(b, 10))


def test_regression_is_refused():
    with pytest.raises(NotClassificationError, match="does not apply"):
        ProtoNet(MLP(), ways=5, loss="mse")
    with pytest.raises(NotClassificationError, match="classification task"):
        build_learner(load_config(None, ["algorithm.name=protonet"]))  # the default task is the sinusoid


def test_regression_is_a_one_line_cli_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "p"), "algorithm.name=protonet", "train.iterations=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "protonet" in err and "does not apply" in err


def test_bad_batches_are_data_errors():
    lrn, b = _case(True)
    missing = TaskBatch(b.support_x, torch.zeros_like(b.support_y), b.query_x, b.query_y)
    with pytest.raises(DataError, match="each of the 3 classes"):
        lrn.meta_gradient(missing)
    with pytest.raises(DataError, match=r"labels must be in \[0, 3\)"):
        lrn.meta_gradient(TaskBatch(b.support_x, b.support_y + 1, b.query_x, b.query_y))


def test_evaluation_reports_one_point():
    lrn, b = _case(True)
    curve = lrn.adaptation_curve(b, 5)
    mean, ci = summarize(curve)
    result = {"algorithm": "protonet", "task": "toy", "tasks": 2, "scoring": "query", "metric": "accuracy", "ways": 3,
              "results": [{"shots": 2, "steps": [0], "accuracy": mean, "ci95": ci}]}  # fmt: skip
    table = format_table(result)
    assert "step 0" in table and "step 1" not in table


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"Omniglot data not found at {OMNIGLOT}")
def test_train_checkpoint_round_trip_and_eval_on_omniglot(tmp_path):
    overrides = ["algorithm.name=protonet", "task.name=omniglot", "model.name=conv4", "model.channels=4",
                 f"task.data={OMNIGLOT}", "train.iterations=4", "train.meta_batch=2", "train.val_every=2",
                 "train.checkpoint_every=2", "train.val_tasks=4", "train.threads=1"]  # fmt: skip
    result = train(load_config(None, overrides), tmp_path / "run", progress=False)
    assert isinstance(result.learner.model.head, nn.Identity)  # the embedding is the backbone
    _, loaded, meta = load_learner(tmp_path / "run")
    assert meta["iteration"] == 4
    for k, v in result.learner.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    out = tmp_path / "e.json"
    assert main(["eval", str(tmp_path / "run"), "--tasks", "4", "--shots", "1", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())["results"][0]
    assert scores["steps"] == [0] and len(scores["accuracy"]) == 1


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"Omniglot data not found at {OMNIGLOT}")
def test_compare_runs_protonet_imaml_and_cavia_beside_maml_on_omniglot(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the presets read task.data relative to the checkout
    out = tmp_path / "cmp"
    argv = ["compare", "--task", "omniglot", "--budget", "tiny", "--out", str(out), "--algorithms", "maml",
            "protonet", "imaml", "cavia", "--no-progress", "--workers", "1", "train.meta_batch=3"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    by_name = {r["algorithm"]: r for r in data["results"]}
    assert set(by_name) == {"maml", "protonet", "imaml", "cavia"} and not data["failures"]
    # One worker leaves the other cores to each run's tasks, side by side (the one-thread numbers, to the bit).
    cores = usable_cores()
    for name in by_name:
        (last,) = sorted((out / name / "checkpoints").glob("iter-*"))[-1:]
        info = json.loads((last / "trainer.json").read_text())
        assert info["config"]["train"]["threads"] == 1 and info["config"]["train"]["task_threads"] == cores
        assert info["task_loop"] == (f"side by side on {cores} threads" if cores > 1 else
                                     "one task at a time: task_threads = 1"), (name, info["task_loop"])  # fmt: skip
    assert by_name["protonet"]["results"][0]["steps"] == [0]
    assert by_name["imaml"]["results"][0]["steps"] == [0, 1, 2]
    report = (out / "report.md").read_text()
    assert "| protonet | — |" in report and "(no inner loop)" in report
    assert (out / "adaptation.png").is_file()


def test_the_python_api_embeds_without_the_head_unless_kept():
    """ProtoNet(Conv4(...), ways=5) embeds the backbone's features, as from_config does; keep_head=True keeps it."""
    x = torch.rand(4, 1, 16, 16, dtype=F64)
    stripped = ProtoNet(Conv4(ways=5, hidden=3, image_size=16).to(F64), ways=5)
    assert isinstance(stripped.model.head, nn.Identity)
    assert stripped.embed(stripped.params, x).shape == (4, 3)  # Conv-4's features, not the 5 logits
    kept = ProtoNet(Conv4(ways=5, hidden=3, image_size=16).to(F64), ways=5, keep_head=True)
    assert kept.embed(kept.params, x).shape == (4, 5)
