"""`python -m bench [--quick] [--out DIR]`: run the benchmarks and write their results."""

from bench.step_speed import main

if __name__ == "__main__":
    main()
