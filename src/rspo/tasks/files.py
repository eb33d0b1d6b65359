"""Data files of the file-backed tasks (math, code): where ``builtin:`` names point, and reading JSONL or
Parquet rows with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rspo.errors import ConfigError

DATA_DIR = Path(__file__).parent / "data"
"""The data shipped with rspo: the Countdown splits, data/math/ and data/code/."""
BUILTIN = "builtin:"


def resolve_path(path: str) -> Path:
    """A data path: ``builtin:math/x.jsonl`` is a file shipped with rspo; anything else is a local path."""
    p = DATA_DIR / path[len(BUILTIN) :] if path.startswith(BUILTIN) else Path(path).expanduser()
    if not p.is_file():
        where = " (shipped with rspo)" if path.startswith(BUILTIN) else ""
        raise ConfigError(f"data file {path!r}{where} does not exist")
    if p.suffix not in (".jsonl", ".json", ".parquet"):
        raise ConfigError(f"data file {path!r}: expected .jsonl or .parquet")
    return p


def rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, row)`` of a JSONL or Parquet file; a line that is not JSON is an error naming file:line."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
        try:
            yield from enumerate(pq.read_table(path).to_pylist(), 1)
        except Exception as e:  # pyarrow raises its own types for damaged files
            raise ConfigError(f"{path}: not a readable Parquet file ({e})") from None
        return
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{i}: not a JSON line ({e.msg})") from None
