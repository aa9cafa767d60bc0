"""The cached-plan 2:4 path: the missing extra's one line, refused shapes and dtypes, the extra's packaging (CPU);
against dense, against torch's compression, under CUDA graph replay and re-packing (-m cuda)."""
import ast
import ctypes
import gc
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from packaging.requirements import Requirement

from starfish_fast import cusparselt
from starfish_fast.sparse24 import backend_reason

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_extra(monkeypatch):
    """Import of nvmath fails, as where the extra is not installed (whether or not it is here)."""
    for name in ("nvmath", "nvmath.bindings", "nvmath.bindings.cusparseLt"):
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_extra_is_one_clear_line(no_extra):
    with pytest.raises(cusparselt.MissingExtraError) as caught:
        cusparselt.require()
    message = str(caught.value)
    assert "\n" not in message and "pip install 'starfish_fast[sparse24]'" in message and "nvmath" in message
    info = cusparselt.library_info()
    assert info["binding"] is None and "MissingExtraError" in info["error"]


def test_missing_extra_is_the_cached_backends_reason(no_extra, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "test GPU")
    reason = backend_reason("cached_cusparselt", torch.device("cuda"), torch.bfloat16)
    assert "starfish_fast[sparse24]" in reason


@pytest.mark.parametrize("shape,dtype,expected", [
    ((768, 3072), torch.bfloat16, ""),
    ((768, 3072), torch.float16, ""),
    ((768, 3072), torch.float32, "float16 or bfloat16"),
    ((40, 64), torch.bfloat16, "multiples of 16"),
    ((64, 36), torch.float16, "multiples of 16"),
])
def test_unsupported_names_shape_and_dtype(shape, dtype, expected):
    reason = cusparselt.unsupported(shape, dtype)
    assert (expected in reason) if expected else reason == ""


def test_layer_refuses_before_any_work():
    with pytest.raises(ValueError, match="multiples of 16"):
        cusparselt.CachedSparseLinear(torch.zeros(40, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        cusparselt.CachedSparseLinear(torch.zeros(64, 64))
    with pytest.raises(ValueError, match="needs CUDA"):
        cusparselt.CachedSparseLinear(torch.zeros(64, 64, dtype=torch.bfloat16))


def _extras() -> dict:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    extras = next(keyword.value for keyword in call.keywords if keyword.arg == "extras_require")
    return ast.literal_eval(extras)


def test_extra_brings_the_binding_and_the_library():
    requirements = {Requirement(spec).name: Requirement(spec) for spec in _extras()["sparse24"]}
    assert set(requirements) == {"nvmath-python", "nvidia-cusparselt-cu13"}
    # torch pins cuSPARSELt exactly (0.8.0 in 2.11): the extra's floor must accept that pin
    assert requirements["nvidia-cusparselt-cu13"].specifier.contains("0.8.0")
    pinned = dict(re.findall(r"([a-z-]+)==([0-9.]+)", (ROOT / "bench" / "fetch_gpu_wheels.sh").read_text()))
    assert requirements["nvmath-python"].specifier.contains(pinned["nvmath-python"])   # what the GPU check carries
    assert {"cuda-bindings", "cuda-core", "cuda-pathfinder"} <= set(pinned)


# ----------------------------------------------------------------------------- the plumbing, on a CPU
STREAM = 1234


def memory(pointer, shape, dtype):
    """The CPU tensor of ``shape`` at ``pointer`` (shares the memory)."""
    count = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * count).from_address(pointer), dtype=dtype).view(shape)


class FakeCusparseLt:
    """cuSPARSELt as its documentation describes it, on CPU memory: descriptors are records, "compression"
    copies the dense weight, ``matmul`` computes D = alpha op(A) op(B) + bias from what the descriptors say
    (rows, columns, leading dimension, order). Checks the module's plumbing (which pointer goes where, the
    attributes, the tuning loop, what is destroyed), not the library."""

    Sparsity = SimpleNamespace(SPARSITY_50_PERCENT=0)
    ComputeType = SimpleNamespace(COMPUTE_32F=2)
    MatmulAlg = SimpleNamespace(DEFAULT=0)
    MatmulAlgAttribute = SimpleNamespace(CONFIG_ID=0, CONFIG_MAX_ID=1, SPLIT_K=3, SPLIT_K_MODE=4)
    MatmulDescAttribute = SimpleNamespace(BIAS_POINTER=8)
    DTYPES = {2: torch.float16, 14: torch.bfloat16}

    def __init__(self, max_alg_id=3, refused_split_k=4, searched=(2, 1, -1)):
        self.max_alg_id, self.refused_split_k, self.searched = max_alg_id, refused_split_k, searched
        self.objects, self.destroyed, self.last_config = {}, [], None

    def _new(self, **record):
        key = 1000 + len(self.objects)
        self.objects[key] = record
        return key

    def _destroy(self, key):
        assert key in self.objects and key not in self.destroyed
        self.destroyed.append(key)

    mat_descriptor_destroy = matmul_descriptor_destroy = matmul_alg_selection_destroy = matmul_plan_destroy = _destroy

    def structured_descriptor_init(self, handle, rows, cols, ld, alignment, value_type, order, sparsity):
        assert alignment == 16 and order == cusparselt.ORDER_ROW and ld == cols
        return self._new(rows=rows, cols=cols, ld=ld, dtype=self.DTYPES[value_type], order=order)

    def dense_descriptor_init(self, handle, rows, cols, ld, alignment, value_type, order):
        return self._new(rows=rows, cols=cols, ld=ld, dtype=self.DTYPES[value_type], order=order)

    def matmul_descriptor_init(self, handle, op_a, op_b, a, b, c, d, compute_type):
        assert c == d and compute_type == 2
        return self._new(op_a=op_a, op_b=op_b, a=a, b=b, d=d, bias=0)

    def matmul_desc_set_attribute(self, handle, matmul, attribute, data, size):
        assert attribute == 8 and size == 8
        self.objects[matmul]["bias"] = ctypes.c_void_p.from_address(data).value

    def matmul_alg_selection_init(self, handle, matmul, alg):
        return self._new(matmul=matmul, config=[0, 1, -1])

    def matmul_alg_set_attribute(self, handle, alg, attribute, data, size):
        assert size == 4
        self.objects[alg]["config"][{0: 0, 3: 1, 4: 2}[attribute]] = ctypes.c_int32.from_address(data).value

    def matmul_alg_get_attribute(self, handle, alg, attribute, data, size):
        config = self.objects[alg]["config"]
        value = {0: config[0], 1: self.max_alg_id, 3: config[1], 4: config[2]}[attribute]
        ctypes.c_int32.from_address(data).value = value

    def matmul_plan_init(self, handle, matmul, alg):
        if self.objects[alg]["config"][1] == self.refused_split_k:
            raise RuntimeError("CUSPARSE_STATUS_NOT_SUPPORTED: split-k refused\nsecond line")
        return self._new(matmul=matmul, alg=alg)

    def matmul_get_workspace(self, handle, plan):
        return 256

    def sp_mma_compressed_size2(self, handle, descriptor):
        record = self.objects[descriptor]
        return record["rows"] * record["cols"] * 2, 64

    def sp_mma_compress2(self, handle, descriptor, is_sparse_a, op, dense, compressed, buffer, stream):
        assert is_sparse_a == 1 and op == cusparselt.NON_TRANSPOSE and stream == STREAM and buffer
        ctypes.memmove(compressed, dense, self.sp_mma_compressed_size2(handle, descriptor)[0])

    def matmul(self, handle, plan, alpha, a, b, beta, c, d, workspace, streams, count):
        assert count == 1 and ctypes.c_void_p.from_address(streams).value == STREAM and workspace and c == d
        assert (ctypes.c_float.from_address(alpha).value, ctypes.c_float.from_address(beta).value) == (1.0, 0.0)
        matmul = self.objects[self.objects[plan]["matmul"]]
        self.last_config = tuple(self.objects[self.objects[plan]["alg"]]["config"])
        A, B, D = (self.objects[matmul[key]] for key in ("a", "b", "d"))
        weight = memory(a, (A["rows"], A["cols"]), A["dtype"]).float()                    # (m, k)
        rows_b = B["rows"] if B["order"] == cusparselt.ORDER_ROW else B["cols"]
        dense = memory(b, (rows_b, B["ld"]), B["dtype"])[:, :B["cols"]].float()
        dense = dense.t() if matmul["op_b"] == cusparselt.TRANSPOSE else dense             # (k, n)
        result = weight @ dense                                                            # (m, n)
        if matmul["bias"]:
            result += memory(matmul["bias"], (A["rows"], 1), D["dtype"]).float()
        assert D["order"] == cusparselt.ORDER_COL                                          # columns are contiguous
        memory(d, (D["cols"], D["ld"]), D["dtype"])[:, :D["rows"]].copy_(result.t())

    def matmul_search(self, handle, plan, *args):
        self.objects[self.objects[plan]["alg"]]["config"][:] = list(self.searched)
        self.matmul(handle, plan, *args)


@pytest.fixture
def fake(monkeypatch):
    library = FakeCusparseLt()
    monkeypatch.setattr(cusparselt, "require", lambda: library)
    monkeypatch.setattr(cusparselt, "_handle", lambda device: 1)
    monkeypatch.setattr(cusparselt, "_current_stream", lambda device: STREAM)
    monkeypatch.setattr(cusparselt, "_capturing", lambda: False)
    monkeypatch.setattr(cusparselt, "_device_reason", lambda tensor: "")
    monkeypatch.setattr(cusparselt, "TUNED", {})
    return library


def timer_from(library, table):
    def timer(fn):
        fn()
        return table[library.last_config]
    return timer


TIMES = {(0, 1, -1): 1.0, (1, 1, -1): 0.7, (2, 1, -1): 0.9, (3, 1, -1): 1.2, (1, 2, -1): 0.6}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plumbing_layout_padding_bias_and_repack(fake, dtype):
    torch.manual_seed(0)
    weight, bias = (torch.randn(48, 64) * (torch.arange(64) % 4 < 2)).to(dtype), torch.randn(48).to(dtype)
    layer = cusparselt.CachedSparseLinear(weight, bias, timer=timer_from(fake, TIMES))
    x = torch.randn(13, 64, dtype=dtype)                                  # 13 tokens: padded to 16
    y = layer(x)
    assert y.shape == (13, 48) and y.is_contiguous() and list(layer.plans) == [16]
    tolerance = 2e-2 if dtype == torch.bfloat16 else 2e-3
    expected = F.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(y.float(), expected, rtol=tolerance, atol=tolerance)
    packed_at, new_weight = layer.packed.data_ptr(), weight.flip(0)
    layer.repack(new_weight, bias * 2)
    y = layer(x[:8])                                                      # 8 tokens: a second plan
    assert layer.packed.data_ptr() == packed_at and sorted(layer.plans) == [8, 16]
    torch.testing.assert_close(y.float(), F.linear(x[:8].float(), new_weight.float(), 2 * bias.float()),
                               rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match=r"input \(8, 32\).*takes \(tokens, 64\)"):
        layer(torch.zeros(8, 32, dtype=dtype))


def test_tuning_times_every_config_and_keeps_the_fastest(fake):
    weight = (torch.randn(32, 32) * (torch.arange(32) % 4 < 2)).to(torch.bfloat16)
    layer = cusparselt.CachedSparseLinear(weight, timer=timer_from(fake, TIMES))
    layer(torch.randn(16, 32, dtype=torch.bfloat16))
    (tuned,) = cusparselt.TUNED.values()
    assert tuned["config"] == [1, 2, -1] and tuned["ms"] == 0.6                # alg 1, then split-k 2 on it
    assert set(tuned["tried"]) == {str(config) for config in TIMES}          # ids 0-3, the search's pick, split-k 2
    assert "split-k refused" in tuned["errors"]["(1, 4, -1)"] and "\n" not in tuned["errors"]["(1, 4, -1)"]
    assert layer.plans[16].config == (1, 2, -1)
    del layer
    gc.collect()
    assert sorted(fake.destroyed) == sorted(fake.objects)                    # every descriptor and plan freed


def test_a_new_token_count_inside_a_capture_is_refused(fake, monkeypatch):
    weight = (torch.randn(16, 16) * (torch.arange(16) % 4 < 2)).to(torch.bfloat16)
    layer = cusparselt.CachedSparseLinear(weight, timer=timer_from(fake, TIMES))
    monkeypatch.setattr(cusparselt, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="run each token count once before capturing"):
        layer(torch.randn(8, 16, dtype=torch.bfloat16))


def test_healing_layer_repacks_in_place_every_step(fake, monkeypatch):
    from torch import nn

    from starfish_fast import sparse24

    monkeypatch.setattr(sparse24, "choose_backend", lambda weight, mask, dtype=None, name=None: (name, ""))
    from starfish_fast import timing

    monkeypatch.setattr(timing, "cuda_median_ms", lambda fn, iters, warmup: (fn(), 1.0)[1])   # the default timer
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    mask = (torch.arange(64) % 4 < 2).expand(32, 64)
    layer = sparse24.SemiStructuredLinear.from_linear(linear, mask, "cached_cusparselt")
    x = torch.randn(3, 7, 64, requires_grad=True)
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)                                                   # (3, 7, 32), packed from this step's W
        weight, bias = (linear.weight * mask).detach().bfloat16(), linear.bias.detach().bfloat16()
        expected = F.linear(x.detach().bfloat16(), weight, bias)
        torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
        y.float().sum().backward()
        assert (linear.weight.grad[~mask] == 0).all()
        with torch.no_grad():
            linear.weight.sub_(linear.weight.grad)                          # the weights move between steps
        linear.weight.grad = None
    (pack,) = layer._packs.values()
    assert isinstance(pack, cusparselt.CachedSparseLinear) and list(pack.plans) == [24]   # 21 tokens padded to 24


# ----------------------------------------------------------------------------- GPU
def cached_or_skip():
    reason = backend_reason("cached_cusparselt", torch.device("cuda"), torch.bfloat16)
    if reason:
        pytest.skip(f"the cached-plan 2:4 path cannot run here: {reason}")


def random_two_four(out_f, in_f, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(out_f, in_f // 4, 4, device="cuda", generator=generator)                 # (out, in/4, 4)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
    weight = torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=generator)
    return weight * keep.view(out_f, in_f)                                                      # (out, in), 2:4


def assert_close_to_linear(y, x, weight, bias, dtype):
    expected = F.linear(x, weight, bias)
    tolerance = (1.6e-2 if dtype == torch.bfloat16 else 2e-3) * float(expected.abs().max())
    torch.testing.assert_close(y, expected, rtol=0, atol=tolerance)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [128, 397, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_cached_matches_dense(dtype, tokens, bias):
    cached_or_skip()
    weight = random_two_four(192, 256, dtype)
    b = torch.randn(192, device="cuda", dtype=dtype) if bias else None
    layer = cusparselt.CachedSparseLinear(weight, b)
    x = torch.randn(tokens, 256, device="cuda", dtype=dtype)
    y = layer(x)
    assert y.shape == (tokens, 192) and y.is_contiguous()
    assert_close_to_linear(y, x, weight, b, dtype)
    x_view = torch.randn(tokens, 512, device="cuda", dtype=dtype)[:, 1:257]                    # strided, misaligned
    assert_close_to_linear(layer(x_view), x_view, weight, b, dtype)


@pytest.mark.cuda
def test_cuda_compression_is_torchs():
    cached_or_skip()
    weight = random_two_four(768, 3072, torch.bfloat16)
    ours, theirs = cusparselt.CachedSparseLinear(weight).packed, torch._cslt_compress(weight).view(torch.uint8)
    size = min(ours.numel(), theirs.numel())
    assert torch.equal(ours[:size], theirs.flatten()[:size])


@pytest.mark.cuda
def test_cuda_repack_uses_the_new_weights():
    cached_or_skip()
    weight, bias = random_two_four(256, 256, torch.float16), torch.randn(256, device="cuda", dtype=torch.float16)
    layer = cusparselt.CachedSparseLinear(weight, bias)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    layer(x)
    packed_at = layer.packed.data_ptr()
    weight, bias = random_two_four(256, 256, torch.float16, seed=1), bias * 2
    layer.repack(weight, bias)
    assert layer.packed.data_ptr() == packed_at                                                # same buffer
    assert_close_to_linear(layer(x), x, weight, bias, torch.float16)


@pytest.mark.cuda
def test_cuda_graph_replay():
    cached_or_skip()
    weight, bias = random_two_four(768, 3072, torch.bfloat16), torch.randn(768, device="cuda", dtype=torch.bfloat16)
    layer = cusparselt.CachedSparseLinear(weight, bias)
    x = torch.randn(1000, 3072, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layer(x)                                            # the plan (and its timing) before the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    for seed in (1, 2):
        x.copy_(torch.randn_like(x))
        weight = random_two_four(768, 3072, torch.bfloat16, seed=seed)
        layer.repack(weight, bias)
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_linear(y, x, weight, bias, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_unplanned_token_count_refused_inside_capture():
    cached_or_skip()
    layer = cusparselt.CachedSparseLinear(random_two_four(64, 64, torch.bfloat16))
    x = torch.randn(24, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="before capturing"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            layer(x)
