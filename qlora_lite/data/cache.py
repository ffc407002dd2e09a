"""What SFT and preference data share after tokenizing: the eval split and the token cache.

`load_train_eval` reads data.path (and data.eval_path), tokenizes it with the caller's function
(data/dataset.py for SFT samples, data/preference.py for pairs) and caches the result as a
safetensors file whose name hashes everything that decides the token ids, so a changed file,
tokenizer, template or limit never reuses an old cache.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from ..errors import QloraError
from ..utils.atomic import atomic_write_bytes
from .sources import load_rows, local_identity

CACHE_VERSION = 2  # bump when rendering or tokenizing changes, so old caches are not reused


def split_eval(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(fraction * n) samples (at least 1 when fraction > 0), chosen by a seeded shuffle."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    n_eval = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: the vocabulary/merges, special tokens and chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps([str(tokenizer.bos_token), str(tokenizer.eos_token), str(tokenizer.chat_template)]).encode())
    return h.hexdigest()


def load_train_eval(cfg, tokenizer, template, seed, cache_dir, tokenize, counts, pairs=False):
    """(train, eval, meta, from_cache): data.path's samples, eval from data.eval_path or data.eval_split.

    Args:
        cfg (DataConfig), tokenizer, template, seed, cache_dir: as `build_datasets`.
        tokenize (Callable): see `load_tokenized`.
        counts (tuple[str, ...]): the meta counts summed over the train and eval files.
        pairs (bool): the samples are preference pairs. Default False.
    """
    samples, meta, cached = load_tokenized(cfg, cfg.path, tokenizer, template, cache_dir, tokenize, pairs)
    if not cfg.eval_path:
        train, eval_samples = split_eval(samples, cfg.eval_split, seed)
        return train, eval_samples, meta, cached
    eval_samples, eval_meta, eval_cached = load_tokenized(
        cfg, cfg.eval_path, tokenizer, template, cache_dir, tokenize, pairs)
    meta = {**meta, **{k: meta[k] + eval_meta[k] for k in counts}}
    return samples, eval_samples, meta, cached and eval_cached


def load_tokenized(cfg, path, tokenizer, template, cache_dir, tokenize, pairs=False):
    """(samples, meta, from_cache) for one data file, from the cache when its key matches.

    Args:
        cfg (DataConfig): the recipe's data section.
        path (str): data.path or data.eval_path.
        tokenizer, template, cache_dir: as `build_datasets`.
        tokenize (Callable): (rows, path) -> (samples, meta with "format" and the counts).
        pairs (bool): the samples are preference pairs, keyed and cached as such. Default False.
    """
    ident, rows = local_identity(path), None
    if ident is None:  # a Hub data set: its fingerprint is known only once loaded
        rows, ident = load_rows(path, cfg.split)
    file = cache_file(cfg, path, ident, tokenizer, template, cache_dir, pairs)
    if file is not None and file.is_file():
        try:
            return (*_read_cache(file, pairs), True)
        except QloraError as e:  # a cache is only a copy: rebuild it rather than stop the run
            print(f"warning: {e}", file=sys.stderr)
    if rows is None:
        rows, _ = load_rows(path, cfg.split)
    if cfg.max_samples is not None:
        rows = rows[: cfg.max_samples]
    if not rows:
        raise QloraError(f"data {path!r} has no rows.")
    samples, meta = tokenize(rows, path)
    meta = {"rows": len(rows), **meta, **({"pairs": True} if pairs else {})}
    if file is not None:
        _write_cache(file, samples, meta)
    return samples, meta, False


def cache_file(cfg, path, ident, tokenizer, template, cache_dir, pairs=False) -> Path | None:
    """The token cache file of one data file: its name hashes everything that decides the ids."""
    if not cache_dir:
        return None
    key = {
        "version": CACHE_VERSION, "source": ident, "tokenizer": tokenizer_fingerprint(tokenizer),
        "format": cfg.format, "template": template, "train_on": cfg.train_on, "max_seq_len": cfg.max_seq_len,
        "max_samples": cfg.max_samples, "text_field": cfg.text_field,
    }
    if pairs:  # only pair keys gain the field, so existing SFT caches keep their names
        key["pairs"] = True
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{Path(path).stem}-{digest}.safetensors"


def _write_cache(file: Path, samples: list[dict], meta: dict) -> None:
    import torch
    from safetensors.torch import save

    # Pairs are stored as consecutive sequences [c0, r0, c1, r1, ...], so one layout serves both kinds.
    seqs = [s for p in samples for s in (p["chosen"], p["rejected"])] if meta.get("pairs") else samples
    lengths = torch.tensor([0] + [len(s["input_ids"]) for s in seqs], dtype=torch.int64)
    tensors = {
        "input_ids": torch.tensor([t for s in seqs for t in s["input_ids"]], dtype=torch.int32),
        "labels": torch.tensor([t for s in seqs for t in s["labels"]], dtype=torch.int32),
        "offsets": lengths.cumsum(0),
    }
    atomic_write_bytes(file, save(tensors, metadata={"meta": json.dumps(meta)}))


def _read_cache(file: Path, pairs: bool = False) -> tuple[list[dict], dict]:
    """(samples, meta) from a cache file; QloraError when it is damaged, not a cache file or of the other kind."""
    from ..utils.readers import damaged, open_safetensors

    fix = "rebuilding it from the data file"
    with open_safetensors(file, fix) as f:
        try:
            meta = json.loads((f.metadata() or {})["meta"])
            if bool(meta.get("pairs")) != pairs:  # keys differ by kind; this guards a file copied by hand
                kinds = ("SFT samples", "preference pairs")
                raise QloraError(f"{str(file)!r} holds {kinds[not pairs]}, not {kinds[pairs]}; {fix}")
            ids, labels = f.get_tensor("input_ids").tolist(), f.get_tensor("labels").tolist()
            offsets = f.get_tensor("offsets").tolist()
        except (KeyError, json.JSONDecodeError) as e:
            raise damaged(file, f"not a token cache: no {e!r}", fix) from None
    if len(ids) != len(labels) or not offsets or offsets[-1] != len(ids) or offsets != sorted(offsets):
        raise damaged(file, "token and offset tables disagree", fix)
    samples = [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip(offsets, offsets[1:])]
    if not pairs:
        return samples, meta
    if len(samples) % 2:
        raise damaged(file, "an odd number of pair sequences", fix)
    return [{"chosen": c, "rejected": r} for c, r in zip(samples[::2], samples[1::2])], meta
