"""The 2:4 part of the GPU check (at most ``SECONDS``): every 2:4 backend checked and timed on the GPU at hand.

    from gpu_check_sparse24 import part_sparse24
    part_sparse24(Recorder(out, "sparse24"), out, rehearse)     # one JSON line per check in out/gpu_check.jsonl
    python bench/gpu_check_sparse24.py --out OUT [--rehearse]   # the same, by hand

1. ``sparse24:wheels`` installs the carried wheels (``.whl/*.whl``, made by ``bench/fetch_gpu_wheels.sh``:
   nvmath-python and what it needs; the GPU machine reaches no registry) into ``SITE`` with
   ``pip install --no-index --no-deps --target``. The checks then run in a child process with ``SITE`` first
   on ``PYTHONPATH`` (so the carried ``cuda.*`` packages are the ones imported, and a crash inside a library
   call is recorded as the child's exit, not lost); later parts may reuse ``SITE`` the same way.
2. ``sparse24:library``: the binding, the libcusparseLt it loaded (runtime version, path), each backend's
   availability on this GPU.
3. ``sparse24:correct:<backend>:<dtype>:<tokens>``: each backend against ``F.linear`` on random 2:4 weights
   (bf16 and fp16, an odd token count); ``sparse24:compress_matches_torch``: the cached path's compressed
   weight against ``torch._cslt_compress``; ``sparse24:graph_replay``: the cached path captured in a CUDA
   graph, replayed on new inputs and after a re-pack.
4. ``sparse24:linear:<layer>``: DeiT-B's four linears at 25,216 tokens (batch 128) in bf16, per backend: kernel
   ms, host ms per call, speedup; dense timed twice (the spread of two medians, for ``rules.MARGIN``) and
   the alg id / split-k the cached path's timing picked. ``sparse24:heal:<layer>``: the healing step per backend.
5. ``sparse24:model:deit_base_patch16_224``: the whole 2:4 DeiT-B inference at batch 128 in bf16, each backend
   forced and ``auto``, against dense, logits compared; ``sparse24:decision:heal``: ``auto``'s healing choice.
A rehearsal (``--rehearse``, on a CPU) runs the same code: what needs CUDA is recorded as skipped.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
SITE = Path("/tmp/site")
SECONDS = 60
DEIT_B = "deit_base_patch16_224"


def part_sparse24(rec, out: Path, rehearse: bool, seconds: float = SECONDS) -> None:
    """Install the carried wheels, then run the checks in a child process within ``seconds`` in all."""
    started = time.monotonic()
    install_wheels(rec, rehearse)
    left = seconds - (time.monotonic() - started)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(SITE), str(ROOT), str(ROOT / "bench"),
                                                                    os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--seconds", str(int(left) - 3)]
    try:
        done = subprocess.run(command + (["--rehearse"] if rehearse else []), env=env, capture_output=True,
                              text=True, timeout=max(left, 5))
        rec.record("sparse24:child", done.returncode == 0, rc=done.returncode,
                   tail=None if done.returncode == 0 else (done.stdout + done.stderr)[-3000:])
    except subprocess.TimeoutExpired as error:
        rec.record("sparse24:child", False, error=f"killed after {error.timeout:.0f} s (the part's budget)",
                   tail=((error.stdout or b"") + (error.stderr or b""))[-3000:].decode(errors="replace"))


def install_wheels(rec, rehearse: bool) -> None:
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        rec.skip("sparse24:wheels", "no .whl/ here: run bench/fetch_gpu_wheels.sh and carry .whl (the cached-plan "
                                    "path is then measured as missing its extra)")
        return
    if sys.version_info[:2] != (3, 12) or any("cp312" not in w.name and "py3-none" not in w.name for w in wheels):
        rec.skip("sparse24:wheels", f"the carried wheels are for CPython 3.12 x86-64; this is Python "
                                    f"{sys.version.split()[0]}")
        return
    with rec.check("sparse24:wheels", wheels={w.name: round(w.stat().st_size / 2**20, 2) for w in wheels}) as numbers:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)],
                       check=True, capture_output=True, text=True)
        numbers.update(site=str(SITE), seconds_install=round(time.perf_counter() - start, 2))


# ----------------------------------------------------------------------------- the child
class Budget:
    def __init__(self, rec, seconds: float):
        self.rec, self.deadline = rec, time.monotonic() + seconds

    def spent(self, name: str) -> bool:
        """True (and ``name`` recorded as skipped) when the part's time is up."""
        if time.monotonic() < self.deadline:
            return False
        self.rec.skip(name, "the 2:4 part's time budget was spent")
        return True


def checks(rec, rehearse: bool, seconds: float) -> None:
    budget = Budget(rec, seconds)
    on_gpu = torch.cuda.is_available()
    with rec.check("sparse24:library") as numbers:
        numbers.update(library_record(on_gpu))
    if not on_gpu:
        decision_on_cpu(rec)
        for name in ("correct", "compress_matches_torch", "graph_replay", "linear", "heal", "model"):
            rec.skip(f"sparse24:{name}", "needs a CUDA GPU" + (" (rehearsal on a CPU)" if rehearse else ""))
        return
    correctness(rec, budget)
    timings(rec, budget)


def library_record(on_gpu: bool) -> dict:
    from starfish_fast import cusparselt
    from starfish_fast.checkpoint import error_line
    from starfish_fast.sparse24_backends import BACKENDS, backend_reason

    record = {"library": cusparselt.library_info(), "torch": torch.__version__, "python": sys.version.split()[0]}
    for module in ("nvmath", "cuda.bindings", "cuda.core", "cuda.pathfinder"):
        try:
            imported = __import__(module, fromlist=["__version__"])
            record[module] = {"version": getattr(imported, "__version__", None), "file": imported.__file__}
        except Exception as error:  # recorded: which piece is missing is the finding
            record[module] = error_line(error)
    if on_gpu:
        record["gpu"] = torch.cuda.get_device_name()
        record["backends"] = {name: backend_reason(name, torch.device("cuda"), torch.bfloat16) or "available"
                              for name in BACKENDS}
    return record


def decision_on_cpu(rec) -> None:
    """The choice logic end to end on a tiny ViT on this CPU: ``auto`` keeps dense and says why."""
    from timm.models.vision_transformer import VisionTransformer

    from starfish_fast.prune import nm_masks
    from starfish_fast.probe_sparse24 import choose_semi_structured

    with rec.check("sparse24:decision:cpu") as numbers:
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=10)
        decision = choose_semi_structured(model, nm_masks(model, scope="qkv_out_mlp"), "cpu", torch.bfloat16,
                                          "auto", tokens=34)
        numbers.update(decision.record())
        if decision.semi_structured or "CUDA" not in decision.reason:
            raise AssertionError(f"expected dense with the CUDA reason, got {decision.reason}")


def _random_two_four(out_f: int, in_f: int, dtype: torch.dtype) -> torch.Tensor:
    scores = torch.rand(out_f, in_f // 4, 4, device="cuda")                          # (out, in/4, 4)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, dim=-1).indices, True)
    return torch.randn(out_f, in_f, device="cuda", dtype=dtype) * keep.view(out_f, in_f)   # (out, in), 2:4


# two roundings of the same fp32 sum to bf16 (fp16) differ by up to one unit in the last place, 2^-7 (2^-10) of a
# value: as a fraction of the largest output, with room for fp32 sums in different orders
TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def relative_error(y: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference as a fraction of the largest expected magnitude."""
    return float((y.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))


def correctness(rec, budget: Budget) -> None:
    import torch.nn.functional as F

    from starfish_fast import cusparselt
    from starfish_fast.sparse24_backends import BACKENDS, backend_reason, pack

    for name in BACKENDS:
        for dtype in (torch.bfloat16, torch.float16):
            why = backend_reason(name, torch.device("cuda"), dtype)
            for tokens in (128, 397):
                check = f"sparse24:correct:{name}:{str(dtype)[6:]}:{tokens}"
                if why:
                    rec.skip(check, why)
                    continue
                if budget.spent(check):
                    return
                with rec.check(check) as numbers:
                    torch.manual_seed(tokens)
                    weight, bias = _random_two_four(192, 256, dtype), torch.randn(192, device="cuda", dtype=dtype)
                    x = torch.randn(tokens, 256, device="cuda", dtype=dtype)                 # (tokens, in)
                    y, expected = pack(name, weight, bias)(x), F.linear(x, weight, bias)     # (tokens, out)
                    error = relative_error(y, expected)
                    numbers.update(max_error_relative_to_max=error, shape=list(y.shape))
                    if y.shape != expected.shape or not error <= TOLERANCE[dtype]:
                        raise AssertionError(f"{name} differs from F.linear by {error} of its largest output")
    if backend_reason("cached_cusparselt", torch.device("cuda"), torch.bfloat16):
        rec.skip("sparse24:compress_matches_torch", "the cached-plan path is not available here")
        rec.skip("sparse24:graph_replay", "the cached-plan path is not available here")
        return
    with rec.check("sparse24:compress_matches_torch") as numbers:
        weight = _random_two_four(768, 3072, torch.bfloat16)
        ours, theirs = cusparselt.CachedSparseLinear(weight).packed, torch._cslt_compress(weight).view(torch.uint8)
        size = min(ours.numel(), theirs.numel())
        numbers.update(bytes_ours=ours.numel(), bytes_torch=theirs.numel(),
                       equal=bool(torch.equal(ours[:size], theirs.flatten()[:size])))
        if not numbers["equal"]:
            raise AssertionError("the compressed weight differs from torch._cslt_compress's")
    with rec.check("sparse24:graph_replay") as numbers:
        numbers.update(graph_replay())


def graph_replay() -> dict:
    """Capture the cached path, replay it on new inputs, re-pack outside the graph and replay again."""
    import torch.nn.functional as F

    from starfish_fast.cusparselt import CachedSparseLinear

    weight, bias = _random_two_four(768, 3072, torch.bfloat16), torch.randn(768, device="cuda", dtype=torch.bfloat16)
    layer = CachedSparseLinear(weight, bias)
    x = torch.randn(1000, 3072, device="cuda", dtype=torch.bfloat16)                  # (tokens, in)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(x)                                                                     # plan made before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)                                                                 # (tokens, out)
    errors = []
    for repack in (False, True):
        x.copy_(torch.randn_like(x))
        if repack:
            weight = _random_two_four(768, 3072, torch.bfloat16)
            layer.repack(weight, bias)
        graph.replay()
        torch.cuda.synchronize()
        errors.append(relative_error(y, F.linear(x, weight, bias)))
    if max(errors) > TOLERANCE[torch.bfloat16]:
        raise AssertionError(f"graph replay differs from F.linear by {errors} of the largest output")
    return {"error_new_input": errors[0], "error_after_repack": errors[1]}


def timings(rec, budget: Budget) -> None:
    import bench_sparse24

    from starfish_fast import cusparselt
    from starfish_fast.probe_sparse24 import layer_step
    from starfish_fast.timing import cuda_median_ms

    spec = bench_sparse24.MODELS[DEIT_B]
    tokens = 128 * spec["tokens"]
    shapes = bench_sparse24.linear_shapes(spec)
    for layer, shape in shapes.items():
        if budget.spent(f"sparse24:linear:{layer}"):
            return
        with rec.check(f"sparse24:linear:{layer}", tokens=tokens, shape=list(shape), dtype="bfloat16") as numbers:
            numbers.update(bench_sparse24.time_inference(*shape, tokens, iters=20))
            numbers["dense_again_ms"] = cuda_median_ms(layer_step("dense", shape, tokens=tokens, dtype=torch.bfloat16,
                                                                  device="cuda", purpose="inference"), 20)
            numbers["cached_configs"] = [{"tokens": k[3], **v} for k, v in cusparselt.TUNED.items()
                                         if tuple(k[1:3]) == shape]
    for layer, shape in shapes.items():
        if budget.spent(f"sparse24:heal:{layer}"):
            return
        with rec.check(f"sparse24:heal:{layer}", tokens=tokens, shape=list(shape), dtype="bfloat16") as numbers:
            numbers.update(bench_sparse24.time_heal(*shape, tokens, iters=10, dtype=torch.bfloat16))
    if budget.spent(f"sparse24:model:{DEIT_B}"):
        return
    with rec.check(f"sparse24:model:{DEIT_B}") as numbers:
        numbers.update(bench_sparse24.time_model(DEIT_B, 128, iters=10))
        scale = numbers["max_abs_logit_dense"]
        for label, entry in numbers.items():
            if isinstance(entry, dict) and entry.get("max_abs_logit_difference", 0) > 5e-2 * scale:
                raise AssertionError(f"{label}: logits differ from dense by {entry['max_abs_logit_difference']} "
                                     f"(largest dense logit {scale})")
    if not budget.spent("sparse24:decision:heal"):
        with rec.check("sparse24:decision:heal") as numbers:
            numbers.update(heal_decision(tokens))


def heal_decision(tokens: int) -> dict:
    import timm

    from starfish_fast.calibration import capture_inputs
    from starfish_fast.prune import nm_masks
    from starfish_fast.probe_sparse24 import block_step_timer, choose_semi_structured

    with torch.device("cuda"):
        model = timm.create_model(DEIT_B, pretrained=False)
    masks = nm_masks(model, scope="qkv_out_mlp")
    images = torch.randn(max(1, tokens // 197), 3, 224, 224, device="cuda")          # DeiT-B: 197 tokens an image
    with torch.no_grad():
        inputs = capture_inputs(model.blocks[0], lambda: model(images))
    step = block_step_timer(model, "blocks.0", inputs, masks, "cuda", torch.bfloat16)  # as the plan times it
    decision = choose_semi_structured(model, masks, "cuda", torch.bfloat16, "auto", tokens=tokens, purpose="heal",
                                      measure_step=step)
    return decision.record()


def main(argv: list[str] | None = None) -> int:
    from gpu_check_log import Recorder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rehearse", action="store_true", help="on a CPU: what needs CUDA is recorded as skipped")
    parser.add_argument("--seconds", type=float, default=None, help="run the checks alone, within this budget")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out, "sparse24")
    if args.seconds is None:
        part_sparse24(rec, out, args.rehearse)
    else:
        checks(rec, args.rehearse, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
