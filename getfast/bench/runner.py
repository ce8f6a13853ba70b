"""Run the benchmarks a :class:`~getfast.bench.BenchConfig` selects, write their JSON and RESULTS.md
sections, and the ``python -m benchmarks`` / ``python -m getfast.bench`` command line."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import traceback

import getfast.bench.config
from getfast.bench.config import CPU_BENCHMARKS, GPU_BENCHMARKS, QUICK_GPU_BUDGET_S, BenchConfig, checkout_benchmarks
from getfast.options import add_config, take_config


def check_device(cfg: BenchConfig) -> None:
    """``ValueError`` (one line) when the GPU benchmarks cannot run here; nothing is imported or measured first."""
    if not cfg.device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device}: torch sees no CUDA device (torch.cuda.is_available() is False; "
                         f"torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                         f"the CPU benchmarks run with --device cpu")
    index = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {cfg.device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise ValueError("TRITON_INTERPRET is set: Triton kernels would run in the interpreter instead of compiled; "
                         "unset it for the GPU benchmarks")


def load_module(name: str, device: str):
    """The module of benchmark ``name`` (a built-in one, or a checkout's ``benchmarks/bench_<name>.py``)."""
    if device.startswith("cuda"):
        return importlib.import_module(GPU_BENCHMARKS[name])
    if name in CPU_BENCHMARKS:
        return importlib.import_module(CPU_BENCHMARKS[name])
    path = checkout_benchmarks()[name]
    mod_name = f"benchmarks.bench_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    root = os.path.dirname(os.path.dirname(path))
    if root not in sys.path:  # such a module may import benchmarks.common
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return mod


def run_config(cfg: BenchConfig) -> int:
    check_device(cfg)
    from getfast.bench.common import set_output

    folder, md = set_output(cfg.out)
    print(f"results: {folder}/ and {md}", flush=True)
    if cfg.device.startswith("cuda"):
        return _run_gpu(cfg)
    return _run_cpu(cfg)


def _run_cpu(cfg: BenchConfig) -> int:
    from getfast.bench.common import Skipped, machine_info, merge_json, update_results_md, write_json

    results, failed = {"machine": machine_info()}, []
    for name in cfg.chosen():
        t0 = time.time()
        print(f"== {name} ==", flush=True)
        try:
            mod = load_module(name, cfg.device)
            res = mod.run(quick=cfg.quick)
            write_json(name, res)
            if hasattr(mod, "report"):
                update_results_md(name, mod.report(res), title=getattr(mod, "TITLE", name))
            results[name] = res
        except Skipped as exc:
            print(f"   skipped: {exc}", flush=True)
            results[name] = {"skipped": str(exc)}
        except Exception:  # one failing benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
            results[name] = {"error": traceback.format_exc(limit=3)}
        print(f"   {time.time() - t0:.0f} s", flush=True)
    merge_json("all", results)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


def gpu_header(info: dict, quick: bool, budget_s: float | None) -> str:
    """The ``gpu`` section: which device, software and code the ``gpu-*`` sections below came from."""
    from getfast.bench.gpu_common import device_line

    m = info["machine"]
    build = m.get("getfast_build", {})
    budget = f"; time budget {budget_s:.0f} s" if budget_s else ""
    return (f"Last GPU run: {device_line(info['device'])}; Python {m['python']}; getfast commit "
            f"{m.get('git_commit') or 'unknown'}, `_C` build {build}; {m['timestamp_utc']}; "
            f"{'quick run' if quick else 'full run'}{budget}. TF32 for float32 matmuls: "
            f"{info['device'].get('tf32_matmul')}.\n\n"
            "Regenerate with `python -m benchmarks --device cuda [--quick]` (or `benchmarks/gpu_check.sh` on a bare "
            "GPU machine). Each `gpu-*` section below was written by that run, side by side in one process; a "
            "measurement that did not fit the time budget or failed says so in its section.\n")


def _run_gpu(cfg: BenchConfig) -> int:
    import torch

    from getfast.bench.common import machine_info, update_results_md, write_json
    from getfast.bench.gpu_common import Budget, attempt, device_info, matmul_tflops

    device = torch.device(cfg.device)
    if device.index is not None:
        torch.cuda.set_device(device)
    budget_s = cfg.budget_s or (QUICK_GPU_BUDGET_S if cfg.quick else None)
    budget = Budget(budget_s)
    info = {"machine": machine_info(), "device": device_info(device)}
    info["device"]["matmul_bf16_tflops"], err = attempt(lambda: matmul_tflops(device, cfg.quick))
    if err:
        info["device"]["matmul_error"] = err
    peak_bw = info["device"]["peak_bandwidth"].get("bytes_per_s")
    update_results_md("gpu", gpu_header(info, cfg.quick, budget_s), title=f"GPU — {info['device']['name']}")
    print(f"device: {info['device']['name']}; budget: {budget_s or 'none'} s", flush=True)
    results, failed = {"info": info}, []
    for name in cfg.chosen():
        t0 = time.time()
        print(f"== gpu {name} ({budget.left():.0f} s of budget left) ==", flush=True)
        try:
            mod = load_module(name, cfg.device)
            res = mod.run(device, cfg.quick, budget, peak_bw=peak_bw)
            res["device"] = info["device"]
            res["seconds"] = time.time() - t0
            write_json(f"gpu_{name}", res)
            update_results_md(f"gpu-{name}", mod.report(res) + ("\n(quick run)\n" if cfg.quick else ""),
                              title=mod.TITLE)
            results[name] = res
        except Exception:  # one failing benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
            results[name] = {"error": traceback.format_exc(limit=3)}
        finally:
            torch.cuda.empty_cache()
        print(f"   {time.time() - t0:.0f} s", flush=True)
    merge_json("gpu_all", results)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=getfast.bench.config.__doc__,
                                 formatter_class=_HelpFormatter)
    add_config(ap, BenchConfig)
    return ap


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    """Command line: parse, validate (one-line error and exit status 2 on bad options or no GPU), run."""
    ap = build_parser(prog)
    ns = ap.parse_args(argv)
    try:
        cfg = take_config(BenchConfig, ns)
        return run_config(cfg)
    except ValueError as exc:
        ap.exit(2, f"{prog}: error: {exc}\n")


def main_one(name: str, argv=None) -> object:
    """``python -m benchmarks.bench_<name>``: that CPU benchmark's own command line."""
    return importlib.import_module(CPU_BENCHMARKS[name]).main(argv)
