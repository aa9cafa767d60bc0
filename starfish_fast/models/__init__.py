"""Models: one registry of names (``registry``) that walks the sources of names (``sources``: Hugging Face,
the reference's, bundled, timm, torchvision), the reference library's names and helpers (``reference``),
the adapters that find blocks and run block forwards (``adapters``), the prune scopes (``scopes``) and the
STR MobileNetV1 format (``str_format``).

    from starfish_fast.models import adapter_for, load_dense
    model = load_dense("resnet18", pretrained=True)          # or a reference name with a checkpoint path
    adapter = adapter_for(model)                             # the family's explicit loop, or GenericAdapter
    logits, reps = adapter.forward_blocks(model, images, adapter.block_names(model))
"""
from starfish_fast.models.adapters import (ADAPTERS, MLP_LAYERS, GenericAdapter, ModelAdapter,
                                           MobileNetV1Adapter, TimmViTAdapter, TorchvisionViTAdapter,
                                           discover_blocks, enable_grad_checkpointing, forward_with_hooks,
                                           freeze_all, set_submodule)
from starfish_fast.models.reference import (MOBILENET_MODEL, MOBILENET_MODELS, REFERENCE_MODELS, SUPPORTED_VIT_MODELS,
                                            TIMM_VIT_MODELS, TORCHVISION_MODELS, default_prune_scope,
                                            infer_model_kind, is_prunable_weight, supported_model_names)
from starfish_fast.models.registry import (CheckpointMismatchError, ModelSpec, adapter_for, all_block_names,
                                           build_empty_model, load_dense, load_model, model_spec)
from starfish_fast.models.scopes import (GENERIC_SCOPES, MOBILENET_SCOPES, VIT_SCOPES, WeightPredicate,
                                         get_weight_key_and_tensor, prunable_weights)
from starfish_fast.models.str_format import MOBILENET_STAGE_LAYOUT, force_mobilenet_str_runtime

__all__ = ["ADAPTERS", "MLP_LAYERS", "GenericAdapter", "ModelAdapter", "MobileNetV1Adapter", "TimmViTAdapter",
           "TorchvisionViTAdapter", "adapter_for", "discover_blocks", "enable_grad_checkpointing",
           "forward_with_hooks", "freeze_all", "set_submodule", "MOBILENET_MODEL", "MOBILENET_MODELS",
           "MOBILENET_STAGE_LAYOUT", "REFERENCE_MODELS", "SUPPORTED_VIT_MODELS", "TIMM_VIT_MODELS",
           "TORCHVISION_MODELS", "CheckpointMismatchError", "ModelSpec", "all_block_names", "build_empty_model",
           "default_prune_scope", "infer_model_kind", "is_prunable_weight", "load_dense", "load_model",
           "model_spec", "supported_model_names", "GENERIC_SCOPES", "MOBILENET_SCOPES", "VIT_SCOPES",
           "WeightPredicate", "get_weight_key_and_tensor", "prunable_weights", "force_mobilenet_str_runtime"]
