"""Diagnostics: the KL bound of Theorem 1 is a bound, its terms match their definitions, and the
model-level report (top-1, retention, KL, block cosine, plots) is consistent."""
import copy

import pytest
import torch

from helpers import images, random_masks, tiny_mobilenet, tiny_vit
from starfish_fast.diagnostics import (ZETA_MAX, classifier_head, format_diagnostics, kl_bound_terms,
                                       lse_path_curvature, plot_block_cosine, plot_kl_bound,
                                       representation_diagnostics)
from starfish_fast.masks import apply_masks


def _random_heads(n, d, k, scale, seed, pruned_head=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    h_pruned = h + scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(k, d, generator=g, dtype=torch.float64) / d ** 0.5 * 4
    bias = torch.randn(k, generator=g, dtype=torch.float64)
    weight_pruned, bias_pruned = weight, bias
    if pruned_head:
        weight_pruned = weight * (torch.rand(k, d, generator=g) > 0.5)
        bias_pruned = bias + 0.1 * torch.randn(k, generator=g, dtype=torch.float64)
    return h, h_pruned, weight, weight_pruned, bias, bias_pruned


@pytest.mark.parametrize("scale", [0.0, 0.01, 0.3, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("pruned_head", [False, True])
def test_bound_never_below_kl_on_random_representations(scale, pruned_head):
    seed = int(scale * 100) + pruned_head
    terms = kl_bound_terms(*_random_heads(4000, 24, 10, scale, seed=seed, pruned_head=pruned_head))
    kl = terms["kl"]
    slack = 1e-12 * (1 + kl)            # float64 rounding of KL itself
    assert (terms["bound"] + slack >= kl).all(), "the paper's 20-point estimate undershot on Gaussian data"
    assert (terms["bound_certified"] + slack >= terms["bound"]).all()
    assert (terms["bound_global"] + slack >= terms["bound_certified"]).all()
    assert (terms["zeta"] <= ZETA_MAX + 1e-12).all() and (terms["zeta_certified"] <= ZETA_MAX).all()
    if scale == 0 and not pruned_head:  # identical models: everything is exactly zero (0/0 := 0)
        for key in ("kl", "bound", "bound_certified", "bound_global", "head_gain", "zeta"):
            assert terms[key].abs().max() == 0, key


def test_grid_estimate_can_undershoot_but_certified_bound_holds():
    """A confident prediction flipping to another confident one: the curvature peak at t = 1/2
    falls between the 20 grid points (9/19, 10/19), so the paper's estimate undershoots."""
    a = 200.0
    h, h_pruned = torch.tensor([[a, 0.0]], dtype=torch.float64), torch.tensor([[-a, 0.0]], dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)          # logits = h
    terms = kl_bound_terms(h, h_pruned, weight, weight)
    assert terms["kl"].item() == pytest.approx(a, rel=1e-6)               # p = (1, 0) -> (0, 1)
    assert terms["bound"].item() < terms["kl"].item()                             # the 20-point grid misses
    assert terms["bound_certified"].item() >= terms["kl"].item()
    fine = kl_bound_terms(h, h_pruned, weight, weight, zeta_points=2 * 400 + 1)   # t = 1/2 on the grid
    assert fine["bound"].item() >= fine["kl"].item()


def test_curvature_matches_the_log_sum_exp_hessian():
    g = torch.Generator().manual_seed(3)
    z, dz = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    curvature = lse_path_curvature(z, dz, points=4)                               # (5, 4)
    for i in range(5):
        for j, t in enumerate(torch.linspace(0, 1, 4, dtype=torch.float64)):
            hessian = torch.autograd.functional.hessian(lambda u: torch.logsumexp(u, 0), z[i] + t * dz[i])
            direct = dz[i] @ hessian @ dz[i] / dz[i].dot(dz[i])
            assert curvature[i, j].item() == pytest.approx(direct.item(), rel=1e-10, abs=1e-14)


def test_terms_match_their_definitions():
    h, h_pruned, weight, weight_pruned, bias, bias_pruned = _random_heads(50, 16, 6, 0.5, seed=7, pruned_head=True)
    terms = kl_bound_terms(h, h_pruned, weight, weight_pruned, bias, bias_pruned, zeta_points=11)
    z, z_pruned = h @ weight.T + bias, h_pruned @ weight_pruned.T + bias_pruned
    p, p_pruned = z.softmax(-1), z_pruned.softmax(-1)
    torch.testing.assert_close(terms["kl"], (p * (p / p_pruned).log()).sum(-1))
    dh = h_pruned - h
    torch.testing.assert_close(terms["head_gain"], (dh @ weight.T).norm(dim=-1) / dh.norm(dim=-1))
    head_change = (h_pruned @ (weight_pruned - weight).T + bias_pruned - bias).norm(dim=-1)
    torch.testing.assert_close(terms["head_change_gain"], head_change / h_pruned.norm(dim=-1))
    first = terms["head_gain"] * dh.norm(dim=-1) + terms["head_change_gain"] * h_pruned.norm(dim=-1)
    torch.testing.assert_close(terms["bound"], 0.5 * terms["zeta"] * first ** 2)
    assert (terms["head_gain"] <= torch.linalg.matrix_norm(weight, ord=2) + 1e-12).all()   # M_i <= ||A||_2
    shared = kl_bound_terms(h, h_pruned, weight, weight, bias, bias)
    assert shared["head_change_gain"].abs().max() == 0                            # shared head: bias cancels
    torch.testing.assert_close(shared["bound"], 0.5 * shared["zeta"] * shared["logit_error"] ** 2)


def test_model_diagnostics_identity_and_pruned():
    dense = tiny_vit()
    data, labels = images(40), torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(0))
    same = representation_diagnostics(dense, copy.deepcopy(dense), data, labels, batch_size=16)
    assert same["kl"] == pytest.approx(0, abs=1e-12) and same["retention"] == 1.0
    assert all(c == pytest.approx(1.0, abs=1e-6) for c in same["block_cosine"].values())
    pruned = copy.deepcopy(dense)
    apply_masks(pruned, random_masks(dense, density=0.4))
    result = representation_diagnostics(dense, pruned, data, labels, batch_size=16)
    assert result["examples"] == 40 and list(result["block_cosine"]) == ["blocks.0", "blocks.1"]
    assert 0 < result["kl"] <= result["bound"] <= result["bound_certified"] <= result["bound_global"]
    assert result["head_change_gain"] == 0 and result["head_gain"] <= result["head_norm"]
    assert all(c < 1 for c in result["block_cosine"].values())
    # a loader of (images, labels) batches gives the same numbers as the tensors
    loader = [(data[i:i + 16], labels[i:i + 16]) for i in range(0, 40, 16)]
    from_loader = representation_diagnostics(dense, pruned, loader)
    for key in ("kl", "bound", "top1_model", "top1_dense"):
        assert from_loader[key] == pytest.approx(result[key], rel=1e-9)
    text = format_diagnostics(result, "pruned")
    assert "KL(dense || pruned)" in text and "block cosine" in text


def test_head_input_gives_the_logits():
    model = tiny_vit()
    head = classifier_head(model)
    captured = {}
    head.register_forward_pre_hook(lambda _m, inputs: captured.__setitem__("h", inputs[0]))
    with torch.no_grad():
        logits = model(images(3))
        pre_logits = model.forward_head(model.forward_features(images(3)), pre_logits=True)
    torch.testing.assert_close(captured["h"], pre_logits)
    torch.testing.assert_close(head(captured["h"]), logits)


def test_mobilenet_with_pruned_classifier_and_no_labels():
    dense = tiny_mobilenet()
    pruned = copy.deepcopy(dense)
    apply_masks(pruned, random_masks(dense, "conv_fc", density=0.6))            # the classifier is pruned too
    result = representation_diagnostics(dense, pruned, images(6, size=32), batch_size=4)
    assert result["head_change_gain"] > 0 and result["kl"] <= result["bound_certified"]
    assert result["top1_model"] != result["top1_model"]                          # NaN without labels
    assert len(result["block_cosine"]) == 13


def test_plots_write_png(tmp_path):
    before = {"blocks.0": 0.9, "blocks.1": 0.5}
    after = {"blocks.0": 0.99, "blocks.1": 0.95}
    plot_block_cosine(before, after, tmp_path / "cos.png")
    plot_block_cosine(None, after, tmp_path / "cos_after.png")
    stats = {"kl": 0.1, "bound": 0.2, "bound_certified": 0.3, "bound_global": 5.0, "zeta_points": 20}
    plot_kl_bound(stats, {**stats, "kl": 0.01}, tmp_path / "kl.png")
    for name in ("cos.png", "cos_after.png", "kl.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]           # no temporary left behind
