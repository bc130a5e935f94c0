"""Where StepPO keeps caches and looks for datasets (both overridable, nothing hard-coded), and
the one way it writes a record file atomically (`write_text_atomic`) and reads a JSON-lines
record (`read_jsonl`).

* cache: ``$STEPPO_CACHE``, else ``~/.cache/steppo`` (converted models, generated games, indexes).
* data: ``$STEPPO_DATA``, else a ``shared/data`` folder next to the repository checkout (the
  layout of this project's development machines), else nowhere: environments that need real
  data then say which setting to give.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def default_cache_dir() -> Path:
    return Path(os.environ.get("STEPPO_CACHE", Path.home() / ".cache" / "steppo"))


def default_data_dir() -> Path | None:
    if os.environ.get("STEPPO_DATA"):
        return Path(os.environ["STEPPO_DATA"])
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "data"
    return beside_checkout if beside_checkout.is_dir() else None


def require_data(subdir: str, explicit: str | os.PathLike | None, what: str) -> Path:
    """The data folder for `what`: `explicit` if given, else `<data dir>/<subdir>`; a clear
    error naming the setting when neither exists."""
    if explicit:
        path = Path(explicit)
    else:
        root = default_data_dir()
        path = root / subdir if root is not None else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"{what} data not found{f' at {path}' if path else ''}: pass the environment param "
            f"data_dir=... or set STEPPO_DATA to a folder holding {subdir}/"
        )
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader (or a run killed mid-write) sees the old file or
    the new one, never a torn one: a temporary file beside it, fsynced, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` record (absent file: none; torn or non-object lines,
    e.g. the last line of a run killed mid-write, are skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
