"""Starting from any common LoRA file: kohya's, peft's (with the alphas diffusers keeps in its metadata) and the
layouts of diffusers' training scripts all start training from exactly the weights the file applies."""

from __future__ import annotations

import copy
import re

import pytest
import torch

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lora_trainer.config import TEXT_ENCODER_TARGET_SETS, UNET_TARGET_SETS, config_from_dict  # noqa: E402
from lora_trainer.errors import UserError  # noqa: E402
from lora_trainer.lora.files import read_lora  # noqa: E402
from lora_trainer.models.diffusers_backend import DiffusersBackend  # noqa: E402
from lora_trainer.tiny import tiny_sd_pipeline  # noqa: E402
from lora_trainer.train.events import TrainingEvents  # noqa: E402
from lora_trainer.train.loop import train  # noqa: E402

UNET_TARGETS = UNET_TARGET_SETS["kohya"]
TEXT_TARGETS = TEXT_ENCODER_TARGET_SETS["kohya"]
LATENTS = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
TIMESTEPS = torch.tensor([500])
CAPTION = ["sks, a red shape"]


@pytest.fixture(scope="module")
def base_and_peft_file(tmp_path_factory):
    """A clean tiny SD1 pipeline, a copy with peft adapters (alpha 8 on rank 4, alpha 2 on to_k, random
    lora_B) and the file diffusers' `save_lora_weights` writes for them (its text-encoder keys named the
    transformers-5 way, without `text_model.`)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("peft")
    base = tiny_sd_pipeline("sd1", seed=0, tokenizer_folder=folder / "tok")
    reference = copy.deepcopy(base)
    reference.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, alpha_pattern={"to_k": 2}, target_modules=UNET_TARGETS))
    text_config = LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_TARGETS)
    inject_adapter_in_model(text_config, reference.text_encoder)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in [*reference.unet.named_parameters(), *reference.text_encoder.named_parameters()]:
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(reference.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(reference.text_encoder),
        unet_lora_adapter_metadata=reference.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
        weight_name="peft.safetensors")
    return base, reference, folder / "peft.safetensors"


def _prediction(backend: DiffusersBackend) -> torch.Tensor:
    with torch.no_grad():
        return backend.predict(LATENTS, TIMESTEPS, backend.encode_text(CAPTION), None)


class _FirstPrediction(TrainingEvents):
    """Records the model's prediction with the LoRA applied, before the first step."""

    def __init__(self, backend: DiffusersBackend):
        self.backend, self.prediction = backend, None

    def on_start(self, plan) -> None:
        self.prediction = _prediction(self.backend)


def _config(dataset, output_dir, **overrides):
    return config_from_dict(dict(train_data_dir=dataset, resolution=32, bucket_step=8, max_train_steps=1,
                                 output_dir=output_dir, logging_dir=None, **overrides))


def _keys(path) -> list[str]:
    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def test_the_peft_file_diffusers_writes_starts_training_at_its_own_outputs(base_and_peft_file, shapes_dataset,
                                                                          tmp_path):
    base, reference, path = base_and_peft_file
    assert any(key.startswith("text_encoder.encoder.layers.") for key in _keys(path))
    backend = DiffusersBackend(base, "cpu")
    first = _FirstPrediction(backend)
    train(_config(shapes_dataset, tmp_path / "out", lora_rank=4, train_text_encoder=True, init_lora_weights=path),
          backend, first)
    expected = _prediction(DiffusersBackend(reference, "cpu"))
    assert (expected - _prediction(backend)).abs().max() > 1e-3  # the file changes the outputs
    assert (first.prediction - expected).abs().max() <= 1e-5


def _old_diffusers_layout(key: str) -> str:
    """diffusers' attention-processor layout: `attn1.processor.to_q_lora.down`, `self_attn.to_q_lora.down`."""
    key = re.sub(r"\.(to_[qkv]|to_out)(?:\.0)?\.lora_([AB])\.weight$",
                 lambda m: f".processor.{m[1]}_lora.{'down' if m[2] == 'A' else 'up'}.weight", key)
    return re.sub(r"\.self_attn\.([qkv]|out)_proj\.lora_([AB])\.weight$",
                  lambda m: f".self_attn.to_{m[1]}_lora.{'down' if m[2] == 'A' else 'up'}.weight",
                  key.replace("text_encoder.encoder.", "text_encoder.text_model.encoder."))


LAYOUTS = {
    "lora.down": lambda key: key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight",
                                                                                        ".lora.up.weight"),
    "lora_linear_layer": lambda key: key.replace(".lora_A.", ".lora_linear_layer.down.").replace(
        ".lora_B.", ".lora_linear_layer.up."),
    "processor.to_q_lora": _old_diffusers_layout,
    "peft with text_model.": lambda key: key.replace("text_encoder.encoder.", "text_encoder.text_model.encoder."),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_diffusers_training_script_layouts_read_as_the_same_weights(layout, base_and_peft_file, tmp_path):
    base, _, path = base_and_peft_file
    with safe_open(str(path), "pt") as handle:
        state, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
    renamed = tmp_path / "renamed.safetensors"
    save_file({LAYOUTS[layout](key): tensor for key, tensor in state.items()}, str(renamed), metadata=metadata)
    keys = {}
    for root in DiffusersBackend(base, "cpu").lora_roots():
        keys.update({f"{root.peft_prefix}.{root.peft_path(p)}": f"{root.prefix}_{root.kohya_path(p).replace('.', '_')}"
                     for p, _ in root.module.named_modules()})
    original, converted = read_lora(path, keys).state, read_lora(renamed, keys).state
    assert all(key.startswith(("lora_unet_", "lora_te_text_model_")) for key in original)
    assert sorted(converted) == sorted(original)
    assert all(torch.equal(converted[key], original[key]) for key in original)


def test_dim_from_weights_takes_rank_alpha_and_layers_from_the_file(base_and_peft_file, shapes_dataset, tmp_path):
    base, _, path = base_and_peft_file
    saved = train(_config(shapes_dataset, tmp_path / "out", lora_rank=16, target_modules=["to_q"],
                          init_lora_weights=path, dim_from_weights=True), DiffusersBackend(base, "cpu")).saved[-1]
    with safe_open(str(saved), "pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8.0")
    assert metadata["ss_network_train_unet_only"] == "False"
    assert len(keys) == len(_keys(path)) + len(_keys(path)) // 2  # down, up and alpha for each down/up pair


def test_a_rank_mismatch_says_rank_differs_and_not_another_model_family(base_and_peft_file, shapes_dataset,
                                                                        tmp_path):
    base, _, path = base_and_peft_file
    with pytest.raises(UserError, match="rank differs") as error:
        train(_config(shapes_dataset, tmp_path / "out", lora_rank=8, train_text_encoder=True, init_lora_weights=path),
              DiffusersBackend(base, "cpu"))
    assert "model family" not in str(error.value)
