"""The run's history: `<run>/events.jsonl`, one JSON line per start, resume, stop, finish or error.

Each line says when (UTC), what, at which step, why, and who (pid, host, world size), so a run
that a cluster stopped and requeued five times reads as five starts and stops in one file. Lines
are appended in one fsynced write each (utils/atomic.append_line); a line cut by a crash is
skipped on reading. This module is the file's one writer and reader.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..utils.atomic import append_line

EVENTS_NAME = "events.jsonl"
EVENTS = ("start", "resume", "stop", "finish", "error")


def record_event(run_dir: str | Path, event: str, step: int, reason: str | None = None, world_size: int = 1,
                 **fields) -> dict:
    """Append one event to `<run_dir>/events.jsonl`; return it.

    Args:
        run_dir (str | Path): the run folder.
        event (str): one of EVENTS.
        step (int): the optimizer step the run stood at.
        reason (str | None): why: "SIGTERM", "train.max_time", "no checkpoint", ... Default None.
        world_size (int): processes in the run. Default 1.
        **fields: more JSON-able facts (checkpoint, accepted_changed_data, ...).
    """
    if event not in EVENTS:
        raise ValueError(f"unknown run event {event!r}; one of {', '.join(EVENTS)}")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, "step": step,
              **({"reason": reason} if reason else {}), "pid": os.getpid(), "host": socket.gethostname(),
              "world_size": world_size, **fields}
    append_line(Path(run_dir) / EVENTS_NAME, json.dumps(record, sort_keys=False))
    return record


def read_events(run_dir: str | Path) -> list[dict]:
    """The run's events, oldest first; [] when it has none. A cut or damaged line is skipped."""
    path = Path(run_dir) / EVENTS_NAME
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "event" in record:
            out.append(record)
    return out
