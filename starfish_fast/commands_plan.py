"""``starfish-fast plan``: the plan a healing run would follow, and why, without healing.

    starfish-fast plan --model-name fashion_vit                          # on this machine (probed)
    starfish-fast plan --model-name deit_base_patch16_224 --device-kind sm86 --calib-samples 50000
    starfish-fast plan --model-name my_llama_dir --device-kind sm90 --seq-len 2048

For this machine the probe runs as for ``recover`` (the GPU's memory, one forward of one sample, the 2:4
timings where a mask file with 2:4 masks is given); for ``--device-kind`` the machine's facts come from the
measured tables (``rules.DEVICE_KINDS``) and only the model's are measured here. The model is built with random
weights (the plan reads its structure, never its values); calibration samples are stand-ins of its input shape.
"""
from __future__ import annotations

import torch

from starfish_fast.config import HealConfig, config_fields
from starfish_fast.masks import load_masks
from starfish_fast.modality import Modality, block_names
from starfish_fast.models import adapter_for
from starfish_fast.plan import decide
from starfish_fast.probe import probe

DEFAULT_SEQ_LEN = 512


def _sample(args, kind: Modality, model) -> torch.Tensor:
    """One input of the model's shape: token ids for a language model, else an image as its transform makes it."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None):
        context = getattr(config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN
        return torch.zeros(1, min(args.seq_len or DEFAULT_SEQ_LEN, context), dtype=torch.long)    # (1, T)
    if kind.fashion_native(model):
        return torch.zeros(1, 1, 28, 28)                                                          # (1, 1, 28, 28)
    from PIL import Image
    return kind.spec.transform(model)(Image.new("RGB", (64, 64)))[None]                       # (1, C, H, W)


def _stand_in_batches(sample: torch.Tensor, count: int, batch_size: int) -> list[torch.Tensor]:
    """``count`` samples in batches of ``batch_size``, each batch a view of ``sample`` (no memory per sample)."""
    sizes = [batch_size] * (count // batch_size) + ([count % batch_size] if count % batch_size else [])
    return [sample.expand(size, *sample.shape[1:]) for size in sizes]


def _print(plan, facts) -> None:
    machine = (f"{facts.device_kind} {facts.gpu or 'CPU'}, {facts.memory_total / 1e9:.0f} GB"
               + ("" if facts.measured else " (from the measured tables: rules.DEVICE_KINDS)"))
    print(plan.summary())
    print(f"  machine: {machine}")
    for key, reason in plan.reasons.items():
        print(f"  {key}: {reason}")
    for warning in plan.warnings:
        print(f"  warning: {warning}")


def run_plan(args, kind: Modality) -> int:
    """Print the plan for ``args`` (``--device-kind``: a named kind; default this machine) and its reasons."""
    if args.calib_samples < 1:
        raise ValueError(f"--calib-samples {args.calib_samples}: at least 1")
    config = HealConfig(**{item.name: getattr(args, item.name) for item in config_fields()}, progress=False)
    kind.check_model(args, weights=False)
    torch.manual_seed(0)
    model = kind.spec.build(**getattr(kind, "kwargs", {})).eval()
    blocks = kind.blocks or block_names(args, model)
    masks = None
    if args.mask_path:
        predicate = adapter_for(model, blocks).scope_predicate(adapter_for(model, blocks).check_scope(config.scope))
        masks = load_masks(args.mask_path, model, predicate, allow_unsafe_pickle=args.allow_unsafe_pickle)
    calib = _stand_in_batches(_sample(args, kind, model), args.calib_samples,
                              min(config.batch_size, args.calib_samples))
    names = blocks if args.blocks else None
    facts = probe(config, model, calib=calib, block_names=names, masks=masks, device_kind=args.device_kind)
    _print(decide(config, adapter_for(model, names), facts), facts)
    return 0
