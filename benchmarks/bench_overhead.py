"""``python -m benchmarks.bench_overhead``: the CPU benchmark :mod:`getfast.bench.overhead` with its own options."""
from getfast.bench.overhead import *  # noqa: F401,F403
from getfast.bench.overhead import main, report, run  # noqa: F401

if __name__ == "__main__":
    main()
