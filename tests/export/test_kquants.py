"""qlora-lite's GGUF quantizers, read back by the `gguf` package's own dequantizer: the k-quants
beat the simple formats of their size on every block, llama.cpp's type rule, and the re-quantized
file keeps the converter's metadata."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the GGUF writer needs the `gguf` package: pip install 'qlora-lite[test]'")

from qlora_lite.export.gguf_requant import requantize, tensor_values  # noqa: E402
from qlora_lite.export.gguf_types import plan_types, use_more_bits  # noqa: E402
from qlora_lite.export.kquants import quantize  # noqa: E402

T = gguf.GGMLQuantizationType
BLOCKS = {q.name: gguf.GGML_QUANT_SIZES[q][0] for q in T}
# Each k-quant against the simple format of (about) its size: 4.5 vs 4.5, 5.5 vs 5.5, 6.56 vs 6 bits.
RIVALS = [(T.Q4_K, T.Q4_0), (T.Q5_K, T.Q5_0), (T.Q6_K, T.Q5_1)]


def weights(kind: str, shape=(48, 1024), seed=0) -> np.ndarray:
    """Weight-like tensors: Gaussian, Gaussian with outlier columns, heavy-tailed (Student t, 3 dof)."""
    rng = np.random.default_rng(seed)
    if kind == "heavy":
        return (rng.standard_t(3, shape) * 0.02).astype(np.float32)
    x = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if kind == "outliers":
        x[:, ::97] *= 10
    return x


def block_errors(x: np.ndarray, qtype) -> np.ndarray:
    """Mean squared error of each 256-weight block, through gguf's dequantizer."""
    q = quantize(x, qtype)
    assert q.shape == (x.shape[0], x.shape[1] // BLOCKS[qtype.name] * gguf.GGML_QUANT_SIZES[qtype][1])
    y = gguf.quants.dequantize(q, qtype)
    assert y.shape == x.shape
    return ((y - x) ** 2).reshape(-1, 256).mean(axis=1)


@pytest.mark.parametrize("kind", ["gaussian", "outliers", "heavy"])
@pytest.mark.parametrize("kquant,simple", RIVALS, ids=lambda q: q.name)
def test_every_k_quant_block_is_at_least_as_close_as_the_simple_format_of_its_size(kind, kquant, simple):
    x = weights(kind)
    k, s = block_errors(x, kquant), block_errors(x, simple)
    assert (k <= s).all(), f"{(k > s).sum()} of {k.size} blocks worse"
    assert np.sqrt(k.mean()) < 0.9 * np.sqrt(s.mean())  # and clearly closer over the tensor


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda q: q.name)
def test_k_quants_read_back_within_their_step_and_keep_zeros(qtype):
    x = weights("gaussian", (8, 512))
    x[3] = 0.0  # an all-zero row: every block of it must come back as zeros
    x[5, :256] = 0.01  # a constant block
    y = gguf.quants.dequantize(quantize(x, qtype), qtype)
    assert np.all(np.isfinite(y)) and np.all(y[3] == 0)
    levels = {T.Q4_K: 15, T.Q5_K: 31, T.Q6_K: 63}[qtype]
    span = (x.reshape(-1, 32).max(1) - np.minimum(x.reshape(-1, 32).min(1), 0))
    # a weight is off by at most about one step of its 32-block (scales are 6- or 8-bit themselves)
    assert np.all(np.abs(y - x).reshape(-1, 32).max(1) <= 1.5 * span / levels + 1e-6)


def test_a_row_that_is_not_a_multiple_of_the_block_is_refused():
    with pytest.raises(ValueError, match="576 weights is not a multiple of its block size 256"):
        quantize(np.zeros((2, 576), np.float32), T.Q4_K)


def test_q4_k_m_gives_q6_k_to_half_of_a_32_layer_models_attn_v_and_ffn_down():
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    tensors = [("token_embd.weight", (32000, 4096)), ("output.weight", (32000, 4096)), ("output_norm.weight", (4096,))]
    for i in range(32):
        tensors += [(f"blk.{i}.attn_v.weight", (4096, 4096)), (f"blk.{i}.ffn_down.weight", (4096, 11008)),
                    (f"blk.{i}.attn_q.weight", (4096, 4096)), (f"blk.{i}.attn_norm.weight", (4096,))]
    plan = plan_types(tensors, "q4_K_M", BLOCKS)
    # 11008 = 43 x 256: ffn_down has k-quant rows, as in llama.cpp's Llama-2-7B Q4_K_M.
    assert plan.types["output.weight"] == "Q6_K" and plan.types["token_embd.weight"] == "Q4_K"
    assert plan.types["blk.0.attn_v.weight"] == "Q6_K" and plan.types["blk.4.attn_v.weight"] == "Q4_K"
    assert plan.counts() == {"F32": 33, "Q4_K": 32 + 16 + 16 + 1, "Q6_K": 16 + 16 + 1} and not plan.fallbacks


def test_rows_of_576_fall_back_as_llama_cpp_does_and_a_tied_embedding_is_the_head():
    # SmolLM2-135M: hidden 576 (2.25 x 256), tied embeddings, no output.weight.
    tensors = [("token_embd.weight", (49152, 576)), ("blk.0.attn_q.weight", (576, 576)),
               ("blk.0.ffn_down.weight", (576, 1536)), ("blk.0.ffn_up.weight", (1536, 576))]
    for gguf_type, want in [("q4_K_M", ["Q8_0", "Q5_0", "Q6_K", "Q5_0"]), ("q5_K_M", ["Q8_0", "Q5_1", "Q6_K", "Q5_1"]),
                            ("q6_K", ["Q8_0", "Q8_0", "Q6_K", "Q8_0"]), ("q4_0", ["Q8_0", "Q4_0", "Q4_0", "Q4_0"])]:
        plan = plan_types(tensors, gguf_type, BLOCKS)
        assert [plan.types[n] for n, _ in tensors] == want, gguf_type
    assert plan_types(tensors, "q4_K_M", BLOCKS).fallbacks["token_embd.weight"] == ("Q6_K", "Q8_0")


def small_gguf(path, tensors: dict[str, np.ndarray]) -> None:
    """A 16-bit GGUF as the converter writes one: architecture, hyperparameters, a vocabulary, F16 weights."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "hello"])
    w.add_chat_template("{{ messages[0]['content'] }}")
    for name, v in tensors.items():
        w.add_tensor(name, v.astype(np.float16) if v.ndim > 1 else v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("gguf_type", ["q4_0", "q4_1", "q5_0", "q5_1", "q4_K_M", "q5_K_M", "q6_K"])
def test_a_requantized_gguf_reads_back_with_the_metadata_and_the_planned_types(tmp_path, gguf_type):
    rng = np.random.default_rng(1)
    tensors = {"token_embd.weight": rng.standard_normal((16, 512)), "output_norm.weight": rng.standard_normal(512),
               "output.weight": rng.standard_normal((16, 512))}
    for i in range(2):
        tensors |= {f"blk.{i}.attn_v.weight": rng.standard_normal((64, 512)),
                    f"blk.{i}.attn_q.weight": rng.standard_normal((512, 576)),
                    f"blk.{i}.attn_norm.weight": rng.standard_normal(512)}
    tensors = {k: (v * 0.02).astype(np.float32) for k, v in tensors.items()}
    small_gguf(tmp_path / "f16.gguf", tensors)
    logged = []
    plan = requantize(tmp_path / "f16.gguf", tmp_path / "out.gguf", gguf_type, log=logged.append)
    r = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    want_ftype = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q4_K_M": 15, "q5_K_M": 17, "q6_K": 18}[gguf_type]
    assert r.fields["general.file_type"].contents() == want_ftype
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["<unk>", "<s>", "</s>", "hello"]
    assert r.fields["tokenizer.chat_template"].contents() == "{{ messages[0]['content'] }}"
    assert r.fields["llama.block_count"].contents() == 2
    for t in r.tensors:
        assert t.tensor_type.name == plan.types[t.name]
        got, want = tensor_values(t), tensors[t.name]
        assert got.shape == want.shape
        tol = 0 if t.tensor_type == T.F32 else 0.25 * np.abs(want).max()
        assert np.abs(got - want).max() <= tol, t.name
    assert (len(plan.fallbacks) > 0) == (gguf_type in ("q4_K_M", "q5_K_M", "q6_K"))  # the 576-wide attn_q
    assert bool(logged) == bool(plan.fallbacks)


def unpack_q4_k(b: np.ndarray):
    """(d, dmin, scales, mins, levels) from one Q4_K block's 144 bytes, as llama.cpp's get_scale_min_k4."""
    d, dmin = b[0:2].view(np.float16)[0], b[2:4].view(np.float16)[0]
    q = b[4:16].astype(int)
    sc = [q[j] & 63 for j in range(4)] + [(q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4) for j in range(4, 8)]
    mn = [q[j + 4] & 63 for j in range(4)] + [(q[j + 4] >> 4) | ((q[j] >> 6) << 4) for j in range(4, 8)]
    qs = b[16:].astype(int)
    levels = []
    for c in range(4):
        levels += [v & 0xF for v in qs[32 * c:32 * c + 32]] + [v >> 4 for v in qs[32 * c:32 * c + 32]]
    return d, dmin, sc, mn, levels


def test_the_vectorized_q4_k_writes_the_bytes_of_llama_cpps_reference_c_block_by_block():
    from kquant_reference import q4_k_levels

    x = weights("outliers", (1, 1024), seed=3)
    q = quantize(x, T.Q4_K).reshape(-1, 144)
    same = 0
    for i, block in enumerate(x.reshape(-1, 256)):
        d, dmin, ls, lm, L = q4_k_levels(block)
        got = unpack_q4_k(q[i])
        assert got[0] == d and got[1] == dmin and list(got[2]) == ls and list(got[3]) == lm
        same += got[4] == L
    assert same == 4


def test_the_vectorized_q6_k_writes_the_levels_of_llama_cpps_reference_c():
    from kquant_reference import q6_k_levels

    x = weights("heavy", (1, 512), seed=4)
    q = quantize(x, T.Q6_K).reshape(-1, 210)
    for i, block in enumerate(x.reshape(-1, 256)):
        d, sc, L = q6_k_levels(block)
        assert q[i, 208:].view(np.float16)[0] == d and list(q[i, 192:208].view(np.int8)) == sc
        ql, qh = q[i, :128].astype(int), q[i, 128:192].astype(int)
        got = []
        for h in range(2):
            for r in range(4):
                low = ql[h * 64 + (r % 2) * 32: h * 64 + (r % 2) * 32 + 32] >> (4 * (r // 2)) & 0xF
                got += list(low | ((qh[h * 32:h * 32 + 32] >> (2 * r)) & 3) << 4)
        assert got == L
