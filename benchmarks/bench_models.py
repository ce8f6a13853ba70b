"""``python -m benchmarks.bench_models``: the CPU benchmark :mod:`getfast.bench.models` with its own options."""
from getfast.bench.models import *  # noqa: F401,F403
from getfast.bench.models import main, report, run  # noqa: F401

if __name__ == "__main__":
    main()
