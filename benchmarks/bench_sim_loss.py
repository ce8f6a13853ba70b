"""``python -m benchmarks.bench_sim_loss``: the CPU benchmark :mod:`getfast.bench.sim_loss` with its own options."""
from getfast.bench.sim_loss import *  # noqa: F401,F403
from getfast.bench.sim_loss import main, report, run  # noqa: F401

if __name__ == "__main__":
    main()
