"""Structured-mask compaction: heal on smaller dense weights when whole MLP neurons or QK dims are pruned.

    found = find_compactions(model, masks, adapter_for(model, blocks))   # [] when nothing structured is pruned
    student, student_masks = compact_model(model, masks, found)
    ... heal student ...
    expand_into(model, student, found)                    # write the result back into the full shapes

MLP neurons. A hidden neuron j (fc1 row j, fc2 column j) whose fc1 row *and* fc2 column
are both masked contributes nothing to the block output: its fc2 column is zero, so
``act(x W1[j] + b1[j]) * W2[:, j] = 0`` whatever the frozen bias b1[j] is, and its masked
weights get no gradient and no Adam moments. fc1 loses the row, fc2 the column.

QK dimensions. A (head, dim) pair whose q row *and* k row of the fused qkv weight are both
masked has q = b_q and k = b_k (biases are frozen), so it adds the same ``b_q * b_k * scale``
to every logit of the head: softmax is shift-invariant, the attention output is unchanged.
The pair is dropped from the qkv rows, attention runs with q/k of ``qk_dim < head_dim``
(v keeps ``head_dim``) and the *original* scale ``head_dim ** -0.5``, passed explicitly to
``scaled_dot_product_attention``. Heads must keep the same count for the reshape: a head with
fewer live dims keeps some dead ones (they stay masked), so ``qk_dim`` is the largest count,
rounded up to a multiple of 8 (``QK_DIM_MULTIPLE``).

Fast mode on CPU swaps every attention layer for these modules, narrowed or not
(``find_compactions(..., every_attention=True)``): their attention core runs in fp32 under bf16
autocast, where CPU SDPA in bf16 is several times slower (numbers at ``attend``).

Either way the compacted student gives the same block outputs, losses and kept-weight
updates as the masked dense one with fewer FLOPs, and the kept weights are written back.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from starfish_fast.models import set_submodule

log = logging.getLogger(__name__)

# q/k head dims are padded (with dead dims) to a multiple of 8: CUDA's fused SDPA kernels need
# 8-element-aligned head dims and fall back to the slow math kernel otherwise.
QK_DIM_MULTIPLE = 8
# adapter family -> path of the attention module inside a block, name of its fused q|k|v weight and bias
ATTENTION_LAYERS = {"timm_vit": ("attn", "qkv.weight", "qkv.bias"),
                    "torchvision_vit": ("self_attention", "in_proj_weight", "in_proj_bias")}


@dataclass(frozen=True)
class Narrowing:
    """A parameter the compact model holds with only ``kept`` indices along ``dim``."""
    key: str                     # parameter key in the full model, e.g. "blocks.3.mlp.fc1.weight"
    dim: int                     # 0: rows kept, 1: columns kept
    kept: torch.Tensor           # (n_kept,) int64 indices, ascending


@dataclass(frozen=True)
class MlpCompaction:
    fc1: str                     # module path of fc1, e.g. "blocks.3.mlp.fc1"
    fc2: str
    kept: torch.Tensor           # (H',) indices of the hidden neurons that stay
    hidden: int                  # H, the full hidden width
    fc1_bias: bool

    def narrowings(self) -> list[Narrowing]:
        rows = [Narrowing(f"{self.fc1}.weight", 0, self.kept), Narrowing(f"{self.fc2}.weight", 1, self.kept)]
        return rows + ([Narrowing(f"{self.fc1}.bias", 0, self.kept)] if self.fc1_bias else [])

    def replace(self, compact: nn.Module) -> None:
        fc1, fc2 = compact.get_submodule(self.fc1), compact.get_submodule(self.fc2)
        kept = self.kept.to(fc1.weight.device)
        set_submodule(compact, self.fc1, _sliced_linear(fc1, kept, None))
        set_submodule(compact, self.fc2, _sliced_linear(fc2, None, kept))

    def summary(self) -> tuple[str, int, int]:
        return "MLP hidden neurons", self.hidden - self.kept.numel(), self.hidden


@dataclass(frozen=True)
class QkCompaction:
    attention: str               # module path, e.g. "blocks.3.attn"
    weight: str                  # fused q|k|v weight key, e.g. "blocks.3.attn.qkv.weight"
    bias: str | None             # its bias key (None without bias)
    kept_rows: torch.Tensor      # (2 * heads * qk_dim + heads * head_dim,) rows of [q | k | v] that stay
    heads: int
    qk_dim: int                  # q/k dims kept per head
    head_dim: int

    def narrowings(self) -> list[Narrowing]:
        rows = [Narrowing(self.weight, 0, self.kept_rows)]
        return rows + ([Narrowing(self.bias, 0, self.kept_rows)] if self.bias else [])

    def replace(self, compact: nn.Module) -> None:
        attention = compact.get_submodule(self.attention)
        module_class = TimmCompactQkAttention if hasattr(attention, "qkv") else TorchvisionCompactQkAttention
        set_submodule(compact, self.attention, module_class(attention, self.kept_rows, self.qk_dim))

    def summary(self) -> tuple[str, int, int]:
        return "QK head dims", self.heads * (self.head_dim - self.qk_dim), self.heads * self.head_dim


def mlp_compactions(model: nn.Module, masks: dict[str, torch.Tensor], adapter) -> list[MlpCompaction]:
    """MLPs (``adapter``'s fc1/fc2 pairs in its blocks) with hidden neurons pruned in both fc1 (row) and
    fc2 (column)."""
    found = []
    for fc1, fc2 in adapter.mlp_pairs(model):
        fc1_mask, fc2_mask = masks.get(f"{fc1}.weight"), masks.get(f"{fc2}.weight")
        if fc1_mask is None or fc2_mask is None:
            continue
        alive = fc1_mask.bool().any(dim=1) | fc2_mask.bool().any(dim=0)           # (H,)
        if not alive.all():
            has_bias = model.get_submodule(fc1).bias is not None
            found.append(MlpCompaction(fc1, fc2, alive.nonzero().flatten(), alive.numel(), has_bias))
    return found


def qk_compactions(model: nn.Module, masks: dict[str, torch.Tensor], adapter, every_layer: bool = False
                   ) -> list[QkCompaction]:
    """Attention layers of ``adapter``'s blocks whose fused qkv mask removes (head, dim) pairs from both q
    and k; with ``every_layer`` also the others (nothing removed: they only get the CPU-friendly module)."""
    if adapter.family not in ATTENTION_LAYERS:
        return []
    attention_name, weight_name, bias_name = ATTENTION_LAYERS[adapter.family]
    parameters = dict(model.named_parameters())
    found = []
    for block in adapter.block_names(model):
        path = f"{block}.{attention_name}"
        attention = model.get_submodule(path)
        heads, head_dim = attention.num_heads, attention.head_dim
        inner = heads * head_dim                                                    # rows per q, k, v
        mask = masks.get(f"{path}.{weight_name}")
        alive_rows = mask.bool().any(dim=1).cpu() if mask is not None \
            else torch.ones(3 * inner, dtype=torch.bool)                           # (3 * inner,)
        alive = (alive_rows[:inner] | alive_rows[inner:2 * inner]).view(heads, head_dim)   # (heads, head_dim)
        live = int(alive.sum(1).max())
        qk_dim = min(head_dim, -(-live // QK_DIM_MULTIPLE) * QK_DIM_MULTIPLE)
        if qk_dim == head_dim and not every_layer:
            continue
        reason = unsupported_attention(attention)
        if reason:
            if qk_dim < head_dim:
                log.debug("%s: QK dims are pruned but not compacted (%s)", path, reason)
            continue
        # the live dims of each head, padded with its first dead ones up to qk_dim
        order = torch.sort((~alive).to(torch.int8), dim=1, stable=True).indices[:, :qk_dim]   # (heads, qk_dim)
        dims = (order.sort(dim=1).values + torch.arange(heads)[:, None] * head_dim).flatten()   # (heads * qk_dim,)
        kept_rows = torch.cat([dims, dims + inner, torch.arange(2 * inner, 3 * inner)])
        bias = f"{path}.{bias_name}" if f"{path}.{bias_name}" in parameters else None
        found.append(QkCompaction(path, f"{path}.{weight_name}", bias, kept_rows, heads, qk_dim, head_dim))
    return found


def find_compactions(model: nn.Module, masks: dict[str, torch.Tensor], adapter, *, mlp: bool = True,
                     qk: bool = True, every_attention: bool = False) -> list[MlpCompaction | QkCompaction]:
    """The MLPs (``mlp``) and attention layers (``qk``) of ``adapter``'s blocks that structured masks let us
    narrow, and with ``every_attention`` every supported attention layer, narrowed or not."""
    found = mlp_compactions(model, masks, adapter) if mlp else []
    if qk or every_attention:
        found += qk_compactions(model, masks if qk else {}, adapter, every_layer=every_attention)
    return found


def unsupported_attention(attention: nn.Module) -> str | None:
    """Why ``attention`` cannot be swapped for a compact one (None when it can)."""
    from timm.models.vision_transformer import Attention   # re-exported there by every timm 1.x

    if type(attention) is Attention:
        if not (isinstance(attention.q_norm, nn.Identity) and isinstance(attention.k_norm, nn.Identity)):
            return "q/k normalisation runs over the full head dim"
        if getattr(attention, "gate", None) is not None:
            return "gated attention"
        return None
    if type(attention) is nn.MultiheadAttention:
        if not (attention._qkv_same_embed_dim and attention.batch_first):
            return "separate q/k/v projections or batch_first=False"
        if attention.bias_k is not None or attention.add_zero_attn:
            return "bias_k/bias_v or add_zero_attn"
        return None
    return f"unknown attention module {type(attention).__name__}"


class _CompactQkAttention(nn.Module):
    """Self-attention on a fused projection whose q and k keep ``qk_dim`` dims per head."""
    heads: int
    qk_dim: int
    head_dim: int
    scale: float
    dropout: float

    def attend(self, qkv: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = qkv.shape                       # qkv: (B, N, 2 * heads * qk_dim + heads * head_dim)
        q, k, v = qkv.split([self.heads * self.qk_dim] * 2 + [self.heads * self.head_dim], dim=-1)
        q = q.view(batch, tokens, self.heads, self.qk_dim).transpose(1, 2)        # (B, heads, N, qk_dim)
        k = k.view(batch, tokens, self.heads, self.qk_dim).transpose(1, 2)        # (B, heads, N, qk_dim)
        v = v.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)      # (B, heads, N, head_dim)
        # the scale stays the full model's head_dim ** -0.5: the dropped dims only added a constant
        dropout = self.dropout if self.training else 0.0
        if qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16:
            # CPU SDPA forward+backward in bf16 took 9.9 ms vs 1.9 ms in fp32 (B=64, 2 heads, N=50, head
            # dim 32; 14.6 vs 12.5 ms at DeiT-tiny's 16x3x197x64), while bf16 GEMMs ran 4x faster than
            # fp32: under bf16 autocast the projections stay bf16 and the attention core runs in fp32
            # (autocast would cast SDPA's inputs back to bf16, hence disabled around it).
            with torch.autocast("cpu", enabled=False):
                x = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                   is_causal=is_causal, scale=self.scale, dropout_p=dropout)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                               dropout_p=dropout)                 # (B, heads, N, head_dim)
        x = x.to(qkv.dtype).transpose(1, 2)                                        # (B, N, heads, head_dim)
        return x.reshape(batch, tokens, self.heads * self.head_dim)               # (B, N, heads * head_dim)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, qk_dim={self.qk_dim}, head_dim={self.head_dim}"


class TimmCompactQkAttention(_CompactQkAttention):
    """Drop-in for timm's ``Attention`` (same parameter names: qkv, norm, proj)."""

    def __init__(self, attention: nn.Module, kept_rows: torch.Tensor, qk_dim: int):
        super().__init__()
        self.heads, self.qk_dim, self.head_dim = attention.num_heads, qk_dim, attention.head_dim
        self.scale, self.dropout = attention.scale, attention.attn_drop.p
        self.qkv = _sliced_linear(attention.qkv, kept_rows.to(attention.qkv.weight.device), None)
        # older timm Attention has no scale-norm (``norm``)
        self.norm = getattr(attention, "norm", None) or nn.Identity()
        self.proj, self.proj_drop = attention.proj, attention.proj_drop

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x = self.attend(self.qkv(x), attn_mask, is_causal)                        # (B, N, heads * head_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class TorchvisionCompactQkAttention(_CompactQkAttention):
    """Drop-in for the ``nn.MultiheadAttention`` of torchvision's ViT blocks (self-attention, batch first)."""

    def __init__(self, attention: nn.MultiheadAttention, kept_rows: torch.Tensor, qk_dim: int):
        super().__init__()
        self.heads, self.qk_dim, self.head_dim = attention.num_heads, qk_dim, attention.head_dim
        self.scale, self.dropout = attention.head_dim ** -0.5, attention.dropout
        kept_rows = kept_rows.to(attention.in_proj_weight.device)
        self.in_proj_weight = _sliced_parameter(attention.in_proj_weight, kept_rows)
        self.in_proj_bias = _sliced_parameter(attention.in_proj_bias, kept_rows) \
            if attention.in_proj_bias is not None else None
        self.out_proj = attention.out_proj

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if not (query is key is value) or key_padding_mask is not None or need_weights:
            raise ValueError("a QK-compacted attention only computes self-attention without padding masks or "
                             "returned weights (call it as attention(x, x, x, need_weights=False))")
        x = self.attend(F.linear(query, self.in_proj_weight, self.in_proj_bias), attn_mask, is_causal)
        return self.out_proj(x), None


def _sliced_parameter(parameter: torch.Tensor, rows: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(parameter.detach()[rows].clone(), requires_grad=parameter.requires_grad)


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight                          # (H', D) for fc1
    weight = weight[:, cols] if cols is not None else weight                       # (D, H') for fc2
    bias = linear.bias
    if bias is not None and rows is not None:
        bias = bias[rows]
    # skip_init: a plain nn.Linear would draw its initial weights from the global RNG, shifting every
    # later draw (dropout, stochastic depth) against the run without compaction
    out = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                   device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias.detach())
    out.weight.requires_grad_(linear.weight.requires_grad)
    if bias is not None:
        out.bias.requires_grad_(linear.bias.requires_grad)
    return out


def compact_model(model: nn.Module, masks: dict[str, torch.Tensor], compactions: list[MlpCompaction | QkCompaction]
                  ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` with the ``compactions``' layers narrowed, and the masks sliced to match."""
    compact = copy.deepcopy(model)
    for item in compactions:
        item.replace(compact)
    compact_masks = dict(masks)
    for narrowing in (n for item in compactions for n in item.narrowings()):
        if narrowing.key in masks:
            mask = masks[narrowing.key]
            compact_masks[narrowing.key] = mask.index_select(narrowing.dim, narrowing.kept.to(mask.device))
    removed: dict[str, list[int]] = {}
    for item in compactions:
        what, dropped, total = item.summary()
        removed.setdefault(what, [0, 0])
        removed[what][0] += dropped
        removed[what][1] += total
    for what, (dropped, total) in removed.items():
        if dropped:
            log.info("compacted %s: %d of %d removed", what, dropped, total)
    return compact, compact_masks


@torch.no_grad()
def expand_into(model: nn.Module, compact: nn.Module, compactions: list[MlpCompaction | QkCompaction]) -> None:
    """Copy every parameter and buffer of ``compact`` back into ``model`` (full shapes)."""
    narrowed = {n.key: n for item in compactions for n in item.narrowings()}
    full = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, value in list(compact.named_parameters()) + list(compact.named_buffers()):
        target, value = full[key], value.to(full[key].device)
        if key in narrowed:
            target.index_copy_(narrowed[key].dim, narrowed[key].kept.to(target.device), value)
        else:
            target.copy_(value)
