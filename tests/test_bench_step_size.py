"""recipes/bench/quality/step_size.py: the relative change one step makes to each part of the model, checked
against copies of the model taken before the step (float64), and its report section."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lsparam
from recipes.bench.quality.step_size import FILE, step_changes, step_section
from recipes.pretrain import decoder_linears


def _inputs_of(model, x) -> dict[str, torch.Tensor]:
    """Each decoder linear layer's and the head's input on ``x``, by module name."""
    seen, names = {}, {m: n for n, m in model.named_modules()}
    layers = [*decoder_linears(model), model.get_output_embeddings()]
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(names[m], i[0].detach())) for m in layers]
    with torch.no_grad():
        model(input_ids=x)
    for hook in hooks:
        hook.remove()
    return seen


def _relative64(new, old) -> float:
    new, old = new.double(), old.double()
    return ((new - old).norm() / old.norm()).item()


@pytest.mark.parametrize("method", ["full", "lost-silu"])
@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.AdamW])
def test_each_change_is_the_layer_before_and_after_the_step_on_its_own_input(llama_factory, method, optimizer_cls):
    model = llama_factory(0).train()
    if method == "lost-silu":
        lsparam.parametrize(model, lsparam.LOSTConfig(rank=8, activation="silu"), progress=False)
    optimizer = optimizer_cls(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(model)
    inputs = _inputs_of(before, x)
    loss, changes, head_change, embedding_change = step_changes(model, optimizer, scheduler, x)

    modules = dict(model.named_modules())
    old_modules = dict(before.named_modules())
    names = {m: n for n, m in modules.items()}
    head = inputs.pop("lm_head")
    assert sorted(names[m] for m in changes) == sorted(inputs)  # every decoder linear, nothing else
    with torch.no_grad():
        assert head_change == pytest.approx(_relative64(model.lm_head(head), before.lm_head(head)), rel=1e-4)
        for name, x_in in inputs.items():
            expected = _relative64(modules[name](x_in), old_modules[name](x_in))
            assert changes[modules[name]] == pytest.approx(expected, rel=1e-4), name
            assert expected > 0
        rows = x.unique()
        old_rows = before.get_input_embeddings().weight[rows]
        assert embedding_change == pytest.approx(_relative64(model.get_input_embeddings().weight[rows], old_rows), rel=1e-4)
        assert loss == pytest.approx(before(input_ids=x, labels=x).loss.item(), rel=1e-5)
    # the step happened once: the weights are the optimizer's, and the hooks are gone
    assert not any(m._forward_hooks for m in model.modules())


def test_the_section_lists_each_configuration_from_the_file(tmp_path):
    assert step_section(tmp_path, "1M") == []
    row = {"label": "lr 0.0005", "method": "full", "ppl": 240.5, "decoder": 0.0123, "embedding": 0.00045, "head": 0.0067,
           "peak_lr": 5e-4}
    runs = {"full-a": row, "lost-b": {**row, "method": "lost", "label": "lr 0.0015", "peak_lr": 1.5e-3, "decoder": 0.0031}}
    (tmp_path / FILE).parent.mkdir(parents=True)
    (tmp_path / FILE).write_text(json.dumps({"window": 32, "tokens": 10**6, "runs": runs}))
    lines = step_section(tmp_path, "1M")
    assert lines[0] == "### Why: how far one step moves each part (1M tokens)"
    table = [line for line in lines if line.startswith("| full") or line.startswith("| lost")]
    assert table == ["| full | lr 0.0005 | 1.2% | 0.04% | 0.67% | 240.5 |",
                     "| lost | lr 0.0015 | 0.31% | 0.04% | 0.67% | 240.5 |"]


def test_the_replay_reproduces_the_run_it_measures(corpus, tmp_path, restore_torch_globals):
    """A real tiny run (SLTrain, 20 steps, 2 of warm-up), then its replay from the recorded command: the same
    losses step for step, and a window of steps after the warm-up measured."""
    from recipes import pretrain
    from recipes.bench.quality.step_size import replay
    from tests.recipe_runs import common, read_metrics

    command = ["recipes/pretrain.py", *common(corpus, tmp_path / "run", "--method", "sltrain", "--steps", "20",
                                              "--lr", "3e-3")]
    pretrain.main(command[1:])
    train, _ = read_metrics(tmp_path / "run")
    measured = replay(command, window=4)
    assert measured["steps"] == [2, 6]
    assert measured["losses"] == pytest.approx([r["loss"] for r in train[:6]], rel=1e-6)
    assert sorted(measured["decoder_by_kind"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert all(value > 0 for value in (measured["decoder"], measured["embedding"], measured["head"]))
    with pytest.raises(ValueError, match="window=30: the run has 20 steps, 2 of them warm-up; at most 18"):
        replay(command, window=30)


def test_replay_difference_compares_the_stretches_the_replay_covers():
    from recipes.bench.quality.step_size import replay_difference

    record = {"steps": 10, "tokens": 1000, "train_loss": [[200, 1.5], [400, 3.5], [600, 5.5]]}
    assert replay_difference([1.0, 2.0, 3.0, 4.0, 5.0], record) == 0.0  # the third stretch is not covered
    assert replay_difference([1.0, 2.0, 3.0, 4.7], record) == pytest.approx(0.1)  # (3 + 4.7) / 2 = 3.85
    assert replay_difference([1.0], record) is None
