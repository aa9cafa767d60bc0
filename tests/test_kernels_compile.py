"""Every kernel compiles ahead of time for A100 (sm80), A10 (sm86) and H100 (sm90, where tl.dot
lowers to wgmma) with the configurations the wrappers launch, and fits that GPU's shared memory;
the cosine-loss and masked-Adam kernels with ``ALIGNED`` load their operands with 16-byte vector
instructions (checked in the PTX).

No GPU needed: triton's bundled ptxas compiles for a named target in a subprocess without
TRITON_INTERPRET (the interpreter cannot compile).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Shared memory per block (opt-in maximum), bytes: A100 163 KB, A10 99 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}

# Every config the masked linear's pruner keeps (it keeps to the A10's 99 KB on any GPU).
_MASKED_LINEAR = r'''
import importlib, json, sys, torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
ml = importlib.import_module("starfish_fast.kernels.masked_linear")
out = []
for dt, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
    tiles, prec = ml._tiles_for(dt), ml._precision(dt)
    w, m = torch.empty(1, dtype=dt), torch.empty(1, dtype=torch.uint8)
    jobs = [(ml._masked_linear_fwd_kernel, ml._prune_fwd, dict(BLOCK_N=tiles.fwd_n, BLOCK_K=tiles.fwd_k, HAS_BIAS=True)),
            (ml._masked_linear_dx_kernel, ml._prune_dx, dict(BLOCK_N=tiles.dx_n, BLOCK_K=tiles.dx_k)),
            (ml._masked_linear_dw_kernel, ml._prune_dw, dict(OCC=32))]
    for kern, prune, fixed in jobs:
        jit = kern.fn
        kept = prune(kern.configs, {"w_ptr": w, "m_ptr": m, "x_ptr": w}, **fixed)
        for c in kept:
            consts = {"PREC": prec, **fixed, **c.kwargs}
            sig = {n: "constexpr" if n in consts else ("*u8" if n in ("m_ptr", "occ_ptr") else "*i32" if n in
                   ("count_ptr", "index_ptr") else f"*{name}" if n.endswith("_ptr") else "i32") for n in jit.arg_names}
            k = triton.compile(ASTSource(fn=jit, signature=sig, constexprs=consts), target=GPUTarget("cuda", int(sys.argv[1]), 32),
                               options={"num_warps": c.num_warps, "num_stages": c.num_stages})
            out.append([jit.__name__, name, str(c), k.metadata.shared])
print(json.dumps(out))
'''

_LOSS_AND_OPTIMIZER = r'''
import importlib, json, re, sys, torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
cos = importlib.import_module("starfish_fast.kernels.cosine_loss")
adam = importlib.import_module("starfish_fast.kernels.masked_adam")
arch = int(sys.argv[1])

def compile_one(kernel, types, consts, num_warps):
    fn = kernel if hasattr(kernel, "arg_names") else kernel.fn         # an autotuner wraps the JIT function
    signature = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps})
    vector_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]\.", k.asm["ptx"]))
    return [fn.__name__, json.dumps(consts, sort_keys=True), k.metadata.shared, vector_loads]

out = []
scalars_i32 = ("n_split", "rows_total", "part_rows", "coef_rows")
for student, teacher in (("bf16", "bf16"), ("fp32", "bf16"), ("fp16", "fp16")):
    for block_d in (128, 256, 512, 1024):                         # what cosine_loss._chunk can pick
        block_r = 4096 // block_d
        warps = 8 if block_r * block_d >= 4096 else 4
        types = {"tab_ptr": "*i64", "tblk_ptr": "*i32", "gtab_ptr": "*i64", "s_any": "*" + student, "t_any": "*" + teacher,
                 "part_ptr": "*fp32", "coef_ptr": "*fp32", "loss_ptr": "*fp32", "gout_ptr": "*fp32",
                 "raw_ptr": "*fp32", "w_ptr": "*fp32", "eps": "fp32", **{n: "i32" for n in scalars_i32}}
        for aligned in (False, True):
            common = {"TAB": cos._TAB, "BLOCK_R": block_r, "BLOCK_D": block_d, "ALIGNED": aligned}
            out.append(compile_one(cos._cos_stats_kernel, types, common, warps))
            out.append(compile_one(cos._cos_grad_kernel, types,
                                   {**common, "CLAMP": 65504.0 if student == "fp16" else 0.0}, warps))
    out.append(compile_one(cos._cos_finalize_kernel, types, {"TAB": cos._TAB, "BLOCK_R": 32}, 4))
for param, moment, has_mask, lr_ptr in (("fp32", "fp32", True, True), ("fp32", "bf16", True, False),
                                        ("bf16", "fp32", False, True)):
    types = {"tab_ptr": "*i64", "ctab_ptr": "*i32", "p_any": "*" + param, "g_any": "*" + param, "m_any": "*" + moment,
             "v_any": "*" + moment, "k_any": "*u8", "lr_ptr": "*fp32",
             **{n: "fp32" for n in ("lr", "step_size", "decay", "bc1", "bc2_sqrt", "w1", "beta1", "beta2", "w2",
                                   "eps", "weight_decay")}}
    for aligned in (False, True):
        consts = {"HAS_MASK": has_mask, "LR_FROM_PTR": lr_ptr, "DECOUPLED": True, "HAS_WD": True,
                  "TAB": adam._TAB, "BLOCK": adam.BLOCK, "ALIGNED": aligned}
        out.append(compile_one(adam._masked_adam_kernel, types, consts, 8))
print(json.dumps(out))
'''


# The GPU machines run triton 3.6 (setup.sh installs it beside the main triton): each kernel is also
# compiled with it for sm80 and sm90, so an API difference shows up here rather than on the device.
TRITON_36 = Path(__file__).resolve().parents[1] / ".venv" / "triton-3.6.0"
INSTALLS = [("installed", arch) for arch in sorted(SHARED_LIMIT)] + [("3.6.0", 80), ("3.6.0", 90)]


def _compile(script: str, arch: int, install: str = "installed") -> list:
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if install != "installed":
        if not (TRITON_36 / "triton").is_dir():
            pytest.skip(f"triton {install} is not installed at {TRITON_36} (setup.sh installs it)")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRITON_36), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)\n" + script, str(arch)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    if install != "installed":
        assert lines[0] == install, f"expected triton {install}, ran {lines[0]}"
    return json.loads(lines[-1])


@pytest.mark.slow
@pytest.mark.parametrize("install,arch", INSTALLS)
def test_masked_linear_configs_compile_within_shared_memory(install, arch):
    compiled = _compile(_MASKED_LINEAR, arch, install)
    assert {c[0] for c in compiled} == {"_masked_linear_fwd_kernel", "_masked_linear_dx_kernel",
                                        "_masked_linear_dw_kernel"}
    too_big = [c for c in compiled if c[3] > SHARED_LIMIT[arch]]
    assert not too_big, too_big


@pytest.mark.slow
@pytest.mark.parametrize("install,arch", INSTALLS)
def test_loss_and_optimizer_kernels_compile_for_each_gpu(install, arch):
    compiled = _compile(_LOSS_AND_OPTIMIZER, arch, install)
    assert {name for name, *_ in compiled} == {"_cos_stats_kernel", "_cos_grad_kernel", "_cos_finalize_kernel",
                                                 "_masked_adam_kernel"}
    too_big = [c for c in compiled if c[2] > SHARED_LIMIT[arch]]
    assert not too_big, too_big
    # the ALIGNED hints turn the table-addressed loads into 16-byte vector loads (all scalar without)
    aligned = [c for c in compiled if json.loads(c[1]).get("ALIGNED") and c[0] != "_cos_finalize_kernel"]
    assert aligned and all(c[3] > 0 for c in aligned), [c for c in aligned if c[3] == 0]
