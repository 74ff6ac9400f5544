"""llm-mesh benchmarks: `python -m bench SUITE --out DIR` (see bench/README.md)."""
