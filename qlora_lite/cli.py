"""The `qlora-lite` command: parses arguments and dispatches; the work lives in the modules."""

from __future__ import annotations

import sys

import click

from .errors import QloraError
from .export.gguf import GGUF_TYPES, QUANTIZERS
from .recipe import OBJECTIVES, STRATEGIES, check_fsdp_optimizer
from .utils.dtypes import SHORT_NAMES

RESUME_MODES = ("latest", "auto")  # bare --resume is "latest"


class _Group(click.Group):
    """Turn our input errors into one clear line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (QloraError, FileNotFoundError, FileExistsError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            from .utils.atomic import space_errno

            if space_errno(e) is None:
                raise
            # Our own writes say which file and how many bytes; this catches the rest (e.g. a log line).
            click.echo(f"error: could not write {e.filename or 'a file'}: {e.strerror}. Free space on its disk "
                       "and run the command again (a run continues from its last checkpoint with --resume).", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="qlora-lite")
def main():
    """QLoRA fine-tuning for one consumer GPU."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe value.")
@click.option("--resume", type=click.Choice(RESUME_MODES), is_flag=False, flag_value="latest", default=None,
              help="Continue from the newest complete checkpoint in the run folder. `--resume auto`: that when "
                   "there is one, else start fresh (one command line for a job's first start and every requeue).")
@click.option("--accept-changed-data", is_flag=True,
              help="With --resume: continue although a data file or the tokenizer changed since the run started "
                   "(recorded in events.jsonl).")
@click.option("--overwrite", is_flag=True, help="Delete a previous run in output.dir and start fresh.")
@click.option("--demo", is_flag=True, help="Also show eval loss and a generation before vs after training.")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes on this machine (one per GPU): starts torchrun with train.distributed.")
def run(recipe, overrides, resume, accept_changed_data, overwrite, demo, nproc):
    """Fine-tune with RECIPE (a YAML file)."""
    from .recipe import load_recipe

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other.")
    if accept_changed_data and not resume:
        raise click.UsageError("--accept-changed-data applies only with --resume (or --resume auto).")
    cfg = load_recipe(recipe, overrides)  # a bad recipe fails here, once, not in every rank
    if nproc > 1:
        from .parallel.distributed import launch

        if cfg.train.distributed == "fsdp":  # refuse here once, not in every rank
            check_fsdp_optimizer(cfg.train.optimizer)

        args = [recipe, *(a for o in overrides for a in ("--set", o)), *(["--resume", resume] if resume else []),
                *(["--accept-changed-data"] if accept_changed_data else []),
                *(["--overwrite"] if overwrite else []), *(["--demo"] if demo else [])]
        sys.exit(launch(nproc, ["run", *args]))
    from .parallel.distributed import exit_process
    from .train.loop import run_recipe

    exit_process(run_recipe(cfg, resume={"latest": True, "auto": "auto", None: False}[resume], overwrite=overwrite,
                            demo=demo, accept_changed_data=accept_changed_data, recipe_path=recipe))


@main.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist).")
@click.option("--dtype", type=click.Choice(list(SHORT_NAMES)), default="bf16", show_default=True)
@click.option("--base", type=click.Choice(["dequantized", "original"]), default="dequantized", show_default=True,
              help="dequantized: the NF4 weights training saw; original: the checkpoint's full-precision weights.")
@click.option("--max-shard-size", default="2GB", show_default=True,
              help="Largest safetensors shard: GB = 1e9 bytes, GiB = 2^30 (MB/MiB likewise); a bare number is bytes.")
@click.option("--verify", is_flag=True, help="Compare the export's logits with the 4-bit base + adapter.")
@click.option("--model", "model", default=None, help="Base model, overriding the run's recipe / adapter_config.json.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where the base is quantized and --verify runs; auto: the kind the run trained on, if present.")
@click.option("--gguf", type=click.Choice(GGUF_TYPES), default=None,
              help="Also write the model as GGUF with an Ollama Modelfile: f16, bf16, q8_0 by llama.cpp's "
                   "converter; the 4- to 6-bit types re-quantized from its 16-bit file (q4_K_M: Ollama's default).")
@click.option("--gguf-quantizer", type=click.Choice(QUANTIZERS), default="qlora-lite", show_default=True,
              help="Who re-quantizes to q4_0 ... q6_K: qlora-lite's own writer, or llama.cpp's llama-quantize "
                   "(must be on PATH).")
def export(source, out, dtype, base, max_shard_size, verify, model, overwrite, device, gguf, gguf_quantizer):
    """Merge the adapter of SOURCE (a run or adapter folder) into its base; write a HF model folder."""
    from .export.merge import export_model

    info = export_model(source, out, dtype=dtype, base=base, max_shard_size=max_shard_size, model=model,
                        verify=verify, overwrite=overwrite, gguf=gguf, gguf_quantizer=gguf_quantizer,
                        log=lambda m: click.echo(m, err=True),
                        device=device)
    click.echo(f"exported {info['merged_modules']} merged modules, {info['shards']} shard(s), "
               f"{info['total_bytes'] / 1e9:.3f} GB to {out} in {info['seconds']} s")
    if info.get("gguf"):
        click.echo(f"wrote {out}/{info['gguf']['file']} and {out}/Modelfile")
    v = info.get("verify")
    if v:
        from .export.verify import verify_report

        click.echo(verify_report(v))
        if not v["passed"]:
            sys.exit(1)


@main.command()
@click.argument("source")
@click.option("--adapter", default=None, type=click.Path(exists=True, file_okay=False),
              help="Adapter folder to apply on a 4-bit base.")
@click.option("--prompt", default=None, help="One prompt; prints the answer.")
@click.option("--chat", is_flag=True, help="Interactive: one message per stdin line, /exit or EOF ends.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=None, type=int, help="Seeds sampling.")
@click.option("--raw", is_flag=True, help="Feed --prompt as is, without the chat/Alpaca template.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="auto: the GPU when there is one.")
def generate(source, adapter, prompt, chat, max_new_tokens, temperature, top_p, seed, raw, device):
    """Generate from SOURCE: a run folder, an adapter folder, or a model folder (e.g. an export)."""
    from .generate import chat_loop, generate_text, load_for_generation

    if (prompt is None) == (not chat):
        raise QloraError("pass exactly one of --prompt TEXT or --chat.")
    loaded = load_for_generation(source, adapter=adapter, device=device)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if chat:
        chat_loop(loaded, write=click.echo, **kwargs)
    else:
        click.echo(generate_text(loaded.model, loaded.tokenizer, prompt, chat_template=loaded.chat_template,
                                 raw=raw, **kwargs))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--modes", default="qlora,lora,full", show_default=True, help="Comma-separated: qlora, lora, full.")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(min=1), help="Optimizer steps per mode.")
@click.option("--max-seq-len", "--seq-len", "seq_len", default=None, type=click.IntRange(min=2),
              help="Tokens per sample [recipe's data.max_seq_len].")
@click.option("--micro-batch-size", "--batch-size", "batch_size", default=None, type=click.IntRange(min=1),
              help="Samples per micro-batch [recipe's train.micro_batch_size].")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for report.md, report.json, memory.png [runs/profile].")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a recipe value.")
@click.option("--memory-limit", default=None, metavar="SIZE",
              help="Skip a mode the estimate says needs more (e.g. 24GiB; GB = 1e9 bytes, GiB = 2^30) "
                   "[CUDA: the GPU's memory; CPU: none].")
def profile(recipe, modes, steps, seq_len, batch_size, out_dir, overrides, memory_limit):
    """Measure peak memory by category for RECIPE in each mode (random tokens, real steps)."""
    from .memory.measure import parse_modes, profile_recipe
    from .recipe import load_recipe
    from .utils.units import parse_size

    limit = parse_size(memory_limit) if memory_limit else None
    profile_recipe(load_recipe(recipe, overrides), parse_modes(modes), steps, seq_len, batch_size,
                   out_dir or "runs/profile", title=recipe, log=click.echo, memory_limit=limit)


# estimate's flags from before it took recipe keys: each sets the recipe key it names.
ESTIMATE_ALIASES = {"lora_r": "lora.r", "optimizer": "train.optimizer", "loss_chunk_size": "train.loss_chunk_size",
                    "grad_accum": "train.grad_accum", "lora_dtype": "lora.dtype", "dora": "lora.use_dora",
                    "strategy": "train.distributed", "offload": "model.offload_activations",
                    "tiled_mlp": "model.tiled_mlp"}


@main.command()
@click.argument("model", required=False)
@click.option("--recipe", "recipe_path", default=None, type=click.Path(dir_okay=False),
              help="Take the settings from this recipe (and its model unless MODEL is given).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="A recipe value, as for run: lora.r=64, lora.dtype=float32, lora.use_dora=true, "
                   "train.optimizer=..., train.distributed=fsdp, model.offload_activations=true, model.tiled_mlp=auto.")
@click.option("--max-seq-len", "--seq-len", "seq_len", default=None, type=click.IntRange(min=2),
              help="data.max_seq_len [2048, or the recipe's].")
@click.option("--micro-batch-size", "--batch-size", "batch_size", default=None, type=click.IntRange(min=1),
              help="train.micro_batch_size [1, or the recipe's].")
@click.option("--nproc", "--gpus", "nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="Data-parallel processes (one per GPU, as run --nproc); the prediction is per GPU.")
@click.option("--objective", default=None, type=click.Choice(OBJECTIVES),
              help="train.objective: dpo and orpo train pairs, two sequences each [sft, or the recipe's].")
@click.option("--gpu-mem", default=None,
              help="Card memory, says what fits: GiB = 2^30 bytes, GB = 1e9 (a 24 GB RTX 3090/4090 is 24GiB).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--lora-r", hidden=True, type=click.IntRange(min=1))
@click.option("--optimizer", hidden=True)
@click.option("--loss-chunk-size", hidden=True, type=click.IntRange(min=0))
@click.option("--grad-accum", hidden=True, type=click.IntRange(min=1))
@click.option("--lora-dtype", hidden=True)
@click.option("--dora", hidden=True, is_flag=True, default=None)
@click.option("--strategy", hidden=True, type=click.Choice(STRATEGIES))
@click.option("--offload", hidden=True, is_flag=True, default=None)
@click.option("--tiled-mlp", hidden=True, default=None, is_flag=False, flag_value="auto")
def estimate(model, recipe_path, overrides, seq_len, batch_size, nproc, objective, gpu_mem, as_json, **aliases):
    """Predict peak memory per mode for MODEL (a shipped name such as llama-2-7b, a folder,
    a config.json, or a Hub id) from its architecture alone, with a recipe's settings.

    The flags of earlier versions (--lora-r, --optimizer, --loss-chunk-size, --grad-accum,
    --lora-dtype, --dora, --strategy, --offload, --tiled-mlp) still work: each sets its recipe key.
    """
    import json as _json

    from .memory.estimate import estimate as run_estimate, format_table, gpu_mem_bytes
    from .memory.estimate_inputs import settings_for

    given = {"data.max_seq_len": seq_len, "train.micro_batch_size": batch_size, "train.objective": objective,
             **{ESTIMATE_ALIASES[k]: v for k, v in aliases.items()}}
    sets = [f"{k}={_json.dumps(v)}" for k, v in given.items() if v is not None] + list(overrides)
    model, settings = settings_for(model, recipe_path, sets, nproc)
    if settings.distributed == "fsdp" and nproc > 1:
        check_fsdp_optimizer(settings.optimizer)
    result = run_estimate(model, settings, gpu_mem_bytes(gpu_mem) if gpu_mem else None)
    click.echo(_json.dumps(result, indent=2) if as_json else format_table(result))


if __name__ == "__main__":
    main()
