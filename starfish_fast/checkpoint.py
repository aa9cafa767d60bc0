"""Every file starfish_fast writes or reads: atomic writes, safe loading, the recovered checkpoint
and its JSON sidecar, resume checkpoints, and the dense export.

    from starfish_fast.checkpoint import load_tensor_file, save_recovered_checkpoint, export_dense
    state = load_tensor_file("model.pt")                    # weights_only=True; .safetensors too
    export_dense(model, masks, "healed.safetensors")        # masked zeros, the masks, JSON metadata

Writes go to a temporary file beside the destination, created with the permissions the umask
gives (as any other tool's output), then ``os.replace``d: an interruption never leaves a
half-written file. Loading uses ``torch.load(weights_only=True)``; a pickle that it refuses is
only unpickled with ``allow_unsafe_pickle=True``. A file that is not what it should be (empty,
text, truncated, a directory) is a ``ValueError`` naming the file and what it is not.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import secrets
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

RESUME_FORMAT = "starfish_fast.resume/2"
EXPORT_FORMAT = "starfish_fast.dense_with_zeros.v1"
MASK_PREFIX = "mask."
RESERVED_METADATA = ("format", "mask_density")
RECOVERED_METADATA_KEYS = ("model_name", "dense_path", "mask_path", "calib_source", "calib_samples", "epochs",
                           "batch_size", "lr", "grad_checkpointing")


# ----------------------------------------------------------------------------- writing
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the body succeeds. The
    file ends with mode 0666 less the umask, like ``open(path, "w")``, whatever the writer did (safetensors
    creates its file afresh)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield str(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
    """A mask file: safetensors (with ``metadata``) for ``.safetensors``, else the reference's torch.save dict."""
    if str(path).endswith(".safetensors"):
        save_safetensors_atomic(masks, path, metadata)
    else:
        save_torch_atomic({key: value.detach().cpu() for key, value in masks.items()}, path)


# ----------------------------------------------------------------------------- loading
def load_tensor_file(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Any:
    """Load a ``.safetensors`` file or a ``torch.save`` file (``weights_only=True`` unless
    ``allow_unsafe_pickle``: only for files from a trusted source, unpickling can run any code)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a checkpoint or mask file")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint or mask file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    is_zip, is_pickle = head[:4] == b"PK\x03\x04", head[:1] == b"\x80"
    if not (is_zip or is_pickle):
        looks = "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "other data"
        raise ValueError(f"{path} is not a torch.save or safetensors file (it starts with {head!r}: {looks})")
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle, mmap=is_zip)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() and not allow_unsafe_pickle:
            reason = next((line.strip() for line in str(error).splitlines() if "Unsupported" in line), "")
            raise ValueError(f"{path} holds Python objects that weights_only=True refuses"
                             f"{f' ({reason})' if reason else ''}; if you trust this file, pass the unsafe-pickle "
                             f"opt-in (allow_unsafe_pickle=True / --allow-unsafe-pickle)") from None
        raise ValueError(f"{path} is not a valid torch.save file ({_first_line(error)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(f"{path} is truncated or corrupt ({_first_line(error)})") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) on bad files
        raise ValueError(f"{path} is not a valid safetensors file ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def extract_state_dict(checkpoint: Any) -> dict[str, torch.Tensor] | None:
    """The reference's rule: None for an ``nn.Module``; a non-empty str -> tensor mapping as is; else
    its ``"state_dict"`` entry if that is one; else ``ValueError``."""
    if isinstance(checkpoint, nn.Module):
        return None
    if _is_state_dict(checkpoint):
        return dict(checkpoint)
    if isinstance(checkpoint, Mapping) and _is_state_dict(checkpoint.get("state_dict")):
        return dict(checkpoint["state_dict"])
    raise ValueError(f"expected a state dict (str -> tensor) or {{'state_dict': ...}}, got {type(checkpoint).__name__}"
                     + (f" with keys {sorted(map(str, checkpoint))[:5]}" if isinstance(checkpoint, Mapping) else ""))


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


# ----------------------------------------------------------------------------- the recovered checkpoint
def recovered_metadata(args: Mapping | Any, blocks, history, before, after, mask_density_value) -> dict:
    """The reference's metadata keys; NaN top-1 (not evaluated) becomes null."""
    values = dict(args) if isinstance(args, Mapping) else vars(args)
    metadata = {key: values.get(key) for key in RECOVERED_METADATA_KEYS}
    metadata.update(blocks=list(blocks), history=list(history), top1_before=before, top1_after=after,
                    mask_density=mask_density_value)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metadata.items()}


def save_recovered_checkpoint(*, path, model: nn.Module, args, blocks, history, before, after,
                              mask_density_value) -> None:
    """``{"state_dict", "metadata"}`` with torch.save and the metadata as JSON at ``<path>.json``; atomic."""
    metadata = recovered_metadata(args, blocks, history, before, after, mask_density_value)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "metadata": metadata}, tmp)
        save_json_atomic(metadata, os.fspath(path) + ".json")


# ----------------------------------------------------------------------------- resume checkpoints
def tensor_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_resume(path: str | os.PathLike, state: dict) -> None:
    """Write a resume checkpoint: ``state`` holds step, model, optimizer, step_losses, fingerprints,
    world_size and the RNG states (the engine's ``_resume_state``)."""
    save_torch_atomic({"format": RESUME_FORMAT, **state}, path)


def load_resume(path: str | os.PathLike, fingerprints: Mapping[str, str], world_size: int = 1) -> dict | None:
    """The checkpoint at ``path`` (None when there is none), refused with a ``ValueError`` when it was
    written by another run (masks, dense model, data or settings differ) or another world size."""
    if not os.path.exists(path):
        log.info("no resume checkpoint at %s: starting from step 0", path)
        return None
    state = load_tensor_file(path)
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not a starfish_fast resume checkpoint (format {RESUME_FORMAT})")
    for key, value in fingerprints.items():
        if state["fingerprints"].get(key) != value:
            raise ValueError(f"refusing to resume from {path}: the {key.replace('_', ' ')} differs from the "
                             f"checkpoint's (fingerprint {state['fingerprints'].get(key, '?')[:12]} vs {value[:12]})")
    if state.get("world_size", 1) != world_size:
        raise ValueError(f"refusing to resume from {path}: it was written by {state.get('world_size', 1)} "
                         f"process(es), this run has {world_size}")
    return state


# ----------------------------------------------------------------------------- the dense export
def _bool_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks as CPU bool tensors, checked against the model's state dict (name, shape, 0/1)."""
    state = model.state_dict()
    checked = {}
    for key, mask in masks.items():
        if key not in state:
            raise ValueError(f"mask {key!r} names no tensor of the model's state dict")
        if tuple(mask.shape) != tuple(state[key].shape):
            raise ValueError(f"mask {key!r} has shape {tuple(mask.shape)} but the weight has {tuple(state[key].shape)}")
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask {key!r} is not binary (0/1 or bool)")
        checked[key] = mask.detach().to("cpu", torch.bool)
    return checked


def export_dense(model: nn.Module, masks: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping | None = None) -> None:
    """The state dict with masked weights zeroed, every mask as ``mask.<weight key>`` and JSON metadata
    (the caller's entries plus ``format`` and ``mask_density``) in one safetensors file, atomically.
    Masked positions that are not zero in the model are zeroed, with a warning."""
    metadata = dict(metadata or {})
    clash = [key for key in RESERVED_METADATA if key in metadata]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by the export format")
    bool_masks = _bool_masks(model, masks)
    tensors = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    if any(key.startswith(MASK_PREFIX) for key in tensors):
        raise ValueError(f"the model has state-dict keys starting with {MASK_PREFIX!r}; they would clash with masks")
    for key, mask in bool_masks.items():
        stray = int(torch.count_nonzero(tensors[key][~mask]))
        if stray:
            log.warning("%s: %d masked weights were not zero; the export zeroes them", key, stray)
        tensors[key] = torch.where(mask, tensors[key], torch.zeros((), dtype=tensors[key].dtype))
        tensors[MASK_PREFIX + key] = mask
    header = {key: json.dumps(value, default=str) for key, value in metadata.items()}
    header["format"] = json.dumps(EXPORT_FORMAT)
    kept, total = sum(int(m.sum()) for m in bool_masks.values()), sum(m.numel() for m in bool_masks.values())
    header["mask_density"] = json.dumps(kept / total if total else float("nan"))
    save_safetensors_atomic(tensors, path, metadata=header)


def load_exported(path: str | os.PathLike, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """Load an ``export_dense`` file into ``model`` (strictly); returns its bool masks and metadata."""
    from safetensors import safe_open

    tensors = load_tensor_file(path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if json.loads(header.get("format", "null")) != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a starfish_fast export (metadata format {header.get('format')!r}, "
                         f"expected {EXPORT_FORMAT!r})")
    masks = {key[len(MASK_PREFIX):]: value for key, value in tensors.items() if key.startswith(MASK_PREFIX)}
    model.load_state_dict({key: value for key, value in tensors.items() if not key.startswith(MASK_PREFIX)},
                          strict=True)
    return masks, {key: json.loads(value) for key, value in header.items()}
