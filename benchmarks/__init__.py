"""Speed and memory benchmarks. Run as modules from the repository root: ``python -m benchmarks.graph``."""
