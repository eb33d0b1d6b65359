"""Run directories: the one module that decides where a command may write, and how it writes there.

Every command that writes a directory (``rspo train``, ``pretrain``, ``demo``, ``study``, ``report``,
``eval``) goes through :class:`RunDir`. The rules:

- **Nothing foreign is touched.** A command writes only into a directory that does not exist yet
  (it creates it), an empty one, or one whose marker (``.rspo-run.json``, written first) names
  the same kind of command. Anything else raises :class:`~rspo.errors.RunDirError` naming the
  directory, before anything is written.
- **Its own earlier output is replaced only on request** (``overwrite=True``, the commands'
  ``--overwrite``): then only the entries the marker lists as written by that command are
  removed; files the user put there stay.
- **Checkpoints are swapped atomically**: written to ``checkpoint.tmp`` (model, optimizer, state,
  then ``manifest.json`` last, with every file's size), then ``checkpoint`` -> ``checkpoint.old``,
  ``checkpoint.tmp`` -> ``checkpoint``, and ``checkpoint.old`` removed. :meth:`RunDir.latest_checkpoint`
  recovers from a kill in any of these windows by taking the newest complete one; a checkpoint
  whose manifest does not match its files is corrupt and an error, never silently discarded.
- **Metrics** are one JSON object per line, appended; a torn last line (a kill while writing it)
  is dropped when read, a bad line elsewhere is an error naming the file and line.
- Checkpoint files are loaded with ``torch.load(weights_only=True)``: a crafted file cannot run code.

:func:`crash_point` lets the crash-window tests SIGKILL a real process at each of these points.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rspo.errors import CheckpointError, RunDirError

MARKER = ".rspo-run.json"
LOCK = ".rspo-run.lock"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"

_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the crash-window tests: with ``RSPO_CRASH_AT=name`` (or ``name@n``) in the
    environment, the process SIGKILLs itself the first (n-th) time it passes this point."""
    spec = os.environ.get("RSPO_CRASH_AT")
    if not spec:
        return
    want, _, nth = spec.partition("@")
    if want != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(nth or 1):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------------------
# Metrics files
# ----------------------------------------------------------------------------------------
def read_metrics(path: str | Path, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (``path`` is the file or its run directory).

    A torn last line (no newline: the writer was killed mid-line) is dropped; any other line that is
    not a JSON object with a ``step`` raises :class:`RunDirError` naming the file and the line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        if missing_ok:
            return []
        raise RunDirError(f"{path.parent} has no {path.name}: not a run directory (or no step logged yet)")
    lines = path.read_text().split("\n")
    rows = []
    for i, line in enumerate(lines[:-1], 1):  # lines[-1] is "" after a final newline, else a torn tail
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path}:{i}: not a JSON line ({e.msg}); the file is damaged") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise RunDirError(f"{path}:{i}: not a metrics row (a JSON object with an integer 'step')")
        rows.append(row)
    return rows


def steps_logged(run: str | Path) -> int:
    """The last step in a run's metrics (0 if none yet); tolerant of a run being written right now."""
    rows = read_metrics(run, missing_ok=True)
    return rows[-1]["step"] if rows else 0


# ----------------------------------------------------------------------------------------
# Run directories
# ----------------------------------------------------------------------------------------
class RunDir:
    """A directory owned by one kind of rspo command (``train``, ``pretrain``, ``demo``, ...).

    Get one with :meth:`create` (a new run: creates the directory, or takes an empty one, or with
    ``overwrite=True`` replaces a run of the same kind) or :meth:`existing` (continue a run).
    """

    def __init__(self, path: Path, kind: str, marker: dict[str, Any]) -> None:
        self.path, self.kind, self._marker = path, kind, marker
        self._lock_fd: int | None = None

    # ------------------------------------------------------------ opening
    @staticmethod
    def inspect(path: str | Path) -> dict[str, Any] | None:
        """The marker of ``path`` (None if it has none); RunDirError if it is unreadable."""
        f = Path(path) / MARKER
        if not f.is_file():
            return None
        try:
            marker = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{f} is damaged ({e}); nothing was changed") from None
        if not isinstance(marker, dict) or not isinstance(marker.get("kind"), str):
            raise RunDirError(f"{f} is not an rspo marker; nothing was changed")
        entries = marker.setdefault("entries", [])
        if not isinstance(entries, list) or not all(isinstance(e, str) and "/" not in e for e in entries):
            raise RunDirError(f"{f} has a damaged entry list; nothing was changed")
        return marker

    @classmethod
    def check_new(cls, path: str | Path, kind: str, *, overwrite: bool = False) -> dict[str, Any] | None:
        """The checks of :meth:`create` without writing anything (commands call it before slow set-up);
        returns the existing marker, if any."""
        return cls._check_new(Path(path), kind, overwrite, "--overwrite")

    @classmethod
    def create(cls, path: str | Path, kind: str, *, overwrite: bool = False, flag: str = "--overwrite") -> RunDir:
        """A directory for a new run of ``kind``: created if absent, taken if empty, or (``overwrite``)
        the same kind's earlier run with its own entries removed. Anything else: RunDirError."""
        path = Path(path)
        marker = cls._check_new(path, kind, overwrite, flag)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, kind, marker or {"kind": kind, "entries": []})
        if marker is not None:  # overwrite: remove what this kind wrote, nothing else
            for name in marker["entries"]:
                _remove(path / name)
            marker["entries"] = []
        run._marker.update(created=time.strftime("%Y-%m-%dT%H:%M:%S"), command=" ".join(sys.argv))
        run._save_marker()
        return run

    @classmethod
    def _check_new(cls, path: Path, kind: str, overwrite: bool, flag: str) -> dict[str, Any] | None:
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path} exists and is not a directory; nothing was changed")
        marker = cls.inspect(path) if path.is_dir() else None
        if marker is None:
            if path.is_dir() and any(path.iterdir()):
                raise RunDirError(
                    f"{path} is not empty and was not created by rspo (no {MARKER}); nothing was changed. "
                    f"Choose a new or empty directory."
                )
        elif marker["kind"] != kind:
            raise RunDirError(
                f"{path} holds an rspo {marker['kind']} run, not a {kind} run; nothing was changed. "
                f"Choose another directory."
            )
        elif not overwrite and marker["entries"]:  # a marker with no entries: killed before writing anything
            resume = "use --resume to continue it, " if kind == "train" else ""
            raise RunDirError(
                f"{path} already holds a {kind} run; {resume}use {flag} to replace it, or choose another directory"
            )
        return marker

    @classmethod
    def existing(cls, path: str | Path, kind: str) -> RunDir:
        """An existing run of ``kind`` to continue; RunDirError if ``path`` holds none."""
        path = Path(path)
        if not path.is_dir():
            raise RunDirError(f"{path} does not exist: no {kind} run to continue")
        marker = cls.inspect(path)
        if marker is None:
            raise RunDirError(f"{path} has no {MARKER}: not an rspo {kind} run (nothing was changed)")
        if marker["kind"] != kind:
            raise RunDirError(f"{path} holds an rspo {marker['kind']} run, not a {kind} run")
        return cls(path, kind, marker)

    @classmethod
    def open_run(
        cls,
        path: str | Path,
        kind: str,
        *,
        resume: bool = False,
        overwrite: bool = False,
        before_create: Callable[[], None] | None = None,
    ) -> RunDir:
        """The one call that opens a command's run directory for writing, locked until :meth:`close`.

        ``resume``: the run of ``kind`` there, to continue. Otherwise a new run (created, an empty directory,
        or with ``overwrite`` the same kind's earlier run), made only after ``before_create`` (the command's
        input checks and slow set-up) has passed, so bad input fails before anything is written."""
        if resume:
            if overwrite:
                raise RunDirError("--resume continues a run and --overwrite replaces one: choose one")
            run = cls.existing(path, kind)
        else:
            cls.check_new(path, kind, overwrite=overwrite)
            if before_create is not None:
                before_create()
            run = cls.create(path, kind, overwrite=overwrite)
        run.lock()
        return run

    @classmethod
    def open_or_create(cls, path: str | Path, kind: str) -> RunDir:
        """Continue the run of ``kind`` in ``path`` if there is one, else create it (studies, reports)."""
        path = Path(path)
        marker = cls.inspect(path) if path.is_dir() else None
        return cls.existing(path, kind) if marker is not None and marker["kind"] == kind else cls.create(path, kind)

    # ------------------------------------------------------------ entries and the lock
    def claim(self, name: str) -> Path:
        """``path / name``, recorded in the marker as written by this run (before it is written)."""
        if "/" in name or name in ("", ".", "..", MARKER, LOCK):
            raise ValueError(f"run-directory entry {name!r} must be a plain name")
        if name not in self._marker["entries"]:
            self._marker["entries"].append(name)
            self._save_marker()
        return self.path / name

    def _save_marker(self) -> None:
        _write_atomic(self.path / MARKER, json.dumps(self._marker, indent=1))

    def lock(self) -> None:
        """Hold an exclusive lock on the directory until :meth:`close` (or the process ends): a second
        writer of the same run gets a RunDirError instead of interleaving its files with ours."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(f"{self.path} is in use by another rspo process") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------ files
    def write_text(self, name: str, text: str) -> Path:
        path = self.claim(name)
        _write_atomic(path, text)
        return path

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=1))

    def write_jsonl(self, name: str, records: Iterable[dict[str, Any]]) -> Path:
        """One JSON object per line (responses, per-step records), written atomically."""
        return self.write_text(name, "".join(json.dumps(r) + "\n" for r in records))

    def write_under(self, entry: str, name: str, text: str) -> Path:
        """``text`` into file ``name`` of the sub-directory ``entry`` (claimed, created if absent), atomically:
        for caches and per-item files inside a directory the run owns."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"file name {name!r} inside {entry!r} must be a plain name")
        d = self.claim(entry)
        d.mkdir(exist_ok=True)
        _write_atomic(d / name, text)
        return d / name

    def write_config(self, cfg: Any, name: str = CONFIG) -> Path:
        import yaml

        from rspo.config import to_dict

        return self.write_text(name, yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def append_metrics(self, rec: dict[str, Any]) -> None:
        """Append one metrics row (one line, flushed)."""
        line = json.dumps(rec) + "\n"
        with self.claim(METRICS).open("a") as f:
            if os.environ.get("RSPO_CRASH_AT", "").startswith("metrics_torn"):
                half = len(line) // 2  # the torn-line test: half a line on disk, then the kill
                f.write(line[:half])
                f.flush()
                crash_point("metrics_torn")
                line = line[half:]
            f.write(line)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path, missing_ok=True)

    def truncate_metrics(self, last_step: int) -> list[dict[str, Any]]:
        """Keep the rows up to ``last_step`` (those the checkpoint covers); rewrite the file atomically."""
        rows = [r for r in self.read_metrics() if r["step"] <= last_step]
        if (self.path / METRICS).exists():
            _write_atomic(self.claim(METRICS), "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    # ------------------------------------------------------------ checkpoints
    def write_checkpoint(self, save: Callable[[Path], None], state: dict[str, Any]) -> Path:
        """Write a checkpoint atomically: ``save(dir)`` writes the payload (model, optimizer, ...),
        then the state JSON and the manifest; then the swap. Returns the checkpoint directory."""
        tmp, final, old = (self.claim(n) for n in (CHECKPOINT_TMP, CHECKPOINT, CHECKPOINT_OLD))
        if tmp.exists():
            shutil.rmtree(tmp)  # a torn earlier attempt of ours
        tmp.mkdir()
        save(tmp)
        crash_point("checkpoint_partial")
        _write_atomic(tmp / STATE, json.dumps(state))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for p in files:
            with p.open("rb") as f:
                os.fsync(f.fileno())
        sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in files}
        _write_atomic(tmp / MANIFEST, json.dumps({"files": sizes, "step": state.get("step")}))
        crash_point("checkpoint_written")
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            final.rename(old)
        crash_point("checkpoint_between_renames")
        tmp.rename(final)
        crash_point("checkpoint_swapped")
        if old.exists():
            shutil.rmtree(old)
        return final

    @staticmethod
    def checkpoint_complete(ckpt: Path) -> bool:
        """True if ``ckpt`` has a manifest and every file it lists has the listed size; False if it has
        no manifest; CheckpointError if the manifest and the files disagree (corruption)."""
        mf = ckpt / MANIFEST
        if not mf.is_file():
            return False
        try:
            files = json.loads(mf.read_text())["files"]
            if not isinstance(files, dict):
                raise TypeError("'files' is not a mapping")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{mf} is damaged ({e})") from None
        for name, size in files.items():
            f = ckpt / name
            if not f.is_file() or f.stat().st_size != size:
                have = f.stat().st_size if f.is_file() else "missing"
                raise CheckpointError(
                    f"checkpoint {ckpt} is corrupt: {name} is {have} bytes, its manifest says {size}; "
                    f"nothing was changed"
                )
        return True

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, moved into place as ``checkpoint`` (recovering a kill during
        the swap); None if there is none. A torn ``checkpoint.tmp`` is removed."""
        found: list[tuple[int, int, Path]] = []
        for rank, name in enumerate((CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD)):
            d = self.path / name
            if not d.is_dir():
                continue
            if self.checkpoint_complete(d):
                found.append((self.read_state(d)["step"], -rank, d))
            elif name != CHECKPOINT_TMP:  # only the temporary one can be legitimately incomplete
                raise CheckpointError(f"checkpoint {d} has no {MANIFEST}: incomplete or not written by this rspo")
        if not found:
            _remove(self.path / CHECKPOINT_TMP)
            return None
        _, _, best = max(found)
        for name in (CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD):
            d = self.path / name
            if d != best and d.exists():
                _remove(d)
        final = self.path / CHECKPOINT
        if best != final:
            best.rename(final)
        return final

    @staticmethod
    def read_state(ckpt: Path, required: Iterable[str] = ("step",)) -> dict[str, Any]:
        """The checkpoint's state JSON, with ``required`` keys; CheckpointError naming the file otherwise."""
        f = ckpt / STATE
        try:
            state = json.loads(f.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{f} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{f} is damaged ({e})") from None
        missing = [k for k in required if not isinstance(state, dict) or k not in state]
        if missing:
            raise CheckpointError(f"{f} lacks {missing}: not a complete trainer state")
        return state


def load_tensors(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only, so a
    crafted checkpoint file cannot run code; CheckpointError naming the file if it is anything else."""
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be loaded safely (weights_only=True): {first[:300]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a mapping")
    return obj
