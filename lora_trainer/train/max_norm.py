"""kohya's max-norm regularisation (`scale_weight_norms`): after each step, every LoRA whose weight change
`up @ down * scale` has a larger Frobenius norm than the limit is scaled back onto it."""

from __future__ import annotations

import torch

from lora_trainer.lora.network import LoraNetwork


@torch.no_grad()
def scale_weight_norms(network: LoraNetwork, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale down (up and down matrices alike) each module whose weight change is longer than `max_norm`; returns
    how many were scaled and the largest norm before scaling, as device tensors (read them only to log)."""
    modules = list(network.lora_modules.values())
    norms = torch.stack([((module.up.flatten(1) @ module.down.flatten(1)) * module.scale).norm()
                         for module in modules])
    ratios = torch.clamp(max_norm / norms.clamp(min=1e-12), max=1.0).sqrt()
    for module, ratio in zip(modules, ratios):
        module.up.mul_(ratio)
        module.down.mul_(ratio)
    return (norms > max_norm).sum(), norms.max()
