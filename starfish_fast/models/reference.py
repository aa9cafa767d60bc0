"""The reference library's model names and its name helpers (what its ``models.py`` offered), kept apart
from the registry that builds any model: its ten names, their vit / mobilenet kind, and each kind's
default prune scope and weight predicate.

    from starfish_fast.models.reference import infer_model_kind, is_prunable_weight
    infer_model_kind("deit_tiny_patch16_224")                             # "vit"
    predicate = is_prunable_weight("mobilenetv1_100", "auto")             # conv_fc: (name, module) -> bool
"""
from __future__ import annotations

from starfish_fast.bundled import BUNDLED_NAMES
from starfish_fast.models import scopes

TIMM_VIT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
                   "deit3_base_patch16_224", "deit3_large_patch16_224", "deit3_huge_patch14_224")
TORCHVISION_MODELS = ("vit_b_16", "vit_l_16")
SUPPORTED_VIT_MODELS = TORCHVISION_MODELS + TIMM_VIT_MODELS
MOBILENET_MODEL = "mobilenetv1_100"
MOBILENET_MODELS = (MOBILENET_MODEL,)
REFERENCE_MODELS = SUPPORTED_VIT_MODELS + MOBILENET_MODELS


def reference_kind(arch: str) -> str:
    """The reference's kind of an architecture: "vit" or "mobilenet" (its per-token / per-image cosine, the
    bundled ViT and CNN alike), else "generic"."""
    if arch in SUPPORTED_VIT_MODELS or arch == "fashion_vit":
        return "vit"
    return "mobilenet" if arch in (MOBILENET_MODEL, "fashion_cnn") else "generic"


def supported_model_names() -> list[str]:
    """The reference's names and the bundled ones (any timm / torchvision classifier works too)."""
    return [*REFERENCE_MODELS, *BUNDLED_NAMES]


def infer_model_kind(model_name: str) -> str:
    """``"vit"`` or ``"mobilenet"`` for the reference's names (and the bundled ones); ``ValueError`` otherwise."""
    kind = reference_kind(model_name) if model_name in supported_model_names() else "generic"
    if kind == "generic":
        raise ValueError(f"unsupported model name {model_name!r}; supported: {', '.join(supported_model_names())}")
    return kind


def default_prune_scope(model_name: str) -> str:
    return "conv_fc" if infer_model_kind(model_name) == "mobilenet" else "qkv_out_mlp"


def is_prunable_weight(model_name: str, prune_scope: str):
    """Predicate ``(module_name, module) -> bool`` selecting the weights a scope masks and trains."""
    kind = infer_model_kind(model_name)
    scope = default_prune_scope(model_name) if prune_scope == "auto" else prune_scope
    allowed = scopes.MOBILENET_SCOPES if kind == "mobilenet" else scopes.VIT_SCOPES
    if scope not in allowed:
        raise ValueError(f"unknown prune scope {scope!r} for {model_name}; allowed: {', '.join(allowed)}")
    if kind == "mobilenet":
        return scopes.mobilenet_predicate(scope)
    if model_name in TORCHVISION_MODELS:
        return scopes.torchvision_vit_predicate(scope)
    return scopes.timm_vit_predicate(scope)
