"""Recipes: every shipped recipe validates; typos and bad values name the field and the fix."""

from pathlib import Path

import pytest

from qlora_lite.recipe import RecipeError, apply_overrides, load_recipe, recipe_from_dict, save_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
BASE = {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}}


def with_(section, **kv):
    raw = {k: dict(v) for k, v in BASE.items()}
    raw.setdefault(section, {}).update(kv)
    return raw


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    r = load_recipe(path)
    assert r.model.quantization.quant_type == "nf4" and r.model.quantization.double_quant
    # Checkpointing saves GPU memory; a CPU-only recipe may spend that memory on speed instead.
    assert r.lora.target_modules == "all-linear" and (r.model.gradient_checkpointing or r.train.device == "cpu")
    assert "qlora-lite run recipes/" in path.read_text().splitlines()[1]


def test_the_four_required_recipes_exist():
    assert {p.name for p in RECIPES} >= {"llama-7b-sft.yaml", "mistral-7b-sft.yaml", "llama-3-8b-chat.yaml",
                                         "tiny-cpu-sft.yaml"}


@pytest.mark.parametrize("raw,msg", [
    (with_("train", lrr=1e-4), "Unknown key `lrr` in section `train`. Did you mean `lr`?"),
    (with_("lora", rank=8), "Unknown key `rank` in section `lora`"),
    ({**BASE, "trian": {}}, "Unknown key `trian` in the top level. Did you mean `train`?"),
    (with_("lora", r=0), "lora.r must be a number > 0, got 0."),
    (with_("train", lr=-1.0), "train.lr must be a number > 0, got -1.0."),
    (with_("data", max_seq_len=0), "data.max_seq_len must be a number > 0, got 0."),
    (with_("lora", r="eight"), "lora.r must be an integer, got 'eight'."),
    (with_("train", optimizer="adam"), "train.optimizer must be one of"),
    (with_("model", quantization={"bits": 8}), "model.quantization.bits must be one of 4, 16; got 8."),
    (with_("model", quantization={"quant_typ": "nf4"}), "Did you mean `quant_type`?"),
    (with_("data", format="jsonl"), "data.format must be one of auto, alpaca"),
    (with_("lora", dropout=1.0), "lora.dropout must be in [0, 1)"),
    ({"data": {"path": "x"}}, "no `model` section"),
    (with_("train", max_time="4 hours"), "train.max_time '4 hours' is not a duration; write e.g. 3h50m"),
])
def test_errors_name_the_field(raw, msg):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw)
    assert msg in str(e.value)


def test_yaml_1_1_float_strings_and_ints_are_numbers():
    r = recipe_from_dict(with_("train", lr="1e-4", weight_decay=0))
    assert r.train.lr == 1e-4 and isinstance(r.train.weight_decay, float)


def test_max_time_takes_a_duration_or_seconds():
    assert recipe_from_dict(with_("train", max_time="3h50m")).train.max_time_s == 13800
    assert recipe_from_dict(with_("train", max_time=90)).train.max_time_s == 90
    assert recipe_from_dict(BASE).train.max_time_s is None


def test_overrides_apply_before_validation(tmp_path):
    path = tmp_path / "r.yaml"
    save_recipe(recipe_from_dict(BASE), path)
    r = load_recipe(path, ["train.lr=1e-4", "lora.r=8", "lora.target_modules=[q_proj, v_proj]",
                           "model.quantization.bits=16"])
    assert (r.train.lr, r.lora.r, r.lora.target_modules, r.model.quantization.bits) == (1e-4, 8, ["q_proj", "v_proj"], 16)
    with pytest.raises(RecipeError, match="Did you mean `lr`"):
        load_recipe(path, ["train.lrr=1"])
    with pytest.raises(RecipeError, match="section.key=value"):
        apply_overrides({}, ["lr"])
    with pytest.raises(RecipeError, match=r"--set train.lr=\[1: the value is not valid YAML"):
        apply_overrides({}, ["train.lr=[1"])


def test_saved_recipe_round_trips(tmp_path):
    r = recipe_from_dict(with_("lora", r=4, rslora=True))
    save_recipe(r, tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == r
    assert r.lora.scale == 32 / 2


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_every_field_is_documented_in_docs_recipes_md():
    import dataclasses

    from qlora_lite import recipe as R

    doc = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    sections = {"model": R.ModelConfig, "model.quantization": R.QuantizationConfig, "lora": R.LoraConfig,
                "data": R.DataConfig, "train": R.TrainConfig, "output": R.OutputConfig}
    for name, cls in sections.items():
        part = doc.split(f"## `{name}`")[1].split("\n## ")[0]
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in part, f"{name}.{f.name} is missing from docs/recipes.md"


def _doc_row(key: str) -> str:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()
    part = doc.split("## `model.quantization`")[1].split("\n## ")[0]
    return next(line for line in part.splitlines() if line.startswith(f"| `{key}` |"))


def test_compute_dtypes_accepted_are_the_documented_ones_and_the_loader_knows_them():
    import re

    import torch

    from qlora_lite.recipe import COMPUTE_DTYPES, LORA_DTYPES, QuantizationConfig
    from qlora_lite.utils.dtypes import torch_dtype

    meaning = _doc_row("compute_dtype").split("|")[4]
    documented = set(re.findall(r'"(\w+)"', meaning))
    assert documented == set(COMPUTE_DTYPES) and set(LORA_DTYPES) <= set(COMPUTE_DTYPES)
    assert [torch_dtype(n) for n in COMPUTE_DTYPES] == [torch.bfloat16, torch.float16, torch.float32]
    with pytest.raises(RecipeError, match="compute_dtype"):
        QuantizationConfig(compute_dtype="fp16")


def test_blocksize_accepts_only_what_the_loader_quantizes_with(tiny_llama):
    from qlora_lite.model.loader import load_model
    from qlora_lite.recipe import BLOCKSIZES, ModelConfig, QuantizationConfig

    assert "only 64" in _doc_row("blocksize")
    with pytest.raises(RecipeError, match="blocksize"):
        recipe_from_dict(with_("model", quantization={"blocksize": 128}))
    for bs in BLOCKSIZES:
        m = load_model(ModelConfig(name_or_path=tiny_llama, quantization=QuantizationConfig(blocksize=bs)))
        sizes = {p.quant_state.blocksize for p in m.parameters() if getattr(p, "quant_state", None) is not None}
        assert sizes == {bs}
