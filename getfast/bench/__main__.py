"""``python -m getfast.bench``: the benchmarks' command line (same as ``python -m benchmarks``)."""
from getfast.bench.runner import main

raise SystemExit(main(prog="python -m getfast.bench"))
