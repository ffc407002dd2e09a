"""ggml-quants.c's reference k-quant C (quantize_row_q4_K_ref, _q5_K_ref, _q6_K_ref and their
make_qkx2_quants / make_qx_quants), ported line by line to scalar Python over float32: the slow
reference the vectorized qlora_lite/export/kquants.py is compared with, block by block."""

from __future__ import annotations

import numpy as np

F = np.float32


def nearest_int(v) -> int:
    return int(np.rint(F(v)))


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    mn, mx = F(x[0]), F(x[0])
    sum_w, sum_x = F(w[0]), F(w[0]) * F(x[0])
    for i in range(1, n):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sum_w += w[i]
        sum_x += w[i] * x[i]
    mn = min(mn, F(0))
    if mx == mn:
        return F(0), -mn, [0] * n
    iscale = F(nmax) / (mx - mn)
    scale = F(1) / iscale
    L = [max(0, min(nmax, nearest_int(iscale * (x[i] - mn)))) for i in range(n)]
    best = sum(F(w[i]) * (scale * L[i] + mn - x[i]) ** 2 for i in range(n))
    for step in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * step + F(nmax)) / (mx - mn)
        la = [max(0, min(nmax, nearest_int(iscale * (x[i] - mn)))) for i in range(n)]
        sum_l = sum(F(w[i]) * la[i] for i in range(n))
        sum_l2 = sum(F(w[i]) * la[i] * la[i] for i in range(n))
        sum_xl = sum(F(w[i]) * la[i] * x[i] for i in range(n))
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min, this_scale = F(0), sum_xl / sum_l2
            err = sum(F(w[i]) * (this_scale * la[i] + this_min - x[i]) ** 2 for i in range(n))
            if err < best:
                L, best, scale, mn = la, err, this_scale, this_min
    return scale, -mn, L


def q4_k_levels(block, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20):
    """(d, dmin, 6-bit scales, 6-bit mins, levels) of one 256-weight block, as quantize_row_q4_K_ref."""
    scales, mins = [], []
    for j in range(8):
        x = block[32 * j:32 * j + 32]
        av = np.sqrt(F((x * x).sum()) / F(32))
        s, m, _ = make_qkx2_quants(x, av + np.abs(x), nmax, rmin, rdelta, nstep)
        scales.append(F(s))
        mins.append(F(m))
    max_scale, max_min = max(F(0), max(scales)), max(F(0), max(mins))
    inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
    inv_min = F(63) / max_min if max_min > 0 else F(0)
    ls = [min(63, nearest_int(inv_scale * s)) for s in scales]
    lm = [min(63, nearest_int(inv_min * m)) for m in mins]
    d, dmin = np.float16(max_scale / F(63)), np.float16(max_min / F(63))
    L = []
    for j in range(8):
        dq, dm = F(d) * ls[j], F(dmin) * lm[j]
        L += [0 if not dq else max(0, min(nmax, nearest_int((block[32 * j + i] + dm) / dq))) for i in range(32)]
    return d, dmin, ls, lm, L


def q6_k_levels(block):
    """(d, int8 scales, levels 0..63) of one 256-weight block, as quantize_row_q6_K_ref."""
    scales, Ls = [], []
    for ib in range(16):
        x = block[16 * ib:16 * ib + 16]
        amax_i = int(np.abs(x).argmax())
        mx = F(x[amax_i])
        if abs(mx) < 1e-15:
            scales.append(F(0))
            Ls.append([0] * 16)
            continue
        iscale = F(-32) / mx
        ls = [max(-32, min(31, nearest_int(iscale * v))) for v in x]
        sumlx = sum(F(v * v) * v * l for v, l in zip(x, ls))
        suml2 = sum(F(v * v) * l * l for v, l in zip(x, ls))
        scale = sumlx / suml2 if suml2 else F(0)
        best, L = scale * sumlx, [l + 32 for l in ls]
        for step in [s for s in range(-9, 10) if s]:
            iscale = -(F(32) + F(0.1) * step) / mx
            ls = [max(-32, min(31, nearest_int(iscale * v))) for v in x]
            sumlx = sum(F(v * v) * v * l for v, l in zip(x, ls))
            suml2 = sum(F(v * v) * l * l for v, l in zip(x, ls))
            if suml2 > 0 and sumlx * sumlx > best * suml2:
                L, scale = [l + 32 for l in ls], sumlx / suml2
                best = scale * sumlx
        scales.append(F(scale))
        Ls.append(L)
    max_scale = scales[int(np.abs(np.array(scales)).argmax())]
    iscale = F(-128) / max_scale
    d = np.float16(F(1) / iscale)
    sc = [min(127, nearest_int(iscale * s)) for s in scales]
    out = []
    for j in range(16):
        dq = F(d) * sc[j]
        out += Ls[j] if not dq else [max(-32, min(31, nearest_int(block[16 * j + i] / dq))) + 32 for i in range(16)]
    return d, sc, out
