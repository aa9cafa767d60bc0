"""What torch.compile costs and buys for one model on this device: the numbers behind ``compile="auto"``.

    python bench/bench_compile.py --model deit_base_patch16_224 --images 1024 --epochs 3 --batch 64   # a GPU
    python bench/bench_compile.py --model fashion_vit --images 4096 --epochs 2 --batch 64              # this CPU

Three runs of the same job, each in a fresh process with its own empty inductor cache: eager
(``compile="off"``), compiled cold (an empty starfish_fast compile cache) and compiled warm (the cache the
cold run saved, ``XDG_CACHE_HOME`` shared). Reported per run: the whole call, steady-state images/s,
compile seconds, inductor's and AOTAutograd's cache hits and misses; and the ``plan.CompileCost`` entry they
give: eager and compiled images/s, the seconds a whole call takes beyond eager cold and warm, and the
trainable weights. JSON to ``bench/results/compile_<model>_<device tag>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

_CHILD = r"""
import json, sys
sys.path[:0] = sys.argv[1:3]
import torch
from torch._dynamo.utils import counters
from bench_e2e import make_job
from starfish_fast import HealConfig, heal
from starfish_fast.models import adapter_for, prunable_weights
model, images, epochs, batch, setting = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
dense, pruned, masks, calib = make_job(model, images)
adapter = adapter_for(pruned)
weights = sum(w.numel() for w in prunable_weights(pruned, adapter.scope_predicate(adapter.default_scope)).values())
device = "cuda" if torch.cuda.is_available() else "cpu"
result = heal(pruned, dense, masks, calib, HealConfig(epochs=epochs, batch_size=batch, compile=setting, device=device,
                                                      progress=False))
print(json.dumps({"wall_seconds": result.wall_seconds, "images_per_second": result.images_per_second,
                  "compile_seconds": result.compile_seconds, "cache": result.ran.get("compile_cache"),
                  "compiled_blocks": sorted(set(result.ran.get("compile", {}).values())), "trained_weights": weights,
                  "inductor": dict(counters["inductor"]), "aot_autograd": dict(counters["aot_autograd"])}))
"""


def run_child(model: str, images: int, epochs: int, batch: int, setting: str, xdg: Path, inductor: Path,
              timeout: float = 900) -> dict:
    """One heal in a fresh process (its own inductor cache ``inductor``, the compile cache under ``xdg``)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(xdg), "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(BENCH.parent), str(BENCH), model, str(images),
                           str(epochs), str(batch), setting], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the {setting} run exited {done.returncode}: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model: str, images: int, epochs: int, batch: int, runs=("eager", "cold", "warm"), record=None) -> dict:
    """The runs (in this order: eager, compiled cold, compiled warm) and the CompileCost they give; ``record(
    label, numbers)`` is called as each run ends."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in runs:
            setting = "off" if label == "eager" else "on"
            results[label] = run_child(model, images, epochs, batch, setting, Path(tmp) / "xdg",
                                       Path(tmp) / f"inductor_{label}")
            if record:
                record(label, results[label])
    if {"eager", "cold", "warm"} <= set(results):
        eager, cold, warm = results["eager"], results["cold"], results["warm"]
        results["compile_cost"] = {
            "eager": eager["images_per_second"], "compiled": max(cold["images_per_second"], warm["images_per_second"]),
            "cold": cold["wall_seconds"] - eager["wall_seconds"], "warm": warm["wall_seconds"] - eager["wall_seconds"],
            "weights": eager["trained_weights"]}
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="fashion_vit")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(BENCH))
    from devices import device_tag, environment, save_report

    report = {"environment": environment(), "model": args.model, "images": args.images, "epochs": args.epochs,
              "batch": args.batch}
    report.update(measure(args.model, args.images, args.epochs, args.batch,
                          record=lambda label, numbers: print(label, json.dumps(numbers)[:300], flush=True)))
    output = Path(args.output or RESULTS / f"compile_{args.model}_{device_tag()}.json")
    save_report(report, output)
    print(json.dumps(report.get("compile_cost")), "->", output)
    return report


if __name__ == "__main__":
    main()
