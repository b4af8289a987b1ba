"""``lsparam.hf``: LeanOptimizer inside ``transformers.Trainer``, checkpoints, resume, dense export.

Every Trainer run here trains a 2-layer, d=64 LLaMA for a handful of steps on a tiny in-memory dataset, on
CPU, in about a second.
"""

import json
import os

import pytest
import torch

import lsparam
import lsparam.hf

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

torch.set_num_threads(1)

LOST = lsparam.LOSTConfig(rank=8, channel_ratio=0.05)
SLTRAIN = lsparam.SLTrainConfig(rank=8, density=0.05)


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, **overrides)
    return LlamaForCausalLM(config).eval()


def dataset(n=16, length=16):
    """``n`` sequences that count up from a start token (mod 128): learnable in a few steps."""
    starts = torch.arange(n) * 7
    ids = (starts[:, None] + torch.arange(length)[None, :]) % 128
    return [{"input_ids": row, "labels": row} for row in ids]


def mean_loss(model, data):
    model.eval()
    with torch.no_grad():
        ids = torch.stack([d["input_ids"] for d in data])
        return model(input_ids=ids, labels=ids).loss.item()


def training_args(out, **overrides):
    options = dict(
        output_dir=str(out),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        max_steps=6,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        optim="adamw_torch",  # the plain runs: torch.optim.AdamW (not the fused CPU kernel)
    )
    options.update(overrides)
    return TrainingArguments(**options)


def params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_params(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), (name, (got[name] - expected[name]).abs().max().item())


def parametrized(config, seed=0):
    return lsparam.parametrize(tiny_llama(seed), config)


# ---- training, checkpoints and exact resume ----------------------------------------------------------


@pytest.mark.parametrize(
    "config, per_layer, accumulation",
    [(LOST, False, 1), (SLTRAIN, True, 2)],
    ids=["lost-global", "sltrain-per_layer-accumulate2"],
)
def test_trainer_trains_and_resumes_to_the_same_parameters(tmp_path, config, per_layer, accumulation):
    data = dataset()
    max_grad_norm = 0.0 if per_layer else 1.0
    clip_norm = 1.0 if per_layer else None

    # Uninterrupted: 6 steps, saving a checkpoint every 3.
    model = parametrized(config, seed=0)
    before = mean_loss(model, data)
    args = training_args(tmp_path / "a", save_strategy="steps", save_steps=3, gradient_accumulation_steps=accumulation,
                         max_grad_norm=max_grad_norm)
    opt = lsparam.hf.lean_optimizer(model, args, per_layer=per_layer, clip_norm=clip_norm)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                      callbacks=[lsparam.hf.LsparamCallback()])
    trainer.train()
    assert mean_loss(model, data) < before - 0.1  # it learns
    final = params(model)

    checkpoint = tmp_path / "a" / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "config.json", "lsparam_config.json"} <= files
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # plain tensors only
    assert optimizer_state["settings"]["per_layer"] is per_layer
    groups = json.loads((checkpoint / "lsparam_config.json").read_text())["groups"]
    assert [g["method"] for g in groups] == [config.method]

    # Interrupted: a fresh model of ANOTHER init (seed 1) resumes from step 3 of the first run. The
    # Trainer loads weights (factors, LOST channels), optimizer, scheduler and RNG states; training on
    # one CPU thread is deterministic, so the parameters match bit for bit.
    resumed = parametrized(config, seed=1)
    args = training_args(tmp_path / "b", gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm)
    opt = lsparam.hf.lean_optimizer(resumed, args, per_layer=per_layer, clip_norm=clip_norm)
    Trainer(model=resumed, args=args, train_dataset=data, optimizers=(opt, None)).train(
        resume_from_checkpoint=str(checkpoint)
    )
    assert_same_params(params(resumed), final)
    if config.method == "lost":  # the chosen channels came from the checkpoint, not the seed-1 init
        layer = resumed.model.layers[0].self_attn.q_proj.parametrizations.weight[0]
        assert torch.equal(layer.channels, model.model.layers[0].self_attn.q_proj.parametrizations.weight[0].channels)

    # The last checkpoint rebuilds into the trained model with no config given.
    restored = lsparam.hf.load_parametrized(tmp_path / "a" / "checkpoint-6")
    assert_same_params(params(restored), final)


@pytest.mark.parametrize("config", [LOST, SLTRAIN], ids=["lost", "sltrain"])
def test_trainer_with_bf16_mixed_precision_trains_float32_factors(tmp_path, config):
    """``bf16=True`` runs the model under autocast: the factorised products in bf16, the factors and the
    optimizer in float32 (these layers failed with a dtype error there)."""
    data = dataset()
    model = parametrized(config)
    before = mean_loss(model, data)
    args = training_args(tmp_path, bf16=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(lsparam.hf.lean_optimizer(model, args), None))
    trainer.train()
    assert mean_loss(model, data) < before - 0.1  # it learns
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_resume_into_a_model_with_another_config_is_refused(tmp_path):
    data = dataset()
    model = parametrized(LOST)
    args = training_args(tmp_path / "a", max_steps=1, save_strategy="steps", save_steps=1)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(lsparam.hf.lean_optimizer(model, args), None)).train()
    other = parametrized(lsparam.LOSTConfig(rank=4, channel_ratio=0.05))
    args = training_args(tmp_path / "b", max_steps=2)
    trainer = Trainer(model=other, args=args, train_dataset=data,
                      optimizers=(lsparam.hf.lean_optimizer(other, args), None))
    with pytest.raises(ValueError, match="another lsparam config: config.rank"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))


# ---- accumulation, loss scaling and clipping against plain Trainer runs ------------------------------


def plain_run(tmp_path, config, optimizer, **overrides):
    """The reference: the same model, data and args with a plain torch optimizer."""
    model = parametrized(config)
    args = training_args(tmp_path / "plain", **overrides)
    if optimizer == "sgd":  # passed explicitly: Trainer's "sgd" has no weight-decay groups to compare
        trainer = Trainer(model=model, args=args, train_dataset=dataset(20),
                          optimizers=(torch.optim.SGD(model.parameters(), lr=args.learning_rate), None))
    else:
        trainer = Trainer(model=model, args=args, train_dataset=dataset(20))  # optim="adamw_torch"
    trainer.train()
    return params(model)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_per_layer_with_accumulation_matches_a_plain_trainer_run(tmp_path, optimizer):
    # 20 sequences in micro-batches of 4 and 2 micro-batches per update: each epoch's windows are 2, 2, 1
    # micro-batches, and 6 updates cross an epoch boundary. The Trainer scales each micro-batch's loss
    # (by the window's label-token count), so per-layer updates must neither average again (SGD would
    # show it: its update scales with the gradient, unlike Adam's) nor count windows themselves.
    overrides = dict(gradient_accumulation_steps=2, max_grad_norm=0.0)
    if optimizer == "sgd":
        overrides.update(learning_rate=0.5, weight_decay=0.0)
    expected = plain_run(tmp_path, SLTRAIN, optimizer, **overrides)

    model = parametrized(SLTRAIN)
    args = training_args(tmp_path / "lean", **overrides)
    cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    opt = lsparam.hf.lean_optimizer(model, args, cls, per_layer=True)
    Trainer(model=model, args=args, train_dataset=dataset(20), optimizers=(opt, None)).train()
    # Bit for bit: each tensor's update runs the same single-tensor kernel, only earlier (inside backward).
    assert_same_params(params(model), expected)
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_cls_and_kwargs_matches_a_plain_trainer_run(tmp_path):
    # The Trainer builds the optimizer; it accumulates 2 micro-batches and clips the global norm at
    # max_grad_norm before step(). SGD: scale-sensitive, so double averaging or lost clipping would show.
    overrides = dict(gradient_accumulation_steps=2, max_grad_norm=0.05, learning_rate=0.5, weight_decay=0.0)
    expected = plain_run(tmp_path, LOST, "sgd", **overrides)

    model = parametrized(LOST)
    args = training_args(tmp_path / "lean", **overrides)
    cls_and_kwargs = lsparam.hf.optimizer_cls_and_kwargs(args, torch.optim.SGD)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(20), optimizer_cls_and_kwargs=cls_and_kwargs)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, lsparam.hf.TrainerLeanOptimizer)  # inside accelerate's wrapper
    assert_same_params(params(model), expected)


def test_lean_optimizer_takes_its_hyperparameters_from_the_training_args(tmp_path):
    model = parametrized(LOST)
    args = training_args(tmp_path, learning_rate=2e-3, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95,
                         adam_epsilon=1e-6)
    opt = lsparam.hf.lean_optimizer(model, args)
    decayed, not_decayed = opt.param_groups
    assert (decayed["lr"], decayed["weight_decay"], decayed["betas"], decayed["eps"]) == (2e-3, 0.05, (0.8, 0.95), 1e-6)
    assert not_decayed["weight_decay"] == 0.0
    assert lsparam.hf.lean_optimizer(model, args, eps=1e-5).param_groups[0]["eps"] == 1e-5  # keywords win
    sgd = lsparam.hf.lean_optimizer(model, args, torch.optim.SGD, momentum=0.9).param_groups[0]
    assert "betas" not in sgd and sgd["momentum"] == 0.9


def test_bad_combinations_are_refused(tmp_path):
    model = parametrized(LOST)
    args = training_args(tmp_path)  # max_grad_norm defaults to 1.0
    with pytest.raises(ValueError, match=r"per_layer=True with TrainingArguments.max_grad_norm=1.0.*max_grad_norm=0"):
        lsparam.hf.lean_optimizer(model, args, per_layer=True)
    with pytest.raises(ValueError, match=r"per_layer=True with TrainingArguments.max_grad_norm=1.0"):
        lsparam.hf.optimizer_cls_and_kwargs(args, per_layer=True)
    with pytest.raises(ValueError, match=r"clip_norm=1.0 with per_layer=False.*max_grad_norm"):
        lsparam.hf.lean_optimizer(model, args, clip_norm=1.0)
    with pytest.raises(TypeError, match=r"accumulation_steps=2.*gradient_accumulation_steps"):
        lsparam.hf.lean_optimizer(model, args, accumulation_steps=2)
    with pytest.raises(TypeError, match="accumulation_steps"):
        lsparam.hf.TrainerLeanOptimizer(model, torch.optim.AdamW, accumulation_steps=2)
    with pytest.raises(TypeError, match="args must be a transformers.TrainingArguments; got dict"):
        lsparam.hf.lean_optimizer(model, {"learning_rate": 1e-3})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lsparam.hf.lean_optimizer("model", args)
    with pytest.raises(ValueError, match="state_bits must be one of"):
        lsparam.hf.optimizer_cls_and_kwargs(args, state_bits=16)
    fp16 = training_args(tmp_path, fp16=True, max_grad_norm=0.0)
    with pytest.raises(ValueError, match=r"fp16=True.*bf16=True"):
        lsparam.hf.lean_optimizer(model, fp16, per_layer=True)
    with pytest.raises(ValueError, match=r"state_bits=8 with TrainingArguments\(fp16=True\)"):
        lsparam.hf.lean_optimizer(model, fp16, state_bits=8)


# ---- export and loading ------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_dense_export_loads_with_vanilla_from_pretrained(tmp_path, tied):
    model = lsparam.parametrize(tiny_llama(0, tie_word_embeddings=tied), SLTRAIN)
    with torch.no_grad():  # trained-looking factors (SLTrain starts with B = 0)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    lsparam.hf.save_pretrained(model, tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "parametrizations" in k]
    dense = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not lsparam.structured_layers(dense)
    assert lsparam.structured_layers(model)  # the model itself is untouched
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dense(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_dense_export_refuses_silu_lost(tmp_path):
    model = parametrized(lsparam.LOSTConfig(rank=8, activation="silu"))
    with pytest.raises(lsparam.NoDenseFormError, match="save_parametrized"):
        lsparam.hf.save_pretrained(model, tmp_path)
    assert not os.listdir(tmp_path)


def test_vanilla_from_pretrained_of_a_parametrized_checkpoint_does_not_load_it(tmp_path):
    # The limitation docs/hf.md states: the keys differ, transformers only reports them, the structured
    # layers stay randomly initialised. load_parametrized is the way.
    model = parametrized(LOST)
    lsparam.hf.save_parametrized(model, tmp_path)
    ids = torch.randint(0, 128, (1, 8))
    wrong = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not torch.allclose(wrong(ids).logits, model(ids).logits, atol=1e-3)
    right = lsparam.hf.load_parametrized(tmp_path)
    assert torch.equal(right(ids).logits, model(ids).logits)


def test_load_parametrized_rebuilds_mixed_configs_and_casts(tmp_path):
    model = tiny_llama(0)
    lsparam.parametrize(model, SLTRAIN, target_modules=r".*self_attn\.(q|v)_proj")
    lsparam.parametrize(model, lsparam.LOSTConfig(rank=16, channel_ratio=0.1), target_modules=["mlp.up_proj"])
    lsparam.hf.save_parametrized(model, tmp_path)
    saved = json.loads((tmp_path / "lsparam_config.json").read_text())
    assert saved == json.loads(json.dumps(lsparam.hf.lsparam_config(model)))
    assert [(g["method"], len(g["target_modules"])) for g in saved["groups"]] == [("sltrain", 4), ("lost", 2)]

    restored = lsparam.hf.load_parametrized(tmp_path, AutoModelForCausalLM)
    assert list(lsparam.structured_layers(restored)) == list(lsparam.structured_layers(model))
    assert_same_params(params(restored), params(model))
    half = lsparam.hf.load_parametrized(tmp_path, dtype=torch.bfloat16)
    assert half.model.layers[0].mlp.up_proj.parametrizations.weight.original0.dtype == torch.bfloat16


def test_load_parametrized_rebuilds_a_model_parametrized_from_a_submodule(tmp_path):
    # SLTrain's random support is drawn from the layer's name as parametrize saw it: 'layers.0...' here
    model = tiny_llama(0)
    lsparam.parametrize(model.model, SLTRAIN)
    lsparam.hf.save_parametrized(model, tmp_path)
    restored = lsparam.hf.load_parametrized(tmp_path)
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(restored(ids).logits, model.eval()(ids).logits)
    assert_same_params(params(restored), params(model))


def test_load_parametrized_keeps_the_saved_dtype(tmp_path):
    # dtype="auto" (the default) follows config.json, as from_pretrained does in transformers 5; the model
    # is parametrized in float32 (LOST's SVD) and cast afterwards, which is exact for the loaded values.
    model = lsparam.parametrize(tiny_llama(0).to(torch.bfloat16), LOST)
    model.save_pretrained(tmp_path)
    restored = lsparam.hf.load_parametrized(tmp_path)
    assert {p.dtype for p in restored.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(restored(ids).logits, model(ids).logits)
    assert lsparam.hf.load_parametrized(tmp_path, dtype=None).model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype must be 'auto', a torch.dtype or None; got dtype='half'"):
        lsparam.hf.load_parametrized(tmp_path, dtype="half")


def test_load_parametrized_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lsparam.hf.load_parametrized(tmp_path)
    with pytest.raises(TypeError, match="save_directory must be a path"):
        lsparam.hf.load_parametrized(3)
    tiny_llama(0).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="holds no lsparam layers.*from_pretrained"):
        lsparam.hf.load_parametrized(tmp_path / "dense")
    with pytest.raises(ValueError, match="no lsparam layers"):
        lsparam.hf.save_parametrized(tiny_llama(0), tmp_path / "never")
    assert not (tmp_path / "never").exists()
    with pytest.raises(TypeError, match="PreTrainedModel"):
        lsparam.hf.save_pretrained(torch.nn.Linear(4, 4), tmp_path / "never")
