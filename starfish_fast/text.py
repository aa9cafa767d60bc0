"""Text for language models: calibration and evaluation token sequences from local text files or
folders (or Hugging Face datasets, with the ``hf`` extra), and strided perplexity.

    from starfish_fast.text import local_text_data, perplexity
    calib, eval_ids = local_text_data(tokenizer, ["/usr/lib/python3.11"], ["/usr/share/common-licenses"],
                                      sequences=64, seq_len=256, seed=0)
    calib               # (64, 256) int64: distinct windows of the calibration text, drawn with the seed
    eval_ids            # (N,) int64: the evaluation text as one token stream
    ppl = perplexity(model, eval_ids, seq_len=256).ppl        # windows of 256 tokens, stride 256

Documents are the files of the folders given (recursively, in sorted order; ``.gz`` files are read
decompressed; binary and non-UTF-8 files are skipped), joined with a blank line and tokenized once
with the model's tokenizer (no special tokens added). Calibration sequences are non-overlapping
``seq_len`` windows of that token stream, drawn at random with ``seed``. Calibration and evaluation
text must not share a file (by path or by content): it is checked before any tokenizing.

Perplexity is the standard strided evaluation (the transformers documentation's "perplexity of
fixed-length models"): windows of ``seq_len`` tokens starting every ``stride`` tokens, each scoring
only the tokens the previous window did not (with ``stride < seq_len`` they see up to
``seq_len - stride`` tokens of context); no token is scored twice (with ``stride < seq_len`` every
token but the first is scored), and the result is ``exp`` of the mean negative log-likelihood over
the scored tokens. ``stride == seq_len`` (the default)
is the non-overlapping evaluation of the LLM pruning papers (WikiText-2 at 2,048 tokens for Wanda and
SparseGPT), whose first token of each window is context only.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

HF_TEXT_DATASETS = ("wikitext2", "c4")
MAX_CHARS = 4_000_000          # characters read from each side (calibration, evaluation) by default
# the usual files of C4 for LLM pruning (SparseGPT's and Wanda's code): the first train and validation shards
C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


class Document(NamedTuple):
    path: str
    text: str


# ----------------------------------------------------------------------------- local text
def _read_file(path: Path) -> str | None:
    """The file's text, or None for a binary or non-UTF-8 file."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            return None
    if b"\0" in raw[:4096]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_documents(paths: Sequence[str | os.PathLike], max_chars: int | None = None) -> list[Document]:
    """The text files under ``paths`` (files or folders, recursively, sorted), up to ``max_chars``
    characters in all (the last document cut there). ``ValueError`` if a path is missing or holds no text."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"{path}: no such file or folder")
        files += sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else [path]
    documents, total = [], 0
    for file in files:
        text = _read_file(file)
        if not text or not text.strip():
            continue
        if max_chars is not None and total + len(text) > max_chars:
            text = text[:max_chars - total]
        documents.append(Document(str(file), text))
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    if not documents:
        raise ValueError(f"no text files under {', '.join(map(str, paths))}")
    return documents


def check_disjoint(calibration: Sequence[Document], evaluation: Sequence[Document]) -> None:
    """``ValueError`` naming a file that both sets hold (same resolved path or same content)."""
    def keys(docs):
        return {key: doc.path for doc in docs
                for key in (os.path.realpath(doc.path), hashlib.sha256(doc.text.encode()).hexdigest())}

    shared = keys(calibration).keys() & keys(evaluation).keys()
    if shared:
        key = sorted(shared)[0]
        raise ValueError(f"calibration and evaluation text overlap: {keys(calibration)[key]} and "
                         f"{keys(evaluation)[key]} are the same file; use disjoint files or folders")


def token_stream(tokenizer, documents: Iterable[Document | str]) -> torch.Tensor:
    """(N,) int64: the documents joined by a blank line, tokenized once without special tokens."""
    text = "\n\n".join(doc.text if isinstance(doc, Document) else doc for doc in documents)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_sequences(ids: torch.Tensor, count: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(count, seq_len): distinct non-overlapping ``seq_len`` windows of the stream ``ids``, drawn with
    ``seed`` (the same seed, the same windows)."""
    if count <= 0 or seq_len <= 1:
        raise ValueError(f"need count > 0 and seq_len > 1, got count={count}, seq_len={seq_len}")
    available = ids.numel() // seq_len
    if count > available:
        raise ValueError(f"the text gives {available} sequences of {seq_len} tokens ({ids.numel()} tokens); "
                         f"asked for {count}: give more text, fewer or shorter sequences")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count]     # (count,)
    return ids[:available * seq_len].view(available, seq_len)[order].clone()


def local_text_data(tokenizer, calibration: Sequence[str | os.PathLike], evaluation: Sequence[str | os.PathLike],
                    *, sequences: int, seq_len: int, seed: int = 0, max_chars: int | None = MAX_CHARS,
                    eval_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration sequences (sequences, seq_len), evaluation stream (N,)) from disjoint local text;
    the evaluation stream is cut to its first ``eval_tokens`` tokens if given."""
    calib_docs, eval_docs = read_documents(calibration, max_chars), read_documents(evaluation, max_chars)
    check_disjoint(calib_docs, eval_docs)
    calib = sample_sequences(token_stream(tokenizer, calib_docs), sequences, seq_len, seed)
    eval_ids = token_stream(tokenizer, eval_docs)
    return calib, (eval_ids[:eval_tokens] if eval_tokens else eval_ids)


# ----------------------------------------------------------------------------- Hugging Face datasets
def _load_dataset(*args, **kwargs):
    try:
        import datasets
    except ImportError:
        raise ValueError("Hugging Face datasets need the hf extra: pip install starfish_fast[hf]") from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as error:  # offline, not cached, or a wrong name: the library's many error types
        from starfish_fast.checkpoint import error_line
        raise ValueError(f"cannot load dataset {args[0]!r} (offline runs read only the local cache): "
                         f"{error_line(error)}") from None


def hf_text_data(tokenizer, name: str, *, sequences: int, seq_len: int, seed: int = 0,
                 eval_tokens: int | None = None, evaluation: bool = True
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(calibration (sequences, seq_len), evaluation stream (N,)) with the usual conventions of the LLM
    pruning papers; ``sequences=0``: no calibration, ``evaluation=False``: no evaluation (None; the split
    is not read). ``wikitext2``:
    wikitext-2-raw-v1, the train split's texts joined by blank lines for calibration windows, the test
    split's for evaluation. ``c4``: allenai/c4's first train shard, each sequence a random window of a
    random document longer than ``seq_len``; the first validation shard's first 1,100 documents joined
    by spaces, cut to ``256 * seq_len`` tokens, for evaluation."""
    if name not in HF_TEXT_DATASETS:
        raise ValueError(f"unknown text dataset {name!r}; allowed: {', '.join(HF_TEXT_DATASETS)}")
    calib = eval_ids = None
    if name == "wikitext2":
        if sequences:
            train = _load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
            calib = sample_sequences(token_stream(tokenizer, ["\n\n".join(train["text"])]), sequences, seq_len, seed)
        if evaluation:
            test = _load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            eval_ids = token_stream(tokenizer, ["\n\n".join(test["text"])])
    else:
        if sequences:
            train = _load_dataset("allenai/c4", data_files={"train": C4_FILES["train"]}, split="train")
            calib = _c4_windows(tokenizer, train, sequences, seq_len, seed)
        if evaluation:
            valid = _load_dataset("allenai/c4", data_files={"validation": C4_FILES["validation"]}, split="validation")
            eval_ids = token_stream(tokenizer, [" ".join(valid[:1100]["text"])])[:256 * seq_len]
    return calib, (eval_ids[:eval_tokens] if eval_tokens and eval_ids is not None else eval_ids)


def _c4_windows(tokenizer, rows, sequences: int, seq_len: int, seed: int, max_tries: int = 100_000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for _ in range(max_tries):
        if len(picked) == sequences:
            return torch.stack(picked)
        ids = token_stream(tokenizer, [rows[int(torch.randint(len(rows), (), generator=generator))]["text"]])
        if ids.numel() > seq_len:
            start = int(torch.randint(ids.numel() - seq_len, (), generator=generator))
            picked.append(ids[start:start + seq_len])
    raise ValueError(f"found only {len(picked)} documents longer than {seq_len} tokens in {max_tries} draws")


# ----------------------------------------------------------------------------- perplexity
@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float            # mean negative log-likelihood per scored token (nats)
    tokens: int           # tokens scored


def eval_windows(length: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position within the window) of the strided evaluation of ``length`` tokens."""
    if not 0 < stride <= seq_len:
        raise ValueError(f"need 0 < stride <= seq_len, got stride={stride}, seq_len={seq_len}")
    windows, scored_to = [], 1                                   # token 0 has no context: never scored
    for begin in range(0, max(length - 1, 1), stride):
        end = min(begin + seq_len, length)
        windows.append((begin, end, max(scored_to - begin, 1)))
        scored_to = end
        if end == length:
            break
    return windows


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, stride: int | None = None, batch_size: int = 4,
               device: str | torch.device | None = None, desc: str | None = None) -> Perplexity:
    """Strided perplexity of a causal LM on the token stream ``ids`` (see the module docstring); windows of
    one length run ``batch_size`` at a time, in eval mode (the model's mode is restored); with ``desc``, a
    progress bar."""
    from starfish_fast.calibration import evaluating
    from starfish_fast.progress import progress_bar

    score = Scores()
    with evaluating(model, device) as target:
        for batch, chunk in progress_bar(window_batches(ids, seq_len, stride, batch_size), desc=desc):
            score.add(model(input_ids=batch.to(target), use_cache=False).logits, batch, chunk)    # (B, L, V)
    return score.perplexity()


def window_batches(ids: torch.Tensor, seq_len: int, stride: int | None, batch_size: int) -> list[tuple]:
    """The strided evaluation's windows of ``ids`` as (token batch (B, L), its windows (begin, end, first)), windows
    of one length ``batch_size`` at a time."""
    ids = ids.flatten().long()
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    windows, batches = eval_windows(ids.numel(), seq_len, stride or seq_len), []
    for length in dict.fromkeys(end - begin for begin, end, _ in windows):
        same = [w for w in windows if w[1] - w[0] == length]
        for i in range(0, len(same), batch_size):
            chunk = same[i:i + batch_size]
            batches.append((torch.stack([ids[begin:end] for begin, end, _ in chunk]), chunk))        # (B, L)
    return batches


class Scores:
    """The negative log-likelihood of the scored tokens of window batches, summed in fp64."""

    def __init__(self):
        self.total, self.count = torch.zeros((), dtype=torch.float64), 0

    def add(self, logits: torch.Tensor, batch: torch.Tensor, chunk) -> None:
        """``logits`` (B, L, V) of the token ``batch`` (B, L) whose windows are ``chunk``."""
        batch = batch.to(logits.device)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none")  # (B, L-1)
        for row, (begin, end, first) in enumerate(chunk):
            self.total += nll[row, first - 1:].double().sum().cpu()
            self.count += end - begin - first

    def perplexity(self) -> Perplexity:
        mean = float(self.total / self.count)
        return Perplexity(ppl=math.exp(mean), nll=mean, tokens=self.count)
