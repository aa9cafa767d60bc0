"""The command line as a new user meets it (issue 27), and the one command path for images and text (issue
25): subprocess runs where the words, line counts and exit codes are what is tested, in-process runs where
what ran before a refusal is counted. A tiny random Llama stands for a language model (test_cli_lm's)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from starfish_fast import cli, commands_lm
from starfish_fast.data import FASHION_MNIST_DIR

transformers = pytest.importorskip("transformers", reason="needs the lm extra: .venv/bin/pip install -e .[lm]")
from test_cli_lm import HEAL, TEXT, lm  # noqa: E402,F401  (the tiny models' fixture)

ROOT = Path(__file__).resolve().parents[1]
needs_fashion = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="needs dataset-fashion-mnist")
# runs the CLI in a fresh interpreter and says whether torch was imported by the time it returned
WRAPPER = ("import sys; from starfish_fast import cli; code = cli.main(sys.argv[1:]); "
           "print('torch imported' if 'torch' in sys.modules else 'torch never imported'); sys.exit(code)")


def _cli(*argv, wrapper: bool = False):
    command = [sys.executable, "-c", WRAPPER] if wrapper else [sys.executable, "-m", "starfish_fast"]
    return subprocess.run([*command, *map(str, argv)], capture_output=True, text=True, timeout=300, cwd=ROOT)


def _errors(proc) -> list[str]:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert all(line.startswith("starfish-fast ") and ": error: " in line for line in lines), proc.stderr
    return lines


def _recover_lm(lm, output, *extra):
    return ["recover", "--model-name", lm["llama"], "--mask-path", lm["llama_masks"], "--calib-text", lm["calib"],
            "--eval-text", lm["eval"], *TEXT, *HEAL, "--output-path", output, *extra]


# ----------------------------------------------------------------------------- issue 25: one command path
def test_every_command_runs_on_an_image_model_and_a_language_model_through_one_path(lm, tmp_path, capsys,
                                                                                      monkeypatch):
    """prune, recover, eval and blocks on the bundled ViT and on a tiny Llama: each command's one function
    runs for both, with the modality object the model chose."""
    from starfish_fast import commands

    seen = []
    for name in ("run_recover", "run_eval", "run_prune", "run_blocks"):
        original = getattr(commands, name)
        monkeypatch.setattr(commands, name, lambda args, kind, _f=original, _n=name: seen.append(
            (_n, type(kind).__name__)) or _f(args, kind))
    runs = [["prune", "--model-name", lm["llama"], "--method", "magnitude", "--sparsity", "0.5", "--output",
             tmp_path / "lm.pt"],
            _recover_lm(lm, tmp_path / "healed"),
            ["eval", "--model-name", tmp_path / "healed", "--eval-text", lm["eval"], "--seq-len", "32", "--no-progress"],
            ["blocks", "--model-name", lm["llama"]]]
    if Path(FASHION_MNIST_DIR).is_dir():
        runs += [["prune", "--model-name", "fashion_vit", "--sparsity", "0.5", "--output", tmp_path / "vit.pt"],
                 ["recover", "--model-name", "fashion_vit", "--mask-path", tmp_path / "vit.pt", "--calib-source",
                  "train", "--calib-samples", "32", "--epochs", "1", "--eval-samples", "100", "--output-path",
                  tmp_path / "vit" / "r.pt", "--no-progress"],
                 ["eval", "--model-name", "fashion_vit", "--checkpoint", tmp_path / "vit" / "r.pt", "--eval-samples",
                  "100", "--no-progress"],
                 ["blocks", "--model-name", "fashion_vit"]]
    for argv in runs:
        assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
        json.loads(capsys.readouterr().out)
    kinds = {name: {kind for n, kind in seen if n == name} for name, _ in seen}
    expected = {"Text", "Images"} if Path(FASHION_MNIST_DIR).is_dir() else {"Text"}
    assert all(found == expected for found in kinds.values()) and len(kinds) == 4, seen


def test_wrong_modality_flags_are_refused_from_their_metadata(lm):
    """Every flag of the other modality given is one line, found from the flag's declared modality: each
    image-only flag of recover to a language model, each text-only flag to an image model."""
    from starfish_fast.checks import IMAGES, TEXT as TEXT_KIND
    from starfish_fast.commands_images import Images
    from starfish_fast.commands_lm import Text

    flags = cli.build_parser().commands["recover"].flags
    image_only = [dest for dest, flag in flags.items() if flag.modality == IMAGES]
    text_only = [dest for dest, flag in flags.items() if flag.modality == TEXT_KIND]
    assert {"fashion_mnist", "calib_dir", "eval_dir", "calib_samples", "export", "model_kwargs"} <= set(image_only)
    assert {"calib_text", "eval_text", "seq_len", "calib_sequences", "eval_tokens", "stride"} <= set(text_only)
    args = cli.build_parser().parse_args(["recover", "--model-name", "m", "--mask-path", "x"])
    for dest in image_only + text_only:
        setattr(args, dest, "given")
    text_lines = Text.foreign_flags(Text.__new__(Text), args, flags)
    image_lines = Images.foreign_flags(Images.__new__(Images), args, flags)
    assert len(text_lines) == len(image_only) and all("is for image models" in line for line in text_lines)
    assert len(image_lines) == len(text_only) and all("is for language models" in line for line in image_lines)


# ----------------------------------------------------------------------------- issue 27
def test_1_readme_commands_run_in_a_fresh_shell():
    readme = (ROOT / "README.md").read_text()
    bare = [line for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) for line in block.splitlines()
            if re.match(r"\s*(pip|starfish-fast|python|torchrun) ", line)]
    assert not bare, bare


@needs_fashion
def test_2_every_mistake_at_once_images(tmp_path):
    lines = _errors(_cli("recover", "--model-name", "fashion_vit", "--mask-path", tmp_path / "missing.pt",
                         "--epochs", "-3", "--lr", "-1"))
    assert len(lines) == 3 and any("--epochs" in line for line in lines) and any("--lr" in line for line in lines)
    assert any("--mask-path" in line and "missing.pt" in line for line in lines)


def test_2_every_mistake_at_once_language_model(lm, tmp_path):
    lines = _errors(_cli("recover", "--model-name", lm["llama"], "--mask-path", tmp_path / "missing.pt",
                         "--calib-text", tmp_path / "no_text", "--epochs", "-1"))
    assert len(lines) == 3
    for words in ("--mask-path", "--calib-text", "--epochs"):
        assert sum(words in line for line in lines) == 1, (words, lines)


@pytest.mark.parametrize("extra,flag", [(["--seq-len", "0"], "--seq-len"), (["--epochs", "-1"], "--epochs"),
                                        (["--calib-text", "/nowhere/at/all"], "--calib-text")])
def test_3_cheap_mistakes_are_refused_before_torch_is_imported(lm, tmp_path, extra, flag):
    argv = _recover_lm(lm, tmp_path / "healed")
    for key in extra[::2]:
        if key in argv:
            del argv[argv.index(key):argv.index(key) + 2]
    proc = _cli(*argv, *extra, wrapper=True)
    assert proc.returncode == 2 and "torch never imported" in proc.stdout, proc.stdout + proc.stderr
    assert flag in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_3_device_and_resume_are_refused_before_the_text_is_tokenized(lm, tmp_path, capsys, monkeypatch):
    reads = []
    monkeypatch.setattr(commands_lm, "load_hf_tokenizer", lambda name: reads.append(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main([str(a) for a in _recover_lm(lm, tmp_path / "healed", "--device", "cuda")]) == 2
    assert "--device" in capsys.readouterr().err and reads == []


@pytest.mark.parametrize("argv,words", [(["--mode", "fsat"], ["--mode", "'fsat'", "fast", "exact"]),
                                        (["--epochs", "ten"], ["--epochs", "'ten'", "whole number"])])
def test_4_argparse_errors_are_one_line(argv, words):
    proc = _cli("recover", "--model-name", "fashion_vit", "--mask-path", "m.pt", *argv)
    line, = _errors(proc)
    assert all(word in line for word in words) and "see starfish-fast recover --help" in line
    # not an argparse error since a pruned language model directory may stand for its masks: the validation's line
    line, = _errors(_cli("recover", "--model-name", "fashion_vit"))
    assert "--mask-path is required" in line and "starfish-fast prune writes them" in line


def test_5_progress_moves_every_step_and_says_what_it_reads(lm, tmp_path, capsys, caplog, monkeypatch):
    import logging

    import starfish_fast.progress as progress

    counts, bars = [], []

    class Bar(progress.tqdm):
        def update(self, n=1):
            super().update(n)
            if self.desc.startswith("heal"):
                counts.append(self.n)
                if self.desc not in bars:
                    bars.append(self.desc)

    monkeypatch.setattr(progress, "tqdm", Bar)
    caplog.set_level(logging.INFO, logger="starfish_fast")
    argv = [str(a) for a in _recover_lm(lm, tmp_path / "healed") if a != "--no-progress"]
    assert cli.main(argv) == 0
    # every step, though log_every 10 > 8 steps; a language model's two phases (finish auto), one bar each
    assert counts == [*range(1, 5), *range(1, 5)] and bars == ["heal (fast, starfish)", "heal (fast, kl)"]
    assert "seq/s" in capsys.readouterr().err
    assert "reading and tokenizing the text" in caplog.text
    records = [json.loads(line) for line in Path(f"{tmp_path / 'healed'}.metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    assert steps and all("sequences_per_s" in r and "images_per_s" not in r for r in steps)


def test_5_no_progress_silences_the_gguf_conversion_bar():
    from transformers import modeling_gguf_pytorch_utils as gguf

    with commands_lm.library_bars(False):
        assert gguf.tqdm([1, 2]).disable
    assert gguf.tqdm is not None and not isinstance(gguf.tqdm, type(commands_lm.library_bars))


def test_6_a_healed_directory_without_its_tokenizer_says_how_to_give_one(lm, tmp_path):
    from starfish_fast.checkpoint import save_pretrained_with_masks
    from starfish_fast.masks import apply_masks

    model = transformers.AutoModelForCausalLM.from_pretrained(lm["llama"])
    masks = {k: v.float() for k, v in torch.load(lm["llama_masks"], weights_only=True).items()}
    apply_masks(model, masks)
    save_pretrained_with_masks(model, tmp_path / "bare", masks)                  # the README's Python, no tokenizer
    argv = _recover_lm(lm, tmp_path / "out")
    argv[argv.index("--model-name") + 1] = tmp_path / "bare"
    line, = _errors(_cli(*argv))
    assert "no tokenizer files" in line and "tokenizer.save_pretrained" in line and line.endswith("there")


def test_7_fewer_sequences_than_the_batch_warns_once_and_records_what_ran(lm, tmp_path, caplog):
    argv = [str(a) for a in _recover_lm(lm, tmp_path / "healed", "--calib-sequences", "6", "--batch-size", "32")]
    assert cli.main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "--batch-size 32" in warnings[0] and "6 calibration sequences" in warnings[0]
    assert json.loads(Path(f"{tmp_path / 'healed'}.json").read_text())["config"]["batch_size"] == 6


def test_8_cli_words_healed_label_and_mask_directory(lm, tmp_path, capsys):
    line, = _errors(_cli("prune", "--model-name", "fashion_vit", "--sparsity", "50", "--output", tmp_path / "m.pt"))
    assert "--sparsity" in line and "50" in line
    lines = _errors(_cli("recover", "--model-name", "fashion_vit", "--mask-path", "m.pt", "--epochs", "0"))
    assert not any("HealConfig" in line for line in lines) and any("--epochs" in line for line in lines)
    assert cli.main([str(a) for a in _recover_lm(lm, tmp_path / "healed")]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--model-name", str(tmp_path / "healed"), "--eval-text", lm["eval"], "--seq-len", "32",
                     "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"].startswith("healed") and "dense_weights" not in report
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert cli.main(["eval", "--model-name", lm["llama"], "--mask-path", str(tmp_path / "healed"), "--eval-text",
                     lm["eval"], "--seq-len", "32", "--no-progress"]) == 0           # the directory's masks
    assert json.loads(capsys.readouterr().out)["mask_density"] == pytest.approx(0.5, abs=0.01)


def test_8_an_image_export_as_language_model_masks_is_named_for_what_it_is(lm, tmp_path, capsys):
    from starfish_fast.bundled import load_bundled_model
    from starfish_fast.checkpoint import export_dense
    from starfish_fast.prune import magnitude_masks

    model, _ = load_bundled_model()
    export_dense(model, magnitude_masks(model, 0.5, "qkv_out_mlp"), tmp_path / "vit.safetensors")
    argv = _recover_lm(lm, tmp_path / "healed")
    argv[argv.index("--mask-path") + 1] = tmp_path / "vit.safetensors"
    assert cli.main([str(a) for a in argv]) == 2
    line = capsys.readouterr().err.strip()
    assert "image model's weights export" in line and "--dense-path" not in line


def test_9_recover_help_groups_every_flag_by_modality():
    text = _cli("recover", "--help").stdout
    sections = re.split(r"\n(?=\S[^\n]*:\n)", text)
    flags = cli.build_parser().commands["recover"].flags
    for dest, flag in flags.items():
        if flag.modality:
            title = "image models only:" if flag.modality == "images" else "language models only:"
            section = next(s for s in sections if re.search(rf"\n  {re.escape(flag.option)}([ ,\n]|$)", s))
            assert section.startswith(title), (flag.option, section[:60])
    shared = next(s for s in sections if s.startswith("healing"))
    assert "images or text sequences" in " ".join(shared.split())
    assert "(default: ILSVRC/imagenet-1k)" not in text


def test_10_recover_and_eval_end_with_a_line_a_person_reads(lm, tmp_path, capsys):
    assert cli.main([str(a) for a in _recover_lm(lm, tmp_path / "healed")]) == 0
    captured = capsys.readouterr()
    report, last = json.loads(captured.out), captured.err.strip().splitlines()[-1]
    ppl = report["perplexity"]
    assert last.startswith(f"perplexity: dense {ppl['dense']:.2f} -> pruned {ppl['pruned']:.2f} -> healed "
                           f"{ppl['healed']:.2f}") and f"written to {tmp_path / 'healed'}" in last
    if abs(ppl["dense"] - ppl["pruned"]) > 1e-3 * ppl["dense"]:     # a gap to close (random tiny models: barely)
        share = (ppl["healed"] - ppl["pruned"]) / (ppl["dense"] - ppl["pruned"])
        assert f", {share:.0%} of the gap closed" in last
    assert cli.main(["eval", "--model-name", str(tmp_path / "healed"), "--eval-text", lm["eval"], "--seq-len", "32",
                     "--no-progress"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"perplexity {ppl['healed']:.2f} on ") and "healed" in last and "sparsity 50%" in last


def test_11_the_plan_says_the_expected_memory_and_resume_size(lm, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="starfish_fast")
    assert cli.main([str(a) for a in _recover_lm(lm, tmp_path / "healed", "--checkpoint-every", "4")]) == 0
    line = next(r.getMessage() for r in caplog.records if "expected: peak memory about" in r.getMessage())
    params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(lm["llama"]).parameters())
    masked = sum(m.numel() for m in torch.load(lm["llama_masks"], weights_only=True).values())
    assert f"resume file about {(4 * params + 8 * masked) / 1e9:.2f} GB, written every 4 steps" in line


def test_12_the_prune_examples_output_is_ignored_and_the_lm_tests_say_how_to_run():
    assert subprocess.run(["git", "check-ignore", "-q", "lm_masks.pt"], cwd=ROOT).returncode == 0
    readme = (ROOT / "README.md").read_text()
    assert ".venv/bin/pip\ninstall -e .[lm]" in readme or ".venv/bin/pip install -e .[lm]" in readme
    assert "-m slow" in readme
