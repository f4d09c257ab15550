"""Max-norm regularisation (`scale_weight_norms`): LoRAs whose weight change is too long are scaled back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_trainer.lora.network import LoraNetwork, LoraTarget
from lora_trainer.train.max_norm import scale_weight_norms


def _delta_norm(module) -> float:
    return float(((module.up.flatten(1) @ module.down.flatten(1)) * module.scale).norm())


def test_only_loras_longer_than_the_limit_are_scaled_onto_it():
    network = LoraNetwork([LoraTarget("lora_unet_big", "unet.big", nn.Linear(8, 8), 2, 2.0),
                           LoraTarget("lora_unet_small", "unet.small", nn.Conv2d(8, 8, 3), 2, 1.0)])
    big, small = network.lora_modules["lora_unet_big"], network.lora_modules["lora_unet_small"]
    with torch.no_grad():
        big.up.fill_(1.0)
        small.up.fill_(1e-4)
    small_before = (small.up.clone(), small.down.clone())
    keys_scaled, largest = scale_weight_norms(network, 1.0)
    assert int(keys_scaled) == 1 and float(largest) > 1.0
    assert _delta_norm(big) == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(small.up, small_before[0]) and torch.equal(small.down, small_before[1])
