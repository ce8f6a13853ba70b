"""The fused SIM surrogate on the GPU, forward + backward, each backend vs eager autograd.

``getfast.ops.sim_loss`` with ``GETFAST_BACKEND`` forced to each GPU backend (triton, cuda) and
with the default dispatch, against ``sim_loss_reference`` (the eager composition of torch ops)
differentiated by autograd: one forward and ``torch.autograd.grad`` w.r.t. the three (B, ...)
inputs. Effective bandwidth from the least bytes a fused fwd+bwd must move,
:func:`getfast.bench.gpu_common.sim_loss_bytes` (9 tensors), and its share of the device's peak;
the same model is applied to eager's time so the two columns compare directly.
"""
from __future__ import annotations

import torch

from getfast.bench.gpu_common import (
    Budget,
    attempt,
    default_backend,
    dtype_name,
    fmt,
    fmt_pct,
    fmt_ratio,
    forced_backend,
    kernel_ms,
    markdown_safe,
    rate,
    share,
    sim_loss_bytes,
)

NAME = "sim_loss"
TITLE = "GPU sim_loss — fused SIM surrogate vs eager autograd (fwd+bwd)"

# SIM at 64×64 (batch 256), an odd size where launch overhead dominates, CIFAR-10 at batch 64.
SIZES = ((256, 3, 64, 64), (7, 3, 33, 31), (64, 3, 32, 32))
C = 0.5  # pseudo-Huber c


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    a, f, x = (torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    sigma = torch.rand(shape[0], generator=g, device=device) * 2 + 0.1
    w = torch.randn(shape[0], generator=g, device=device)
    return a, f, x, sigma, w


def _fused(a, f, x, sigma, w, backend):
    from getfast.ops import sim_loss

    with forced_backend(backend):
        loss = sim_loss(a, f, x, sigma, C)
        return torch.autograd.grad((loss * w).sum(), (a, f, x))


def _eager(a, f, x, sigma, w):
    from getfast.ops import sim_loss_reference

    loss = sim_loss_reference(a, f, x, sigma, C)
    return torch.autograd.grad((loss * w).sum(), (a, f, x))


def backends_for(device: torch.device) -> tuple[str, ...]:
    return ("triton", "cuda") if device.type == "cuda" else ("cpp",)


def measure(shape, dtype, device, quick: bool, peak_bw: float | None) -> dict:
    a, f, x, sigma, w = _inputs(shape, dtype, device)
    numel = a.numel()
    nbytes = sim_loss_bytes(numel, a.element_size())
    row = {"shape": list(shape), "dtype": dtype_name(dtype), "model_bytes": nbytes, "impls": {},
           "default_backend": default_backend("sim_loss", device, dtype)}
    # correctness guard against the float64 reference (eager in bf16 is itself only bf16-accurate)
    a64, f64, x64 = (t.detach().double().requires_grad_() for t in (a, f, x))
    ref = _eager(a64, f64, x64, sigma.double(), w.double())
    impls = [("eager", lambda: _eager(a, f, x, sigma, w))]
    impls += [(b, (lambda b=b: _fused(a, f, x, sigma, w, b))) for b in backends_for(device)]
    impls += [("default", lambda: _fused(a, f, x, sigma, w, None))]
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # relative to the largest gradient entry
    for name, fn in impls:
        entry: dict = {}
        got, err = attempt(fn)
        if err is None:
            diff = max(float(((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))) for g, r in zip(got, ref))
            entry["max_rel_diff_vs_fp64"] = diff
            if name != "eager" and not diff <= tol:  # the reference's own rounding is recorded, not judged
                err = f"wrong result: max relative difference {diff:.2g} > {tol:g}"
        if err is None:
            ms, err = attempt(lambda fn=fn: kernel_ms(fn, device, quick))
            entry["ms"] = ms
            entry["gb_s"] = None if ms is None else rate(nbytes, ms) / 1e9
            entry["bw_share"] = None if ms is None else share(rate(nbytes, ms), peak_bw)
        entry["error"] = err
        row["impls"][name] = entry
    t_e = row["impls"]["eager"].get("ms")
    for name, entry in row["impls"].items():
        entry["speedup_vs_eager"] = (t_e / entry["ms"]) if (t_e and entry.get("ms")) else None
    return row


def plan(quick: bool) -> list[tuple[tuple[int, ...], torch.dtype]]:
    cases = [(s, torch.float32) for s in SIZES]
    if not quick:
        cases += [(s, torch.bfloat16) for s in SIZES]
    return cases


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None, cases=None) -> dict:
    rows, skipped = [], []
    for shape, dtype in (cases if cases is not None else plan(quick)):
        need = 5.0
        if not budget.allows(need):
            skipped.append({"shape": list(shape), "dtype": dtype_name(dtype), "why": budget.skip_note(need)})
            continue
        rows.append(measure(shape, dtype, device, quick, peak_bw))
    return {"quick": quick, "c": C, "rows": rows, "skipped": skipped,
            "bytes_model": "9·numel·itemsize (fwd reads 3 inputs; bwd reads 3, writes 3 gradients)"}


def report(res: dict) -> str:
    from getfast.bench.common import markdown_table

    lines = []
    for r in res["rows"]:
        for name, e in r["impls"].items():
            label = {"eager": "eager autograd (reference)",
                     "default": f"getfast default dispatch ({r.get('default_backend', '?')})"}.get(name, f"fused, {name}")
            if e.get("error"):
                lines.append(["×".join(map(str, r["shape"])), r["dtype"], label, markdown_safe(e["error"]), "–", "–", "–"])
                continue
            lines.append(["×".join(map(str, r["shape"])), r["dtype"], label, fmt(e.get("ms"), ".3f"),
                          fmt(e.get("gb_s"), ".0f"), fmt_pct(e.get("bw_share")), fmt_ratio(e.get("speedup_vs_eager"))])
    text = (f"One forward + `torch.autograd.grad` w.r.t. the three inputs, c = {res['c']}; effective GB/s from "
            f"the bytes model {res['bytes_model']}, applied to every row.\n\n"
            + markdown_table(["B×C×H×W", "dtype", "implementation", "ms", "GB/s", "% of peak", "speed-up vs eager"], lines)
            + "\n")
    if res["skipped"]:
        text += "\nNot measured: " + "; ".join(f"{'×'.join(map(str, s['shape']))} {s['dtype']} ({s['why']})"
                                             for s in res["skipped"]) + "\n"
    return text
