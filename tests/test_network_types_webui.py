"""Every network type on the WebUI's own model layouts: the file it saves acts, merged the WebUI's way, exactly as
our hooks act while training, every key names a layer the WebUI finds, and training leaves the model as it was."""

from __future__ import annotations

import copy
import hashlib
import re

import pytest
import torch
from torch import nn

pytest.importorskip("ldm")

from measures import TINY_SIZES  # noqa: E402
from safetensors import safe_open  # noqa: E402

from lora_trainer.config import config_from_dict  # noqa: E402
from lora_trainer.errors import UserError  # noqa: E402
from lora_trainer.lora.targets import network_from_file  # noqa: E402
from lora_trainer.models.webui_backend import WebUIBackend  # noqa: E402
from lora_trainer.train.loop import train  # noqa: E402
from tests.ldm_models import tiny_sd1, tiny_sd2, tiny_sdxl  # noqa: E402
from tests.webui_lora import webui_layer_mapping, webui_module_for, webui_updown  # noqa: E402

BUILDERS = {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}
NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")
STRENGTH = 0.7


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, nn.Module]:
    folder = tmp_path_factory.mktemp("ldm-models")
    return {family: build(folder) for family, build in BUILDERS.items()}


def _hashes(model: nn.Module) -> dict[str, str]:
    return {name: hashlib.sha256(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
            for name, tensor in model.state_dict().items()}


def _trained_file(network_type: str, family: str, model: nn.Module, dataset, output_dir):
    # The text encoder is trained too, except with dora on OpenCLIP (which the WebUI cannot apply); lokr_factor 4
    # makes the tiny layers' Kronecker factors rank-decomposed, the form that carries alpha.
    settings = dict(train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=2, conv_rank=2,
                    learning_rate=3e-2, batch_size=2, max_train_steps=3, output_dir=output_dir, logging_dir=None,
                    network_type=network_type, train_text_encoder=network_type != "dora" or family == "sd1",
                    lokr_factor=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"])
    if network_type == "lora":
        settings["conv_rank"] = 0
    return train(config_from_dict(settings), WebUIBackend(model)).saved[-1]


def _outputs(backend: WebUIBackend, latents: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    captions = ["sks, a red shape", "a blue shape on white"]
    with torch.no_grad():
        text = backend.encode_text(captions)
        prediction = backend.predict(latents, timesteps, text, TINY_SIZES.repeat(2, 1))
    return (text.context, prediction) if text.pooled is None else (text.context, text.pooled, prediction)


def _merge_as_the_webui_does(model: nn.Module, path) -> list[str]:
    """Merge the file into `model`'s weights with the WebUI's formulas; returns the keys it could not place."""
    with safe_open(str(path), "pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    mapping = webui_layer_mapping(model)
    unmatched = []
    with torch.no_grad():
        for key in sorted({name.partition(".")[0] for name in state}):
            tensors = {name.partition(".")[2]: tensor for name, tensor in state.items() if name.startswith(key + ".")}
            layer = webui_module_for(key, mapping)
            if layer is None:
                unmatched.append(key)
            elif isinstance(layer, nn.MultiheadAttention):
                part = re.search(r"_([qkv])_proj$", key)[1]
                delta = webui_updown(tensors, layer.in_proj_weight, STRENGTH)
                layer.in_proj_weight[{"q": 0, "k": 1, "v": 2}[part] * delta.shape[0]:][:delta.shape[0]] += delta
            else:
                layer.weight += webui_updown(tensors, layer.weight, STRENGTH)
    return unmatched


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("network_type", NETWORK_TYPES)
def test_each_type_acts_as_the_webui_merges_its_file(network_type, family, models, shapes_dataset, tmp_path):
    model = models[family]
    before = _hashes(model)
    path = _trained_file(network_type, family, model, shapes_dataset, tmp_path / "out")
    assert _hashes(model) == before

    backend = WebUIBackend(model)
    network = network_from_file(backend.lora_roots(), path)
    assert {module.kind for module in network.lora_modules.values()} == \
        {{"locon": "lora"}.get(network_type, network_type)}
    if network_type != "lora":
        assert any(module.conv is not None and module.weight_shape[-1] == 3 for module in network.lora_modules.values())
    torch.manual_seed(0)
    latents, timesteps = torch.randn(2, 4, 16, 16), torch.tensor([200, 700])
    base = _outputs(backend, latents, timesteps)
    with network.applied(STRENGTH):
        ours = _outputs(backend, latents, timesteps)

    merged_model = copy.deepcopy(model)
    assert _merge_as_the_webui_does(merged_model, path) == []
    # Layer by layer, the hooked output equals the merged layer's to 1e-5; through the whole model the rounding
    # of the two ways adds up (to a few 1e-5 on outputs of size 1).
    mapping, merged_mapping = webui_layer_mapping(model), webui_layer_mapping(merged_model)
    hooked_layers = 0
    for key in network.lora_modules:
        layer, merged_layer = webui_module_for(key, mapping), webui_module_for(key, merged_mapping)
        if isinstance(layer, (nn.MultiheadAttention, nn.modules.linear.NonDynamicallyQuantizableLinear)):
            continue  # OpenCLIP attention: applied as weight deltas, compared through the text encoder below
        inputs = torch.randn(3, layer.weight.shape[1]) if layer.weight.dim() == 2 else \
            torch.randn(1, layer.weight.shape[1], 8, 8)
        with torch.no_grad(), network.applied(STRENGTH):
            hooked = layer(inputs)
        with torch.no_grad():
            assert (hooked - merged_layer(inputs)).abs().max() <= 1e-5, key
        hooked_layers += 1
    assert hooked_layers
    merged = _outputs(WebUIBackend(merged_model), latents, timesteps)
    text_trained = any(key.startswith("lora_te") for key in network.lora_modules)
    for index, (our_output, base_output, merged_output) in enumerate(zip(ours, base, merged, strict=True)):
        assert torch.allclose(our_output, base_output, atol=1e-4) == (index < len(ours) - 1 and not text_trained)
        assert (our_output - merged_output).abs().max() <= 5e-5


def test_dora_on_openclip_attention_is_refused_with_a_clear_message(models, shapes_dataset, tmp_path):
    config = config_from_dict(dict(train_data_dir=shapes_dataset, resolution=32, bucket_step=8, max_train_steps=1,
                                   output_dir=tmp_path, logging_dir=None, network_type="dora",
                                   train_text_encoder=True))
    with pytest.raises(UserError, match="dora cannot adapt OpenCLIP attention"):
        train(config, WebUIBackend(models["sd2"]))
