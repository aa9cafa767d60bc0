"""The command line's first, cheap validation pass: every value and path a command takes, checked before
torch is imported or any file is read, every mistake found reported at once (one line each).

    mistakes = Mistakes()
    with mistakes.check():
        check_output_path(args.output, "--output")       # a mistake is recorded, the pass goes on
    mistakes.done()                                      # UserMistakes (a ValueError) with every line, if any

``check_values(args, flags)`` is that pass for a parsed command line; what needs the model (its
architecture, the masks' keys and shapes, the tokenizer, the text) is the second pass, in
``starfish_fast.commands``, which collects its mistakes the same way. Torch-free: ``starfish-fast``
refuses a bad value as fast as it answers ``--help``. The checks of output paths live here (and
``starfish_fast.checkpoint`` re-exports them) for that reason.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

from starfish_fast.config import HealConfig, config_fields, flag_name

IMAGES, TEXT = "images", "text"                 # the two modalities a flag may belong to
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
CALIB_HINT = "give its text with --calib-text PATH... (or --hf-dataset wikitext2|c4) and --calib-sequences"
MASK_SUFFIXES = (".pt", ".pth", ".safetensors")
MASKS_FILE = "masks.safetensors"               # a healed language-model directory's masks
# words of the Python API that a command-line user never typed -> what they typed
API_WORDS = ((r" \(resume=False\)", ""), (r"allow_unsafe_pickle=True / ", ""))


class UserMistakes(ValueError):
    """The mistakes one validation pass found, one line each."""

    def __init__(self, lines: list[str]):
        super().__init__("; ".join(lines))
        self.lines = lines


class Mistakes:
    """Collects the one-line mistakes of a validation pass (``check`` blocks), raised together by ``done``."""

    def __init__(self):
        self.lines: list[str] = []

    @contextlib.contextmanager
    def check(self):
        try:
            yield
        except UserMistakes as error:
            self.lines += error.lines
        except USER_ERRORS as error:
            self.lines.append(str(error))

    def done(self) -> None:
        if self.lines:
            raise UserMistakes(list(dict.fromkeys(self.lines)))


def mistake_lines(error: BaseException) -> list[str]:
    """A user error's lines in the command line's words (flags, not ``HealConfig`` fields or keywords)."""
    return [cli_words(line) for line in (error.lines if isinstance(error, UserMistakes) else [str(error)])]


def cli_words(line: str) -> str:
    flags = {item.name: flag_name(item) for item in config_fields()}
    line = re.sub(r"HealConfig\.(\w+)=", lambda m: f"{flags.get(m.group(1), m.group(1))} ", line)
    line = re.sub(r"HealConfig\.(\w+)", lambda m: flags.get(m.group(1), m.group(1)), line)
    for pattern, words in API_WORDS:
        line = re.sub(pattern, words, line)
    return line


# ----------------------------------------------------------------------------- paths
def check_output_path(path: str | os.PathLike, flag: str) -> None:
    """A one-line error naming ``flag`` unless ``path`` can be written as a file: it is not a directory and
    its nearest existing ancestor is a writable directory (missing parents are created when writing)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path}: is a directory; give a file path (inside it, say)")
    _check_writable(path.parent, f"{flag} {path}")


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """As ``check_output_path`` for a directory that is written into (created if missing)."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path}: is a file, not a directory")
    _check_writable(path, f"{flag} {path}")


def _check_writable(directory: Path, what: str) -> None:
    """The nearest existing ancestor of ``directory`` (itself included) is a directory we can create a file
    in: tried with a hidden probe file, removed at once (permissions, read-only mounts, root alike)."""
    while not os.path.lexists(directory) and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        raise NotADirectoryError(f"{what}: {directory} is a file, not a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=".starfish_fast.", suffix=".probe", dir=directory)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise PermissionError(f"{what}: cannot write in {directory} ({error.strerror or error})") from None


def mask_file(path: str) -> str:
    """``--mask-path``: a file, or a healed language model's directory standing for its ``masks.safetensors``."""
    return str(Path(path) / MASKS_FILE) if (Path(path) / MASKS_FILE).is_file() else path


def _inputs_exist(args, mistakes: Mistakes) -> None:
    """Every input path given exists (what each holds is the second pass's business); a healed language
    model's directory as ``--mask-path`` stands for its ``masks.safetensors``."""
    if getattr(args, "mask_path", None):
        args.mask_path = mask_file(args.mask_path)
    for dest in ("mask_path", "dense_path", "checkpoint", "pretrained_file"):
        path = getattr(args, dest, None)
        with mistakes.check():
            if path and not os.path.lexists(path):
                raise FileNotFoundError(f"--{dest.replace('_', '-')} {path}: no such file")
    for dest in ("calib_text", "eval_text"):
        for path in getattr(args, dest, None) or ():
            with mistakes.check():
                if not os.path.lexists(path):
                    raise FileNotFoundError(f"--{dest.replace('_', '-')} {path}: no such file or folder")
    for dest in ("calib_dir", "eval_dir", "fashion_mnist"):
        path = getattr(args, dest, None)
        with mistakes.check():
            if path and not Path(path).is_dir():
                raise NotADirectoryError(f"--{dest.replace('_', '-')} {path}: "
                                         f"{'is a file, not a' if Path(path).exists() else 'no such'} directory")


# ----------------------------------------------------------------------------- values
def _at_least(args, mistakes: Mistakes, dest: str, low: int, words: str) -> None:
    value = getattr(args, dest, None)
    with mistakes.check():
        if value is not None and value < low:
            raise ValueError(f"--{dest.replace('_', '-')} {value}: {words}")


def _ranges(args, mistakes: Mistakes) -> None:
    """Numbers each flag allows, whatever the model: the bounds that need the model come later."""
    for dest, low, words in (("seq_len", 2, "a sequence needs at least 2 tokens"),
                             ("calib_sequences", 1, "give at least 1 sequence"),
                             ("eval_tokens", 2, "perplexity needs at least 2 tokens"),
                             ("stride", 1, "windows start every 1 token or more"),
                             ("eval_samples", 0, "must be >= 0 (0: see the flag's help)"),
                             ("shuffle_buffer", 1, "must be positive"),
                             ("gradual_steps", 0, "must be >= 0 (0: one shot)")):
        _at_least(args, mistakes, dest, low, words)
    if args.command != "prune" or args.method in ("wanda", "representation", "sparsegpt"):
        _at_least(args, mistakes, "calib_samples", 1, "must be positive")
    if args.command in ("eval", "prune"):     # recover's and demo's --batch-size is HealConfig's, checked there
        _at_least(args, mistakes, "batch_size", 1, "must be positive")


def config_values(args, mistakes: Mistakes) -> None:
    """Each healing flag's value on its own (every bad one named), then their combination."""
    fields = [item for item in config_fields() if hasattr(args, item.name)]
    base = {"checkpoint_path": "resume-file"}                 # the command names it after its output
    for item in fields:
        value = getattr(args, item.name)
        if value != item.default:
            with mistakes.check():
                _config({**base, item.name: value}, flag_name(item), value)
    if not mistakes.lines:
        with mistakes.check():
            _config({**base, **{item.name: getattr(args, item.name) for item in fields}}, None, None)
    with mistakes.check():
        if getattr(args, "no_dense_cache", False) and args.teacher_store not in ("auto", "recompute"):
            raise ValueError(f"--no-dense-cache and --teacher-store {args.teacher_store} contradict each other")
    with mistakes.check():
        if getattr(args, "store_dense_float32", False) and args.teacher_dtype not in ("auto", "fp32"):
            raise ValueError(f"--store-dense-float32 and --teacher-dtype {args.teacher_dtype} contradict each other")


def _config(values: dict, flag: str | None, value) -> None:
    try:
        HealConfig(**values)
    except ValueError as error:
        message = cli_words(str(error))
        if flag and not message.startswith(flag):
            message = f"{flag} {value}: {message}"
        raise ValueError(message) from None


def check_sparsity(flag: str, value) -> None:
    if value is not None and not 0 <= value < 1:
        raise ValueError(f"{flag} must be a fraction of the weights in [0, 1) (0.5 prunes half of them), got {value}")


def _prune_values(args, mistakes: Mistakes) -> None:
    from starfish_fast.config import NM_METHODS

    with mistakes.check():
        if not str(args.output).endswith(MASK_SUFFIXES):
            raise ValueError(f"--output must end with one of {', '.join(MASK_SUFFIXES)}, got {args.output!r}")
    with mistakes.check():
        if args.method == "nm" and args.sparsity is not None:
            raise ValueError("--sparsity does not apply to --method nm: N:M fixes it at 1 - n/m")
        if args.method not in NM_METHODS and args.sparsity is None:
            raise ValueError(f"--method {args.method} needs --sparsity")
        check_sparsity("--sparsity", args.sparsity)
    with mistakes.check():
        if args.method in NM_METHODS and args.sparsity is None and not 1 <= args.n < args.m:
            raise ValueError(f"--n {args.n} --m {args.m}: N:M needs whole numbers 1 <= n < m")
    with mistakes.check():
        check_output_path(args.output, "--output")


def check_values(args) -> None:
    """The first pass for ``args.command``: values, then that the inputs exist and the outputs can be
    written where the command alone decides them. ``UserMistakes`` with every line found."""
    mistakes = Mistakes()
    _ranges(args, mistakes)
    if args.command in ("recover", "demo", "plan"):
        config_values(args, mistakes)
    if args.command == "recover":
        with mistakes.check():
            if args.export and not args.export.endswith(".safetensors"):
                raise ValueError(f"--export {args.export}: the export is a .safetensors file")
        if args.teacher_dir:
            with mistakes.check():
                check_output_dir(args.teacher_dir, "--teacher-dir")
    if args.command == "prune":
        _prune_values(args, mistakes)
    if args.command == "demo":
        with mistakes.check():
            check_sparsity("--sparsity", args.sparsity)
        with mistakes.check():
            check_output_dir(args.output_dir, "--output-dir")
    _inputs_exist(args, mistakes)
    mistakes.done()
