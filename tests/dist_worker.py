"""A torchrun worker for tests/test_distributed.py: heals the cases named in a JSON spec and writes what
the test compares (rank 0: history and weights; every rank: whether its masked weights are zero).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py SPEC.json

Also importable: ``run_case`` is the single-process reference of each case.
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch

from starfish_fast import HealConfig, heal


def tiny_deit(seed: int = 0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10).eval()


def setup(model_name: str):
    """(dense, masks, calibration images): the bundled ViT or a tiny DeiT, 50% magnitude masks."""
    from starfish_fast.bundled import load_bundled_model
    from starfish_fast.prune import magnitude_masks

    if model_name == "fashion_vit":
        dense = load_bundled_model()[0]
        images = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    else:
        dense = tiny_deit()
        images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return dense, magnitude_masks(dense, 0.5), images


def run_case(case: dict, checkpoint_path: str | None = None):
    """Heal one case; (healed model, result, masks)."""
    dense, masks, images = setup(case["model"])
    settings = dict(epochs=2, batch_size=case.get("batch_size", 8), lr=2e-3, min_lr=1e-5, mode=case["mode"],
                    precision="fp32", progress=False, log_every=2, device="cpu", order=case.get("order", "joint"))
    if checkpoint_path:
        settings.update(checkpoint_every=1, checkpoint_path=checkpoint_path, resume=True)
    model = copy.deepcopy(dense)
    result = heal(model, dense, masks, images, HealConfig(**settings))
    return model, result, masks


def diagnostics_case():
    """Diagnostics of the bundled ViT pruned 50% against the dense one on 64 labeled random images."""
    from starfish_fast.diagnostics import representation_diagnostics
    from starfish_fast.masks import apply_masks

    dense, masks, _ = setup("fashion_vit")
    pruned = copy.deepcopy(dense)
    apply_masks(pruned, masks)
    generator = torch.Generator().manual_seed(2)
    images, labels = torch.randn(64, 1, 28, 28, generator=generator), torch.randint(0, 10, (64,), generator=generator)
    return representation_diagnostics(dense, pruned, images, labels, batch_size=16)


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    rank, out = int(os.environ["RANK"]), spec["out"]
    if spec.get("crash_after"):                 # a process dies right after a resume checkpoint
        import starfish_fast.engine as engine

        checkpoint = engine._checkpoint

        def then_crash(run, step, done, losses, fingerprints):
            checkpoint(run, step, done, losses, fingerprints)
            if done == spec["crash_after"] and rank == 1:
                os._exit(3)
        engine._checkpoint = then_crash
    if spec.get("diagnostics"):
        report = diagnostics_case()
        if rank == 0:
            with open(f"{out}/diagnostics.json", "w") as f:
                json.dump(report, f)
    for name, case in spec["cases"].items():
        try:
            model, result, masks = run_case(case, case.get("checkpoint"))
        except ValueError as error:
            with open(f"{out}/{name}.rank{rank}.json", "w") as f:
                json.dump({"error": str(error)}, f)
            continue
        write_result(f"{out}/{name}", rank, model, result, masks)



def write_result(stem: str, rank: int, model, result, masks) -> None:
    """What the tests compare: every rank writes ``stem.rank<r>.json`` (its masked weights zero?, the history),
    rank 0 also ``stem.pt`` (the history and the weights)."""
    state = model.state_dict()
    zero = all(bool((state[k][~m] == 0).all()) for k, m in masks.items())
    with open(f"{stem}.rank{rank}.json", "w") as f:
        json.dump({"masked_zero": zero, "history": result.history, "world_size": result.plan.world_size}, f)
    if rank == 0:
        torch.save({"history": result.history, "state": state}, f"{stem}.pt")

if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
