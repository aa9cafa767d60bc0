"""``summary.md`` of a ``gpu_check.sh`` run: every check with its key numbers, the issue's targets met
or missed (and by how much), and the ``kernels="auto"`` table the measurements recommend.

    python bench/gpu_check.py summary --out OUT
"""
from __future__ import annotations

from pathlib import Path

from gpu_check_log import SUMMARY_NAME, read_records

KEYS = ("max_rel_err", "ms", "gbs", "tflops", "fraction_of_measured_bandwidth", "fraction_of_measured_matmul",
        "images_per_s", "images_per_second", "speedup_whole_call", "compile_seconds", "fast_over_eager",
        "speedup_vs_reference", "last_epoch_rel_diff_vs_exact", "speedup", "ms_per_step", "rc", "seconds")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _row(record: dict) -> str:
    status = {True: "ok", False: "**FAILED**", None: "skipped"}[record["ok"]]
    numbers = ", ".join(f"{key} {_fmt(record[key])}" for key in KEYS if record.get(key) is not None)
    why = record.get("error") or record.get("skipped") or ""
    return f"| {record['part']} | {record['name']} | {status} | {numbers} | {str(why)[:300]} |"


def _ratio(a, b):
    return a / b if a and b else None


def targets(records: list[dict]) -> list[tuple[str, float | None, float, bool]]:
    """(target, value, threshold, higher is better) for each of the issues' targets this run measures."""
    by_name = {r["name"]: r for r in records if r["ok"]}
    runs = {name.split(":", 1)[1]: r for name, r in by_name.items() if name.startswith("e2e:") and name.count(":") == 2}
    deit_b = {impl.split(":")[1]: r for impl, r in runs.items() if impl.startswith("deit_b:")}
    fast_over_eager = [by_name[name].get("fast_over_eager") for name in by_name
                       if name.startswith("e2e:") and name.count(":") == 1 and by_name[name].get("fast_over_eager")]
    heal = {name.split(":", 2)[2]: r for name, r in by_name.items() if name.startswith("heal:deit_base")}
    torch_run = next((r for label, r in heal.items() if label.endswith(",torch]")), {})
    triton_run = next((r for label, r in heal.items() if label.endswith(",triton]")), {})
    cosine, adam = by_name.get("bandwidth:cosine_loss:triton", {}), by_name.get("bandwidth:masked_adam:triton", {})
    fused = by_name.get("bandwidth:masked_adam:torch_fused", {})
    linear = [_ratio(by_name.get(f"bandwidth:masked_linear:{m}:eager", {}).get("ms"),
                     by_name.get(f"bandwidth:masked_linear:{m}:triton", {}).get("ms")) for m in ("random50", "rows50")]
    sparse = {layer: max((v for k, v in by_name.get(f"sparse24:linear:{layer}", {}).items()
                          if k.endswith("_speedup") and isinstance(v, (int, float))), default=None)
              for layer in ("fc1", "fc2")}
    model = by_name.get("sparse24:model:deit_base_patch16_224", {})
    model_speedup = max((v.get("speedup") for v in model.values() if isinstance(v, dict) and v.get("speedup")),
                        default=None)
    return [
        ("DeiT-B job (1,000 x 3 here): whole call, fast / reference loop", deit_b.get("fast", {}).get(
            "speedup_whole_call"), 5.0, True),
        ("fast mode (compile auto) / its own eager mode, every job", min(fast_over_eager) if fast_over_eager else None,
         0.97, True),
        ("DeiT-B batch 128 steady state: fraction of the measured bf16 matmul rate",
         torch_run.get("fraction_of_measured_matmul"), 0.45, True),
        ("kernels='triton' in compiled blocks: graph breaks", (triton_run.get("dynamo") or {}).get("graph_breaks"),
         0, False),
        ("cosine loss: fraction of the measured bandwidth", cosine.get("fraction_of_measured_bandwidth"), 0.70, True),
        ("masked Adam: fraction of the measured bandwidth", adam.get("fraction_of_measured_bandwidth"), 0.80, True),
        ("masked Adam: speed against torch's fused AdamW + mask", _ratio(fused.get("ms"), adam.get("ms")), 1.0, True),
        ("masked linear: speed against cuBLAS on masked weights (worst mask)",
         min((v for v in linear if v), default=None), 0.9, True),
        ("2:4 fc1 at 25,216 tokens: best backend / dense", sparse["fc1"], 1.1, True),
        ("2:4 fc2 at 25,216 tokens: best backend / dense", sparse["fc2"], 1.1, True),
        ("2:4 DeiT-B inference at batch 128: best / dense", model_speedup, 1.05, True)]


def recommended_auto(records: list[dict]) -> dict[str, bool] | None:
    """Per op: does the Triton kernel beat the torch path the engine would run instead (the eager loss, the
    fused AdamW + mask step, cuBLAS on masked weights)?"""
    ms = {r["name"]: r["ms"] for r in records if r["ok"] and r["name"].startswith("bandwidth:")}
    pairs = {"cosine_loss": [("cosine_loss:triton", "cosine_loss:eager")],
             "masked_adam": [("masked_adam:triton", "masked_adam:torch_fused")],
             "masked_linear": [(f"masked_linear:{m}:triton", f"masked_linear:{m}:eager") for m in ("random50", "rows50")]}
    table = {}
    for op, comparisons in pairs.items():
        wins = [ms[f"bandwidth:{a}"] < ms[f"bandwidth:{b}"] for a, b in comparisons
                if f"bandwidth:{a}" in ms and f"bandwidth:{b}" in ms]
        if wins:
            table[op] = all(wins)
    return table or None


def write_summary(out: Path) -> Path:
    records = read_records(out)
    environment = next((r for r in records if r["name"] == "environment"), {})
    failed = [r for r in records if r["ok"] is False]
    lines = [f"# gpu_check: {environment.get('device', 'unknown device')}", "",
             f"torch {environment.get('torch')}, triton {environment.get('triton')}, python "
             f"{environment.get('python')}, {environment.get('time')}; {len(records)} records, {len(failed)} failed.",
             "", "## Targets", "", "| target | value | threshold | status |", "|---|---:|---:|---|"]
    for target, value, threshold, higher in targets(records):
        if value is None:
            status = "unmeasured"
        elif (value >= threshold) if higher else (value <= threshold):
            status = "met"
        else:
            status = f"missed ({value / threshold:.2f} of the threshold)" if higher else f"missed ({value:.3g})"
        lines.append(f"| {target} | {_fmt(value) if value is not None else '-'} | {threshold:g} | {status} |")
    lines += ["", f"Recommended `AUTO_TRITON_ON_CUDA`: {recommended_auto(records)}", "", "## Every check", "",
              "| part | check | result | numbers | error or reason |", "|---|---|---|---|---|"]
    lines += [_row(r) for r in records]
    path = out / SUMMARY_NAME
    path.write_text("\n".join(lines) + "\n")
    return path
