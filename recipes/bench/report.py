"""Write a benchmark's section into docs/benchmarks.md, with the command, the machine and the date."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

from recipes.bench import ROOT

DOCS = ROOT / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery figure on this page is written by a script in `recipes/bench/`; each section names the command that produced it.\n"


def cpu_name() -> str:
    """The CPU's model name and the widest vector ISA torch uses on it: the sparse kernels' speed
    depends on both (e.g. "AMD EPYC, AVX2")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def machine() -> str:
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU only, {os.cpu_count()} cores"
    return f"{platform.machine()} ({cpu_name()}), {device}, torch {torch.__version__}, Python {platform.python_version()}"


def write_section(name: str, title: str, body: str) -> Path:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # run as `python -m recipes.bench.X`
    # a package runs as its __main__ module, but `python -m package` is the command to give
    program = f"-m {spec.name.removesuffix('.__main__')}" if spec is not None else os.path.relpath(sys.argv[0], DOCS.parents[1])
    command = f"python {program} " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    command = command.rstrip()
    stamp = datetime.date.today().isoformat()
    section = (
        f"<!-- bench:{name}:start -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine()}  \nDate: {stamp}\n\n{body.strip()}\n"
        f"<!-- bench:{name}:end -->"
    )
    text = DOCS.read_text() if DOCS.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{name}:start -->.*?<!-- bench:{name}:end -->", re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)
    return DOCS
