"""Healing diagnostics: top-1 and retention, KL(dense || pruned) and the paper's representation
bound on it (Theorem 1, Appendix A.1), and per-block cosine similarity to the dense model.

    from starfish_fast.diagnostics import representation_diagnostics, format_diagnostics, plot_block_cosine
    before = representation_diagnostics(dense, pruned, test_images, test_labels)   # before healing
    after = representation_diagnostics(dense, healed, test_images, test_labels)    # after healing
    print(format_diagnostics(after))
    plot_block_cosine(before["block_cosine"], after["block_cosine"], "block_cosine.png")

The bound, per example i, with h / h~ the dense / pruned head inputs (the last hidden
representation), A / A~ their heads (weight, K x d in torch layout; bias b / b~), logits
z = A h + b, dz = z~ - z, psi = log-sum-exp:

    KL(p_i || p~_i) <= 1/2 zeta_i (M_i ||h~_i - h_i|| + M~_i ||h~_i||)^2            ("bound")
    M_i  = ||A (h~_i - h_i)|| / ||h~_i - h_i||        (0 when h~_i = h_i)
    M~_i = ||(A~ - A) h~_i + (b~ - b)|| / ||h~_i||   (0 when the head is shared: the bias cancels)
    zeta_i = sup_{t in [0,1]} dz^T Hess psi(z + t dz) dz / ||dz||^2,  Hess psi(u) = diag(p) - p p^T

The paper estimates the sup on 20 points of [0, 1]; a grid can miss a narrow peak (a confident
prediction flipping to another confident one), so the estimate can undershoot and the "bound"
can then fall below the measured KL. ``bound_certified`` never does: the quadratic form
q(t) = Var_{p_t}(dz) has q'(t) = E[(dz - mu)^3], so |q'| <= R q with R = max(dz) - min(dz), and
between grid points spaced delta apart sup q <= max_grid q * exp(R delta / 2); capped at 1/2,
the largest eigenvalue of Hess psi. ``bound_global`` replaces M_i by ||A||_2 (spectral norm) and
zeta_i by 1/2, as the paper's global variant: 1/4 (||A||_2 ||dh|| + ||A~ - A||_2 ||h~|| + ||db||)^2.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from starfish_fast import distributed
from starfish_fast.data import TensorLoader
from starfish_fast.kernels import multi_block_cosine_loss_reference
from starfish_fast.models import adapter_for
from starfish_fast.progress import progress_bar

log = logging.getLogger(__name__)

PAPER_ZETA_POINTS = 20         # Appendix A.1: "maximum ... for 20 points in [0, 1]"
ZETA_MAX = 0.5                 # largest eigenvalue of diag(p) - p p^T (softmax is 1/2-Lipschitz)


# ----------------------------------------------------------------------------- the bound, per example
def lse_path_curvature(z: torch.Tensor, dz: torch.Tensor, points: int = PAPER_ZETA_POINTS) -> torch.Tensor:
    """``dz^T Hess psi(z + t dz) dz / ||dz||^2`` at ``points`` evenly spaced t in [0, 1]: (N, points).
    Rows with ``dz = 0`` give 0 (the paper's 0/0 := 0 convention)."""
    t = torch.linspace(0, 1, points, dtype=z.dtype, device=z.device)              # (P,)
    p = torch.softmax(z[:, None, :] + t[None, :, None] * dz[:, None, :], dim=-1)    # (N, P, K)
    mean = (p * dz[:, None, :]).sum(-1)                                             # (N, P)
    quadratic = (p * dz[:, None, :].square()).sum(-1) - mean.square()              # (N, P): Var_p(dz)
    norm2 = dz.square().sum(-1, keepdim=True)                                       # (N, 1)
    return torch.where(norm2 > 0, quadratic.clamp_min(0) / norm2.clamp_min(torch.finfo(z.dtype).tiny), 0.0)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator with 0/0 := 0 (footnote 4 of the paper)."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(numerator.dtype).tiny), 0.0)


def kl_bound_terms(h: torch.Tensor, h_pruned: torch.Tensor, weight: torch.Tensor, weight_pruned: torch.Tensor,
                   bias: torch.Tensor | None = None, bias_pruned: torch.Tensor | None = None,
                   zeta_points: int = PAPER_ZETA_POINTS) -> dict[str, torch.Tensor]:
    """Per-example terms of Theorem 1 in float64, from the head inputs ``h, h_pruned`` (N, d) and
    the heads ``weight, weight_pruned`` (K, d) (torch layout: the paper's A is ``weight.T``) and
    biases (K,). Every value is an (N,) tensor; see the module docstring for the formulas."""
    if zeta_points < 2:
        raise ValueError(f"zeta_points must be at least 2 (t = 0 and t = 1), got {zeta_points}")
    f64 = dict(dtype=torch.float64)
    h, h_pruned = h.to(**f64), h_pruned.to(**f64)                                  # (N, d)
    weight, weight_pruned = weight.to(**f64), weight_pruned.to(**f64)              # (K, d)
    bias = torch.zeros(weight.shape[0], **f64, device=h.device) if bias is None else bias.to(**f64)
    bias_pruned = bias if bias_pruned is None else bias_pruned.to(**f64)            # (K,)
    z = h @ weight.T + bias                                                         # (N, K)
    z_pruned = h_pruned @ weight_pruned.T + bias_pruned                             # (N, K)
    dz = z_pruned - z                                                               # (N, K)
    dh = h_pruned - h                                                               # (N, d)
    head_term = (dh @ weight.T).norm(dim=-1)                                        # (N,): M_i ||dh_i||
    head_change = h_pruned @ (weight_pruned - weight).T + (bias_pruned - bias)      # (N, K)
    head_change_term = head_change.norm(dim=-1)                                     # (N,): M~_i ||h~_i||
    curvature = lse_path_curvature(z, dz, zeta_points)                              # (N, P)
    zeta = curvature.amax(dim=-1)                                                   # (N,)
    spread = dz.amax(dim=-1) - dz.amin(dim=-1)                                      # (N,): R
    zeta_certified = torch.clamp(zeta * torch.exp(spread / (2 * (zeta_points - 1))), max=ZETA_MAX)  # (N,)
    log_p, log_p_pruned = torch.log_softmax(z, dim=-1), torch.log_softmax(z_pruned, dim=-1)
    kl = (log_p.exp() * (log_p - log_p_pruned)).sum(-1).clamp_min(0)               # (N,)
    norm_dh, norm_h_pruned = dh.norm(dim=-1), h_pruned.norm(dim=-1)                 # (N,)
    head_norm = torch.linalg.matrix_norm(weight, ord=2)                             # ||A||_2
    head_change_norm = torch.linalg.matrix_norm(weight_pruned - weight, ord=2)      # ||A~ - A||_2
    return {
        "kl": kl,
        "zeta": zeta,
        "zeta_certified": zeta_certified,
        "head_gain": _ratio(head_term, norm_dh),                                    # M_i
        "head_change_gain": _ratio(head_change_term, norm_h_pruned),                # M~_i
        "rep_error": norm_dh,
        "logit_error": dz.norm(dim=-1),
        "bound": 0.5 * zeta * (head_term + head_change_term).square(),
        "bound_certified": 0.5 * zeta_certified * (head_term + head_change_term).square(),
        "bound_global": 0.5 * ZETA_MAX * (head_norm * norm_dh + head_change_norm * norm_h_pruned
                                          + (bias_pruned - bias).norm()).square(),
    }


# ----------------------------------------------------------------------------- models
def classifier_head(model: nn.Module) -> nn.Linear:
    """The final ``nn.Linear`` whose input is the last hidden representation h: timm's
    ``get_classifier()``, else the model's last ``nn.Linear`` (torchvision's fc / heads.head / classifier[-1])."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    head = model.get_classifier() if hasattr(model, "get_classifier") else (linears[-1] if linears else None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}: no linear classification head found (got "
                         f"{type(head).__name__}); the KL bound needs logits = A h + b")
    return head


@torch.no_grad()
def _forward(model: nn.Module, adapter, images: torch.Tensor, block_names: Sequence[str]):
    """Logits (B, K), head inputs h (B, d) and block outputs: one forward pass, h caught by a pre-hook."""
    captured = {}
    handle = classifier_head(model).register_forward_pre_hook(lambda _m, inputs: captured.__setitem__("h", inputs[0]))
    try:
        logits, reps = adapter.forward_blocks(model, images, block_names, need_logits=True)
    finally:
        handle.remove()
    return logits, captured["h"], reps


def _batches(images, labels, batch_size: int) -> Iterable:
    if isinstance(images, torch.Tensor):
        return TensorLoader(images, labels, batch_size)
    return images                     # already (images, labels) batches: a DataLoader or TensorLoader


@torch.no_grad()
def representation_diagnostics(dense: nn.Module, model: nn.Module, images, labels: torch.Tensor | None = None, *,
                               block_names: Sequence[str] | None = None, batch_size: int = 256,
                               zeta_points: int = PAPER_ZETA_POINTS,
                               device: str | torch.device | None = None, desc: str | None = None) -> dict:
    """Compare ``model`` (pruned or healed) with ``dense`` on labeled data.

    ``images``: a tensor (N, C, H, W) with ``labels`` (N,) (or None: top-1 is then NaN), or any
    iterable of ``(images, labels)`` batches (a DataLoader). Returns floats: ``top1_dense``,
    ``top1_model`` (percent), ``retention`` (their ratio), the means over examples of ``kl``,
    ``bound``, ``bound_certified``, ``bound_global``, ``zeta``, ``head_gain`` (M_i),
    ``head_change_gain`` (M~_i), ``rep_error`` (||h~ - h||), ``logit_error``; ``zeta_max``,
    ``head_norm`` (||A||_2), ``examples``, ``zeta_points``; and ``block_cosine``
    ``{block: mean cosine to the dense output}`` (rows as the STARFISH loss: tokens of
    (B, T, D) outputs, images otherwise). Both models are put in eval mode and restored. With ``desc``,
    a progress bar over the batches."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    adapter = adapter_for(model, block_names)
    block_names = list(block_names) if block_names is not None else adapter.block_names(model)
    per = "token" if adapter.cosine_per == "token" else "shape"
    heads = classifier_head(dense), classifier_head(model)
    modes = dense.training, model.training
    dense.eval()
    model.eval()
    totals = _Totals(len(block_names))
    group = distributed.current()              # under torchrun: every world-size-th batch here, then summed
    try:
        batches = progress_bar(_batches(images, labels, batch_size), desc=desc, enabled=group is None or group.main)
        for index, (batch_images, batch_labels) in enumerate(batches):
            if group is None or index % group.world_size == group.rank:
                batch_images = batch_images.to(device)
                totals.add(_forward(dense, adapter, batch_images, block_names),
                           _forward(model, adapter, batch_images, block_names), heads, batch_labels.to(device),
                           per, zeta_points)
    finally:
        dense.train(modes[0])
        model.train(modes[1])
    if group is not None:
        totals.reduce(group)
    result = totals.result(block_names, zeta_points, heads[0])
    if result["bound_certified"] < result["kl"]:     # cannot happen in exact arithmetic: flag a broken setup
        log.warning("certified bound %.4g below the measured KL %.4g: is the classifier the last op?",
                    result["bound_certified"], result["kl"])
    return result


class _Totals:
    """Sums over examples of the bound's terms, the blocks' cosines and the top-1 counts."""

    def __init__(self, blocks: int):
        self.sums: dict[str, float] = {}
        self.cosine = [0.0] * blocks
        self.counts = [0, 0, 0, 0]                 # correct dense, correct model, labeled, examples
        self.zeta_max = 0.0

    def add(self, dense_out, model_out, heads, labels: torch.Tensor, per: str, zeta_points: int) -> None:
        (logits_dense, h_dense, reps_dense), (logits_model, h_model, reps_model) = dense_out, model_out
        dense_head, head = heads
        terms = kl_bound_terms(h_dense, h_model, dense_head.weight, head.weight, dense_head.bias, head.bias,
                               zeta_points)
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.sum())
        self.zeta_max = max(self.zeta_max, float(terms["zeta"].max()))
        n = labels.shape[0]
        for i, (s, t) in enumerate(zip(reps_model, reps_dense)):
            # the STARFISH rows: tokens of (B, T, D) (and of channels-last maps), else images; weighted by n
            self.cosine[i] += n * (1 - float(multi_block_cosine_loss_reference([s.float()], [t.float()], per)))
        valid = labels >= 0                                                      # (B,): -100 = unlabeled
        self.counts[0] += int((logits_dense.argmax(-1).eq(labels) & valid).sum())
        self.counts[1] += int((logits_model.argmax(-1).eq(labels) & valid).sum())
        self.counts[2] += int(valid.sum())
        self.counts[3] += n

    def reduce(self, group) -> None:
        """Every process's sums and counts added (float64), the largest zeta."""
        keys = sorted(self.sums)
        local = torch.tensor([self.sums[k] for k in keys] + self.cosine + self.counts, dtype=torch.float64)
        device = torch.device("cuda", torch.cuda.current_device()) if group.backend == "nccl" else torch.device("cpu")
        total = group.sum(local.to(device)).cpu().tolist()
        highest = torch.tensor([self.zeta_max], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(highest, op=torch.distributed.ReduceOp.MAX)
        n_sums, n_cos = len(keys), len(self.cosine)
        self.sums = dict(zip(keys, total[:n_sums]))
        self.cosine = total[n_sums:n_sums + n_cos]
        self.counts = [int(round(v)) for v in total[n_sums + n_cos:]]
        self.zeta_max = float(highest)

    def result(self, block_names, zeta_points: int, dense_head: nn.Linear) -> dict:
        correct_dense, correct_model, labeled, examples = self.counts
        if examples == 0:
            raise ValueError("no evaluation examples")
        top1_dense = 100.0 * correct_dense / labeled if labeled else math.nan
        top1_model = 100.0 * correct_model / labeled if labeled else math.nan
        return {"examples": examples, "zeta_points": zeta_points, "top1_dense": top1_dense, "top1_model": top1_model,
                "retention": top1_model / top1_dense if labeled and top1_dense > 0 else math.nan,
                **{key: value / examples for key, value in self.sums.items()}, "zeta_max": self.zeta_max,
                "head_norm": float(torch.linalg.matrix_norm(dense_head.weight.double(), ord=2)),
                "block_cosine": {name: value / examples for name, value in zip(block_names, self.cosine)}}


def format_diagnostics(diagnostics: Mapping, label: str = "model") -> str:
    """Human-readable lines of a ``representation_diagnostics`` result."""
    d = diagnostics
    cosines = list(d["block_cosine"].values())
    return "\n".join([
        f"{label}: top-1 {d['top1_model']:.2f}% (dense {d['top1_dense']:.2f}%, retention {d['retention']:.1%}) "
        f"on {d['examples']} examples",
        f"  KL(dense || {label}) {d['kl']:.4g}   bound {d['bound']:.4g} (zeta on {d['zeta_points']} points)   "
        f"certified {d['bound_certified']:.4g}   global {d['bound_global']:.4g}",
        f"  mean zeta {d['zeta']:.4g} (max {d['zeta_max']:.4g}, global 1/2)   mean M {d['head_gain']:.4g} "
        f"(||A||_2 {d['head_norm']:.4g})   mean M~ {d['head_change_gain']:.4g}   mean ||h~ - h|| {d['rep_error']:.4g}",
        "  block cosine " + " ".join(f"{c:.3f}" for c in cosines),
    ])


# ----------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | os.PathLike) -> None:
    from starfish_fast.checkpoint import atomic_path

    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    _pyplot().close(figure)


def plot_block_cosine(before: Mapping[str, float] | None, after: Mapping[str, float], path: str | os.PathLike,
                      title: str = "cosine similarity to the dense model, per block") -> None:
    """PNG of per-block cosine (``{block: cosine}``, as ``representation_diagnostics`` returns)
    before (pruned; may be None) and after healing, written atomically (needs matplotlib)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    names = list(after)
    if before is not None:
        axis.plot(range(len(names)), [before[name] for name in names], "o-", label="before healing (pruned)")
    axis.plot(range(len(names)), [after[name] for name in names], "s-", label="after healing")
    axis.set_xticks(range(len(names)), names, rotation=45 if len(names) > 8 else 0, ha="right" if len(names) > 8
                    else "center", fontsize=8)
    axis.set_xlabel("block")
    axis.set_ylabel("mean cosine to dense")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    _save(figure, path)


def plot_kl_bound(before: Mapping, after: Mapping, path: str | os.PathLike,
                  title: str = "KL(dense || model) and its representation bounds") -> None:
    """PNG in the manner of the paper's Figures 3 and 5: measured KL and the per-example,
    certified and global bounds, before and after healing (log scale)."""
    plt = _pyplot()
    keys = {"kl": "measured KL", "bound": f"bound (zeta on {after['zeta_points']} pts)",
            "bound_certified": "certified bound", "bound_global": "global bound (||A||, 1/2)"}
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys.items()):
        values = [before[key], after[key]]
        axis.bar([i + (j - (len(keys) - 1) / 2) * width for i in range(2)], values, width, label=label)
    axis.set_xticks([0, 1], ["pruned (before healing)", "healed (after)"])
    axis.set_yscale("log")
    axis.set_ylabel("mean over examples")
    axis.set_title(title)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    _save(figure, path)
