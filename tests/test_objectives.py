"""Each healing objective's value and gradient against a direct formula on random tensors, and
the engine's objective selection (HealConfig / CLI)."""
import copy
import math

import pytest
import torch

from helpers import images, random_masks, tiny_vit
from starfish_fast import HealConfig, heal
from starfish_fast.cli import build_parser
from starfish_fast.objectives import OBJECTIVES, objective_loss

B, T, D, K = 3, 5, 8, 7


def _blocks(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    students = [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True) for s in shapes]
    teachers = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    return students, teachers


def _direct_cosine(students, teachers, per, weights=None):
    """Python loops over rows: 1 - <s, t> / (|s| |t|), mean over rows, (weighted) mean over blocks."""
    per_block = []
    for s, t in zip(students, teachers):
        rows = per if per != "auto" else ("token" if s.dim() == 3 else "sample")
        s_rows = s.reshape(-1, s.shape[-1]) if rows == "token" else s.reshape(s.shape[0], -1)
        t_rows = t.reshape(-1, t.shape[-1]) if rows == "token" else t.reshape(t.shape[0], -1)
        terms = [1 - torch.dot(a, b) / (a.norm() * b.norm()) for a, b in zip(s_rows, t_rows)]
        per_block.append(sum(terms) / len(terms))
    weights = weights or [1.0] * len(per_block)
    return sum(w * v for w, v in zip(weights, per_block)) / sum(weights)


def _direct_mse(students, teachers, weights=None):
    per_block = [sum(((a - b) ** 2).sum() for a, b in zip(s.flatten(), t.flatten())) / s.numel()
                 for s, t in zip(students, teachers)]
    weights = weights or [1.0] * len(per_block)
    return sum(w * v for w, v in zip(weights, per_block)) / sum(weights)


def _direct_kl(student_logits, teacher_logits):
    """KL(p_dense || p_pruned) per row by the definition, mean over the batch."""
    total = 0.0
    for s, t in zip(student_logits, teacher_logits):
        p, q = torch.exp(t) / torch.exp(t).sum(), torch.exp(s) / torch.exp(s).sum()
        total = total + sum(p[k] * torch.log(p[k] / q[k]) for k in range(len(p)))
    return total / len(student_logits)


def _direct_ce(student_logits, labels):
    return sum(-torch.log(torch.exp(s[y]) / torch.exp(s).sum()) for s, y in zip(student_logits, labels)) / len(labels)


def _check(value, direct, inputs):
    assert value.item() == pytest.approx(direct.item(), rel=1e-10, abs=1e-12)
    grads = torch.autograd.grad(value, inputs)
    direct_grads = torch.autograd.grad(direct, inputs)
    for g, dg in zip(grads, direct_grads):
        torch.testing.assert_close(g, dg, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("per", ["auto", "token", "sample"])
@pytest.mark.parametrize("weights", [None, (1.0, 3.0, 0.5)])
def test_starfish_value_and_gradient(per, weights):
    students, teachers = _blocks([(B, T, D)] * 2 + [(B, 2, 3, 4)], seed=1)
    if per == "token":       # a 4-D output has no tokens: token rows are its last axis
        students, teachers = students[:2], teachers[:2]
        weights = weights[:2] if weights else None
    value = objective_loss("starfish", student_reps=students, teacher_reps=teachers, per=per, block_weights=weights)
    _check(value, _direct_cosine(students, teachers, per, list(weights) if weights else None), students)


def test_starfish_per_sample_differs_from_per_token():
    students, teachers = _blocks([(B, T, D)], seed=2)
    token = objective_loss("starfish", student_reps=students, teacher_reps=teachers, per="token")
    sample = objective_loss("starfish", student_reps=students, teacher_reps=teachers, per="sample")
    assert not math.isclose(token.item(), sample.item(), rel_tol=1e-6)


@pytest.mark.parametrize("weights", [None, (2.0, 1.0)])
def test_mse_value_and_gradient(weights):
    students, teachers = _blocks([(B, T, D), (B, 4, 2, 2)], seed=3)
    value = objective_loss("mse", student_reps=students, teacher_reps=teachers, block_weights=weights)
    _check(value, _direct_mse(students, teachers, list(weights) if weights else None), students)


def test_kl_value_and_gradient():
    g = torch.Generator().manual_seed(4)
    student = (3 * torch.randn(B, K, generator=g, dtype=torch.float64)).requires_grad_(True)
    teacher = 3 * torch.randn(B, K, generator=g, dtype=torch.float64)
    value = objective_loss("kl", student_logits=student, teacher_logits=teacher)
    assert value.dtype == torch.float32                       # computed in fp32 (the engine's rule)
    direct = _direct_kl(student, teacher)
    assert value.item() == pytest.approx(direct.item(), rel=1e-5)
    grad, = torch.autograd.grad(value, student)
    # d KL / d s = (softmax(s) - softmax(t)) / B
    torch.testing.assert_close(grad, (student.softmax(-1) - teacher.softmax(-1)).detach() / B, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, torch.autograd.grad(direct, student)[0], rtol=1e-5, atol=1e-6)


def test_ce_value_and_gradient_uses_labels():
    g = torch.Generator().manual_seed(5)
    student = torch.randn(B, K, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 3, 6])
    value = objective_loss("ce", student_logits=student, labels=labels)
    direct = _direct_ce(student, labels)
    assert value.item() == pytest.approx(direct.item(), rel=1e-6)
    grad, = torch.autograd.grad(value, student)
    one_hot = torch.nn.functional.one_hot(labels, K).double()
    torch.testing.assert_close(grad, (student.softmax(-1) - one_hot).detach() / B, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        objective_loss("ce", student_logits=student)


def test_starfish_plus_kl_is_the_equal_mix():
    students, teachers = _blocks([(B, T, D)] * 2, seed=6)
    g = torch.Generator().manual_seed(7)
    student_logits = torch.randn(B, K, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher_logits = torch.randn(B, K, generator=g, dtype=torch.float64)
    value = objective_loss("starfish+kl", student_reps=students, teacher_reps=teachers, student_logits=student_logits,
                           teacher_logits=teacher_logits)
    direct = 0.5 * _direct_cosine(students, teachers, "auto") + 0.5 * _direct_kl(student_logits, teacher_logits)
    assert value.item() == pytest.approx(direct.item(), rel=1e-5)
    grads = torch.autograd.grad(value, students + [student_logits])
    direct_grads = torch.autograd.grad(direct, students + [student_logits])
    for a, b in zip(grads, direct_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)


def test_block_weights_must_match_the_blocks():
    students, teachers = _blocks([(B, T, D)] * 2, seed=8)
    with pytest.raises(ValueError, match="block weights"):
        objective_loss("starfish", student_reps=students, teacher_reps=teachers, block_weights=(1.0,))


# ----------------------------------------------------------------------------- the engine and CLI
def _heal(objective, labels=None, **overrides):
    dense = tiny_vit()
    pruned = copy.deepcopy(dense)
    masks = random_masks(dense, density=0.4)
    config = HealConfig(**{**dict(epochs=3, batch_size=8, lr=2e-3, objective=objective, progress=False,
                                  weight_decay=0.05), **overrides})
    return heal(pruned, dense, masks, images(16), config, labels=labels), pruned, masks


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_every_objective_heals_in_both_modes(objective, mode):
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0)) if objective == "ce" else None
    result, pruned, masks = _heal(objective, labels=labels, mode=mode)
    assert result.history[-1]["loss"] < result.history[0]["loss"], result.history
    for key, mask in masks.items():
        assert (pruned.state_dict()[key][~mask] == 0).all()


def test_block_weights_reach_the_engine():
    weighted, _, _ = _heal("starfish", block_weights=(0.0, 1.0))   # only the last block counts
    plain, _, _ = _heal("starfish")
    assert weighted.step_losses[0] != pytest.approx(plain.step_losses[0])


def test_objective_errors():
    with pytest.raises(ValueError, match="needs labels"):
        _heal("ce")
    with pytest.raises(ValueError, match="objective"):
        HealConfig(objective="cosine")


def test_cli_takes_every_objective():
    for objective in OBJECTIVES:
        args = build_parser().parse_args(["recover", "--model-name", "fashion_vit", "--mask-path", "m.pt",
                                          "--objective", objective])
        assert args.objective == objective


def test_a_new_objective_is_one_registry_entry(monkeypatch):
    """ARCHITECTURE.md's how-to: an objective added through the registry alone heals in both modes; the
    config accepts it, the teacher store keeps what it needs, the steps compute it."""
    import starfish_fast.objectives as objectives

    def smooth_l1(inputs):
        blocks = torch.stack([torch.nn.functional.smooth_l1_loss(s, t.to(s.dtype))
                              for s, t in zip(inputs.student_reps, inputs.teacher_reps)])       # (L,)
        return blocks.mean(), blocks.detach().float()

    entry = objectives.Objective("smooth_l1", "smooth L1 between block outputs", smooth_l1, needs_blocks=True)
    monkeypatch.setitem(objectives.OBJECTIVES, "smooth_l1", entry)
    args = build_parser().parse_args(["recover", "--model-name", "fashion_vit", "--mask-path", "m.pt",
                                      "--objective", "smooth_l1"])
    assert args.objective == "smooth_l1"
    for mode in ("fast", "exact"):
        result, pruned, masks = _heal("smooth_l1", mode=mode)
        assert result.history[-1]["loss"] < result.history[0]["loss"], result.history
        assert result.plan.teacher_store == "device"
        for key, mask in masks.items():
            assert (pruned.state_dict()[key][~mask] == 0).all()


def test_objective_names_are_spelled_in_one_module():
    """The objective names appear as string literals only in objectives.py (docstrings aside, and dictionary
    keys or subscripts, which name measured values such as diagnostics' "kl", not objectives)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "starfish_fast"
    names = set(OBJECTIVES)
    found = {}
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        keys = {id(key) for node in ast.walk(tree) if isinstance(node, ast.Dict) for key in node.keys} | \
               {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
        literals = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                    and node.value in names and id(node) not in docstrings | keys]
        if literals:
            found[str(path.relative_to(package))] = sorted(set(literals))
    assert set(found) == {"objectives.py"}, found


def test_readme_lists_every_objective():
    """The README's HealConfig row names the registry's objectives, in its order, with each one's help."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `objective` |"))
    meaning = row.split("|")[3]
    assert [name for name in re.findall(r"`([^`]+)`", meaning) if name in OBJECTIVES] == list(OBJECTIVES)
    for spec in OBJECTIVES.values():
        assert spec.help in meaning, spec.name
