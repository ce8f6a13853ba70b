"""Entry points kept at the repository root: ``python -m benchmarks`` and
``python -m benchmarks.bench_<name>``. The benchmark code lives in :mod:`getfast.bench` (so it ships
in the wheel and ``getfast bench`` works from an installed package); RESULTS.md and ``results/``
stay here."""
