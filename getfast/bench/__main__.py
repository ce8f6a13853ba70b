"""``python -m getfast.bench``: the benchmarks' command line (same as ``python -m benchmarks``)."""
import sys

from getfast.bench.runner import main

sys.exit(main(prog="python -m getfast.bench"))
