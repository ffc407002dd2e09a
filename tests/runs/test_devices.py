"""Where things run: --device auto, export on the training device's kind, checkpoints across devices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora_lite.errors import QloraError
from qlora_lite.export.merge import quantize_device
from qlora_lite.model.loader import pick_device
from qlora_lite.recipe import ModelConfig
from qlora_lite.runs.folder import RunSource, trained_on

cuda = torch.cuda.is_available()


def test_auto_picks_the_gpu_when_there_is_one_and_cuda_without_one_is_refused():
    assert pick_device("auto") == ("cuda" if cuda else "cpu")
    assert pick_device("cpu") == "cpu"
    if not cuda:
        with pytest.raises(QloraError, match="no CUDA GPU is visible"):
            pick_device("cuda")


def test_export_quantizes_on_the_kind_of_device_the_run_trained_on(tmp_path):
    (tmp_path / "summary.json").write_text('{"device": "cuda"}')
    assert trained_on(tmp_path) == "cuda"
    assert trained_on(tmp_path / "missing") is None
    src = RunSource(ModelConfig(name_or_path="m"), tmp_path, "run", trained_on="cuda")
    assert quantize_device(src) == ("cuda" if cuda else "cpu")  # CUDA only when one is present
    assert quantize_device(RunSource(ModelConfig(name_or_path="m"), tmp_path, "run", trained_on="cpu")) == "cpu"
    assert quantize_device(RunSource(ModelConfig(name_or_path="m"), tmp_path, "adapter")) == "cpu"
    assert quantize_device(src, "cpu") == "cpu"


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tmp_path, tiny_llama, monkeypatch):
    """Files whose tensors are tagged cuda:0 (as torch.save writes them on a GPU) load here."""
    import torch.serialization as ser

    from qlora_lite.lora.layer import attach_lora, lora_parameters
    from qlora_lite.model.loader import load_model
    from qlora_lite.recipe import LoraConfig
    from qlora_lite.runs.checkpoint import load_checkpoint, save_checkpoint
    from qlora_lite.train.optim import build_optimizer, build_scheduler
    from qlora_lite.train.step import train_step

    model = load_model(ModelConfig(name_or_path=tiny_llama))
    attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    params = lora_parameters(model)
    opt = build_optimizer("adamw", params, 1e-3, 0.0)
    sched = build_scheduler(opt, "constant", 0, 10)
    ids = torch.randint(3, 320, (1, 12))
    train_step(model.train(), [{"input_ids": ids, "labels": ids}], params, opt, device="cpu", max_grad_norm=1.0,
               loss_chunk_size=0)
    with monkeypatch.context() as m:  # only the location tag: the bytes are what a GPU would write
        m.setattr(ser, "location_tag", lambda storage: "cuda:0")
        ckpt = save_checkpoint(tmp_path, model, LoraConfig(r=4, alpha=8), tiny_llama, opt, sched, {"step": 1, "epoch": 0, "batch_in_epoch": 1}, 1)
    if not cuda:
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(Path(ckpt) / "optimizer.pt", weights_only=True)  # what a plain load would do
    opt2 = build_optimizer("adamw", params, 1e-3, 0.0)
    state = load_checkpoint(ckpt, model, opt2, build_scheduler(opt2, "constant", 0, 10))
    assert state["step"] == 1
    saved, loaded = opt.state_dict()["state"], opt2.state_dict()["state"]  # per parameter, flat buffers or not
    assert len(loaded) == len(params)
    for i in saved:
        assert loaded[i]["exp_avg"].device.type == "cpu"
        torch.testing.assert_close(loaded[i]["exp_avg"], saved[i]["exp_avg"])
