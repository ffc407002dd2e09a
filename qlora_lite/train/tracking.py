"""Experiment trackers: the metrics.jsonl records, the recipe and the summary, also sent to
TensorBoard, Weights & Biases and MLflow through their own libraries (`train.report_to`).

metrics.jsonl stays the source of truth; a tracker gets the same records under the same keys.
Each library is an extra (`pip install 'qlora-lite[tensorboard]'`, `[wandb]`, `[mlflow]`) and
is imported only when asked for. `open_trackers` checks every one is installed before it opens
any, so a missing one fails before training starts. What a resumed run needs to find its
tracker run again is kept in `<run>/trackers.json`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from pathlib import Path

from ..errors import QloraError
from ..recipe import Recipe
from ..runs.checkpoint import STEP_DIR, latest_checkpoint
from ..utils.atomic import atomic_write_json

STATE_NAME = "trackers.json"
MAX_PARAM_CHARS = 6000  # MLflow refuses longer param values (a long chat template); recipe.yaml is logged whole
MAX_BATCH_PARAMS = 100  # MLflow's limit per log_batch call
PROJECT = "qlora-lite"  # W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say
# tracker -> the module that must be importable (its extra has the tracker's name)
LIBRARIES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(names: list[str]) -> None:
    """Raise QloraError naming the extra to install for the first tracker whose library is missing."""
    for name in names:
        if importlib.util.find_spec(LIBRARIES[name]) is None:
            raise QloraError(f"train.report_to asks for {name}, which is not installed: "
                             f"pip install 'qlora-lite[{name}]' (or remove {name} from train.report_to).")


def numbers(record: dict) -> dict[str, float]:
    """The numeric fields of a record, without `step` (trackers take it separately)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def samples_markdown(rows: list[dict]) -> str:
    """Sample answers as a Markdown table (TensorBoard renders text summaries as Markdown)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")
    lines = ["| # | prompt | answer |", "|---|---|---|"]
    return "\n".join(lines + [f"| {r['index']} | {cell(r['prompt'])} | {cell(r['completion'])} |" for r in rows])


def flat_recipe(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe as `section.key -> value` strings (MLflow params)."""
    out: dict[str, str] = {}

    def walk(d: dict, prefix: str):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    walk(recipe.to_dict(), "")
    return out


class Tracker:
    """The trackers of one run: `log(record)` each metrics record, `finish(summary)` at the end.

    As a context manager it ends the tracker runs as failed when training stops on an error
    (NaN loss, Ctrl-C); a run that finishes ends them with `finish`.
    """

    def __init__(self, backends: list):
        self.backends = backends

    def log(self, record: dict) -> None:
        for b in self.backends:
            b.log(int(record["step"]), numbers(record))

    def samples(self, step: int, rows: list[dict]) -> None:
        """The sample answers of one step (train/samples.py): TensorBoard text, a W&B table, an MLflow artifact."""
        for b in self.backends:
            b.samples(step, rows)

    def finish(self, summary: dict) -> None:
        for b in self.backends:
            b.finish(summary)
        self.backends = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return  # the run goes on to save its adapter and summary, then `finish`
        for b in self.backends:
            # stopping.Stopped (a signal or train.max_time, checkpoint saved) is a kill, anything else a failure.
            b.fail("KILLED" if exc_type.__name__ == "Stopped" else "FAILED")
        self.backends = []


def open_trackers(recipe: Recipe, run_dir: str | Path, resume: bool = False) -> Tracker:
    """Open the trackers `recipe.train.report_to` names (none: a Tracker that does nothing).

    Args:
        recipe (Recipe): the resolved recipe, sent as the run's config / params.
        run_dir (str | Path): the run folder (TensorBoard logs, MLflow's default store, trackers.json).
        resume (bool): continue the tracker runs of the run's previous session. Default False.
    """
    names = list(recipe.train.report_to)
    check_installed(names)
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_NAME
    state = json.loads(state_path.read_text()) if resume and state_path.is_file() else {}
    opened = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}
    backends = [opened[n](recipe, run_dir, state.get(n) if resume else None) for n in names]
    if backends:
        atomic_write_json(state_path, {n: b.state for n, b in zip(names, backends)})
    return Tracker(backends)


def resumed_step(run_dir: Path) -> int:
    """The step of the checkpoint a resume starts from (0 when there is none)."""
    ckpt = latest_checkpoint(run_dir)
    return int(STEP_DIR.match(ckpt.name).group(1)) if ckpt is not None else 0


class TensorBoard:
    """Event files in `<run>/tensorboard`; a resume hides the events logged after its checkpoint."""

    def __init__(self, recipe: Recipe, run_dir: Path, state: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops older events at steps >= it, so the steps a crashed
        # session logged after its last checkpoint are not shown twice.
        purge = resumed_step(run_dir) + 1 if state is not None else None
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        self.state = {"logdir": str(run_dir / "tensorboard")}
        if state is None:
            self.writer.add_text("recipe", "```\n" + json.dumps(recipe.to_dict(), indent=2) + "\n```", 0)
        self.step = 0

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.step = step
        self.writer.flush()

    def samples(self, step: int, rows: list[dict]) -> None:
        self.writer.add_text("samples", samples_markdown(rows), step)
        self.writer.flush()

    def finish(self, summary: dict) -> None:
        for k, v in numbers(summary).items():
            self.writer.add_scalar(f"summary/{k}", v, self.step)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```", self.step)
        self.writer.close()

    def fail(self, status: str) -> None:
        self.writer.close()


class WandB:
    """A W&B run (online, or offline with WANDB_MODE=offline) under `<run>/wandb`, resumed by id."""

    def __init__(self, recipe: Recipe, run_dir: Path, state: dict | None):
        import wandb

        run_id = state["id"] if state else uuid.uuid4().hex[:8]  # W&B ids: short, [a-z0-9]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=recipe.to_dict())
        self.state = {"id": run_id}

    def log(self, step: int, values: dict[str, float]) -> None:
        # W&B wants increasing steps; an eval at a logged step joins that step's row.
        self.run.log(values, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        import wandb

        table = wandb.Table(columns=["step", "index", "prompt", "completion"],
                            data=[[r["step"], r["index"], r["prompt"], r["completion"]] for r in rows])
        self.run.log({"samples": table}, step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
        self.run.finish()

    def fail(self, status: str) -> None:
        self.run.finish(exit_code=1)


class MLflow:
    """An MLflow run: params = the flat recipe, metrics by step, summary.json as an artifact.

    The store is MLFLOW_TRACKING_URI when set, else a local file store in `<run>/mlruns`.
    """

    def __init__(self, recipe: Recipe, run_dir: Path, state: dict | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # The run's own store is found from the run folder, so the folder may move between sessions.
        chosen = (state or {}).get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        uri = chosen or (run_dir / "mlruns").resolve().as_uri()
        if not chosen:
            # MLflow 3 keeps its file store in "maintenance mode" behind this opt-in; the run-local
            # store needs no database server (set MLFLOW_TRACKING_URI for a server or sqlite).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if state:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            # Params are immutable in MLflow, so they are logged once, by the first session.
            params = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in flat_recipe(recipe).items()]
            for i in range(0, len(params), MAX_BATCH_PARAMS):
                self.client.log_batch(self.run_id, params=params[i:i + MAX_BATCH_PARAMS])
            if (run_dir / "recipe.yaml").is_file():
                self.client.log_artifact(self.run_id, str(run_dir / "recipe.yaml"))
        self.state = {"run_id": self.run_id, "tracking_uri": chosen}

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def samples(self, step: int, rows: list[dict]) -> None:
        text = "".join(json.dumps(r) + "\n" for r in rows)
        self.client.log_text(self.run_id, text, f"samples/step-{step:06d}.jsonl")

    def finish(self, summary: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(summary.get("steps", 0))
        metrics = [Metric(f"summary/{k}", v, now, step) for k, v in numbers(summary).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
