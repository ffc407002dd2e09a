"""A 16-bit GGUF re-quantized tensor by tensor into a 4-, 5- or 6-bit one, in Python: no llama.cpp
binary, no compiler.

The input is the GGUF llama.cpp's converter wrote from the merged export (its metadata,
tokenizer and tensor names are kept as they are); each tensor is read from the memory-mapped
input, quantized to the type `gguf_types.plan_types` gives it (kquants.quantize) and written
before the next is read, so the memory held is one tensor and its quantized copy, whatever the
model's size. `llama-quantize` from llama.cpp, when it is on PATH, can do the same step instead
(`--gguf-quantizer llama-quantize`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from ..errors import QloraError
from .gguf_types import REQUANT_TYPES, TypePlan, plan_types
from .kquants import quantize

LLAMA_QUANTIZE = "llama-quantize"
# --gguf name -> the type name llama-quantize takes
LLAMA_QUANTIZE_NAMES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_K_M": "Q4_K_M",
                        "q5_K_M": "Q5_K_M", "q6_K": "Q6_K"}


def _copy_metadata(reader, writer, file_type: int) -> None:
    """Every key of the input but the ones the writer sets itself, with the new general.file_type."""
    import gguf

    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        if f.name in (gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tensor_values(t) -> np.ndarray:
    """A GGUF reader tensor as float32, numpy-shaped (rows last)."""
    import gguf

    values = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(values, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])


def requantize(src: str | Path, dst: str | Path, gguf_type: str, log=print) -> TypePlan:
    """Write `dst`, `src` (a 16- or 32-bit GGUF) with its tensors quantized for `--gguf gguf_type`.

    Args:
        src (str | Path): the converter's F16/BF16/F32 GGUF.
        dst (str | Path): the file to write.
        gguf_type (str): one of REQUANT_TYPES ("q4_K_M", "q5_0", ...).
        log (callable): progress printer. Default print.

    Returns:
        TypePlan: the type of every tensor, and the ones that fell back.
    """
    import gguf

    reader = gguf.GGUFReader(str(src))
    T = gguf.GGMLQuantizationType
    shapes = [(t.name, tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors]
    blocks = {q.name: gguf.GGML_QUANT_SIZES[q][0] for q in T}
    plan = plan_types(shapes, gguf_type, blocks)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    _copy_metadata(reader, writer, int(getattr(gguf.LlamaFileType, REQUANT_TYPES[gguf_type][0])))
    for name, shape in shapes:
        dtype, stored = _stored_shape(shape, T[plan.types[name]])
        writer.add_tensor_info(name, stored, dtype, int(np.prod(stored, dtype=np.int64)) * np.dtype(dtype).itemsize,
                               T[plan.types[name]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, (name, shape) in zip(reader.tensors, shapes):
        qtype = T[plan.types[name]]
        values = tensor_values(t)
        if qtype in (T.F32, T.F16):
            data = values.astype(np.float32 if qtype == T.F32 else np.float16)
        else:
            data = quantize(values.reshape(-1, shape[-1]), qtype).reshape(_stored_shape(shape, qtype)[1])
        writer.write_tensor_data(data)
        del values, data  # one tensor at a time
    writer.close()
    if plan.fallbacks:
        log(f"{len(plan.fallbacks)} of {len(shapes)} tensors have rows that are not a multiple of their type's "
            f"block and fell back as llama.cpp does: {_fallback_summary(plan)}")
    return plan


def _stored_shape(shape: tuple[int, ...], qtype) -> tuple[type, tuple[int, ...]]:
    """(numpy dtype, numpy shape) of a tensor's data as written: bytes per row for quantized types."""
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype in (T.F32, T.F16):
        return (np.float32 if qtype == T.F32 else np.float16), shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return np.uint8, (*shape[:-1], shape[-1] // block * size)


def _fallback_summary(plan: TypePlan) -> str:
    pairs: dict[str, int] = {}
    for wanted, written in plan.fallbacks.values():
        pairs[f"{wanted} -> {written}"] = pairs.get(f"{wanted} -> {written}", 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in sorted(pairs.items()))


def llama_quantize_available() -> bool:
    """Whether llama.cpp's `llama-quantize` binary is on PATH."""
    return shutil.which(LLAMA_QUANTIZE) is not None


def run_llama_quantize(src: str | Path, dst: str | Path, gguf_type: str) -> None:
    """The same step by llama.cpp's own `llama-quantize`, for those who have it."""
    exe = shutil.which(LLAMA_QUANTIZE)
    if exe is None:
        raise QloraError(f"--gguf-quantizer {LLAMA_QUANTIZE}: {LLAMA_QUANTIZE} is not on PATH; install llama.cpp, "
                         "or leave --gguf-quantizer out to quantize with qlora-lite's own writer.")
    proc = subprocess.run([exe, str(src), str(dst), LLAMA_QUANTIZE_NAMES[gguf_type]], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [f"exit status {proc.returncode}"]
        raise QloraError(f"{LLAMA_QUANTIZE} failed: {tail[0]}. Leave --gguf-quantizer out to use qlora-lite's writer.")
