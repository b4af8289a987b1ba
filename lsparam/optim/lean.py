"""``LeanOptimizer``: per-layer updates inside backward and low-bit optimizer states (torchao).

Three memory savings, each optional:

- ``per_layer=True``: every parameter is updated by its own inner optimizer from a
  ``register_post_accumulate_grad_hook`` and its gradient freed at once, so a full set of gradients
  never exists (LOMO / GaLore "layer-wise").
- ``state_bits=8`` or ``4``: the inner optimizers are torchao's ``AdamW8bit`` / ``AdamW4bit``.
- gradient accumulation that still updates once per ``accumulation_steps`` micro-batches.

The wrapper is a ``torch.optim.Optimizer`` whose ``param_groups`` are the inner optimizers' own (live)
groups, so LR schedulers change the learning rate the updates really use.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from lsparam.optim.groups import (
    listed_groups,
    param_groups_by_role,
    validate_arguments,
    with_fused_default,
)
from lsparam.optim.lowbit import (
    MIN_LOWBIT_NUMEL,
    default_block_size,
    lowbit_optimizer_class,
    state_from_plain,
    state_to_plain,
)

# torchao's low-bit step dequantises the whole tensor it updates into float32 temporaries: for the
# embedding or head of a LLaMA (32000 x hidden) that is the largest transient of a per-layer step.
# Tensors above this many elements are updated in blocks of rows of about this size instead.
STEP_BLOCK_ELEMENTS = 1 << 22


class LeanOptimizer(torch.optim.Optimizer):
    """A memory-lean wrapper around any ``torch.optim.Optimizer`` class.

    Args:
        params: a model (its parameters that require grad now, grouped by role for weight decay: one
            unfrozen later needs a new optimizer), or an iterable of parameters or param-group dicts, as
            for any optimizer.
        optimizer_cls: the optimizer class to wrap, e.g. ``torch.optim.AdamW``.
        lr, weight_decay: as for the wrapped optimizer; other keyword arguments pass through to it.
        per_layer: update each parameter inside backward and free its gradient at once.
        state_bits: 32 (the wrapped class as is), 8 or 4 (torchao's low-bit version of it).
        accumulation_steps: micro-batches per update. Call ``backward``/``step``/``zero_grad`` on every
            micro-batch with each micro-batch's mean loss: gradients are averaged and applied once
            every ``accumulation_steps`` micro-batches.
        optimizer_kwargs: passed to ``optimizer_cls``. Where the class takes ``fused`` (torch's Adam, AdamW,
            SGD, ...) and neither ``fused`` nor ``foreach`` is given, 32-bit states use ``fused=True``:
            one kernel per update instead of a loop of elementwise ops (1.07–1.18x faster training
            steps in the step benchmark, docs/benchmarks.md) and no step temporaries.
        clip_norm: gradient clipping. With ``per_layer=False`` the global norm over all parameters;
            with ``per_layer=True`` each parameter's own gradient norm (the global norm is never
            available when gradients are freed layer by layer).

    Example:
        >>> import torch, lsparam
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        >>> opt = lsparam.optim.LeanOptimizer(model, torch.optim.AdamW, lr=1e-2, per_layer=True)
        >>> before = model[0].weight.detach().clone()
        >>> model(torch.randn(4, 8)).pow(2).mean().backward()   # the update happens here
        >>> opt.step(); opt.zero_grad()                         # no-ops with per_layer=True
        >>> bool((model[0].weight != before).any()), model[0].weight.grad is None
        (True, True)
    """

    def __init__(
        self,
        params,
        optimizer_cls=torch.optim.AdamW,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        per_layer: bool = False,
        state_bits: int = 32,
        accumulation_steps: int = 1,
        clip_norm: float | None = None,
        **optimizer_kwargs,
    ):
        validate_arguments(optimizer_cls, lr, weight_decay, per_layer, state_bits, accumulation_steps, clip_norm)
        names = {}
        if isinstance(params, nn.Module):
            names = {id(p): name for name, p in params.named_parameters()}
            params = param_groups_by_role(params, weight_decay)
        params = listed_groups(params)
        if state_bits == 32:
            optimizer_kwargs = with_fused_default(optimizer_cls, params, optimizer_kwargs)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, **optimizer_kwargs})
        self.optimizer_cls = optimizer_cls
        self.per_layer = bool(per_layer)
        self.state_bits = state_bits
        self.accumulation_steps = int(accumulation_steps)
        self.clip_norm = clip_norm
        inner_cls = optimizer_cls if state_bits == 32 else lowbit_optimizer_class(optimizer_cls, state_bits)
        self._params = [p for group in self.param_groups for p in group["params"]]
        self._names = [names.get(id(p), f"parameter {i}") for i, p in enumerate(self._params)]  # for messages
        self._micro_steps = defaultdict(int)  # per parameter (per_layer) or one counter (key None)
        self._proxies = {}  # id(parameter) -> (parameter, the padded flat Parameter the inner optimizer updates)
        # what each inner optimizer updates: the parameter itself, or a padded proxy of it (see _stepped)
        self._targets = [self._stepped(p, inner_cls) for p in self._params]
        # and what the inner optimizers update of each: the target, or views of its blocks of rows
        self._pieces = [self._blocks(t, inner_cls) for t in self._targets]
        pieces_of = dict(zip(map(id, self._params), self._pieces))
        if per_layer:  # one inner optimizer per parameter, with its group's options
            self._inner = [
                inner_cls([{**options, "params": pieces_of[id(p)]}], **self.defaults)
                for options in self.param_groups
                for p in options["params"]
            ]
            for i, p in enumerate(self._params):
                p.register_post_accumulate_grad_hook(self._per_layer_hook(i))
        else:
            # one inner optimizer, with every group's options
            stepped = [{**options, "params": [piece for p in options["params"] for piece in pieces_of[id(p)]]}
                       for options in self.param_groups]
            self._inner = [inner_cls(stepped, **self.defaults)]
            # a proxied parameter's gradient becomes a view of its proxy's as soon as it is accumulated, so
            # clipping, loss scalers (GradScaler.unscale_), model.zero_grad() and the update act on one tensor
            for index, p in enumerate(self._params):
                if id(p) in self._proxies:
                    p.register_post_accumulate_grad_hook(lambda _, index=index: self._alias_gradient(index))
            # and blocked ones give each block its rows of the gradient as soon as it exists, for the same
            # reason (a block, not its parameter, is what param_groups hold)
            for index, pieces in enumerate(self._pieces):
                if len(pieces) > 1:
                    self._targets[index].register_post_accumulate_grad_hook(
                        lambda _, index=index: self._hand_gradients_to_blocks(index))
        # The wrapper's groups ARE the inner optimizers' groups: a scheduler edits what the updates use.
        self.param_groups = [group for inner in self._inner for group in inner.param_groups]

    # ---- low-bit states for tensors torchao would leave in fp32 ----------------------------------
    def _stepped(self, param: torch.Tensor, inner_cls) -> torch.Tensor:
        """The tensor the inner optimizer updates: ``param`` itself, or a padded flat proxy.

        torchao keeps 8/4-bit state only for tensors whose size is a multiple of its block size.
        SLTrain's value vectors (``floor(δ·out·in)`` entries) and LOST's ``out×m`` blocks usually are
        not, and would silently keep fp32 state. For those, the parameter is re-pointed to the front of
        a zero-padded buffer, and the inner optimizer updates that buffer (same storage, so the
        parameter sees every update; the padding gets zero gradient and stays zero).
        """
        if self.state_bits == 32 or _is_sharded(param):
            # a sharded (FSDP2 DTensor) parameter cannot be re-pointed into a local buffer: torchao
            # quantises each shard itself, by its own size rule
            return param
        block = self.defaults.get("block_size", default_block_size(inner_cls))
        if param.numel() < MIN_LOWBIT_NUMEL or param.numel() % block == 0:
            return param  # torchao's own rule: small tensors keep full-precision state
        padded = torch.zeros(math.ceil(param.numel() / block) * block, dtype=param.dtype, device=param.device)
        padded[: param.numel()].copy_(param.detach().reshape(-1))
        proxy = nn.Parameter(padded, requires_grad=param.requires_grad)
        param.data = proxy.data[: param.numel()].view(param.shape)
        self._proxies[id(param)] = (param, proxy)
        return proxy

    def _blocks(self, target: torch.Tensor, inner_cls) -> list[torch.Tensor]:
        """``[target]``, or for a low-bit state of more than ``STEP_BLOCK_ELEMENTS`` elements, Parameters
        that view its consecutive blocks of rows (same storage: an update of a block is an update of the
        target). Each block is whole quantisation blocks, so torchao keeps its state in low bits too."""
        if self.state_bits == 32 or target.numel() <= STEP_BLOCK_ELEMENTS or target.dim() < 2 or _is_sharded(target):
            return [target]
        quantum = self.defaults.get("block_size", default_block_size(inner_cls))
        row = target[0].numel()
        if target.numel() % quantum:
            return [target]  # torchao keeps it in full precision anyway (and _stepped pads only small ones)
        multiple = quantum // math.gcd(row, quantum)  # rows per block must make whole quantisation blocks
        rows = max(multiple, STEP_BLOCK_ELEMENTS // row // multiple * multiple)
        starts = list(range(0, target.shape[0], rows))
        if len(starts) > 1 and (target.shape[0] - starts[-1]) * row < MIN_LOWBIT_NUMEL:
            starts.pop()  # a last block too small for low-bit state joins the one before it
        ends = [*starts[1:], target.shape[0]]
        return [nn.Parameter(target.detach()[a:b], requires_grad=target.requires_grad) for a, b in zip(starts, ends)]

    def _hand_gradients_to_blocks(self, index: int) -> None:
        """Give each block of target ``index`` its rows of the target's gradient (views: no copy)."""
        target, pieces = self._targets[index], self._pieces[index]
        if len(pieces) == 1 or target.grad is None:
            return
        start = 0
        for piece in pieces:
            piece.grad = target.grad[start:start + piece.shape[0]]
            start += piece.shape[0]

    def _alias_gradient(self, index: int) -> None:
        """Make a proxied parameter's gradient the front of its proxy's (zero-padded) gradient, a view.

        The parameter's ``.grad`` stays the one source of truth: autograd accumulates into the view,
        ``model.zero_grad()`` clears it (a fresh gradient then replaces the proxy's), clipping over
        ``model.parameters()`` scales it, and the inner optimizer reads the proxy's.
        """
        param = self._params[index]
        if id(param) not in self._proxies:
            return
        self._refuse_moved(index)
        proxy, grad = self._proxies[id(param)][1], param.grad
        if grad is None:
            proxy.grad = None
            return
        if proxy.grad is not None and grad.data_ptr() == proxy.grad.data_ptr():
            return  # already the view
        padded = torch.zeros_like(proxy)
        padded[: param.numel()].copy_(grad.reshape(-1))
        proxy.grad = padded
        param.grad = padded[: param.numel()].view(param.shape)

    def _follow_replaced(self, indices) -> None:
        """Point a padded proxy, or a parameter's row blocks, at the parameter's storage again where it was
        replaced since construction (``layer.weight = W`` re-factorises the layer with ``set_``): the
        updates would otherwise go to the old buffer. A parameter of another dtype or device (``model.to``
        after the optimizer was built) is refused, before any update."""
        for index in indices:
            param, target, pieces = self._params[index], self._targets[index], self._pieces[index]
            self._refuse_moved(index)
            with torch.no_grad():
                if target is not param and param.data_ptr() != target.data_ptr():
                    target[: param.numel()].copy_(param.reshape(-1))
                    target[param.numel():].zero_()
                    param.data = target.data[: param.numel()].view(param.shape)
                if len(pieces) > 1 and pieces[0].data_ptr() != target.data_ptr():
                    start = 0
                    for piece in pieces:
                        piece.data = target.detach()[start:start + piece.shape[0]]
                        start += piece.shape[0]

    def _refuse_moved(self, index: int) -> None:
        """A padded or blocked parameter must keep the dtype and device its buffers were laid out in."""
        param, laid_out = self._params[index], self._pieces[index][0]
        if laid_out is not param and (param.dtype, param.device) != (laid_out.dtype, laid_out.device):
            raise RuntimeError(
                f"LeanOptimizer: {self._names[index]} is now {param.dtype} on {param.device}, but the optimizer's "
                f"low-bit state was laid out for {laid_out.dtype} on {laid_out.device}; build the LeanOptimizer "
                f"after moving the model (model.to(...)). Nothing was updated."
            )

    # ---- the update ------------------------------------------------------------------------------
    def _boundary(self, key) -> bool:
        """Count a micro-batch for ``key``; True on the last micro-batch of an accumulation window."""
        self._micro_steps[key] += 1
        return self._micro_steps[key] % self.accumulation_steps == 0

    def _scale_accumulated(self, params) -> None:
        if self.accumulation_steps > 1:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.accumulation_steps)

    def _per_layer_hook(self, index: int):
        def hook(param):
            if not self._boundary(index):
                return
            self._follow_replaced([index])
            self._alias_gradient(index)
            target = self._targets[index]
            self._scale_accumulated([target])
            if self.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_([target], self.clip_norm)
            self._hand_gradients_to_blocks(index)
            self._inner[index].step()
            self._inner[index].zero_grad(set_to_none=True)
            target.grad = None
            param.grad = None

        return hook

    @torch.no_grad()
    def step(self, closure=None):
        """Apply the update (``per_layer=False``) on the last micro-batch of each accumulation window.

        With ``per_layer=True`` the updates already happened during backward: this only runs the closure.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.per_layer or not self._boundary(None):
            return loss
        self._follow_replaced(range(len(self._params)))
        for index in range(len(self._params)):  # a gradient set or cleared by hand, without a backward
            self._alias_gradient(index)
        with_grad = [t for t in self._targets if t.grad is not None]
        self._scale_accumulated(with_grad)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(with_grad, self.clip_norm)  # a proxy's padding adds nothing to a norm
        self._inner[0].step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, except in the middle of an accumulation window (they are still accumulating).

        With ``per_layer=True`` this does nothing: each gradient is freed right after its update.
        """
        if self.per_layer:
            return
        if self._micro_steps[None] % self.accumulation_steps == 0:
            for t in self._targets:
                t.grad = None if set_to_none else (t.grad.zero_() if t.grad is not None else None)
            if set_to_none:  # proxied parameters and blocks view their target's gradient: they let it go with it
                for param, _ in self._proxies.values():
                    param.grad = None
                for pieces in self._pieces:
                    if len(pieces) > 1:
                        for piece in pieces:
                            piece.grad = None

    def __deepcopy__(self, memo):
        # torch.optim.Optimizer's pickling keeps only defaults, state and param_groups: a copy would lack the
        # inner optimizers, proxies and hooks, and fail at its first step
        raise TypeError("a LeanOptimizer cannot be deep-copied (its inner optimizers, padded proxies and per-layer "
                        "hooks belong to the original parameters): copy the model, build a new LeanOptimizer over "
                        "the copy and load copy.deepcopy(optimizer.state_dict()) into it (a state_dict's tensors are "
                        "the optimizer's own)")

    def add_param_group(self, param_group: dict) -> None:
        """Refused once built: the inner optimizers, padded proxies and per-layer hooks are made for the
        parameters given at construction, and a group added to ``param_groups`` would never be updated."""
        if getattr(self, "_inner", None) is None:  # torch.optim.Optimizer.__init__ adds the initial groups
            return super().add_param_group(param_group)
        raise NotImplementedError(
            "LeanOptimizer.add_param_group: parameters cannot be added after construction (the inner "
            "optimizers, padded low-bit proxies and per-layer hooks are built for the parameters given then). "
            "Build a new LeanOptimizer over all the parameters, e.g. when unfreezing layers."
        )

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors and Python values only: loads with ``torch.load(weights_only=True)``.

        Low-bit states are stored as their torchao components (codes, scales, quantisation map). Saved in
        the middle of an accumulation window, it carries the gradients accumulated so far, so a resume
        continues exactly.
        """
        inner = []
        for optimizer in self._inner:
            sd = optimizer.state_dict()
            state = {k: {name: state_to_plain(v) for name, v in s.items()} for k, s in sd["state"].items()}
            groups = [{k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in g.items()} for g in sd["param_groups"]]
            inner.append({"state": state, "param_groups": groups})
        # Gradients accumulated in an unfinished window belong to the training state too.
        pending = {str(i): t.grad.detach().clone() for i, t in enumerate(self._targets) if t.grad is not None}
        return {
            "inner": inner,
            "pending_grads": pending,
            "micro_steps": {str(k): v for k, v in self._micro_steps.items()},
            "settings": {"per_layer": self.per_layer, "state_bits": self.state_bits,
                         "accumulation_steps": self.accumulation_steps, "num_params": len(self._params)},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        settings = state_dict.get("settings", {})
        mine = {"per_layer": self.per_layer, "state_bits": self.state_bits,
                "accumulation_steps": self.accumulation_steps, "num_params": len(self._params)}
        if settings != mine:
            raise ValueError(f"optimizer state_dict was saved with settings {settings}; this optimizer has {mine}")
        self._check_loadable(state_dict)
        for optimizer, saved in zip(self._inner, state_dict["inner"]):
            state = {int(k): {name: state_from_plain(v) for name, v in s.items()} for k, s in saved["state"].items()}
            groups = []
            for live, g in zip(optimizer.param_groups, saved["param_groups"]):
                g = dict(g)
                for key, value in live.items():  # keep tensor-valued options (torchao's lr) as tensors
                    if isinstance(value, torch.Tensor) and key in g:
                        g[key] = torch.tensor(g[key], dtype=value.dtype, device=value.device)
                groups.append(g)
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.param_groups = [group for inner in self._inner for group in inner.param_groups]
        self._micro_steps = defaultdict(int, {(None if k == "None" else int(k)): v for k, v in state_dict["micro_steps"].items()})
        pending = state_dict.get("pending_grads", {})
        for i, target in enumerate(self._targets):
            grad = pending.get(str(i))
            target.grad = None if grad is None else grad.to(device=target.device, dtype=target.dtype).clone()
            self._hand_gradients_to_blocks(i)  # set here without backward, so without its hook

    def _check_loadable(self, state_dict: dict) -> None:
        """Refuse, before anything is loaded, a state saved for other parameters: every state tensor and
        pending gradient must have the shape of the tensor it belongs to. (A fused or low-bit kernel given
        states of another shape corrupts memory instead of raising.)"""
        inner = state_dict.get("inner")
        if not isinstance(inner, list) or len(inner) != len(self._inner):
            raise ValueError(f"optimizer state_dict holds {len(inner) if isinstance(inner, list) else inner!r} inner "
                             f"optimizer states; this optimizer has {len(self._inner)}")
        owners = {id(piece): i for i, pieces in enumerate(self._pieces) for piece in pieces}
        for optimizer, saved in zip(self._inner, inner):
            live = [p for group in optimizer.param_groups for p in group["params"]]
            ranks = [group.get("rank") for group in optimizer.param_groups for _ in group["params"]]
            saved_groups = saved.get("param_groups", [])
            if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
                raise ValueError("optimizer state_dict has other parameter groups than this optimizer; nothing was loaded")
            for k, state in saved.get("state", {}).items():
                if not 0 <= int(k) < len(live):
                    raise ValueError(f"optimizer state_dict has state for parameter index {k}, beyond this optimizer's "
                                     f"{len(live)}; nothing was loaded")
                target, rank = live[int(k)], ranks[int(k)]
                allowed = {(), tuple(target.shape)}
                if rank is not None and target.dim() == 2:  # GaLore's groups keep their moments projected to rank r
                    allowed |= {(target.shape[0], rank), (rank, target.shape[1])}
                for key, value in state.items():
                    shape = tuple(state_from_plain(value).shape) if isinstance(value, dict) else tuple(getattr(value, "shape", ()))
                    if key != "step" and shape not in allowed:
                        raise ValueError(
                            f"optimizer state {key!r} of {self._names[owners[id(target)]]!r} has shape {shape}, but the "
                            f"parameter it updates has {tuple(target.shape)}: this state was saved for another model "
                            f"or config; nothing was loaded"
                        )
        for index, grad in state_dict.get("pending_grads", {}).items():
            i = int(index)
            if not 0 <= i < len(self._targets) or tuple(grad.shape) != tuple(self._targets[i].shape):
                where = self._names[i] if 0 <= i < len(self._targets) else f"parameter {index}"
                raise ValueError(f"optimizer state_dict's pending gradient of {where!r} has shape {tuple(grad.shape)}, "
                                 f"not the parameter's; nothing was loaded")

    def __repr__(self) -> str:
        return (
            f"LeanOptimizer({self.optimizer_cls.__name__}, per_layer={self.per_layer}, state_bits={self.state_bits}, "
            f"accumulation_steps={self.accumulation_steps}, clip_norm={self.clip_norm}, params={len(self._params)})"
        )


def _is_sharded(param: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(param, DTensor)
