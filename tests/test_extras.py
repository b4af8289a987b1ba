"""The core imports and works with torch, safetensors and tqdm alone; a feature whose extra is missing says
which extra to install. Checked in a fresh interpreter where the optional packages cannot be imported."""

import subprocess
import sys
import textwrap

BLOCKED = ("transformers", "accelerate", "torchao", "datasets", "tokenizers", "matplotlib", "peft")

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {name}")

    sys.meta_path.insert(0, Block())
    import torch, lsparam, lsparam.hf, lsparam.io, lsparam.memory, lsparam.optim, lsparam.presets, lsparam.testing

    torch.manual_seed(0)
    for config in (lsparam.LowRankConfig(rank=4), lsparam.SLTrainConfig(rank=4, density=0.1), lsparam.LOSTConfig(rank=4)):
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        lsparam.parametrize(model, config)
        x = torch.randn(3, 16)
        y = model(x)
        opt = lsparam.optim.LeanOptimizer(model, torch.optim.AdamW, lr=1e-3)
        y.sum().backward()
        opt.step()
        lsparam.merge(model)
    for what, call in [
        ("lowbit", lambda: lsparam.optim.LeanOptimizer(model, torch.optim.AdamW, lr=1e-3, state_bits=8)),
        ("hf", lambda: lsparam.presets.llama_config("llama_9m")),
        ("hf", lambda: lsparam.io.load_parametrized("nowhere")),
    ]:
        try:
            call()
        except ImportError as error:
            assert f"pip install 'lsparam[{what}]'" in str(error), error
        else:
            raise AssertionError(f"{what}: no ImportError")
    assert not any(name.split(".")[0] in BLOCKED for name in sys.modules), sorted(sys.modules)
    print("ok")
    """
)


def test_the_core_works_without_the_optional_packages():
    result = subprocess.run(
        [sys.executable, "-c", f"BLOCKED = {BLOCKED!r}\n{SCRIPT}"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
