"""Where model names come from, one small class per source in the table ``SOURCES`` that the registry
walks in order (timm's ``register_model`` spirit): Hugging Face models, the reference library's ten
names, the bundled Fashion-MNIST models, timm, torchvision. Each source says which names it claims and,
for an architecture of its own, how to build it, load its pretrained weights and transform its images.

    from starfish_fast.models.sources import SOURCES, ModelSource, register_source

    @register_source
    class MySource(ModelSource):
        name = "mine"
        def claim(self, name): return name.removeprefix("mine/") if name.startswith("mine/") else None
        def build(self, arch, **kwargs): return build_mine(arch, **kwargs)

Errors name the Python argument at fault in backticks (``pretrained=True``, ``dense_path=FILE``); the
command line shows its flag there instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from starfish_fast.checkpoint import error_line, no_new_empty_dirs, unreachable
from starfish_fast.models.reference import REFERENCE_MODELS, TORCHVISION_MODELS

# arguments timm's build_model_with_cfg takes itself; the others go to the model class
TIMM_BUILDER_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "features_only",
                       "feature_cfg", "kwargs_filter", "pretrained_filter_fn")


@dataclass(frozen=True)
class PretrainedWeights:
    where: str                 # what and where, for messages
    url: str                   # whose host must answer for a download
    cached: str | None         # the file in the library's cache, if there
    cache_dir: str
    offline: str | None        # the hub's offline mode, when on


class ModelSource:
    """One source of model names. ``claim`` maps a name to the source's own architecture name (None: not
    its name); ``build`` makes the architecture with random weights, ``pretrained`` with its weights,
    ``transform`` is the transform for image files."""
    name = ""                  # ModelSpec.source
    fixed = False              # the architecture takes no arguments (the reference's, a bundled one)
    builder_kwargs: tuple[str, ...] = ()     # arguments the library's builder takes beside the class's

    def claim(self, name: str) -> str | None:
        raise NotImplementedError

    def names(self) -> Iterable[str]:
        """The names it knows, for the close matches of an unknown one."""
        return ()

    def build(self, arch: str, **kwargs) -> nn.Module:
        raise NotImplementedError

    def pretrained(self, spec, pretrained_file: str | None = None, **kwargs) -> nn.Module:
        raise NotImplementedError

    def takes_file(self, arch: str) -> bool:
        """Whether timm loads its pretrained weights, so that ``pretrained_file`` applies."""
        return False

    def transform(self, arch: str, model: nn.Module):
        return timm_transform(model)         # the model's own data config, as timm reads it from any model


SOURCES: list[ModelSource] = []


def register_source(cls: type[ModelSource]) -> type[ModelSource]:
    """Add ``cls`` (one instance) to ``SOURCES``: asked after the sources registered before it."""
    SOURCES.append(cls())
    return cls


def source_named(name: str) -> ModelSource:
    found = [source for source in SOURCES if source.name == name]
    if not found:
        raise ValueError(f"unknown model source {name!r}; registered: {', '.join(s.name for s in SOURCES)}")
    return found[0]


class LibrarySource(ModelSource):
    """A library that downloads pretrained weights into its cache: asked whether they are there (or can be
    fetched now) before fetching, so that an offline run fails at once and leaves no empty cache folder."""

    def pretrained(self, spec, pretrained_file: str | None = None, **kwargs) -> nn.Module:
        if pretrained_file:
            if not self.takes_file(spec.arch):
                raise ValueError(f"`pretrained_file` is for timm models; {spec.name} is a {spec.source} model "
                                 f"(use `dense_path` for a local checkpoint)")
            return self.fetch(spec, "`pretrained_file`", str(pretrained_file), pretrained_file, **kwargs)
        weights = self.weights(spec)
        others = "`dense_path=FILE`" + (" or `pretrained_file=FILE`" if self.takes_file(spec.arch) else "")
        if weights.cached is None:
            problem = weights.offline or unreachable(weights.url)
            if problem:
                raise ValueError(f"`pretrained=True`: {spec.name}'s weights ({weights.where}) are not in the local "
                                 f"cache ({weights.cache_dir}) and cannot be downloaded: {problem}; give local "
                                 f"weights with {others} (or `random_init=True` for an untrained dry run)")
        with no_new_empty_dirs(weights.cache_dir):
            return self.fetch(spec, "`pretrained=True`", weights.where, weights.cached, **kwargs)

    def fetch(self, spec, argument: str, where: str, file: str | None, **kwargs) -> nn.Module:
        """The library's own pretrained loading (from ``file`` when given); any failure one line."""
        try:
            return self.load(spec.arch, file, **kwargs)
        except Exception as error:   # urllib's, the hub's and torch.load's errors: all end here, in one line
            raise ValueError(f"{argument}: {spec.name} could not load its weights ({where}): {error_line(error)}; "
                             f"give local weights with `dense_path=FILE`") from error

    def load(self, arch: str, file: str | None, **kwargs) -> nn.Module:
        raise NotImplementedError

    def weights(self, spec) -> PretrainedWeights:
        """Where the library would fetch ``spec``'s pretrained weights from, and whether its cache holds them."""
        raise NotImplementedError


@register_source
class HuggingFaceSource(ModelSource):
    """A model directory (config.json), a ``.gguf`` file, a packaged name or ``hf/<hub id>`` from the local
    cache (``models.hf``): its own files are its weights."""
    name = "hf"

    def claim(self, name: str) -> str | None:
        from starfish_fast.models.hf import is_hf_name
        return name.removeprefix("hf/") if name.startswith("hf/") or is_hf_name(name) else None

    def build(self, arch: str, **kwargs) -> nn.Module:
        from starfish_fast.models.hf import build_hf_model
        return build_hf_model(arch, **kwargs)

    def pretrained(self, spec, pretrained_file: str | None = None, **kwargs) -> nn.Module:
        from starfish_fast.models.hf import load_hf_model
        return load_hf_model(spec.arch)


@register_source
class ReferenceSource(LibrarySource):
    """The reference library's names, with its exact semantics: timm ``create_model(name,
    pretrained=False, num_classes=1000)``, torchvision ``vit_b_16/vit_l_16``, the reference transform."""
    name = "reference"
    fixed = True

    def claim(self, name: str) -> str | None:
        return name if name in REFERENCE_MODELS else None

    def names(self) -> Iterable[str]:
        return REFERENCE_MODELS

    def library(self, arch: str) -> LibrarySource:
        return source_named("torchvision" if arch in TORCHVISION_MODELS else "timm")

    def build(self, arch: str, **kwargs) -> nn.Module:
        if arch in TORCHVISION_MODELS:
            import torchvision
            return getattr(torchvision.models, arch)(weights=None)
        import timm
        return timm.create_model(arch, pretrained=False, num_classes=1000)

    def takes_file(self, arch: str) -> bool:
        return self.library(arch).takes_file(arch)

    def load(self, arch: str, file: str | None, **kwargs) -> nn.Module:
        return self.library(arch).load(arch, file, **kwargs)

    def weights(self, spec) -> PretrainedWeights:
        return self.library(spec.arch).weights(spec)

    def transform(self, arch: str, model: nn.Module):
        from starfish_fast import data
        return data.build_transform()


@register_source
class BundledSource(ModelSource):
    """The Fashion-MNIST models trained here (``bundled``): their weights are committed."""
    name = "bundled"
    fixed = True

    def claim(self, name: str) -> str | None:
        from starfish_fast.bundled import BUNDLED_NAMES
        return name if name in BUNDLED_NAMES else None

    def names(self) -> Iterable[str]:
        from starfish_fast.bundled import BUNDLED_NAMES
        return BUNDLED_NAMES

    def build(self, arch: str, **kwargs) -> nn.Module:
        from starfish_fast.bundled import build_bundled_model
        return build_bundled_model(arch)

    def pretrained(self, spec, pretrained_file: str | None = None, **kwargs) -> nn.Module:
        raise ValueError(f"`pretrained=True`: {spec.name} is bundled: its trained weights load without it")

    def transform(self, arch: str, model: nn.Module):
        from starfish_fast import data
        return data.fashion_mnist_transform()


@register_source
class TimmSource(LibrarySource):
    """Any ``timm.list_models()`` name (``timm/NAME`` picks timm explicitly): timm's own data config."""
    name = "timm"
    builder_kwargs = TIMM_BUILDER_KWARGS

    def claim(self, name: str) -> str | None:
        import timm
        arch = name.removeprefix("timm/")
        return arch if "/" not in arch and timm.is_model(arch.split(".")[0]) else None

    def names(self) -> Iterable[str]:
        import timm
        return timm.list_models()

    def build(self, arch: str, **kwargs) -> nn.Module:
        import timm
        return timm.create_model(arch, pretrained=False, **kwargs)

    def takes_file(self, arch: str) -> bool:
        return True

    def load(self, arch: str, file: str | None, **kwargs) -> nn.Module:
        import timm
        # source "" makes timm read the file even for weights it would otherwise take from the hub
        overlay = {"pretrained_cfg_overlay": {"file": str(file), "source": ""}} if file else {}
        return timm.create_model(arch, pretrained=True, **overlay, **kwargs)

    def weights(self, spec) -> PretrainedWeights:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(spec.arch)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise ValueError(f"`pretrained=True`: timm has no pretrained weights for {spec.name}; give "
                             f"`dense_path=FILE` or `pretrained_file=FILE`")
        if not cfg.hf_hub_id:
            return hub_checkpoint(cfg.url)
        # timm prefers the hub whenever huggingface_hub is installed (it is: timm needs it)
        from huggingface_hub import constants, try_to_load_from_cache
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        found = [try_to_load_from_cache(repo, name, revision=revision or None) for name in names]
        return PretrainedWeights(f"{cfg.hf_hub_id} on the Hugging Face hub", f"{constants.ENDPOINT}/{repo}",
                                 next((path for path in found if isinstance(path, str)), None),
                                 str(constants.HF_HUB_CACHE),
                                 "the hub's offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
                                 else None)


@register_source
class TorchvisionSource(LibrarySource):
    """Any torchvision classification model (``torchvision/NAME`` picks torchvision explicitly): its
    weights' own transforms."""
    name = "torchvision"

    def claim(self, name: str) -> str | None:
        arch = name.removeprefix("torchvision/")
        return arch if arch in self.names() else None

    def names(self) -> Iterable[str]:
        import torchvision
        return torchvision.models.list_models(module=torchvision.models)

    def build(self, arch: str, **kwargs) -> nn.Module:
        import torchvision
        return torchvision.models.get_model(arch, weights=None, **kwargs)

    def load(self, arch: str, file: str | None, **kwargs) -> nn.Module:
        import torchvision
        return torchvision.models.get_model(arch, weights="DEFAULT", **kwargs)

    def weights(self, spec) -> PretrainedWeights:
        import torchvision
        try:
            return hub_checkpoint(torchvision.models.get_model_weights(spec.arch).DEFAULT.url)
        except (ValueError, AttributeError, KeyError):
            raise ValueError(f"`pretrained=True`: torchvision has no pretrained weights for {spec.name}; give "
                             f"`dense_path=FILE`") from None

    def transform(self, arch: str, model: nn.Module):
        import torchvision
        try:
            return torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        except (ValueError, AttributeError):             # a model without published weights
            from starfish_fast import data
            return data.build_transform()


def hub_checkpoint(url: str) -> PretrainedWeights:
    """Weights torch.hub downloads from ``url`` into its checkpoints folder."""
    from urllib.parse import urlsplit

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    file = hub / Path(urlsplit(url).path).name
    return PretrainedWeights(url, url, str(file) if file.is_file() else None, str(hub), None)


def input_channels(model: nn.Module) -> int:
    """The channels the model's first convolution takes (3 when it has none)."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else 3


def timm_transform(model: nn.Module):
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
