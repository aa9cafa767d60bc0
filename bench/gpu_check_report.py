"""``summary.md`` of a ``gpu_check.sh`` run: every check with its key numbers, the issue's targets met
or missed (and by how much), and the ``kernels="auto"`` table the measurements recommend.

    python bench/gpu_check.py summary --out OUT
"""
from __future__ import annotations

from pathlib import Path

from gpu_check_log import SUMMARY_NAME, read_records

KEYS = ("max_rel_err", "ms", "gbs", "tflops", "fraction_of_measured_bandwidth", "fraction_of_measured_matmul",
        "images_per_s", "speedup_vs_reference", "last_epoch_rel_diff_vs_exact", "speedup", "rc", "seconds")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _row(record: dict) -> str:
    status = {True: "ok", False: "**FAILED**", None: "skipped"}[record["ok"]]
    numbers = ", ".join(f"{key} {_fmt(record[key])}" for key in KEYS if record.get(key) is not None)
    why = record.get("error") or record.get("skipped") or ""
    return f"| {record['part']} | {record['name']} | {status} | {numbers} | {str(why)[:300]} |"


def targets(records: list[dict]) -> list[tuple[str, float | None, float, bool]]:
    """(target, value, threshold, higher is better) for each of the issue's targets that was measured."""
    by_name = {r["name"]: r for r in records if r["ok"]}
    heal = {name.split(":", 2)[2]: r for name, r in by_name.items() if name.startswith("heal:deit_base")}
    fast = next((r for label, r in heal.items() if label.startswith("fast[gpu") and label.endswith(",torch]")), {})
    pinned = next((r for label, r in heal.items() if label.startswith("fast[pinned")), {})
    pinned_ratio = pinned["images_per_s"] / fast["images_per_s"] if pinned and fast else None
    cosine = by_name.get("bandwidth:cosine_loss:triton", {})
    adam = by_name.get("bandwidth:masked_adam:triton", {})
    return [("DeiT-B fast mode / reference-equivalent loop", fast.get("speedup_vs_reference"), 10.0, True),
            ("DeiT-B fast mode: fraction of the measured bf16 matmul rate", fast.get("fraction_of_measured_matmul"),
             0.45, True),
            ("pinned store images/s / gpu store images/s", pinned_ratio, 0.90, True),
            ("loss after the same steps vs fp32 (relative, one fp32 teacher)",
             fast.get("fp32_teacher_loss_rel_diff_vs_reference"), 0.02, False),
            ("cosine loss: fraction of the measured bandwidth", cosine.get("fraction_of_measured_bandwidth"), 0.70,
             True),
            ("masked Adam: fraction of the measured bandwidth", adam.get("fraction_of_measured_bandwidth"), 0.70,
             True)]


def recommended_auto(records: list[dict]) -> dict[str, bool] | None:
    """Per op: does the Triton kernel beat the torch path it replaces (eager loss; fused AdamW; cuBLAS)?"""
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
