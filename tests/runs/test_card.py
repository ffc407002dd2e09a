"""Model cards: README.md front matter that Hugging Face parses, the base's licence, the run's figures."""

from __future__ import annotations

import json

import yaml
from conftest import make_run

from qlora_lite.export.merge import export_model
from qlora_lite.recipe import recipe_from_dict
from qlora_lite.runs.card import adapter_card, base_card_metadata

SUMMARY = {"steps": 40, "train_loss": 0.51234, "eval_loss": 0.6, "eval_perplexity": 1.82, "tokens": 5120,
           "wall_time_s": 12.5, "device": "cpu"}
DATA = {"source": "rows.jsonl", "data_format": "alpaca", "template": "alpaca", "rows": 100, "train_samples": 90,
        "eval_samples": 10, "tokens": 5000, "trained_tokens": 2000, "truncated": 0, "dropped": 0, "longest": 60,
        "max_seq_len": 64, "from_cache": False}


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, head, body = text.split("---\n", 2)
    return yaml.safe_load(head), body


def recipe_for(base, data_path):
    return recipe_from_dict({"model": {"name_or_path": str(base)}, "lora": {"r": 8, "alpha": 16},
                             "data": {"path": data_path}, "train": {"max_steps": 40}, "output": {"dir": "x"}})


def test_an_adapter_card_names_base_library_tags_licence_and_the_final_figures(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# A base model\n")
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    (tmp_path / "data_summary.json").write_text(json.dumps(DATA))
    meta, body = split_card(adapter_card(recipe_for(base, "tatsu-lab/alpaca"), tmp_path))
    assert meta["base_model"] == str(base) and meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert {"qlora-lite", "lora", "qlora"} <= set(meta["tags"]) and meta["datasets"] == ["tatsu-lab/alpaca"]
    assert "r=8, alpha=16" in body and "final train loss 0.5123" in body and "eval perplexity 1.82" in body
    assert "90 training / 10 eval samples" in body and "PeftModel.from_pretrained" in body


def test_a_local_data_file_and_a_base_without_a_card_add_no_datasets_or_licence(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    meta, _ = split_card(adapter_card(recipe_for(tmp_path, str(data)), tmp_path))
    assert "datasets" not in meta and "license" not in meta


def test_a_hub_base_card_that_is_not_in_the_cache_gives_no_metadata():
    assert base_card_metadata("someone/not-downloaded") == {}  # read from the local Hub cache only


def test_export_writes_a_transformers_model_card_beside_the_weights(tiny_llama, tmp_path):
    run = make_run(tmp_path / "run", tiny_llama)
    export_model(run, tmp_path / "out", log=lambda m: None)
    meta, body = split_card((tmp_path / "out" / "README.md").read_text())
    assert meta["library_name"] == "transformers" and meta["base_model"] == tiny_llama
    assert "AutoModelForCausalLM.from_pretrained" in body and "gguf" not in meta["tags"]


def test_a_preference_run_card_gives_its_pairs(tmp_path):
    pairs = {"source": "pairs.jsonl", "data_format": "preference", "template": "chat template", "rows": 144,
             "pairs": 130, "eval_pairs": 14, "tokens": 11206, "completion_tokens": 1134, "identical": 0,
             "too_long": 0, "longest": 46, "max_seq_len": 64, "from_cache": False}
    (tmp_path / "data_summary.json").write_text(json.dumps(pairs))
    _, body = split_card(adapter_card(recipe_for(tmp_path, "tatsu-lab/alpaca"), tmp_path))
    assert "130 training / 14 eval pairs" in body
