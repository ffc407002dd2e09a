"""Generation: training's prompt format, greedy equality run vs export, EOS, chat loop, CLI."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import make_run

from qlora_lite.cli import main
from qlora_lite.data.templates import alpaca_prompt, prompt_ids
from qlora_lite.export.merge import export_model
from qlora_lite.generate import Loaded, chat_loop, generate_ids, generate_text, load_for_generation, prompt_to_ids
from qlora_lite.model.tiny import build_tiny_model

SMALL = dict(hidden_size=64, num_layers=2, intermediate_size=128, vocab_size=400)


@pytest.fixture(scope="module")
def tiny_tok_model(tmp_path_factory):
    """A tiny llama with a real tokenizer (no chat template: Alpaca prompts)."""
    return build_tiny_model(tmp_path_factory.mktemp("gen") / "base", **SMALL)


@pytest.fixture(scope="module")
def run_and_export(tiny_tok_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-run")
    run = make_run(root / "run", tiny_tok_model)
    export_model(run, root / "export", dtype="fp32", log=lambda m: None)
    return run, str(root / "export")


def test_greedy_from_run_equals_greedy_from_export(run_and_export):
    run, exported = run_and_export
    a, b = load_for_generation(run), load_for_generation(exported)
    assert "4-bit" in a.description and b.model.dtype == torch.float32
    prompt = "What is the capital of France?"
    ids = torch.tensor([prompt_to_ids(a.tokenizer, prompt)])
    ga = generate_ids(a.model, ids, 8, min_new_tokens=8)
    gb = generate_ids(b.model, ids, 8, min_new_tokens=8)
    assert ga.shape == (8,) and torch.equal(ga, gb)
    assert generate_text(a.model, a.tokenizer, prompt, max_new_tokens=8) == \
        generate_text(b.model, b.tokenizer, prompt, max_new_tokens=8)


def test_prompt_is_rendered_as_in_training(tiny_tok_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tok_model)
    assert prompt_to_ids(tok, "Name a colour.") == prompt_ids(tok, "Name a colour.")
    text = tok.decode(prompt_to_ids(tok, "Name a colour."))
    assert text.endswith(alpaca_prompt("Name a colour.")) and text.startswith(tok.bos_token)
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "again"}]
    text = tok.decode(prompt_to_ids(tok, convo))
    assert "hello" + tok.eos_token in text and text.endswith("### Instruction:\nagain\n\n### Response:\n")
    assert tok.decode(prompt_to_ids(tok, "raw text", raw=True)) == tok.bos_token + "raw text"


def test_chat_template_is_used_when_the_tokenizer_has_one(tmp_path):
    from transformers import AutoTokenizer

    path = build_tiny_model(tmp_path / "chat", chat_template=True, **SMALL)
    tok = AutoTokenizer.from_pretrained(path)
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "again"}]
    text = tok.decode(prompt_to_ids(tok, convo))
    assert text == f"{tok.bos_token}<|user|>\nhi\n<|assistant|>\nhello{tok.eos_token}\n<|user|>\nagain\n<|assistant|>\n"


def test_generation_stops_at_eos(run_and_export):
    _, exported = run_and_export
    b = load_for_generation(exported)
    ids = torch.tensor([prompt_to_ids(b.tokenizer, "Say something.")])
    free = generate_ids(b.model, ids, 6, min_new_tokens=6)
    stop = int(free[2])  # make the third greedy token a stop token: generation must end there
    out = generate_ids(b.model, ids, 6, eos_token_id=[stop])
    assert torch.equal(out, free[: int((free == stop).nonzero()[0]) + 1])
    assert len(out) < 6


def test_sampling_is_seeded_and_mode_restored(run_and_export):
    run, _ = run_and_export
    a = load_for_generation(run)
    a.model.train()
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9)
    assert generate_text(a.model, a.tokenizer, "hi", seed=3, **kw) == generate_text(a.model, a.tokenizer, "hi", seed=3, **kw)
    assert a.model.training  # the training demo calls this mid-run


def test_generation_mid_training_keeps_4bit_weights_intact(run_and_export):
    """bitsandbytes repacks 4-bit weights on CPU eval forwards; generation must not let it."""
    run, _ = run_and_export
    a = load_for_generation(run)
    q = a.model.get_submodule("model.layers.0.self_attn.q_proj").base.weight
    before = q.data.clone()
    generate_text(a.model, a.tokenizer, "hi", max_new_tokens=3)
    assert not getattr(q.quant_state, "packing_format_for_cpu", False) and torch.equal(q.data, before)


def test_chat_loop_keeps_history_and_stops_at_exit(run_and_export):
    _, exported = run_and_export
    b = load_for_generation(exported)
    said = []
    history = chat_loop(b, lines=["hi\n", "\n", "and now?\n", "/exit\n", "never read\n"], write=said.append,
                        max_new_tokens=4)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in history[::2]] == ["hi", "and now?"] and said == [m["content"] for m in history[1::2]]
    assert said[1] == generate_text(b.model, b.tokenizer, history[:3], max_new_tokens=4)
    assert len(chat_loop(b, lines=["one\n"], write=said.append, max_new_tokens=2)) == 2  # EOF ends too


def test_cli_generate(run_and_export, tiny_tok_model):
    run, exported = run_and_export
    runner = CliRunner()
    outs = []
    for src in (run, exported):
        res = runner.invoke(main, ["generate", src, "--prompt", "What is the capital of France?",
                                   "--max-new-tokens", "6"])
        assert res.exit_code == 0, res.output
        outs.append(res.stdout)
    assert outs[0] == outs[1]
    res = runner.invoke(main, ["generate", tiny_tok_model, "--adapter", f"{run}/adapter",
                               "--prompt", "What is the capital of France?", "--max-new-tokens", "6"])
    assert res.exit_code == 0 and res.stdout == outs[0]
    res = runner.invoke(main, ["generate", exported, "--chat", "--max-new-tokens", "3"], input="hi\n/exit\n")
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["generate", exported])
    assert res.exit_code == 2 and "--prompt" in res.output


@pytest.mark.parametrize("recipe_template", [None, "alpaca"])
def test_export_keeps_the_prompt_format_training_used(tmp_path, recipe_template):
    """A base with a chat template: the export formats prompts exactly as the run does."""
    base = build_tiny_model(tmp_path / "chat", chat_template=True, **SMALL)
    run = make_run(tmp_path / "run", base, chat_template=recipe_template)
    export_model(run, tmp_path / "out", log=lambda m: None)
    a, b = load_for_generation(run), load_for_generation(str(tmp_path / "out"))
    assert a.chat_template == recipe_template and b.chat_template is None
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    for prompt in ("Name a colour.", convo):
        assert prompt_to_ids(a.tokenizer, prompt, a.chat_template) == prompt_to_ids(b.tokenizer, prompt)
    assert bool(b.tokenizer.chat_template) is (recipe_template is None)
    assert ("Alpaca" in (tmp_path / "out" / "EXPORT.md").read_text()) is (recipe_template == "alpaca")
