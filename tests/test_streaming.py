"""Hugging Face directories never whole in memory (``streaming``, ``models.hf_shards``, ``packed_masks``): a tiny
random Llama saved in 3 safetensors shards, pruned and healed block by block. The source holds one block at a
time (counted through the checkpoint's reads), the output's shards and index load in transformers with the
masked weights zero, masks from a pruned checkpoint's zeros equal the mask file's, bit-packed masks round
trip, and every mistake of the contract is one line before anything is read or written."""
import copy
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from starfish_fast.checkpoint import MASKS_FILE, file_kind, load_tensor_file, save_masks  # noqa: E402
from starfish_fast.masks import apply_masks  # noqa: E402
from starfish_fast.models.hf import load_healed_lm  # noqa: E402
from starfish_fast.models.hf_shards import INDEX_NAME, MaskFile, ShardedCheckpoint  # noqa: E402
from starfish_fast.packed_masks import pack, unpack  # noqa: E402
from starfish_fast.prune import magnitude_masks, nm_masks  # noqa: E402
from starfish_fast import streaming  # noqa: E402
from starfish_fast.streaming import HFShardSource, StreamedLM, block_masks, stream_prune  # noqa: E402

VOCAB = 96


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
                                         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                                         "max_position_embeddings": 64, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


def save_sharded(model, path):
    """``save_pretrained`` in exactly 3 safetensors shards (a size limit that splits the tiny model so)."""
    model.save_pretrained(path, max_shard_size="60KB")
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(shards) == 3 and (path / INDEX_NAME).is_file(), shards
    return path


@pytest.fixture
def dense(tmp_path):
    model = tiny_llama()
    return model, save_sharded(model, tmp_path / "dense")


def tokens(batch=2, length=9, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- packed masks
@pytest.mark.parametrize("shape", [(3, 5), (8, 16), (7,), (2, 3, 3, 3)])
def test_packed_masks_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack(packed, shape), mask)
    with pytest.raises(ValueError, match="uint8 bytes"):
        unpack(packed[:-1], shape)


def test_mask_files_packed_and_old_formats_read_alike(tmp_path):
    masks = {"a.weight": torch.rand(130, 70) < 0.5, "b.weight": torch.rand(4, 9) < 0.3}
    save_masks(masks, tmp_path / "new.safetensors", {"method": "test"})
    torch.save(masks, tmp_path / "old.pt")
    from safetensors.torch import save_file
    save_file({k: v for k, v in masks.items()}, str(tmp_path / "old_bool.safetensors"))
    save_file({k: v.to(torch.uint8) for k, v in masks.items()}, str(tmp_path / "old_01.safetensors"))
    assert os.path.getsize(tmp_path / "new.safetensors") < os.path.getsize(tmp_path / "old_bool.safetensors")
    for name in ("new.safetensors", "old.pt", "old_bool.safetensors", "old_01.safetensors"):
        loaded = load_tensor_file(tmp_path / name)
        per_key = MaskFile(tmp_path / name)
        assert per_key.shapes() == {k: tuple(v.shape) for k, v in masks.items()}, name
        for key, mask in masks.items():
            assert torch.equal(loaded[key].bool(), mask), name
            assert torch.equal(per_key.read(key), mask), name
    assert file_kind(tmp_path / "new.safetensors") == "masks"


# ----------------------------------------------------------------------------- streaming prune
@pytest.mark.parametrize("method", ["magnitude", "nm"])
def test_streaming_prune_equals_the_in_memory_makers(dense, tmp_path, method):
    model, path = dense
    lm = StreamedLM.open(path)
    out = tmp_path / "masks.safetensors"
    summary = stream_prune(lm, out, method, sparsity=0.5, n=2, m=4)
    expected = magnitude_masks(model, 0.5) if method == "magnitude" else nm_masks(model, 2, 4)
    found = load_tensor_file(out)
    assert set(found) == set(expected) and summary["sparsity"] == pytest.approx(0.5)
    for key, mask in expected.items():
        assert torch.equal(found[key], mask), key
    assert lm.weights.reads == len(expected)             # each scope weight read once, nothing else


@pytest.mark.parametrize("form", [dict(sparsity=0.5), dict(sparsity=None, n=2, m=4)])
def test_streaming_wanda_equals_the_in_memory_maker_one_layer_at_a_time(dense, tmp_path, form):
    from starfish_fast.prune import wanda_masks

    model, path = dense
    lm = StreamedLM.open(path)
    calib = [tokens(batch=3, length=11, seed=4), tokens(batch=3, length=11, seed=5)]
    out = tmp_path / "masks.safetensors"
    stream_prune(lm, out, "wanda", calib=calib, **form)
    expected = wanda_masks(model, form["sparsity"], torch.cat(calib), batch_size=3,
                           **{k: v for k, v in form.items() if k != "sparsity"})
    found = load_tensor_file(out)
    assert set(found) == set(expected)
    for key, mask in expected.items():
        assert torch.equal(found[key], mask), key
    assert all(p.is_meta for p in lm.skeleton.parameters())               # nothing of the model left held


# ----------------------------------------------------------------------------- healing block by block
def heal_by_hand(source, batch, steps=4):
    """open -> a few Adam steps of the per-token cosine on the masked weights -> close, block after block;
    the student's outputs carried forward. Returns each block's losses and which blocks' tensors were read
    while each block was open."""
    hidden, extra = source.stem(batch)
    losses, reads = [], []
    read = source.lm.weights.read
    for i in range(len(source)):
        seen = set()
        source.lm.weights.read = lambda key, seen=seen: (seen.add(key.split(".")[2]), read(key))[1]
        student, dense_block, masks = source.open(i)
        reads.append(seen)
        trained = [p for name, p in student.named_parameters() if p.requires_grad]
        assert {name for name, p in student.named_parameters() if p.requires_grad} == set(masks)
        optimizer = torch.optim.Adam(trained, lr=1e-3)
        with torch.no_grad():
            target = source.run(dense_block, hidden, extra)
        block_losses = []
        for _ in range(steps):
            out = source.run(student, hidden, extra)
            loss = (1 - torch.nn.functional.cosine_similarity(out, target, dim=-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            for name, p in student.named_parameters():
                if name in masks:
                    p.grad.mul_(masks[name])
            optimizer.step()
            block_losses.append(loss.item())
        losses.append(block_losses)
        with torch.no_grad():
            hidden = source.run(student, hidden, extra)
        source.close(i, student)
    source.lm.weights.read = read
    source.finish()
    return losses, reads


def test_heal_block_by_block_holds_one_block_and_writes_a_checkpoint_transformers_loads(dense, tmp_path):
    model, path = dense
    lm = StreamedLM.open(path)
    stream_prune(lm, tmp_path / "m.safetensors", "magnitude", sparsity=0.5)
    masks = block_masks(lm, mask_path=tmp_path / "m.safetensors")
    source = HFShardSource(lm, masks, tmp_path / "healed")
    losses, reads = heal_by_hand(source, tokens())
    block_size = sum(p.numel() for p in model.model.layers[0].parameters())
    assert source.peak_held == 2 * block_size            # one student block and its dense twin, never more
    assert [sorted(seen) for seen in reads] == [["0"], ["1"], ["2"]]   # open(i) read block i's tensors only
    assert all(block[-1] < block[0] for block in losses), losses
    files = sorted(os.listdir(tmp_path / "healed"))
    assert MASKS_FILE in files and INDEX_NAME in files and "config.json" in files
    assert len([f for f in files if f.startswith("model-")]) == len(source) + 1
    healed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "healed").eval()
    loaded, healed_masks = load_healed_lm(str(tmp_path / "healed"))
    expected = load_tensor_file(tmp_path / "m.safetensors")
    state, dense_state = healed.state_dict(), model.state_dict()
    assert set(healed_masks) == set(expected)
    for key, mask in expected.items():
        assert torch.equal(healed_masks[key], mask)
        assert not state[key][~mask].any(), key                   # masked positions exactly zero
        assert not torch.equal(state[key][mask], dense_state[key][mask]), key   # trained
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(state[key], dense_state[key])
    with torch.no_grad():
        assert torch.isfinite(healed(input_ids=tokens()).logits).all()


def test_stem_and_blocks_equal_the_models_own_forward(dense, tmp_path):
    """Dense blocks fed the dense stream reproduce the model's hidden states exactly (fp32)."""
    model, path = dense
    lm = StreamedLM.open(path)
    stream_prune(lm, tmp_path / "m.safetensors", "nm")
    source = HFShardSource(lm, block_masks(lm, mask_path=tmp_path / "m.safetensors"), tmp_path / "out")
    x = tokens()
    with torch.no_grad():
        own = model(input_ids=x, output_hidden_states=True).hidden_states
        hidden, extra = source.stem(x)
        torch.testing.assert_close(hidden, own[0], rtol=0, atol=0)
        for i in range(len(source) - 1):            # the last entry of hidden_states is after the final norm
            student, dense_block, _ = source.open(i)
            hidden = source.run(dense_block, hidden, extra)
            torch.testing.assert_close(hidden, own[i + 1], rtol=0, atol=0)
            source.close(i, student)
    source.abort()
    assert not (tmp_path / "out").exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".out")]


def test_masks_from_a_pruned_checkpoints_zeros_equal_the_mask_file(dense, tmp_path):
    model, path = dense
    masks = magnitude_masks(model, 0.5)
    save_masks(masks, tmp_path / "m.safetensors")
    pruned = tiny_llama()
    with torch.no_grad():
        for key, mask in masks.items():
            pruned.get_parameter(key).mul_(mask)
    save_sharded(pruned, tmp_path / "pruned")
    lm = StreamedLM.open(path)
    from_zeros = block_masks(lm, pruned=StreamedLM.open(tmp_path / "pruned"))
    from_file = block_masks(lm, mask_path=tmp_path / "m.safetensors")
    assert set(from_zeros.keys) == set(masks)
    for key in masks:
        assert torch.equal(from_zeros.read(key), from_file.read(key)), key
    # healing the pruned checkpoint against the dense one: the student starts from the pruned weights
    source = HFShardSource(StreamedLM.open(tmp_path / "pruned"), from_zeros, tmp_path / "healed",
                           dense=StreamedLM.open(path))
    heal_by_hand(source, tokens(), steps=1)
    _, healed_masks = load_healed_lm(str(tmp_path / "healed"))
    assert all(torch.equal(healed_masks[key], mask) for key, mask in masks.items())


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_perplexity_equals_the_whole_models(tmp_path, tied):
    """One decoder layer at a time, then the model's own norm and head: ``text.perplexity``'s number (strided,
    windows of two lengths), with masks applied as read; the skeleton is left on meta."""
    from starfish_fast.layer_walk import streamed_perplexity
    from starfish_fast.text import perplexity

    model = tiny_llama(tie_word_embeddings=tied)
    path = save_sharded(model, tmp_path / "dense")
    masks = magnitude_masks(model, 0.5)
    save_masks(masks, tmp_path / "m.safetensors")
    ids = torch.randint(0, VOCAB, (70,), generator=torch.Generator().manual_seed(2))
    lm = StreamedLM.open(path)
    for mask_file in (None, tmp_path / "m.safetensors"):
        expected = copy.deepcopy(model)
        if mask_file is not None:
            apply_masks(expected, masks)
        want = perplexity(expected, ids, seq_len=16, stride=12, batch_size=3)
        got = streamed_perplexity(lm, ids, 16, block_masks(lm, mask_path=mask_file) if mask_file else None,
                                  stride=12, batch_size=3)
        assert got.tokens == want.tokens and got.ppl == pytest.approx(want.ppl, rel=1e-5), (got, want)
    assert all(p.is_meta for p in lm.skeleton.parameters())


# ----------------------------------------------------------------------------- the contract's mistakes
def test_mistakes_are_one_line_before_anything_is_read(dense, tmp_path):
    model, path = dense
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Hugging Face model directory") as error:
        StreamedLM.open(tmp_path / "empty")
    assert "\n" not in str(error.value)
    index = json.loads((path / INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.rename(path / shard, tmp_path / shard)
    with pytest.raises(ValueError, match=f"1 of the 3 shards .* missing: {shard}"):
        StreamedLM.open(path)
    os.rename(tmp_path / shard, path / shard)
    lm = StreamedLM.open(path)
    masks = magnitude_masks(model, 0.5)
    key = next(iter(masks))
    masks[key] = masks[key][:, :-1]
    save_masks(masks, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=f"mask '{key}' has shape"):
        block_masks(lm, mask_path=tmp_path / "bad.safetensors")
    assert lm.weights.reads == 0


def test_joint_that_does_not_fit_names_both_sizes(dense, monkeypatch):
    _, path = dense
    lm = StreamedLM.open(path)
    monkeypatch.setattr(streaming, "available_memory", lambda device: 1000)
    with pytest.raises(ValueError, match=r"needs about .* GiB for a joint run .* has 0\.0 GiB free"):
        streaming.check_joint_fits(lm, "cpu")
    monkeypatch.setattr(streaming, "available_memory", lambda device: 2**40)
    streaming.check_joint_fits(lm, "cpu")


def test_heal_streaming_equals_the_in_memory_sequential_run(dense, tmp_path):
    """``heal_streaming`` (the sequential loop on HFShardSource) writes exactly the weights that ``heal`` with
    order="sequential" gives the model held in memory (fp32, exact mode), and the same per-block history."""
    from starfish_fast import HealConfig, heal
    from starfish_fast.data import as_batches
    from starfish_fast.masks import apply_masks
    from starfish_fast.streaming import heal_streaming

    model, path = dense
    lm = StreamedLM.open(path)
    stream_prune(lm, tmp_path / "m.safetensors", "magnitude", sparsity=0.5)
    masks = {key: mask.float() for key, mask in load_tensor_file(tmp_path / "m.safetensors").items()}
    calib = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(3))
    config = HealConfig(order="sequential", mode="exact", epochs=2, batch_size=4, lr=1e-3, device="cpu",
                        progress=False)
    source = HFShardSource(lm, block_masks(lm, mask_path=tmp_path / "m.safetensors"), tmp_path / "healed")
    streamed = heal_streaming(source, as_batches(calib, 4), config)
    pruned = tiny_llama()
    apply_masks(pruned, masks)
    in_memory = heal(pruned, tiny_llama(), masks, calib, config)
    assert source.peak_held == 2 * sum(p.numel() for p in model.model.layers[0].parameters())
    assert [h["loss"] for h in streamed.history] == [h["loss"] for h in in_memory.history]
    assert all(h["loss_last"] < h["loss_first"] for h in streamed.history)
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "healed").state_dict()
    for key, value in pruned.state_dict().items():
        assert torch.equal(written[key], value), key


# ----------------------------------------------------------------------------- the command line
@pytest.fixture
def text_lm(tmp_path):
    """A 3-shard tiny Llama directory with a tokenizer, and calibration and evaluation text."""
    import random

    from test_cli_lm import _tokenizer, _words_text

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(100)]
    for folder in ("calib", "eval"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "0.txt").write_text(_words_text(words, 1500, folder))
    tokenizer = _tokenizer(words)
    model = tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "llama", max_shard_size="60KB")
    assert (tmp_path / "llama" / INDEX_NAME).is_file()
    tokenizer.save_pretrained(tmp_path / "llama")
    return model, tmp_path


def test_cli_prune_and_recover_sequential_stream_a_sharded_directory(text_lm, capsys, monkeypatch):
    from starfish_fast import cli

    model, root = text_lm
    masks, out = root / "masks.safetensors", root / "run" / "healed"
    read = ShardedCheckpoint.read
    opened = []
    monkeypatch.setattr(ShardedCheckpoint, "read", lambda self, key: (opened.append(key), read(self, key))[1])
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the whole model was loaded")))
    assert cli.main(["prune", "--model-name", str(root / "llama"), "--method", "magnitude", "--sparsity", "0.5",
                     "--output", str(masks)]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.5)
    assert cli.main(["prune", "--model-name", str(root / "llama"), "--method", "wanda", "--sparsity", "0.5",
                     "--calib-text", str(root / "calib"), "--calib-sequences", "8", "--seq-len", "16",
                     "--output", str(root / "wanda.safetensors")]) == 0       # norms one decoder layer at a time
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.5)
    assert cli.main(["recover", "--model-name", str(root / "llama"), "--mask-path", str(masks), "--order", "sequential",
                     "--calib-text", str(root / "calib"), "--calib-sequences", "8", "--seq-len", "16",
                     "--eval-text", str(root / "eval"), "--epochs", "2", "--batch-size", "4", "--no-progress",
                     "--output-path", str(out)]) == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["order"] == "sequential (streamed)" and report["steps"] == 3 * 2 * 2
    assert set(report["perplexity"]) == {"dense", "pruned", "healed"}           # one decoder layer at a time
    assert "perplexity: dense" in printed.err and "healed block by block in 12 steps" in printed.err
    monkeypatch.undo()
    healed = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for key, mask in load_tensor_file(masks).items():
        assert not healed[key][~mask].any(), key


def test_cli_recover_a_pruned_directory_against_its_dense_one_without_a_mask_file(text_lm, capsys):
    """``recover --model-name PRUNED --dense-path DENSE --order sequential``: masks are the pruned weights'
    non-zeros, the student starts from the pruned weights; without --dense-path (or sequential order) one line."""
    from starfish_fast import cli

    model, root = text_lm
    masks = magnitude_masks(model, 0.5)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for key, mask in masks.items():
            pruned.get_parameter(key).mul_(mask)
    pruned.save_pretrained(root / "pruned", max_shard_size="60KB")
    for file in (root / "llama").iterdir():               # the tokenizer's files
        if not (root / "pruned" / file.name).exists():
            shutil.copy(file, root / "pruned" / file.name)
    out = root / "run" / "healed"
    capsys.readouterr()                                   # the save's progress bar
    recover = ["recover", "--model-name", str(root / "pruned"), "--calib-text", str(root / "calib"),
               "--calib-sequences", "8", "--seq-len", "16", "--epochs", "2", "--batch-size", "4", "--no-progress",
               "--output-path", str(out)]
    for extra, words in (([], "--mask-path is required"), (["--dense-path", str(root / "llama")], "--order sequential")):
        assert cli.main([*recover, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "run").exists()
    assert cli.main([*recover, "--dense-path", str(root / "llama"), "--order", "sequential"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["order"] == "sequential (streamed)" and report["steps"] == 3 * 2 * 2
    healed = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    _, healed_masks = load_healed_lm(str(out))
    for key, mask in masks.items():
        assert torch.equal(healed_masks[key], mask), key
        assert not healed[key][~mask].any(), key
        assert not torch.equal(healed[key], pruned.state_dict()[key]), key      # trained


def test_cli_contract_mistakes_are_one_line_and_exit_2(text_lm, capsys, monkeypatch):
    from starfish_fast import cli

    model, root = text_lm
    masks, out = root / "masks.safetensors", root / "run" / "healed"
    save_masks(magnitude_masks(model, 0.5), masks)
    recover = ["recover", "--model-name", str(root / "llama"), "--mask-path", str(masks), "--calib-text",
               str(root / "calib"), "--calib-sequences", "8", "--seq-len", "16", "--no-progress", "--output-path",
               str(out)]
    monkeypatch.setattr(streaming, "available_memory", lambda device: 1000)
    assert cli.main([*recover, "--order", "joint"]) == 2
    assert "needs about" in capsys.readouterr().err
    monkeypatch.undo()
    bad = magnitude_masks(model, 0.5)
    key = next(iter(bad))
    bad[key] = bad[key][:-1]
    save_masks(bad, root / "bad.safetensors")
    assert cli.main([*recover[:4], str(root / "bad.safetensors"), *recover[5:], "--order", "sequential"]) == 2
    assert f"mask '{key}' has shape" in capsys.readouterr().err
    shard = sorted(f for f in os.listdir(root / "llama") if f.startswith("model-"))[0]
    os.rename(root / "llama" / shard, root / shard)
    for argv in ([*recover, "--order", "sequential"],
                 ["prune", "--model-name", str(root / "llama"), "--method", "nm", "--output", str(root / "m2.pt")]):
        assert cli.main(argv) == 2
        assert f"missing: {shard}" in capsys.readouterr().err
    assert not (root / "run").exists() and not (root / "m2.pt").exists()
