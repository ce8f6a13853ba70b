"""getfast's Triton flash attention vs ``F.scaled_dot_product_attention`` (naming the SDPA backend that ran),
fwd and fwd+bwd, bf16 and fp16, at GET-B/2's shape, N = 1024 and N = 4096 (d = 64, 128): TFLOP/s and SDPA time /
Triton time, outputs checked first. A quick run autotunes 2 tile configurations, not 24 (GETFAST_QUICK_AUTOTUNE).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from getfast.bench.common import (Budget, OpCounter, attempt, attention_flops, default_backend, dtype_name, fmt, fmt_ratio,
                                  forced_backend, kernel_ms, markdown_safe, markdown_table, rate, section)

TITLES = {"cuda": "GPU attention — Triton flash attention vs SDPA"}
SHAPES = ((128, 12, 256, 64), (32, 12, 1024, 64), (4, 16, 4096, 64), (4, 16, 4096, 128))
QUICK_FP16 = ((128, 12, 256, 64),)  # --quick: fp16 only at GET's shape (every shape in bf16)
MODES = ("fwd", "fwd+bwd")
WRONG_ABOVE = 5e-2  # largest |Triton − SDPA| accepted: outputs are O(1) averages, half precision errs ~1e-3
_SDPA_OPS = (("_scaled_dot_product_flash_attention_for_cpu", "flash (CPU)"), ("_scaled_dot_product_flash_attention", "flash"),
             ("_scaled_dot_product_efficient_attention", "efficient"), ("_scaled_dot_product_cudnn_attention", "cuDNN"),
             ("_scaled_dot_product_fused_attention_overrideable", "overrideable"))


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The SDPA implementation that runs for these inputs: the fused ATen op seen at dispatch, else ``math``."""
    with torch.no_grad(), OpCounter() as seen:
        F.scaled_dot_product_attention(q, k, v)
    return next((name for op in seen.counts for key, name in _SDPA_OPS if key in op), "math")


def triton_attention(q, k, v):
    from getfast.ops import attention

    with forced_backend("triton"):
        return attention(q, k, v)


def measure(shape, dtype, device, quick: bool) -> dict:
    """One row: both implementations, both modes, at ``shape`` and ``dtype``."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(4))
    row = {"shape": list(shape), "dtype": dtype_name(dtype), "default_backend": default_backend("attention_fwd", device, dtype)}
    backend, err = attempt(lambda: sdpa_backend(q, k, v))
    row["sdpa_backend"] = backend or err
    with torch.no_grad():
        out, err = attempt(lambda: triton_attention(q, k, v))
        if err is None:
            row["max_abs_diff_vs_sdpa"] = diff = float((out.float() - F.scaled_dot_product_attention(q, k, v).float()).abs().max())
            err = None if diff <= WRONG_ABOVE else f"wrong result: max abs difference {diff:.2g} from SDPA > {WRONG_ABOVE:g}"
    row.update({"triton_error": err} if err else {})
    del out
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    fns = {"fwd": {"triton": lambda: triton_attention(q, k, v), "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)},
           "fwd+bwd": {"triton": lambda: triton_attention(qg, kg, vg).backward(do),
                       "sdpa": lambda: F.scaled_dot_product_attention(qg, kg, vg).backward(do)}}
    for mode in MODES:
        for impl, fn in fns[mode].items():
            skip = impl == "triton" and "triton_error" in row  # a failed or wrong Triton result is not timed
            with torch.set_grad_enabled(mode != "fwd"):
                ms, err = (None, None) if skip else attempt(lambda: kernel_ms(fn, device, quick, grad_to_none=[qg, kg, vg]))
            row[f"{mode}_{impl}_ms"], row[f"{mode}_{impl}_error"] = ms, err
            row[f"{mode}_{impl}_tflops"] = None if ms is None else rate(attention_flops(*shape, mode), ms) / 1e12
        t, s = row.get(f"{mode}_triton_ms"), row.get(f"{mode}_sdpa_ms")
        row[f"{mode}_ratio"] = (s / t) if (t and s) else None
    return row


def plan(quick: bool) -> list[tuple[tuple[int, int, int, int], torch.dtype]]:
    """(shape, dtype) pairs: every shape in bf16 and fp16; --quick: fp16 at GET's shape only."""
    return [(s, torch.bfloat16) for s in SHAPES] + [(s, torch.float16) for s in (QUICK_FP16 if quick else SHAPES)]


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None, cases=None) -> dict:
    rows, skipped = [], []
    for shape, dtype in (cases if cases is not None else plan(quick)):
        row = budget.measure(20.0 if quick else 60.0, f"{'·'.join(map(str, shape))} {dtype_name(dtype)}", skipped,
                             lambda: measure(shape, dtype, device, quick))  # the time to autotune a new (N, d, dtype)
        rows += [row] if row else []
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tune = len(importlib.import_module("getfast.kernels.attention")._configs()) if device.type == "cuda" else None
    return {"quick": quick, "rows": rows, "skipped": skipped, "autotune_configs": tune,
            "flops_model": "fwd 4·B·H·N²·d; fwd+bwd 3.5× fwd (FlashAttention-2 convention)"}


def report(res: dict) -> str:
    lines = []
    for r in res["rows"]:
        cells = ["·".join(map(str, r["shape"])), r["dtype"], markdown_safe(r.get("sdpa_backend")),
                 markdown_safe(r.get("default_backend"))]
        for mode in MODES:
            for impl in ("triton", "sdpa"):
                err = r.get(f"{mode}_{impl}_error") or (r.get("triton_error") if impl == "triton" else None)
                tf, ms = r.get(f"{mode}_{impl}_tflops"), r.get(f"{mode}_{impl}_ms")
                cells.append(markdown_safe(err) if err else (f"{tf:.0f} ({ms:.3f} ms)" if tf is not None else "–"))
            cells.append(fmt_ratio(r.get(f"{mode}_ratio")))
        lines.append(cells + [fmt(r.get("max_abs_diff_vs_sdpa"), ".2g")])
    tune = f" Tile configurations autotuned: {res['autotune_configs']}." if res.get("autotune_configs") else ""
    return section(res, f"FLOPs: {res['flops_model']}; Triton/SDPA = SDPA time ÷ Triton time (> 1: the kernel is "
                   f"faster). `default` = the backend `getfast.ops.attention` dispatches to for that input.{tune}\n\n"
                   + markdown_table(["B·H·N·d", "dtype", "SDPA backend", "default", "fwd Triton TFLOP/s",
                                     "fwd SDPA TFLOP/s", "fwd Triton/SDPA", "fwd+bwd Triton TFLOP/s", "fwd+bwd SDPA TFLOP/s",
                                     "fwd+bwd Triton/SDPA", "max abs diff vs SDPA"], lines), False)
