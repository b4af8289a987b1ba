"""``python -m recipes.bench.quality``: the study's command line (recipes/bench/quality/cli.py)."""

from recipes.bench.quality.cli import main

if __name__ == "__main__":
    main()
