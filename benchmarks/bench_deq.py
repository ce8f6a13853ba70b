"""``python -m benchmarks.bench_deq``: the CPU benchmark :mod:`getfast.bench.deq` with its own options."""
from getfast.bench.deq import *  # noqa: F401,F403
from getfast.bench.deq import main, report, run  # noqa: F401

if __name__ == "__main__":
    main()
