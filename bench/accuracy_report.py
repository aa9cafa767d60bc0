"""The reports of ``bench/accuracy.py``: the CSV of runs, mean and std per cell, the targets, the
markdown tables and the retention plot.

    rows = read_rows(Path("bench/results/accuracy_fashion_vit.csv"))
    print(markdown_tables(summarize(rows), pruned, objectives, dense_top1))
"""
from __future__ import annotations

import csv
import platform
import statistics
from pathlib import Path

import torch

from starfish_fast.checkpoint import atomic_path, save_json_atomic, tensor_fingerprint
from starfish_fast.diagnostics import PAPER_ZETA_POINTS, plot_block_cosine, plot_kl_bound

CSV_FIELDS = ("model", "setting", "sparsity", "objective", "seed", "dense_top1", "top1", "retention", "kl",
              "heal_seconds", "images_per_second", "epochs", "calib_samples", "eval_examples")
TARGETS = {0.5: 0.97, 0.8: 0.90}          # STARFISH retention targets, by sparsity
ORDER = ("starfish", "mse", "kl", "ce")   # the paper's ranking at high sparsity (Tables 1 and 3)
# mask makers run at every --sparsities
UNSTRUCTURED = ("magnitude", "wanda", "representation", "representation_magnitude", "sparsegpt")
STRUCTURED_WHAT = {"mlp": " (structured: whole MLP neurons, fc1 rows with their fc2 columns)",
                   "channel": " (structured: whole output filters of the convs)",
                   "qk_mlp": " (structured_qk: whole QK head dims, q and k rows of qkv, with the MLP neurons)"}


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in CSV_FIELDS:
            if key not in ("model", "setting", "objective"):
                row[key] = float(row[key])
        row["seed"] = int(row["seed"])
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------- summaries

def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std (sample std over seeds; 0 for one seed) of top-1, retention and KL per
    (setting, sparsity, objective), in run order."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setting"], row["sparsity"], row["objective"]), []).append(row)
    summary = []
    for (setting, sparsity, objective), members in groups.items():
        entry = {"setting": setting, "sparsity": sparsity, "objective": objective, "seeds": len(members),
                 "dense_top1": members[0]["dense_top1"]}
        for key in ("top1", "retention", "kl", "heal_seconds"):
            values = [m[key] for m in members]
            entry[key] = statistics.fmean(values)
            entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def objective_label(objective: str) -> str:
    return {"starfish": "STARFISH", "starfish_adaptive": "STARFISH adaptive", "compensate": "compensate",
            "compensate+starfish": "compensate → STARFISH", "sparsegpt": "SparseGPT update",
            "sparsegpt+starfish": "SparseGPT update → STARFISH"}.get(objective, objective.upper())


def setting_label(setting: str, sparsity: float) -> str:
    return {"magnitude": f"magnitude {sparsity:.2f}", "2:4": f"2:4 ({sparsity:.2f})",
            "structured": f"structured {sparsity:.2f}",
            "structured_qk": f"structured QK+MLP {sparsity:.2f}"}.get(setting, f"{setting} {sparsity:.2f}")


def check_targets(summary: list[dict]) -> list[str]:
    """The issue's targets, each line starting with PASS or FAIL. 'By more than the seeds'
    spread' is read as: mean(a) - mean(b) > std(a) + std(b)."""
    cell = {(s["setting"], s["sparsity"], s["objective"]): s for s in summary}
    lines = []
    for sparsity, target in TARGETS.items():
        entry = cell.get(("magnitude", sparsity, "starfish"))
        if entry:
            ok = entry["retention"] >= target
            lines.append(f"{'PASS' if ok else 'FAIL'} STARFISH retention at {sparsity:g}: "
                         f"{entry['retention']:.1%} (target >= {target:.0%})")
    for sparsity in sorted({s["sparsity"] for s in summary if s["setting"] == "magnitude" and s["sparsity"] >= 0.7}):
        chain = [cell.get(("magnitude", sparsity, o)) for o in ORDER]
        if any(c is None for c in chain):
            continue
        pairs = []
        for a, b in zip(chain, chain[1:]):
            margin = a["top1"] - b["top1"]
            spread = a["top1_std"] + b["top1_std"]
            pairs.append((margin > spread,
                          f"{a['objective']} - {b['objective']} = {margin:+.2f} (spread {spread:.2f})"))
        ok = all(p for p, _ in pairs)
        lines.append(f"{'PASS' if ok else 'FAIL'} order STARFISH > MSE > KL > CE at {sparsity:g}: "
                     + "; ".join(text for _, text in pairs))
    return lines


def markdown_tables(summary: list[dict], pruned: dict, objectives, dense_top1: float) -> str:
    """Top-1 mean +- std (retention) per setting and objective; then KL(dense || healed)."""
    keys = list(dict.fromkeys((s["setting"], s["sparsity"]) for s in summary))
    cell = {(s["setting"], s["sparsity"], s["objective"]): s for s in summary}
    names = [objective_label(o) for o in objectives]
    header = "| setting | pruned | " + " | ".join(names) + " |"
    rule = "|---|---:|" + "---:|" * len(objectives)
    lines = [f"Top-1 % on the test split, mean ± std over seeds (retention = healed / dense {dense_top1:.2f}%):", "",
             header, rule]
    for setting, sparsity in keys:
        p = pruned[(setting, sparsity)]
        cells = [f"{p['top1']:.2f} ({p['retention']:.1%})"]
        for objective in objectives:
            s = cell.get((setting, sparsity, objective))
            cells.append("–" if s is None else f"{s['top1']:.2f} ± {s['top1_std']:.2f} ({s['retention']:.1%})")
        lines.append(f"| {setting_label(setting, sparsity)} | " + " | ".join(cells) + " |")
    lines += ["", "Mean KL(dense || model) over the test split (lower is closer to the dense model):", "",
              header, rule]
    for setting, sparsity in keys:
        cells = [f"{pruned[(setting, sparsity)]['kl']:.4f}"]
        for objective in objectives:
            s = cell.get((setting, sparsity, objective))
            cells.append("–" if s is None else f"{s['kl']:.4f} ± {s['kl_std']:.4f}")
        lines.append(f"| {setting_label(setting, sparsity)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(diagnostics: dict, sparsity: float, seed: int) -> str:
    """Theorem 1's quantities for the pruned model and each healed one at the diagnosed setting."""
    lines = [f"Diagnostics at magnitude {sparsity:g}, seed {seed} (test-split means; bound: zeta on "
             f"{PAPER_ZETA_POINTS} points as the paper; certified: never below KL; global: ‖A‖₂ and 1/2):", "",
             "| model | top-1 | KL | bound | certified | global | mean zeta | mean M (‖A‖₂) | mean block cosine |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in diagnostics.items():
        cosine = statistics.fmean(d["block_cosine"].values())
        lines.append(f"| {name} | {d['top1_model']:.2f} | {d['kl']:.4f} | {d['bound']:.4f} | "
                     f"{d['bound_certified']:.4f} | {d['bound_global']:.2f} | {d['zeta']:.4f} | "
                     f"{d['head_gain']:.2f} ({d['head_norm']:.2f}) | {cosine:.4f} |")
    return "\n".join(lines)


def plot_retention(summary: list[dict], pruned: dict, objectives, path: Path, title: str) -> None:
    """Retention vs sparsity per objective (unstructured masks: magnitude, and Wanda or representation
    with their own line styles; std error bars) with the pruned models; the same zoomed on the healed
    models (their spread is a few points against the pruned models' tens); the fixed-sparsity settings
    (2:4, structured) as bars. Panels without data are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {o: f"C{i}" for i, o in enumerate(objectives)}
    methods = [m for m in UNSTRUCTURED if any(s["setting"] == m for s in summary)]
    extras = list(dict.fromkeys((s["setting"], s["sparsity"]) for s in summary if s["setting"] not in UNSTRUCTURED))
    ratios = [3, 3] * bool(methods) + [2] * bool(extras)
    figure, axes = plt.subplots(1, len(ratios), figsize=(2.7 * sum(ratios), 4.5), squeeze=False,
                                gridspec_kw={"width_ratios": ratios})
    if methods:
        for zoomed, axis in enumerate(axes[0][:2]):
            _plot_lines(axis, summary, pruned, objectives, methods, colors, zoomed)
            axis.set_title(f"{title}, healed only" if zoomed else title)
    if extras:
        _plot_bars(axes[0][-1], summary, pruned, objectives, extras, colors)
        if not methods:
            axes[0][-1].set_title(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def _plot_lines(axis, summary, pruned, objectives, methods, colors, zoomed: bool) -> None:
    """One line per (method, objective): with several methods, the color is the method and the line style
    the objective (the methods are what is compared); with one, the color is the objective."""
    several = len(methods) > 1
    styles = ("-", "--", "-.", ":")
    for method in methods:
        method_color = f"C{UNSTRUCTURED.index(method)}" if several else "k"
        sparsities = sorted({s["sparsity"] for s in summary if s["setting"] == method})
        if not zoomed:
            axis.plot(sparsities, [100 * pruned[(method, x)]["retention"] for x in sparsities], color=method_color,
                      linestyle=":", marker="x", alpha=0.6, label=f"pruned ({method})" if several else "pruned")
        for j, objective in enumerate(objectives):
            points = sorted((s["sparsity"], 100 * s["retention"], 100 * s["retention_std"]) for s in summary
                            if s["setting"] == method and s["objective"] == objective)
            if points:
                color = method_color if several else colors[objective]
                axis.errorbar(*zip(*points), marker="o", capsize=3, color=color,
                              linestyle=styles[j % len(styles)] if several else "-",
                              label=f"{objective_label(objective)} ({method})" if several
                              else objective_label(objective))
    axis.set_xlabel(f"sparsity of the prune scope ({', '.join(methods)})")
    axis.set_ylabel("retention: healed / dense top-1 (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7 if several else 8)


def _plot_bars(axis, summary, pruned, objectives, extras, colors) -> None:
    width = 0.8 / len(objectives)
    lowest = 100.0
    for j, objective in enumerate(objectives):
        cells = [next((x for x in summary if (x["setting"], x["sparsity"], x["objective"]) == (*key, objective)),
                      None) for key in extras]
        values = [100 * c["retention"] if c else float("nan") for c in cells]
        lowest = min([lowest] + [v for v in values if v == v])
        axis.bar([i + (j - (len(objectives) - 1) / 2) * width for i in range(len(extras))], values, width,
                 yerr=[100 * c["retention_std"] if c else 0 for c in cells], capsize=2,
                 label=objective_label(objective), color=colors[objective])
    for i, key in enumerate(extras):
        axis.hlines(100 * pruned[key]["retention"], i - 0.45, i + 0.45, colors="k", linestyles="--",
                    label="pruned" if i == 0 else None)
        lowest = min(lowest, 100 * pruned[key]["retention"])
    axis.set_ylim(lowest - 2, 101.5)
    axis.set_xticks(range(len(extras)), ["\n".join(setting_label(*key).rsplit(" ", 1)) for key in extras], fontsize=8)
    axis.set_ylabel("retention (%)")
    axis.set_title("fixed-sparsity settings")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.17))


def write_reports(args, task, prefix, summary, pruned, targets, diagnostics, dense_top1, wall_seconds) -> None:
    title = f"{task.name}: healing by objective"
    plot_retention(summary, pruned, args.objectives, prefix.with_suffix(".png"), title)
    if "pruned" in diagnostics and "starfish" in diagnostics:     # missing when --resume skipped those runs
        label = f"{task.name}, magnitude {args.diagnostics_sparsity:g}, STARFISH"
        plot_block_cosine(diagnostics["pruned"]["block_cosine"], diagnostics["starfish"]["block_cosine"],
                          f"{prefix}_block_cosine.png", title=f"{label}: cosine to dense per block")
        plot_kl_bound(diagnostics["pruned"], diagnostics["starfish"], f"{prefix}_kl_bound.png",
                      title=f"{label}: KL(dense || model) and its bounds")
    config = {key: value for key, value in vars(args).items() if key not in ("verbose",)}
    environment = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                   "device": str(task.device), "threads": torch.get_num_threads(),
                   "cuda": torch.cuda.get_device_name(task.device) if task.device.type == "cuda" else None}
    environment["dense_weights_sha256"] = tensor_fingerprint(task.dense.state_dict())   # which weights were healed
    save_json_atomic({"config": config, "environment": environment, "wall_seconds": wall_seconds,
                      "summary": summary, "pruned": {f"{k[0]} {k[1]}": v for k, v in pruned.items()},
                      "targets": targets, "diagnostics": diagnostics}, prefix.with_suffix(".json"))
    seeded = ("Wanda and representation-aware masks from each seed's calibration images (the pruned column: the "
              "first seed's); " if len(set(args.methods) - {"magnitude"}) else "")
    unstructured = (f"sparsities {', '.join(f'{s:g}' for s in args.sparsities)} ({', '.join(args.methods)}, per "
                    f"layer, scope {task.scope})" if args.sparsities else "")
    text = "\n".join([
        f"# Healing quality: {task.name}", "",
        f"Grid: {unstructured}{' + ' if unstructured and args.extras else ''}{', '.join(args.extras)}"
        f"{STRUCTURED_WHAT[task.structured_kind] if 'structured' in args.extras else ''}"
        f"{STRUCTURED_WHAT['qk_mlp'] if 'structured_qk' in args.extras else ''}; objectives "
        f"{', '.join(args.objectives)}; seeds {', '.join(map(str, args.seeds))}; {args.epochs} epochs, "
        f"{args.calib_samples} calibration images, batch {args.batch_size}, AdamW lr {args.lr:g} -> {args.min_lr:g} "
        f"cosine, weight decay {args.weight_decay:g}; device {task.device}, torch {torch.__version__}; "
        f"{seeded}wall time {wall_seconds / 60:.1f} min (summed over --resume sessions); dense weights sha256 "
        f"{environment['dense_weights_sha256'][:16]}.", "",
        markdown_tables(summary, pruned, args.objectives, dense_top1), "",
        "Targets:", "", *[f"- {line}" for line in targets], "",
        diagnostics_table(diagnostics, args.diagnostics_sparsity, args.seeds[0]) if diagnostics else "", ""])
    with atomic_path(prefix.with_suffix(".md")) as tmp:
        Path(tmp).write_text(text)
    print(text)


