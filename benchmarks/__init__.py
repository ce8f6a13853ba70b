"""The entry point kept at the repository root: ``python -m benchmarks``. The benchmark code lives in
:mod:`getfast.bench` (so it ships in the wheel and ``getfast bench`` works from an installed package);
RESULTS.md, ``results/`` and ``gpu_check.sh`` stay here."""
