"""Atomic file writing and safe loading of checkpoints and mask files.

Everything we write goes to a temporary file in the destination directory and is
then ``os.replace``d, so a crash never leaves a half-written file behind.
Loading uses ``torch.load(weights_only=True)``; pickles are only unpickled with
``allow_unsafe_pickle=True``.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the body succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def load_tensor_file(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Any:
    """Load a ``.safetensors`` file or a ``torch.save`` file.

    ``torch.load`` runs with ``weights_only=True`` unless ``allow_unsafe_pickle`` is
    set (only for files from a trusted source: unpickling can run arbitrary code)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle,
                          mmap=_is_zip_file(path))
    except Exception as error:  # torch raises UnpicklingError or RuntimeError subclasses here
        if allow_unsafe_pickle:
            raise
        raise ValueError(f"{path} cannot be loaded with weights_only=True ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]}); if you trust this file, pass the unsafe-pickle "
                         f"opt-in (allow_unsafe_pickle=True / --allow-unsafe-pickle)") from error


def _is_zip_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
