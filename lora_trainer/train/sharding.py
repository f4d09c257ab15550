"""Fully sharded data parallel training (FSDP2, torch's `fully_shard`) of the language-model trainer, when
accelerate's own config asks for FSDP (`accelerate launch --use_fsdp`, `accelerate config`): every process keeps
only its share of every weight, frozen base included, and gathers a layer's weights only while it computes.

The trainer shards with FSDP2 whichever `fsdp_version` the config names: FSDP2 keeps each weight a parameter
of its own, which a LoRA's mix of frozen and trainable weights in one layer needs. Of accelerate's FSDP settings
the sharding strategy (or `reshard_after_forward`), parameter offload to the CPU and the layer classes to wrap
apply; the others are FSDP1's and change nothing here.
"""

from __future__ import annotations

import os

import torch

from lora_trainer.errors import UserError


def sharding_requested() -> bool:
    """Whether accelerate's config (`--use_fsdp`, `accelerate config`) asks for FSDP in this launch."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1", "yes")


def shard_model(model, device: torch.device, process_count: int) -> None:
    """Shard `model`'s parameters over the `process_count` processes of the launch, in place, moving each
    process's shards to `device`: each transformer layer (accelerate's `fsdp_transformer_layer_cls_to_wrap`, else
    the classes the model names as not to be split) is gathered on its own, the rest with the model itself.
    `model.generate` gathers as a forward does."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard, register_fsdp_forward_method
    from torch.distributed.fsdp.fully_sharded_data_parallel import ShardingStrategy

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version == 1:
        if plugin.sharding_strategy == ShardingStrategy.NO_SHARD:
            raise UserError("FSDP's sharding strategy NO_SHARD shards nothing: launch without --use_fsdp "
                            "(plain data parallelism) or choose FULL_SHARD")
        reshard_after_forward = plugin.sharding_strategy != ShardingStrategy.SHARD_GRAD_OP
        offload = bool(plugin.cpu_offload and plugin.cpu_offload.offload_params)
    else:
        reshard_after_forward = bool(plugin.reshard_after_forward)
        offload = isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    options = dict(mesh=init_device_mesh(device.type, (process_count,)), reshard_after_forward=reshard_after_forward)
    if offload:
        options["offload_policy"] = CPUOffloadPolicy()
    layer_classes = set(plugin.transformer_cls_names_to_wrap or _unsplit_classes(model))
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise UserError(f"FSDP: no layer of the model is of the classes to wrap ({', '.join(sorted(layer_classes))}"
                        "); set fsdp_transformer_layer_cls_to_wrap in accelerate's config to the model's layer class")
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    register_fsdp_forward_method(model, "generate")


def _unsplit_classes(model) -> list[str]:
    """The layer classes a transformers model says must stay whole (its decoder layers)."""
    for module in model.modules():
        if getattr(module, "_no_split_modules", None):
            return list(module._no_split_modules)
    return []


def local_parameter_bytes(model) -> int:
    """The bytes of parameter storage this process holds: its shards of the sharded ones, all of the others."""
    from torch.distributed.tensor import DTensor

    local = [parameter.to_local() if isinstance(parameter, DTensor) else parameter for parameter in model.parameters()]
    return sum(tensor.numel() * tensor.element_size() for tensor in local)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor (a collective call: every process must make it), else `tensor` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharded_like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`tensor`, whole on every process, cut as the sharded `reference` is (itself where that is not sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor):
        return tensor
    return distribute_tensor(tensor.to(reference.device, reference.dtype), reference.device_mesh,
                             reference.placements)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded tensor whole, as one process would have saved it."""
    state_dict = optimizer.state_dict()
    state_dict["state"] = {index: {name: full_tensor(value) for name, value in state.items()}
                           for index, state in state_dict["state"].items()}
    return state_dict


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict` of a whole state, cut each parameter's state as the parameter is cut."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == parameter.shape and value.dim():
                    state[name] = sharded_like(value, parameter)
