"""torch.compile's work kept across runs: a second run of the same model on the same machine starts warm.

    from starfish_fast import compile_cache
    path = compile_cache.path_for(model, torch.device("cuda"), "bf16")  # ~/.cache/starfish_fast/compile/<key>.bin
    compile_cache.load(path)        # before compiling: False (and one warning) for a corrupt or foreign file
    ...                             # compile and run
    compile_cache.save(path)        # after compiling: torch.compiler.save_cache_artifacts(), written atomically

torch's own caches (inductor's FX graph cache, AOTAutograd's) live under ``TORCHINDUCTOR_CACHE_DIR``
(default: the temporary directory), so a fresh machine or container compiles from scratch.
``torch.compiler.save_cache_artifacts`` returns their contents as bytes and ``load_cache_artifacts``
puts them back; this module stores those bytes under ``$XDG_CACHE_HOME/starfish_fast/compile``
(default ``~/.cache/starfish_fast/compile``), one file per torch and triton version, device, model
(class and parameter shapes) and compute precision. What a file holds is keyed again inside by torch
(graph hashes), so a stale file costs nothing but its load. Dynamo's tracing is never cached: a warm
start still traces (H200, DeiT-B: 3.3 s warm against 17 s cold, bench/results/gpu_check_h200_2026-12-04).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path

import torch
from torch import nn

from starfish_fast.checkpoint import atomic_path, error_line

log = logging.getLogger(__name__)


def directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "starfish_fast" / "compile"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{platform.processor() or 'unknown'}"


def path_for(model: nn.Module, device: torch.device, precision: str) -> str:
    """The cache file of ``model`` (its class and parameter shapes) on ``device`` at ``precision``."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a Linux dependency
        triton_version = "none"
    shapes = ";".join(f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters())
    key = "|".join((torch.__version__, triton_version, _device_name(torch.device(device)), precision,
                    type(model).__module__ + "." + type(model).__qualname__, shapes))
    return str(directory() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.bin")


def exists(path: str) -> bool:
    return os.path.isfile(path)


def load(path: str) -> bool:
    """Put the saved artifacts back before compiling; False (with one warning) where the file cannot be
    read or torch refuses it: the run then compiles cold and ``save`` rewrites the file."""
    if not exists(path):
        return False
    torch_log = logging.getLogger("torch.compiler._cache")   # it logs a refused file's traceback itself
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        loaded, why = torch.compiler.load_cache_artifacts(Path(path).read_bytes()), "torch refused its contents"
    except Exception as error:  # a corrupt, truncated or foreign file must never stop a run
        loaded, why = None, error_line(error)[:200]
    finally:
        torch_log.setLevel(level)
    if loaded is None:
        warnings.warn(f"ignoring the compile cache {path} ({why}); compiling cold, the file is rewritten after",
                      RuntimeWarning, stacklevel=2)
        return False
    log.info("compile cache loaded from %s", path)
    return True


def save(path: str) -> bool:
    """Write what torch compiled in this process so far (atomically); False where there was nothing or the
    directory cannot be written (one warning: the run itself is fine)."""
    result = torch.compiler.save_cache_artifacts()
    if not result:
        return False
    data = result[0]
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
    except OSError as error:
        warnings.warn(f"could not write the compile cache {path}: {error}", RuntimeWarning, stacklevel=2)
        return False
    log.info("compile cache saved to %s (%.1f MB)", path, len(data) / 2**20)
    return True
