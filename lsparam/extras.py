"""Optional dependencies: lsparam's core needs torch, safetensors and tqdm; the rest comes with extras.

| extra | packages | for |
|---|---|---|
| ``hf`` | transformers, accelerate | ``lsparam.hf`` (Trainer), ``lsparam.io.load_parametrized`` / ``save_pretrained``, ``lsparam.presets.llama_config``, the memory ledger from a config |
| ``lowbit`` | torchao | ``LeanOptimizer(state_bits=8 or 4)`` |
| ``recipes`` | the two above, datasets, tokenizers, matplotlib | ``recipes/`` (pretraining, benchmarks) |
| ``test`` | the above, pytest, hypothesis, peft, a packaged pretrained model | the test suite |

Using a feature whose extra is missing raises an ``ImportError`` that names the extra to install.
"""

from __future__ import annotations

import importlib


def require(module: str, extra: str, feature: str):
    """Import ``module`` for ``feature``, or raise an ``ImportError`` saying which extra brings it.

    >>> require("math", "none", "arithmetic").sqrt(4.0)
    2.0
    >>> require("no_such_package_here", "hf", "this feature")
    Traceback (most recent call last):
        ...
    ImportError: this feature needs the package 'no_such_package_here', which is not installed: pip install 'lsparam[hf]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise ImportError(
            f"{feature} needs the package {package!r}, which is not installed: pip install 'lsparam[{extra}]'"
        ) from error
