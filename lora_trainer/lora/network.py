"""The one LoRA mechanism: forward hooks that add each network type's output delta (for lora,
`scale * up(down(x))`) to a frozen layer's output.

The adapted model's module tree is never changed: no wrapper modules, no renamed parameters. The LoRA
weights live in a separate `LoraNetwork`, which attaches hooks to the target layers and removes them
again. This works the same on diffusers, transformers, ldm/sgm and Forge layers, because a target is
recognised by its weight's shape (2-D: linear, 4-D: convolution), not by its class.

One layer type cannot be reached by a hook: `nn.MultiheadAttention` (OpenCLIP's text encoders in SD2 and
SDXL) projects q, k and v with one fused `in_proj_weight` and never calls its `out_proj` module. Its four
LoRA parts are applied the way the WebUI applies them, as weight deltas (lora: `up @ down * scale`), through an
instance `forward` that runs `F.multi_head_attention_forward` on the base weights plus the deltas; detaching
deletes that instance attribute again, so the class's forward shows through as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.lora.network_types import ATTENTION_PARTS, AdapterModule, new_module


@dataclass(frozen=True)
class LoraTarget:
    """A layer to adapt: its kohya key (`lora_unet_..._to_q`), its diffusers/peft key
    (`unet.down_blocks.0....to_q`), the layer, and the rank and alpha. For an `nn.MultiheadAttention`, `part`
    says which of its projections (one of `ATTENTION_PARTS`). `kind` is the network type of its module (lora,
    loha, lokr, dora; locon is lora), with LoKr's factor and full-matrix option."""

    key: str
    peft_key: str
    layer: nn.Module
    rank: int
    alpha: float
    part: str | None = None
    kind: str = "lora"
    lokr_factor: int = -1
    lokr_full_matrix: bool = False


class LoraNetwork(nn.Module):
    """All LoRA modules of one run, keyed by kohya key, plus the hooks that apply them. `modules` gives ready
    modules by key (read from a file) instead of new ones made from the targets."""

    def __init__(self, targets: list[LoraTarget], dropout: float = 0.0,
                 modules: dict[str, AdapterModule] | None = None):
        super().__init__()
        if dropout and any(target.part for target in targets):
            raise UserError("lora_dropout cannot be used on OpenCLIP attention (the text encoder of SD2, the second "
                            "one of SDXL), whose LoRA is applied to the weights; set lora_dropout to 0 or turn off "
                            "train_text_encoder")
        self.lora_modules = nn.ModuleDict(modules or {
            target.key: new_module(target.kind, target.layer, target.part, target.rank, target.alpha, dropout,
                                   target.lokr_factor, target.lokr_full_matrix) for target in targets})
        # Plain dicts on purpose: the target layers must not become submodules of the network.
        self._layers = {target.key: target.layer for target in targets if target.part is None}
        self._attentions: dict[nn.Module, dict[str, AdapterModule]] = {}
        for target in targets:
            if target.part is not None:
                self._attentions.setdefault(target.layer, {})[target.part] = self.lora_modules[target.key]
        incomplete = [target.key for target in targets
                      if target.part is not None and set(self._attentions[target.layer]) != set(ATTENTION_PARTS)]
        if incomplete:
            raise UserError(f"OpenCLIP attention takes LoRA on q_proj, k_proj, v_proj and out_proj together (the WebUI "
                            f"applies them only as a set), but {incomplete[0]} comes without the others; list all "
                            "four in text_encoder_target_modules")
        self.peft_keys = {target.key: target.peft_key for target in targets}
        self._hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attached = False
        self.multiplier = 1.0
        self.module_dropout = 0.0

    def use_dropouts(self, rank_dropout: float, module_dropout: float) -> None:
        """Turn on kohya's rank dropout (lora modules on hooked layers only) and module dropout for training."""
        if rank_dropout:
            unfit = [key for key, module in self.lora_modules.items() if module.kind != "lora"
                     or key not in self._layers]
            if unfit:
                raise UserError(f"rank_dropout applies to lora/locon layers of the UNet and CLIP text encoders, "
                                f"not to {unfit[0]} ({self.lora_modules[unfit[0]].kind}); set rank_dropout to 0")
        for module in self.lora_modules.values():
            module.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

    def _dropped(self) -> bool:
        """Whether module dropout skips a LoRA module for this forward (training only)."""
        return bool(self.module_dropout and self.training and torch.rand(()) < self.module_dropout)

    def attach(self) -> None:
        """Start adding the LoRA outputs to the target layers (idempotent)."""
        if self._attached:
            return
        for attention in self._attentions:
            if "forward" in vars(attention):
                raise RuntimeError(f"{type(attention).__name__} already has an instance forward; is another LoRA "
                                   "attached to it?")
        for key, layer in self._layers.items():
            self._hook_handles.append(layer.register_forward_hook(self._make_hook(self.lora_modules[key])))
        for attention, parts in self._attentions.items():
            attention.forward = partial(_attention_with_lora, attention, parts, self)
        self._attached = True

    def detach(self) -> None:
        """Remove every hook: the target layers behave exactly as before `attach`."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        for attention in self._attentions:
            vars(attention).pop("forward", None)
        self._attached = False

    @property
    def is_attached(self) -> bool:
        """Whether the hooks are in place."""
        return self._attached

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
        """Weights in kohya/LyCORIS layout: `key.lora_down.weight`, `key.lora_up.weight`, `key.alpha` for lora,
        plus `key.dora_scale` for dora, `key.hada_w1_a`, ... for loha, `key.lokr_w1`, ... for lokr."""
        return {f"{key}.{suffix}": tensor for key, module in self.lora_modules.items()
                for suffix, tensor in module.file_tensors().items()}

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy weights from a kohya/LyCORIS-layout dict whose keys and sizes match this network exactly."""
        for key, module in self.lora_modules.items():
            prefix = f"{key}."
            module.load_file_tensors({name[len(prefix):]: tensor for name, tensor in state.items()
                                      if name.startswith(prefix)})

    def _make_hook(self, module: AdapterModule):
        def add_lora_output(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.multiplier == 0.0 or self._dropped():
                return output
            delta = module.delta(inputs[0], self.multiplier)
            return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

        return add_lora_output


def _attention_with_lora(attention: nn.MultiheadAttention, parts: dict[str, AdapterModule], network: LoraNetwork,
                         query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                         attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                         is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`nn.MultiheadAttention.forward` (its general path) on the base weights plus the LoRA weight deltas."""
    in_weight, out_weight = attention.in_proj_weight, attention.out_proj.weight
    if network.multiplier != 0.0:
        multipliers = {part: 0.0 if network._dropped() else network.multiplier for part in parts}
        in_delta = torch.cat([parts[part].weight_delta(multipliers[part]) for part in ("q", "k", "v")])
        in_weight = in_weight + in_delta.to(in_weight.dtype)
        out_weight = out_weight + parts["out"].weight_delta(multipliers["out"]).to(out_weight.dtype)
    batch_first = attention.batch_first and query.dim() == 3
    if batch_first:
        query, key, value = (tensor.transpose(0, 1) for tensor in (query, key, value))
    output, weights = F.multi_head_attention_forward(
        query, key, value, attention.embed_dim, attention.num_heads, in_weight, attention.in_proj_bias,
        attention.bias_k, attention.bias_v, attention.add_zero_attn, attention.dropout, out_weight,
        attention.out_proj.bias, training=attention.training, key_padding_mask=key_padding_mask,
        need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average_attn_weights,
        is_causal=is_causal)
    return (output.transpose(0, 1) if batch_first else output), weights
