"""Every file starfish_fast writes or reads: atomic writes, safe loading, the recovered checkpoint
and its JSON sidecar, resume checkpoints, the dense export, and the checks the command line runs on
its paths before any work.

    from starfish_fast.checkpoint import load_tensor_file, read_state_dict, save_recovered_checkpoint, export_dense
    state = load_tensor_file("model.pt")                    # weights_only=True; .safetensors too
    weights = read_state_dict("outputs/recovered.pt")       # any weights file: state dict, recovered, export
    export_dense(model, masks, "healed.safetensors")        # the state dict (masked zeros) and JSON metadata
    check_output_path("outputs/recovered.pt", "--output-path")      # before any work: can it be written?
    save_pretrained_with_masks(lm, "healed_lm", masks, tokenizer)   # a transformers checkpoint directory

Writes go to a temporary file beside the destination, created with the permissions the umask
gives (as any other tool's output), then ``os.replace``d: an interruption never leaves a
half-written file. Loading uses ``torch.load(weights_only=True)``; a pickle that it refuses is
only unpickled with ``allow_unsafe_pickle=True``. A file that is not what it should be (empty,
text, truncated, a directory) is a ``ValueError`` naming the file and what it is not; so is a
file of another kind than asked for (masks given as weights, a resume checkpoint as a model).
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

from starfish_fast.checks import MASKS_FILE, check_output_dir, check_output_path  # noqa: F401 (their home: torch-free)
from starfish_fast.packed_masks import pack, packed_header, packed_shapes, unpack

log = logging.getLogger(__name__)

RESUME_FORMAT = "starfish_fast.resume/2"
EXPORT_FORMAT = "starfish_fast.dense_with_zeros.v2"
EXPORT_FORMAT_V1 = "starfish_fast.dense_with_zeros.v1"   # also held every mask as a mask.<key> tensor
MASK_PREFIX = "mask."
RESERVED_METADATA = ("format", "mask_density", "masked_weights")
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
    """A mask file: for ``.safetensors`` bit-packed (``packed_masks``, with ``metadata``), else the reference's
    torch.save dict of bool tensors."""
    if str(path).endswith(".safetensors"):
        save_safetensors_atomic({key: pack(value) for key, value in masks.items()}, path,
                                packed_header({key: tuple(value.shape) for key, value in masks.items()}, metadata))
    else:
        save_torch_atomic({key: value.detach().cpu() for key, value in masks.items()}, path)


# ----------------------------------------------------------------------------- loading
def load_tensor_file(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Any:
    """Load a ``.safetensors`` file or a ``torch.save`` file (``weights_only=True`` unless
    ``allow_unsafe_pickle``: only for files from a trusted source, unpickling can run any code)."""
    path = Path(path)
    head = _check_readable(path)
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
                             f"opt-in (`allow_unsafe_pickle=True`)") from None
        raise ValueError(f"{path} is not a valid torch.save file ({error_line(error)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(f"{path} is truncated or corrupt ({error_line(error)})") from None


def _check_readable(path: Path) -> bytes:
    """The first 8 bytes of ``path``; an error unless it is a non-empty file."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a checkpoint or mask file")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint or mask file")
    return head


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file; a bit-packed mask file's masks unpacked to bool."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = packed_shapes(f.metadata())
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) on bad files
        raise ValueError(f"{path} is not a valid safetensors file ({error_line(error)})") from None
    if shapes is None:
        return tensors
    try:
        return {key: unpack(value, shapes[key]) for key, value in tensors.items()}
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path} is a corrupt packed mask file ({error_line(error)})") from None


def error_line(error: BaseException, root_cause: bool = False) -> str:
    """``Type: the first line of its message``: how a caught library error appears in a one-line message.
    With ``root_cause``, that of the error it wraps, innermost (dynamo's BackendCompilerFailed wraps the
    compiler's), as ``Outer <- Root: first line``."""
    root = error
    while root_cause:
        inner = getattr(root, "inner_exception", None) or root.__cause__ or \
            (None if root.__suppress_context__ else root.__context__)
        if inner is None or inner is root:
            break
        root = inner
    text = str(root).strip().splitlines()
    outer = "" if root is error else f"{type(error).__name__} <- "
    return f"{outer}{type(root).__name__}: {text[0] if text else ''}"


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


# ----------------------------------------------------------------------------- what a file holds
# file kind -> how a message names it; what each reader accepts; the flag that takes each kind
KIND_WORDS = {"resume": "a resume checkpoint", "recovered": "a healed checkpoint (recover's output)",
              "export": "a weights export (recover's `export`)", "masks": "a mask file (every tensor bool)",
              "weights": "model weights", "module": "a pickled nn.Module (not a state dict)",
              "other": "neither weights nor masks"}
WANTED = {"weights": ("model weights (a state dict, recover's checkpoint or its `export`)",
                      ("weights", "recovered", "export")),
          "masks": ("a mask file (weight name -> 0/1 tensor, as `starfish-fast prune` writes)", ("masks", "weights")),
          "resume": ("a starfish_fast resume checkpoint", ("resume",))}
KIND_HINTS = {"masks": "; give it as `mask_path`", "resume": "; it continues its own run (recover's `resume`)",
              "recovered": "; give it as `dense_path` or `checkpoint`",
              "export": "; give it as `dense_path` or `checkpoint`"}


def file_kind(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> str:
    """What a tensor file holds: "resume", "recovered" (``{"state_dict", "metadata"}``), "export",
    "masks" (every tensor bool), "weights" (a state dict or ``{"state_dict": ...}``), "module" or "other".
    A safetensors file is judged by its header alone; a torch file is memory-mapped."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return _object_kind(load_tensor_file(path, allow_unsafe_pickle=allow_unsafe_pickle))
    _check_readable(path)
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, dtypes = f.metadata() or {}, [f.get_slice(key).get_dtype() for key in f.keys()]
    except Exception as error:  # safetensors raises its own SafetensorError on a bad header
        raise ValueError(f"{path} is not a valid safetensors file ({error_line(error)})") from None
    if metadata.get("format") in (json.dumps(EXPORT_FORMAT), json.dumps(EXPORT_FORMAT_V1)):
        return "export"
    if packed_shapes(metadata) is not None:
        return "masks"
    return "other" if not dtypes else "masks" if all(d == "BOOL" for d in dtypes) else "weights"


def _object_kind(value: Any) -> str:
    if isinstance(value, nn.Module):
        return "module"
    if isinstance(value, Mapping) and value.get("format") == RESUME_FORMAT:
        return "resume"
    if _is_state_dict(value):
        return "masks" if all(v.dtype == torch.bool for v in value.values()) else "weights"
    if isinstance(value, Mapping) and _is_state_dict(value.get("state_dict")):
        return "recovered" if "metadata" in value else "weights"
    return "other"


def check_input_file(path: str | os.PathLike, flag: str, wanted: str, allow_unsafe_pickle: bool = False) -> str:
    """The kind of file ``path`` holds (``file_kind``), or a one-line error naming ``flag``, the path and
    what it is, when it is missing, unreadable or not a kind ``wanted`` ("weights", "masks", "resume") takes."""
    return _accepted(_flagged(file_kind, path, flag, allow_unsafe_pickle), path, flag, wanted)


def _flagged(read, path, flag: str, allow_unsafe_pickle: bool):
    """``read(path, allow_unsafe_pickle)``, a missing file or a ``ValueError`` naming ``flag``."""
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{f'{flag} {path}' if flag else path}: no such file")
    try:
        return read(path, allow_unsafe_pickle)
    except ValueError as error:
        raise ValueError(f"{flag} {error}" if flag else str(error)) from None


def _accepted(kind: str, path, flag: str, wanted: str) -> str:
    words, accepted = WANTED[wanted]
    if kind not in accepted:
        what = f"{flag} {path}" if flag else str(path)
        raise ValueError(f"{what} is {KIND_WORDS[kind]}, not {words}{KIND_HINTS.get(kind, '')}")
    return kind


def read_state_dict(path: str | os.PathLike, allow_unsafe_pickle: bool = False, flag: str = "") -> dict:
    """The model weights in ``path``: a state dict, ``{"state_dict": ...}`` (recover's checkpoint) or an
    ``export_dense`` file (a v1 export's mask tensors left out); a ``ValueError`` for any other kind."""
    if Path(path).suffix == ".safetensors":          # the header tells the kind; then one load
        kind = check_input_file(path, flag, "weights")
        value = load_tensor_file(path)
    else:                                             # a torch file is loaded once and judged by what it holds
        value = _flagged(load_tensor_file, path, flag, allow_unsafe_pickle)
        kind = _accepted(_object_kind(value), path, flag, "weights")
    state = extract_state_dict(value)
    return {k: v for k, v in state.items() if not k.startswith(MASK_PREFIX)} if kind == "export" else state


def key_examples(keys, limit: int = 3) -> str:
    """The first ``limit`` keys (sorted) and how many there are in all: a message stays one short line."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def state_dict_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str | None:
    """How the state dict ``found`` differs from a model's ``expected`` one (tensors or shapes), summarised
    (counts and the first keys), or None when every key and shape agrees."""
    expected, found = ({key: tuple(getattr(value, "shape", value)) for key, value in side.items()}
                       for side in (expected, found))
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    shapes = sorted(key for key in expected if key in found and found[key] != expected[key])
    parts = [f"{len(missing)} missing keys ({key_examples(missing)})" if missing else "",
             f"{len(unexpected)} unexpected keys ({key_examples(unexpected)})" if unexpected else "",
             "; ".join(f"size mismatch for {key}: {found[key]} in the file, {expected[key]} in the model"
                       for key in shapes[:2]) + (f" (and {len(shapes) - 2} more)" if len(shapes) > 2 else "")]
    return ", ".join(part for part in parts if part) or None


def weight_shapes(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> dict[str, tuple]:
    """The shape of every tensor ``read_state_dict`` would return, from a safetensors header alone or a
    memory-mapped torch file: enough to tell whether a checkpoint fits a model before loading it."""
    if Path(path).suffix != ".safetensors":
        return {key: tuple(value.shape) for key, value in read_state_dict(path, allow_unsafe_pickle).items()}
    from safetensors import safe_open

    export = check_input_file(path, "", "weights") == "export"
    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()
                if not (export and key.startswith(MASK_PREFIX))}


# ----------------------------------------------------------------------------- fetching
def unreachable(url: str, timeout: float = 3.0) -> str | None:
    """Why the host of ``url`` (or the proxy for it) cannot be reached now, or None when a TCP connection
    opens within ``timeout`` seconds: asked before a download, so that an offline run fails at once instead
    of after a library's retries."""
    import socket
    import threading
    from urllib.parse import urlsplit
    from urllib.request import getproxies

    target = urlsplit(getproxies().get(urlsplit(url).scheme or "https") or url)
    host, port = target.hostname, target.port or (80 if target.scheme == "http" else 443)
    outcome: list = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:          # gaierror (no DNS), refused, timed out
            outcome.append(error)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    if outcome and outcome[0] is None:
        return None
    cause = (outcome[0].strerror or str(outcome[0])) if outcome else f"no answer within {timeout:g} s"
    return f"{host} cannot be reached ({cause})"


@contextlib.contextmanager
def no_new_empty_dirs(*directories: str | os.PathLike) -> Iterator[None]:
    """If the body fails, whichever of ``directories`` (and their missing parents) it created are removed
    again while empty: a failed download leaves no cache folders behind."""
    created = []
    for directory in map(Path, directories):
        while not os.path.lexists(directory) and directory != directory.parent:
            created.append(directory)                    # deepest first
            directory = directory.parent
    try:
        yield
    except BaseException:
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()                        # only when empty
        raise


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


RESUME_SETTINGS = ("epochs", "lr", "min_lr", "lr_schedule", "weight_decay", "grad_clip", "batch_size", "mode",
                   "objective", "precision", "moments_dtype", "block_weights", "warm_start")


def settings_fingerprint(config) -> str:
    """The healing settings a resume checkpoint must share with the run that continues it (JSON)."""
    return json.dumps({key: getattr(config, key) for key in RESUME_SETTINGS}, sort_keys=True, default=list)


def resume_settings_differ(path: str | os.PathLike, config) -> dict[str, tuple]:
    """``{setting: (the checkpoint's value, config's)}`` for each setting that differs from the resume
    checkpoint at ``path`` (read memory-mapped: its tensors stay on disk); checked before any work."""
    state = load_tensor_file(path)
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not a starfish_fast resume checkpoint (format {RESUME_FORMAT})")
    saved, now = json.loads(state["fingerprints"].get("config", "{}")), json.loads(settings_fingerprint(config))
    return {key: (saved.get(key), now[key]) for key in now if saved.get(key) != now[key]}


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
    changed = [_difference(key, state["fingerprints"].get(key), value) for key, value in fingerprints.items()
               if state["fingerprints"].get(key) != value]
    if changed:
        raise ValueError(f"refusing to resume from {path}: {'; '.join(changed)}; rerun with the checkpoint's, or "
                         f"without `resume` to start afresh")
    if state.get("world_size", 1) != world_size:
        raise ValueError(f"refusing to resume from {path}: it was written by {state.get('world_size', 1)} "
                         f"process(es), this run has {world_size}")
    return state


def _difference(key: str, saved: str | None, current: str) -> str:
    """One fingerprint that differs, in words: the settings by name with both values, else what changed."""
    try:
        before, now = json.loads(saved), json.loads(current)
    except (TypeError, ValueError):
        before = now = None
    if isinstance(before, dict) and isinstance(now, dict):
        names = sorted(name for name in {*before, *now} if before.get(name) != now.get(name))
        return "settings differ: " + ", ".join(f"{name} {now.get(name)!r} here, {before.get(name)!r} in the "
                                               f"checkpoint" for name in names)
    return f"the {key.replace('_', ' ')} differ{'' if key.endswith('s') else 's'} from the checkpoint's"


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
    """The model's state dict with masked weights zeroed and JSON metadata (the caller's entries plus
    ``format``, ``mask_density`` and ``masked_weights``, the masked keys) in one safetensors file, atomically.
    It holds exactly the model's keys: any strict ``load_state_dict`` (and every command taking weights)
    reads it. Masked positions that are not zero in the model are zeroed, with a warning."""
    metadata = dict(metadata or {})
    clash = [key for key in RESERVED_METADATA if key in metadata]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by the export format")
    bool_masks = _bool_masks(model, masks)
    tensors = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    for key, mask in bool_masks.items():
        stray = int(torch.count_nonzero(tensors[key][~mask]))
        if stray:
            log.warning("%s: %d masked weights were not zero; the export zeroes them", key, stray)
        tensors[key] = torch.where(mask, tensors[key], torch.zeros((), dtype=tensors[key].dtype))
    header = {key: json.dumps(value, default=str) for key, value in metadata.items()}
    header["format"] = json.dumps(EXPORT_FORMAT)
    header["masked_weights"] = json.dumps(sorted(bool_masks))
    kept, total = sum(int(m.sum()) for m in bool_masks.values()), sum(m.numel() for m in bool_masks.values())
    header["mask_density"] = json.dumps(kept / total if total else float("nan"))
    save_safetensors_atomic(tensors, path, metadata=header)


# ----------------------------------------------------------------------------- Hugging Face checkpoints


def save_pretrained_with_masks(model: nn.Module, directory: str | os.PathLike, masks: Mapping[str, torch.Tensor],
                               tokenizer=None, metadata: Mapping | None = None) -> None:
    """A Hugging Face checkpoint directory (``save_pretrained``: config.json, safetensors weights) whose
    masked weights are zeros in place, loadable by transformers as is, with the masks bit-packed in
    ``masks.safetensors`` (JSON ``metadata``) and the tokenizer if given. Written into a temporary sibling
    directory and renamed into place; an existing directory is replaced only once the new one is whole.
    (A model loaded from a GGUF file by ``models.hf.load_hf_model`` is the dense model it was dequantized to.)"""
    import shutil

    directory = Path(directory)
    bool_masks = _bool_masks(model, masks)
    state = dict(model.state_dict())
    for key, mask in bool_masks.items():
        state[key] = torch.where(mask.to(state[key].device), state[key], torch.zeros((), dtype=state[key].dtype))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()                                            # 0777 less the umask
    try:
        model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        header = {key: json.dumps(value, default=str) for key, value in (metadata or {}).items()}
        save_masks(bool_masks, tmp / MASKS_FILE, metadata=header)
        for file in tmp.iterdir():           # transformers writes its weights 0600: the umask's modes, as elsewhere
            os.chmod(file, 0o666 & ~_umask())
        old = directory.parent / f".{directory.name}.{secrets.token_hex(4)}.old"
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_exported(path: str | os.PathLike, model: nn.Module) -> dict:
    """Load an ``export_dense`` file into ``model`` (strictly); returns its metadata (``masked_weights``:
    the keys whose zeros are the pruned positions)."""
    from safetensors import safe_open

    _check_readable(Path(path))
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") not in (json.dumps(EXPORT_FORMAT), json.dumps(EXPORT_FORMAT_V1)):
        raise ValueError(f"{path} is not a starfish_fast export (metadata format {header.get('format')!r}, "
                         f"expected {EXPORT_FORMAT!r})")
    model.load_state_dict(read_state_dict(path), strict=True)
    return {key: json.loads(value) for key, value in header.items()}
