"""Attention on the GPU: getfast's Triton flash-attention kernel vs ``F.scaled_dot_product_attention``.

Forward and forward+backward, bf16 and fp16, at GET-B/2's shape (B·H·N·d = 128·12·256·64),
N = 1024 (GET-B/2 at 64×64 with patch 2) and N = 4096 with d = 64 and 128; TFLOP/s by
:func:`getfast.bench.gpu_common.attention_flops`, and the ratio SDPA time / Triton time (> 1: the
kernel is faster). The SDPA column names the backend PyTorch picked (flash, efficient, cuDNN or
math), found by watching which ATen op ran. Each row also records which backend
``getfast.ops.attention`` dispatches to by default for that input, and the largest difference
between the kernel's and SDPA's output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from getfast.bench.gpu_common import (
    Budget,
    attempt,
    attention_flops,
    default_backend,
    dtype_name,
    fmt,
    fmt_ratio,
    forced_backend,
    kernel_ms,
    markdown_safe,
    rate,
)

NAME = "attention"
TITLE = "GPU attention — Triton flash attention vs SDPA"

# (B, H, N, d): GET-B/2 at 32×32 (patch 2: 256 tokens); N=1024: GET-B/2 at 64×64; long sequences.
SHAPES = ((128, 12, 256, 64), (32, 12, 1024, 64), (4, 16, 4096, 64), (4, 16, 4096, 128))
QUICK_FP16 = ((128, 12, 256, 64),)  # --quick: fp16 only at GET's shape (every shape in bf16)
MODES = ("fwd", "fwd+bwd")
WRONG_ABOVE = 5e-2  # largest |Triton − SDPA| output difference accepted before timing

_SDPA_OPS = (  # substring of the ATen op -> backend name
    ("_scaled_dot_product_flash_attention_for_cpu", "flash (CPU)"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_cudnn_attention", "cuDNN"),
    ("_scaled_dot_product_fused_attention_overrideable", "overrideable"),
)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Which SDPA implementation runs for these inputs: the fused ATen op seen at dispatch, or
    ``math`` (the unfused composition) when none of them ran."""
    with torch.no_grad(), _OpNames() as seen:
        F.scaled_dot_product_attention(q, k, v)
    for op in seen.names:
        for key, name in _SDPA_OPS:
            if key in op:
                return name
    return "math"


def _inputs(shape, dtype, device, requires_grad: bool, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def _triton_attention(q, k, v):
    from getfast.ops import attention

    with forced_backend("triton"):
        return attention(q, k, v)


def measure(shape, dtype, device, quick: bool) -> dict:
    """One row: both implementations, both modes, at ``shape`` and ``dtype``."""
    B, H, N, d = shape
    row = {"shape": list(shape), "dtype": dtype_name(dtype)}
    q, k, v = _inputs(shape, dtype, device, requires_grad=False)
    row["sdpa_backend"], err = attempt(lambda: sdpa_backend(q, k, v))
    row["sdpa_backend"] = row["sdpa_backend"] or err
    row["default_backend"] = default_backend("attention_fwd", q.device, q.dtype)
    with torch.no_grad():
        out_t, err = attempt(lambda: _triton_attention(q, k, v))
        if err is None:
            ref = F.scaled_dot_product_attention(q, k, v)
            row["max_abs_diff_vs_sdpa"] = diff = float((out_t.float() - ref.float()).abs().max())
            if not diff <= WRONG_ABOVE:  # outputs are averages of N(0, 1) values: O(1); half precision errs ~1e-3
                row["triton_error"] = f"wrong result: max abs difference {diff:.2g} from SDPA > {WRONG_ABOVE:g}"
        else:
            row["triton_error"] = err
    del out_t
    for mode in MODES:
        flops = attention_flops(B, H, N, d, mode)
        if mode == "fwd":
            def triton_fn():
                with torch.no_grad():
                    _triton_attention(q, k, v)

            def sdpa_fn():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v)
            grads = None
        else:
            qg, kg, vg = _inputs(shape, dtype, device, requires_grad=True)
            do = torch.randn(shape, device=device, dtype=dtype)
            grads = [qg, kg, vg]

            def triton_fn():
                _triton_attention(qg, kg, vg).backward(do)

            def sdpa_fn():
                F.scaled_dot_product_attention(qg, kg, vg).backward(do)
        for impl, fn in (("triton", triton_fn), ("sdpa", sdpa_fn)):
            if impl == "triton" and "triton_error" in row:
                row[f"{mode}_{impl}_ms"] = None
                continue
            ms, err = attempt(lambda fn=fn: kernel_ms(fn, device, quick, grad_to_none=grads))
            row[f"{mode}_{impl}_ms"] = ms
            row[f"{mode}_{impl}_tflops"] = None if ms is None else rate(flops, ms) / 1e12
            if err:
                row[f"{mode}_{impl}_error"] = err
        t, s = row.get(f"{mode}_triton_ms"), row.get(f"{mode}_sdpa_ms")
        row[f"{mode}_ratio"] = (s / t) if (t and s) else None
    return row


def plan(quick: bool) -> list[tuple[tuple[int, int, int, int], torch.dtype]]:
    """(shape, dtype) pairs to measure: every shape in bf16 and fp16; --quick: fp16 at GET's shape only."""
    cases = [(s, torch.bfloat16) for s in SHAPES]
    cases += [(s, torch.float16) for s in (QUICK_FP16 if quick else SHAPES)]
    return cases


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None, cases=None) -> dict:
    rows, skipped = [], []
    for shape, dtype in (cases if cases is not None else plan(quick)):
        need = 20.0  # autotuning three kernels for a new (N, d, dtype) takes ~10-20 s
        if not budget.allows(need):
            skipped.append({"shape": list(shape), "dtype": dtype_name(dtype), "why": budget.skip_note(need)})
            continue
        rows.append(measure(shape, dtype, device, quick))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"quick": quick, "rows": rows, "skipped": skipped,
            "flops_model": "fwd 4·B·H·N²·d; fwd+bwd 3.5× fwd (FlashAttention-2 convention)"}


def report(res: dict) -> str:
    head = ["B·H·N·d", "dtype", "SDPA backend", "default", "fwd Triton TFLOP/s", "fwd SDPA TFLOP/s", "fwd Triton/SDPA",
            "fwd+bwd Triton TFLOP/s", "fwd+bwd SDPA TFLOP/s", "fwd+bwd Triton/SDPA", "max abs diff vs SDPA"]
    lines = []
    for r in res["rows"]:
        cells = ["·".join(map(str, r["shape"])), r["dtype"], markdown_safe(r.get("sdpa_backend")),
                 markdown_safe(r.get("default_backend"))]
        for mode in MODES:
            for impl in ("triton", "sdpa"):
                err = r.get(f"{mode}_{impl}_error") or (r.get("triton_error") if impl == "triton" else None)
                tf = r.get(f"{mode}_{impl}_tflops")
                ms = r.get(f"{mode}_{impl}_ms")
                cells.append(markdown_safe(err) if err else (f"{tf:.0f} ({ms:.3f} ms)" if tf is not None else "–"))
            cells.append(fmt_ratio(r.get(f"{mode}_ratio")))
        cells.append(fmt(r.get("max_abs_diff_vs_sdpa"), ".2g"))
        lines.append(cells)
    from getfast.bench.common import markdown_table

    text = (f"FLOPs: {res['flops_model']}; Triton/SDPA = SDPA time ÷ Triton time (> 1: the kernel is faster). "
            f"`default` = the backend `getfast.ops.attention` dispatches to for that input.\n\n"
            + markdown_table(head, lines) + "\n")
    if res["skipped"]:
        text += "\nNot measured: " + "; ".join(f"{'·'.join(map(str, s['shape']))} {s['dtype']} ({s['why']})"
                                             for s in res["skipped"]) + "\n"
    return text
