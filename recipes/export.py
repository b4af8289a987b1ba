"""A checkpoint of ``recipes/pretrain.py`` as a model: rebuilt from its weights file alone, or exported as a
plain dense ``LlamaForCausalLM`` that vanilla transformers loads (``--export``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from recipes.checkpoint import WriteFailed, _fsync, write_failure
from recipes.flags import RecipeError, check_export_target

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def model_from_checkpoint(path, device="cpu") -> torch.nn.Module:
    """The parametrized model of a checkpoint directory, in eval mode, in the dtype it was saved in.

    Rebuilt from what the weights file holds alone: the model config in its metadata, and each structured
    layer's method and config from its ``lsparam_spec`` tensor, through :func:`lsparam.io.load_parametrized`
    (not from the run's flags). A full-rank or GaLore checkpoint (no spec tensors) is a plain
    ``LlamaForCausalLM``.

    >>> model = model_from_checkpoint("runs/llama_9m-lost/checkpoints/step_00000300")  # doctest: +SKIP
    """
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import lsparam.io

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise RecipeError(f"{str(path)!r} is not a checkpoint directory (no model.safetensors in it)")
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata() or {}
        structured = any(k.endswith(".lsparam_spec") for k in f.keys())
        dtypes = [_DTYPES.get(f.get_slice(k).get_dtype()) for k in f.keys()]
    if "config" not in metadata:
        raise RecipeError(f"{str(weights)!r} has no model config in its metadata: not a recipes/pretrain.py checkpoint")
    dtype = next((d for d in dtypes if d is not None), torch.float32)
    config = LlamaConfig.from_dict(json.loads(metadata["config"]))
    if structured:
        with tempfile.TemporaryDirectory() as folder:  # the layout load_parametrized reads: config.json + weights
            config.to_json_file(os.path.join(folder, "config.json"))
            try:
                os.symlink(weights.resolve(), os.path.join(folder, "model.safetensors"))
            except OSError:  # no symlinks here: copy
                shutil.copyfile(weights, os.path.join(folder, "model.safetensors"))
            model = lsparam.io.load_parametrized(folder, LlamaForCausalLM, dtype=dtype)
    else:
        model = LlamaForCausalLM(config).to(dtype)
        model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()


def export_checkpoint(path, directory: str) -> None:
    """A checkpoint as a plain dense LlamaForCausalLM + tokenizer (``save_pretrained``, safetensors), which
    vanilla ``AutoModelForCausalLM.from_pretrained`` loads. Refuses SiLU-LOST (no dense form).

    The files are written into a temporary sibling directory that replaces ``directory`` only once they are
    all there: a failed export (a full disk) leaves ``directory`` as it was and raises :class:`WriteFailed`.
    """
    import lsparam
    from transformers import AutoTokenizer

    check_export_target(directory)
    model = model_from_checkpoint(path)
    try:
        lsparam.merge(model)  # every structured layer becomes a plain dense nn.Linear
    except lsparam.NoDenseFormError as error:
        raise RecipeError(f"--export refused: {error}") from None
    model.config.use_cache = True
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(Path(path) / "tokenizer")).save_pretrained(str(staging))
        for file in (f for f in staging.rglob("*") if f.is_file()):
            _fsync(file)
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise WriteFailed(f"--export: {write_failure(error, directory)}; {directory} is as it was") from None
    if target.exists():  # a previous export (check_export_target): renamed away, then removed
        trash = target.with_name(f".{target.name}.trash-{os.getpid()}")
        os.replace(target, trash)
        os.replace(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, target)
    print(f"exported {path} as a dense LlamaForCausalLM to {directory}")
