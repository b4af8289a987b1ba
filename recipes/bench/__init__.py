"""The benchmarks behind docs/benchmarks.md: each module runs from the repository root as a module
(``python -m recipes.bench.step``) and writes its section with ``recipes.bench.report.write_section``."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` in a fresh process, from the repository root, its output captured (the
    benchmarks measure each configuration in a process of its own)."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT)


# the output heads a benchmark's training step can use (recipes.bench.training's lean_head)
HEADS = {"lean": "the lean output head (`lsparam.lean_head`, the recipe's default)",
         "plain": "transformers' plain output head"}


def add_head_flag(parser) -> None:
    """``--head lean|plain`` for a benchmark that builds its steps with recipes.bench.training."""
    parser.add_argument("--head", choices=list(HEADS), default="lean",
                        help="the LM head and loss: lean (chunked, the recipe's default) or transformers' plain one")
