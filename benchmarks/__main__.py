"""``python -m benchmarks [--quick] [--only NAME ...]``: run every ``bench_*.py`` and regenerate RESULTS.md.

Each module exposes ``run(quick: bool) -> dict`` and rewrites its own section of RESULTS.md and
``benchmarks/results/<name>.json``; this entry point also writes ``benchmarks/results/all.json``.
On CUDA machines the modules time with ``triton.testing.do_bench``; on CPU with torch.utils.benchmark.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback

import benchmarks
from benchmarks.common import machine_info, write_json


def names() -> list[str]:
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, shorter timing")
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {names()}")
    args = ap.parse_args(argv)
    chosen = args.only or names()
    unknown = sorted(set(chosen) - set(names()))
    if unknown:
        ap.error(f"unknown benchmarks {unknown}; known: {names()}")
    results, failed = {"machine": machine_info()}, []
    for name in chosen:
        t0 = time.time()
        print(f"== bench_{name} ==", flush=True)
        try:
            results[name] = importlib.import_module(f"benchmarks.bench_{name}").run(quick=args.quick)
        except Exception:  # one failing benchmark must not hide the others' numbers
            traceback.print_exc()
            failed.append(name)
            results[name] = {"error": traceback.format_exc(limit=3)}
        print(f"   {time.time() - t0:.0f} s", flush=True)
    write_json("all", results)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
