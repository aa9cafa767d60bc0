"""Sequential order (block after block, starfish_fast/sequential.py) on the bundled ViT and a tiny random Llama:
each block's loss goes down, masked weights stay zero, the result equals a block-by-block loop written plainly
here (exactly, fp32), resume mid-block and at a block boundary equals an uninterrupted run, the dense-inputs
option, ``order="auto"`` from the joint run's size estimate, and objectives that are not block-local refused."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F

import starfish_fast.probe as probe_module
import starfish_fast.sequential as sequential
from starfish_fast import HealConfig, heal, load_bundled_model, resolve_plan, rules
from starfish_fast.masks import apply_masks
from starfish_fast.prune import magnitude_masks

from helpers import crash_after_saving
from lm_dist_worker import tiny_lm


# ----------------------------------------------------------------------------- the plain reference
def vit_stem(model, images):
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images)))), {}


def llama_stem(model, tokens):
    from transformers.masking_utils import create_causal_mask

    base = model.model
    hidden = base.embed_tokens(tokens)                                              # (B, T, D)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)                          # (1, T)
    mask = create_causal_mask(config=base.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                              position_ids=positions)
    return hidden, {"attention_mask": mask, "position_embeddings": base.rotary_emb(hidden, position_ids=positions),
                    "position_ids": positions}


def cosine_per_token(student, teacher):
    s = F.normalize(student.reshape(-1, student.shape[-1]), dim=1)                 # (B*T, D)
    t = F.normalize(teacher.reshape(-1, teacher.shape[-1]), dim=1)
    return (1 - (s * t).sum(1)).mean()


def reference_sequential(pruned, dense, masks, batches, blocks, stem, config, train_mode):
    """Block by block: targets = the dense block on the dense stream, inputs = the healed student's stream (or
    the dense one), torch Adam with gradients masked, cosine schedule per block, masks re-applied."""
    with torch.no_grad():
        stems = [stem(pruned, b) for b in batches]
    student_in, dense_in = [h for h, _ in stems], [h for h, _ in stems]
    extras = [e for _, e in stems]
    losses = []
    for name in blocks:
        student, teacher = pruned.get_submodule(name), dense.get_submodule(name)
        with torch.no_grad():
            targets = [teacher(h, **e) for h, e in zip(dense_in, extras)]
        inputs = dense_in if config.sequential_inputs == "dense" else student_in
        prefix = name + "."
        own = {key[len(prefix):]: mask.float() for key, mask in masks.items() if key.startswith(prefix)}
        params = [student.get_parameter(key) for key in own]
        optimizer = torch.optim.Adam(params, lr=config.lr, foreach=False)
        steps = config.epochs * len(batches)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=config.min_lr)
        student.train(train_mode)
        for step in range(steps):
            i = step % len(batches)
            loss = cosine_per_token(student(inputs[i], **extras[i]), targets[i])
            optimizer.zero_grad()
            loss.backward()
            for key, param in zip(own, params):
                param.grad.mul_(own[key])
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for key, param in zip(own, params):
                    param.mul_(own[key])
            losses.append(loss.item())
        student.eval()
        with torch.no_grad():
            student_in = [student(h, **e) for h, e in zip(inputs, extras)]
        dense_in = targets
    return losses


# ----------------------------------------------------------------------------- cases
def vit_case():
    dense = load_bundled_model()[0]
    return dense, magnitude_masks(dense, 0.6), torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(1)), \
        vit_stem, [f"blocks.{i}" for i in range(len(dense.blocks))], True


def llama_case():
    dense = tiny_lm("llama")
    tokens = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(3))
    return dense, magnitude_masks(dense, 0.5), tokens, llama_stem, [f"model.layers.{i}" for i in range(3)], False


CASES = {"vit": vit_case, "llama": llama_case}


def settings(**overrides):
    values = dict(order="sequential", mode="exact", teacher_dtype="fp32", epochs=2, batch_size=4, lr=3e-3,
                  min_lr=1e-5, progress=False, log_every=1, device="cpu")
    return HealConfig(**{**values, **overrides})


def pruned_copy(dense, masks):
    pruned = copy.deepcopy(dense)
    apply_masks(pruned, masks)
    return pruned


@pytest.mark.parametrize("inputs", ["student", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_sequential_equals_a_plain_block_by_block_loop(case, inputs):
    dense, masks, calib, stem, blocks, train_mode = CASES[case]()
    config = settings(sequential_inputs=inputs)
    healed = pruned_copy(dense, masks)
    result = heal(healed, dense, masks, calib, config)
    reference = pruned_copy(dense, masks)
    expected = reference_sequential(reference, dense, masks, list(calib.split(config.batch_size)), blocks, stem,
                                    config, train_mode)
    assert result.plan.order == "sequential" and result.ran["order"] == "sequential"
    assert result.step_losses == expected
    for key, value in reference.state_dict().items():
        assert torch.equal(healed.state_dict()[key], value), key
    for key, mask in masks.items():
        assert (healed.state_dict()[key][~mask] == 0).all(), key
    assert [h["name"] for h in result.history] == blocks
    for record in result.history:                     # every block's loss goes down
        assert record["loss_last"] < record["loss_first"], record


@pytest.mark.parametrize("case", list(CASES))
def test_fast_mode_heals_each_block_and_keeps_masks_zero(case):
    dense, masks, calib, *_ = CASES[case]()
    healed = pruned_copy(dense, masks)
    result = heal(healed, dense, masks, calib, settings(mode="fast", precision="fp32", objective="mse"))
    assert len(result.history) == len(result.plan.blocks) and result.steps == len(result.step_losses)
    for record in result.history:
        assert record["loss_last"] < record["loss_first"], record
    for key, mask in masks.items():
        assert (healed.state_dict()[key][~mask] == 0).all(), key


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("where", ["mid_block", "block_end"])
def test_resume_equals_an_uninterrupted_run(tmp_path, where, mode):
    dense, masks, calib, *_ = llama_case()
    config = settings(mode=mode, precision="fp32")
    uninterrupted = pruned_copy(dense, masks)
    full = heal(uninterrupted, dense, masks, calib, config)
    per_block = full.steps // len(full.history)
    interrupt_at = per_block + 1 if where == "mid_block" else per_block          # in block 2, or at its start
    checkpoint = tmp_path / "run.resume"
    resumable = settings(mode=mode, precision="fp32", checkpoint_every=1, checkpoint_path=str(checkpoint),
                         resume=True)
    with crash_after_saving(sequential, interrupt_at):
        heal(pruned_copy(dense, masks), dense, masks, calib, resumable)
    resumed_model = pruned_copy(dense, masks)
    resumed = heal(resumed_model, dense, masks, calib, resumable)
    assert resumed.step_losses == full.step_losses
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="refusing to resume.*settings differ: order"):
        heal(pruned_copy(dense, masks), dense, masks, calib, settings(order="joint", finish="none", mode=mode,
                                                                      precision="fp32", checkpoint_path=str(checkpoint), resume=True))


def test_auto_order_follows_the_joint_estimate(monkeypatch):
    dense, masks, calib, *_ = llama_case()
    pruned = pruned_copy(dense, masks)
    batches = list(calib.split(4))
    fits = resolve_plan(settings(order="auto"), pruned, calib=batches)
    assert fits.order == "joint" and fits.reasons["order"].startswith("auto: joint: a joint run needs about")
    monkeypatch.setattr(probe_module, "host_available_bytes", lambda: 1 << 10)      # a made-up 1 KiB machine
    tight = resolve_plan(settings(order="auto"), pruned, calib=batches)
    assert tight.order == "sequential" and tight.reasons["order"].startswith("auto: sequential")
    assert "0.00 GiB free" in tight.reasons["order"]
    result = heal(pruned, dense, masks, calib, settings(order="auto"))
    assert result.plan.order == "sequential" and len(result.history) == 3
    kl = resolve_plan(settings(order="auto", objective="kl"), pruned, calib=batches)
    assert kl.order == "joint" and "needs the whole model" in kl.reasons["order"]


def test_the_order_rule_and_the_estimate():
    weights, trained, teacher = 1000, 300, 50
    assert rules.joint_bytes(weights, trained, teacher) == 2 * 1000 + 300 * (4 + 8) + 50
    assert rules.joint_bytes(weights, trained, 0, moment_bytes=2) == 2 * 1000 + 300 * (4 + 4)
    assert rules.order_rule("auto", "starfish", True, 10 << 30, 20 << 30)[0] == "joint"
    assert rules.order_rule("auto", "starfish", True, 30 << 30, 20 << 30)[0] == "sequential"
    assert rules.order_rule("joint", "starfish", True, 30 << 30, 20 << 30) == ("joint", "requested")
    assert rules.order_rule("auto", "kl", False, 30 << 30, 20 << 30)[0] == "joint"


def test_objectives_that_are_not_block_local_are_refused():
    for name in ("kl", "ce", "starfish+kl"):
        with pytest.raises(ValueError, match=rf"HealConfig.objective='{re.escape(name)}' cannot heal in "
                                             r"order='sequential'.*allowed: starfish, mse"):
            HealConfig(order="sequential", objective=name)
    with pytest.raises(ValueError, match="HealConfig.order='backwards'; allowed: joint, sequential, auto"):
        HealConfig(order="backwards")
    with pytest.raises(ValueError, match="HealConfig.sequential_inputs='teacher'; allowed: student, dense"):
        HealConfig(sequential_inputs="teacher")
    with pytest.raises(ValueError, match="block_weights"):
        HealConfig(order="sequential", block_weights="adaptive")


# ----------------------------------------------------------------------------- other families, stores
class Unit(torch.nn.Module):
    """A residual conv unit: what the generic adapter finds as a block."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


def tiny_cnn(transition: bool = False):
    torch.manual_seed(0)
    units = [Unit(8), Unit(8), *([torch.nn.Conv2d(8, 8, 1)] if transition else []), Unit(8), Unit(8)]
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Sequential(*units),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()


def test_gpt2_and_a_generic_cnn_heal_block_by_block():
    calib = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(3))
    images = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    for dense, data in ((tiny_lm("gpt2"), calib), (tiny_cnn(), images)):
        masks = magnitude_masks(dense, 0.5)
        healed = pruned_copy(dense, masks)
        result = heal(healed, dense, masks, data, settings(mode="fast", precision="fp32", epochs=3))
        assert len(result.history) == len(result.plan.blocks) >= 2
        for record in result.history:
            assert record["loss_last"] < record["loss_first"], record
        for key, mask in masks.items():
            assert (healed.state_dict()[key][~mask] == 0).all(), key


def test_blocks_that_do_not_feed_each_other_are_refused():
    dense = tiny_cnn(transition=True)
    masks = magnitude_masks(dense, 0.5)
    with pytest.raises(ValueError, match=r"sequential order: 1\.3 does not take 1\.1's output as its input"):
        heal(pruned_copy(dense, masks), dense, masks, torch.randn(4, 3, 8, 8), settings())


def test_the_streams_on_disk_give_the_streams_in_memory(tmp_path):
    dense, masks, calib, *_ = llama_case()
    runs = {}
    for store in ("device", "disk"):
        healed = pruned_copy(dense, masks)
        result = heal(healed, dense, masks, calib, settings(teacher_store=store, teacher_dir=str(tmp_path)))
        runs[store] = (result, healed.state_dict())
        assert result.ran["stream_store"] == store
    assert runs["disk"][0].step_losses == runs["device"][0].step_losses
    for key, value in runs["device"][1].items():
        assert torch.equal(runs["disk"][1][key], value), key
