"""The network types (lora, loha, lokr, dora) in the one hook mechanism, on small layers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_trainer.config import config_from_dict
from lora_trainer.errors import UserError
from lora_trainer.lora.files import LoraFile, check_matches_network
from lora_trainer.lora.metadata import network_metadata
from lora_trainer.lora.network import LoraNetwork, LoraTarget
from lora_trainer.lora.network_types import factorization
from lora_trainer.lora.targets import network_from_file
from lora_trainer.models.base import LoraRoot
from tests.webui_lora import webui_updown

KINDS = ("lora", "loha", "lokr", "dora")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(1), nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 12))


def _network(model: nn.Module, kind: str, rank: int = 2, alpha: float = 3.0, **lokr) -> LoraNetwork:
    return LoraNetwork([LoraTarget(f"lora_unet_{index}", f"unet.{index}", model[index], rank, alpha, None, kind,
                                   **lokr) for index in (0, 2, 3)])


def _randomised(network: LoraNetwork) -> LoraNetwork:
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return network


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_module_of_each_type_leaves_the_output_exactly_as_it_was(kind):
    model = _model()
    inputs = torch.randn(2, 4, 4, 4)
    base = model(inputs)
    with _network(model, kind).applied(1.0):
        assert torch.equal(model(inputs), base)


@pytest.mark.parametrize(("kind", "lokr"), [(kind, {}) for kind in KINDS] + [
    ("lokr", {"lokr_full_matrix": True}), ("lokr", {"lokr_factor": 2})])
def test_each_type_acts_as_the_webui_merges_its_tensors(kind, lokr):
    model = _model()
    network = _randomised(_network(model, kind, **lokr))
    state = network.kohya_state_dict()
    inputs = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        with network.applied(0.6):
            ours = model(inputs)
        for index in (0, 2, 3):
            tensors = {name.partition(".")[2]: tensor for name, tensor in state.items()
                       if name.startswith(f"lora_unet_{index}.")}
            model[index].weight += webui_updown(tensors, model[index].weight, 0.6)
        assert (ours - model(inputs)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_every_type_trains_its_own_parameters_only(kind):
    model = _model().requires_grad_(False)
    network = _network(model, kind)
    with network.applied():
        model(torch.randn(2, 4, 4, 4)).square().sum().backward()
    assert all(parameter.grad is not None for parameter in network.parameters())
    assert all(parameter.grad is None for parameter in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_file_of_each_type_reads_back_as_that_type(kind, tmp_path):
    model = _model()
    network = _randomised(_network(model, kind, lokr_factor=2))
    save_file(network.kohya_state_dict(), str(tmp_path / "net.safetensors"))
    root = LoraRoot("lora_unet", "unet", model, is_text_encoder=False, kohya_path=str, peft_path=str)
    loaded = network_from_file([root], tmp_path / "net.safetensors")
    assert {module.kind for module in loaded.lora_modules.values()} == {kind}
    inputs = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        with network.applied(1.0):
            expected = model(inputs)
        with loaded.applied(1.0):
            assert torch.allclose(model(inputs), expected, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_weights_of_each_type_continue_in_a_fresh_network_of_the_same_settings(kind):
    model = _model()
    trained = _randomised(_network(model, kind))
    fresh = _network(model, kind)
    check_matches_network(LoraFile(trained.kohya_state_dict(), {}), fresh, "the resume state")
    fresh.load_kohya_state_dict(trained.kohya_state_dict())
    inputs = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        with trained.applied(0.8):
            expected = model(inputs)
        with fresh.applied(0.8):
            assert torch.equal(model(inputs), expected)


def test_a_file_of_another_type_is_refused_naming_both_types():
    model = _model()
    file = LoraFile(_network(model, "loha").kohya_state_dict(), {})
    with pytest.raises(UserError, match="the file is loha where this run trains lora.*set network_type"):
        check_matches_network(file, _network(model, "lora"), "init_lora_weights x")


def test_a_lokr_file_of_another_factor_is_refused_saying_what_differs():
    model = _model()
    file = LoraFile(_network(model, "lokr", lokr_factor=2).kohya_state_dict(), {})
    with pytest.raises(UserError, match="lokr_w1 has shape .* where .* is needed.*lokr_factor"):
        check_matches_network(file, _network(model, "lokr", lokr_factor=4), "init_lora_weights x")


def test_lokr_splits_dimensions_as_lycoris_does():
    # Rows of LyCORIS's own table (lycoris/functional/general.py, factorization); its row "360 -> 8, 45" for -1
    # is not what its code computes (18, 20), which is what the files it writes hold.
    table = {-1: [(128, (8, 16)), (250, (10, 25)), (360, (18, 20)), (1024, (32, 32))],
             4: [(128, (4, 32)), (250, (2, 125)), (512, (4, 128))],
             8: [(250, (5, 50)), (360, (8, 45)), (1024, (8, 128))]}
    for factor, rows in table.items():
        assert [factorization(dimension, factor) for dimension, _ in rows] == [split for _, split in rows]


def test_files_name_their_network_module_and_args_as_kohya_and_lycoris_do():
    def described(network_type: str = "lora", with_conv: bool = False, **settings):
        model = _model()
        kind = {"locon": "lora"}.get(network_type, network_type)
        ranks = [(0, 4)] * with_conv + [(2, 8), (3, 8)]
        network = LoraNetwork([LoraTarget(f"lora_unet_{index}", f"unet.{index}", model[index], rank, float(rank),
                                          None, kind) for index, rank in ranks])
        metadata = network_metadata(config_from_dict(dict(network_type=network_type, **settings)).network, network)
        return metadata["ss_network_module"], json.loads(metadata["ss_network_args"]), metadata["ss_network_dim"]

    assert described() == ("networks.lora", {}, "8")
    assert described(with_conv=True) == ("networks.lora", {"conv_dim": "4", "conv_alpha": "4.0"}, "8")
    assert described("locon", with_conv=True) == \
        ("lycoris.kohya", {"algo": "locon", "conv_dim": "4", "conv_alpha": "4.0"}, "8")
    assert described("lokr", lokr_factor=8)[1] == {"algo": "lokr", "factor": "8", "full_matrix": "False"}
    assert described("dora")[1] == {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}
    assert described("loha")[1]["algo"] == "loha"


def test_the_diffusers_layout_is_refused_for_types_it_cannot_hold():
    with pytest.raises(UserError, match="save_diffusers_format writes plain LoRA only"):
        config_from_dict(dict(network_type="loha", save_diffusers_format=True))
