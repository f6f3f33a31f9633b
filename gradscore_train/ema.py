"""Exponential moving average of a model's parameters (kept in fp32, checkpointed via state_dict)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """``theta_ema <- d theta_ema + (1 - d) theta`` after each optimizer step, with the warm-up
    ``d_k = min(decay, (1 + k) / (10 + k))`` so early averages are not dominated by the init."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()}
        self._bound = None                                  # (model, shadow list, parameter list, same dtype/device)

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        shadow, params, uniform = self._pairs(model)
        if uniform:
            torch._foreach_lerp_(shadow, params, 1 - d)     # one call instead of a Python loop (bitwise the same)
        else:
            for s, p in zip(shadow, params):
                s.lerp_(p.to(s.dtype), 1 - d)

    def _pairs(self, model: nn.Module):
        """Shadow and parameter lists in matching order, cached per model (a module's parameters
        keep their identity across steps, ``load_state_dict`` and ``.to()``)."""
        if self._bound is None or self._bound[0] is not model:
            named = list(model.named_parameters())
            shadow, params = [self.shadow[k] for k, _ in named], [p for _, p in named]
            uniform = all(p.dtype == s.dtype and p.device == s.device for s, p in zip(shadow, params))
            self._bound = (model, shadow, params, uniform)
        return self._bound[1:]

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        for k, p in model.named_parameters():
            p.copy_(self.shadow[k].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict):
        self.decay, self.num_updates = float(state["decay"]), int(state["num_updates"])
        for k, v in state["shadow"].items():
            if k not in self.shadow:
                raise KeyError(f"EMA state has a parameter {k!r} the model does not have")
            self.shadow[k].copy_(v)
