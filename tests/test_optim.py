"""LeanOptimizer against plain torch optimizers: same updates, accumulation, schedulers, resume."""

import subprocess
import sys
import textwrap

import pytest
import torch

import lsparam
from lsparam.optim import LeanOptimizer, param_groups_by_role


def small_model(seed=0, config=None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Tanh(), torch.nn.Linear(32, 16)
    )
    lsparam.parametrize(model, config or lsparam.SLTrainConfig(rank=4, density=0.2), target_modules=["0", "3"])
    return model


def batches(n, seed=1, size=8):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 16, generator=generator), torch.randn(size, 16, generator=generator)) for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def train(model, optimizer, data):
    for batch in data:
        loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def plain_adamw(model, **kwargs):
    """torch's AdamW with its fused kernel, which LeanOptimizer uses by default for 32-bit states."""
    return torch.optim.AdamW(param_groups_by_role(model, kwargs.pop("weight_decay", 0.0)), fused=True, **kwargs)


def test_fused_kernel_is_the_default_only_where_it_applies():
    model = small_model()
    assert LeanOptimizer(model, torch.optim.AdamW).defaults["fused"] is True
    assert "fused" not in LeanOptimizer(model, torch.optim.AdamW, foreach=False).defaults  # the user's choice stands
    assert "fused" not in LeanOptimizer(model, torch.optim.RMSprop).defaults  # no fused kernel in torch
    # unfused on request: the same updates as torch's own unfused AdamW
    data = batches(3)
    model_ref = small_model()
    reference = train(model_ref, torch.optim.AdamW(model_ref.parameters(), lr=1e-2, weight_decay=0.0, foreach=False), data)
    model = small_model()
    got = train(model, LeanOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2, foreach=False), data)
    for g, w in zip(got, reference):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("config", [lsparam.SLTrainConfig(rank=4, density=0.2), lsparam.LOSTConfig(rank=4)])
@pytest.mark.parametrize("per_layer", [False, True])
def test_lean_updates_equal_an_ordinary_adamw_step(config, per_layer):
    data = batches(4)
    model_ref = small_model(config=config)
    reference = train(model_ref, plain_adamw(model_ref, lr=1e-2, weight_decay=0.1), data)
    model = small_model(config=config)
    lean = train(model, LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, per_layer=per_layer), data)
    for got, want in zip(lean, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("per_layer", [False, True])
def test_accumulation_equals_one_large_batch(per_layer):
    micro = batches(6, size=4)
    large = [(torch.cat([x for x, _ in micro[i:i + 3]]), torch.cat([y for _, y in micro[i:i + 3]])) for i in (0, 3)]
    model_ref = small_model()
    reference = train(model_ref, plain_adamw(model_ref, lr=1e-2), large)
    model = small_model()
    optimizer = LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, per_layer=per_layer, accumulation_steps=3)
    got = train(model, optimizer, micro)
    for g, w in zip(got, reference):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # and nothing moved in the middle of a window
    model2 = small_model()
    optimizer2 = LeanOptimizer(model2, torch.optim.AdamW, lr=1e-2, per_layer=per_layer, accumulation_steps=3)
    before = [p.detach().clone() for p in model2.parameters()]
    train(model2, optimizer2, micro[:2])
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters()))


@pytest.mark.parametrize("per_layer", [False, True])
def test_clipping(per_layer):
    data = batches(3)
    model_ref = small_model()
    ref_opt = plain_adamw(model_ref, lr=1e-2)
    for batch in data:
        loss_fn(model_ref, batch).backward()
        params = [p for p in model_ref.parameters()]
        if per_layer:
            for p in params:
                torch.nn.utils.clip_grad_norm_([p], 0.01)
        else:
            torch.nn.utils.clip_grad_norm_(params, 0.01)
        ref_opt.step()
        ref_opt.zero_grad()
    model = small_model()
    got = train(model, LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, per_layer=per_layer, clip_norm=0.01), data)
    for g, w in zip(got, model_ref.parameters()):
        torch.testing.assert_close(g, w.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("per_layer", [False, True])
def test_schedulers_change_the_learning_rate_the_updates_use(per_layer):
    model = small_model()
    optimizer = LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, per_layer=per_layer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step >= 1 else 1.0)
    data = batches(3)
    train(model, optimizer, data[:1])
    scheduler.step()  # lr is now 0 in every inner optimizer
    assert all(g["lr"] == 0.0 for inner in optimizer._inner for g in inner.param_groups)
    frozen = [p.detach().clone() for p in model.parameters()]
    train(model, optimizer, data[1:])
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))


def test_cosine_schedule_matches_plain_optimizer():
    data = batches(5)
    model_ref = small_model()
    ref_opt = plain_adamw(model_ref, lr=1e-2)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=5)
    model = small_model()
    opt = LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, per_layer=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    for batch in data:
        for m, o, s in ((model_ref, ref_opt, ref_sched), (model, opt, sched)):
            loss_fn(m, batch).backward()
            o.step()
            o.zero_grad()
            s.step()
    for a, b in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def names_in(model, group):
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_by_role_includes_sparse_values_and_spares_norms():
    model = small_model()
    decay, no_decay = param_groups_by_role(model, 0.1)
    factors = {f"{i}.parametrizations.weight.original{k}" for i in (0, 3) for k in range(3)}  # B, A, 1-D values
    assert names_in(model, decay) == factors and decay["weight_decay"] == 0.1
    assert names_in(model, no_decay) == {"0.bias", "1.weight", "1.bias", "3.bias"} and no_decay["weight_decay"] == 0.0


def test_weight_decay_by_role_on_a_llama(llama):
    lsparam.parametrize(llama, lsparam.SLTrainConfig(rank=4, density=0.1))
    decay, no_decay = param_groups_by_role(llama, 0.1)
    projections = [f"model.layers.{i}.{name}" for i in range(2) for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")]
    factors = {f"{layer}.parametrizations.weight.original{k}" for layer in projections for k in range(3)}
    assert names_in(llama, decay) == factors | {"model.embed_tokens.weight", "lm_head.weight"}
    norms = {f"model.layers.{i}.{norm}.weight" for i in range(2) for norm in ("input_layernorm", "post_attention_layernorm")}
    assert names_in(llama, no_decay) == norms | {"model.norm.weight"}


@pytest.mark.parametrize("per_layer", [False, True])
def test_state_dict_round_trip_continues_identically(tmp_path, per_layer):
    data = batches(6)
    model_a = small_model()
    opt_a = LeanOptimizer(model_a, torch.optim.AdamW, lr=1e-2, per_layer=per_layer, accumulation_steps=2)
    train(model_a, opt_a, data[:3])  # stops in the middle of an accumulation window
    torch.save({"model": model_a.state_dict(), "optim": opt_a.state_dict()}, tmp_path / "ckpt.pt")
    expected = train(model_a, opt_a, data[3:])

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_b = small_model(seed=5)
    model_b.load_state_dict(saved["model"])
    opt_b = LeanOptimizer(model_b, torch.optim.AdamW, lr=1e-2, per_layer=per_layer, accumulation_steps=2)
    opt_b.load_state_dict(saved["optim"])
    got = train(model_b, opt_b, data[3:])
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_loading_a_state_dict_with_other_settings_is_refused():
    model = small_model()
    saved = LeanOptimizer(model, torch.optim.AdamW, per_layer=True).state_dict()
    with pytest.raises(ValueError, match="per_layer"):
        LeanOptimizer(model, torch.optim.AdamW, per_layer=False).load_state_dict(saved)


class _ProjectedMomentum(torch.optim.Optimizer):
    """SGD with momentum kept in a rank-r space for the groups that name a rank, as GaLore keeps its moments."""

    def __init__(self, params, lr=1e-2, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                rank = group.get("rank")
                grad = p.grad if rank is None else p.grad[:, :rank]
                momentum = self.state[p].setdefault("exp_avg", torch.zeros_like(grad)).mul_(0.9).add_(grad)
                p[:, : momentum.shape[1]].sub_(group["lr"] * momentum)


def test_projected_optimizer_states_load_and_other_shapes_are_refused():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    groups = [{"params": [model[0].weight], "rank": 4}, {"params": [model[1].weight]}]
    optimizer = LeanOptimizer(groups, _ProjectedMomentum, per_layer=False)
    model(torch.randn(3, 16)).square().sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    fresh = LeanOptimizer([{"params": [model[0].weight], "rank": 4}, {"params": [model[1].weight]}], _ProjectedMomentum,
                          per_layer=False)
    fresh.load_state_dict(saved)  # (8, 4) for the rank-4 group: GaLore's (out, r)
    moments = [s["exp_avg"] for inner in fresh._inner for s in inner.state.values()]
    assert sorted(tuple(m.shape) for m in moments) == [(8, 4), (8, 8)]
    bad = optimizer.state_dict()
    state = next(s for s in bad["inner"][0]["state"].values() if s["exp_avg"].shape == (8, 4))
    state["exp_avg"] = torch.zeros(8, 5)  # neither the parameter's shape nor a rank-4 projection of it
    with pytest.raises(ValueError, match=r"has shape \(8, 5\), but the parameter it updates has \(8, 16\)"):
        fresh.load_state_dict(bad)


def test_eight_bit_states_are_low_bit_even_for_odd_sized_sparse_values(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 128, bias=False))
    lsparam.parametrize(model, lsparam.SLTrainConfig(rank=8, density=0.5))  # nnz 6144 = 24 blocks of 256
    values = model[0].parametrizations.weight.original2
    assert values.numel() >= 4096
    optimizer = LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, per_layer=True, state_bits=8)
    before = values.detach().clone()
    x = torch.randn(4, 96)
    for _ in range(2):
        model(x).square().mean().backward()
    states = {tuple(p.shape): s for inner in optimizer._inner for p, s in inner.state.items()}
    kinds = {shape: type(s["exp_avg"]).__name__ for shape, s in states.items()}
    assert "OptimState8bit" in kinds.values(), kinds
    assert not torch.equal(before, values.detach())  # the parameter itself trained
    # the state_dict holds plain tensors only and restores the low-bit states exactly
    torch.save(optimizer.state_dict(), tmp_path / "o.pt")
    restored = LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, per_layer=True, state_bits=8)
    restored.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    for a, b in zip(optimizer._inner, restored._inner):
        for (pa, sa), (pb, sb) in zip(a.state.items(), b.state.items()):
            for key in sa:
                va, vb = sa[key], sb[key]
                if hasattr(va, "codes"):
                    assert torch.equal(va.codes, vb.codes) and torch.equal(va.scale, vb.scale)
                else:
                    assert torch.equal(va, vb)


CLEARS = {
    "optimizer.zero_grad()": lambda layer, optimizer: optimizer.zero_grad(),
    "model.zero_grad()": lambda layer, optimizer: layer.zero_grad(),  # what transformers' Trainer calls
    "model.zero_grad(set_to_none=False)": lambda layer, optimizer: layer.zero_grad(set_to_none=False),
}


@pytest.mark.parametrize("clear", list(CLEARS))
@pytest.mark.parametrize("bits", [8, 4])
def test_padded_low_bit_state_for_a_size_torchao_would_leave_in_fp32(bits, clear):
    from torchao.optim import AdamW4bit, AdamW8bit

    torch.manual_seed(0)
    layer = torch.nn.Linear(100, 90, bias=False)
    lsparam.parametrize(layer, lsparam.SLTrainConfig(rank=4, density=0.5), target_modules=None)
    values = layer.parametrizations.weight.original2  # 4500 entries: not a multiple of 256
    assert values.numel() == 4500 and values.numel() % 256
    # the reference: torchao's own optimizer on a plain tensor zero-padded to whole blocks by hand
    padded = torch.zeros(4608)
    padded[:4500] = values.detach()
    padded.requires_grad_(True)
    reference = {8: AdamW8bit, 4: AdamW4bit}[bits]([padded], lr=1e-2, weight_decay=0.1)
    optimizer = LeanOptimizer([values], torch.optim.AdamW, lr=1e-2, weight_decay=0.1, state_bits=bits)
    for step in range(2):  # the second update reads the quantised state back
        loss = layer(torch.randn(3, 100)).square().sum()
        (grad,) = torch.autograd.grad(loss, values, retain_graph=True)  # LeanOptimizer moves values.grad away
        loss.backward()
        padded.grad = torch.cat([grad, torch.zeros(108)])
        optimizer.step()
        reference.step()
        CLEARS[clear](layer, optimizer)  # each update sees its own step's gradient only, however it is cleared
        torch.testing.assert_close(values.detach(), padded.detach()[:4500], rtol=0, atol=0)
    state = optimizer._inner[0].state
    assert len(state) == 1
    (proxy, s), = state.items()
    assert type(s["exp_avg"]).__name__ == f"OptimState{bits}bit" and proxy.numel() == 4608
    assert values.data_ptr() == proxy.data_ptr()  # the parameter is the front of the padded buffer
    assert torch.count_nonzero(proxy.detach()[4500:]) == 0


def test_clipping_over_the_model_sees_padded_low_bit_parameters():
    # a gradient norm over model.parameters() (Trainer's max_grad_norm, a user's clip_grad_norm_) must count
    # the parameters whose low-bit state lives in a padded proxy, and clip them
    norms = {}
    for bits in (32, 8):
        torch.manual_seed(0)
        layer = torch.nn.Linear(100, 90, bias=False)
        lsparam.parametrize(layer, lsparam.SLTrainConfig(rank=4, density=0.5), target_modules=None)
        optimizer = LeanOptimizer(layer, torch.optim.AdamW, lr=1e-2, state_bits=bits)
        layer(torch.randn(3, 100, generator=torch.Generator().manual_seed(1))).square().sum().backward()
        assert all(p.grad is not None for p in layer.parameters())
        norms[bits] = torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        assert torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in layer.parameters()])) <= 1.0 + 1e-5
        if bits == 8:
            proxy = optimizer._proxies[id(layer.parametrizations.weight.original2)][1]
            assert torch.linalg.vector_norm(proxy.grad) <= 1.0 + 1e-5  # the update reads the clipped gradient
    torch.testing.assert_close(norms[8], norms[32], rtol=1e-6, atol=0)


def test_a_step_after_the_model_cleared_its_gradients_changes_nothing():
    torch.manual_seed(0)
    layer = torch.nn.Linear(100, 90, bias=False)
    lsparam.parametrize(layer, lsparam.SLTrainConfig(rank=4, density=0.5), target_modules=None)
    optimizer = LeanOptimizer(layer, torch.optim.AdamW, lr=0.1, state_bits=8, weight_decay=0.1)
    layer(torch.randn(3, 100)).square().sum().backward()
    layer.zero_grad()  # e.g. a step skipped after an overflow
    before = [p.detach().clone() for p in layer.parameters()]
    optimizer.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, layer.parameters()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"state_bits": 7}, "state_bits must be one of"),
        ({"lr": -1.0}, "lr must be a finite number >= 0; got lr=-1.0"),
        ({"accumulation_steps": 0}, "accumulation_steps must be an int >= 1; got accumulation_steps=0"),
        ({"clip_norm": 0}, "clip_norm must be None or a positive number"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LeanOptimizer(small_model(), torch.optim.AdamW, **kwargs)


@pytest.mark.parametrize("per_layer", [False, True])
def test_param_groups_given_as_generators_are_trained_as_torch_trains_them(per_layer):
    data = batches(3)
    model_ref = small_model()
    reference = train(model_ref, torch.optim.AdamW([{"params": model_ref[0].parameters(), "lr": 1e-2},
                                                    {"params": model_ref[3].parameters()}], lr=1e-3, weight_decay=0.0,
                                                   fused=True), data)
    model = small_model()
    groups = [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[3].parameters()}]
    got = train(model, LeanOptimizer(groups, torch.optim.AdamW, lr=1e-3, per_layer=per_layer), data)
    for g, w in zip(got, reference):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_adding_a_param_group_after_construction_is_refused():
    model = small_model()
    optimizer = LeanOptimizer(model, torch.optim.AdamW)
    groups = [dict(g) for g in optimizer.param_groups]
    with pytest.raises(NotImplementedError, match="cannot be added after construction"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert [g["params"] for g in optimizer.param_groups] == [g["params"] for g in groups]


def test_an_empty_param_group_is_refused():
    model = small_model()
    with pytest.raises(ValueError, match="param group 1 has no parameters"):
        LeanOptimizer([{"params": model[0].parameters()}, {"params": []}], torch.optim.AdamW)


def test_optimizer_class_must_be_an_optimizer():
    with pytest.raises(TypeError, match="optimizer_cls must be a torch.optim.Optimizer subclass; got <class 'dict'>"):
        LeanOptimizer(small_model(), dict)


def test_low_bit_states_need_a_torchao_version_of_the_optimizer():
    with pytest.raises(ValueError, match="state_bits=8 needs a torchao low-bit version of optimizer_cls=SGD"):
        LeanOptimizer(small_model(), torch.optim.SGD, lr=0.1, state_bits=8)


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, torch, lsparam
    from lsparam.optim import LeanOptimizer
    torch.use_deterministic_algorithms(True)
    mode, path, total, split = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
    lsparam.parametrize(model, lsparam.LOSTConfig(rank=4))
    opt = LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, per_layer=True, accumulation_steps=2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    start = 0
    if mode == "resume":
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"]); opt.load_state_dict(ckpt["optim"]); sched.load_state_dict(ckpt["sched"])
        torch.set_rng_state(ckpt["rng"]); start = split
    for step in range(start, total if mode != "first" else split):
        x = torch.randn(8, 16)
        loss = (model(x) - x.flip(-1)).square().mean()
        loss.backward(); opt.step(); opt.zero_grad(); sched.step()
        print(f"{step} {loss.item():.10e}")
    if mode == "first":
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                    "rng": torch.get_rng_state()}, path)
    """
)


def test_exact_resume_in_a_fresh_process(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    ckpt = str(tmp_path / "ckpt.pt")

    def run(mode):
        out = subprocess.run([sys.executable, str(script), mode, ckpt, "9", "5"], capture_output=True, text=True, check=True)
        return out.stdout.split("\n")[:-1]

    uninterrupted = run("full")
    resumed = run("first") + run("resume")
    assert len(uninterrupted) == 9
    assert resumed == uninterrupted  # every loss, bit for bit


def test_grad_scaler_unscales_proxied_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 50))  # 5000 weights: padded to 5120 for 8-bit state
    optimizer = LeanOptimizer(model, torch.optim.AdamW, lr=1e-3, state_bits=8)
    x = torch.randn(4, 100)
    loss = model(x).square().mean()
    (reference,) = torch.autograd.grad(loss, [model[0].weight], retain_graph=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.numel() > 4096]
    assert len(grads) == 1
    torch.testing.assert_close(grads[0][:5000].view(50, 100), reference)


def embedding_model(seed=0):
    """A 512 x 64 embedding (32768 elements: 4 blocks of 8192 under the patched block size) and a head."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(512, 64), torch.nn.Linear(64, 8))


def embedding_train(model, optimizer, steps=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 512, (4, 16), generator=generator)
        model(ids).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_large_low_bit_tensor_updated_in_row_blocks_gets_exactly_the_whole_tensors_update(per_layer, monkeypatch):
    """Blocks of whole quantisation blocks quantise as the whole tensor does, and the update is elementwise:
    the parameters agree bit for bit, and every block's state is low-bit."""
    whole_model = embedding_model()
    whole = LeanOptimizer(whole_model, torch.optim.AdamW, lr=1e-2, per_layer=per_layer, state_bits=8)
    expected = embedding_train(whole_model, whole)
    monkeypatch.setattr(lsparam.optim.lean, "STEP_BLOCK_ELEMENTS", 8192)
    blocked_model = embedding_model()
    blocked = LeanOptimizer(blocked_model, torch.optim.AdamW, lr=1e-2, per_layer=per_layer, state_bits=8)
    assert [p.shape[0] for p in blocked._pieces[0]] == [128, 128, 128, 128]
    got = embedding_train(blocked_model, blocked)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    states = [s for inner in blocked._inner for s in inner.state.values()]
    assert len(states) == 4 + 2  # four blocks of the embedding, the head's weight and bias
    embedding_states = [s for piece in blocked._pieces[0] for inner in blocked._inner for p, s in inner.state.items() if p is piece]
    assert all(type(s["exp_avg"]).__name__ == "OptimState8bit" for s in embedding_states)


def test_row_blocks_bound_the_step_temporary_and_resume_exactly(tmp_path, monkeypatch):
    """torchao's step of a large low-bit tensor makes two fp32 copies of it (8 bytes per element, measured);
    in blocks of 2**18 elements they are a block's."""
    from lsparam.memory import measure

    def bytes_per_element_of_a_step(block_elements):
        monkeypatch.setattr(lsparam.optim.lean, "STEP_BLOCK_ELEMENTS", block_elements)
        torch.manual_seed(0)
        big = torch.nn.Embedding(32000, 64)  # 2M elements, 8 MiB in fp32
        ids = torch.randint(0, 32000, (2, 8))
        optimizer = LeanOptimizer(big, torch.optim.AdamW, lr=1e-2, per_layer=True, state_bits=8)

        def step():
            big(ids).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

        step()  # states exist from here on (and torchao's kernel is compiled)
        result = measure(step, device="cpu")
        return (result.peak - result.baseline) / big.weight.numel()

    whole, blocked = bytes_per_element_of_a_step(1 << 30), bytes_per_element_of_a_step(1 << 18)
    # the gradient (4 bytes per element) and the step's copies: of the whole tensor, or of one block of 8
    assert whole == pytest.approx(4 + 8, abs=0.5)
    assert blocked == pytest.approx(4 + 8 / 8, abs=0.5)

    # a checkpoint of the blocked optimizer resumes identically
    monkeypatch.setattr(lsparam.optim.lean, "STEP_BLOCK_ELEMENTS", 8192)
    first, second = embedding_model(), embedding_model()
    opt_first = LeanOptimizer(first, torch.optim.AdamW, lr=1e-2, per_layer=True, state_bits=8)
    embedding_train(first, opt_first, steps=2)
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, tmp_path / "ckpt.pt")
    expected = embedding_train(first, opt_first, steps=2, seed=5)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    second.load_state_dict(saved["model"])
    opt_second = LeanOptimizer(second, torch.optim.AdamW, lr=1e-2, per_layer=True, state_bits=8)
    opt_second.load_state_dict(saved["opt"])
    for g, e in zip(embedding_train(second, opt_second, steps=2, seed=5), expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_blocks_hold_their_rows_of_the_gradient_as_soon_as_backward_made_it(monkeypatch):
    """What sees param_groups between backward and step (GradScaler.unscale_, clipping by a user) sees the
    blocks' gradients: views of the parameter's, so scaling them in place scales it."""
    monkeypatch.setattr(lsparam.optim.lean, "STEP_BLOCK_ELEMENTS", 8192)
    model = embedding_model()
    optimizer = LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, state_bits=8)
    model(torch.randint(0, 512, (4, 16))).pow(2).mean().backward()
    weight = model[0].weight
    blocks = optimizer._pieces[0]
    assert len(blocks) == 4 and all(b.grad is not None for b in blocks)
    torch.testing.assert_close(torch.cat([b.grad for b in blocks]), weight.grad, rtol=0, atol=0)
    expected = weight.grad * 0.5
    for group in optimizer.param_groups:  # what GradScaler.unscale_ does
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(0.5)
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("case", ["padded values", "row blocks"])
def test_a_layer_reassigned_after_the_optimizer_was_built_trains_as_one_built_after(case, per_layer, monkeypatch):
    # layer.weight = W replaces each factor's storage (torch's set_): the padded proxies and row blocks that
    # low-bit states update must follow, or those factors silently stop training
    import lsparam.optim.lean as lean

    if case == "row blocks":
        monkeypatch.setattr(lean, "STEP_BLOCK_ELEMENTS", 4096)  # B (256 x 32) is then updated in blocks of rows
    config = lsparam.SLTrainConfig(rank=32, density=0.2, init="dense")
    new_weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(5)) * 0.05

    def run(assign_after_building):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 256))
        if not assign_after_building:
            with torch.no_grad():
                model[0].weight.copy_(new_weight)
        lsparam.parametrize(model, config)
        optimizer = LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, state_bits=8, per_layer=per_layer)
        if assign_after_building:
            model[0].weight = new_weight
        if case == "padded values":
            assert id(model[0].parametrizations.weight.original2) in optimizer._proxies
        else:
            assert any(len(pieces) > 1 for pieces in optimizer._pieces)
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):
            model(torch.randn(16, 128, generator=generator)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_moving_the_model_after_building_a_low_bit_optimizer_is_refused_before_any_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 90, bias=False))
    lsparam.parametrize(model, lsparam.SLTrainConfig(rank=4, density=0.5))
    optimizer = LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, state_bits=8)
    model.to(torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"now torch.float64 on cpu, but .* torch.float32 on cpu; build the "
                                           r"LeanOptimizer after moving the model"):
        model(torch.randn(3, 100, dtype=torch.float64)).sum().backward()  # the padded gradient, or else step()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_deep_copy_is_refused_and_the_documented_copy_continues_identically():
    import copy

    data = batches(4)
    model = small_model()
    optimizer = LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, state_bits=32)
    train(model, optimizer, data[:2])
    with pytest.raises(TypeError, match=r"cannot be deep-copied.*copy\.deepcopy\(optimizer\.state_dict\(\)\)"):
        copy.deepcopy((model, optimizer))
    twin = copy.deepcopy(model)
    twin_optimizer = LeanOptimizer(twin, torch.optim.AdamW, lr=1e-2, state_bits=32)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for a, b in zip(train(model, optimizer, data[2:]), train(twin, twin_optimizer, data[2:])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
