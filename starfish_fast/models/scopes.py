"""Prune scopes: which modules' weights a scope masks and trains.

    from starfish_fast.models.scopes import generic_predicate, prunable_weights
    predicate = generic_predicate(model, blocks, "linear")      # (module name, module) -> bool
    weights = prunable_weights(model, predicate)                # {state_dict key: parameter}

The reference's scopes keep its exact semantics: for ViTs (timm names ``.attn.qkv``, ``.attn.proj``,
``.mlp.fc1``, ``.mlp.fc2``; torchvision's ``self_attention`` in-projection, ``out_proj`` and ``mlp``
linears) ``qkv``, ``qkv_out``, ``qkv_out_mlp``, ``mlp``, ``qk``, ``qk_mlp``; for MobileNetV1
``conv_only``, ``fc_only``, ``conv_fc``, ``conv_dw``, ``all``. Any other model gets the generic scopes:
``linear``, ``conv`` (non-depthwise convolutions), ``conv_dw`` (all convolutions), ``attn`` (linears
under an attention module), ``mlp`` (linears under an MLP / feed-forward module) and ``all``; the
classifier head is never in them, the stem (what runs before the first block) only in ``all``. Causal
language models (``models.hf``) get ``all``, ``attn`` and ``mlp`` over their decoder layers' linears.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

from torch import nn

WeightPredicate = Callable[[str, nn.Module], bool]
VIT_SCOPES = ("qkv", "qkv_out", "qkv_out_mlp", "mlp", "qk", "qk_mlp")
MOBILENET_SCOPES = ("conv_only", "fc_only", "conv_fc", "conv_dw", "all")
GENERIC_SCOPES = ("linear", "conv", "conv_dw", "attn", "mlp", "all")
DECODER_SCOPES = ("all", "attn", "mlp")
ATTENTION_SEGMENT = re.compile(r"(^|\.)(attn|attention|self_attention|self_attn|mha)(\.|$)")
MLP_SEGMENT = re.compile(r"(^|\.)(mlp|ffn|feed_forward|ff)(\.|$)")


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's c_attn, c_proj, c_fc): a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def get_weight_key_and_tensor(name: str, module: nn.Module):
    """``nn.Linear``/``nn.Conv2d``/transformers ``Conv1D`` -> ``name.weight``; ``nn.MultiheadAttention`` (and its QK-compacted
    stand-in) -> ``name.in_proj_weight``; anything else -> (None, None)."""
    prefix = f"{name}." if name else ""
    if isinstance(module, (nn.Linear, nn.Conv2d)) or is_hf_conv1d(module):
        return prefix + "weight", module.weight
    if isinstance(getattr(module, "in_proj_weight", None), nn.Parameter):
        return prefix + "in_proj_weight", module.in_proj_weight
    return None, None


def prunable_weights(model: nn.Module, predicate: WeightPredicate) -> dict[str, nn.Parameter]:
    """``{state_dict key: parameter}`` of every weight the predicate selects, in module order."""
    selected = {}
    for name, module in model.named_modules():
        if predicate(name, module):
            key, tensor = get_weight_key_and_tensor(name, module)
            if key is not None:
                selected[key] = tensor
    return selected


def pattern_predicate(patterns: Sequence[str]) -> WeightPredicate:
    compiled = [re.compile(p) for p in patterns]

    def predicate(name: str, module: nn.Module) -> bool:
        key, _ = get_weight_key_and_tensor(name, module)
        return key is not None and any(p.search(name) for p in compiled)

    return predicate


def timm_vit_predicate(scope: str) -> WeightPredicate:
    attention, out, mlp = (r"\.attn\.qkv$",), (r"\.attn\.proj$",), (r"\.mlp\.fc1$", r"\.mlp\.fc2$")
    return pattern_predicate(_vit_roles(scope, attention, out, mlp))


def torchvision_vit_predicate(scope: str) -> WeightPredicate:
    # the MultiheadAttention module (its in_proj_weight), its out_proj; MLPBlock = Linear, GELU, Dropout, Linear
    attention, out, mlp = (r"\.self_attention$",), (r"\.self_attention\.out_proj$",), (r"\.mlp\.0$", r"\.mlp\.3$")
    return pattern_predicate(_vit_roles(scope, attention, out, mlp))


def _vit_roles(scope, attention, out, mlp) -> tuple[str, ...]:
    return {"qkv": attention, "qk": attention, "qkv_out": attention + out, "qkv_out_mlp": attention + out + mlp,
            "mlp": mlp, "qk_mlp": attention + mlp}[scope]


def _is_conv(module: nn.Module, depthwise_too: bool) -> bool:
    return isinstance(module, nn.Conv2d) and (depthwise_too or module.groups == 1)


def mobilenet_predicate(scope: str) -> WeightPredicate:
    def predicate(name: str, module: nn.Module) -> bool:
        linear = isinstance(module, nn.Linear)
        return {"conv_only": _is_conv(module, False), "fc_only": linear, "conv_fc": _is_conv(module, False) or linear,
                "conv_dw": _is_conv(module, True), "all": _is_conv(module, True) or linear}[scope]

    return predicate


def classifier_prefix(model: nn.Module) -> str:
    """Module name of the classifier head: timm's ``get_classifier()``, else the top-level child that
    holds the model's last ``nn.Linear`` (torchvision's ``fc``, ``classifier``, ``heads``)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        name = next((n for n, m in model.named_modules() if m is head), None)
        if name:
            return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1].split(".")[0] if linears else "\0"


def generic_predicate(model: nn.Module, blocks: Sequence[str], scope: str) -> WeightPredicate:
    """The generic scopes over ``model`` whose blocks are ``blocks`` (module names, in order)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    first_block = min((order[b] for b in blocks if b in order), default=0)
    head = classifier_prefix(model)

    def predicate(name: str, module: nn.Module) -> bool:
        key, _ = get_weight_key_and_tensor(name, module)
        if key is None or name == head or name.startswith(head + "."):
            return False
        if scope != "all" and order.get(name, 0) < first_block:
            return False                                    # the stem: only in "all"
        attention = isinstance(module, nn.MultiheadAttention) or bool(ATTENTION_SEGMENT.search(name))
        return {"linear": isinstance(module, (nn.Linear, nn.MultiheadAttention)),
                "conv": _is_conv(module, False), "conv_dw": _is_conv(module, True),
                "attn": attention and not isinstance(module, nn.Conv2d),
                "mlp": isinstance(module, nn.Linear) and bool(MLP_SEGMENT.search(name)) and not attention,
                "all": True}[scope]

    return predicate


def generic_default_scope(model: nn.Module, blocks: Sequence[str]) -> str:
    """``linear`` or ``conv``, whichever holds more weights outside the stem and head (transformers and
    ConvNeXt-style MLP blocks: linear; ResNets, EfficientNets, RegNets: conv)."""
    counts = {scope: sum(w.numel() for w in prunable_weights(model, generic_predicate(model, blocks, scope)).values())
              for scope in ("linear", "conv")}
    return max(counts, key=counts.get)


def decoder_predicate(blocks: Sequence[str], scope: str) -> WeightPredicate:
    """The decoder scopes of a causal LM whose decoder layers are ``blocks``: ``all`` (every linear and
    ``Conv1D`` inside them), ``attn`` (those under the attention module: q/k/v/o, GPT-2's c_attn and
    c_proj), ``mlp`` (the rest: gate/up/down, fc1/fc2, GPT-2's c_fc and c_proj). Embeddings and the LM
    head sit outside the layers: never in a scope."""
    inside = re.compile("^(" + "|".join(re.escape(b) for b in blocks) + r")\.")

    def predicate(name: str, module: nn.Module) -> bool:
        key, _ = get_weight_key_and_tensor(name, module)
        if key is None or isinstance(module, nn.Conv2d) or not inside.match(name):
            return False
        attention = bool(ATTENTION_SEGMENT.search(name))
        return {"all": True, "attn": attention, "mlp": not attention}[scope]

    return predicate
