"""Signs that a run is not learning, checked at every step, said once each.

A non-finite loss or gradient norm stops the run (``recipes/pretrain.py``); these are the finite
failures, which would otherwise train on silently:

- **no gradient**: the gradient norm is exactly 0, so no weight moves. A learning rate far too high
  does this: the first steps blow the pre-activations up, the units saturate or die, and the model
  is stuck on a constant output from then on.
- **worse than a uniform guess**: the training loss, past the warm-up, is more than 1 nat above
  ``ln(vocabulary)``, the loss of predicting every token with equal probability (a fresh model starts
  near it). A model there is confidently wrong: the run is diverging.

Each is a line on stderr and a ``{"type": "warning"}`` record in metrics.jsonl, the first time it
happens (not every step).

>>> watch = HealthWatch(vocab_size=400, warmup_steps=0, lr=10.0)
>>> watch.check(step=5, loss=5.9, grad_norm=0.0)[0].startswith("step 5: the gradient norm is 0")
True
>>> watch.check(step=6, loss=5.9, grad_norm=0.0)  # said once
[]
"""

from __future__ import annotations

import math


class HealthWatch:
    """The per-step checks above, for one run. ``check`` returns the new warnings (strings)."""

    def __init__(self, vocab_size: int, warmup_steps: int, lr: float):
        self.uniform_loss = math.log(vocab_size)
        self.warmup_steps = warmup_steps
        self.lr = lr
        self.said: set[str] = set()

    def check(self, step: int, loss: float, grad_norm: float | None) -> list[str]:
        found = []
        if grad_norm == 0.0 and "no gradient" not in self.said:
            self.said.add("no gradient")
            found.append(f"step {step}: the gradient norm is 0, so no weight is changing: the model has stopped "
                         f"learning (dead or saturated units). A learning rate far too high does this; --lr is "
                         f"{self.lr:g}: start again with a lower one")
        if step > self.warmup_steps and loss > self.uniform_loss + 1 and "above uniform" not in self.said:
            self.said.add("above uniform")
            found.append(f"step {step}: the training loss {loss:.3f} is more than 1 above "
                         f"ln(vocabulary) = {self.uniform_loss:.3f}, the loss of a uniform guess: the run is diverging. Lower --lr "
                         f"(now {self.lr:g}) or --clip-norm, and resume from a checkpoint before this step")
        return found
