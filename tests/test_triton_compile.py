"""The Triton kernels compile for sm_80 and sm_90 (Triton's own ptxas), checked without a GPU: the
other tests run them under the interpreter, which accepts code the compiler may reject."""
import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import getfast.kernels.anderson as An, getfast.kernels.attention as At, getfast.kernels.broyden as Br
import getfast.kernels.sim_loss as S

def compile_for(kernel, cap, ptrs, consts, i64=(), f32=()):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    names = kernel.arg_names
    sig = {n: "constexpr" if n in consts else "*" + ptrs[n] if n in ptrs else "i64" if n in i64
           else "fp32" if n in f32 else "i32" for n in names}
    triton.compile(ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}),
                   target=GPUTarget("cuda", cap, 32))

for dt, cap in (("bf16", 90), ("fp32", 80)):
    tiles = dict(HEAD_DIM_P=64, FP32=dt == "fp32", PREC="ieee" if dt == "fp32" else "tf32", BLOCK_M=128, BLOCK_N=64)
    compile_for(At._fwd_kernel, cap, {**{n: dt for n in "QKVO"}, "LSE": "fp32"}, tiles, f32=("qk_scale",))
    compile_for(At._bwd_kernel, cap, {**{n: dt for n in ("Q", "K", "V", "DO", "DK", "DV")}, "LSE": "fp32",
                                      "DELTA": "fp32", "DQ": "fp32"}, tiles, f32=("scale", "qk_scale"))
st = acc = "fp64"  # the float64 path whose scalars the interpreter cannot check
compile_for(An._solve_kernel, 90, dict(H=acc, LOWEST=acc, TRACE=acc, STATUS="i32", PART=acc, WORK=acc),
            dict(STOP_REL=False, MP=8, BB=1), i64=("lam_b", "tol_b", "rtol_b", "eps_b"))
compile_for(An._mix_kernel, 90, dict(X=st, G=st, FX=st, BEST=st, WORK=acc), dict(BLOCK=1024, MANUAL_BF16=False),
            i64=("tau_b",))
compile_for(Br._sscal_kernel, 90, dict(LOWEST=acc, TRACE=acc, STATUS="i32", PART=acc, COEF=acc),
            dict(FULL=True, STOP_REL=True, NP=8, BB=1), i64=("tol_b", "eps_b"))
compile_for(S._sim_loss_fwd_kernel, 90, dict(a_ptr=st, f_ptr=st, g_ptr=st, sigma_ptr=acc, loss_ptr=acc,
                                             stats_ptr=acc), dict(BLOCK=1024), i64=("c_bits",))
print("compiled")
'''


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_triton_kernels_compile_for_sm80_and_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
