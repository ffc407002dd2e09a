"""Importing the training path fetches no code from the Hub and logs nothing about it; model
loading draws no library progress bar."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What importing the training path does in a user's process: qlora_lite first, bitsandbytes after.
IMPORT_TRAINING = "import qlora_lite.train.loop, qlora_lite.model.loader, bitsandbytes"


def has_avx512bf16() -> bool:
    """The CPUs on which bitsandbytes asks the Hub for its kernel when it is imported."""
    from bitsandbytes.functional import has_avx512bf16 as check

    return bool(check())


class Sentinel:
    """A local TCP port standing in for the Hub: counts the connections made to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()  # the client sees a dropped connection: a Hub that does not answer

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def run_import(tmp_path, code: str = IMPORT_TRAINING, **env_extra) -> tuple[int, str]:
    """(connections to the sentinel Hub, stderr) of a fresh interpreter running `code` online."""
    sentinel = Sentinel()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=sentinel.url, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO), **env_extra)
    env.pop("QLORA_LITE_HUB_KERNELS", None) if "QLORA_LITE_HUB_KERNELS" not in env_extra else None
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        sentinel.close()
    assert proc.returncode == 0, proc.stderr
    return sentinel.connections, proc.stderr


needs_avx512bf16 = pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes asks the Hub for its kernel "
                                      "only on CPUs with AVX512-BF16; this one has none")


@needs_avx512bf16
def test_importing_the_training_path_neither_contacts_the_hub_nor_warns(tmp_path):
    connections, err = run_import(tmp_path)
    assert connections == 0
    assert "kernels-community" not in err and "publisher trust" not in err, err
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*quantization-bitsandbytes*"))


@needs_avx512bf16
def test_the_hub_kernel_lookup_comes_back_when_the_user_opts_in(tmp_path):
    # The other half of the test above: without the refusal, the same import does reach the Hub.
    connections, _ = run_import(tmp_path, QLORA_LITE_HUB_KERNELS="1")
    assert connections >= 1


def test_loading_a_model_draws_no_loading_weights_bar(tiny_llama, tmp_path):
    code = ("from qlora_lite.model.loader import load_model; from qlora_lite.recipe import ModelConfig; "
            f"load_model(ModelConfig(name_or_path={tiny_llama!r}, gradient_checkpointing=False))")
    _, err = run_import(tmp_path, code)
    assert "Loading weights" not in err and "it/s" not in err, err
