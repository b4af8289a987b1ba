"""The benchmarks behind docs/benchmarks.md: each module runs from the repository root as a module
(``python -m recipes.bench.step``) and writes its section with ``recipes.bench.report.write_section``."""
