"""The hook-based LoRA mechanism on a plain torch module tree (runs in both environments)."""

import copy

import pytest
import torch
from torch import nn

from lora_trainer.errors import UserError
from lora_trainer.lora.network import LoraNetwork, LoraTarget


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(1), nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 4))


def _network(model: nn.Module, rank: int = 2, alpha: float = 1.0) -> LoraNetwork:
    targets = [LoraTarget("lora_unet_0", "unet.0", model[0], rank, alpha),
               LoraTarget("lora_unet_2", "unet.2", model[2], rank, alpha)]
    network = LoraNetwork(targets)
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.up.normal_()
    return network


def _tree(model: nn.Module) -> list:
    return [(name, type(module).__name__) for name, module in model.named_modules()] + list(
        model.state_dict().keys())


def test_attaching_changes_outputs_but_not_the_module_tree():
    model = _model()
    inputs = torch.randn(2, 3, 4, 4)
    base_output, tree = model(inputs), _tree(model)
    network = _network(model)
    with network.applied(1.0):
        adapted = model(inputs)
        assert _tree(model) == tree
    assert not torch.allclose(adapted, base_output)


def test_detaching_restores_the_exact_base_output():
    model = _model()
    inputs = torch.randn(2, 3, 4, 4)
    base_output = model(inputs)
    network = _network(model)
    network.attach()
    network.detach()
    assert torch.equal(model(inputs), base_output)


def test_multiplier_zero_is_exactly_the_base_model():
    model = _model()
    inputs = torch.randn(2, 3, 4, 4)
    base_output = model(inputs)
    with _network(model).applied(0.0):
        assert torch.equal(model(inputs), base_output)


def test_linear_lora_equals_merged_weight_delta_times_alpha_over_rank():
    layer = nn.Linear(6, 5)
    network = _network_for(layer, rank=3, alpha=1.5)
    module = network.lora_modules["lora_unet_x"]
    inputs = torch.randn(4, 6)
    merged = layer.weight + (module.up @ module.down) * (1.5 / 3)
    with network.applied(0.7):
        expected = inputs @ (layer.weight + 0.7 * (merged - layer.weight)).T + layer.bias
        assert torch.allclose(layer(inputs), expected, atol=1e-6)


def _network_for(layer: nn.Module, rank: int, alpha: float) -> LoraNetwork:
    network = LoraNetwork([LoraTarget("lora_unet_x", "unet.x", layer, rank, alpha)])
    with torch.no_grad():
        network.lora_modules["lora_unet_x"].up.normal_()
    return network


def test_only_lora_parameters_receive_gradients():
    model = _model().requires_grad_(False)
    network = _network(model)
    with network.applied():
        model(torch.randn(2, 3, 4, 4)).sum().backward()
    assert all(p.grad is not None for p in network.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_kohya_state_dict_round_trips_into_a_fresh_network():
    model = _model()
    network = _network(model, rank=2, alpha=4.0)
    state = network.kohya_state_dict()
    assert set(state) == {f"lora_unet_{i}.{part}" for i in (0, 2) for part in
                          ("lora_down.weight", "lora_up.weight", "alpha")}
    assert state["lora_unet_0.lora_down.weight"].shape == (2, 3, 3, 3)
    assert state["lora_unet_0.lora_up.weight"].shape == (8, 2, 1, 1)
    fresh = LoraNetwork([LoraTarget("lora_unet_0", "unet.0", model[0], 2, 1.0),
                         LoraTarget("lora_unet_2", "unet.2", model[2], 2, 1.0)])
    fresh.load_kohya_state_dict(state)
    inputs = torch.randn(1, 3, 4, 4)
    with network.applied():
        expected = model(inputs)
    with fresh.applied():
        assert torch.equal(model(inputs), expected)


def _attention_network(attention: nn.MultiheadAttention, rank: int = 2, alpha: float = 3.0) -> LoraNetwork:
    network = LoraNetwork([LoraTarget(f"lora_te_self_attn_{part}_proj", f"text_encoder.self_attn.{part}_proj",
                                      attention, rank, alpha, part) for part in ("q", "k", "v", "out")])
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.up.normal_()
    return network


@pytest.mark.parametrize("batch_first", [False, True])
def test_fused_attention_lora_equals_the_merged_weights_and_detaches_cleanly(batch_first):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    inputs = torch.randn(3, 5, 8)
    mask = torch.triu(torch.full((5, 5) if batch_first else (3, 3), float("-inf")), 1)
    base = attention(inputs, inputs, inputs, need_weights=False, attn_mask=mask)[0]
    network = _attention_network(attention)
    parts = {key.split("_")[-2]: module for key, module in network.lora_modules.items()}
    with network.applied(0.5):
        adapted = attention(inputs, inputs, inputs, need_weights=False, attn_mask=mask)[0]
        assert "forward" in vars(attention)
    merged = copy.deepcopy(attention)
    with torch.no_grad():
        merged.in_proj_weight += torch.cat([parts[part].weight_delta(0.5) for part in "qkv"])
        merged.out_proj.weight += parts["out"].weight_delta(0.5)
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert torch.allclose(adapted, merged(inputs, inputs, inputs, need_weights=False, attn_mask=mask)[0], atol=1e-5)
    assert "forward" not in vars(attention)
    assert torch.equal(attention(inputs, inputs, inputs, need_weights=False, attn_mask=mask)[0], base)


def test_fused_attention_lora_trains_all_four_parts():
    attention = nn.MultiheadAttention(8, 2)
    attention.requires_grad_(False)
    network = _attention_network(attention)
    with network.applied(1.0):
        inputs = torch.randn(4, 2, 8)
        attention(inputs, inputs, inputs)[0].square().sum().backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in network.parameters())
    assert all(parameter.grad is None for parameter in attention.parameters())


def test_fused_attention_lora_needs_all_four_parts():
    attention = nn.MultiheadAttention(8, 2)
    with pytest.raises(UserError, match="q_proj, k_proj, v_proj and out_proj together"):
        LoraNetwork([LoraTarget("lora_te_q_proj", "text_encoder.q_proj", attention, 2, 2.0, "q")])


def test_rank_dropout_drops_whole_ranks_per_sample_and_keeps_the_mean():
    torch.manual_seed(1)
    layer = nn.Linear(8, 8)
    network = LoraNetwork([LoraTarget("lora_unet_a", "unet.a", layer, 4, 4.0)])
    with torch.no_grad():
        network.lora_modules["lora_unet_a"].up.normal_()
    network.use_dropouts(rank_dropout=0.5, module_dropout=0.0)
    module = network.lora_modules["lora_unet_a"]
    inputs = torch.randn(1, 3, 8).expand(4000, 3, 8)
    network.train()
    dropped = module.delta(inputs)
    network.eval()
    full = module.delta(inputs[:1])
    # One mask per sample, shared by its tokens: each sample's delta is a sum over a subset of the 4 ranks.
    assert len({tuple(sample.flatten().round(decimals=4).tolist()) for sample in dropped}) <= 16
    assert torch.allclose(dropped.mean(0), full[0], atol=0.15 * full.abs().max().item())
    assert not torch.allclose(dropped[0], full[0])


def test_module_dropout_skips_a_layers_lora_only_in_training():
    model = _model()
    inputs = torch.randn(2, 3, 4, 4)
    base_output = model(inputs)
    network = _network(model)
    network.use_dropouts(rank_dropout=0.0, module_dropout=0.5)
    with network.applied(1.0):
        network.train()
        torch.manual_seed(0)
        skipped_both = sum(torch.equal(model(inputs), base_output) for _ in range(400)) / 400
        network.eval()
        assert not torch.equal(model(inputs), base_output)
    assert 0.18 < skipped_both < 0.32  # both layers skipped: 0.5 * 0.5


def test_rank_dropout_is_refused_where_there_are_no_ranks_to_drop():
    network = LoraNetwork([LoraTarget("lora_unet_a", "unet.a", nn.Linear(8, 8), 4, 4.0, kind="loha")])
    with pytest.raises(UserError, match="rank_dropout applies to lora/locon"):
        network.use_dropouts(rank_dropout=0.1, module_dropout=0.0)
