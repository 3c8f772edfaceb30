"""`python -m bench`: the benchmarks' one entry point (bench/run.py)."""
from bench.run import main

main()
