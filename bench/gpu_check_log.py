"""The JSON-lines log of a ``gpu_check.sh`` run: every check appends one line the moment it ends.

    recorder = Recorder(out, "env")
    with recorder.check("ceiling_copy") as numbers:
        numbers.update(gbs=4300.0)                 # {"part": "env", "name": "ceiling_copy", "ok": true, "gbs": ...}
    measured(out, "ceiling_copy", "gbs")           # what an earlier part measured
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from pathlib import Path

LOG_NAME, STACKS_NAME, SUMMARY_NAME = "gpu_check.jsonl", "stacks.txt", "summary.md"


class Recorder:
    """Appends one JSON line per check to ``gpu_check.jsonl``, flushed at once (a kill loses nothing)."""

    def __init__(self, out: Path, part: str):
        self.path, self.part = out / LOG_NAME, part

    def record(self, name: str, ok: bool | None, **fields) -> None:
        line = json.dumps({"part": self.part, "name": name, "ok": ok, "time": time.strftime("%H:%M:%S"),
                           **fields}, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(line, flush=True)

    def skip(self, name: str, why: str) -> None:
        self.record(name, None, skipped=why)

    @contextlib.contextmanager
    def check(self, name: str, **context):
        """``with recorder.check(name) as numbers: numbers.update(...)``; an exception is recorded as a
        failed check (type, message, where) and does not stop the part."""
        numbers: dict = {}
        started = time.perf_counter()
        try:
            yield numbers
        except Exception as error:  # a failed check is data: record it, go on with the next
            frames = traceback.extract_tb(error.__traceback__)[-3:]
            self.record(name, False, **context, **numbers, seconds=round(time.perf_counter() - started, 3),
                        error=f"{type(error).__name__}: {str(error).strip()[:2000]}",
                        where=[f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames])
        else:
            self.record(name, True, **context, **numbers, seconds=round(time.perf_counter() - started, 3))


def read_records(out: Path) -> list[dict]:
    path = out / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def measured(out: Path, name: str, key: str):
    """A number an earlier part measured (the ceilings), or None."""
    return next((r.get(key) for r in read_records(out) if r["name"] == name and r["ok"]), None)
