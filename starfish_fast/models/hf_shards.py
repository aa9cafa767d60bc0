"""A Hugging Face directory's safetensors weights, read and written one tensor or one block at a time.

    from starfish_fast.models.hf_shards import ShardedCheckpoint, ShardWriter, MaskFile
    weights = ShardedCheckpoint.open("llama_dir")          # one line (ValueError) unless it is a whole model
    weights.shape("model.layers.0.mlp.up_proj.weight")     # from the headers, nothing read
    w = weights.read("model.layers.0.mlp.up_proj.weight")  # one tensor, in the checkpoint's dtype
    masks = MaskFile("masks.safetensors")                  # packed, bool or 0/1; .pt memory-mapped
    writer = ShardWriter("out_dir", shards=33)             # model-000NN-of-00033.safetensors + the index
    writer.write(0, {"model.layers.0.mlp.up_proj.weight": w}); writer.finish(source_dir="llama_dir")

A directory is read through ``safetensors.safe_open`` (one file handle per shard, each tensor read
when asked for): ``model.safetensors.index.json`` with its shards, or one ``model.safetensors``.
``ShardWriter`` writes a sharded checkpoint in a hidden sibling directory, one shard per call of
``write``, and renames it into place in ``finish`` with the index, the source's config and other
small files (tokenizer, generation config): transformers' ``from_pretrained`` reads it as is.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from starfish_fast.checkpoint import (MASKS_FILE, check_input_file, error_line, key_examples, load_tensor_file,
                                      save_safetensors_atomic)
from starfish_fast.packed_masks import packed_header, packed_shapes, unpack

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
MASK_PART = ".masks-{}.safetensors"          # one block's packed masks until the mask file is written
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def is_sharded_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with config.json and safetensors weights (an index or one file)."""
    path = Path(path)
    return (path / "config.json").is_file() and ((path / INDEX_NAME).is_file() or (path / WEIGHTS_NAME).is_file())


def expected_shapes(model: nn.Module, found) -> dict[str, tuple]:
    """The model's keys and shapes, less the aliases of a tied tensor (an LM head sharing the embedding:
    ``save_pretrained`` writes it once) when ``found`` holds another of its names."""
    state = model.state_dict(keep_vars=True)
    names: dict[int, list[str]] = {}
    for key, value in state.items():
        names.setdefault(id(value), []).append(key)
    tied = {key for group in names.values() if len(group) > 1 and any(k in found for k in group)
            for key in group if key not in found}
    return {key: tuple(value.shape) for key, value in state.items() if key not in tied}


class ShardedCheckpoint:
    """The safetensors weights of a Hugging Face directory, read per tensor. ``reads`` counts the tensors
    read and ``bytes_read`` their size (what a test or a benchmark checks the streaming by)."""

    def __init__(self, directory: Path, weight_map: dict[str, str]):
        self.directory, self.weight_map = directory, weight_map
        self._handles: dict[str, object] = {}
        self.reads, self.bytes_read = 0, 0

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ShardedCheckpoint":
        """The checkpoint of ``path``; a one-line ``ValueError`` when it is not a model directory, its index
        is unreadable or names shards that are missing. Only headers are read."""
        directory = Path(path)
        if not directory.is_dir():
            raise ValueError(f"{path}: not a directory")
        if not (directory / "config.json").is_file():
            raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
        if (directory / INDEX_NAME).is_file():
            weight_map = _index_map(directory)
        elif (directory / WEIGHTS_NAME).is_file():
            weight_map = {key: WEIGHTS_NAME for key in _header_keys(directory / WEIGHTS_NAME)}
        else:
            raise ValueError(f"{path}: no safetensors weights ({WEIGHTS_NAME} or {INDEX_NAME})")
        checkpoint = cls(directory, weight_map)
        checkpoint._check_shards()
        return checkpoint

    def _check_shards(self) -> None:
        files = sorted(set(self.weight_map.values()))
        missing = [file for file in files if not (self.directory / file).is_file()]
        if missing:
            raise ValueError(f"{self.directory}: {len(missing)} of the {len(files)} shards in {INDEX_NAME} are "
                             f"missing: {', '.join(missing[:3])}")
        for file in files:
            absent = [key for key, shard in self.weight_map.items() if shard == file
                      and key not in self._handle(file).keys()]
            if absent:
                raise ValueError(f"{self.directory / file}: lacks {len(absent)} tensors that {INDEX_NAME} puts "
                                 f"there ({key_examples(absent)})")

    def _handle(self, file: str):
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(self.directory / file), framework="pt")
            except Exception as error:  # safetensors' own SafetensorError on a bad header
                raise ValueError(f"{self.directory / file}: not a valid safetensors file "
                                 f"({error_line(error)})") from None
        return self._handles[file]

    def release(self) -> None:
        """Close the shard files: their memory maps (and the pages read through them) go with them."""
        self._handles.clear()

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.weight_map[key]).get_slice(key).get_shape())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: self.shape(key) for key in self.weight_map}

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._handle(self.weight_map[key]).get_slice(key).get_dtype()]

    def read(self, key: str) -> torch.Tensor:
        """One tensor, in the checkpoint's dtype, on the CPU."""
        tensor = self._handle(self.weight_map[key]).get_tensor(key)
        self.reads += 1
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def numel(self) -> int:
        """The number of weights, from the headers."""
        total = 0
        for key in self.weight_map:
            size = 1
            for dim in self.shape(key):
                size *= dim
            total += size
        return total


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _index_map(directory: Path) -> dict[str, str]:
    try:
        index = json.loads((directory / INDEX_NAME).read_text())
        weight_map = index["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{directory / INDEX_NAME}: not a safetensors index ({error_line(error)})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{directory / INDEX_NAME}: its weight_map is empty")
    return dict(weight_map)


def _header_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as error:  # safetensors' own SafetensorError on a bad header
        raise ValueError(f"{path}: not a valid safetensors file ({error_line(error)})") from None


# ----------------------------------------------------------------------------- mask files, per key
class MaskFile:
    """A mask file read one mask at a time: bit-packed or bool / 0-1 safetensors (by header), or a torch file
    (memory-mapped). ``check_input_file``'s one line when it is not a mask file."""

    def __init__(self, path: str | os.PathLike, flag: str = "--mask-path", allow_unsafe_pickle: bool = False):
        self.path = Path(path)
        check_input_file(path, flag, "masks", allow_unsafe_pickle)
        self._tensors, self._handle, self._packed = None, None, None
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt")
            self._packed = packed_shapes(self._handle.metadata())
        else:
            self._tensors = load_tensor_file(path, allow_unsafe_pickle)     # memory-mapped: read on access

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self._packed is not None:
            return dict(self._packed)
        if self._handle is not None:
            return {key: tuple(self._handle.get_slice(key).get_shape()) for key in self._handle.keys()}
        return {key: tuple(value.shape) for key, value in self._tensors.items()}

    def read(self, key: str) -> torch.Tensor:
        """The mask ``key`` as a bool tensor (``ValueError`` when it holds values other than 0 and 1)."""
        if self._handle is not None:
            value = self._handle.get_tensor(key)
            if self._packed is not None:
                return unpack(value, self._packed[key])
        else:
            value = self._tensors[key]
        if value.dtype != torch.bool and not ((value == 0) | (value == 1)).all():
            raise ValueError(f"{self.path}: mask {key!r} is not binary (0/1 or bool)")
        return value.bool()


# ----------------------------------------------------------------------------- writing
class ShardWriter:
    """A sharded safetensors checkpoint written shard by shard into a hidden sibling of ``directory``,
    renamed into place by ``finish`` (an existing directory is replaced only then); ``abort`` removes it."""

    def __init__(self, directory: str | os.PathLike, shards: int):
        self.directory, self.shards = Path(directory), shards
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.directory.parent / f".{self.directory.name}.{secrets.token_hex(4)}.tmp"
        self.tmp.mkdir()
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, shard: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Shard number ``shard`` (0-based) holding ``tensors``."""
        name = SHARD_NAME.format(shard + 1, self.shards)
        save_safetensors_atomic(tensors, self.tmp / name, {"format": "pt"})
        for key, value in tensors.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()

    def stash_masks(self, shard: int, packed: Mapping[str, torch.Tensor]) -> None:
        """Shard ``shard``'s masks (``packed_masks.pack``ed) kept on disk until ``finish`` writes the mask file."""
        save_safetensors_atomic(dict(packed), self.tmp / MASK_PART.format(shard))

    def finish(self, source_dir: str | os.PathLike, mask_shapes: Mapping[str, tuple] | None = None,
               metadata: Mapping[str, str] | None = None) -> None:
        """The index, the small files of ``source_dir`` (config, tokenizer; not its weights nor masks), the
        stashed masks as one file (of ``mask_shapes``; ``metadata``), then the rename into place."""
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for file in Path(source_dir).iterdir():
            if file.is_file() and not file.name.endswith(WEIGHT_SUFFIXES) and file.name not in (INDEX_NAME,):
                shutil.copy2(file, self.tmp / file.name)
        parts = sorted(self.tmp.glob(MASK_PART.format("*")))
        if parts:
            packed = {key: value for part in parts for key, value in load_file(part).items()}
            save_safetensors_atomic(packed, self.tmp / MASKS_FILE, packed_header(mask_shapes, metadata))
            for part in parts:
                part.unlink()
        old = self.directory.parent / f".{self.directory.name}.{secrets.token_hex(4)}.old"
        if self.directory.exists():
            os.replace(self.directory, old)
        os.replace(self.tmp, self.directory)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
