"""Reading raw rows: local .json/.jsonl/.parquet/.csv files or a Hub data set.

`load_rows(path, split)` returns the rows as dicts and an identity of the source (path, size
and mtime, or Hub id and fingerprint) that keys the token cache in data/dataset.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import QloraError
from ..utils.readers import not_text, open_text, read_text, text_encoding

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
DATA_FIX = "set data.path to a .json/.jsonl/.parquet/.csv file or a Hub data set id."



def local_identity(path: str) -> dict | None:
    """(path, size, mtime) of a local data file, None for a Hub id; cheap, so a cache hit reads nothing.

    Raises QloraError when the path looks local but is not a readable data file.
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if not (suffix in LOCAL_SUFFIXES or p.exists() or path.startswith((".", "/", "~"))):
        return None
    if not p.is_file():
        raise QloraError(
            f"data file {str(p)!r} not found; set data.path to a .json/.jsonl/.parquet/.csv file "
            "or a Hub data set id."
        )
    if suffix not in LOCAL_SUFFIXES:
        raise QloraError(f"data file {str(p)!r}: unknown extension; use .json, .jsonl, .parquet or .csv.")
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_rows(path: str, split: str = "train") -> tuple[list[dict], dict]:
    """Read raw rows from a local file or a Hub data set; return (rows, source identity).

    The identity (path, size, mtime; or Hub id, split, fingerprint) keys the token cache.

    Args:
        path (str): a .json (list of objects), .jsonl, .parquet or .csv file, or a Hub id.
        split (str): the Hub split. Default "train".
    """
    ident = local_identity(path)
    if ident is None:
        return _read_hub(path, split)
    p = Path(ident["path"])
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p), ident
    if suffix == ".json":
        return _read_json(p), ident
    return _read_with_datasets(LOCAL_SUFFIXES[suffix], str(p)), ident


def _read_jsonl(p: Path) -> list[dict]:
    # Checked line by line ourselves: datasets' own error names neither the file nor the line.
    # open_text drops a byte-order mark and reads CRLF as LF (files saved on Windows).
    rows = []
    try:
        with open_text(p, DATA_FIX) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise QloraError(f"{p}:{n}: not valid JSON ({e.msg}, column {e.colno}); fix or remove the line.") from None
                if not isinstance(row, dict):
                    raise QloraError(f"{p}:{n}: expected a JSON object per line, got {type(row).__name__}.")
                rows.append(row)
    except UnicodeDecodeError:
        raise not_text(p) from None
    return rows


def _read_json(p: Path) -> list[dict]:
    try:
        data = json.loads(read_text(p, "fix that line"))
    except json.JSONDecodeError as e:
        raise QloraError(f"{p}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}).") from None
    if not (isinstance(data, list) and all(isinstance(r, dict) for r in data)):
        raise QloraError(f"{p}: expected a JSON list of objects (or use .jsonl, one object per line).")
    return data


def _read_with_datasets(builder: str, path: str) -> list[dict]:
    import datasets

    # pandas drops a UTF-8 byte-order mark itself; UTF-16 (Excel's "Unicode text") must be named.
    kwargs = {"encoding": text_encoding(path)} if builder == "csv" else {}
    try:
        rows = datasets.load_dataset(builder, data_files=path, split="train", **kwargs).to_list()
    except Exception as e:
        raise QloraError(f"could not read {path!r} as {builder}: {e}") from None
    if builder == "csv":  # a quoted multi-line cell keeps the file's CRLF line ends
        rows = [{k: v.replace("\r\n", "\n") if isinstance(v, str) else v for k, v in r.items()} for r in rows]
    return rows


def _read_hub(name: str, split: str) -> tuple[list[dict], dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise QloraError(
            f"could not load Hub data set {name!r} (split {split!r}): {e}. A local path must exist; "
            "a Hub id needs network access or a filled Hugging Face cache."
        ) from None
    return ds.to_list(), {"hub": name, "split": split, "fingerprint": ds._fingerprint}
