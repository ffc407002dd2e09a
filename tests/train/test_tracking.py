"""Experiment trackers, offline: what each library wrote, read back by its own reader, equals metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
from conftest import make_recipe

from qlora_lite.errors import QloraError
from qlora_lite.train.loop import train
from qlora_lite.train.tracking import LIBRARIES, open_trackers

pytestmark = pytest.mark.slow  # whole training runs: `make test` only, not `make test-fast`


def needs(name: str):
    return pytest.mark.skipif(importlib.util.find_spec(LIBRARIES[name]) is None,
                              reason=f"{name} is not installed: pip install 'qlora-lite[{name}]'")


def jsonl_metrics(run_dir) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of metrics.jsonl, the source of truth."""
    out: dict[str, dict[int, float]] = {}
    for line in open(Path(run_dir) / "metrics.jsonl"):
        r = json.loads(line)
        for k, v in r.items():
            if k != "step":
                out.setdefault(k, {})[r["step"]] = float(v)
    return out


def run(data_file, out, report_to, resume=False, **t):
    t = dict(max_steps=3, log_every=1, eval_every=2, save_every=2, micro_batch_size=2, grad_accum=1,
             eval_max_batches=2, report_to=report_to) | t
    return train(make_recipe(data_file, out, **t), resume=resume)


INSTALLED = [n for n in LIBRARIES if importlib.util.find_spec(LIBRARIES[n]) is not None]


@pytest.fixture(scope="module")
def tracked(data_file, tmp_path_factory):
    """One run with every installed tracker: 2 steps, then resumed to 3 (the same tracker runs)."""
    if not INSTALLED:
        pytest.skip("no tracker library is installed (pip install 'qlora-lite[tensorboard,wandb,mlflow]')")
    out = tmp_path_factory.mktemp("tracked") / "r"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        run(data_file, out, INSTALLED, max_steps=2)
        summary = run(data_file, out, INSTALLED, resume=True)
        if "wandb" in INSTALLED:
            import wandb

            wandb.teardown()  # the W&B service writes its log asynchronously; this waits for it
    finally:
        mp.undo()
    return out, summary


def test_a_missing_library_fails_before_training_naming_the_extra(data_file, tmp_path, monkeypatch):
    monkeypatch.setitem(LIBRARIES, "wandb", "qlora_lite_no_such_module")
    with pytest.raises(QloraError, match=r"pip install 'qlora-lite\[wandb\]'"):
        run(data_file, tmp_path / "r", ["wandb"])
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_report_to_none_opens_nothing(data_file, tmp_path):
    recipe = make_recipe(data_file, tmp_path / "r", report_to="none")
    assert recipe.train.report_to == [] and open_trackers(recipe, tmp_path).backends == []
    with pytest.raises(QloraError, match="train.report_to entry must be one of tensorboard, wandb, mlflow"):
        make_recipe(data_file, tmp_path / "r", report_to=["neptune"])


# ---------------------------------------------------------------- TensorBoard


def tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}, acc


@needs("tensorboard")
def test_tensorboard_gets_every_record_the_recipe_and_the_summary_and_resumes(tracked):
    out, summary = tracked
    scalars, acc = tensorboard_scalars(out / "tensorboard")
    want = jsonl_metrics(out)
    for key, by_step in want.items():
        assert scalars[key] == pytest.approx(by_step, rel=1e-6), key
    assert sorted(scalars["loss"]) == [1, 2, 3]
    # Each session ends with a summary: the first at its step 2, the resumed one at step 3.
    assert scalars["summary/eval_loss"][3] == pytest.approx(summary["eval_loss"], rel=1e-6)
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
    assert '"max_steps": 2' in texts["recipe/text_summary"]  # the first session's recipe
    assert json.loads(texts["summary/text_summary"].strip("`\n"))["steps"] in (2, 3)


@needs("tensorboard")
def test_a_tracker_added_on_resume_starts_there(data_file, tmp_path):
    # report_to says how a run is watched, not what it trains: resume may change it.
    run(data_file, tmp_path / "r", [], max_steps=2)
    assert not (tmp_path / "r/tensorboard").exists()
    run(data_file, tmp_path / "r", ["tensorboard"], resume=True)
    scalars, _ = tensorboard_scalars(tmp_path / "r/tensorboard")
    assert sorted(scalars["loss"]) == [3]
    assert scalars["loss"][3] == pytest.approx(jsonl_metrics(tmp_path / "r")["loss"][3], rel=1e-6)


# ---------------------------------------------------------------- W&B offline


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (W&B's own schema; the file is a LevelDB-style log)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


@needs("wandb")
def test_wandb_offline_gets_every_record_the_recipe_and_the_summary_and_resumes(tracked):
    out, summary = tracked
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["id"]
    files = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # two sessions, one W&B run id: `wandb sync` joins them
    got: dict[str, dict[int, float]] = {}
    config, final = {}, {}
    for f in files:
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                for k, v in items.items():
                    if not k.startswith("_"):
                        got.setdefault(k, {})[items["_step"]] = v
            elif kind == "run" and rec.run.config.update:
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "summary":
                final.update({i.key: json.loads(i.value_json) for i in rec.summary.update})
    assert got == jsonl_metrics(out)
    assert config["train"]["max_steps"] == 3 and config["lora"]["r"] == 8  # the resumed session's recipe
    assert final["eval_loss"] == summary["eval_loss"] and final["steps"] == 3


# ---------------------------------------------------------------- MLflow local file store


@needs("mlflow")
def test_mlflow_file_store_gets_every_record_the_params_and_the_summary_and_resumes(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    out, summary = tracked
    uri = (out / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == "r"
    assert info.data.params["train.max_steps"] == "2" and info.data.params["lora.r"] == "8"
    for key, by_step in jsonl_metrics(out).items():
        assert {m.step: m.value for m in client.get_metric_history(run_id, key)} == pytest.approx(by_step), key
    assert info.data.metrics["summary/eval_loss"] == pytest.approx(summary["eval_loss"])
    local = client.download_artifacts(run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["steps"] == 3
