"""The network types: each is a module that computes the change it makes to one adapted layer.

lora (and locon, which is lora on the 3x3 convolutions too) applies its down/up pair to the layer's input and
never forms a full weight. loha, lokr and dora form their weight delta and apply it with the layer's own
operation (linear or conv2d), as LyCORIS does. Every type names its tensors as the WebUI's Lora extension
reads them (A1111 v1.10.1: `network_lora`, `network_hada`, `network_lokr`, `dora_scale`), and its
`weight_delta` is the change that extension merges into the layer's weight at the same strength.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.errors import UserError

ATTENTION_PARTS = ("q", "k", "v", "out")
"""The parts of an `nn.MultiheadAttention` LoRA adapts: the q/k/v thirds of `in_proj_weight`, and `out_proj`."""
FILE_KINDS = {"lora_down.weight": "lora", "hada_w1_a": "loha", "lokr_w1": "lokr"}
"""A tensor suffix that each kind of module has in a file, and the kind it shows."""


def attention_part_weight(attention: nn.Module, part: str) -> torch.Tensor:
    """The weight of one projection of an `nn.MultiheadAttention`: a third of `in_proj_weight`, or `out_proj`'s."""
    if part == "out":
        return attention.out_proj.weight
    return attention.in_proj_weight.chunk(3)[ATTENTION_PARTS.index(part)]


class AdapterModule(nn.Module):
    """What every network type shares: the adapted weight's shape, the layer's operation, rank, alpha, dropout.

    Subclasses define `weight_delta`, `file_tensors` and the parameters they train.
    """

    kind = ""

    def __init__(self, layer: nn.Module, part: str | None, rank: int, alpha: float, dropout: float):
        super().__init__()
        weight = layer.weight if part is None else attention_part_weight(layer, part)
        if weight.dim() not in (2, 4):
            raise ValueError(f"cannot adapt a layer whose weight has shape {tuple(weight.shape)}")
        self.weight_shape = tuple(weight.shape)
        self.conv = None if weight.dim() == 2 else {"stride": layer.stride, "padding": layer.padding,
                                                    "dilation": layer.dilation}
        # A tuple, so the adapted layer does not become a submodule of the network.
        self._base = (layer, part)
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank_dropout = 0.0
        """lora only: the probability of dropping each rank of the hidden state, per sample, in training."""

    @property
    def scale(self) -> float:
        """alpha / rank, the factor kohya, LyCORIS and the WebUI apply to the product of the factors."""
        return self.alpha / self.rank

    def base_weight(self) -> torch.Tensor:
        """The adapted layer's own (frozen) weight."""
        layer, part = self._base
        return layer.weight if part is None else attention_part_weight(layer, part)

    def weight_delta(self, multiplier: float = 1.0) -> torch.Tensor:
        """The change this module makes to the layer's weight at strength `multiplier`."""
        raise NotImplementedError

    def delta(self, inputs: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        """The module's contribution to the layer's output for `inputs` at strength `multiplier`."""
        weight_delta = self.weight_delta(multiplier)
        # fp32 weights; under autocast the functional ops below recast to the autocast dtype.
        inputs = self.dropout(inputs if inputs.dtype == weight_delta.dtype else inputs.to(weight_delta.dtype))
        if self.conv is None:
            return F.linear(inputs, weight_delta)
        return F.conv2d(inputs, weight_delta, **self.conv)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The module's tensors by their suffix in a kohya/LyCORIS file (`lora_down.weight`, `alpha`, ...)."""
        raise NotImplementedError

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy in tensors of the same suffixes and sizes as `file_tensors` gives (alpha included when present)."""
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                parameter.copy_(tensors[_file_suffix(name)].reshape(parameter.shape))
        if "alpha" in tensors:
            self.alpha = float(tensors["alpha"])

    def _alpha_tensor(self) -> torch.Tensor:
        return torch.tensor(self.alpha, dtype=torch.float32)


def _file_suffix(parameter_name: str) -> str:
    """A parameter's suffix in files: `down` -> `lora_down.weight`; LyCORIS names are used as they are."""
    return {"down": "lora_down.weight", "up": "lora_up.weight"}.get(parameter_name, parameter_name)


def _saved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().float().cpu().contiguous()


class LoraModule(AdapterModule):
    """kohya's LoRA (LoCon on convolutions): `down` sees the layer's input, `up` starts at zero."""

    kind = "lora"

    def __init__(self, layer: nn.Module, part: str | None, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(layer, part, rank, alpha, dropout)
        out_features, in_features, *kernel = self.weight_shape
        device = self.base_weight().device
        self.down = nn.Parameter(torch.empty((rank, in_features, *kernel), dtype=torch.float32, device=device))
        self.up = nn.Parameter(torch.zeros((out_features, rank, *[1] * len(kernel)), dtype=torch.float32,
                                           device=device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def delta(self, inputs: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        if inputs.dtype != self.down.dtype:
            inputs = inputs.to(self.down.dtype)
        inputs = self.dropout(inputs)
        # The scale goes on the rank-r hidden state, which is far smaller than the layer's output, and is
        # skipped at 1 (alpha = rank, full strength): a full-size multiply per layer costs about 4% of a step.
        factor = self.scale * multiplier
        if self.conv is None:
            hidden = F.linear(inputs, self.down)
        else:
            hidden = F.conv2d(inputs, self.down, **self.conv)
        if self.rank_dropout and self.training:
            hidden = hidden * self._kept_ranks(hidden)
            factor /= 1.0 - self.rank_dropout
        hidden = hidden if factor == 1.0 else hidden * factor
        return F.linear(hidden, self.up) if self.conv is None else F.conv2d(hidden, self.up)

    def _kept_ranks(self, hidden: torch.Tensor) -> torch.Tensor:
        """A 0/1 mask over the ranks of `hidden`, drawn per sample (kohya's rank_dropout)."""
        rank_axis = 1 if self.conv is not None else hidden.dim() - 1
        shape = [hidden.shape[0]] + [1] * (hidden.dim() - 1)
        shape[rank_axis] = self.rank
        return (torch.rand(shape, device=hidden.device) >= self.rank_dropout).to(hidden.dtype)

    def weight_delta(self, multiplier: float = 1.0) -> torch.Tensor:
        product = self.up.flatten(1) @ self.down.flatten(1)
        return product.reshape(self.weight_shape) * (self.scale * multiplier)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": _saved(self.down), "lora_up.weight": _saved(self.up),
                "alpha": self._alpha_tensor()}


class DoraModule(LoraModule):
    """DoRA: LoRA whose merged weight is rescaled, per input column, to a trained magnitude (`dora_scale`).

    The WebUI (A1111 v1.10.1) normalises each input column of the merged weight (over the output and kernel
    dimensions) and reads `dora_scale` shaped (1, in[, 1, 1]); that is the convention here. It starts at the
    base weight's own column norms, so a new module changes nothing.
    """

    kind = "dora"

    def __init__(self, layer: nn.Module, part: str | None, rank: int, alpha: float, dropout: float = 0.0):
        if part is not None:
            raise UserError("dora cannot adapt OpenCLIP attention (the text encoder of SD2, the second one of "
                            "SDXL): the WebUI's Lora extension cannot apply DoRA to it; turn off "
                            "train_text_encoder or use another network_type")
        super().__init__(layer, part, rank, alpha, dropout)
        self.dora_scale = nn.Parameter(_column_norms(self.base_weight().detach().float()))

    def delta(self, inputs: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        return AdapterModule.delta(self, inputs, multiplier)

    def weight_delta(self, multiplier: float = 1.0) -> torch.Tensor:
        base = self.base_weight().detach().float()
        merged = base + super().weight_delta(1.0)
        return (merged * (self.dora_scale / _column_norms(merged)) - base) * multiplier

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().file_tensors(), "dora_scale": _saved(self.dora_scale)}


def _column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of a weight (over output and kernel dimensions), shaped (1, in[, 1, 1])."""
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return columns.norm(dim=1).reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


class LohaModule(AdapterModule):
    """LoHa (LyCORIS): the Hadamard product of two rank-r products, `(w1_a @ w1_b) * (w2_a @ w2_b)`."""

    kind = "loha"

    def __init__(self, layer: nn.Module, part: str | None, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(layer, part, rank, alpha, dropout)
        out_features, in_size = self.weight_shape[0], math.prod(self.weight_shape[1:])
        device = self.base_weight().device
        self.hada_w1_a = nn.Parameter(torch.randn(out_features, rank, device=device) * 0.1)
        self.hada_w1_b = nn.Parameter(torch.randn(rank, in_size, device=device))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.hada_w2_b = nn.Parameter(torch.randn(rank, in_size, device=device))

    def weight_delta(self, multiplier: float = 1.0) -> torch.Tensor:
        product = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return product.reshape(self.weight_shape) * (self.scale * multiplier)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {**{name: _saved(parameter) for name, parameter in self.named_parameters()},
                "alpha": self._alpha_tensor()}


class LokrModule(AdapterModule):
    """LoKr (LyCORIS): the Kronecker product of a small full matrix `lokr_w1` and a larger one, trained as a
    rank-r product `lokr_w2_a @ lokr_w2_b` or, when the rank would not be smaller than half its sides (or
    `full_matrix`), as the full `lokr_w2`. Each weight dimension is split into two factors by `factorization`.

    As in LyCORIS and the WebUI, alpha / rank scales only the rank-r form; the full form is applied unscaled.
    """

    kind = "lokr"

    def __init__(self, layer: nn.Module, part: str | None, rank: int, alpha: float, dropout: float = 0.0,
                 factor: int = -1, full_matrix: bool = False):
        super().__init__(layer, part, rank, alpha, dropout)
        out_features, in_features, *kernel = self.weight_shape
        out_small, out_large = factorization(out_features, factor)
        in_small, in_large = factorization(in_features, factor)
        device = self.base_weight().device
        self.lokr_w1 = nn.Parameter(torch.empty(out_small, in_small, device=device))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.full_matrix = full_matrix or rank >= max(out_large, in_large) / 2
        if self.full_matrix:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_large, in_large, *kernel, device=device))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_large, rank, device=device))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_large * math.prod(kernel), device=device))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        self._large_shape = (out_large, in_large, *kernel)

    @property
    def scale(self) -> float:
        return 1.0 if self.full_matrix else self.alpha / self.rank

    def weight_delta(self, multiplier: float = 1.0) -> torch.Tensor:
        large = self.lokr_w2 if self.full_matrix else (self.lokr_w2_a @ self.lokr_w2_b).reshape(self._large_shape)
        small = self.lokr_w1 if self.conv is None else self.lokr_w1[:, :, None, None]
        return torch.kron(small, large) * (self.scale * multiplier)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {**{name: _saved(parameter) for name, parameter in self.named_parameters()},
                "alpha": self._alpha_tensor()}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (small, large) with small * large == dimension, as LyCORIS splits it: with a
    `factor` that divides it, (factor, dimension // factor) in order; otherwise the most square split whose
    smaller side is at most `factor` (-1: no limit)."""
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))
    limit = dimension if factor < 0 else factor
    small, large = 1, dimension
    while small < large:
        candidate = small + 1
        while dimension % candidate:
            candidate += 1
        if candidate + dimension // candidate > small + large or candidate > limit:
            break
        small, large = candidate, dimension // candidate
    return (small, large) if small <= large else (large, small)


def new_module(kind: str, layer: nn.Module, part: str | None, rank: int, alpha: float, dropout: float = 0.0,
               lokr_factor: int = -1, lokr_full_matrix: bool = False) -> AdapterModule:
    """A fresh module of `kind` (lora, loha, lokr or dora; locon is lora) for one layer."""
    if kind == "lokr":
        return LokrModule(layer, part, rank, alpha, dropout, lokr_factor, lokr_full_matrix)
    return {"lora": LoraModule, "dora": DoraModule, "loha": LohaModule}[kind](layer, part, rank, alpha, dropout)


def file_module_kind(tensors: dict[str, torch.Tensor]) -> str:
    """The kind of module one layer's tensors in a file make (lora, dora, loha, lokr), or "" when none."""
    for suffix, kind in FILE_KINDS.items():
        if suffix in tensors:
            return "dora" if kind == "lora" and "dora_scale" in tensors else kind
    return ""


def module_from_file(layer: nn.Module, part: str | None, tensors: dict[str, torch.Tensor],
                     where: str, dropout: float = 0.0) -> AdapterModule:
    """The module that one layer's tensors in a kohya/LyCORIS file describe, loaded with them.

    Layouts this trainer does not train (LoRA with `lora_mid`, LoHa/LoKr in Tucker form, LoKr with `lokr_w1`
    decomposed) are a `UserError` naming `where`.
    """
    kind = file_module_kind(tensors)
    unsupported = {"lora_mid.weight", "hada_t1", "hada_t2", "lokr_t2", "lokr_w1_a"} & set(tensors)
    if not kind or unsupported:
        raise UserError(f"{where}: a layout this trainer cannot load ({', '.join(sorted(tensors))})")
    rank_tensor = {"lora": "lora_down.weight", "dora": "lora_down.weight", "loha": "hada_w1_b",
                   "lokr": "lokr_w2_b"}[kind]
    rank = int(tensors[rank_tensor].shape[0]) if rank_tensor in tensors else 1
    alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
    if kind != "lokr":
        module = new_module(kind, layer, part, rank, alpha, dropout)
    else:
        module = _lokr_like(layer, part, tensors, rank, alpha, where, dropout)
    if problem := tensor_mismatch(tensors, module.file_tensors()):
        raise UserError(f"{where}: {problem} (a file for another model family?)")
    module.load_file_tensors(tensors)
    return module


def tensor_mismatch(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """What keeps `found` (one layer's tensors in a file) from loading where `expected` are; "" when nothing."""
    for suffix, tensor in expected.items():
        if suffix == "alpha":  # optional: alpha defaults to the rank
            continue
        if suffix not in found:
            return f"it has no {suffix}"
        if found[suffix].numel() != tensor.numel():
            return f"its {suffix} has shape {tuple(found[suffix].shape)} where {tuple(tensor.shape)} is needed"
    return ""


def _lokr_like(layer: nn.Module, part: str | None, tensors: dict[str, torch.Tensor], rank: int, alpha: float,
               where: str, dropout: float = 0.0) -> LokrModule:
    """A `LokrModule` whose split of the weight dimensions is the one `lokr_w1`'s shape shows."""
    wanted = tuple(tensors["lokr_w1"].shape)
    for factor in (-1, *wanted):
        module = LokrModule(layer, part, rank, alpha, dropout, factor=factor, full_matrix="lokr_w2" in tensors)
        if tuple(module.lokr_w1.shape) == wanted:
            return module
    raise UserError(f"{where}: lokr_w1 has shape {wanted}, which splits no dimension of this layer the way "
                    "LyCORIS does")
