"""getfast benchmarks: each `bench_<name>.py` has `run(quick: bool) -> dict` and a `__main__`
that writes `benchmarks/results/<name>.json` and its section of `benchmarks/RESULTS.md`."""
