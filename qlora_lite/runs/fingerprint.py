"""What the run's data was: `<run>/data_fingerprint.json`, written at the start, checked on resume.

A checkpoint stores a data position (epoch, micro-batch), which means something only in the data
it was counted in: a resume after the data file was edited would carry on from the old position
in a different data set. So a run records, for every data file it reads, its path, size and
sha256, and a hash of the tokenizer and the chat template that turned rows into tokens; `--resume`
compares by content, not path (data moved to another machine or folder resumes), and refuses a
change unless told `--accept-changed-data`. A Hub data set is recorded by id and split; its
content cannot be checked here.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from ..data.cache import tokenizer_fingerprint
from ..data.sources import local_identity
from ..data.templates import resolve_template
from ..errors import QloraError
from ..utils.atomic import atomic_write_json
from ..utils.readers import file_sha256, read_json

FINGERPRINT_NAME = "data_fingerprint.json"
ACCEPT_FLAG = "--accept-changed-data"


def data_fingerprint(data_cfg, tokenizer) -> dict:
    """The fingerprint of a recipe's data section as `tokenizer` reads it.

    Args:
        data_cfg (DataConfig): data.path, data.eval_path, data.split, data.chat_template.
        tokenizer: the run's Hugging Face tokenizer.
    """
    files = [file_fingerprint("data.path", data_cfg.path, data_cfg.split)]
    if data_cfg.eval_path:
        files.append(file_fingerprint("data.eval_path", data_cfg.eval_path, data_cfg.split))
    template = resolve_template(data_cfg.chat_template, tokenizer)
    return {"files": files, "tokenizer": {"sha256": tokenizer_fingerprint(tokenizer),
                                          "template_sha256": hashlib.sha256(template.encode()).hexdigest()}}


def file_fingerprint(role: str, path: str, split: str = "train") -> dict:
    """{role, path, size, sha256} of a local data file; {role, hub, split} of a Hub data set."""
    ident = local_identity(path)
    if ident is None:
        return {"role": role, "hub": path, "split": split}
    return {"role": role, "path": ident["path"], "size": ident["size"], "sha256": file_sha256(ident["path"])}


def write_fingerprint(run_dir: str | Path, fingerprint: dict) -> None:
    atomic_write_json(Path(run_dir) / FINGERPRINT_NAME, fingerprint)


def read_fingerprint(run_dir: str | Path) -> dict | None:
    """The run's recorded fingerprint; None for a run started before runs recorded one."""
    path = Path(run_dir) / FINGERPRINT_NAME
    if not path.is_file():
        return None
    return read_json(path, f"delete it to resume without the data check, or resume knowingly with {ACCEPT_FLAG}")


def data_changes(saved: dict, now: dict) -> list[str]:
    """What differs between the recorded and the present data, one sentence each; [] when nothing."""
    out = []
    was = {f["role"]: f for f in saved.get("files", [])}
    for f in now["files"]:
        old = was.pop(f["role"], None)
        if old is None:
            out.append(f"{f['role']} {_where(f)} is new: the run read no such file")
        elif ("hub" in old) != ("hub" in f) or old.get("hub") != f.get("hub"):
            out.append(f"{f['role']} is now {_where(f)}; the run read {_where(old)}")
        elif "sha256" in f and (old["sha256"], old["size"]) != (f["sha256"], f["size"]):
            moved = f" (then at {old['path']})" if old["path"] != f["path"] else ""
            out.append(f"{f['role']} {f['path']!r} changed: it now has {f['size']:,} bytes, sha256 "
                       f"{f['sha256'][:12]}; the run read {old['size']:,} bytes, sha256 {old['sha256'][:12]}{moved}")
    out += [f"{role} {_where(old)} is no longer in the recipe" for role, old in was.items()]
    tok_was, tok = saved.get("tokenizer", {}), now["tokenizer"]
    if tok_was.get("sha256") != tok["sha256"]:
        out.append("the tokenizer changed (its vocabulary, merges, special tokens or built-in chat template): "
                   "the same rows now give other token ids")
    elif tok_was.get("template_sha256") != tok["template_sha256"]:
        out.append("the chat template that renders the rows changed")
    return out


def check_data(run_dir: str | Path, now: dict, accept: bool) -> list[str]:
    """Compare the present data with the run's record before a resume; raise QloraError naming every
    change unless `accept`; return the changes accepted. Prints what cannot be checked.

    Args:
        run_dir (str | Path): the run folder being resumed.
        now (dict): `data_fingerprint` of the recipe's data.
        accept (bool): --accept-changed-data was given.
    """
    saved = read_fingerprint(run_dir)
    for f in now["files"]:
        if "hub" in f:
            print(f"note: {f['role']} {f['hub']!r} is a Hub data set: whether its content changed since the run "
                  "started cannot be checked here; pin it by downloading it to a local file.", file=sys.stderr)
    if saved is None:
        print(f"note: {str(run_dir)!r} has no {FINGERPRINT_NAME} (a run from before runs recorded one): the data "
              "cannot be checked on this resume; it is recorded now for the next.", file=sys.stderr)
        return []
    changes = data_changes(saved, now)
    if changes and not accept:
        raise QloraError(f"--resume: the data changed since the run started: {'; '.join(changes)}. A resumed run "
                         "would continue from its old position in different data. Start a new run "
                         "(--set output.dir=runs/NEW, or --overwrite to replace this one), or resume on the "
                         f"changed data knowingly with {ACCEPT_FLAG} (recorded in "
                         f"{str(Path(run_dir) / 'events.jsonl')!r}).")
    return changes


def _where(f: dict) -> str:
    return f"Hub data set {f['hub']!r} (split {f['split']!r})" if "hub" in f else repr(f["path"])
