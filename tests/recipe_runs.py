"""What the recipe tests share: a tiny LLaMA config, small corpora written here, and ways to run the recipe
(``pretrain.main`` in this process, or a subprocess, or ``torchrun``)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes import plot

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
                   str(torchrun_procs), "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT)]
    else:
        command = [sys.executable, str(SCRIPT)]
    return subprocess.run(command + list(args), env=environment, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


