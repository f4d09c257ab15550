"""The one LoRA mechanism: forward hooks that add `scale * up(down(x))` to a frozen layer's output.

The adapted model's module tree is never changed: no wrapper modules, no renamed parameters. The LoRA
weights live in a separate `LoraNetwork`, which attaches hooks to the target layers and removes them
again. This works the same on diffusers, transformers, ldm/sgm and Forge layers, because a target is
recognised by its weight's shape (2-D: linear, 4-D: convolution), not by its class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LoraTarget:
    """A layer to adapt: its kohya key (`lora_unet_..._to_q`), its diffusers/peft key
    (`unet.down_blocks.0....to_q`), the layer, and the LoRA rank and alpha."""

    key: str
    peft_key: str
    layer: nn.Module
    rank: int
    alpha: float


class LoraModule(nn.Module):
    """The down/up matrices for one layer. `down` sees the layer's input; `up` starts at zero."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        weight = layer.weight
        if weight.dim() == 2:
            out_features, in_features = weight.shape
            self.conv: dict[str, object] | None = None
            down_shape: tuple[int, ...] = (rank, in_features)
            up_shape: tuple[int, ...] = (out_features, rank)
        elif weight.dim() == 4:
            out_channels, in_channels, kernel_h, kernel_w = weight.shape
            self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
            down_shape = (rank, in_channels, kernel_h, kernel_w)
            up_shape = (out_channels, rank, 1, 1)
        else:
            raise ValueError(f"cannot attach LoRA to a layer whose weight has shape {tuple(weight.shape)}")
        self.rank = rank
        self.alpha = float(alpha)
        self.down = nn.Parameter(torch.empty(down_shape, dtype=torch.float32, device=weight.device))
        self.up = nn.Parameter(torch.zeros(up_shape, dtype=torch.float32, device=weight.device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scale(self) -> float:
        """alpha / rank, the factor kohya and the WebUI apply to `up @ down`."""
        return self.alpha / self.rank

    def delta(self, inputs: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """The LoRA's contribution to the layer's output for `inputs` at strength `multiplier`."""
        # fp32 LoRA weights; under autocast the functional ops below recast to the autocast dtype.
        if inputs.dtype != self.down.dtype:
            inputs = inputs.to(self.down.dtype)
        inputs = self.dropout(inputs)
        # The scale goes on the rank-r hidden state, which is far smaller than the layer's output, and is
        # skipped at 1 (alpha = rank, full strength): a full-size multiply per layer costs about 4% of a step.
        factor = self.scale * multiplier
        if self.conv is None:
            hidden = F.linear(inputs, self.down)
            return F.linear(hidden if factor == 1.0 else hidden * factor, self.up)
        hidden = F.conv2d(inputs, self.down, **self.conv)
        return F.conv2d(hidden if factor == 1.0 else hidden * factor, self.up)


class LoraNetwork(nn.Module):
    """All LoRA modules of one run, keyed by kohya key, plus the hooks that apply them."""

    def __init__(self, targets: list[LoraTarget], dropout: float = 0.0):
        super().__init__()
        self.lora_modules = nn.ModuleDict(
            {target.key: LoraModule(target.layer, target.rank, target.alpha, dropout) for target in targets})
        # Plain dict on purpose: the target layers must not become submodules of the network.
        self._layers = {target.key: target.layer for target in targets}
        self.peft_keys = {target.key: target.peft_key for target in targets}
        self._hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        self.multiplier = 1.0

    def attach(self) -> None:
        """Start adding the LoRA outputs to the target layers (idempotent)."""
        if self._hook_handles:
            return
        for key, layer in self._layers.items():
            self._hook_handles.append(layer.register_forward_hook(self._make_hook(self.lora_modules[key])))

    def detach(self) -> None:
        """Remove every hook: the target layers behave exactly as before `attach`."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    @property
    def is_attached(self) -> bool:
        """Whether the hooks are in place."""
        return bool(self._hook_handles)

    @contextmanager
    def applied(self, multiplier: float = 1.0) -> Iterator[LoraNetwork]:
        """Attach at `multiplier` for the duration of a `with` block, then restore the previous state."""
        was_attached, previous = self.is_attached, self.multiplier
        self.multiplier = multiplier
        self.attach()
        try:
            yield self
        finally:
            self.multiplier = previous
            if not was_attached:
                self.detach()

    def parameters_with_prefix(self, prefix: str) -> list[nn.Parameter]:
        """Parameters of the modules whose key starts with `prefix` (e.g. `lora_unet`, `lora_te`)."""
        return [p for key, module in self.lora_modules.items() if key.startswith(prefix)
                for p in module.parameters()]

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in kohya layout: `key.lora_down.weight`, `key.lora_up.weight`, `key.alpha`."""
        state: dict[str, torch.Tensor] = {}
        for key, module in self.lora_modules.items():
            state[f"{key}.lora_down.weight"] = module.down.detach().float().cpu().contiguous()
            state[f"{key}.lora_up.weight"] = module.up.detach().float().cpu().contiguous()
            state[f"{key}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
        return state

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights from a kohya-layout dict whose keys and shapes match this network exactly."""
        with torch.no_grad():
            for key, module in self.lora_modules.items():
                module.down.copy_(state[f"{key}.lora_down.weight"].reshape(module.down.shape))
                module.up.copy_(state[f"{key}.lora_up.weight"].reshape(module.up.shape))
                if f"{key}.alpha" in state:
                    module.alpha = float(state[f"{key}.alpha"])

    def _make_hook(self, module: LoraModule):
        def add_lora_output(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.multiplier == 0.0:
                return output
            delta = module.delta(inputs[0], self.multiplier)
            return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

        return add_lora_output
