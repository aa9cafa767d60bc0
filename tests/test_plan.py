"""The plan as a pure function of facts: plans for CUDA kinds built on this CPU from made-up facts, checked
against the measured tables; resolve_plan with facts joins no process group, runs no forward, times nothing;
the 2:4 choice and its whole-step veto from made-up timings; the ``plan`` command."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_vit
from starfish_fast import HealConfig, adapter_for, rules
from starfish_fast.kernels import HAVE_TRITON
from starfish_fast.plan import decide, resolve_plan
from starfish_fast.probe import Facts

ROOT = Path(__file__).resolve().parents[1]
DEIT_B_WEIGHTS = 84_934_656
BLOCKS = tuple(f"blocks.{i}" for i in range(12))


def deit_b_facts(kind: str, **fields) -> Facts:
    """DeiT-B healing on ``kind``: 197 tokens of width 768 out of each of its 12 blocks, 1,000 logits."""
    made_up = dict(blocks=BLOCKS, has_mlp=True, trained_weights=DEIT_B_WEIGHTS, calib_images=5_000,
                   tokens_per_sample=197, teacher_block_elements=12 * 197 * 768, teacher_logit_elements=1000)
    return Facts.for_device_kind(kind, **{**made_up, **fields})


@pytest.fixture(scope="module")
def vit():
    return adapter_for(tiny_vit())        # the timm_vit family's adapter, as DeiT-B's


@pytest.mark.parametrize("kind", ["sm80", "sm86", "sm90"])
def test_cuda_kinds_planned_on_the_cpu_from_the_measured_tables(kind, vit):
    config = HealConfig(epochs=3, progress=False)
    plan = decide(config, vit, deit_b_facts(kind))
    assert plan.device == "cuda" and plan.precision == "bf16" and plan.teacher_dtype == "bf16"
    assert plan.kernels == {op: "triton" if HAVE_TRITON and on else "torch"
                            for op, on in rules.AUTO_TRITON_ON_CUDA.items()}
    assert plan.compact_mlp and not plan.compact_qk and not plan.attention_fp32_core   # QK dims: CPU only
    measured = rules.COMPILE_MEASURED.get((kind, "timm_vit"))
    if measured is None:
        assert not plan.compile and f"unmeasured for timm_vit models on {kind}" in plan.reasons["compile"]
    else:   # the table's break-even: 3 epochs of 5,000 DeiT-B images do not repay a cold compile on sm90
        per_image = 1 / measured.eager - 1 / measured.compiled
        assert plan.compile == (15_000 * per_image > measured.cold) and measured.source in plan.reasons["compile"]
    cache = 12 * 197 * 768 * 2 * 5_000                   # bf16 block outputs of every image: 18 GB
    fits = cache <= rules.GPU_HEADROOM_FRACTION * rules.DEVICE_KINDS[kind].memory
    assert plan.teacher_store == ("device" if fits else "disk"), plan.reasons["teacher_store"]
    assert plan.teacher_store == ("disk" if kind == "sm86" else "device")   # 24 GB A10: not in half its memory
    assert plan.blocks == BLOCKS and plan.world_size == 1 and not plan.semi_structured


def test_an_h200_by_hand_and_host_memory_for_pinned(vit):
    config = HealConfig(progress=False)
    h200 = deit_b_facts("sm90", memory_total=rules.H200_MEMORY, memory_free=rules.H200_MEMORY,
                        calib_images=15_000)
    assert decide(config, vit, h200).teacher_store == "device"          # 54 GB: within half of 141 GB
    assert decide(config, vit, deit_b_facts("sm90", calib_images=15_000)).teacher_store == "disk"    # not of 80
    a10 = deit_b_facts("sm86", host_free=256 * 10**9)
    assert decide(config, vit, a10).teacher_store == "pinned"


def test_unknown_kind_is_one_line():
    with pytest.raises(ValueError, match="unknown device kind 'sm75'; known: cpu, sm80, sm86, sm90"):
        Facts.for_device_kind("sm75")


def test_the_cpu_rules_from_made_up_facts(vit):
    config = HealConfig(progress=False)
    native = decide(config, vit, Facts(blocks=BLOCKS, has_mlp=True, cpu_bf16=True, calib_images=64,
                                       teacher_block_elements=10, teacher_logit_elements=10, host_free=1 << 30))
    assert native.precision == "bf16" and native.compact_qk and native.attention_fp32_core
    assert native.kernels == {op: "torch" for op in rules.OPS} and native.reasons["teacher_store"].endswith("free)")
    plain = decide(config, vit, Facts(blocks=BLOCKS, has_mlp=True))
    assert plain.precision == "fp32" and plain.teacher_store == "device" and "size unknown" in \
        plain.reasons["teacher_store"]
    with pytest.raises(ValueError, match="sync_bn needs CUDA"):
        decide(HealConfig(sync_bn=True, progress=False), vit, Facts(blocks=BLOCKS, world_size=2))
    with pytest.raises(ValueError, match="no blocks to align"):
        decide(config, vit, Facts())


def _raise(*args, **kwargs):
    raise AssertionError("resolve_plan with facts must not probe")


def test_resolve_plan_with_facts_probes_nothing(monkeypatch):
    """No process group, no forward, no timing, no device query: every probe path raises here."""
    from starfish_fast import distributed, probe, probe_sparse24, timing

    model = tiny_vit()
    for target, name in [(torch.distributed, "init_process_group"), (distributed, "join"), (probe, "probe"),
                         (probe, "process_device"), (probe, "machine_facts"), (probe_sparse24, "measure_layer"),
                         (probe_sparse24, "block_step_timer"), (probe_sparse24, "time_two_four"),
                         (timing, "cuda_median_ms"), (torch.cuda, "mem_get_info"),
                         (torch.cuda, "get_device_capability"), (type(model), "forward")]:
        monkeypatch.setattr(target, name, _raise)
    plan = resolve_plan(HealConfig(progress=False), model, facts=deit_b_facts("sm90", blocks=("blocks.0",)))
    assert plan.precision == "bf16" and plan.blocks == ("blocks.0",)


def _timings(dense_ms: float, sparse_ms: float, step_ms=None) -> dict:
    """A made-up ``time_two_four`` record: DeiT-B's fc1 in two blocks, one shape timed."""
    record = {"layers": {"blocks.0.mlp.fc1": "3072x768", "blocks.1.mlp.fc1": "3072x768"},
              "context": {"tokens": 25_216}, "candidates": ["torch_cusparselt"],
              "shapes": {"3072x768": {"layers": ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"],
                                      "ms": {"dense": dense_ms, "torch_cusparselt": sparse_ms}, "errors": {}}}}
    if step_ms is not None:
        record["step_ms"] = step_ms
    return record


@pytest.mark.parametrize("sparse_ms,step_ms,kept", [
    (0.5, {"chosen": 0.8, "dense": 1.0}, True),           # faster per layer and for the step
    (0.5, {"chosen": 0.99, "dense": 1.0}, False),         # the whole-step veto: within MARGIN
    (0.98, None, False),                                  # per layer within MARGIN: dense
])
def test_two_four_from_made_up_timings(vit, sparse_ms, step_ms, kept):
    plan = decide(HealConfig(progress=False), vit, deit_b_facts("sm80", two_four=_timings(1.0, sparse_ms, step_ms)))
    assert plan.semi_structured == kept
    assert set(plan.semi_structured_choice.values()) == {"torch_cusparselt" if kept else "dense"}
    assert plan.semi_structured_timings["shapes"]["3072x768"]["ms"]["torch_cusparselt"] == sparse_ms
    exact = decide(HealConfig(mode="exact", progress=False), vit, deit_b_facts("sm80", two_four=_timings(1.0, 0.5)))
    assert not exact.semi_structured and exact.reasons["semi_structured"] == "exact mode: dense, as the reference"


def test_forced_two_four_slower_than_dense_is_a_plan_warning(vit):
    forced = HealConfig(semi_structured="on", progress=False)
    plan = decide(forced, vit, deit_b_facts("sm90", two_four=_timings(1.0, 2.0)))
    assert plan.semi_structured and "slower than dense" in plan.warnings[0] and "0.50x" in plan.warnings[0]
    untimed = {"layers": {"blocks.0.mlp.fc1": "3072x768"}}               # a named kind: nothing timed here
    named = decide(HealConfig(progress=False), vit, deit_b_facts("sm90", two_four=untimed))
    assert not named.semi_structured and "timed on the GPU when the run starts" in named.reasons["semi_structured"]


def _plan_command(*args):
    return subprocess.run([sys.executable, "-m", "starfish_fast", "plan", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_the_plan_command_for_a_named_kind():
    done = _plan_command("--model-name", "fashion_vit", "--device-kind", "sm90", "--calib-samples", "1000")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("plan: cuda fast bf16") and "sm90 NVIDIA H100 80GB, 80 GB" in lines[1]
    assert any(line.startswith("  compile: auto: eager: ") and "sm90, timm_vit" in line for line in lines)


def test_the_plan_command_refuses_an_unknown_kind_in_one_line():
    done = _plan_command("--model-name", "fashion_vit", "--device-kind", "sm75")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("starfish-fast plan: error: ") and "--device-kind" in lines[0]
    assert all(word in lines[0] for word in ("sm75", "cpu", "sm80", "sm86", "sm90")), lines
