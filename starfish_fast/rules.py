"""The plan's rules: every threshold and measured table a decision reads, each beside the results file it came
from, as pure functions of facts (``probe.Facts``) and settings. Nothing here touches a device, a model or a file.

    from starfish_fast import rules
    rules.COMPILE_MEASURED[("sm90", "timm_vit")].cold             # 17.0 s of cold compile, measured on an H200
    rules.store_rule(3 << 30, cuda=True, gpu_free=80 << 30, host_free=0)    # ("device", "cache 3.00 GiB fits ...")
    rules.pick_backend({"dense": 1.0, "torch_cusparselt": 0.9}, "auto")     # "torch_cusparselt": beats dense by MARGIN

A rule nothing has measured yet keeps the safe path (eager, torch, dense). ``plan.decide`` applies them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

from starfish_fast.compaction import ATTENTION_LAYERS
from starfish_fast.kernels._dispatch import AUTO_TRITON_ON_CUDA, OPS, choose
from starfish_fast.objectives import FINISHES

__all__ = ["AUTO_TRITON_ON_CUDA", "OPS"]   # the kernels' table keeps its one home (kernels/_dispatch.py)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# ----------------------------------------------------------------------------- device kinds
GB = 10**9


class DeviceKind(NamedTuple):
    """What a named GPU kind is assumed to have when planning for it without one: its memory as sold (all
    free: a fresh GPU), the card it stands for."""
    card: str
    memory: int


# "sm" + compute capability -> the card the plan assumes for it (sm90: an H100; an H200 is
# Facts.for_device_kind("sm90", memory_total=141 * GB, memory_free=141 * GB)).
DEVICE_KINDS = {
    "sm80": DeviceKind("NVIDIA A100 80GB", 80 * GB),
    "sm86": DeviceKind("NVIDIA A10", 24 * GB),
    "sm90": DeviceKind("NVIDIA H100 80GB", 80 * GB),
}
H200_MEMORY = 141 * GB
KNOWN_KINDS = ("cpu", *DEVICE_KINDS)

# ----------------------------------------------------------------------------- precision


def precision_rule(mode: str, precision: str, teacher_dtype: str, cuda: bool, family: str,
                   cpu_bf16: bool) -> tuple[str, str, str]:
    """(compute precision, teacher dtype, reason).

    CPU ``auto``: bf16 autocast healed ViTs 1.4x faster than fp32 once the attention core runs in fp32 (the
    ViT families' attention is swapped for compaction.py's module), and the MobileNet-style CNN 0.9x as fast
    (bench/results/precision_fashion_{vit,cnn}_cpu.json): bf16 for those ViTs on bf16-native CPUs only. fp16
    needs loss scaling (its unscaled gradients fall into fp16's subnormal range: a relative error of 0.15 at
    DeiT-B shape on an H200, bench/results/gpu_check_h200_2026-12-04): the fast step scales the loss."""
    if mode == "exact":
        return "fp32", "fp16" if teacher_dtype == "auto" else teacher_dtype, "exact mode: fp32"
    if precision != "auto":
        chosen, reason = precision, "requested"
    elif cuda:
        chosen, reason = "bf16", "auto: bf16 tensor cores on CUDA"
    elif family in ATTENTION_LAYERS and cpu_bf16:
        chosen, reason = "bf16", "auto: ViT on a bf16-native CPU (bench/results/precision_fashion_vit_cpu.json)"
    else:
        chosen, reason = "fp32", "auto: fp32 on this CPU for this model (bench/results/precision_fashion_*_cpu.json)"
    teacher = teacher_dtype if teacher_dtype != "auto" else ("bf16" if chosen == "bf16" else "fp16")
    return chosen, teacher, reason


# ----------------------------------------------------------------------------- kernels and compaction
def kernel_paths(mode: str, kernels: str, device: str) -> dict[str, str]:
    """Per op: triton or torch, by the kernels' one rule (kernels/_dispatch.py: ``choose`` and its measured
    table ``AUTO_TRITON_ON_CUDA``, bench/results/gpu_check_h200_2026-12-04/gpu_check.jsonl)."""
    if mode == "exact":
        return {op: "torch" for op in OPS}
    return {op: "triton" if choose(op, device, kernels) else "torch" for op in OPS}


def compaction_rule(mode: str, compact: str, cuda: bool, family: str, has_mlp: bool) -> tuple[bool, bool, str]:
    """(narrow MLP neurons, narrow QK dims, reason), only where the model has them. MLP narrowing only
    shrinks dense GEMMs: on in fast mode (CPU: 1.24-1.28x, bench/results/compaction_deit_tiny_patch16_224_cpu.json).
    QK narrowing was faster on CPU (1.33-1.44x with MLP, same file); on CUDA q/k narrower than v rules out
    the flash SDPA kernel, so there it needs compact="on" until a GPU run measures it."""
    has_qk = family in ATTENTION_LAYERS
    if compact != "auto":
        on = compact == "on"
        return on and has_mlp, on and has_qk, "requested"
    fast = mode == "fast"
    if not (has_mlp or has_qk):
        return False, False, f"auto: a {family} model has no MLP neurons or QK dims to narrow"
    return fast and has_mlp, fast and has_qk and not cuda, "auto: MLP in fast mode, QK dims on CPU only"


def attention_fp32_core(mode: str, cuda: bool, family: str) -> bool:
    """Attention modules swapped for ones whose core runs in fp32: fast mode on the CPU, ViT families (what
    made CPU bf16 1.4x faster and accurate, bench/results/precision_fashion_vit_cpu.json)."""
    return mode == "fast" and not cuda and family in ATTENTION_LAYERS


# ----------------------------------------------------------------------------- teacher store
# Keep this fraction of free memory for the student's activations, weights and optimizer (a safe default:
# no run has measured where the student's own memory peaks against the cache).
GPU_HEADROOM_FRACTION = 0.5
HOST_HEADROOM_FRACTION = 0.5


def store_rule(cache_bytes: int, *, cuda: bool, gpu_free: int, host_free: int) -> tuple[str, str]:
    """``teacher_store="auto"``: on the device while the cache fits ``GPU_HEADROOM_FRACTION`` of its free
    memory, else pinned host memory (CUDA), else a memory-mapped file. ``host_free`` 0: unknown."""
    size = f"cache {cache_bytes / 2**30:.2f} GiB"
    if not cuda:
        if cache_bytes <= HOST_HEADROOM_FRACTION * host_free or host_free == 0:
            return "device", f"{size} fits in RAM ({host_free / 2**30:.1f} GiB free)"
        return "disk", f"{size} exceeds half the free RAM ({host_free / 2**30:.1f} GiB)"
    if cache_bytes <= GPU_HEADROOM_FRACTION * gpu_free:
        return "device", f"{size} fits in half the free GPU memory ({gpu_free / 2**30:.1f} GiB)"
    if cache_bytes <= HOST_HEADROOM_FRACTION * host_free:
        return "pinned", f"{size} exceeds half the free GPU memory ({gpu_free / 2**30:.1f} GiB), fits pinned"
    return "disk", f"{size} exceeds GPU and host memory: memory-mapped file"


# ----------------------------------------------------------------------------- order
def joint_bytes(weight_bytes: int, trained: int, teacher_bytes: int, *, grad_bytes: int = 4,
                moment_bytes: int = 4) -> int:
    """Device bytes a joint run needs beyond its activations: the student's and the dense model's weights
    (``weight_bytes`` each), a gradient and two Adam moments per trained weight, and the teacher targets
    kept on the device (``teacher_bytes``; 0 where they would live on the host)."""
    return 2 * weight_bytes + trained * (grad_bytes + 2 * moment_bytes) + teacher_bytes


def order_rule(order: str, objective: str, block_local: bool, estimate_bytes: int,
               free_bytes: int) -> tuple[str, str]:
    """``order``: as asked; ``auto``: sequential only when the estimate of a joint run (``joint_bytes``)
    exceeds the device memory free for it, and only for a block-local objective (the others need the whole
    model at once)."""
    if order != "auto":
        return order, "requested"
    if not block_local:
        return "joint", f"auto: joint: objective {objective!r} needs the whole model at once"
    sizes = (f"a joint run needs about {estimate_bytes / 2**30:.2f} GiB (weights, gradients, Adam moments, teacher "
             f"targets), {free_bytes / 2**30:.2f} GiB free")
    if estimate_bytes > free_bytes:
        return "sequential", f"auto: sequential: {sizes}"
    return "joint", f"auto: joint: {sizes}"


def finish_rule(finish: str, language_model: bool, block_local: bool, order: str, epochs: int) -> tuple[str, str]:
    """``finish``: the whole-model objective of a last phase, or none. ``auto``: KL after a block-local objective
    for a language model healed jointly (the reference's names keep its one objective). At 100 steps on SmolLM2-135M (in domain) half the steps
    per-token cosine then half KL beat both alone: magnitude 2:4 106.9 against STARFISH 177.9 and KL 127.7, Wanda
    2:4 59.4 against 70.2 and 61.8 (bench/results/lm_quality_recipes_smollm2_cpu.md). ``epochs``: the finish
    phase's epochs (0: the run cannot be split)."""
    if finish == "none":
        return "none", "requested"
    if finish != "auto":
        return finish, "requested"                        # HealConfig checked that the epochs split
    why = ("measured on language models only" if not language_model else
           "the objective is not block-local" if not block_local else
           "sequential order holds one block at a time" if order == "sequential" else
           "too few epochs to split in two phases" if not epochs else None)
    if why:
        return "none", f"auto: none: {why}"
    return FINISHES[0], ("auto: kl: block-local, then whole-model KL beat either alone on language models "
                  "(bench/results/lm_quality_recipes_smollm2_cpu.md)")


# ----------------------------------------------------------------------------- compile
class CompileCost(NamedTuple):
    """What compile bought and cost in one measured setting: steady-state images/s eager and compiled,
    the seconds a whole call took longer than eager with cold caches and with its compile cache warm,
    and the trainable weights of the model measured (the gain per image scales with them)."""
    eager: float
    compiled: float
    cold: float
    warm: float
    weights: float
    source: str


# (device kind, model family) -> CompileCost. Device kind: "cpu", or "sm" + compute capability.
COMPILE_MEASURED = {
    # H200 (sm90), DeiT-B at batch 64, fast mode bf16, 1,024 images x 3 epochs: whole call 3.2 s eager,
    # 20.2 s cold, 6.5 s with a warm inductor cache; steady state eager 2,045 img/s, compiled up to 2,431.
    ("sm90", "timm_vit"): CompileCost(2045.0, 2431.0, 17.0, 3.3, 84.9e6,
                                      "bench/results/gpu_check_h200_2026-12-04/reference_vs_fast_and_compile.jsonl"),
    # This 2-core CPU, the bundled ViT, 4,096 images x 2 epochs at batch 64 (bench/bench_compile.py): compiled
    # blocks ran slower than eager (1,111 against 1,467 img/s) after 17.6 s (cold) / 16.1 s (warm) of compile.
    ("cpu", "timm_vit"): CompileCost(1467.0, 1111.0, 17.6, 16.1, 294912.0,
                                     "bench/results/compile_fashion_vit_cpu.json"),
}


def compile_rule(mode: str, compile: str, kind: str, family: str, trained_weights: int, images: int,
                 warm: bool) -> tuple[bool, str]:
    """``compile="auto"``: compile when the steady-state time it saves over this job's images exceeds
    what it adds (cold, or warm when this model's compile cache is on disk), from ``COMPILE_MEASURED``
    scaled by the trainable weights; eager where nothing was measured."""
    if mode != "fast":
        return False, "exact mode: eager, as the reference"
    if compile != "auto":
        return compile == "on", "requested"
    cost = COMPILE_MEASURED.get((kind, family))
    if cost is None:
        return False, f"auto: eager: compile is unmeasured for {family} models on {kind} (compile='on' to try it)"
    measured = (f"{kind}, {family}: {cost.eager:,.0f} img/s eager, {cost.compiled:,.0f} compiled, measured at "
                f"{cost.weights / 1e6:.1f}M weights; {cost.source}")
    if cost.compiled <= cost.eager:
        return False, f"auto: eager: compiled blocks ran no faster here ({measured})"
    per_image = (1 / cost.eager - 1 / cost.compiled) * trained_weights / cost.weights
    saved, spent = images * per_image, cost.warm if warm else cost.cold
    decision = saved > spent
    return decision, (f"auto: {'compiled' if decision else 'eager'}: {images:,} images save about {saved:.1f} s "
                      f"against a {spent:.1f} s {'warm (cache on disk)' if warm else 'cold'} compile ({measured})")


# ----------------------------------------------------------------------------- 2:4
# A 2:4 backend must be this much faster than dense to be chosen, per layer shape and then for the whole block
# step: below it a "win" is within the spread of repeated medians (unmeasured as yet:
# bench/gpu_check_sparse24.py times dense twice, "dense_again_ms", to measure that spread).
MARGIN = 0.03
SEMI_STRUCTURED_MODES, PURPOSES = ("auto", "on", "off"), ("inference", "heal")


@dataclass(frozen=True)
class Decision:
    """Which backend each 2:4-masked linear uses ("dense" or a 2:4 backend), the timings behind it
    (``shapes``: per distinct weight shape, its layers, milliseconds per candidate, refusals, choice) and
    why, in one line; ``warning``: what a forced choice should warn about ('' for nothing). ``record()`` is
    what the plan's timings and an export's sidecar keep."""

    mode: str
    purpose: str
    choice: dict[str, str]
    reason: str
    shapes: dict[str, dict] = field(default_factory=dict)
    context: dict = field(default_factory=dict)
    warning: str = ""

    @property
    def semi_structured(self) -> bool:
        return any(backend != "dense" for backend in self.choice.values())

    def record(self) -> dict:
        return {"mode": self.mode, "purpose": self.purpose, "reason": self.reason, "choice": dict(self.choice),
                "shapes": self.shapes, **self.context}


def pick_backend(ms: Mapping[str, float], mode: str, margin: float = MARGIN) -> str:
    """The fastest 2:4 backend of one shape's timings; under ``auto`` only if it beats dense by ``margin``
    (ties go to dense)."""
    sparse = {name: value for name, value in ms.items() if name != "dense"}
    if not sparse:
        return "dense"
    best = min(sparse, key=sparse.get)
    return best if mode == "on" or sparse[best] * (1 + margin) < ms["dense"] else "dense"


def per_layer_choice(timings: Mapping, mode: str, margin: float = MARGIN) -> dict[str, str]:
    """Each 2:4 layer's backend from its shape's timings (``timings``: a ``probe_sparse24.time_two_four``
    record), before the whole-step check."""
    picks = {key: pick_backend(entry["ms"], mode, margin) for key, entry in timings.get("shapes", {}).items()}
    return {name: picks.get(key, "dense") for name, key in timings.get("layers", {}).items()}


def _unmeasured(mode: str, purpose: str, timings: Mapping) -> Decision | None:
    """The decision when nothing was (or could be) timed; None when timings are there to decide from."""
    dense = {name: "dense" for name in timings.get("layers", {})}
    context = dict(timings.get("context", {}))
    if mode == "off" or not dense:
        return Decision(mode, purpose, dense, "off: requested" if mode == "off" else
                        f"{mode}: no swappable nn.Linear has a 2:4 mask", {}, context)
    if "shapes" in timings:
        return None
    if context.get("unavailable") and not timings.get("candidates"):
        why = "; ".join(sorted(set(context["unavailable"].values())))
        return Decision(mode, purpose, dense, f"{mode}: dense, no 2:4 backend here ({why})", {}, context,
                        f"semi_structured='on': no 2:4 backend can run here, dense masked path used ({why})"
                        if mode == "on" else "")
    return Decision(mode, purpose, dense, f"{mode}: dense until timed: the 2:4 backends are timed on the GPU when "
                                          f"the run starts", {}, context)


def check_two_four(mode: str, purpose: str) -> None:
    """A ``ValueError`` naming the allowed values unless ``mode`` and ``purpose`` are known."""
    if mode not in SEMI_STRUCTURED_MODES or purpose not in PURPOSES:
        raise ValueError(f"semi_structured={mode!r}, purpose={purpose!r}: choose a mode of "
                         f"{', '.join(SEMI_STRUCTURED_MODES)} and a purpose of {', '.join(PURPOSES)}")


def decide_two_four(mode: str, purpose: str, timings: Mapping, margin: float = MARGIN) -> Decision:
    """Which 2:4 layers heal (or infer) on which backend, from a ``probe_sparse24.time_two_four`` record:
    per shape the fastest backend (``pick_backend``), then under ``auto`` the whole-step veto: the choice is
    kept only if the block step with it (``step_ms["chosen"]``) beats all dense by ``margin``. ``on`` keeps
    the fastest 2:4 backend and says, in ``warning``, where it is slower than dense."""
    check_two_four(mode, purpose)
    early = _unmeasured(mode, purpose, timings)
    if early is not None:
        return early
    shapes = {}
    for key, entry in timings["shapes"].items():
        pick = pick_backend(entry["ms"], mode, margin)
        shapes[key] = {**entry, "choice": pick, "speedup": entry["ms"]["dense"] / entry["ms"][pick]}
    choice = {name: shapes[key]["choice"] for name, key in timings["layers"].items()}
    return _conclude(Decision(mode, purpose, choice, "", shapes, dict(timings.get("context", {}))),
                     timings.get("step_ms"), margin)


def _best_ratio(entry: dict) -> str:
    sparse = [ms for name, ms in entry["ms"].items() if name != "dense"]
    return f"{entry['ms']['dense'] / min(sparse):.2f}x" if sparse else "none ran"


def _conclude(decision: Decision, step_ms: Mapping[str, float] | None, margin: float) -> Decision:
    """The reason line, the whole-step veto and the forced-but-slower warning."""
    sparse = {key: entry for key, entry in decision.shapes.items() if entry["choice"] != "dense"}
    count = sum(len(entry["layers"]) for entry in sparse.values())
    summary = ", ".join(f"{key} {entry['choice']} {entry['speedup']:.2f}x" for key, entry in sparse.items())
    best = ", ".join(f"{key} {_best_ratio(entry)}" for key, entry in decision.shapes.items())
    choice, context, warning = dict(decision.choice), dict(decision.context), ""
    if decision.mode == "auto":
        reason = (f"auto: 2:4 on {count} of {len(choice)} linears, measured faster than dense ({summary})" if count
                  else f"auto: dense, no 2:4 backend beat dense by {margin:.0%} (best 2:4 speedup: {best})")
    else:
        reason = f"on: 2:4 on {count} of {len(choice)} linears ({summary})" if count else \
                 "on: dense, no 2:4 backend could take these shapes"
        slower = {key: e for key, e in sparse.items() if e["speedup"] < 1}
        if slower:
            ratios = ", ".join(f"{key} {e['choice']} {e['speedup']:.2f}x of dense" for key, e in slower.items())
            warning = f"semi_structured='on': 2:4 is slower than dense on this GPU for {ratios}; kept as requested"
    if step_ms and count:
        context["step_ms"] = dict(step_ms)
        if decision.mode == "auto" and step_ms["chosen"] * (1 + margin) >= step_ms["dense"]:
            choice = {name: "dense" for name in choice}
            reason = (f"auto: dense, the step with 2:4 ({step_ms['chosen']:.2f} ms) was not faster than "
                      f"dense ({step_ms['dense']:.2f} ms)")
    return Decision(decision.mode, decision.purpose, choice, reason, decision.shapes, context, warning)
