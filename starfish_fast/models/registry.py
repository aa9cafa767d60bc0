"""One registry of models, in timm's spirit: for any name, how to build the model, its loading quirks
and its data transform.

    from starfish_fast.models import load_dense, model_spec
    spec = model_spec("convnext_atto")                       # ModelSpec(name, source="timm", arch)
    model = spec.build(num_classes=10)                       # random weights
    transform = spec.transform(model)                        # the model's own data config, for image files
    dense = load_dense("deit_base_patch16_224", "deit_b.pt", "cuda")     # strict load, eval mode

Names, looked up in this order: the reference library's ten (its exact semantics: timm
``create_model(name, pretrained=False, num_classes=1000)``, torchvision ``vit_b_16/vit_l_16``, the
reference transform, STR-format MobileNetV1 checkpoints), the bundled Fashion-MNIST models, any
``timm.list_models()`` name, any torchvision classification model; ``timm/NAME`` or
``torchvision/NAME`` picks the library explicitly. An unknown name is an error listing close matches.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from starfish_fast.checkpoint import extract_state_dict, load_tensor_file
from starfish_fast.models.str_format import force_mobilenet_str_runtime, is_str_checkpoint, str_to_timm_mobilenet

TIMM_VIT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
                   "deit3_base_patch16_224", "deit3_large_patch16_224", "deit3_huge_patch14_224")
TORCHVISION_MODELS = ("vit_b_16", "vit_l_16")
SUPPORTED_VIT_MODELS = TORCHVISION_MODELS + TIMM_VIT_MODELS
MOBILENET_MODEL = "mobilenetv1_100"
MOBILENET_MODELS = (MOBILENET_MODEL,)
REFERENCE_MODELS = SUPPORTED_VIT_MODELS + MOBILENET_MODELS


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint whose keys or shapes differ from the model's. A ``RuntimeError`` like torch's strict
    ``load_state_dict`` error (what reference callers catch), and a ``ValueError`` like our other bad inputs."""


@dataclass(frozen=True)
class ModelSpec:
    name: str                  # as given
    source: str                # reference | bundled | timm | torchvision
    arch: str                  # the library's own name

    @property
    def kind(self) -> str:
        """The reference's kind: "vit" or "mobilenet" (its per-token / per-image cosine), else "generic"."""
        if self.arch in SUPPORTED_VIT_MODELS or self.arch == "fashion_vit":
            return "vit"
        return "mobilenet" if self.arch in (MOBILENET_MODEL, "fashion_cnn") else "generic"

    def build(self, **kwargs) -> nn.Module:
        """The architecture with random weights; ``kwargs`` go to timm's ``create_model`` or torchvision's
        ``get_model`` (e.g. ``num_classes=10, in_chans=1``)."""
        if self.source == "bundled":
            from starfish_fast.bundled import build_bundled_model
            _no_kwargs(self, kwargs)
            return build_bundled_model(self.arch)
        if self.source == "reference":
            _no_kwargs(self, kwargs)
            if self.arch in TORCHVISION_MODELS:
                import torchvision
                return getattr(torchvision.models, self.arch)(weights=None)
            import timm
            return timm.create_model(self.arch, pretrained=False, num_classes=1000)
        if self.source == "timm":
            import timm
            return timm.create_model(self.arch, pretrained=False, **kwargs)
        import torchvision
        return torchvision.models.get_model(self.arch, weights=None, **kwargs)

    def build_pretrained(self, pretrained_file: str | None = None, **kwargs) -> nn.Module:
        """The model with its library's pretrained weights (offline: from the library's local cache), or
        for timm with ``pretrained_file`` (timm's ``pretrained_cfg_overlay=dict(file=...)``)."""
        if self.source in ("timm", "reference") and self.arch not in TORCHVISION_MODELS:
            import timm
            overlay = {"pretrained_cfg_overlay": {"file": str(pretrained_file)}} if pretrained_file else {}
            return timm.create_model(self.arch, pretrained=True, **overlay, **kwargs)
        if pretrained_file:
            raise ValueError(f"--pretrained-file is for timm models; {self.name} is a {self.source} model "
                             f"(use --dense-path for a local checkpoint)")
        if self.source == "bundled":
            raise ValueError(f"{self.name} is bundled: its trained weights load without --pretrained")
        import torchvision
        return torchvision.models.get_model(self.arch, weights="DEFAULT", **kwargs)

    def transform(self, model: nn.Module):
        """The transform for image files: the reference's for its names, the Fashion-MNIST one for the
        bundled models, timm's ``resolve_data_config`` + ``create_transform`` (input size, mean/std,
        interpolation, crop), torchvision's weights transforms."""
        from starfish_fast import data

        if self.source == "reference":
            return data.build_transform()
        if self.source == "bundled":
            return data.fashion_mnist_transform()
        if self.source == "torchvision":
            import torchvision
            try:
                return torchvision.models.get_model_weights(self.arch).DEFAULT.transforms()
            except (ValueError, AttributeError):             # a model without published weights
                return data.build_transform()
        return _timm_transform(model)


def _no_kwargs(spec: ModelSpec, kwargs: dict) -> None:
    if kwargs:
        raise ValueError(f"{spec.name} has a fixed architecture (the reference's or a bundled one); "
                         f"--model-kwargs {sorted(kwargs)} do not apply to it")


def _timm_transform(model: nn.Module):
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms

    config = resolve_data_config({}, model=model)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels == 1:          # a 1-channel model (e.g. trained on Fashion-MNIST): gray images, one mean/std
        config.update(mean=(sum(config["mean"]) / len(config["mean"]),), std=(sum(config["std"]) / len(config["std"]),))
        return transforms.Compose([transforms.Grayscale(1), create_transform(**config)])
    return create_transform(**config)


def model_spec(name: str) -> ModelSpec:
    """The spec of ``name`` (see the module docstring for the lookup order); ``ValueError`` with close
    matches for an unknown name."""
    from starfish_fast.bundled import BUNDLED_NAMES

    library, _, arch = name.rpartition("/") if re.match(r"^(timm|torchvision)/", name) else ("", "", name)
    if not library and name in REFERENCE_MODELS:
        return ModelSpec(name, "reference", name)
    if not library and name in BUNDLED_NAMES:
        return ModelSpec(name, "bundled", name)
    if library in ("", "timm"):
        import timm
        if timm.is_model(arch.split(".")[0]):
            return ModelSpec(name, "timm", arch)
    if library in ("", "torchvision") and arch in _torchvision_names():
        return ModelSpec(name, "torchvision", arch)
    close = difflib.get_close_matches(arch, _all_names(), n=5, cutoff=0.6)
    raise ValueError(f"unknown model name {name!r}" + (f"; close matches: {', '.join(close)}" if close else "") +
                     " (any timm or torchvision classifier, the reference's names, or fashion_vit / fashion_cnn)")


def _torchvision_names() -> list[str]:
    import torchvision
    return torchvision.models.list_models(module=torchvision.models)


def _all_names() -> list[str]:
    import timm
    from starfish_fast.bundled import BUNDLED_NAMES
    return [*REFERENCE_MODELS, *BUNDLED_NAMES, *timm.list_models(), *_torchvision_names()]


def build_empty_model(model_name: str, **kwargs) -> nn.Module:
    """The architecture with random weights (the reference's names: timm ``pretrained=False,
    num_classes=1000``; torchvision ``weights=None``)."""
    return model_spec(model_name).build(**kwargs)


def load_model(model_name: str, checkpoint_path: str | os.PathLike, device: str | torch.device,
               allow_unsafe_pickle: bool = False, **model_kwargs) -> nn.Module:
    """Build ``model_name``, load a plain state dict or ``{"state_dict": ...}`` strictly, move to
    ``device``, eval mode. ``mobilenetv1_100`` also accepts STR-format checkpoints (then ReLU6 -> ReLU)."""
    
    model = build_empty_model(model_name, **model_kwargs)
    raw = load_tensor_file(checkpoint_path, allow_unsafe_pickle=allow_unsafe_pickle)
    try:
        state = extract_state_dict(raw)
    except ValueError as error:
        raise ValueError(f"{checkpoint_path}: {error}") from None
    if state is None:
        raise ValueError(f"{checkpoint_path} holds a pickled module, not a state dict")
    str_format = model_name == MOBILENET_MODEL and is_str_checkpoint(state)
    if str_format:
        state = str_to_timm_mobilenet(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointMismatchError(f"{checkpoint_path} does not fit {model_name}: {error}") from None
    if str_format:
        force_mobilenet_str_runtime(model)
    return model.to(device).eval()


def load_dense(model_name: str, dense_path: str | os.PathLike | None = None, device: str | torch.device = "cpu", *,
               pretrained: bool = False, pretrained_file: str | None = None, model_kwargs: dict | None = None,
               allow_unsafe_pickle: bool = False) -> nn.Module:
    """The dense model, in eval mode on ``device``: from ``dense_path``, or the library's pretrained
    weights (``pretrained`` / ``pretrained_file``), or for a bundled model its committed weights."""
    spec, model_kwargs = model_spec(model_name), dict(model_kwargs or {})
    if sum(bool(x) for x in (dense_path, pretrained, pretrained_file)) > 1:
        raise ValueError("give one of --dense-path, --pretrained and --pretrained-file")
    if dense_path:
        return load_model(model_name, dense_path, device, allow_unsafe_pickle, **model_kwargs)
    if pretrained or pretrained_file:
        return spec.build_pretrained(pretrained_file, **model_kwargs).to(device).eval()
    if spec.source == "bundled":
        from starfish_fast.bundled import load_bundled_model
        return load_bundled_model(spec.arch)[0].to(device)
    raise ValueError(f"{model_name} needs its dense weights: --dense-path FILE, --pretrained or --pretrained-file FILE")


# ----------------------------------------------------------------------------- the reference's name helpers
def supported_model_names() -> list[str]:
    """The reference's names and the bundled ones (any timm / torchvision classifier works too)."""
    from starfish_fast.bundled import BUNDLED_NAMES
    return [*REFERENCE_MODELS, *BUNDLED_NAMES]


def infer_model_kind(model_name: str) -> str:
    """``"vit"`` or ``"mobilenet"`` for the reference's names (and the bundled ones); ``ValueError`` otherwise."""
    kind = model_spec(model_name).kind if model_name in supported_model_names() else "generic"
    if kind == "generic":
        raise ValueError(f"unsupported model name {model_name!r}; supported: {', '.join(supported_model_names())}")
    return kind


def default_prune_scope(model_name: str) -> str:
    return "conv_fc" if infer_model_kind(model_name) == "mobilenet" else "qkv_out_mlp"


def is_prunable_weight(model_name: str, prune_scope: str):
    """Predicate ``(module_name, module) -> bool`` selecting the weights a scope masks and trains."""
    from starfish_fast.models import scopes

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


def all_block_names(model_name: str, model: nn.Module) -> list[str]:
    """Every block of the model: ``blocks.{i}``, ``encoder.layers.encoder_layer_{i}`` or ``blocks.{stage}.{idx}``."""
    from starfish_fast.models.adapters import adapter_for

    infer_model_kind(model_name)
    return adapter_for(model).block_names(model)
