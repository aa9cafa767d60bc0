"""The engine: fast vs exact, teacher stores, resume, masked optimizer, config strictness, outputs."""
import contextlib
import copy
import dataclasses
import json

import pytest
import torch

import starfish_fast.engine as engine
from helpers import crash_after_saving, images, random_masks, tiny_mobilenet, tiny_vit
from starfish_fast import HealConfig, heal
from starfish_fast.models import adapter_for, prunable_weights
from starfish_fast.teacher import make_teacher_store, teacher_outputs


def _setup(seed=0, density=0.4):
    dense = tiny_vit(seed=seed)
    return dense, copy.deepcopy(dense), random_masks(dense, density=density), images(20)


def _config(**overrides):
    # fp32 unless a test says otherwise: precision="auto" picks bf16 on CPUs with AVX512-BF16/AMX
    base = dict(epochs=2, batch_size=8, lr=2e-3, min_lr=1e-5, progress=False, precision="fp32")
    base.update(overrides)
    return HealConfig(**base)


@pytest.mark.parametrize("weight_decay,grad_clip", [(0.0, 0.0), (0.05, 0.3)])
def test_fast_matches_exact_per_step(weight_decay, grad_clip):
    dense, pruned, masks, calib = _setup()
    exact_model, fast_model = copy.deepcopy(pruned), copy.deepcopy(pruned)
    exact = heal(exact_model, dense, masks, calib, _config(mode="exact", weight_decay=weight_decay, grad_clip=grad_clip))
    fast = heal(fast_model, dense, masks, calib, _config(mode="fast", weight_decay=weight_decay, grad_clip=grad_clip,
                                                         log_every=2))
    assert len(exact.step_losses) == len(fast.step_losses) == 6
    for e, f in zip(exact.step_losses, fast.step_losses):
        assert abs(e - f) <= 1e-4 * max(1.0, abs(e))
    for key, value in exact_model.state_dict().items():
        torch.testing.assert_close(fast_model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert fast.history[0]["epoch"] == 1.0 and exact.teacher_store == fast.teacher_store == "device"


def test_fast_matches_exact_on_torchvision_vit():
    # fast mode on CPU swaps nn.MultiheadAttention for the fp32-core attention module
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    dense = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10).eval()
    masks = random_masks(dense, density=0.4)
    exact_model, fast_model = copy.deepcopy(dense), copy.deepcopy(dense)
    exact = heal(exact_model, dense, masks, images(16), _config(mode="exact"))
    fast = heal(fast_model, dense, masks, images(16), _config(mode="fast", log_every=1))
    for e, f in zip(exact.step_losses, fast.step_losses):
        assert abs(e - f) <= 1e-4 * max(1.0, abs(e))
    for key, value in exact_model.state_dict().items():
        torch.testing.assert_close(fast_model.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert type(fast_model.encoder.layers[0].self_attention) is torch.nn.MultiheadAttention


def test_triton_kernels_in_the_loop_match_torch():
    """kernels="triton" (the interpreter here): masked linear, fused loss and Adam kernels in the fast loop."""
    dense, pruned, masks, calib = _setup()
    runs = {}
    for kernels in ("torch", "triton"):
        model = copy.deepcopy(pruned)
        runs[kernels] = (heal(model, dense, masks, calib[:16], _config(kernels=kernels, weight_decay=0.05)), model)
    for a, b in zip(runs["torch"][0].step_losses, runs["triton"][0].step_losses):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    model = runs["triton"][1]
    assert type(model.blocks[0].mlp.fc1) is torch.nn.Linear          # the plain layers are put back
    for key, value in runs["torch"][1].state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    assert all((model.state_dict()[k][~m] == 0).all() for k, m in masks.items())


def test_semi_structured_on_cpu_falls_back_to_the_same_result(monkeypatch):
    from starfish_fast import sparse24
    from starfish_fast.prune import nm_masks

    monkeypatch.setattr(sparse24, "_WARNED", set())          # the fallback warns once per process
    dense = tiny_vit()
    masks = nm_masks(dense, n=2, m=4, scope="qkv_out_mlp")
    runs = {}
    for setting in ("off", "auto", "on"):
        model = copy.deepcopy(dense)
        with (pytest.warns(RuntimeWarning, match="no 2:4 backend can run here") if setting == "on"
              else contextlib.nullcontext()):
            runs[setting] = heal(model, dense, masks, images(16), _config(semi_structured=setting)), model
    assert runs["on"][0].step_losses == runs["auto"][0].step_losses == runs["off"][0].step_losses
    assert not runs["on"][0].plan.semi_structured and "no 2:4 backend here" in runs["on"][0].plan.reasons[
        "semi_structured"]
    assert type(runs["on"][1].blocks[0].mlp.fc1) is torch.nn.Linear


def test_fast_mode_keeps_masked_weights_zero_and_heals():
    dense, pruned, masks, calib = _setup(density=0.3)
    result = heal(pruned, dense, masks, calib, _config(epochs=4, weight_decay=0.1, moments_dtype="bf16"))
    state = pruned.state_dict()
    for key, mask in masks.items():
        assert (state[key][~mask] == 0).all(), key
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert not pruned.training and result.images == 80 and result.images_per_second > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cpu_low_precision_tracks_fp32(precision):
    """bf16 autocast, and fp16 autocast with the grad scaler driving MaskedAdam."""
    dense, pruned, masks, calib = _setup()
    results = {}
    for setting in ("fp32", precision):
        model = copy.deepcopy(pruned)
        results[setting] = heal(model, dense, masks, calib, _config(precision=setting, epochs=3))
        assert all((model.state_dict()[k][~m] == 0).all() for k, m in masks.items())
    for a, b in zip(results["fp32"].history, results[precision].history):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.1)
    assert results[precision].history[-1]["loss"] < results[precision].history[0]["loss"]


def test_auto_precision_rule(monkeypatch):
    import starfish_fast.plan as plan_module
    import starfish_fast.probe as probe_module

    def decided(config, device, model):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        plan = plan_module.resolve_plan(config, model, "cpu" if device == "cpu" else "cuda",
                                        calib=None if device == "cpu" else [])
        return plan.precision, plan.teacher_dtype

    config = HealConfig(progress=False, teacher_store="device")
    vit, cnn = tiny_vit(), tiny_mobilenet()
    monkeypatch.setattr(probe_module, "cpu_has_native_bf16", lambda: True)
    assert decided(config, "cpu", vit) == ("bf16", "bf16")
    assert decided(config, "cpu", cnn) == ("fp32", "fp16")
    monkeypatch.setattr(probe_module, "cpu_has_native_bf16", lambda: False)
    assert decided(config, "cpu", vit) == ("fp32", "fp16")
    exact = HealConfig(mode="exact", progress=False, teacher_store="device")
    assert decided(exact, "cpu", vit) == ("fp32", "fp16")


def test_mobilenet_fast_heals_with_batchnorm_in_train_mode():
    dense = tiny_mobilenet()
    pruned = copy.deepcopy(dense)
    running_mean = pruned.blocks[0][0].bn1.running_mean.clone()
    masks = random_masks(dense, "conv_fc", density=0.5)
    result = heal(pruned, dense, masks, images(8, size=32), _config(epochs=1, batch_size=4, scope="conv_fc"))
    assert not torch.equal(pruned.blocks[0][0].bn1.running_mean, running_mean)   # student ran in train mode
    assert len(result.step_losses) == 2


@pytest.mark.parametrize("kind", ["device", "disk", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_teacher_stores_match_direct_forward(tmp_path, kind, dtype):
    dense = tiny_vit()
    adapter = adapter_for(dense)
    names = adapter.block_names(dense)
    batches = [images(10)[:2], images(10)[2:7], images(10)[7:]]       # uneven: the first batch is the smallest
    store = make_teacher_store(kind, dense, adapter, names, batches, torch.device("cpu"), dtype=dtype,
                               keep_logits=True, disk_dir=tmp_path)
    assert store.kind == kind and len(store) == 3
    for i, batch in enumerate(batches):
        direct = teacher_outputs(dense, adapter, names, batch, keep_logits=True)
        got = store.get(i)
        assert len(got) == len(names) + 1
        for a, b in zip(got, direct):
            if kind == "recompute":
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            else:
                assert a.dtype == dtype
                torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0)
    assert not list(tmp_path.iterdir()), "the disk store's file is unlinked once mapped"


def test_store_auto_and_errors():
    from starfish_fast.rules import store_rule

    assert store_rule(1 << 20, cuda=False, gpu_free=0, host_free=8 << 30)[0] == "device"
    assert store_rule(1 << 60, cuda=False, gpu_free=0, host_free=8 << 30)[0] == "disk"
    assert store_rule(1 << 30, cuda=True, gpu_free=8 << 30, host_free=0)[0] == "device"
    assert store_rule(6 << 30, cuda=True, gpu_free=8 << 30, host_free=64 << 30)[0] == "pinned"
    assert store_rule(6 << 30, cuda=True, gpu_free=8 << 30, host_free=0)[0] == "disk"
    with pytest.raises(ValueError, match="is called 'device' since 0.3"):
        HealConfig(teacher_store="memory")
    dense = tiny_vit()
    adapter = adapter_for(dense)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_teacher_store("pinned", dense, adapter, ["blocks.0"], [images(2)], torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown teacher store 'ram'"):
        make_teacher_store("ram", dense, adapter, ["blocks.0"], [images(2)], torch.device("cpu"))
    result = heal(copy.deepcopy(dense), dense, random_masks(dense), images(8), _config(epochs=1))
    assert result.plan.teacher_store == result.teacher_store == "device"
    assert "fits in RAM" in result.plan.reasons["teacher_store"]


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_resume_reproduces_uninterrupted_run(tmp_path, mode):
    dense, pruned, masks, calib = _setup()
    uninterrupted = copy.deepcopy(pruned)
    full = heal(uninterrupted, dense, masks, calib, _config(mode=mode, epochs=3))
    interrupt_at = int(torch.randint(1, full.steps - 1, (1,), generator=torch.Generator().manual_seed(7)))
    checkpoint = tmp_path / "run.resume"
    config = _config(mode=mode, epochs=3, checkpoint_every=1, checkpoint_path=str(checkpoint), resume=True)
    with crash_after_saving(engine, interrupt_at):
        heal(copy.deepcopy(pruned), dense, masks, calib, config)
    resumed_model = copy.deepcopy(pruned)
    resumed = heal(resumed_model, dense, masks, calib, config)
    assert resumed.step_losses == full.step_losses
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    other_masks = random_masks(dense, density=0.4, seed=5)
    with pytest.raises(ValueError, match="refusing to resume.*the masks differ"):
        heal(copy.deepcopy(pruned), dense, other_masks, calib, config)


def test_config_is_strict():
    with pytest.raises(ValueError, match=r"unknown HealConfig keys \['epoch'\]"):
        HealConfig.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="HealConfig.mode='slow'; allowed: fast, exact"):
        HealConfig(mode="slow")
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        HealConfig(epochs=0)
    with pytest.raises(ValueError, match="checkpoint_path is needed"):
        HealConfig(checkpoint_every=5)
    assert HealConfig.from_dict({"epochs": 3, "compile": False}).compile == "off"


def test_metrics_and_plot_written(tmp_path):
    dense, pruned, masks, calib = _setup()
    config = _config(metrics_path=str(tmp_path / "m.jsonl"), plot_path=str(tmp_path / "loss.png"), log_every=1)
    heal(pruned, dense, masks, calib, config)
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "step"] == list(range(1, 7))
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1.0, 2.0]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("objective", ["mse", "kl", "starfish+kl"])
def test_other_objectives_train(objective):
    dense, pruned, masks, calib = _setup()
    result = heal(pruned, dense, masks, calib, _config(objective=objective, epochs=3))
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_ce_objective_needs_labels():
    dense, pruned, masks, calib = _setup()
    with pytest.raises(ValueError, match="needs labels"):
        heal(pruned, dense, masks, calib, _config(objective="ce"))
    labels = torch.randint(0, 10, (20,))
    result = heal(pruned, dense, masks, calib, _config(objective="ce", epochs=1), labels=labels)
    assert len(result.step_losses) == 3


def test_calibration_forms_are_equivalent():
    dense, pruned, masks, calib = _setup()
    as_tensor = heal(copy.deepcopy(pruned), dense, masks, calib, _config(epochs=1))
    as_images = heal(copy.deepcopy(pruned), dense, masks, list(calib), _config(epochs=1))
    as_pairs = heal(copy.deepcopy(pruned), dense, masks, [(b, torch.zeros(len(b))) for b in calib.split(8)],
                    _config(epochs=1))
    assert as_tensor.step_losses == as_images.step_losses == as_pairs.step_losses


@pytest.mark.cuda
@pytest.mark.parametrize("store", ["device", "pinned", "disk", "recompute"])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_cuda_fast_bf16_compiled_matches_fp32(store, kernels, tmp_path):
    dense, pruned, masks, calib = _setup()
    fp32 = heal(copy.deepcopy(pruned), dense, masks, calib,
                _config(mode="exact", device="cuda", teacher_store="device", teacher_dtype="bf16", epochs=2))
    fast_model = copy.deepcopy(pruned)
    fast = heal(fast_model, dense, masks, calib, _config(device="cuda", teacher_store=store, teacher_dir=str(tmp_path),
                                                         compile="on", precision="bf16", epochs=2,
                                                         kernels=kernels))
    assert fast.teacher_store == store
    for e, f in zip(fp32.history, fast.history):
        assert abs(e["loss"] - f["loss"]) <= 0.05 * e["loss"] + 1e-3
    state = fast_model.state_dict()
    assert all((state[k][~m.cuda()] == 0).all() for k, m in masks.items())


@pytest.mark.cuda
def test_cuda_calibration_already_on_the_gpu_and_exact_mode_matches_the_reference_loop():
    from starfish_fast.baseline import reference_recovery
    from starfish_fast.compat import RecoveryConfig

    dense, pruned, masks, calib = _setup()
    on_gpu = calib.cuda()                                   # not pinnable: must be used as it is
    fast = heal(copy.deepcopy(pruned), dense, masks, on_gpu, _config(device="cuda"))
    assert fast.images == 2 * calib.shape[0]
    # exact mode on CUDA: teacher computed in fp32 and stored in fp16, as the reference does
    exact_model = copy.deepcopy(pruned)
    exact = heal(exact_model, dense, masks, calib, _config(mode="exact", device="cuda", lr_schedule="cosine"))
    adapter = adapter_for(dense)
    config = RecoveryConfig(epochs=2, lr=2e-3, min_lr=1e-5, lr_schedule="cosine", weight_decay=0.0, grad_clip=0.0,
                            store_dense_float16=True)
    history, _ = reference_recovery(copy.deepcopy(pruned), copy.deepcopy(dense), "vit", adapter.block_names(dense),
                                    masks, list(calib.split(8)), adapter.scope_predicate("auto"), config,
                                    device="cuda")
    for ours, reference in zip(exact.history, history):
        assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-4)


@pytest.mark.cuda
def test_cuda_pinned_store_matches_direct():
    dense = tiny_vit().cuda()
    adapter = adapter_for(dense)
    batches = list(images(10).split(4))
    store = make_teacher_store("pinned", dense, adapter, adapter.block_names(dense), batches, torch.device("cuda"),
                               dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    for i, batch in enumerate(batches):
        store.prefetch(i + 1)
        with torch.autocast("cuda", dtype=torch.bfloat16):                # the store's compute precision
            direct = teacher_outputs(dense, adapter, adapter.block_names(dense), batch.cuda(), keep_logits=False)
        for a, b in zip(store.get(i), direct):
            torch.testing.assert_close(a.float(), b.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_prunable_weights_are_the_only_trainable():
    dense, pruned, masks, calib = _setup()
    heal(pruned, dense, masks, calib, _config(epochs=1))
    trainable = {k for k, p in pruned.named_parameters() if p.requires_grad}
    assert trainable == set(prunable_weights(pruned, adapter_for(pruned).scope_predicate("auto")))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_blocks_of_distinct_shapes_all_compile_and_are_removed_after(compiled_graphs, precision):
    # Compacted MLPs of 10 different widths: 10 cache entries of the one shared code object, past
    # dynamo's default limit of 8. A counting backend stands in for inductor (fast on CPU).
    dense = tiny_vit(depth=10)
    masks = random_masks(dense, "mlp", density=1.0)
    for i in range(10):                                    # block i loses its first 4 * (i + 1) hidden neurons
        masks[f"blocks.{i}.mlp.fc1.weight"][:4 * (i + 1)] = False
        masks[f"blocks.{i}.mlp.fc2.weight"][:, :4 * (i + 1)] = False
    student = copy.deepcopy(dense)
    config = HealConfig(epochs=1, batch_size=4, scope="mlp", compile="on", precision=precision, progress=False)
    compiled = heal(student, dense, masks, images(8), config)
    assert len(compiled_graphs) == 10                      # one graph per block shape: none fell back to
    # eager at the limit, and no graph break inside a block (our CPU attention module included)
    reference = heal(copy.deepcopy(dense), dense, masks, images(8), dataclasses.replace(config, compile="off"))
    assert compiled.step_losses == pytest.approx(reference.step_losses, rel=1e-5 if precision == "fp32" else 1e-2)
    assert all(block._compiled_call_impl is None for block in student.blocks)
    assert torch._dynamo.config.recompile_limit == 8


def test_adaptive_block_weights_are_positive_mean_one_and_follow_the_damage():
    from starfish_fast.objectives import adaptive_block_weights

    weights = adaptive_block_weights(torch.tensor([0.01, 0.03, 0.06]))
    assert torch.allclose(weights, torch.tensor([0.3, 0.9, 1.8])) and weights.mean() == pytest.approx(1.0)
    assert torch.equal(adaptive_block_weights(torch.zeros(4)), torch.ones(4))
    dense, pruned, masks, calib = _setup()
    result = heal(pruned, dense, masks, calib, _config(epochs=3, block_weights="adaptive"))
    initial = torch.tensor(result.ran["block_weights_initial"])
    assert torch.isfinite(initial).all() and (initial > 0).all() and initial.mean() == pytest.approx(1.0, rel=1e-5)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert all((pruned.state_dict()[k][~m] == 0).all() for k, m in masks.items())


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fixed_block_weights_take_the_same_path_as_uniform(kernels):
    """Weights given to the fused loss (interpreter here) give the torch path's losses; uniform weights
    equal no weights."""
    dense, pruned, masks, calib = _setup()
    runs = {}
    for weights in (None, (1.0, 1.0), (0.5, 3.0)):
        model = copy.deepcopy(pruned)
        runs[weights] = heal(model, dense, masks, calib[:16], _config(block_weights=weights, kernels=kernels,
                                                                       epochs=1))
    assert runs[(1.0, 1.0)].step_losses == pytest.approx(runs[None].step_losses, rel=1e-5)
    assert runs[(0.5, 3.0)].step_losses != pytest.approx(runs[None].step_losses, rel=1e-3)
    torch_run = heal(copy.deepcopy(pruned), dense, masks, calib[:16], _config(block_weights=(0.5, 3.0), epochs=1))
    assert runs[(0.5, 3.0)].step_losses == pytest.approx(torch_run.step_losses, rel=1e-4)
