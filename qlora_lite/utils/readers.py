"""Reading files back safely: every file qlora-lite reads goes through here.

Files come from Windows editors and spreadsheets (a byte-order mark, CRLF line ends), from
interrupted copies (truncated) and from mix-ups (a JSON list where an object belongs, a
pickle where safetensors belong). Each reader turns what the parser raises into one
QloraError that names the file, what is wrong with it and the fix the caller passes in,
so no user ever sees a JSONDecodeError or a miniz traceback.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import pickle
from pathlib import Path

from ..errors import QloraError

# A byte-order mark says the encoding; "utf-8-sig" also reads plain UTF-8. UTF-16 is what
# Windows Notepad calls "Unicode".
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def damaged(path, detail: str, fix: str) -> QloraError:
    """The one wording for a file that is there but cannot be used."""
    return QloraError(f"{str(path)!r} is truncated or corrupt ({detail}); {fix}")


def _missing(path, fix: str) -> QloraError:
    return QloraError(f"{str(path)!r} not found; {fix}")


def text_encoding(path) -> str:
    """The encoding of a text file from its byte-order mark: "utf-8-sig" (BOM or none) or "utf-16"."""
    with open(path, "rb") as f:
        head = f.read(3)
    return next((enc for bom, enc in _BOMS if head.startswith(bom)), "utf-8-sig")


def open_text(path, fix: str):
    """A text file object with the BOM dropped and CRLF read as LF.

    Args:
        path (str | Path): the file.
        fix (str): what to do when it is missing.
    """
    try:
        return open(path, encoding=text_encoding(path))  # newline=None: CRLF and CR become "\n"
    except FileNotFoundError:
        raise _missing(path, fix) from None


def read_text(path, fix: str) -> str:
    """The whole text of a UTF-8 (BOM or not) or UTF-16 file, line ends normalised to "\\n".

    Args:
        path (str | Path): the file.
        fix (str): what to do when it is missing, not text or corrupt.
    """
    try:
        with open_text(path, fix) as f:
            return f.read()
    except UnicodeDecodeError:
        raise not_text(path, fix) from None


def not_text(path, fix: str = "") -> QloraError:
    """The error for a file that is not UTF-8 (or UTF-16 with a BOM): binary, or its first bad line.

    Args:
        path (str | Path): the file.
        fix (str): what to do when it holds binary data (another kind of file). Default "".
    """
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            return QloraError(f"{str(path)!r} is not a text file (it holds binary data){'; ' + fix if fix else '.'}")
    enc = text_encoding(path)
    if enc == "utf-8-sig":  # decoding happens in chunks: find the line again, line by line
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode(enc)
                except UnicodeDecodeError as e:
                    return QloraError(f"{str(path)!r}: line {n} is not UTF-8 text (byte 0x{line[e.start]:02x}); "
                                      "save the file as UTF-8.")
    return QloraError(f"{str(path)!r} is not {enc} text; save the file as UTF-8.")


def read_json(path, fix: str, kind: type | None = dict):
    """Parse a JSON file; its top level must be `kind` (dict by default, None for any).

    Args:
        path (str | Path): the file.
        fix (str): what to do when it is missing, truncated or corrupt.
        kind (type | None): required type of the top-level value. Default dict.
    """
    text = read_text(path, fix)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise damaged(path, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", fix) from None
    _check_kind(path, value, kind, "JSON", fix)
    return value


def read_yaml(path, fix: str, kind: type | None = dict):
    """Parse a YAML file (an empty file is an empty dict); its top level must be `kind`.

    Args:
        path (str | Path): the file.
        fix (str): what to do when it is missing, truncated or corrupt.
        kind (type | None): required type of the top-level value. Default dict.
    """
    import yaml

    text = read_text(path, fix)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1} column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise damaged(path, f"not valid YAML: {problem}{at}", fix) from None
    value = {} if value is None and kind is dict else value
    _check_kind(path, value, kind, "YAML", fix)
    return value


def _check_kind(path, value, kind, fmt: str, fix: str) -> None:
    if kind is not None and not isinstance(value, kind):
        want = {dict: "a mapping of keys to values", list: "a list"}.get(kind, kind.__name__)
        raise QloraError(f"{str(path)!r} is not the expected file: its {fmt} is a {type(value).__name__}, "
                         f"not {want}; {fix}")


def torch_load(path, fix: str, map_location=None):
    """torch.load with weights_only=True (data, never code), errors named by file.

    Args:
        path (str | Path): a file written by torch.save.
        fix (str): what to do when it is missing, truncated, corrupt or not a torch file.
        map_location: as torch.load's ("cpu": a file written on a GPU loads anywhere). Default None.
    """
    import torch

    if not Path(path).is_file():
        raise _missing(path, fix)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except EOFError:
        raise damaged(path, "empty or cut short", fix) from None
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run code from the file.
        raise damaged(path, "not a torch.save file of tensors and plain values", fix) from None
    except RuntimeError as e:
        raise damaged(path, str(e).split(".")[0], fix) from None


def read_safetensors(path, fix: str) -> dict:
    """All tensors of a safetensors file, errors named by file.

    Args:
        path (str | Path): the file.
        fix (str): what to do when it is missing, truncated or corrupt.
    """
    with open_safetensors(path, fix) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@contextlib.contextmanager
def open_safetensors(path, fix: str):
    """safetensors' safe_open (lazy, framework "pt"), errors named by file.

    Errors raised while reading tensors inside the `with` are mapped too.

    Args:
        path (str | Path): the file.
        fix (str): what to do when it is missing, truncated or corrupt.
    """
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise _missing(path, fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise damaged(path, str(e).replace("Error while deserializing header: ", ""), fix) from None


def read_log(path) -> list[dict]:
    """The records of a JSON-lines log qlora-lite appends to (metrics.jsonl).

    A kill during a write leaves the last line cut short; that line is dropped (its step is
    redone on resume) instead of making the whole run unreadable.

    Args:
        path (str | Path): the log; a missing file reads as no records.
    """
    if not Path(path).exists():
        return []
    records = []
    for line in read_text(path, "").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (a 7B shard never sits in memory whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
