"""lightfunc benchmarks: `python -m bench` (see README, "Benchmarks")."""
