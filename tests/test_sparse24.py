"""2:4 layer: mask check, CPU fallback with one warning, the sparse autograd path (through a
stand-in backend on CPU, every real one under -m cuda), module swapping; the measured choice with
injected timings (fastest wins, ties go to dense, forced-but-slower warns once, the whole-step check,
the sidecar record); the benchmark's plot on made-up data and the GPU check's 2:4 part rehearsed."""
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from starfish_fast import probe_sparse24, sparse24
from starfish_fast.masks import apply_masks
from starfish_fast.probe_sparse24 import benchmark_layer, choose_semi_structured
from starfish_fast.prune import nm_masks
from starfish_fast.sparse24 import (BACKENDS, SemiStructuredLinear, backend_reason, convert_linears, is_two_four,
                                    restore_linears, semi_structured_supported)
from starfish_fast.sparse24_export import save_decision

BENCH = Path(__file__).resolve().parents[1] / "bench"

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def fresh_warnings():
    sparse24._WARNED.clear()
    yield
    sparse24._WARNED.clear()


def two_four_mask(rows, cols, seed=0):
    """A random mask keeping exactly 2 of every 4 along each row."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, cols // 4, 4, generator=generator)              # (rows, cols/4, 4)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
    return keep.view(rows, cols)


def dense_reference(x, weight, bias, mask):
    """The plain masked linear, on its own leaf copies of the parameters."""
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    y = F.linear(x, weight * mask, bias)
    return x, weight, bias, y


def test_is_two_four():
    assert is_two_four(two_four_mask(8, 16))
    assert is_two_four(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0]]))              # fewer kept fits the format
    assert not is_two_four(torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0]]))           # 3 of 4 kept
    assert not is_two_four(torch.ones(4, 6, dtype=torch.bool)[:, ::3].repeat(1, 3))   # 6 columns: no whole groups
    assert not is_two_four(two_four_mask(8, 16).view(2, 4, 16))                # not 2-D


def test_supported_reasons_on_cpu():
    weight, mask = torch.randn(64, 64), two_four_mask(64, 64)
    ok, reason = semi_structured_supported(weight, mask, torch.bfloat16)
    assert not ok and "needs a CUDA GPU" in reason
    ok, reason = semi_structured_supported(weight, torch.ones(64, 64, dtype=torch.bool))
    assert not ok and "not 2:4" in reason
    ok, reason = semi_structured_supported(weight, mask[:32])
    assert not ok and "differs from weight shape" in reason


def test_cpu_fallback_warns_once_and_matches_dense_masked():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    mask = two_four_mask(48, 64)
    layer = SemiStructuredLinear.from_linear(linear, mask)
    assert layer.weight is linear.weight and (layer.weight[~mask] == 0).all()   # shared, zeroed on construction
    x = torch.randn(3, 5, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x.requires_grad_())
        layer(x)
        SemiStructuredLinear.from_linear(nn.Linear(64, 48), mask)(x)            # same reason: still one warning
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "dense masked path" in messages[0] and "CUDA" in messages[0]
    x_ref, w_ref, b_ref, y_ref = dense_reference(x, linear.weight, linear.bias, mask)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad)
    assert (layer.weight.grad[~mask] == 0).all()


class StandInPack:
    """Plays a 2:4 backend on CPU (packing = keeping the weight) to test the autograd function's logic."""
    calls = 0

    def __init__(self, weight, bias):
        self.repack(weight, bias)

    def repack(self, weight, bias):
        type(self).calls += 1
        assert is_two_four(weight != 0) and weight.is_contiguous()
        self.weight, self.bias = weight, bias

    def __call__(self, x2d):
        return F.linear(x2d, self.weight, self.bias)


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, True)])
def test_sparse_function_outputs_and_gradients(monkeypatch, dtype, autocast):
    monkeypatch.setattr(sparse24, "choose_backend", lambda weight, mask, dtype=None, name=None: ("stand_in", ""))
    monkeypatch.setitem(sparse24.PACKERS, "stand_in", StandInPack)
    torch.manual_seed(1)
    linear = nn.Linear(32, 16)
    mask = two_four_mask(16, 32, seed=1)
    layer = SemiStructuredLinear.from_linear(linear, mask)
    x = torch.randn(2, 7, 32, requires_grad=True)
    StandInPack.calls = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
        x_ref, w_ref, b_ref, y_ref = dense_reference(x, linear.weight, linear.bias, mask)
    assert StandInPack.calls == 1 and y.dtype == y_ref.dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer(x)
    assert StandInPack.calls == 2 and len(layer._packs) == 1              # packed again in place, every call
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for ours, reference in [(x.grad, x_ref.grad), (linear.weight.grad, w_ref.grad), (linear.bias.grad, b_ref.grad)]:
        assert ours.dtype == reference.dtype == torch.float32
        torch.testing.assert_close(ours, reference, rtol=tol, atol=tol)
    assert (linear.weight.grad[~mask] == 0).all()


def test_convert_and_restore_timm_vit():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    masks = nm_masks(model, scope="qkv_out_mlp")
    apply_masks(model, masks)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        replaced = convert_linears(model, masks)
        assert len(replaced) == 8 and isinstance(model.blocks[0].mlp.fc1, SemiStructuredLinear)
        assert list(model.state_dict()) == keys
        with torch.no_grad():
            torch.testing.assert_close(model(images), expected)
    assert sorted(restore_linears(model)) == sorted(replaced)
    assert type(model.blocks[1].attn.qkv) is nn.Linear and list(model.state_dict()) == keys


def test_convert_skips_multihead_attention_out_proj():
    torch.manual_seed(0)
    model = TorchvisionViT(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                           num_classes=10).eval()
    masks = nm_masks(model, scope="qkv_out_mlp")
    replaced = convert_linears(model, masks)
    assert replaced == ["encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_0.mlp.3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_benchmark_names_the_reason_it_cannot_run():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        benchmark_layer(64, 64, tokens=16, device="cpu")


# ----------------------------------------------------------------------------- the measured choice
def small_vit():
    torch.manual_seed(0)         # linears: qkv 192x64, proj 64x64, fc1 256x64, fc2 64x256, two blocks
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4,
                              num_classes=10).eval()
    return model, nm_masks(model, scope="qkv_out_mlp")


class Timings:
    """An injected ``measure``: milliseconds from a table by backend and shape; counts the calls."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, name, shape, *, tokens, dtype, device, purpose, bias):
        self.calls.append((name, tuple(shape), purpose))
        value = self.table[tuple(shape)][name]
        if isinstance(value, Exception):
            raise value
        return value


TABLE = {(192, 64): {"dense": 1.0, "torch_cusparselt": 2.0, "cached_cusparselt": 1.5},      # dense wins
         (64, 64): {"dense": 1.0, "torch_cusparselt": 3.0, "cached_cusparselt": RuntimeError("refused\nmore")},
         (256, 64): {"dense": 1.0, "torch_cusparselt": 0.9, "cached_cusparselt": 0.5},     # cached wins
         (64, 256): {"dense": 1.0, "torch_cusparselt": 1.2, "cached_cusparselt": 0.99}}    # a tie: dense


def choose(mode="auto", table=TABLE, **kwargs):
    model, masks = small_vit()
    measure = Timings(table)
    decision = choose_semi_structured(model, masks, "cuda", torch.bfloat16, mode, tokens=1000, measure=measure,
                                      candidates=["torch_cusparselt", "cached_cusparselt"], **kwargs)
    return decision, measure


def test_auto_keeps_the_fastest_and_ties_go_to_dense():
    decision, measure = choose()
    assert decision.choice == {f"blocks.{i}.{name}": backend for i in range(2) for name, backend in [
        ("attn.qkv", "dense"), ("attn.proj", "dense"), ("mlp.fc1", "cached_cusparselt"), ("mlp.fc2", "dense")]}
    assert decision.semi_structured and decision.reason.startswith("auto: 2:4 on 2 of 8 linears")
    assert len(measure.calls) == 4 * 3 and {c[2] for c in measure.calls} == {"inference"}   # once per shape
    shapes = decision.record()["shapes"]
    assert shapes["256x64"]["ms"] == {"dense": 1.0, "torch_cusparselt": 0.9, "cached_cusparselt": 0.5}
    assert shapes["256x64"]["speedup"] == 2.0 and shapes["64x256"]["choice"] == "dense"
    assert shapes["64x64"]["errors"] == {"cached_cusparselt": "RuntimeError: refused"}
    assert shapes["192x64"]["layers"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    json.dumps(decision.record())                                          # the plan / sidecar can keep it


def test_auto_with_no_win_is_dense_and_says_so():
    slow = {shape: {**row, "cached_cusparselt": 5.0, "torch_cusparselt": 4.0} for shape, row in TABLE.items()}
    decision, _ = choose(table=slow)
    assert not decision.semi_structured and "no 2:4 backend beat dense by 3%" in decision.reason
    assert "256x64 0.25x" in decision.reason


def test_forced_but_slower_warns_once_with_the_ratio():
    slow = {shape: {"dense": 1.0, "torch_cusparselt": 2.0, "cached_cusparselt": 4.0} for shape in TABLE}
    with pytest.warns(RuntimeWarning, match=r"slower than dense.*256x64 torch_cusparselt 0.50x of dense") as caught:
        decision, _ = choose("on", table=slow)
        choose("on", table=slow)
    assert len([w for w in caught if "slower than dense" in str(w.message)]) == 1
    assert set(decision.choice.values()) == {"torch_cusparselt"} and decision.reason.startswith("on: 2:4 on 8 of 8")


def test_off_times_nothing():
    model, masks = small_vit()
    decision = choose_semi_structured(model, masks, "cuda", torch.bfloat16, "off", measure=pytest.fail)
    assert set(decision.choice.values()) == {"dense"} and decision.reason == "off: requested"


def test_without_a_gpu_auto_is_dense_with_the_reason():
    model, masks = small_vit()
    decision = choose_semi_structured(model, masks, "cpu", torch.bfloat16, measure=pytest.fail)
    assert not decision.semi_structured and "needs a CUDA GPU" in decision.reason
    assert set(decision.record()["unavailable"]) == set(BACKENDS)


def test_bad_mode_is_one_line():
    model, masks = small_vit()
    with pytest.raises(ValueError, match="semi_structured='fast'.*auto, on, off"):
        choose_semi_structured(model, masks, "cpu", torch.bfloat16, "fast")


@pytest.mark.parametrize("step_ms,kept", [((0.8, 1.0), True), ((1.0, 0.99), False)])
def test_healing_keeps_2to4_only_where_the_whole_step_is_faster(step_ms, kept):
    chosen, dense = step_ms
    seen = []

    def measure_step(choice):
        seen.append(dict(choice))
        return chosen if any(backend != "dense" for backend in choice.values()) else dense

    decision, measure = choose(purpose="heal", measure_step=measure_step)
    assert {c[2] for c in measure.calls} == {"heal"} and len(seen) == 2
    assert decision.semi_structured == kept and decision.context["step_ms"] == {"chosen": chosen, "dense": dense}
    if not kept:
        assert "the step with 2:4" in decision.reason


def test_sidecar_holds_the_choice_and_the_timings(tmp_path):
    decision, _ = choose()
    path = tmp_path / "deit.2to4.json"
    save_decision(decision, path)
    saved = json.loads(path.read_text())
    assert saved["choice"]["blocks.1.mlp.fc1"] == "cached_cusparselt" and saved["mode"] == "auto"
    assert saved["shapes"]["256x64"]["ms"]["cached_cusparselt"] == 0.5 and saved["tokens"] == 1000
    assert saved["reason"] == decision.reason and "library" in saved and saved["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["deit.2to4.json"]        # no temporary file left


def test_convert_follows_the_choice():
    decision, _ = choose()
    model, masks = small_vit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        replaced = convert_linears(model, masks, choice=decision.choice)
    assert replaced == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert model.blocks[0].mlp.fc1.backend == "cached_cusparselt" and type(model.blocks[0].mlp.fc2) is nn.Linear


# ----------------------------------------------------------------------------- bench and GPU-check part
@pytest.fixture
def bench_on_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


def test_speedup_plot_from_made_up_data(tmp_path, bench_on_path):
    import bench_sparse24

    linears = [{"model": model, "layer": layer, "tokens": tokens,
                "inference": {"dtype": dtype, "dense_ms": 1.0, "torch_cusparselt_speedup": 0.2 + i / 10,
                              "cached_cusparselt_speedup": 1.1 + i / 20}}
               for model, tokens in [("deit_base_patch16_224", 25216), ("deit3_huge_patch14_224", 8224)]
               for dtype in ("bfloat16", "float16") for i, layer in enumerate(("qkv", "proj", "fc1", "fc2"))]
    path = bench_sparse24.plot_speedups({"device": "made-up GPU", "linears": linears}, tmp_path / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_bench_without_gpu_records_why(tmp_path, bench_on_path, capsys):
    import bench_sparse24

    args = bench_sparse24.argparse.Namespace(models=["deit_base_patch16_224"], dtypes=["bfloat16"], quick=True,
                                             skip_models=True, iters=1, output=str(tmp_path / "r.json"))
    report = bench_sparse24.run(args)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == saved["status"] == "skipped" and "CUDA GPU" in capsys.readouterr().out


def test_gpu_check_part_rehearses_on_cpu(tmp_path, bench_on_path):
    from gpu_check_log import Recorder, read_records
    from gpu_check_sparse24 import part_sparse24

    part_sparse24(Recorder(tmp_path, "sparse24"), tmp_path, rehearse=True, seconds=240)
    records = {r["name"]: r for r in read_records(tmp_path)}
    assert records["sparse24:child"]["ok"] is True, records["sparse24:child"].get("tail")
    assert records["sparse24:library"]["ok"] is True and records["sparse24:decision:cpu"]["ok"] is True
    assert records["sparse24:wheels"]["ok"] is None and records["sparse24:model"]["ok"] is None
    assert not [name for name, r in records.items() if r["ok"] is False]


# ----------------------------------------------------------------------------- GPU
def cuda_backend_or_skip(weight, mask, dtype, backend=None):
    reason = backend_reason(backend, weight.device, dtype) if backend else ""
    ok, reason = (False, reason) if reason else semi_structured_supported(weight, mask, dtype)
    if not ok:
        pytest.skip(f"this GPU cannot run 2:4: {reason}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,autocast", [(torch.bfloat16, True), (torch.float16, False)])
@pytest.mark.parametrize("tokens", [128, 197 * 2 + 3])
def test_cuda_sparse_layer_matches_dense(backend, dtype, autocast, tokens):
    torch.manual_seed(0)
    linear = nn.Linear(256, 192, device="cuda", dtype=torch.float32 if autocast else dtype)
    mask = two_four_mask(192, 256).cuda()
    cuda_backend_or_skip(linear.weight, mask, dtype, backend)
    layer = SemiStructuredLinear.from_linear(linear, mask, backend)
    x = torch.randn(tokens, 256, device="cuda", dtype=linear.weight.dtype, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)                       # no fallback allowed here
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            y = layer(x)
            x_ref, w_ref, b_ref, y_ref = dense_reference(x, linear.weight, linear.bias, mask)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(linear.weight.grad, w_ref.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(linear.bias.grad, b_ref.grad, rtol=tol, atol=tol * 10)
    assert (linear.weight.grad[~mask] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_weights_change_between_steps(backend):
    """The mask is fixed but the weights move: every forward must pack the current weights."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 128, device="cuda", dtype=torch.float16)
    mask = two_four_mask(128, 128).cuda()
    cuda_backend_or_skip(linear.weight, mask, torch.float16, backend)
    layer = SemiStructuredLinear.from_linear(linear, mask, backend)
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        layer(x)
        linear.weight.mul_(2)
        torch.testing.assert_close(layer(x), F.linear(x, linear.weight * mask, linear.bias), rtol=2e-3, atol=2e-3)


@pytest.mark.cuda
def test_cuda_unsupported_shape_falls_back():
    linear = nn.Linear(36, 40, device="cuda", dtype=torch.float16)
    mask = two_four_mask(40, 36).cuda()
    ok, reason = semi_structured_supported(linear.weight, mask)
    assert not ok
    x = torch.randn(5, 36, device="cuda", dtype=torch.float16)
    with pytest.warns(RuntimeWarning, match="dense masked path"):
        y = SemiStructuredLinear.from_linear(linear, mask)(x)
    torch.testing.assert_close(y, F.linear(x, linear.weight * mask, linear.bias), rtol=0, atol=0)


def test_block_step_timer_times_a_copy_of_the_block_with_the_choice(monkeypatch):
    """The block runs forward and backward (a copy: the model gets no gradients) on its captured inputs,
    converted with the choice and the masks renamed relative to the block."""
    from starfish_fast.calibration import capture_inputs

    model, masks = small_vit()
    x = torch.randn(3, 3, 32, 32)
    inputs = capture_inputs(model.blocks[1], lambda: model(x))
    assert inputs[0][0].shape == (3, 17, 64) and inputs[1] == {}
    converted, steps = [], []
    real_convert = probe_sparse24.convert_linears

    def convert(block, block_masks, compute_dtype=None, choice=None):
        converted.append((sorted(block_masks), dict(choice)))
        return real_convert(block, block_masks, compute_dtype, {name: "dense" for name in choice})

    def timer(fn):
        fn()
        steps.append(True)
        return 2.5

    monkeypatch.setattr(probe_sparse24, "convert_linears", convert)
    measure = probe_sparse24.block_step_timer(model, "blocks.1", inputs, masks, "cpu", torch.bfloat16, timer=timer)
    assert measure({"blocks.1.mlp.fc1": "torch_cutlass", "blocks.0.mlp.fc1": "torch_cutlass"}) == 2.5
    assert converted == [(["attn.proj.weight", "attn.qkv.weight", "mlp.fc1.weight", "mlp.fc2.weight"],
                          {"mlp.fc1": "torch_cutlass"})]
    assert steps == [True] and all(p.grad is None for p in model.parameters())


def test_the_probe_times_the_block_with_the_most_2to4_linears(monkeypatch):
    """On CUDA the probe times the busiest block's step at one process's batch, per shape at its tokens
    (faked here: no GPU is needed to check the wiring)."""
    from starfish_fast import probe
    from starfish_fast.config import HealConfig
    from starfish_fast.models import adapter_for

    model, masks = small_vit()
    masks = {key: value for key, value in masks.items() if not key.startswith("blocks.0.mlp")}
    seen = {}
    monkeypatch.setattr(probe, "block_step_timer", lambda model, block, inputs, masks, device, dtype:
                        seen.update(block=block, batch=inputs[0][0].shape[0]) or "timer")
    monkeypatch.setattr(probe, "time_two_four", lambda *args, **kwargs: seen.update(kwargs) or "timings")
    adapter = adapter_for(model)
    calib = [torch.randn(8, 3, 32, 32)]
    result = probe._two_four_facts(HealConfig(batch_size=8), model, adapter, adapter.block_names(model), masks,
                                   calib, torch.device("cuda"), torch.bfloat16, world_size=2, tokens_per_sample=17)
    assert result == "timings" and seen["block"] == "blocks.1" and seen["batch"] == 4
    assert seen["measure_step"] == "timer" and seen["tokens"] == 4 * 17 and seen["purpose"] == "heal"


# ----------------------------------------------------------------------------- the op in a compiled block
@pytest.mark.parametrize("stand_in", [False, True])
def test_a_compiled_block_with_2to4_layers_is_one_graph(monkeypatch, stand_in):
    """torch.compile(fullgraph=True) of a block whose linears are 2:4 layers: one graph holding the op (the
    dense masked product on the CPU, or a stand-in backend's pack), outputs and gradients equal to the plain
    block with masked weights."""
    import copy

    if stand_in:
        monkeypatch.setattr(sparse24, "choose_backend", lambda weight, mask, dtype=None, name=None: ("stand_in", ""))
        monkeypatch.setitem(sparse24.PACKERS, "stand_in", StandInPack)
    model, masks = small_vit()
    apply_masks(model, masks)
    reference = copy.deepcopy(model.blocks[0])
    block = model.blocks[0]
    local = {key[len("blocks.0."):]: value for key, value in masks.items() if key.startswith("blocks.0.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # the CPU's dense path warns once
        assert len(convert_linears(block, local, compute_dtype=torch.float32)) == 4
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=counting, fullgraph=True)
    x = torch.randn(3, 17, 64)
    y = compiled(x)
    expected = reference(x)
    assert len(graphs) == 1
    ops = [node for node in graphs[0].graph.nodes if node.target is torch.ops.starfish_fast.sparse24_linear.default]
    assert len(ops) == 4
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    for (name, ours), theirs in zip(block.named_parameters(), reference.parameters()):
        mask = local.get(name, torch.ones((), dtype=torch.bool))   # the plain block's gradient is dense
        torch.testing.assert_close(ours.grad, theirs.grad * mask, rtol=1e-4, atol=1e-5, msg=name)
        assert (ours.grad[~mask.expand_as(ours)] == 0).all(), name


def test_a_copied_layer_packs_its_own_weight(monkeypatch):
    """The op finds a layer's packs by its key: a deepcopy gets its own key and no packs of the original's."""
    import copy

    monkeypatch.setattr(sparse24, "choose_backend", lambda weight, mask, dtype=None, name=None: ("stand_in", ""))
    monkeypatch.setitem(sparse24.PACKERS, "stand_in", StandInPack)
    layer = SemiStructuredLinear.from_linear(nn.Linear(32, 16), two_four_mask(16, 32))
    x = torch.randn(5, 32)
    layer(x)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.mul_(3)
    assert twin._key != layer._key and not twin._packs
    torch.testing.assert_close(twin(x), F.linear(x, twin.weight * twin.mask, twin.bias))
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight * layer.mask, layer.bias))
