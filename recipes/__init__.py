"""LLaMA pretraining recipes built on lsparam: ``recipes.pretrain`` (with ``recipes.flags`` and
``recipes.checkpoint``), ``recipes.data``, ``recipes.plot`` and the benchmarks in ``recipes.bench``.

A package so that its modules import each other as ``recipes.X`` (from the repository root, or with it on
``PYTHONPATH``); the entry scripts (``python recipes/pretrain.py``, ``python -m recipes.bench.step``...)
re-run themselves as these modules, as ``python -m recipes.pretrain`` would.
"""
