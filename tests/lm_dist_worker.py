"""A torchrun worker for tests/test_lm_heal.py: heals a tiny random Llama on token batches and writes what
the test compares (rank 0: history and weights; every rank: whether its masked weights are zero).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/lm_dist_worker.py SPEC.json

Also importable: ``tiny_lm`` (the tests' random-weight models) and ``heal_case`` (the single-process run).
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch


def tiny_lm(kind: str = "llama", seed: int = 0):
    """A random-weight Llama (3 layers, GQA) or GPT-2 (2 layers, Conv1D) with a 96-token vocabulary."""
    import transformers

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def heal_case():
    """(healed model, result, masks): 50% magnitude masks, 16 sequences of 12 tokens, batch 8, fast mode."""
    from starfish_fast import HealConfig, heal
    from starfish_fast.prune import magnitude_masks

    dense = tiny_lm()
    masks = magnitude_masks(dense, 0.5)
    calib = torch.randint(0, 96, (16, 12), generator=torch.Generator().manual_seed(3))
    model = copy.deepcopy(dense)
    result = heal(model, dense, masks, calib, HealConfig(epochs=2, batch_size=8, lr=3e-3, min_lr=1e-5, mode="fast",
                                                         precision="fp32", progress=False, log_every=2,
                                                         device="cpu"))
    return model, result, masks


def main(spec_path: str) -> None:
    from dist_worker import write_result     # tests/ is the script's folder, first on sys.path

    out, rank = json.loads(open(spec_path).read())["out"], int(os.environ["RANK"])
    model, result, masks = heal_case()
    write_result(f"{out}/lm", rank, model, result, masks)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
