"""recipes/pretrain.py end to end, on tiny models and small corpora generated here.

Single-process runs call ``pretrain.main`` in this process where they can (imports are the slow part on
2 cores); the SIGKILL resume test and the multi-process tests run real subprocesses (``torchrun`` for
DDP and FSDP2 on gloo).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from recipes import plot, pretrain
from recipes.checkpoint import model_from_checkpoint
from lsparam.presets import size_of
from recipes.flags import build_parser, check_args, method_settings, parse_size
from recipes.summary import parameters_by_kind

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "recipes" / "pretrain.py"
TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
            rms_norm_eps=1e-6, tie_word_embeddings=False, vocab_size=32000)
SEQ = 32




# ---- corpora and configs ------------------------------------------------------------------------------
WORDS = ("the cat dog bird sat ran flew on under over a mat tree roof quickly slowly and then "
         "it was red blue green big small happy sad").split()


def _sentence(rng: random.Random) -> str:
    return (f"the {rng.choice(['cat', 'dog', 'bird'])} {rng.choice(['sat', 'ran', 'flew'])} "
            f"{rng.choice(['on', 'under', 'over'])} the {rng.choice(['mat', 'tree', 'roof'])} "
            f"{rng.choice(['quickly', 'slowly'])} and it was {rng.choice(['red', 'blue', 'green'])}.")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small English-like text corpus: 8 training files, 2 validation files; a shared tokenizer cache."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for split, files, sentences in (("train", 8, 300), ("valid", 2, 60)):
        (root / split).mkdir()
        for i in range(files):
            (root / split / f"{i:02d}.txt").write_text(" ".join(_sentence(rng) for _ in range(sentences)))
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    return {"root": root, "config": str(config), "train": str(root / "train" / "*.txt"),
            "valid": str(root / "valid" / "*.txt"), "cache": str(root / "cache")}


def common(corpus, out, *extra) -> list[str]:
    return ["--model", corpus["config"], "--data-files", corpus["train"], "--valid-files", corpus["valid"],
            "--vocab-size", "400", "--seq-len", str(SEQ), "--batch-size", "4", "--valid-tokens", "512",
            "--cache-dir", corpus["cache"], "--threads", "1", "--eval-every", "0", "--out", str(out), *extra]


@pytest.fixture
def restore_torch_globals():
    """main() sets deterministic algorithms and the thread count for the process: put them back."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


def read_metrics(out) -> tuple[list[dict], list[dict]]:
    return plot.read_metrics(out)


def run_script(args, *, env=None, timeout=180, torchrun_procs=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if torchrun_procs:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
                   str(torchrun_procs), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT)]
    else:
        command = [sys.executable, str(SCRIPT)]
    return subprocess.run(command + list(args), env=environment, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- single process -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["full", "lowrank", "sltrain", "lost", "lost-silu"])
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


def test_sigkill_and_resume_reproduce_the_uninterrupted_losses(corpus, tmp_path):
    args = ["--method", "sltrain", "--steps", "12", "--save-every", "4", "--eval-every", "6", "--eval-batches", "2"]
    whole = run_script(common(corpus, tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_script(common(corpus, tmp_path / "killed", *args, "--kill-after-step", "10"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000004", "step_00000008"]  # steps 9 and 10 were logged, then lost
    assert [r["step"] for r in read_metrics(tmp_path / "killed")[0]][-1] == 10
    resumed = run_script(common(corpus, tmp_path / "killed", *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 8" in resumed.stdout
    (train_a, eval_a), (train_b, eval_b) = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in train_b] == list(range(1, 13))
    assert [r["loss"] for r in train_b] == [r["loss"] for r in train_a]  # bit for bit
    assert [r["lr"] for r in train_b] == [r["lr"] for r in train_a]
    assert [(r["step"], r["val_loss"]) for r in eval_b] == [(r["step"], r["val_loss"]) for r in eval_a]


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


def test_choices_come_from_the_library():
    from lsparam.config import SPARSE_BACKENDS
    from lsparam.presets import METHODS

    actions = {a.dest: a for a in build_parser()._actions}
    assert tuple(actions["method"].choices) == (*METHODS, "galore")
    assert tuple(actions["sparse_backend"].choices) == SPARSE_BACKENDS and "gather" in SPARSE_BACKENDS


@pytest.mark.parametrize("backend", ["gather", "auto"])
def test_sparse_backend_gather_is_accepted_and_reaches_the_layers(backend):
    """``--sparse-backend gather`` (what ``auto`` picks on CPU, and documented) used to be refused by argparse."""
    import lsparam
    from transformers import LlamaConfig

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
    import lsparam
    from transformers import LlamaConfig, LlamaForCausalLM

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
@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """Documents of exactly SEQ tokens (SEQ - 1 words + EOS) under a word-level tokenizer, 4 per shard.

    Every training sequence is then one whole document and every shard one 4-sequence batch, so two ranks
    of batch 4 see, together, exactly the 8 sequences that one process of batch 8 sees at each step
    (whether recipes/data deals whole shards or single documents to the ranks).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("aligned")
    vocab = [f"w{i}" for i in range(48)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<|endoftext|>", "<|pad|>", "<unk>", *vocab])},
                                           unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(root / "tokenizer.json"))
    rng = random.Random(0)

    def document() -> str:  # an arithmetic progression mod 48: learnable from the two previous words
        start, stride = rng.randrange(48), rng.choice([1, 2, 3, 5])
        return " ".join(vocab[(start + k * stride) % 48] for k in range(SEQ - 1))

    for split, shards in (("train", 16), ("valid", 2)):
        (root / split).mkdir()
        for i in range(shards):
            (root / split / f"{i:02d}.jsonl").write_text("".join(json.dumps({"text": document()}) + "\n" for _ in range(4)))
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    return {"config": str(config), "train": str(root / "train" / "*.jsonl"), "valid": str(root / "valid" / "*.jsonl"),
            "tokenizer": str(root / "tokenizer.json"), "cache": str(root / "cache")}


def aligned_args(aligned, out, batch_size, *extra) -> list[str]:
    return ["--model", aligned["config"], "--data-files", aligned["train"], "--valid-files", aligned["valid"],
            "--tokenizer", aligned["tokenizer"], "--seq-len", str(SEQ), "--batch-size", str(batch_size),
            "--valid-tokens", str(8 * SEQ), "--cache-dir", aligned["cache"], "--threads", "1", "--eval-every", "0",
            "--lr", "1e-2", "--out", str(out), *extra]


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


def test_ddp_on_two_ranks_matches_one_process_with_the_same_global_batch(aligned, tmp_path):
    single = run_script(aligned_args(aligned, tmp_path / "one", 8, "--method", "lost", "--steps", "6"))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_script(aligned_args(aligned, tmp_path / "ddp", 4, "--method", "lost", "--steps", "6", "--parallel", "ddp"),
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
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.5, losses
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


# ---- divergence and resume with new settings ----------------------------------------------------------


def test_a_diverging_run_stops_and_never_checkpoints_non_finite_state(corpus, tmp_path, capsys, restore_torch_globals):
    from safetensors.torch import load_file

    out = tmp_path / "diverge"
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(common(corpus, out, "--method", "sltrain", "--steps", "6", "--save-every", "1", "--lr", "1e20"))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "stopped at step" in err and "nothing was saved for this step" in err and "--resume" in err
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert saved, "the first step's checkpoint should exist"
    for path in saved:
        weights = load_file(str(path / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), path
        state = torch.load(path / "state_rank0.pt", weights_only=True)["optimizer"]
        tensors = [t for inner in state["inner"] for s in inner["state"].values() for t in s.values()
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
        assert all(torch.isfinite(t).all() for t in tensors), path
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_resume_takes_the_new_learning_rate_and_weight_decay(corpus, tmp_path, restore_torch_globals):
    """The optimizer's saved groups used to win over the new flags, while the banner showed the new ones."""
    first = tmp_path / "first"
    pretrain.main(common(corpus, first, "--method", "lost", "--steps", "2", "--lr", "1e-3", "--weight-decay", "0"))
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(first, resumed)
    new = ("--lr", "5e-4", "--weight-decay", "0.1")
    pretrain.main(common(corpus, resumed, "--method", "lost", "--steps", "4", "--resume", "auto", *new))
    reference = tmp_path / "reference"  # the same schedule from the start: the learning rates to expect
    pretrain.main(common(corpus, reference, "--method", "lost", "--steps", "4", *new))
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert {"type": "resume", "step": 2, "changed": {"lr": [1e-3, 5e-4], "weight_decay": [0.0, 0.1]}} in records
    lrs = {r["step"]: r["lr"] for r in records if r["type"] == "train"}
    expected = {r["step"]: r["lr"] for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
                if r["type"] == "train"}
    assert lrs[3] == pytest.approx(expected[3]) and lrs[4] == pytest.approx(expected[4])
    state = torch.load(resumed / "checkpoints" / "step_00000004" / "state_rank0.pt", weights_only=True)["optimizer"]
    decays = {group["weight_decay"] for inner in state["inner"] for group in inner["param_groups"]}
    assert decays == {0.1, 0.0}  # factors and weights decay at the new rate; norms and biases never do


def test_resume_with_other_parameter_groups_is_an_error_line(corpus, tmp_path, capsys, restore_torch_globals):
    out = tmp_path / "groups"
    pretrain.main(common(corpus, out, "--method", "lost", "--steps", "2"))
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(common(corpus, out, "--method", "lost", "--steps", "3", "--resume", "auto", "--linear-lr-scale", "0.5"))
    assert exit_info.value.code == 2
    assert "resume with --linear-lr-scale 1" in capsys.readouterr().err


# ---- damaged files -------------------------------------------------------------------------------------


def test_a_torn_metrics_line_and_a_finished_run_resume_cleanly(corpus, tmp_path, capsys, restore_torch_globals):
    out = tmp_path / "torn"
    pretrain.main(common(corpus, out, "--method", "lost", "--steps", "2", "--save-every", "1"))
    # a finished run resumed logs nothing twice
    pretrain.main(common(corpus, out, "--method", "lost", "--steps", "2", "--resume", "auto"))
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]
    # a line cut short (disk full, or a kill mid-write) costs that line only
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')
    capsys.readouterr()
    pretrain.main(common(corpus, out, "--method", "lost", "--steps", "3", "--resume", "auto"))
    assert "was cut short" in capsys.readouterr().err
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [0, 2, 3]
    assert not (out / ".metrics.jsonl.tmp").exists()


@pytest.mark.parametrize("damage", ["truncated weights", "empty state", "missing state"])
def test_resume_auto_passes_over_a_damaged_newest_checkpoint(damage, corpus, tmp_path, capsys, restore_torch_globals):
    out = tmp_path / "damaged"
    pretrain.main(common(corpus, out, "--method", "sltrain", "--steps", "3", "--save-every", "1", "--keep", "3"))
    newest = out / "checkpoints" / "step_00000003"
    if damage == "truncated weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "empty state":
        (newest / "state_rank0.pt").write_bytes(b"")
    else:
        (newest / "state_rank0.pt").unlink()
    capsys.readouterr()
    pretrain.main(common(corpus, out, "--method", "sltrain", "--steps", "4", "--resume", "auto", "--keep", "3",
                         "--save-every", "1"))
    captured = capsys.readouterr()
    assert f"checkpoint {newest} is damaged" in captured.err and "weights_only=False" not in captured.err
    assert "resumed from" in captured.out and "step_00000002 at step 2" in captured.out
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())  # no temporary or half-deleted folders
    assert kept == ["step_00000002", "step_00000003", "step_00000004"]
    from recipes.checkpoint import damage

    assert all(damage(out / "checkpoints" / name) is None for name in kept)  # the damaged one was rewritten


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
