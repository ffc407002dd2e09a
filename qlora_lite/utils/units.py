"""Byte sizes on the command line and in reports: one reading of "GB" everywhere.

GB, MB, KB, TB are decimal (1e9, ...), as Hugging Face's `max_shard_size` reads them; GiB, MiB,
KiB, TiB are binary (2**30, ...); a bare number is bytes. A card sold as "24 GB" (RTX 3090/4090)
has 24 GiB, so `--gpu-mem 24GiB` describes it; `24GB` means 24e9 bytes (22.35 GiB), the
conservative reading.
"""

from __future__ import annotations

import re

from ..errors import QloraError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
UNITS_HELP = "GB = 1e9 bytes, GiB = 2^30 (MB/MiB likewise); a bare number is bytes"


def parse_size(text: str | int, option: str = "size") -> int:
    """Bytes from "2GB" (2e9), "24GiB" (24 * 2^30), "500MB", "1.5GiB" or a number of bytes.

    Args:
        text (str | int): the size.
        option (str): the option it came from, named in the error. Default "size".
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise QloraError(f"{option} must be > 0 bytes, got {text}.")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in UNITS or float(m.group(1)) <= 0:
        raise QloraError(f"{option} {text!r} is not a size; write e.g. 24GiB or 2GB ({UNITS_HELP}).")
    return int(float(m.group(1)) * UNITS[unit])


def gib(n: float) -> str:
    """Bytes as a short human string (GiB above 1 GiB, else MiB)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str | int | float, option: str = "duration") -> float:
    """Seconds from "3h50m", "90m", "45s", "1d2h", "1.5h" or a number of seconds.

    Args:
        text (str | int | float): the duration.
        option (str): the setting it came from, named in the error. Default "duration".
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", s)
        if re.fullmatch(r"\d+(?:\.\d+)?", s):
            seconds = float(s)
        elif parts and "".join(n + u for n, u in parts) == s and len({u for _, u in parts}) == len(parts):
            seconds = sum(float(n) * DURATION_UNITS[u] for n, u in parts)
        else:
            raise QloraError(f"{option} {text!r} is not a duration; write e.g. 3h50m, 90m, 45s or a number of "
                             "seconds (units d, h, m, s).")
    if seconds <= 0:
        raise QloraError(f"{option} must be more than 0 seconds, got {text!r}.")
    return seconds
