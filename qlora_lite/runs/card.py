"""Model cards: the README.md of an adapter folder (at the end of a run) and of an export folder.

Hugging Face's convention: YAML front matter (base_model, library_name, tags, datasets when the
data is a Hub data set, the base's licence when its own card names one), then what was trained
and how to load it. Everything comes from the run folder (recipe.yaml, data_summary.json,
summary.json) and the base's README.md when it is local or in the Hub cache: writing a card
needs no network, and the folder is ready for `hf upload`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..data.sources import local_identity
from ..errors import QloraError
from ..recipe import LoraConfig, Recipe, load_recipe
from ..utils.atomic import atomic_write_text
from .folder import RECIPE_NAME, RunSource

CARD_NAME = "README.md"
TAGS = ["qlora-lite", "lora", "qlora", "text-generation"]


def base_card_metadata(base: str) -> dict:
    """The YAML front matter of the base model's own README.md ({} when there is none at hand).

    Args:
        base (str): a local model folder or a Hub id; a Hub card is read from the local cache only.
    """
    path = Path(base).expanduser() / CARD_NAME
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, CARD_NAME)
        except Exception:  # noqa: BLE001 - not a valid repo id: there is no Hub card either
            cached = None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None:
        return {}
    text = path.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return meta if isinstance(meta, dict) else {}


def is_hub_dataset(path: str) -> bool:
    """Whether data.path names a Hub data set rather than a local file."""
    try:
        return local_identity(path) is None
    except QloraError:
        return False


def front_matter(base: str, library: str, data_path: str | None = None) -> dict:
    """The card's metadata: base_model, library_name, tags, datasets and licence where known.

    Args:
        base (str): the base model (recipe's model.name_or_path).
        library (str): "peft" (an adapter) or "transformers" (a merged model).
        data_path (str | None): data.path; listed under datasets when it is a Hub id. Default None.
    """
    meta = {"base_model": base, "library_name": library,
            "tags": TAGS + ([f"base_model:adapter:{base}"] if library == "peft" else []),
            "pipeline_tag": "text-generation"}
    if data_path and is_hub_dataset(data_path):
        meta["datasets"] = [data_path]
    licence = base_card_metadata(base).get("license")
    if licence:
        meta["license"] = licence
    return meta


def _figures(run_dir: Path | None) -> list[str]:
    """The data and the final figures as card lines, from data_summary.json and summary.json."""
    lines = []
    data = run_dir / "data_summary.json" if run_dir else None
    if data and data.is_file():
        d = json.loads(data.read_text())
        if "pairs" in d:  # preference pairs (data/preference.py's summary)
            size = (f"{d['pairs']} training / {d['eval_pairs']} eval pairs, {d['tokens']} tokens (chosen + rejected), "
                    f"{d['too_long']} over {d['max_seq_len']} tokens dropped")
        else:
            size = (f"{d['train_samples']} training / {d['eval_samples']} eval samples, {d['tokens']} tokens of which "
                    f"{d['trained_tokens']} trained, {d['truncated']} truncated to {d['max_seq_len']}")
        lines.append(f"- data: `{d['source']}` ({d['data_format']}, {d['template']} prompts): {size}")
    summary = run_dir / "summary.json" if run_dir else None
    if summary and summary.is_file():
        s = json.loads(summary.read_text())
        figures = [f"{s['steps']} steps", f"final train loss {_num(s.get('train_loss'))}"]
        if s.get("eval_loss") is not None:
            figures.append(f"eval loss {_num(s['eval_loss'])}")
        if s.get("eval_perplexity") is not None:
            figures.append(f"eval perplexity {_num(s['eval_perplexity'])}")
        figures.append(f"{s['tokens']} tokens in {s['wall_time_s']} s on {s['device']}")
        lines.append("- result: " + ", ".join(figures))
    return lines


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def recipe_lines(lo: LoraConfig, recipe: Recipe | None) -> list[str]:
    """The adapter, and with a recipe the quantized base and the optimization, in a few lines."""
    targets = lo.target_modules if isinstance(lo.target_modules, str) else ", ".join(lo.target_modules)
    lines = [f"- adapter: {'DoRA' if lo.use_dora else 'LoRA'} r={lo.r}, alpha={lo.alpha:g}, dropout={lo.dropout:g}"
             f"{', rsLoRA' if lo.rslora else ''} on {targets}"]
    if recipe is None:
        return lines
    q, t = recipe.model.quantization, recipe.train
    quant = "16-bit base (LoRA)" if q.bits == 16 else \
        f"4-bit {q.quant_type} base{' + double quant' if q.double_quant else ''}, {q.compute_dtype} compute"
    return lines + [f"- base: `{recipe.model.name_or_path}`, {quant}",
                    f"- training: {t.objective}, lr {t.lr:g}, {t.micro_batch_size} x {t.grad_accum} micro-batches "
                    f"per step, optimizer {t.optimizer}, seed {t.seed}"]


def adapter_card(recipe: Recipe, run_dir: Path) -> str:
    """README.md of the run's adapter folder: loads with PEFT on the base model.

    Args:
        recipe (Recipe): the run's recipe.
        run_dir (Path): the run folder (data_summary.json and summary.json give the figures).
    """
    base = recipe.model.name_or_path
    usage = ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "", f'base = AutoModelForCausalLM.from_pretrained("{base}")',
             'model = PeftModel.from_pretrained(base, "<this folder or its Hub id>")',
             f'tokenizer = AutoTokenizer.from_pretrained("{base}")', "```", "",
             "or `qlora-lite generate <this folder> --prompt \"...\"` (4-bit base + adapter), and "
             "`qlora-lite export <this folder> --out merged [--gguf q4_K_M]` for a merged model."]
    return _card(front_matter(base, "peft", recipe.data.path), f"LoRA adapter for {base}",
                 recipe_lines(recipe.lora, recipe), _figures(run_dir), usage)


def export_model_card(base: str, lora: LoraConfig, recipe: Recipe | None, run_dir: Path | None,
                      gguf_file: str | None = None) -> str:
    """README.md of a merged export: plain transformers, and Ollama / llama.cpp when a GGUF is beside it.

    Args:
        base (str): the base model.
        lora (LoraConfig): the merged adapter's settings.
        recipe (Recipe | None): the run's recipe; None for a bare adapter folder.
        run_dir (Path | None): the run folder, for the figures; None for a bare adapter folder.
        gguf_file (str | None): the GGUF file written beside the weights. Default None.
    """
    usage = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'model = AutoModelForCausalLM.from_pretrained("<this folder or its Hub id>")',
             'tokenizer = AutoTokenizer.from_pretrained("<this folder or its Hub id>")', "```", "",
             "No bitsandbytes needed: the adapter is merged into the weights."]
    meta = front_matter(base, "transformers", recipe.data.path if recipe else None)
    if gguf_file:
        meta["tags"] = meta["tags"] + ["gguf"]
        usage += ["", f"GGUF: `{gguf_file}`, with an Ollama Modelfile beside it:", "", "```bash",
                  "ollama create my-model -f Modelfile && ollama run my-model",
                  f"llama-cli -m {gguf_file} -cnv", "```"]
    return _card(meta, f"{base} fine-tuned with qlora-lite (merged)", recipe_lines(lora, recipe),
                 _figures(run_dir), usage)


def _card(meta: dict, title: str, recipe: list[str], figures: list[str], usage: list[str]) -> str:
    head = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"
    body = [f"# {title}", "", "Trained with qlora-lite: QLoRA, a frozen 4-bit base with a trained low-rank adapter.",
            "", "## Recipe", "", *recipe, *figures, "", "## How to load it", "", *usage, ""]
    return head + "\n" + "\n".join(body)


def export_card_for(src: RunSource, lora: LoraConfig, gguf_file: str | None = None) -> str:
    """`export_model_card` for an export's source: a run folder (its recipe and figures) or a bare adapter."""
    run_dir = src.adapter_dir.parent if src.kind == "run" else None
    recipe = load_recipe(run_dir / RECIPE_NAME) if run_dir and (run_dir / RECIPE_NAME).is_file() else None
    return export_model_card(src.model.name_or_path, lora, recipe, run_dir, gguf_file)


def write_card(folder: str | Path, text: str) -> None:
    """Write README.md into `folder` (atomically)."""
    atomic_write_text(Path(folder) / CARD_NAME, text)
