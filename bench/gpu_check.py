"""The parts of ``bench/gpu_check.sh``: each runs as its own process and appends every measurement to
``$OUT/gpu_check.jsonl`` the moment it exists (one JSON object a line: part, name, ok, numbers, error).

    python bench/gpu_check.py env --out OUT [--rehearse]        # A: environment, ceilings, kernel correctness
    python bench/gpu_check.py e2e --out OUT [--rehearse]        # B: healing correctness, whole calls, steady state
    python bench/gpu_check.py compile --out OUT [--rehearse]    # C: compile cold, then warm from the saved cache
    python bench/gpu_check.py profile --out OUT [--rehearse]    # D: where a fast step's GPU time goes
    python bench/gpu_check.py kernels --out OUT [--rehearse]    # E: each kernel against the torch path it replaces
    python bench/gpu_check.py sparse24 --out OUT [--rehearse]   # F: 2:4 backends (gpu_check_sparse24.py)
    python bench/gpu_check.py note --out OUT --part e2e --rc 124   # the shell records how a part ended
    python bench/gpu_check.py summary --out OUT                 # summary.md: every check, the targets

``ok`` is true, false, or null for a check skipped (with ``skipped``: why). ``--rehearse`` runs the
same parts on a CPU with tiny shapes (Triton through its interpreter; CUDA-only checks skipped).
A part dumps every thread's stack to ``$OUT/stacks.txt`` when its cap kills it.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

from gpu_check_log import STACKS_NAME, Recorder

PARTS = ("env", "e2e", "compile", "profile", "kernels", "sparse24")

def watchdog(out: Path) -> None:
    """Stacks of every thread to stacks.txt when the shell's ``timeout`` sends SIGTERM at the part's cap
    (from C, so a hang inside a CUDA call is seen too), then exit so that ``finally`` blocks remove
    temporary files. (``faulthandler.dump_traceback_later`` is not used: reading another thread's frames
    while it runs crashed the process in a rehearsal.)"""
    stacks = open(out / STACKS_NAME, "a")
    stacks.write(f"== {' '.join(sys.argv[1:2])} pid {os.getpid()} {time.strftime('%H:%M:%S')}\n")
    stacks.flush()

    def terminate(signum, frame):
        raise SystemExit(f"terminated by signal {signum} (the part's time cap)")

    signal.signal(signal.SIGTERM, terminate)
    faulthandler.register(signal.SIGTERM, file=stacks, all_threads=True, chain=True)


def note(out: Path, part: str, rc: int | None, cap: int | None, error: str | None) -> None:
    """How a part's process ended, as the shell saw it (124/137: its cap; other non-zero: a crash)."""
    meaning = {0: None, 124: "killed at its time cap", 137: "killed at its time cap (SIGKILL)"}
    why = error or (meaning.get(rc, f"exited with status {rc} (a crash: see gpu_check.log)") if rc is not None
                    else None)
    Recorder(out, part).record("part_exit", rc == 0 and error is None, rc=rc, cap_seconds=cap, error=why)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=(*PARTS, "note", "summary"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--rehearse", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--cap", type=float, default=0, help="note: the part's time cap in seconds")
    parser.add_argument("--part", dest="noted", default=None, help="note: the part that ended")
    parser.add_argument("--rc", type=int, default=None)
    parser.add_argument("--error", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "note":
        note(out, args.noted, args.rc, int(args.cap) or None, args.error)
        return 0
    if args.part == "summary":
        from gpu_check_report import write_summary
        write_summary(out)
        return 0
    if args.rehearse:
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before the kernels are defined (import time)
    if args.part == "env":
        os.environ["STARFISH_TRITON_ONE_CONFIG"] = "1"     # correctness: no autotuning, one config per kernel
    watchdog(out)
    if args.part == "sparse24":
        from gpu_check_sparse24 import part_sparse24
        part_sparse24(Recorder(out, args.part), out, args.rehearse, seconds=args.cap - 5 if args.cap else 60)
        return 0
    import gpu_check_parts
    getattr(gpu_check_parts, f"part_{args.part}")(Recorder(out, args.part), out, args.rehearse)
    return 0


if __name__ == "__main__":
    sys.exit(main())
