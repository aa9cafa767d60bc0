"""Text data for language models: local files and folders, seeded calibration windows, disjointness,
Hugging Face text datasets (an in-memory stand-in for ``datasets``: no network) and strided perplexity
against a brute-force per-token computation."""
import gzip
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from starfish_fast.text import (Document, check_disjoint, eval_windows, hf_text_data, local_text_data,  # noqa: E402
                                perplexity, read_documents, sample_sequences, token_stream)

VOCAB = 96


class CharTokenizer:
    """One token per byte, with the call signature the module uses."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": list(text.encode())}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "calib" / "sub").mkdir(parents=True)
    (tmp_path / "eval").mkdir()
    (tmp_path / "calib" / "a.txt").write_text("alpha " * 200)
    (tmp_path / "calib" / "sub" / "b.py").write_text("def beta():\n    return 1\n" * 50)
    (tmp_path / "calib" / "c.gz").write_bytes(gzip.compress(b"gamma " * 100))
    (tmp_path / "calib" / "binary.bin").write_bytes(b"\0\1\2" * 100)
    (tmp_path / "calib" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "eval" / "license").write_text("the licence text " * 40)
    return tmp_path


def test_read_documents_recurses_sorted_skips_binary_and_reads_gzip(corpus):
    docs = read_documents([corpus / "calib"])
    assert [d.path.split("calib/")[1] for d in docs] == ["a.txt", "c.gz", "sub/b.py"]
    assert docs[1].text == "gamma " * 100
    cut = read_documents([corpus / "calib"], max_chars=1500)
    assert sum(len(d.text) for d in cut) == 1500 and len(cut) == 2
    with pytest.raises(ValueError, match="no such file or folder"):
        read_documents([corpus / "nowhere"])
    with pytest.raises(ValueError, match="no text files"):
        read_documents([corpus / "calib" / "binary.bin"])


def test_calibration_and_evaluation_must_be_disjoint(corpus):
    (corpus / "eval" / "copy.txt").write_text("alpha " * 200)             # same content as calib/a.txt
    with pytest.raises(ValueError, match="overlap: .*a.txt and .*copy.txt are the same file"):
        local_text_data(CharTokenizer(), [corpus / "calib"], [corpus / "eval"], sequences=2, seq_len=16)
    with pytest.raises(ValueError, match="overlap"):
        check_disjoint([Document(str(corpus / "calib" / "a.txt"), "x")],
                       [Document(str(corpus / "calib" / "sub" / ".." / "a.txt"), "y")])


def test_sample_sequences_are_seeded_distinct_windows():
    ids = torch.arange(1000)
    a, b, c = (sample_sequences(ids, 8, 50, seed) for seed in (0, 0, 1))
    assert a.shape == (8, 50) and torch.equal(a, b) and not torch.equal(a, c)
    starts = a[:, 0]
    assert (starts % 50 == 0).all() and starts.unique().numel() == 8                   # aligned, no overlap
    assert torch.equal(a, starts[:, None] + torch.arange(50))
    with pytest.raises(ValueError, match="gives 20 sequences of 50 tokens .*asked for 21"):
        sample_sequences(ids, 21, 50)


def test_local_text_data(corpus):
    calib, eval_ids = local_text_data(CharTokenizer(), [corpus / "calib"], [corpus / "eval"], sequences=4,
                                      seq_len=32, seed=3, eval_tokens=100)
    assert calib.shape == (4, 32) and calib.dtype == torch.long and eval_ids.shape == (100,)
    stream = token_stream(CharTokenizer(), read_documents([corpus / "calib"]))
    windows = stream[:stream.numel() // 32 * 32].view(-1, 32)
    assert all(any(torch.equal(row, w) for w in windows) for row in calib)


def brute_force_nll(model, ids, seq_len, stride):
    """Each scored token's NLL from its own window, one token at a time (no batching, no shortcuts)."""
    total, count = 0.0, 0
    for begin, end, first in eval_windows(ids.numel(), seq_len, stride):
        with torch.no_grad():
            logits = model(input_ids=ids[None, begin:end]).logits[0]                  # (L, V)
        for p in range(first, end - begin):
            total += F.cross_entropy(logits[p - 1:p].double(), ids[begin + p:begin + p + 1]).item()
            count += 1
    return total / count, count


@pytest.mark.parametrize("length,seq_len,stride", [(70, 16, 16), (70, 16, 5), (33, 40, 40), (50, 16, 1)])
def test_perplexity_matches_brute_force(length, seq_len, stride):
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(length))
    result = perplexity(model, ids, seq_len, stride, batch_size=3)
    nll, count = brute_force_nll(model, ids, seq_len, stride)
    assert result.tokens == count
    assert math.isclose(result.nll, nll, rel_tol=1e-5) and math.isclose(result.ppl, math.exp(nll), rel_tol=1e-5)
    scored = [begin + p for begin, end, first in eval_windows(length, seq_len, stride) for p in range(first, end - begin)]
    assert len(scored) == len(set(scored))                                           # no token scored twice
    if stride < seq_len:
        assert scored == list(range(1, length))                                      # every token but the first


def test_perplexity_of_one_window_is_the_models_own_loss():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    assert math.isclose(perplexity(model, ids, 24).nll, loss.item(), rel_tol=1e-5)
    assert model.training is False


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []

    def load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        if path == "wikitext":
            return {"text": [f" = {split} {i} =\n" + "word " * 30 for i in range(20)]}
        if path == "offline/missing":
            raise ConnectionError("Couldn't reach the Hub\nmore lines")
        rows = [{"text": ("short" if i % 2 else "long text " * 40) + f" {split} {i}"} for i in range(1200)]

        class Rows(list):
            def __getitem__(self, item):
                if isinstance(item, slice):
                    return {"text": [r["text"] for r in list.__getitem__(self, item)]}
                return list.__getitem__(self, item)
        return Rows(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hf_text_datasets_conventions(fake_datasets):
    calib, eval_ids = hf_text_data(CharTokenizer(), "wikitext2", sequences=3, seq_len=20, seed=0)
    assert calib.shape == (3, 20)
    assert eval_ids.tolist() == list("\n\n".join(f" = test {i} =\n" + "word " * 30 for i in range(20)).encode())
    assert fake_datasets[:2] == [("wikitext", "wikitext-2-raw-v1", "train", None),
                                 ("wikitext", "wikitext-2-raw-v1", "test", None)]
    calib, eval_ids = hf_text_data(CharTokenizer(), "c4", sequences=4, seq_len=30, seed=1)
    assert calib.shape == (4, 30) and eval_ids.numel() == 256 * 30
    text = bytes(calib[0].tolist()).decode()
    assert "long text" in text or "text long" in text
    assert fake_datasets[2][3] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert torch.equal(calib, hf_text_data(CharTokenizer(), "c4", sequences=4, seq_len=30, seed=1)[0])
    fake_datasets.clear()
    calib, eval_ids = hf_text_data(CharTokenizer(), "wikitext2", sequences=3, seq_len=20, evaluation=False)
    assert calib.shape == (3, 20) and eval_ids is None
    assert fake_datasets == [("wikitext", "wikitext-2-raw-v1", "train", None)]      # the test split not read


def test_hf_text_dataset_errors(fake_datasets, monkeypatch):
    with pytest.raises(ValueError, match="unknown text dataset 'wikitext103'; allowed: wikitext2, c4"):
        hf_text_data(CharTokenizer(), "wikitext103", sequences=1, seq_len=8)
    from starfish_fast import text
    with pytest.raises(ValueError, match="cannot load dataset 'offline/missing' .*: Couldn't reach the Hub$"):
        text._load_dataset("offline/missing")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match=r"pip install starfish_fast\[hf\]"):
        hf_text_data(CharTokenizer(), "wikitext2", sequences=1, seq_len=8)
