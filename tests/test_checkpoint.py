"""Checkpoints: safetensors + JSON round trip, every kind of damage named as a CheckpointError, no pickle."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from metagrad import cli
from metagrad.checkpoint import FORMAT, load_checkpoint, read_json, save_checkpoint, write_atomic
from metagrad.config import load_config
from metagrad.errors import CheckpointError, RunError
from metagrad.run import checkpoints, latest_checkpoint, load_learner, read_run_config
from metagrad.train import train

TINY = [
    "model.hidden=[8,8]",
    "train.iterations=20",
    "train.meta_batch=4",
    "train.log_every=5",
    "train.val_every=10",
    "train.val_tasks=10",
    "train.checkpoint_every=10",
    "train.threads=1",
    "eval.steps=2",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished MAML run (checkpoints at iterations 10 and 20, plus best). Copy it before damaging it."""
    threads = torch.get_num_threads()
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(overrides=TINY), run, progress=False)
    torch.set_num_threads(threads)
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _latest(run: Path) -> Path:
    path = latest_checkpoint(run)
    assert path is not None and path.name == "iter-00000020"
    return path


# ----- round trip ----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    weights = {
        "params.0.weight": torch.randn(8, 1, generator=g),
        "params.0.bias": torch.randn(8, generator=g, dtype=torch.float64),
        "extra.t": torch.tensor(3.0),
        "meta.transposed": torch.randn(3, 4, generator=g).t(),  # non-contiguous
    }
    trainer = {"optim.0.exp_avg": torch.randn(8, 1, generator=g), "rng.tasks": torch.Generator().get_state()}
    meta = {"iteration": 7, "config": {"a": [1, 2]}, "best_val": None}
    path = save_checkpoint(tmp_path / "ckpt" / "iter-00000007", weights, trainer, meta)
    assert sorted(p.name for p in path.iterdir()) == ["trainer.json", "trainer.safetensors", "weights.safetensors"]
    w, t, m = load_checkpoint(path)
    assert w.keys() == weights.keys() and t.keys() == trainer.keys()
    for k, v in weights.items():
        assert w[k].dtype == v.dtype and torch.equal(w[k], v)
    for k, v in trainer.items():
        assert t[k].dtype == v.dtype and torch.equal(t[k], v)
    assert m["iteration"] == 7 and m["config"] == {"a": [1, 2]} and m["best_val"] is None
    assert m["format"] == FORMAT
    assert set(m["sha256"]) == {"weights.safetensors", "trainer.safetensors"}
    w_only, t_only, _ = load_checkpoint(path, weights_only=True)
    assert t_only == {} and w_only.keys() == weights.keys()


def test_save_replaces_an_existing_checkpoint_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "ckpts" / "best"
    save_checkpoint(target, {"x": torch.zeros(2)}, {}, {"iteration": 1})
    save_checkpoint(target, {"x": torch.ones(2)}, {}, {"iteration": 2})
    w, _, m = load_checkpoint(target)
    assert m["iteration"] == 2 and torch.equal(w["x"], torch.ones(2))
    assert [p.name for p in target.parent.iterdir()] == ["best"]


def test_write_atomic_leaves_no_temporary_file(tmp_path: Path) -> None:
    write_atomic(tmp_path / "a.json", '{"x": 1}')
    write_atomic(tmp_path / "a.json", b'{"x": 2}')
    assert read_json(tmp_path / "a.json") == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_load_learner_round_trips_the_trained_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(load_config(overrides=TINY), run, progress=False)
    cfg, learner, meta = load_learner(run)
    assert meta["iteration"] == 20
    assert cfg == read_run_config(run)
    trained = result.learner.state_tensors()
    loaded = learner.state_tensors()
    assert trained.keys() == loaded.keys()
    for group in trained:
        assert trained[group].keys() == loaded[group].keys()
        for k in trained[group]:
            assert torch.equal(trained[group][k], loaded[group][k]), f"{group}.{k}"
    _, best, best_meta = load_learner(run, "best")
    assert best_meta["iteration"] in (10, 20)
    _, explicit, explicit_meta = load_learner(run, str(run / "checkpoints" / "iter-00000010"))
    assert explicit_meta["iteration"] == 10
    assert not torch.equal(explicit.params["0.weight"], learner.params["0.weight"])


def test_temporary_directories_are_not_checkpoints(run: Path) -> None:
    (run / "checkpoints" / ".iter-00000030.tmp-123").mkdir()
    (run / "checkpoints" / "iter-00000040.partial").mkdir()
    assert [i for i, _ in checkpoints(run)] == [10, 20]
    assert _latest(run).name == "iter-00000020"


# ----- damage --------------------------------------------------------------------------------------------


def test_truncated_weights_raise_naming_the_file(run: Path) -> None:
    path = _latest(run) / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-17])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as info:
        load_learner(run)
    assert str(path) in str(info.value)


def test_flipped_byte_raises_naming_the_file(run: Path) -> None:
    path = _latest(run) / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the tensor data: still a well-formed safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted") as info:
        load_learner(run)
    assert str(path) in str(info.value)


def test_flipped_byte_in_trainer_tensors_raises_on_full_load(run: Path) -> None:
    ckpt = _latest(run)
    path = ckpt / "trainer.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    load_checkpoint(ckpt, weights_only=True)  # the weights themselves are intact
    with pytest.raises(CheckpointError, match="corrupted") as info:
        load_checkpoint(ckpt)
    assert str(path) in str(info.value)


def test_missing_trainer_json_raises_naming_the_file(run: Path) -> None:
    path = _latest(run) / "trainer.json"
    path.unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        load_learner(run)
    assert str(path) in str(info.value)


def test_missing_weights_raise_naming_the_file(run: Path) -> None:
    path = _latest(run) / "weights.safetensors"
    path.unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        load_learner(run)
    assert str(path) in str(info.value)


def test_foreign_json_raises_naming_the_file(run: Path) -> None:
    path = _latest(run) / "trainer.json"
    meta = json.loads(path.read_text())
    meta["format"] = "someone-else/3"
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="someone-else/3") as info:
        load_learner(run)
    assert str(path) in str(info.value)
    assert FORMAT in str(info.value)


@pytest.mark.parametrize("content", ["[1, 2, 3]", "{not json", "\udcff"])
def test_json_that_is_not_an_object_raises_naming_the_file(run: Path, content: str) -> None:
    path = _latest(run) / "trainer.json"
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError) as info:
        load_learner(run)
    assert str(path) in str(info.value)


def test_non_safetensors_file_raises_naming_the_file(run: Path) -> None:
    """Even with a matching checksum (so the parser itself must reject it)."""
    ckpt = _latest(run)
    path = ckpt / "weights.safetensors"
    junk = pickle.dumps({"params.0.weight": [1.0, 2.0]})
    path.write_bytes(junk)
    meta_path = ckpt / "trainer.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"]["weights.safetensors"] = hashlib.sha256(junk).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as info:
        load_learner(run)
    assert str(path) in str(info.value)


def test_non_safetensors_file_with_wrong_checksum_raises(run: Path) -> None:
    path = _latest(run) / "weights.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, or a torch.save pickle\x80\x04")
    with pytest.raises(CheckpointError) as info:
        load_learner(run)
    assert str(path) in str(info.value)


def test_checkpoint_of_another_architecture_is_rejected(run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    train(load_config(overrides=[*TINY, "model.hidden=[4,4]"]), other, progress=False)
    with pytest.raises(CheckpointError, match="does not match this run.s config"):
        load_learner(run, str(other / "checkpoints" / "iter-00000020"))


def test_run_without_checkpoints_is_a_run_error(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(RunError, match="no latest checkpoint"):
        load_learner(run)


def test_corrupted_run_json_is_a_run_error(run: Path) -> None:
    (run / "run.json").write_text("{")
    with pytest.raises(RunError) as info:
        read_run_config(run)
    assert "run.json" in str(info.value)


# ----- no pickle -----------------------------------------------------------------------------------------


def _forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


def test_loading_never_unpickles(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_unpickling(monkeypatch)
    with pytest.raises(AssertionError):
        torch.load(run / "run.json")  # the trap works
    _, learner, meta = load_learner(run)
    assert meta["iteration"] == 20
    load_learner(run, "best")
    load_checkpoint(_latest(run))
    assert all(torch.isfinite(v).all() for v in learner.params.values())


def test_resume_never_unpickles(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.rmtree(run / "checkpoints" / "iter-00000020")
    _forbid_unpickling(monkeypatch)
    result = train(read_run_config(run), run, resume=True, progress=False)
    assert result.iterations == 20


# ----- the CLI on a damaged run --------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop_json"])
def test_eval_of_a_corrupted_checkpoint_exits_2_naming_the_file(
    run: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _latest(run)
    if damage == "truncate":
        target = ckpt / "weights.safetensors"
        target.write_bytes(target.read_bytes()[:40])
    elif damage == "flip":
        target = ckpt / "weights.safetensors"
        data = bytearray(target.read_bytes())
        data[len(data) // 2 + 20] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target = ckpt / "trainer.json"
        target.unlink()
    code = cli.main(["eval", str(run), "--tasks", "20", "--steps", "2"])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("metagrad eval: error:")
    assert str(target) in lines[0]
    assert not (run / "eval.json").exists()
