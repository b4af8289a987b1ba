"""recipes/data/: packing, order, sharding, held-out split, formats, resume, caching, errors, fail-fast.

Every corpus here is a few dozen synthetic documents written into tmp_path; nothing is downloaded.
"""

import doctest
import json
import random
import time

import pytest
import torch


from recipes import data as rd
from recipes.data import DataConfig, HubUnreachableError, build_data

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
         "under bright northern lights and every river runs toward its distant sea").split()


def make_documents(n=30, seed=0):
    """``n`` distinct documents of 3 to 150 words, each starting with its own marker ``docNN``."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 150))]
        lines = [" ".join(words[j:j + 12]) for j in range(0, len(words), 12)]
        docs.append(f"doc{i:02d} " + "\n".join(lines) + ".")
    return docs


def write_txt(directory, docs):
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return str(directory / "*.txt")


def write_jsonl(path, docs, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return str(path)


def write_jsonl_shards(directory, docs, shards):
    for k in range(shards):
        write_jsonl(directory / f"part-{k}.jsonl", docs[k::shards])
    return str(directory / "part-*.jsonl")


def write_parquet(path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), str(path), row_group_size=7)
    return str(path)


@pytest.fixture(autouse=True)
def small_tokenization_groups(monkeypatch):
    """Tokenize a few documents at a time (not 256): group boundaries get exercised, tiny corpora stay fast."""
    monkeypatch.setattr(rd.tokenizer, "TOKENIZE_GROUP_DOCS", 5)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A small byte-level BPE (``<|endoftext|>`` = 0, ``<|pad|>`` = 1) trained here with ``tokenizers`` directly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(make_documents(40, seed=123), trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def reference_stream(tokenizer_file, docs):
    """Independent packing: each document tokenized alone, followed by EOS, all joined."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_file)
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = []
    for doc in docs:
        ids += tokenizer.encode(doc, add_special_tokens=False).ids + [eos]
    return torch.tensor(ids)


def config(tmp_path, **overrides):
    base = dict(seq_len=16, batch_size=4, valid_tokens=128, cache_dir=str(tmp_path / "cache"), shuffle_buffer=4)
    return DataConfig(**{**base, **overrides})


def take(stream, n):
    return [next(stream) for _ in range(n)]


def epoch_documents(data, rank, world_size, epoch=0):
    """The texts one rank reads in one epoch (through the stream's own document iterator)."""
    texts = []
    for (e, _, _), text, _ in data.train._documents.train_documents(rd._Position(epoch=epoch), rank, world_size):
        if e != epoch:
            break
        texts.append(text)
    return texts


# --- packing ------------------------------------------------------------------------------------------------


def test_packing_matches_an_independent_reference_across_epochs(tmp_path, tokenizer_file):
    docs, valid = make_documents(12), make_documents(5, seed=9)
    data = build_data(config(tmp_path, data_files=write_jsonl(tmp_path / "train.jsonl", docs),
                             valid_files=write_jsonl(tmp_path / "valid.jsonl", valid),
                             tokenizer=tokenizer_file, shuffle=False))
    reference = reference_stream(tokenizer_file, docs)
    per_batch = 4 * 16
    n = 2 * len(reference) // per_batch + 1  # past the end of the first epoch: the second starts mid-sequence
    got = torch.cat([b.flatten() for b in take(data.train, n)])
    assert torch.equal(got, torch.cat([reference] * 3)[: n * per_batch])
    assert all(b.shape == (4, 16) and b.dtype == torch.long for b in take(data.train, 2))

    valid_reference = reference_stream(tokenizer_file, valid)[:128]
    assert torch.equal(torch.cat([b.flatten() for b in data.valid_batches()]), valid_reference)
    assert len(data.valid_batches(max_batches=1)) == 1
    assert data.eos_token_id == 0 and data.vocab_size == len(data.tokenizer) == 400


def test_held_out_split_is_the_head_of_the_corpus_and_never_trained_on(tmp_path, tokenizer_file):
    docs = make_documents(20)
    reference = reference_stream(tokenizer_file, docs)
    data = build_data(config(tmp_path, data_files=write_txt(tmp_path / "train", docs), tokenizer=tokenizer_file,
                             shuffle=False, valid_tokens=200))
    valid = torch.cat([b.flatten() for b in data.valid_batches()])
    assert torch.equal(valid, reference[:192])  # 200 held out; whole batches of 64 are used
    train = torch.cat([b.flatten() for b in take(data.train, 3)])
    assert torch.equal(train, reference[200:200 + 3 * 64])  # training starts right after the held-out tokens

    # With shuffling, the documents wholly inside the held-out head never reach any rank.
    shuffled = build_data(config(tmp_path, data_files=write_txt(tmp_path / "train", docs), tokenizer=tokenizer_file,
                                 valid_tokens=200))
    cut_shard, cut_doc, cut_token = shuffled.train._documents.holdout
    held_out = docs[:cut_shard]  # one document per .txt file: shards before the cut are held out whole
    seen = epoch_documents(shuffled, 0, 2) + epoch_documents(shuffled, 1, 2)
    assert sorted(seen) == sorted(docs[cut_shard:]) and not set(held_out) & set(seen)
    assert 0 < cut_token


# --- order, determinism, ranks ------------------------------------------------------------------------------


def test_same_seed_same_batches_different_seed_different_order(tmp_path, tokenizer_file):
    files = write_jsonl_shards(tmp_path / "train", make_documents(30), shards=3)
    build = lambda seed: build_data(config(tmp_path, data_files=files, tokenizer=tokenizer_file, seed=seed))
    a, b, c = take(build(0).train, 6), take(build(0).train, 6), take(build(1).train, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.stack(a), torch.stack(c))
    # a new epoch is a new order
    data = build(0)
    assert epoch_documents(data, 0, 1, epoch=0) != epoch_documents(data, 0, 1, epoch=1)
    assert sorted(epoch_documents(data, 0, 1, epoch=0)) == sorted(epoch_documents(data, 0, 1, epoch=1))


@pytest.mark.parametrize("shards", [3, 4])  # 3: documents go to ranks; 4 (divisible by 2): whole shards do
def test_ranks_read_disjoint_shards_that_cover_the_corpus(tmp_path, tokenizer_file, shards):
    docs, valid = make_documents(25), make_documents(4, seed=5)
    files = write_jsonl_shards(tmp_path / "train", docs, shards=shards)
    valid_files = write_jsonl(tmp_path / "valid.jsonl", valid)
    ranks = [build_data(config(tmp_path, data_files=files, valid_files=valid_files, tokenizer=tokenizer_file,
                               rank=r, world_size=2)) for r in range(2)]
    seen = [epoch_documents(data, r, 2) for r, data in enumerate(ranks)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(docs)
    if shards == 4:  # each rank read two whole files
        files_of_rank0 = [k for k in range(4) if set(docs[k::4]) <= set(seen[0])]
        assert len(files_of_rank0) == 2 and sorted(seen[0]) == sorted(sum((docs[k::4] for k in files_of_rank0), []))
    assert abs(len(seen[0]) - len(seen[1])) <= 7
    # each rank's first batch is cut from its own documents, and the two differ
    for r, data in enumerate(ranks):
        text = data.tokenizer.decode(next(data.train).flatten().tolist())
        first = text.split("<|endoftext|>")[0]
        assert first in seen[r][0]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0].valid_batches(), ranks[1].valid_batches()))


def test_a_rank_without_documents_is_an_error(tmp_path, tokenizer_file):
    data = build_data(config(tmp_path, data_files=write_jsonl(tmp_path / "t.jsonl", make_documents(3)),
                             valid_files=write_jsonl(tmp_path / "v.jsonl", make_documents(3, seed=1)),
                             tokenizer=tokenizer_file, rank=4, world_size=5))
    with pytest.raises(ValueError, match="rank 4 of world_size=5 gets no training documents"):
        next(data.train)


# --- formats ------------------------------------------------------------------------------------------------


def test_txt_jsonl_and_parquet_give_the_same_tokens(tmp_path, tokenizer_file):
    docs = make_documents(10)
    sources = {"txt": write_txt(tmp_path / "txt", docs), "jsonl": write_jsonl(tmp_path / "j" / "d.jsonl", docs),
               "parquet": write_parquet(tmp_path / "p" / "d.parquet", docs)}
    streams, valids = {}, {}
    for name, files in sources.items():
        data = build_data(config(tmp_path, data_files=files, tokenizer=tokenizer_file, shuffle=False, valid_tokens=64))
        streams[name] = torch.stack(take(data.train, 5))
        valids[name] = torch.stack(data.valid_batches())
    assert torch.equal(streams["txt"], streams["jsonl"]) and torch.equal(streams["txt"], streams["parquet"])
    assert torch.equal(valids["txt"], valids["jsonl"]) and torch.equal(valids["txt"], valids["parquet"])


def test_directories_and_comma_separated_globs(tmp_path, tokenizer_file):
    docs = make_documents(8)
    write_txt(tmp_path / "a", docs[:4])
    (tmp_path / "b").mkdir()
    for i, doc in enumerate(docs[4:]):
        (tmp_path / "b" / f"x{i}.txt").write_text(doc)
    files = rd._resolve_files("data_files", f"{tmp_path / 'a'}, {tmp_path / 'b' / '*.txt'}")
    assert len(files) == 8 and files == sorted(files)


# --- resume -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size,rank,shards", [(1, 0, 3), (2, 1, 3), (2, 0, 4)])
def test_resume_yields_exactly_the_uninterrupted_batches(tmp_path, tokenizer_file, world_size, rank, shards):
    docs = make_documents(14)
    cfg = config(tmp_path, data_files=write_jsonl_shards(tmp_path / "train", docs, shards=shards),
                 tokenizer=tokenizer_file,
                 rank=rank, world_size=world_size, seq_len=32)
    uninterrupted = take(build_data(cfg).train, 12)  # over an epoch boundary at world_size 1
    for k in (3, 5, 8):
        first = build_data(cfg)
        assert all(torch.equal(a, b) for a, b in zip(take(first.train, k), uninterrupted))
        state = json.loads(json.dumps(first.train.state_dict()))
        resumed = build_data(cfg)
        resumed.train.load_state_dict(state)
        rest = take(resumed.train, 12 - k)
        assert all(torch.equal(a, b) for a, b in zip(rest, uninterrupted[k:])), f"resume after {k} batches"

    # the state also survives torch.save / torch.load(weights_only=True), and reloading in place works
    first = build_data(cfg)
    take(first.train, 7)
    path = tmp_path / "state.pt"
    torch.save(first.train.state_dict(), path)
    first.train.load_state_dict(torch.load(path, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(take(first.train, 4), uninterrupted[7:11]))
    assert first.train.state_dict()["batches"] == 11


def test_resume_with_seven_batches_three_plus_four(tmp_path, tokenizer_file):
    """The brief's check: 7 uninterrupted == 3, save (json), fresh build, load, 4 more."""
    cfg = config(tmp_path, data_files=write_txt(tmp_path / "train", make_documents(16)), tokenizer=tokenizer_file)
    seven = take(build_data(cfg).train, 7)
    data = build_data(cfg)
    three = take(data.train, 3)
    state = json.loads(json.dumps(data.train.state_dict()))
    fresh = build_data(cfg)
    fresh.train.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(three + take(fresh.train, 4), seven))


def test_resume_refuses_a_state_from_other_data_or_ranks(tmp_path, tokenizer_file):
    cfg = config(tmp_path, data_files=write_txt(tmp_path / "train", make_documents(10)), tokenizer=tokenizer_file)
    data = build_data(cfg)
    next(data.train)
    state = data.train.state_dict()
    with pytest.raises(ValueError, match="world_size: saved 1, now 2"):
        build_data(DataConfig(**{**cfg.__dict__, "world_size": 2})).train.load_state_dict(state)
    with pytest.raises(ValueError, match="data: saved"):
        build_data(DataConfig(**{**cfg.__dict__, "shuffle": False})).train.load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        data.train.load_state_dict({"epoch": 0})


# --- tokenizer ----------------------------------------------------------------------------------------------


def test_trained_tokenizer_is_cached_and_reused(tmp_path, monkeypatch):
    docs = make_documents(20)
    files = write_txt(tmp_path / "train", docs)
    cfg = config(tmp_path, data_files=files, vocab_size=300)
    first = build_data(cfg)
    (directory,) = (tmp_path / "cache" / "tokenizers").glob("bpe300-*[!k]")
    assert first.tokenizer_path == str(directory) and (directory / "tokenizer.json").is_file()
    assert first.tokenizer.eos_token == "<|endoftext|>" and first.tokenizer.pad_token == "<|pad|>"
    assert first.vocab_size == 300
    stamp = (directory / "tokenizer.json").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(rd.tokenizer, "_train_bpe", no_training)
    second = build_data(cfg)
    assert second.tokenizer_path == first.tokenizer_path
    assert (directory / "tokenizer.json").stat().st_mtime_ns == stamp
    assert second.tokenizer(docs[3]).input_ids == first.tokenizer(docs[3]).input_ids
    assert all(torch.equal(a, b) for a, b in zip(take(first.train, 3), take(second.train, 3)))

    # another corpus (or vocab_size) trains another tokenizer
    monkeypatch.undo()
    (tmp_path / "train" / "doc00.txt").write_text(docs[0] + " and one more sentence")
    third = build_data(cfg)
    assert third.tokenizer_path != first.tokenizer_path
    assert build_data(config(tmp_path, data_files=files, vocab_size=280)).vocab_size == 280


def test_tokenizer_directory_can_be_passed_back(tmp_path, tokenizer_file):
    files = write_txt(tmp_path / "t", make_documents(8))
    data = build_data(config(tmp_path, data_files=files, tokenizer=tokenizer_file))
    data.tokenizer.save_pretrained(str(tmp_path / "saved"))
    again = build_data(config(tmp_path, data_files=files, tokenizer=str(tmp_path / "saved")))
    assert again.eos_token_id == data.eos_token_id
    assert all(torch.equal(a, b) for a, b in zip(take(data.train, 2), take(again.train, 2)))


# --- C4 and the hub -----------------------------------------------------------------------------------------


def test_c4_fails_fast_and_clearly_when_the_hub_is_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="unreachable.*HF_HUB_OFFLINE is set.*--data-files") as info:
        build_data(DataConfig(dataset="c4", cache_dir=str(tmp_path)))
    assert time.perf_counter() - started < 10
    assert isinstance(info.value, RuntimeError) and "offline default" in str(info.value)


def test_c4_fails_fast_when_the_hub_does_not_answer(tmp_path, monkeypatch):
    import urllib.error

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def no_network(request, timeout):
        calls.append(timeout)
        raise urllib.error.URLError("timed out")

    monkeypatch.setattr(rd.hub.urllib.request, "urlopen", no_network)
    with pytest.raises(HubUnreachableError, match="no answer from .* within 5 s"):
        build_data(DataConfig(dataset="c4", cache_dir=str(tmp_path)))
    assert calls == [5.0]


def test_c4_goes_through_the_same_streaming_path_as_local_files(tmp_path, monkeypatch, tokenizer_file):
    """With the hub replaced by local jsonl shards, dataset='c4' gives the same batches as data_files."""
    import datasets

    docs, valid = make_documents(20), make_documents(6, seed=4)
    train_files = write_jsonl_shards(tmp_path / "c4" / "train", docs, shards=2)
    valid_files = write_jsonl(tmp_path / "c4" / "valid.jsonl", valid)
    real = datasets.load_dataset
    opened = []

    def fake_hub(path, name=None, split=None, streaming=False, **kwargs):
        if path != "allenai/c4":
            return real(path, split=split, streaming=streaming, **kwargs)
        opened.append((path, name, split, streaming))
        files = sorted(map(str, (tmp_path / "c4" / "train").glob("*.jsonl"))) if split == "train" else [valid_files]
        return real("json", data_files=files, split="train", streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    monkeypatch.setattr(rd, "_require_hub", lambda what: None)
    c4 = build_data(config(tmp_path, dataset="c4", tokenizer=tokenizer_file))
    assert opened == [("allenai/c4", "en", "train", True), ("allenai/c4", "en", "validation", True)]
    local = build_data(config(tmp_path, data_files=train_files, valid_files=valid_files, tokenizer=tokenizer_file))
    assert all(torch.equal(a, b) for a, b in zip(take(c4.train, 5), take(local.train, 5)))
    assert all(torch.equal(a, b) for a, b in zip(c4.valid_batches(), local.valid_batches()))


def test_hub_tokenizer_name_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="tokenizer='gpt2'"):
        build_data(config(tmp_path, data_files=write_txt(tmp_path / "t", make_documents(5)), tokenizer="gpt2"))


# --- the offline default ------------------------------------------------------------------------------------


def test_offline_default_builds_from_the_standard_library(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), offline_max_files=40, vocab_size=512, seq_len=32,
                     batch_size=2, valid_tokens=256)
    data = build_data(cfg)
    batches = take(data.train, 3)
    assert all(b.shape == (2, 32) and int(b.max()) < data.vocab_size for b in batches)
    assert len(data.valid_batches()) == 4
    (corpus,) = (tmp_path / "cache").glob("stdlib-docs-*[!k]")
    records = [json.loads(line) for line in (corpus / "valid.jsonl").read_text().splitlines()]
    assert records and all(r["text"] and r["module"].endswith(".py") for r in records)
    train_text = "".join(p.read_text() for p in corpus.glob("train-*.jsonl"))
    assert all(json.dumps(r["text"]) not in train_text for r in records)  # validation modules are not trained on
    again = build_data(cfg)  # cached: same files, same tokenizer, same batches
    assert all(torch.equal(a, b) for a, b in zip(take(again.train, 3), batches))


def test_module_text_keeps_docstrings_and_comments_in_order(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n"""Module doc."""\n\n# A comment block\n'
                    '# over two lines.\nclass C:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n'
                    '        return 1  # not a whole-line comment\n')
    assert rd.module_text(path) == "Module doc.\n\nA comment block over two lines.\n\nClass doc.\n\nMethod doc."
    (tmp_path / "bad.py").write_text("def (:\n")
    assert rd.module_text(tmp_path / "bad.py") == ""


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (dict(seq_len=0), "seq_len must be an int >= 1; got seq_len=0"),
    (dict(batch_size=0), "batch_size must be an int >= 1; got batch_size=0"),
    (dict(rank=2, world_size=2), r"rank must be an int in \[0, world_size=2\); got rank=2"),
    (dict(rank=-1), r"rank must be an int in \[0, world_size=1\); got rank=-1"),
    (dict(dataset="c4", data_files="x.txt"), "either dataset or data_files, not both"),
    (dict(dataset="pile"), "dataset='pile' is not known; valid: 'c4'"),
    (dict(valid_files="v.txt"), "valid_files='v.txt' needs data_files"),
    (dict(valid_tokens=-1), "valid_tokens must be an int >= 0"),
    (dict(vocab_size=100), "vocab_size must be >= 258"),
])
def test_bad_config_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_data(config(tmp_path, **overrides))


def test_bad_files(tmp_path, tokenizer_file):
    docs = make_documents(6)
    with pytest.raises(ValueError, match=r"data_files='.*nothing/\*\.txt': .* matches no file"):
        build_data(config(tmp_path, data_files=str(tmp_path / "nothing" / "*.txt")))
    no_text = r"record 0 of .*notext\.jsonl has no string field 'text' \(fields: body, id\)"
    with pytest.raises(ValueError, match=no_text):
        build_data(config(tmp_path, data_files=write_jsonl(tmp_path / "notext.jsonl", docs, field="body")))
    write_txt(tmp_path / "mixed", docs[:2])
    write_jsonl(tmp_path / "mixed" / "x.jsonl", docs[2:])
    with pytest.raises(ValueError, match="mixes file formats"):
        build_data(config(tmp_path, data_files=str(tmp_path / "mixed")))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x\.csv' is not a supported file; valid: .*\.jsonl"):
        build_data(config(tmp_path, data_files=str(tmp_path / "x.csv")))
    small = write_txt(tmp_path / "small", docs[:2])
    with pytest.raises(ValueError, match="nothing is left to train on"):
        build_data(config(tmp_path, data_files=small, tokenizer=tokenizer_file, valid_tokens=100_000))
    with pytest.raises(ValueError, match="less than one batch"):
        build_data(config(tmp_path, data_files=small, tokenizer=tokenizer_file, valid_tokens=10))
    with pytest.raises(ValueError, match="share 2 file"):
        build_data(config(tmp_path, data_files=small, valid_files=small, tokenizer=tokenizer_file))
    with pytest.raises(ValueError, match="neither an existing file or directory nor a hub name"):
        build_data(config(tmp_path, data_files=small, tokenizer="./no/such/tokenizer"))


def test_docstring_examples_run():
    for module in (rd, rd.cache, rd.config, rd.corpus, rd.hub, rd.sources, rd.stream, rd.tokenizer):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, module.__name__
