"""fp8 storage of the frozen UNet (`fp8_base`): every linear and convolution weight is held as float8_e4m3fn
and upcast, layer by layer, to the dtype the layer computes in, as kohya's sd-scripts and OneTrainer do.

The backward pass keeps only the fp8 weight and upcasts it again, so no full-precision copy of a weight lives
longer than its layer's forward or backward. The original weights wait in CPU memory and come back afterwards
as the same parameter objects, bit for bit. The layers themselves are not replaced: each gets an instance
`forward` for the run (removed afterwards), so forward hooks such as LoRA's still see the layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.errors import UserError

FP8 = torch.float8_e4m3fn


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(inputs, weight.to(inputs.dtype), None if bias is None else bias.to(inputs.dtype))

    @staticmethod
    def backward(ctx, gradient):
        (weight,) = ctx.saved_tensors
        return gradient @ weight.to(gradient.dtype), None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.shape, ctx.settings = inputs.shape, (stride, padding, dilation, groups)
        return F.conv2d(inputs, weight.to(inputs.dtype), None if bias is None else bias.to(inputs.dtype),
                        stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gradient):
        (weight,) = ctx.saved_tensors
        inputs_gradient = torch.nn.grad.conv2d_input(ctx.shape, weight.to(gradient.dtype), gradient,
                                                     *ctx.settings)
        return inputs_gradient, None, None, None, None, None, None


def _compute_dtype(inputs: torch.Tensor) -> torch.dtype:
    device_type = inputs.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return inputs.dtype


def _linear_forward(layer: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    inputs = inputs.to(_compute_dtype(inputs))
    with torch.autocast(inputs.device.type, enabled=False):
        return _Fp8Linear.apply(inputs, layer.weight, layer.bias)


def _conv_forward(layer: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    inputs = inputs.to(_compute_dtype(inputs))
    with torch.autocast(inputs.device.type, enabled=False):
        return _Fp8Conv2d.apply(inputs, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                                layer.groups)


def fp8_layers(module: nn.Module) -> list[nn.Module]:
    """The linear and (zero-padded, numerically padded) convolution layers of `module` that fp8 storage covers;
    not those whose forward something else has replaced for the run."""
    return [layer for layer in module.modules()
            if "forward" not in vars(layer) and (isinstance(layer, nn.Linear) or (
                isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)))]


@contextmanager
def fp8_weights(module: nn.Module) -> Iterator[None]:
    """Hold the weights of `module`'s linear and convolution layers in fp8 for the block; afterwards the
    original weights are back on their devices, in their dtypes, bit for bit, and the layers' forwards are their
    class's again."""
    layers = fp8_layers(module)
    if not layers:
        raise UserError("fp8_base found no torch linear or convolution layers in this UNet; turn fp8_base off")
    originals: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                original = layer.weight.data.to("cpu", copy=True)
                layer.weight.data = layer.weight.data.to(FP8)
                layer.forward = partial(_linear_forward if isinstance(layer, nn.Linear) else _conv_forward, layer)
                originals.append((layer, original))
        yield
    finally:
        with torch.no_grad():
            for layer, original in originals:
                del layer.forward
                layer.weight.data = original.to(layer.weight.device)
