"""Run the benchmarks a :class:`~getfast.bench.BenchConfig` selects (``python -m benchmarks``). A benchmark is the
module ``getfast.bench.<name>``: ``TITLES`` per device type, ``run(device, quick, budget, peak_bw=None) -> dict``,
``report(result) -> str``; its status in ``[gpu_]all.json``: ``ok``, ``partial (skipped: …)`` or ``FAILED: …``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

from getfast.bench.config import QUICK_GPU_BUDGET_S, BenchConfig
from getfast.options import add_config, take_config

QUICK_AUTOTUNE_ENV = "GETFAST_QUICK_AUTOTUNE"  # read by kernels/attention.py when it is imported


def check_device(cfg: BenchConfig) -> None:
    """``ValueError`` (one line) when the GPU benchmarks cannot run here; nothing is measured first."""
    if not cfg.device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device}: torch sees no CUDA device (torch.cuda.is_available() is False; "
                         f"torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                         f"the CPU benchmarks run with --device cpu")
    if int(cfg.device.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {cfg.device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise ValueError("TRITON_INTERPRET is set: Triton kernels would run in the interpreter instead of compiled; "
                         "unset it for the GPU benchmarks")


def load_module(name: str):
    return importlib.import_module(f"getfast.bench.{name}")


def gpu_header(info: dict, quick: bool, budget_s: float | None) -> str:
    """The ``gpu`` section: which device, software and code the ``gpu-*`` sections below came from."""
    from getfast.bench.common import device_line

    m, d = info["machine"], info["device"]
    return (f"Last GPU run: {device_line(d)}; Python {m['python']}; getfast commit {m.get('git_commit') or 'unknown'}, "
            f"`_C` build {m.get('getfast_build', {})}; {m['timestamp_utc']}; {'quick run' if quick else 'full run'}"
            f"{f'; time budget {budget_s:.0f} s' if budget_s else ''}. TF32 for float32 matmuls: {d.get('tf32_matmul')}."
            "\n\nRegenerate with `python -m benchmarks --device cuda [--quick]` (`benchmarks/gpu_check.sh` on a bare "
            "GPU machine); the `gpu-*` sections below come from that run and name what it did not measure.\n")


def run_config(cfg: BenchConfig) -> int:
    check_device(cfg)
    import torch

    from getfast.bench.common import (Budget, attempt, device_info, machine_info, matmul_tflops, merge_json,
                                      set_output, update_results_md, write_json)

    folder, md = set_output(cfg.out)
    print(f"results: {folder}/ and {md}", flush=True)
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    budget_s = cfg.budget_s or (QUICK_GPU_BUDGET_S if cfg.quick and cuda else None)
    budget = Budget(budget_s)
    info, peak_bw, prefix = {"machine": machine_info()}, None, "gpu_" if cuda else ""
    if cuda:
        if device.index is not None:
            torch.cuda.set_device(device)
        if cfg.quick:
            os.environ.setdefault(QUICK_AUTOTUNE_ENV, "1")
        d = info["device"] = device_info(device)
        d["matmul_bf16_tflops"], d["matmul_error"] = attempt(lambda: matmul_tflops(device, cfg.quick))
        peak_bw = d["peak_bandwidth"].get("bytes_per_s")
        update_results_md("gpu", gpu_header(info, cfg.quick, budget_s), title=f"GPU — {info['device']['name']}")
        print(f"device: {info['device']['name']}; budget: {budget_s or 'none'} s", flush=True)
    results, statuses = {"info": info} if cuda else {"machine": info["machine"]}, {}
    for name in cfg.chosen():
        t0 = time.time()
        print(f"== {prefix}{name} ({budget.left():.0f} s of budget left) ==", flush=True)
        try:
            mod = load_module(name)
            res = mod.run(device, cfg.quick, budget, peak_bw=peak_bw)
            res.update(seconds=time.time() - t0, **({"device": info["device"]} if cuda else {}))
            write_json(prefix + name, res)
            update_results_md(f"gpu-{name}" if cuda else name,
                              mod.report(res) + ("\n(quick run)\n" if cfg.quick and cuda else ""),
                              title=mod.TITLES[device.type])
            results[name] = res
            statuses[name] = f"partial (skipped: {'; '.join(map(str, res['skipped']))})" if res.get("skipped") else "ok"
        except Exception as exc:  # one failing benchmark must not hide the others' numbers
            traceback.print_exc()
            results[name] = {"error": traceback.format_exc(limit=3)}
            statuses[name] = f"FAILED: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        finally:
            if cuda:
                torch.cuda.empty_cache()
        print(f"   {prefix}{name}: {statuses[name]} ({time.time() - t0:.0f} s)", flush=True)
    merge_json(f"{prefix}all", {**results, "status": statuses})
    failed = [n for n, s in statuses.items() if s.startswith("FAILED")]
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    """Command line: parse, validate (one-line error and exit status 2 on bad options or no GPU), run."""
    ap = argparse.ArgumentParser(prog=prog, description=importlib.import_module("getfast.bench").__doc__, formatter_class=type(  # doc as written
        "HelpFormatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}))
    add_config(ap, BenchConfig)
    ns = ap.parse_args(argv)
    try:
        return run_config(take_config(BenchConfig, ns))
    except ValueError as exc:
        ap.exit(2, f"{prog}: error: {exc}\n")
