"""Optimizers by name or import path with their arguments, LoRA+, the schedule's floor and warmup as a ratio."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from lora_trainer.config import config_from_dict
from lora_trainer.errors import UserError
from lora_trainer.lora.network import LoraNetwork, LoraTarget
from lora_trainer.train.optim import lora_parameter_groups, make_optimizer, make_scheduler


def _network() -> LoraNetwork:
    return LoraNetwork([LoraTarget("lora_unet_a", "unet.a", nn.Linear(4, 4), 2, 2.0),
                        LoraTarget("lora_te_b", "text_encoder.b", nn.Linear(4, 4), 2, 2.0)])


def _optimizer(**settings):
    config = config_from_dict(settings)
    return make_optimizer(config, lora_parameter_groups(_network(), config.optimizer))


def test_loraplus_gives_the_up_matrices_their_own_faster_groups():
    network = _network()
    config = config_from_dict({"unet_lr": 1e-4, "text_encoder_lr": 1e-5, "loraplus_lr_ratio": 16})
    groups = lora_parameter_groups(network, config.optimizer)
    assert [(group["name"], group["lr"]) for group in groups] == [
        ("unet", 1e-4), ("unet_up", 1.6e-3), ("text_encoder", 1e-5), ("text_encoder_up", 1.6e-4)]
    assert groups[1]["params"] == [network.lora_modules["lora_unet_a"].up]


def test_adamw8bit_keeps_its_moments_in_bytes_and_steps_like_adamw():
    pytest.importorskip("bitsandbytes")

    def train(optimizer_type: str):
        """(the optimizer, the down matrix before, after 10 steps) on one seed."""
        torch.manual_seed(0)
        network = LoraNetwork([LoraTarget("lora_unet_a", "unet.a", nn.Linear(256, 256), 16, 16.0)])
        config = config_from_dict({"optimizer_type": optimizer_type, "learning_rate": 1e-3})
        optimizer = make_optimizer(config, lora_parameter_groups(network, config.optimizer))
        module = network.lora_modules["lora_unet_a"]
        nn.init.normal_(module.up, std=0.01)
        before = module.down.detach().clone()
        inputs = torch.randn(32, 256)
        for _ in range(10):
            (module.delta(inputs) - inputs).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return optimizer, before, module.down.detach()

    eight_bit, before, eight_bit_after = train("adamw8bit")
    _, _, full_after = train("adamw")
    moments = eight_bit.state[eight_bit.param_groups[0]["params"][0]]
    assert moments["state1"].dtype == moments["state2"].dtype == torch.uint8
    assert (eight_bit_after - full_after).abs().max() < 0.25 * (full_after - before).abs().max()  # 8.5% measured


def test_optimizer_args_reach_the_optimizer_over_the_defaults():
    optimizer = _optimizer(optimizer_args={"betas": [0.8, 0.9], "weight_decay": 0.5})
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9) and optimizer.param_groups[0]["weight_decay"] == 0.5


def test_kohyas_key_value_optimizer_args_are_read_as_a_mapping():
    config = config_from_dict({"optimizer_args": ["betas=0.9,0.99", "decouple=True", "d_coef=2"]})
    assert config.optimizer.optimizer_args == {"betas": (0.9, 0.99), "decouple": True, "d_coef": 2}


def test_an_optimizer_class_by_import_path_gets_only_its_arguments():
    optimizer = _optimizer(optimizer_class="torch.optim.SGD", optimizer_args={"momentum": 0.9})
    assert type(optimizer) is torch.optim.SGD
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["weight_decay"] == 0


def test_an_import_path_that_names_no_class_says_so():
    with pytest.raises(UserError, match="torch.optim has no class Nothing"):
        _optimizer(optimizer_class="torch.optim.Nothing")


def test_an_import_path_as_optimizer_type_points_to_optimizer_class():
    with pytest.raises(UserError, match="set optimizer_class: torch.optim.sgd"):
        config_from_dict({"optimizer_type": "torch.optim.SGD"})


def test_kohyas_optimizer_spellings_are_read():
    assert config_from_dict({"optimizer_type": "DAdaptAdam"}).optimizer.optimizer_type == "dadaptation"
    assert config_from_dict({"optimizer_type": "AdaFactor"}).optimizer.optimizer_type == "adafactor"


def test_adafactor_steps_at_the_configured_learning_rate():
    optimizer = _optimizer(optimizer_type="adafactor", learning_rate=1e-3)
    assert type(optimizer).__name__ == "Adafactor" and optimizer.param_groups[0]["lr"] == 1e-3
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = torch.ones_like(parameter)
    optimizer.step()


@pytest.mark.parametrize(("optimizer_type", "package"), [("dadaptation", "dadaptation"),
                                                         ("adamw_schedulefree", "schedulefree")])
def test_a_missing_optimizer_package_gives_the_pip_line(optimizer_type, package):
    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed")
    with pytest.raises(UserError, match=f"pip install {package}"):
        _optimizer(optimizer_type=optimizer_type)


def test_cosine_decays_to_the_min_lr_ratio_after_a_warmup_given_as_a_ratio():
    config = config_from_dict({"scheduler": "cosine", "warmup_steps": 0.25, "lr_scheduler_min_lr_ratio": 0.1})
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = make_scheduler(config, optimizer, total_steps=8)
    rates = []
    for _ in range(8):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    rates.append(scheduler.get_last_lr()[0])
    assert rates[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # 2 warmup steps of 8
    assert rates[-1] == pytest.approx(0.1)


class _ScheduleFree(torch.optim.SGD):
    """Stands in for schedulefree's optimizers: its evaluation weights are zero, its training weights not."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.kept: list[torch.Tensor] | None = None

    def eval(self):
        self.kept = [p.detach().clone() for group in self.param_groups for p in group["params"]]
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.zero_()

    def train(self):
        if self.kept is not None:
            with torch.no_grad():
                for p, kept in zip((p for group in self.param_groups for p in group["params"]), self.kept):
                    p.copy_(kept)
        self.kept = None


def test_schedule_free_runs_save_their_evaluation_weights(shapes_dataset, tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lora_trainer.models.diffusers_backend import DiffusersBackend
    from lora_trainer.tiny import tiny_sd_pipeline
    from lora_trainer.train.loop import train

    monkeypatch.setitem(sys.modules, "schedulefree",
                        types.SimpleNamespace(AdamWScheduleFree=_ScheduleFree))
    backend = DiffusersBackend(tiny_sd_pipeline("sd1", seed=0, tokenizer_folder=tmp_path / "tok"), "cpu")
    config = config_from_dict(dict(
        train_data_dir=shapes_dataset, resolution=32, bucket_step=8, lora_rank=4, max_train_steps=3,
        save_every_n_steps=1, optimizer_type="AdamWScheduleFree", learning_rate=1e-2, weight_decay=0.0,
        optimizer_args={"momentum": 0.9}, loraplus_lr_ratio=4, output_dir=tmp_path / "out", logging_dir=None))
    result = train(config, backend)
    assert len(result.saved) == 3 and result.last_loss is not None
    for path in result.saved:
        assert all(not tensor.any() for key, tensor in load_file(path).items() if key.endswith("lora_down.weight"))
    with safe_open(str(result.saved[-1]), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_optimizer"] == "adamw_schedulefree(momentum=0.9)"
    assert metadata["ss_loraplus_lr_ratio"] == "4.0"
