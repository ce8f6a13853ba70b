"""``python -m benchmarks.bench_pairs``: the CPU benchmark :mod:`getfast.bench.pairs` with its own options."""
from getfast.bench.pairs import *  # noqa: F401,F403
from getfast.bench.pairs import main, report, run  # noqa: F401

if __name__ == "__main__":
    main()
