"""``lsparam memory``: bad --model values are one ``lsparam:`` line with exit status 2, never a traceback."""

import json

import pytest

from lsparam.cli import main
from lsparam.presets import METHODS


@pytest.mark.parametrize("model, message", [
    ("nope", r"--model 'nope' is neither a size \(llama_9m, .*\) nor a path ending in \.json"),
    ("missing/config.json", r"--model 'missing/config.json': no such file"),
    ("BAD", r"is not a transformers config\.json"),
    ("GPT2", r"is a 'gpt2' config; the memory table models LLaMA configs"),
])
def test_a_bad_model_is_one_error_line(model, message, tmp_path, capsys):
    if model == "BAD":
        model = str(tmp_path / "config.json")
        (tmp_path / "config.json").write_text("{not json")
    elif model == "GPT2":
        from transformers import GPT2Config

        model = str(tmp_path / "config.json")
        (tmp_path / "config.json").write_text(json.dumps(GPT2Config(n_layer=1).to_dict()))
    assert main(["memory", "--model", model]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsparam: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_four_bit_states_are_a_row_like_the_others(capsys):
    assert main(["memory", "--model", "llama_9m", "--state-bits", "4", "--method", "lost", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    four = [r for r in rows if r["state_bits"] == 4]
    assert {r["method"] for r in four} == {*METHODS, "cola-m"}
    by_bits = {r["state_bits"]: r for r in rows if r["method"] == "lost" and not r["per_layer"]}
    assert by_bits[4]["optimizer_states"] < by_bits[8]["optimizer_states"] < by_bits[32]["optimizer_states"]


def test_json_marks_the_chosen_row_and_a_config_path_is_its_size(capsys):
    from pathlib import Path

    assert main(["memory", "--model", "llama_9m", "--method", "cola", "--state-bits", "8", "--per-layer", "--json"]) == 0
    by_name = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["state_bits"], r["per_layer"]) for r in by_name if r["chosen"]] == [("cola", 8, True)]
    # the same shape given as a config file takes the size's settings (its paper ranks), as the recipe does
    path = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "llama_130m.json"
    assert main(["memory", "--model", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    d, f, layers, vocab, r = 768, 2048, 12, 32000, 256  # LLaMA-130M, SLTrain's paper rank for it (hidden/4: 192)
    lowrank = 2 * vocab * d + (2 * layers + 1) * d + layers * r * (4 * 2 * d + 3 * (d + f))
    assert next(row for row in rows if row["method"] == "lowrank")["parameter_count"] == lowrank
