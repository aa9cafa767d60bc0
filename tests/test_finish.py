"""The finish phase (``HealConfig.finish``: a block-local objective, then whole-model KL, each phase its own
learning-rate schedule and Adam): one ``heal`` call equals the two calls written out (exactly, fp32), ``auto``
picks KL only for a language model healed jointly, resume works in either phase, and the CLI accepts
and refuses it in one line."""
import copy
import json

import pytest
import torch

import starfish_fast.engine as engine
from starfish_fast import HealConfig, heal, resolve_plan
from starfish_fast.config import phase_configs, phase_path
from starfish_fast.masks import apply_masks
from starfish_fast.prune import magnitude_masks

from helpers import Crashed, images, tiny_vit
from lm_dist_worker import tiny_lm


def settings(**overrides) -> HealConfig:
    values = dict(epochs=4, batch_size=4, lr=3e-3, min_lr=1e-5, mode="fast", precision="fp32", progress=False,
                  log_every=1, device="cpu")
    return HealConfig(**{**values, **overrides})


def case():
    dense = tiny_lm("llama")
    masks = magnitude_masks(dense, 0.5)
    calib = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(3))
    return dense, masks, calib


def pruned_copy(dense, masks):
    model = copy.deepcopy(dense)
    apply_masks(model, masks)
    return model


def test_one_call_equals_the_two_phases_written_out(tmp_path):
    dense, masks, calib = case()
    together = pruned_copy(dense, masks)
    files = dict(metrics_path=str(tmp_path / "run.metrics.jsonl"), plot_path=str(tmp_path / "run.loss.png"))
    result = heal(together, dense, masks, calib, settings(finish="kl", **files))
    apart = pruned_copy(dense, masks)
    first = heal(apart, dense, masks, calib, settings(epochs=2, finish="none"))
    second = heal(apart, dense, masks, calib, settings(epochs=2, objective="kl", finish="none"))
    for (key, a), b in zip(together.state_dict().items(), apart.state_dict().values()):
        assert torch.equal(a, b), key
    for key, mask in masks.items():
        assert (together.state_dict()[key][~mask] == 0).all(), key
    assert result.step_losses == first.step_losses + second.step_losses
    assert [(h["epoch"], h["objective"]) for h in result.history] == \
        [(1.0, "starfish"), (2.0, "starfish"), (3.0, "kl"), (4.0, "kl")]
    assert result.steps == first.steps + second.steps and result.plan.finish == "kl"
    assert len(result.ran["phases"]) == 2
    records = [json.loads(line) for line in open(files["metrics_path"])]      # one file, both phases
    assert [(r["step"], r["objective"]) for r in records if r["type"] == "step"] == \
        [(step, "starfish" if step <= 4 else "kl") for step in range(1, 9)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.loss.png", "run.metrics.jsonl"]


def test_auto_finishes_a_language_model_healed_jointly_only():
    dense, masks, calib = case()
    batches = list(calib.split(4))

    def finish(model, data, **overrides):
        plan = resolve_plan(settings(**overrides), model, calib=data, masks=masks if model is dense else None)
        return plan.finish, plan.reasons["finish"]

    assert finish(dense, batches)[0] == "kl"
    assert finish(dense, batches, mode="exact")[0] == "kl"              # the recipe, not the step semantics
    assert finish(dense, batches, order="sequential")[1] == "auto: none: sequential order holds one block at a time"
    assert finish(dense, batches, epochs=1)[1] == "auto: none: too few epochs to split in two phases"
    assert finish(dense, batches, objective="kl")[1] == "auto: none: the objective is not block-local"
    assert finish(tiny_vit(), [images(4)])[1] == "auto: none: measured on language models only"
    assert finish(tiny_vit(), [images(4)], finish="kl")[0] == "kl"          # asked for: any model
    with pytest.raises(ValueError, match="finish='kl' splits the epochs in two phases: epochs=1 with"):
        settings(epochs=1, finish="kl")
    with pytest.raises(ValueError, match="finish_share must be between 0 and 1"):
        settings(finish_share=1.0)


def test_phase_files_sit_beside_the_run_files():
    config = settings(finish="kl", epochs=5, finish_share=0.4, checkpoint_every=1, checkpoint_path="out/a.resume",
                      metrics_path="out/a.metrics.jsonl")
    first, second = phase_configs(config, "kl")
    assert (first.epochs, first.objective, second.epochs, second.objective) == (3, "starfish", 2, "kl")
    assert (first.checkpoint_path, second.checkpoint_path) == ("out/a.resume", "out/a.finish.resume")
    assert second.metrics_path == "out/a.metrics.finish.jsonl" and second.plot_path is None
    assert phase_path("run.d/resume") == "run.d/resume.finish"


@pytest.mark.parametrize("phase, at", [("run.resume", 3), ("run.finish.resume", 2)])
def test_resume_in_either_phase_equals_an_uninterrupted_run(tmp_path, monkeypatch, phase, at):
    dense, masks, calib = case()
    uninterrupted = pruned_copy(dense, masks)
    full = heal(uninterrupted, dense, masks, calib, settings(finish="kl"))
    resumable = settings(finish="kl", checkpoint_every=1, checkpoint_path=str(tmp_path / "run.resume"), resume=True)
    save_resume = engine.save_resume

    def save_then_crash(path, state):           # the crash comes in the phase whose checkpoint is ``phase``
        save_resume(path, state)
        if path == str(tmp_path / phase) and state["step"] == at:
            raise Crashed

    monkeypatch.setattr(engine, "save_resume", save_then_crash)
    with pytest.raises(Crashed):
        heal(pruned_copy(dense, masks), dense, masks, calib, resumable)
    monkeypatch.setattr(engine, "save_resume", save_resume)
    resumed = pruned_copy(dense, masks)
    result = heal(resumed, dense, masks, calib, resumable)
    for (key, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    assert result.step_losses == full.step_losses
