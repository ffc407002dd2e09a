"""llama.cpp's k-quants (Q4_K, Q5_K, Q6_K) written in numpy, vectorized over blocks; the simple
types (Q4_0 ... Q8_0, F16, BF16) come from the `gguf` package's own quantizer.

A k-quant super-block holds 256 weights. Q4_K and Q5_K split it into 8 sub-blocks of 32, each
with a 6-bit scale and a 6-bit min under one fp16 scale and min per super-block; Q6_K into 16
of 16, each with an 8-bit signed scale under one fp16 scale. The search for each sub-block's
scale and min follows the reference C of ggml-quants.c (`quantize_row_q4_K_ref`,
`quantize_row_q5_K_ref`, `quantize_row_q6_K_ref` with `make_qkx2_quants` and `make_qx_quants`),
one numpy operation over all sub-blocks of a chunk at a time; the byte layouts are the ones
`gguf.quants.dequantize` reads (tests/export/test_kquants.py reads every block back with it).
Rows are quantized in chunks of `CHUNK_VALUES`, so a 7B's largest tensor needs a few hundred MB.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
CHUNK_VALUES = 1 << 22  # weights quantized per numpy pass: ~16 MB of input, ~20 temporaries of it
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: below this a group is all zeros
F32 = np.float32


def _rint(x: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int: round half to even, as the float trick in ggml-quants.c does."""
    return np.rint(x).astype(np.int32)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Scale, min and levels 0..nmax of each row of `x` (groups x n) minimizing the w-weighted error.

    Returns (scale (G,), min (G,) as the positive offset subtracted, L (G, n) int32).
    """
    mn = np.minimum(x.min(axis=1), F32(0))
    mx = x.max(axis=1)
    flat = mx == mn
    sum_w, sum_x = w.sum(axis=1), (w * x).sum(axis=1)
    rng = np.where(flat, F32(1), mx - mn)
    iscale = F32(nmax) / rng
    scale = F32(1) / iscale
    L = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = (w * (scale[:, None] * L + mn[:, None] - x) ** 2).sum(axis=1)
    for step in range(nstep + 1):
        # The C updates `min` when a candidate wins, and later candidates start from it.
        span = mx - mn
        span = np.where(span > 0, span, F32(1))
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
        la = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
        sum_l, sum_l2, sum_xl = (w * la).sum(axis=1), (w * la * la).sum(axis=1), (w * la * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, F32(1)), this_scale)
        this_min = np.where(positive, F32(0), this_min)
        err = (w * (this_scale[:, None] * la + this_min[:, None] - x) ** 2).sum(axis=1)
        better = ok & (err < best)
        L = np.where(better[:, None], la.astype(np.int32), L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    return np.where(flat, F32(0), scale), -mn, np.where(flat[:, None], 0, L)


def make_qx_quants(x: np.ndarray, nmax: int):
    """Symmetric scale and levels -nmax..nmax-1 (stored + nmax) of each row, weighted by x^2 (rmse_type 1)."""
    rows = np.arange(x.shape[0])
    mx = x[rows, np.abs(x).argmax(axis=1)]  # the signed value of largest magnitude (the first, as the C)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    w = x * x

    def levels(iscale):
        l = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
        return l, (w * x * l).sum(axis=1), (w * l * l).sum(axis=1)

    l, sumlx, suml2 = levels(F32(-nmax) / mx)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    L, best = l, scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = levels(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better[:, None], l, L)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, F32(1)), scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, F32(0), scale), np.where(zero[:, None], 0, L.astype(np.int32) + nmax)


def _scale_min_k4(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Q4_K/Q5_K: fp16 d and dmin, the 12 packed scale bytes and the levels of (nb, 256) weights."""
    nb = x.shape[0]
    xs = x.reshape(nb, 8, 32)
    av = np.sqrt((xs * xs).sum(axis=-1, keepdims=True) / F32(32))
    sc, mins, _ = make_qkx2_quants(xs.reshape(-1, 32), (av + np.abs(xs)).reshape(-1, 32), nmax, rmin, rdelta, nstep)
    sc, mins = sc.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = np.maximum(sc.max(axis=1), 0), np.maximum(mins.max(axis=1), 0)
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, 1), F32(0))
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, 1), F32(0))
    ls = np.minimum(63, _rint(inv_scale[:, None] * sc)).astype(np.uint8)
    lm = np.minimum(63, _rint(inv_min[:, None] * mins)).astype(np.uint8)
    d, dmin = (max_scale / F32(63)).astype(np.float16), (max_min / F32(63)).astype(np.float16)
    packed = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)
    # The levels again against the scales as stored (fp16 times 6 bits), as the C does.
    dq = d.astype(F32)[:, None] * ls.astype(F32)
    dm = dmin.astype(F32)[:, None] * lm.astype(F32)
    safe = np.where(dq > 0, dq, F32(1))[..., None]
    L = np.clip(_rint((xs + dm[..., None]) / safe), 0, nmax)
    L = np.where((dq > 0)[..., None], L, 0).reshape(nb, QK_K).astype(np.uint8)
    return d, dmin, packed, L


def _nibbles(L: np.ndarray) -> np.ndarray:
    """128 bytes per block: in each 64 weights, the first 32 in the low nibbles, the next 32 in the high."""
    q = L.reshape(L.shape[0], 4, 2, 32) & 0xF
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(L.shape[0], 128)


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, L = _scale_min_k4(x, 15, -1.0, 0.1, 20)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, _nibbles(L)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, L = _scale_min_k4(x, 31, -0.5, 0.1, 15)
    high = (L.reshape(L.shape[0], 8, 32) >> 4) & 1  # bit i of qh[l]: the fifth bit of sub-block i's weight l
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qh, _nibbles(L)], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    scales, L = make_qx_quants(xs.reshape(-1, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), pick]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = np.where(empty, F32(0), F32(-128) / np.where(empty, F32(1), max_scale))
    d = np.where(empty, F32(0), F32(1) / np.where(empty, F32(1), iscale)).astype(np.float16)
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)
    dq = d.astype(F32)[:, None] * sc.astype(F32)
    safe = np.where(dq != 0, dq, F32(1))[..., None]
    L = np.where((dq != 0)[..., None], np.clip(_rint(xs / safe), -32, 31) + 32, L)
    L = np.where(empty[:, None, None], 0, L).reshape(nb, 2, 4, 32).astype(np.uint8)  # halves of 128, rows of 32
    ql = np.concatenate([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4),
                         (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    sc = np.where(empty[:, None], 0, sc).astype(np.int8)
    return np.concatenate([ql, qh.reshape(nb, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


_KQUANTS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize(data: np.ndarray, qtype) -> np.ndarray:
    """`data` (rows x row length, float32) as GGUF bytes of `qtype` (rows x bytes per row, uint8).

    Args:
        data (np.ndarray): the tensor as numpy lays it out (the GGUF row is the last axis).
        qtype (gguf.GGMLQuantizationType): the target type; the row length must be a multiple of
            its block size.
    """
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = data.reshape(-1, data.shape[-1]).shape
    if cols % block:
        raise ValueError(f"{qtype.name}: a row of {cols} weights is not a multiple of its block size {block}")
    kernel = _KQUANTS.get(qtype.name)
    flat = data.reshape(rows, cols)
    out = np.empty((rows, cols // block * type_size), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // cols)  # chunks for the simple types too: gguf's quantizer is whole-array numpy
    for r in range(0, rows, step):
        chunk = np.ascontiguousarray(flat[r:r + step], dtype=F32)
        q = kernel(chunk.reshape(-1, QK_K)) if kernel else np.asarray(gguf.quants.quantize(chunk, qtype))
        out[r:r + step] = q.reshape(chunk.shape[0], -1)
    return out
