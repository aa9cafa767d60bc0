"""Healing settings: ``HealConfig``, strict and torch-free (the command line builds its flags from it).

    from starfish_fast.config import HealConfig
    config = HealConfig(epochs=5, batch_size=64, mode="fast")
    config = HealConfig.from_dict({"epochs": 5, "lr": 1e-3})     # unknown keys fail loudly

Every field carries its help text and allowed values in its metadata; ``starfish-fast recover``
and ``demo`` turn the fields marked with a flag into options, so nothing is typed twice. Every
``auto`` is resolved once, by ``starfish_fast.plan.resolve_plan``, and recorded with the result.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from starfish_fast import objectives
from starfish_fast.objectives import OBJECTIVES

PRECISIONS = ("fp32", "bf16", "fp16")
# device: kept on the compute device (the GPU's memory on CUDA, RAM on the CPU)
STORE_KINDS = ("auto", "device", "pinned", "disk", "recompute")
KERNEL_CHOICES = ("auto", "triton", "torch")
AUTO_ON_OFF = ("auto", "on", "off")
# the prune command's mask makers (starfish_fast.prune), and which of them read calibration data / take --n --m
PRUNE_METHODS = ("magnitude", "nm", "structured", "wanda", "representation", "sparsegpt")
CALIBRATED_METHODS = ("wanda", "representation", "sparsegpt")
NM_METHODS = ("nm", "wanda", "sparsegpt")
# joint: every block at once (the paper's); sequential: block after block (sequential.py); auto: the plan's rule
ORDERS = ("joint", "sequential", "auto")
# the last phase's whole-model objective (the plan's finish rule: rules.finish_rule)
FINISHES = ("auto", "none", *objectives.FINISHES)


def option(default: Any, help: str, choices: tuple | None = None, flag: str | None = "") -> Any:
    """A config field with its help text, allowed values and command-line flag (``""``: the field's
    own name in kebab case; ``None``: not a flag)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass
class HealConfig:
    """Healing hyper-parameters and engine settings (see the README's table for each key)."""

    epochs: int = option(10, "passes over the calibration set")
    lr: float = option(6e-4, "peak learning rate")
    min_lr: float = option(1e-6, "final learning rate of the cosine schedule")
    lr_schedule: str = option("cosine", "per-step cosine from lr to min_lr, or constant", ("cosine", "constant"))
    weight_decay: float = option(0.0, "0: Adam; > 0: AdamW with this decay (the reference's rule)")
    grad_clip: float = option(0.0, "> 0: clip the total norm of the masked gradients")
    batch_size: int = option(32, "calibration images or text sequences per step (the global batch under "
                                 "torchrun)")
    scope: str = option("auto", "prune scope: which weights are masked and trained (auto: the model's default)",
                        flag="prune-scope")
    mode: str = option("fast", "exact: the reference's step semantics; fast: bf16 on GPUs, compile where it "
                               "pays, fused steps", ("fast", "exact"))
    # the registry's live view: an entry added to OBJECTIVES is a choice at once (flag and validation)
    objective: str = option(objectives.DEFAULT, "healing loss (starfish_fast.objectives.OBJECTIVES)",
                            OBJECTIVES.keys())
    cosine_per: str = option("auto", "cosine rows: token (B*T rows) or sample (B rows); auto: the model's rule "
                                     "(tokens of (B, T, D) and of channels-last maps, else images)",
                             ("auto", "token", "sample"))
    order: str = option("joint", "joint: every block trained at once (the paper's); sequential: block after block, "
                                 "only one block's weights, gradients and moments on the device at a time, then "
                                 "its healed outputs carried forward (block-local objectives only); auto: "
                                 "sequential only when the plan's estimate of a joint run exceeds the free device "
                                 "memory", ORDERS)
    sequential_inputs: str = option("student", "in sequential order, each block's inputs: student = the healed "
                                               "previous blocks' outputs, dense = the dense model's (EBFT-style)",
                                    ("student", "dense"))
    finish: str = option("auto", "a last phase of whole-model KL after the block-local objective, its own "
                                 "learning-rate schedule and a fresh Adam (the same steps in all): kl, none; auto: "
                                 "kl for a language model healed jointly, else none", FINISHES)
    finish_share: float = option(0.5, "the share of the epochs the finish phase takes")
    block_weights: Any = option(None, "per-block loss weights: comma-separated numbers, or adaptive (from each "
                                      "block's distance to the dense model, re-estimated every epoch); default "
                                      "uniform")
    precision: str = option("auto", "compute precision in fast mode (auto: bf16 on CUDA and for ViTs on "
                                    "bf16-native CPUs, else fp32; fp16 scales the loss with a GradScaler, "
                                    "which reads one flag from the GPU every step)", ("auto", *PRECISIONS))
    compile: str = option("auto", "per-block torch.compile (auto: only where the gain measured for this GPU "
                                  "and model family, over the job's images, repays the compile cost)", AUTO_ON_OFF)
    teacher_store: str = option("auto", "where the dense model's block outputs live: device (GPU memory on "
                                        "CUDA, RAM on the CPU), pinned, disk, recompute (auto: from their size "
                                        "and the free memory)", STORE_KINDS)
    teacher_dtype: str = option("auto", "dtype of the stored teacher outputs (auto: fp16 in exact mode, "
                                        "bf16 with bf16 compute, else fp16)", ("auto", *PRECISIONS))
    teacher_dir: str | None = option(None, "directory of the disk teacher store (default: the temp dir)")
    moments_dtype: str = option("fp32", "dtype of the Adam moments in fast mode", ("fp32", "bf16"))
    kernels: str = option("auto", "Triton kernels (masked linear, fused cosine loss, masked Adam) or torch; "
                                  "auto: per op from the measured table", KERNEL_CHOICES)
    compact: str = option("auto", "heal on narrowed weights where whole MLP neurons / QK dims are pruned "
                                  "(auto: MLP in fast mode, QK on CPU)", AUTO_ON_OFF)
    semi_structured: str = option("auto", "2:4-masked linears through sparse tensor cores (auto: off until "
                                          "measured faster)", AUTO_ON_OFF)
    warm_start: str = option("none", "before healing: compensate = refit, in closed form (ridge regression on the "
                                     "calibration set), the layers consuming structurally pruned units; sparsegpt = "
                                     "SparseGPT's update of the kept weights from the dense ones under the masks",
                             ("none", "compensate", "sparsegpt"))
    distributed: str = option("auto", "under torchrun: one process per GPU, the global batch split across them, "
                                      "gradients averaged by DDP (auto: when WORLD_SIZE > 1)", ("auto", "off"))
    sync_bn: bool = option(False, "under torchrun on CUDA: SyncBatchNorm (statistics over the global batch) "
                                  "instead of each process's own BatchNorm statistics")
    grad_checkpointing: bool = option(False, "recompute block activations in the backward (less memory)")
    device: str | None = option(None, "cuda, cuda:N or cpu (default: cuda if available)")
    log_every: int = option(10, "steps between loss reads (the only host syncs of fast mode)")
    checkpoint_every: int = option(0, "steps between resume checkpoints (0: none)")
    checkpoint_path: str | None = option(None, "resume checkpoint file", flag=None)
    resume: bool = option(False, "continue from the resume checkpoint if it exists")
    metrics_path: str | None = option(None, "JSON lines of the logged steps and epochs", flag=None)
    plot_path: str | None = option(None, "PNG of the loss curve", flag=None)
    progress: bool = option(True, "progress bar (loss, images/s, ETA)", flag=None)

    def __post_init__(self):
        if isinstance(self.compile, bool):
            self.compile = "on" if self.compile else "off"
        self.block_weights = _parse_block_weights(self.block_weights)
        if self.teacher_store in ("gpu", "memory"):      # the names before 0.3: one store, one name now
            raise ValueError(f"HealConfig.teacher_store={self.teacher_store!r} is called 'device' since 0.3 (kept "
                             f"on the compute device: GPU memory on CUDA, RAM on the CPU)")
        for item in dataclasses.fields(self):
            allowed = item.metadata.get("choices")
            if allowed and getattr(self, item.name) not in allowed:
                raise ValueError(f"HealConfig.{item.name}={getattr(self, item.name)!r}; allowed: {', '.join(allowed)}")
        for key in ("epochs", "batch_size", "log_every"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int) \
                    or getattr(self, key) <= 0:
                raise ValueError(f"HealConfig.{key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"HealConfig.{key} must be finite and >= 0, got {value!r}")
        if not isinstance(self.finish_share, (int, float)) or not 0 < self.finish_share < 1:
            raise ValueError(f"HealConfig.finish_share must be between 0 and 1 (exclusive), got {self.finish_share!r}")
        if self.finish not in ("auto", "none") and not finish_epochs(self):
            raise ValueError(f"HealConfig.finish={self.finish!r} splits the epochs in two phases: epochs={self.epochs} "
                             f"with finish_share={self.finish_share:g} leaves one of them none (at least 2 epochs)")
        if self.checkpoint_every < 0:
            raise ValueError(f"HealConfig.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.block_weights is not None and not OBJECTIVES[self.objective].needs_blocks:
            raise ValueError(f"HealConfig.block_weights needs a block objective (starfish, mse, starfish+kl); "
                             f"objective {self.objective!r} has no blocks")
        if self.order == "sequential":
            _check_sequential(self)
        if (self.checkpoint_every > 0 or self.resume) and not self.checkpoint_path:
            raise ValueError("HealConfig.checkpoint_path is needed for checkpoint_every > 0 or resume")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "HealConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown HealConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**values)


def finish_epochs(config: HealConfig) -> int:
    """The epochs of the finish phase: ``finish_share`` of ``epochs``, rounded (0 when it leaves either phase
    without an epoch)."""
    epochs = round(config.epochs * config.finish_share)
    return epochs if 0 < epochs < config.epochs else 0


def phase_configs(config: HealConfig, finish: str) -> tuple[HealConfig, HealConfig]:
    """The two phases of a run that finishes with ``finish`` (``Plan.finish``): ``config``'s objective for the
    first epochs, then ``finish`` jointly for ``finish_epochs``; the second phase's files are ``phase_path``'s (its
    metrics and plot joined into the run's own at the end: ``progress.join_phases``)."""
    later = finish_epochs(config)
    first = dataclasses.replace(config, finish="none", epochs=config.epochs - later)
    second = dataclasses.replace(config, finish="none", objective=finish, epochs=later, order="joint",
                                 block_weights=None, warm_start="none",
                                 **{key: phase_path(getattr(config, key))
                                    for key in ("checkpoint_path", "metrics_path", "plot_path")})
    return first, second


def phase_path(path: str | None) -> str | None:
    """The finish phase's file beside a run's file: ``out.resume`` -> ``out.finish.resume``."""
    if path is None:
        return None
    head, dot, suffix = str(path).rpartition(".")
    return f"{head}.finish.{suffix}" if dot and "/" not in suffix else f"{path}.finish"


def _check_sequential(config: HealConfig) -> None:
    """Sequential order trains one block against its dense twin: the objective must be block-local."""
    local = [name for name, spec in OBJECTIVES.items() if spec.block_local]
    if config.objective not in local:
        raise ValueError(f"HealConfig.objective={config.objective!r} cannot heal in order='sequential' (one block "
                         f"at a time needs a block-local objective); allowed: {', '.join(local)}")
    if config.block_weights is not None:
        raise ValueError("HealConfig.block_weights weights blocks against each other in one loss; in "
                         "order='sequential' each block has its own loss: leave block_weights unset")


def _parse_block_weights(value):
    """None, "adaptive", a sequence of numbers or a comma-separated string of them -> None, "adaptive" or
    a tuple of floats."""
    if value is None or value == "adaptive":
        return value
    if isinstance(value, str):
        try:
            value = [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"HealConfig.block_weights={value!r}; allowed: adaptive or comma-separated numbers") \
                from None
    weights = tuple(float(v) for v in value)
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"HealConfig.block_weights must be finite, >= 0 and not all zero, got {weights}")
    return weights


def config_fields() -> list[dataclasses.Field]:
    """The fields that are command-line flags, in declaration order."""
    return [f for f in dataclasses.fields(HealConfig) if f.metadata.get("flag") is not None]


def flag_name(item: dataclasses.Field) -> str:
    return "--" + (item.metadata["flag"] or item.name.replace("_", "-"))
