"""recipes/pretrain.py end to end, on tiny models and small corpora generated here.

Single-process runs call ``pretrain.main`` in this process where they can (imports are the slow part on
2 cores); the multi-process tests run real subprocesses (``torchrun`` for DDP and FSDP2 on gloo). What
survives a kill, a full disk, a damaged file or a diverging run is in tests/test_reliability.py.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from lsparam.presets import size_of
from recipes import plot, pretrain
from recipes.export import model_from_checkpoint
from recipes.flags import build_parser, check_args, method_settings, parse_size
from recipes.summary import parameters_by_kind
from tests.recipe_runs import ROOT, SEQ, TINY, aligned_args, common, read_metrics, run_script


# ---- single process -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["full", "lowrank", "sltrain", "lost", "lost-silu", "cola"])
def test_each_method_runs_and_writes_its_outputs(corpus, tmp_path, method, restore_torch_globals):
    out = tmp_path / method
    summary = pretrain.main(common(corpus, out, "--method", method, "--steps", "3", "--eval-batches", "1"))
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["step"] for r in evals] == [0, 3]
    assert all(r["loss"] > 0 and r["tok_per_s"] > 0 and r["mem_mib"] > 0 for r in train)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["final_val_ppl"] == pytest.approx(summary["final_val_ppl"])
    kinds = saved["parameters"]
    assert kinds["total"] == sum(v for k, v in kinds.items() if k != "total")
    assert (kinds["dense_linear"] > 0) == (method == "full")
    assert (kinds["sparse"] > 0) == (method in ("sltrain", "lost", "lost-silu"))
    assert (out / "loss.png").stat().st_size > 1000
    checkpoint = out / "checkpoints" / "step_00000003"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors", "state_rank0.pt", "tokenizer"]
    state = torch.load(checkpoint / "state_rank0.pt", weights_only=True)
    assert state["step"] == 3 and set(state["rng"]) == {"torch", "python", "numpy", "cuda"}
    # the checkpoint alone rebuilds the model (lsparam specs in the weights, not the run's flags)
    from safetensors.torch import load_file

    saved, reloaded = load_file(str(checkpoint / "model.safetensors")), model_from_checkpoint(checkpoint).state_dict()
    assert sorted(reloaded) == sorted(saved) and all(torch.equal(reloaded[k], v) for k, v in saved.items())


def test_loss_falls_over_twenty_steps(corpus, tmp_path, restore_torch_globals):
    out = tmp_path / "falls"
    summary = pretrain.main(common(corpus, out, "--method", "lost", "--steps", "20", "--lr", "1e-2"))
    losses = [r["loss"] for r in read_metrics(out)[0]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert summary["final_val_ppl"] < 0.5 * summary["initial_val_ppl"]
    # plot.py draws several runs against each other
    plot.main([str(out), str(out), "--out", str(tmp_path / "both.png"), "--labels", "a", "b", "--smooth", "3"])
    assert (tmp_path / "both.png").stat().st_size > 1000


def test_export_loads_in_vanilla_transformers_with_the_same_logits(corpus, tmp_path, restore_torch_globals):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, export = tmp_path / "run", tmp_path / "export"
    pretrain.main(common(corpus, out, "--method", "lost", "--steps", "3", "--export", str(export)))
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    dense = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    assert "parametrizations" not in "".join(dense.state_dict())
    structured = model_from_checkpoint(out / "checkpoints" / "step_00000003").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    ids = torch.tensor([tokenizer("the cat sat on the mat quickly and it was red.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, structured(ids).logits, atol=1e-5, rtol=1e-5)
    # an existing checkpoint exports without a run: --resume PATH --steps 0 --export DIR
    pretrain.main(["--resume", str(out / "checkpoints" / "step_00000003"), "--steps", "0", "--export", str(tmp_path / "again")])
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "again")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, dense(ids).logits, atol=0, rtol=0)


def test_export_is_refused_for_lost_silu(corpus, tmp_path, capsys, restore_torch_globals):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(common(corpus, tmp_path / "silu", "--method", "lost-silu", "--export", str(tmp_path / "x")))
    assert exit_info.value.code == 2
    assert "no dense form" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # and a lost-silu checkpoint given to the export-only path: judged by its own method, not by --method
    pretrain.main(common(corpus, tmp_path / "silu", "--method", "lost-silu", "--steps", "1", "--eval-batches", "1"))
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--resume", str(tmp_path / "silu" / "checkpoints" / "step_00000001"), "--steps", "0",
                       "--method", "lost", "--export", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "has no dense form" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_new_run_into_an_out_holding_a_run_is_refused(corpus, tmp_path, capsys, restore_torch_globals):
    # its checkpoints would be taken for the new run's (kept, exported, pruned) and its metrics overwritten
    out = tmp_path / "run"
    pretrain.main(common(corpus, out, "--method", "lost", "--steps", "2", "--eval-batches", "1"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    err = refused(common(corpus, out, "--method", "sltrain", "--steps", "2", "--export", str(tmp_path / "hf")), capsys)
    assert "--out" in err and "already holds a run (checkpoints ['step_00000002'])" in err and "--resume auto" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before and not (tmp_path / "hf").exists()


def test_an_export_over_other_files_or_over_the_run_is_refused(corpus, tmp_path, capsys, restore_torch_globals):
    foreign = tmp_path / "folder"
    (foreign / "data").mkdir(parents=True)
    (foreign / "config.json").write_text("{}")  # a config.json alone does not make a folder an export
    (foreign / "notes.txt").write_text("mine")
    err = refused(common(corpus, tmp_path / "a", "--method", "lost", "--export", str(foreign)), capsys)
    assert "holds other files than an exported model (['data', 'notes.txt'])" in err
    for export in (tmp_path / "b", tmp_path):  # --out itself, a folder holding it
        err = refused(common(corpus, tmp_path / "b", "--method", "lost", "--export", str(export)), capsys)
        assert "is --out" in err and "or holds it" in err
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json", "data", "notes.txt"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_logged_lr_is_the_rate_each_step_used(corpus, tmp_path, restore_torch_globals):
    # --lr on the schedule (warmup over 25% of 4 steps = 1, then cosine to 0.1), whatever the optimizer's
    # state bits and the decoder's rate split; step t is run at the schedule's value for t - 1
    def schedule(step, steps=4, warmup=1, floor=0.1):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    expected = [2e-3 * schedule(t) for t in range(4)]
    for name, extra in (("b32", []), ("b8", ["--state-bits", "8"]), ("split", ["--linear-lr-scale", "0.25"])):
        pretrain.main(common(corpus, tmp_path / name, "--method", "lost", "--steps", "4", "--lr", "2e-3", "--warmup",
                             "0.25", "--min-lr-ratio", "0.1", "--eval-batches", "1", *extra))
        logged = [r["lr"] for r in read_metrics(tmp_path / name)[0]]
        assert logged == pytest.approx(expected, rel=1e-9), name


def test_settings_that_would_fail_after_training_are_refused_before(corpus, tmp_path, capsys, restore_torch_globals):
    tied = tmp_path / "tied.json"
    tied.write_text(json.dumps({**json.loads(Path(corpus["config"]).read_text()), "tie_word_embeddings": True}))
    args = common(corpus, tmp_path / "a", "--method", "lost", "--steps", "1")
    err = refused([*args, "--model", str(tied)], capsys)
    assert "ties its input and output embeddings" in err
    err = refused(common(corpus, tmp_path / "b", "--method", "sltrain", "--sparse-backend", "semi-structured",
                         "--density", "0.5", "--device", "cpu"), capsys)
    assert "--sparse-backend semi-structured needs a CUDA GPU" in err
    err = refused([*args, "--tokenizer", str(tmp_path / "tok"), "--vocab-size", "4096"], capsys)  # would be ignored
    assert "--vocab-size 4096 sizes a tokenizer trained on the data; with --tokenizer" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_more_eval_batches_than_the_validation_set_holds_are_noted(corpus, tmp_path, capsys, restore_torch_globals):
    pretrain.main(common(corpus, tmp_path / "run", "--method", "lost", "--steps", "1", "--eval-batches", "1000"))
    assert "note: --eval-batches 1000, but --valid-tokens 512 make 4 batches: evaluating on those" in capsys.readouterr().err


def test_c4_fails_fast_offline(corpus, tmp_path):
    started = time.perf_counter()
    result = run_script(["--dataset", "c4", "--steps", "1", "--out", str(tmp_path / "c4"), "--cache-dir",
                         corpus["cache"]], env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 2
    assert "Hugging Face hub" in result.stderr and "--data-files" in result.stderr
    assert time.perf_counter() - started < 90


@pytest.mark.parametrize("flags, message", [
    (["--model", "llama_3b"], "neither a name in recipes/configs"),
    (["--tokens", "1M", "--steps", "10"], "not both"),
    (["--tokens", "5X"], "like 200k, 50M or 1.5B"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--seq-len", "1"], "--seq-len must be >= 2"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--linear-lr-scale", "0"], "--linear-lr-scale must be a positive number; got 0.0"),
    (["--linear-init-std", "-0.01"], "--linear-init-std must be a positive number (transformers' default is 0.02); got -0.01"),
    (["--warmup", "1.5"], "--warmup"),
    (["--method", "lost", "--density", "0.1"], "--density applies to --method sltrain"),
    (["--method", "sltrain", "--density", "2"], "density must lie in (0, 1]"),
    (["--per-layer", "--parallel", "ddp"], "--per-layer updates run inside backward"),
    (["--parallel", "fsdp", "--state-bits", "8"], "not supported with --parallel fsdp"),
    (["--parallel", "ddp"], "needs torchrun"),
    (["--resume", "/nonexistent/checkpoint"], "is not a checkpoint directory"),
    (["--dataset", "c4", "--data-files", "x.txt"], "alternatives"),
    (["--model", "BAD_JSON"], "not a LlamaConfig JSON"),
])
def test_bad_flags_give_clear_errors(flags, message, capsys, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    flags = [str(tmp_path / "bad.json") if f == "BAD_JSON" else f for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(flags + ["--out", str(tmp_path / "bad"), "--cache-dir", str(tmp_path / "cache")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("method", ["full", "sltrain"])
def test_linear_lr_scale_sets_the_decoder_linears_rate(method):
    """Adam's first step moves every weight by its group's rate times g/(|g| + eps): the largest move in
    each tensor is its rate, here 0.01 x the schedule's 0.5, times 0.25 inside the decoder's linears."""
    import argparse

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": 50}))
    settings = None
    if method == "sltrain":
        import lsparam

        settings = lsparam.SLTrainConfig(rank=8, density=0.1)
        lsparam.parametrize(model, settings)
    args = argparse.Namespace(method=method, lr=0.01, linear_lr_scale=0.25, weight_decay=0.0, per_layer=False,
                              state_bits=32, accumulation_steps=1, clip_norm=0)
    optimizer = pretrain.build_optimizer(args, model, settings)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, 50, (2, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        moves = p.grad is not None and bool(p.grad.any())  # SLTrain's A has no gradient while B = 0
        expected = 0.005 * (0.25 if ".layers." in name and "_proj" in name else 1.0) * moves
        largest = (p.detach() - before[name]).abs().max().item()
        assert largest == pytest.approx(expected, rel=1e-3), name


def test_linear_init_std_redraws_the_decoder_linears_only():
    """The decoder's projections get the new std (the sample std over all their entries, within 2%); the
    embeddings and head are the config's draw, bit for bit; and LOST factorises the re-drawn weight."""
    import argparse

    from transformers import LlamaConfig

    import lsparam

    config = LlamaConfig(**{**TINY, "vocab_size": 50})
    args = argparse.Namespace(seed=0, method="full", linear_init_std=None, lean_head=False, precision="fp32")
    plain = pretrain.build_model(args, config, None, "cpu")
    args.linear_init_std = 0.005
    small = pretrain.build_model(args, config, None, "cpu")

    def decoder(model):
        return [name for name, _ in model.named_parameters() if ".layers." in name and "_proj" in name]

    for model, std in ((plain, 0.02), (small, 0.005)):
        entries = torch.cat([model.get_parameter(name).detach().flatten() for name in decoder(model)])
        assert entries.std().item() == pytest.approx(std, rel=0.02)
    for name, weight in small.named_parameters():
        if name not in decoder(small):
            assert torch.equal(weight, plain.get_parameter(name)), name
    args.method = "lost"
    lost = pretrain.build_model(args, config, lsparam.LOSTConfig(rank=4), "cpu")
    weights = lost.model.layers[0].self_attn.q_proj.parametrizations.weight
    top = torch.linalg.svdvals(small.model.layers[0].self_attn.q_proj.weight.double())[:4]
    assert torch.linalg.svdvals((weights.original0 @ weights.original1).double())[:4].allclose(top, rtol=1e-4)


@pytest.mark.parametrize("method, size, flags, expected", [
    ("cola", "llama_60m", [], dict(lr=6e-3, weight_decay=0.01, clip_norm=0.5, warmup=0.2, min_lr_ratio=0.1)),
    ("cola", "llama_1b", [], dict(lr=2e-3, weight_decay=0.01, clip_norm=0.5, warmup=0.1)),
    ("cola", "llama_60m", ["--lr", "1e-3", "--clip-norm", "0", "--weight-decay", "0"], dict(lr=1e-3, clip_norm=0, weight_decay=0)),
    ("sltrain", "llama_60m", [], dict(lr=3e-3, weight_decay=0.0, clip_norm=1.0, warmup=0.1, min_lr_ratio=0.1)),
    ("full", "llama_9m", [], dict(lr=1e-3, weight_decay=0.0, clip_norm=1.0)),
])
def test_training_defaults_are_the_methods_published_ones_unless_set(method, size, flags, expected):
    from lsparam.presets import default_lr, training_defaults

    args = check_args(build_parser().parse_args(["--method", method, "--model", size, *flags]))
    assert {k: getattr(args, k) for k in expected} == pytest.approx(expected)
    if not flags:  # the same figures as the library's tables
        assert args.lr == default_lr(method, size)
        assert all(getattr(args, k) == v for k, v in training_defaults(method, size).items())


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], r"--rank 0 for --method galore must lie in \[1, 128\]"),
    (["--rank", "-3"], r"--rank -3 for --method galore must lie in \[1, 128\]"),
    (["--rank", "100000"], r"--rank 100000 for --method galore must lie in \[1, 128\]"),
    (["--galore-scale", "-1"], r"--galore-scale must be a positive number .*got -1\.0"),
    (["--galore-scale", "nan"], r"--galore-scale must be a positive number .*got nan"),
    (["--update-proj-gap", "0"], r"--update-proj-gap must be >= 1 .*got 0"),
], ids=["rank-0", "rank-negative", "rank-too-large", "scale-negative", "scale-nan", "gap-0"])
def test_galore_settings_outside_what_galore_can_use_are_refused(flags, message):
    pytest.importorskip("galore_torch")
    from recipes.flags import RecipeError

    with pytest.raises(RecipeError, match=message):
        check_args(build_parser().parse_args(["--method", "galore", "--model", "llama_9m", *flags]))


def test_a_fractional_galore_rank_is_a_fraction_of_the_hidden_size():
    pytest.importorskip("galore_torch")
    args = check_args(build_parser().parse_args(["--method", "galore", "--model", "llama_9m", "--rank", "0.25"]))
    assert method_settings(args, "llama_9m")["rank"] == 0.25 * args.hidden_size == 32


def test_choices_come_from_the_library():
    from lsparam.config import SPARSE_BACKENDS
    from lsparam.presets import METHODS

    actions = {a.dest: a for a in build_parser()._actions}
    assert tuple(actions["method"].choices) == (*METHODS, "galore")
    assert tuple(actions["sparse_backend"].choices) == SPARSE_BACKENDS and "gather" in SPARSE_BACKENDS


@pytest.mark.parametrize("backend", ["gather", "auto"])
def test_sparse_backend_gather_is_accepted_and_reaches_the_layers(backend):
    """``--sparse-backend gather`` (what ``auto`` picks on CPU, and documented) used to be refused by argparse."""
    from transformers import LlamaConfig

    import lsparam

    args = check_args(build_parser().parse_args(["--method", "sltrain", "--sparse-backend", backend, "--rank", "8",
                                                 "--device", "cpu"]))
    settings = method_settings(args, None)
    assert settings.sparse_backend == backend
    model = pretrain.build_model(args, LlamaConfig(**{**TINY, "vocab_size": 50}), settings, "cpu")
    layers = lsparam.structured_layers(model).values()
    assert layers and all(p.config.sparse_backend == backend for _, p in layers)
    ids = torch.randint(0, 50, (2, 8))
    model(ids, labels=ids).loss.backward()


@pytest.mark.parametrize("method, tied", [("full", False), ("lost", True), ("sltrain", False)])
def test_parameters_by_kind_follows_roles_and_module_types(method, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    import lsparam

    config = LlamaConfig(**{**TINY, "vocab_size": 50, "tie_word_embeddings": tied})
    model = LlamaForCausalLM(config)
    if method != "full":
        lsparam.parametrize(model, lsparam.presets.method_config(method, None))
    kinds = parameters_by_kind(model)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    assert kinds["embedding"] == 50 * hidden and kinds["lm_head"] == (0 if tied else 50 * hidden)
    assert kinds["norm"] == hidden * (2 * layers + 1)
    assert kinds["total"] == sum(p.numel() for p in model.parameters())
    factors = {"lowrank_out": 0, "lowrank_in": 0, "sparse": 0}
    for layer, p in lsparam.structured_layers(model).values():
        for i, role in enumerate(p.roles()):
            factors[role] += getattr(layer.parametrizations.weight, f"original{i}").numel()
    assert kinds["lowrank_factors"] == factors["lowrank_out"] + factors["lowrank_in"]
    assert kinds["sparse"] == factors["sparse"] and kinds["other_factors"] == 0
    assert (kinds["dense_linear"] > 0) == (method == "full")
    linears = pretrain.decoder_linears(model)
    assert len(linears) == 7 * layers and model.get_output_embeddings() not in linears


def test_resume_refuses_other_settings_and_other_process_counts(corpus, tmp_path, capsys, restore_torch_globals):
    out = tmp_path / "run"
    pretrain.main(common(corpus, out, "--method", "lowrank", "--steps", "1", "--eval-batches", "1"))
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(common(corpus, out, "--method", "lowrank", "--steps", "2", "--seed", "1", "--resume", "auto"))
    assert exit_info.value.code == 2
    assert "was made with other settings (seed: checkpoint 0, now 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # another validation set: its losses would not compare with the earlier ones
        pretrain.main(common(corpus, out, "--method", "lowrank", "--steps", "2", "--valid-tokens", "256", "--resume", "auto"))
    assert "was made with other settings (valid_tokens: checkpoint 512, now 256)" in capsys.readouterr().err
    # threads and nondeterministic kernels may change (recorded: they end a bit-for-bit resume)
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    pretrain.main(common(corpus, twin, "--method", "lowrank", "--steps", "2", "--eval-batches", "1", "--resume", "auto",
                         "--threads", "2", "--no-deterministic"))
    records = [json.loads(line) for line in (twin / "metrics.jsonl").read_text().splitlines()]
    assert {"type": "resume", "step": 1, "changed": {"threads": [1, 2], "no_deterministic": [False, True]}} in records
    (out / "checkpoints" / "step_00000001" / "state_rank0.pt").rename(out / "checkpoints" / "step_00000001" / "state_rank1.pt")
    with pytest.raises(SystemExit):
        pretrain.main(common(corpus, out, "--method", "lowrank", "--steps", "2", "--resume", "auto"))
    assert "has no state_rank0.pt (it holds state_rank1.pt)" in capsys.readouterr().err


def test_galore_without_the_package_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "galore_torch", None)  # import galore_torch -> ImportError
    with pytest.raises(SystemExit):
        pretrain.main(["--method", "galore", "--out", str(tmp_path / "g"), "--cache-dir", str(tmp_path / "cache")])
    assert "pip install galore-torch" in capsys.readouterr().err


def test_galore_trains_and_resumes_from_a_weights_only_checkpoint(corpus, tmp_path, restore_torch_globals):
    pytest.importorskip("galore_torch")
    args = ["--method", "galore", "--steps", "4", "--save-every", "2", "--update-proj-gap", "2", "--rank", "8"]
    pretrain.main(common(corpus, tmp_path / "a", *args))
    checkpoint = tmp_path / "a" / "checkpoints" / "step_00000002"
    state = torch.load(checkpoint / "state_rank0.pt", weights_only=True)
    assert any("galore_projector" in s.get("projector", {}) for s in state["optimizer"]["inner"][0]["state"].values())
    shutil.copytree(checkpoint, tmp_path / "b" / "checkpoints" / checkpoint.name)
    pretrain.main(common(corpus, tmp_path / "b", *args, "--resume", "auto"))
    (a, _), (b, _) = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [3, 4] and [r["loss"] for r in b] == [r["loss"] for r in a[2:]]


def test_size_parsing_and_shipped_configs():
    assert [parse_size(t) for t in ("50M", "1.5B", "200k", "1100000")] == [50_000_000, 1_500_000_000,
                                                                                    200_000, 1_100_000]
    from transformers import LlamaConfig

    from lsparam.presets import LLAMA_SIZES, VOCAB_SIZE

    for name, (hidden, intermediate, layers, heads) in LLAMA_SIZES.items():
        config = LlamaConfig.from_json_file(str(ROOT / "recipes" / "configs" / f"{name}.json"))
        assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
                config.num_key_value_heads, config.vocab_size) == (hidden, intermediate, layers, heads, heads, VOCAB_SIZE)
        assert size_of(config) == name


# ---- multi-process (torchrun, gloo) -------------------------------------------------------------------
def test_aligned_corpus_gives_each_step_the_same_sequences_on_one_or_two_ranks(aligned):
    from recipes.data import DataConfig, build_data

    def batches(rank, world, batch_size):
        data = build_data(DataConfig(data_files=aligned["train"], valid_files=aligned["valid"], tokenizer=aligned["tokenizer"],
                                     seq_len=SEQ, batch_size=batch_size, rank=rank, world_size=world,
                                     valid_tokens=8 * SEQ, cache_dir=aligned["cache"]))
        return [next(data.train) for _ in range(6)]

    one, (r0, r1) = batches(0, 1, 8), (batches(0, 2, 4), batches(1, 2, 4))
    for step in range(6):
        union = sorted(map(tuple, torch.cat([r0[step], r1[step]]).tolist()))
        assert union == sorted(map(tuple, one[step].tolist())), f"step {step}: the ranks' sequences differ"


@pytest.mark.parametrize("method", ["lost", "sltrain"])
def test_ddp_on_two_ranks_matches_one_process_with_the_same_global_batch(aligned, tmp_path, method):
    single = run_script(aligned_args(aligned, tmp_path / "one", 8, "--method", method, "--steps", "6"))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_script(aligned_args(aligned, tmp_path / "ddp", 4, "--method", method, "--steps", "6", "--parallel", "ddp"),
                     torchrun_procs=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (one, one_eval), (two, two_eval) = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "ddp")
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    torch.testing.assert_close([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two_eval[-1]["val_loss"], one_eval[-1]["val_loss"], rtol=1e-5, atol=1e-5)


def test_fsdp2_on_two_ranks_trains_and_resumes(aligned, tmp_path):
    args = ["--method", "sltrain", "--steps", "8", "--save-every", "4", "--parallel", "fsdp"]
    whole = run_script(aligned_args(aligned, tmp_path / "whole", 4, *args), torchrun_procs=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    losses = [r["loss"] for r in read_metrics(tmp_path / "whole")[0]]
    # sharded, the two ranks' gradients reduced: the same losses as one process with the same global batch
    single = run_script(aligned_args(aligned, tmp_path / "one", 8, "--method", "sltrain", "--steps", "8"))
    assert single.returncode == 0, single.stderr[-3000:]
    torch.testing.assert_close(losses, [r["loss"] for r in read_metrics(tmp_path / "one")[0]], rtol=1e-5, atol=1e-5)
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_val_ppl"] < summary["initial_val_ppl"]
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_00000008"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors", "state_rank0.pt", "state_rank1.pt", "tokenizer"]

    killed = run_script(aligned_args(aligned, tmp_path / "resumed", 4, *args, "--kill-after-step", "6"), torchrun_procs=2)
    assert killed.returncode != 0
    resumed = run_script(aligned_args(aligned, tmp_path / "resumed", 4, *args, "--resume", "auto"), torchrun_procs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout
    again = [r["loss"] for r in read_metrics(tmp_path / "resumed")[0]]
    torch.testing.assert_close(again, losses, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], r"--seed must lie in \[0, 2\*\*32\); got -1"),
    (["--out", "FILE/sub"], r"--out '.*FILE/sub' cannot be written to \(Not a directory\)"),
])
def test_bad_seed_or_out_is_one_error_line(flags, message, corpus, tmp_path, capsys, restore_torch_globals):
    (tmp_path / "FILE").write_text("")
    flags = [str(tmp_path / f) if f.startswith("FILE") else f for f in flags]
    args = common(corpus, tmp_path / "out", "--steps", "1")
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(args + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err) and "Traceback" not in err, err


@pytest.mark.slow
def test_compile_trains_as_eager_does(corpus, tmp_path, restore_torch_globals):
    import torch._dynamo

    runs = {}
    for mode in ("eager", "compiled"):
        out = tmp_path / mode
        pretrain.main(common(corpus, out, "--method", "sltrain", "--steps", "3", *(["--compile"] if mode == "compiled" else [])))
        runs[mode] = [r["loss"] for r in read_metrics(out)[0]]
        torch._dynamo.reset()
    torch.testing.assert_close(runs["compiled"], runs["eager"], rtol=1e-4, atol=1e-4)
