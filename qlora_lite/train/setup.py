"""Setting a run up: the run folder, data, the model with its adapters, optimizer and schedule,
and a checkpoint restored when resuming. `setup_run` returns the `Run` that `loop.fit` advances.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..data.dataset import build_datasets
from ..data.preference import build_preference_datasets
from ..errors import QloraError
from ..lora.files import load_adapter, read_adapter_config
from ..lora.layer import attach_lora, lora_parameters, trainable_summary
from ..model.loader import cache_root, load_model, load_tokenizer, pick_device
from ..ops.attention import use_packed_attention
from ..parallel.distributed import World, check_global_batch, init_world, main_first
from ..recipe import LoraConfig, Recipe, save_recipe
from ..runs.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..runs.events import record_event
from ..runs.fingerprint import check_data, data_fingerprint, write_fingerprint
from ..runs.folder import check_resumable, prepare_run_dir, resolve_resume, resolve_source
from ..utils.atomic import atomic_write_json
from ..utils.host_memory import return_freed_memory
from .batches import plan_epoch
from .evaluate import evaluate
from .metrics import LogWindow, reset_peak_memory, truncate_metrics
from .objectives import SFT, build_objective
from .optim import apply_schedule, build_optimizer, build_scheduler, optimizer_params
from .parallel_run import load_parallel, prepare_parallel, save_parallel, saved_world_size
from .reference import build_reference, precompute_reference, record_reference
from .step import autocast_context, grad_scaler
from .tracking import Tracker, open_trackers


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint's trainer_state.json."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # the next micro-batch of `epoch` to train on
    tokens: int = 0  # tokens trained on, padding excluded
    trained_tokens: int = 0  # tokens that carried a loss
    wall: float = 0.0  # seconds spent in training steps
    world_size: int = 1  # processes that trained (a resume may change it, keeping the global batch)


@dataclass
class Run:
    """Everything a training run holds: built by `setup_run`, advanced by `fit`, closed by `finish`."""

    recipe: Recipe
    run_dir: Path
    device: str
    model: torch.nn.Module
    tokenizer: object
    train_set: list
    eval_set: list
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    autocast: object
    scaler: object = None  # a GradScaler with fp16 compute
    world: World = field(default_factory=World)  # data-parallel place; World() is one process
    state: RunState = field(default_factory=RunState)
    window: LogWindow = field(default_factory=LogWindow)
    last_eval: dict | None = None  # the newest evaluation: {"loss", and the objective's statistics}
    tracker: Tracker = field(default_factory=lambda: Tracker([]))  # train.report_to (train/tracking.py)
    objective: object = field(default_factory=SFT)  # what a step minimises (objectives.py)
    saved_step: int | None = None  # the step of the newest checkpoint this run wrote or resumed from
    resumed: bool = False  # continued from a checkpoint (also when `--resume auto` found one)

    def evaluate(self) -> dict:
        t = self.recipe.train
        return evaluate(self.model, self.eval_set, t.micro_batch_size, self.tokenizer.pad_token_id,
                        t.loss_chunk_size, self.device, self.autocast, t.eval_max_batches, self.objective)

    def save(self) -> None:
        cfg = self.recipe
        if self.world.parallel:  # every rank takes part (FSDP gathers), rank 0 writes
            return save_parallel(self)
        save_checkpoint(self.run_dir, self.model, cfg.lora, cfg.model.name_or_path, self.optimizer, self.scheduler,
                        dict(asdict(self.state), window=asdict(self.window)), cfg.train.keep_last,
                        scaler=self.scaler)


def setup_run(recipe: Recipe, resume: bool | str = False, overwrite: bool = False,
              accept_changed_data: bool = False) -> Run:
    """Prepare the run folder, data, model with adapters, optimizer and schedule; restore a
    checkpoint when resuming.

    Args:
        recipe (Recipe): a validated recipe.
        resume (bool | str): True: from the newest checkpoint; "auto": that or fresh. Default False.
        overwrite (bool): delete a previous run in the output folder first. Default False.
        accept_changed_data (bool): resume on changed data (recorded). Default False.
    """
    cfg, t = recipe, recipe.train
    if cfg.data is None:
        raise QloraError("The recipe has no `data` section; add `data: {path: ...}`.")
    run_dir = Path(cfg.output.dir)
    device = pick_device(t.device)
    world = init_world(t.distributed, device)
    device = f"cuda:{world.local_rank}" if world.parallel and device == "cuda" else device
    resume = world.gather_objects(main_first(world, lambda: prepare_run(cfg, run_dir, resume, overwrite, world),
                                             others=False))[0]  # rank 0 decides what `auto` means
    return_freed_memory()  # before loading: its temporaries are the first to pile up (utils/host_memory.py)
    scaler = grad_scaler(cfg.model.quantization.compute_dtype, cfg.lora.dtype, device)
    # Rank 0 first: it fills the caches (tokenized data, a built-in model) the others then read.
    tokenizer = main_first(world, lambda: load_tokenizer(cfg.model))
    # Before anything in the folder changes: a resume on changed data is refused here.
    accepted = main_first(world, lambda: record_run(cfg, run_dir, tokenizer, resume, accept_changed_data),
                          others=False)
    tracker = open_trackers(cfg, run_dir, resume) if world.main else Tracker([])  # fails here if a library is missing
    seed_everything(t.seed)
    build = build_datasets if t.objective == "sft" else build_preference_datasets
    train_set, eval_set, data_summary = main_first(world, lambda: build(cfg.data, tokenizer, t.seed,
                                                                        cache_root() / "data"))
    if world.main:
        print(data_summary.format())
        atomic_write_json(run_dir / "data_summary.json", data_summary.__dict__)
    model, params = build_model(cfg, device, world)
    print(trainable_summary(model)) if world.main else None
    # Before any step (and before a resume restores the trained adapter): the reference is the
    # adapter as initialised.
    reference = build_reference(model, init_adapter_dir(cfg.lora)) if t.objective == "dpo" else None
    objective = build_objective(t, cfg.data, reference)
    optimizer = build_optimizer(t.optimizer, params, t.lr, t.weight_decay)
    params = optimizer_params(optimizer)  # flat buffers: clipped and summed over ranks as a few tensors
    steps_per_epoch = max(1, len(plan_epoch(train_set, cfg, 0, objective=objective)) // (t.grad_accum * world.size))
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, t.lr_scheduler, t.warmup_steps, total_steps)
    run = Run(recipe, run_dir, device, model, tokenizer, train_set, eval_set, params, optimizer, scheduler,
              total_steps, autocast_context(device, cfg.model.quantization.compute_dtype), scaler, tracker=tracker,
              world=world, objective=objective, resumed=resume)
    if reference is not None:
        main_first(world, lambda: record_reference(run_dir, reference, t.precompute_reference, resume), others=False)
        if t.precompute_reference:
            precompute_reference(run, reference)
    if resume:
        restore_run(run)
    run.state.world_size = world.size
    record_start(run, accepted) if world.main else None
    world.barrier()
    reset_peak_memory(device)
    return run


def build_model(recipe: Recipe, device: str, world: World | None = None, mode: str = "qlora"):
    """The recipe's base model with its adapters, as `run` trains it: the one builder that run,
    profile and the per-rank memory measurement all call.

    Args:
        recipe (Recipe): model, lora, data.packing, train.seed/optimizer.
        device (str): "cpu" or "cuda[:N]".
        world (World | None): this data-parallel rank; FSDP shards the model. Default one process.
        mode (str): "qlora" (as trained), "lora" (a bf16 base with the adapters) or "full" (a
            bf16 base, every weight trainable, no adapters): profile's comparisons. Default "qlora".

    Returns:
        (model, trainable parameters)
    """
    cfg = recipe.model
    if mode != "qlora":
        cfg = replace(cfg, quantization=replace(cfg.quantization, bits=16))
    model = load_model(cfg, device)
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, list(model.parameters())
    torch.manual_seed(recipe.train.seed)  # adapter init does not depend on what loading consumed
    attach_lora(model, recipe.lora)
    if recipe.lora.init_from:
        load_init_adapter(model, recipe.lora, init_adapter_dir(recipe.lora))
    if recipe.data is not None and recipe.data.packing:
        use_packed_attention(model)  # each packed sample attends only to itself, at its own cost
    if world is not None and world.parallel:
        prepare_parallel(model, world, recipe.train.seed, recipe.train.optimizer)
    return model, lora_parameters(model)


def init_adapter_dir(cfg: LoraConfig) -> Path | None:
    """The adapter folder `lora.init_from` names (a run folder's adapter/), or None."""
    if not cfg.init_from:
        return None
    try:
        return resolve_source(cfg.init_from).adapter_dir
    except QloraError as e:
        raise QloraError(f"lora.init_from: {e}") from None


def load_init_adapter(model, cfg: LoraConfig, adapter_dir: Path) -> None:
    """Fill the fresh adapters from `lora.init_from`, which must be the recipe's kind of adapter."""
    saved, _ = read_adapter_config(adapter_dir)
    for name in ("r", "alpha", "rslora", "use_dora"):
        if getattr(saved, name) != getattr(cfg, name):
            raise QloraError(f"lora.init_from: {adapter_dir} was trained with lora.{name}: {getattr(saved, name)}, "
                             f"the recipe says {getattr(cfg, name)}; set lora.{name}: {getattr(saved, name)}.")
    try:
        load_adapter(model, adapter_dir)
    except QloraError as e:
        raise QloraError(f"lora.init_from: {adapter_dir}: {e} Set lora.target_modules as that adapter was "
                         "trained with.") from None


def restore_run(run: Run) -> None:
    """Load the run folder's newest checkpoint into `run`: adapters, optimizer, schedule, RNG, position."""
    ckpt, world = latest_checkpoint(run.run_dir), run.world
    saved = (load_parallel(run, ckpt) if world.parallel
             else load_checkpoint(ckpt, run.model, run.optimizer, run.scheduler, scaler=run.scaler))
    apply_schedule(run.scheduler)  # a resume may lengthen the run: its lr follows the new curve
    run.window = LogWindow.from_saved(saved.pop("window", {}))
    run.state = RunState(**dict(saved, world_size=world.size))
    run.saved_step = run.state.step
    if world.main:
        for log in ("metrics.jsonl", "samples.jsonl"):
            truncate_metrics(run.run_dir / log, run.state.step)
        print(f"resumed from {ckpt} (step {run.state.step} of {run.total_steps})")


def prepare_run(cfg: Recipe, run_dir: Path, resume: bool | str, overwrite: bool, world: World) -> bool:
    """Make or check the run folder and refuse a resume that changes the run; return whether it
    resumes (what `--resume auto` found)."""
    resume = resolve_resume(run_dir, resume)
    prepare_run_dir(run_dir, resume, overwrite)
    if resume:
        saved = check_resumable(cfg, run_dir / "recipe.yaml")
        if saved is not None:
            check_global_batch(saved_world_size(latest_checkpoint(run_dir)), saved.train.grad_accum, world,
                               cfg.train.grad_accum)
    return resume


def record_run(cfg: Recipe, run_dir: Path, tokenizer, resume: bool, accept_changed_data: bool) -> list[str]:
    """Check the data against the run's fingerprint on a resume (runs/fingerprint.py), then record
    the recipe and the data; return the data changes the user accepted."""
    now = data_fingerprint(cfg.data, tokenizer)
    accepted = check_data(run_dir, now, accept_changed_data) if resume else []
    save_recipe(cfg, run_dir / "recipe.yaml")
    write_fingerprint(run_dir, now)  # on an accepted change, the next resume compares with the new data
    return accepted


def record_start(run: Run, accepted: list[str] | None) -> None:
    """One line in events.jsonl: a fresh start, or a resume from which checkpoint."""
    fields = {"accepted_changed_data": accepted} if accepted else {}
    if run.resumed:
        record_event(run.run_dir, "resume", run.state.step, world_size=run.world.size,
                     checkpoint=str(latest_checkpoint(run.run_dir)), **fields)
    else:
        record_event(run.run_dir, "start", 0, world_size=run.world.size)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
