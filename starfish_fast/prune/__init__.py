"""Mask makers over the reference's prune scopes, in the reference's mask format (True = keep and train):
from the weights alone (``makers``: magnitude, N:M, structured) or from a calibration set (``wanda``:
Wanda's |W| * ||X|| per output row; ``representation``: per-block sparsities from the damage pruning
each block does to its output; ``sparsegpt``: SparseGPT's masks and weight update; its update alone
under any masks is ``starfish_fast.sparsegpt.sparsegpt_update``).

    import torch
    from starfish_fast.prune import (format_summary, magnitude_masks, representation_masks, sparsegpt_prune,
                                     sparsity_summary, wanda_masks)
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    calib = torch.randn(16, 3, 32, 32)                        # unlabeled images (or batches, a DataLoader)
    masks = magnitude_masks(model, 0.5, scope="qkv_out_mlp")  # {state_dict key: bool tensor}
    masks = wanda_masks(model, 0.5, calib)                    # |W| * input norm, per output row
    masks = wanda_masks(model, None, calib, n=2, m=4)         # the same scores, 2 kept of every 4
    masks = representation_masks(model, 0.5, calib)           # block sparsities from the measured damage
    masks = sparsegpt_prune(model, 0.5, calib)                # in place: masks chosen, kept weights updated
    print(format_summary(sparsity_summary(masks)))            # per-layer and total sparsity
"""
from starfish_fast.prune.makers import (QKV_SUFFIXES, STRUCTURED_KINDS, VIT_FAMILIES, ScoreFn, check_nm,
                                        check_sparsity, format_summary, magnitude_masks, magnitude_score, nm_masks,
                                        sparsity_summary, structured_masks)
from starfish_fast.prune.representation import SCORES, allocate_sparsities, representation_masks
from starfish_fast.prune.sparsegpt_masks import sparsegpt_prune
from starfish_fast.prune.wanda import layer_keep, wanda_input_norms, wanda_masks, wanda_score

__all__ = ["QKV_SUFFIXES", "STRUCTURED_KINDS", "VIT_FAMILIES", "ScoreFn", "check_nm", "check_sparsity",
           "format_summary", "magnitude_masks", "magnitude_score", "nm_masks", "sparsity_summary", "structured_masks",
           "SCORES", "allocate_sparsities", "representation_masks", "sparsegpt_prune", "layer_keep",
           "wanda_input_norms", "wanda_masks", "wanda_score"]
