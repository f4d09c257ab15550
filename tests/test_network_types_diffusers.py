"""diffusers' own `load_lora_weights` reads a LoCon file (LoRA on the 3x3 convolutions too) as our hooks apply it.

(diffusers renames nothing of LoHa's or LoKr's tensors and refuses those files; it loads a DoRA file's
`dora_scale` as peft's magnitude, which peft takes per output row where the WebUI takes it per input column, so
its pictures differ: the README says so.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from lora_trainer.bases import learned_pipeline  # noqa: E402
from lora_trainer.config import config_from_dict  # noqa: E402
from lora_trainer.lora.files import save_kohya  # noqa: E402
from lora_trainer.lora.network import LoraNetwork  # noqa: E402
from lora_trainer.lora.targets import find_lora_targets  # noqa: E402
from lora_trainer.models.diffusers_backend import DiffusersBackend  # noqa: E402


def test_diffusers_loads_a_locon_file_as_our_hooks_apply_it(tokenizer_folder, tmp_path):
    pipeline = learned_pipeline("sd1", tokenizer_folder=tokenizer_folder)
    backend = DiffusersBackend(pipeline, "cpu", model_name="sd1")
    config = config_from_dict(dict(network_type="locon", lora_rank=4, train_text_encoder=True))
    network = LoraNetwork(find_lora_targets(backend.lora_roots(), config.network))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    assert any(module.conv is not None and module.weight_shape[-1] == 3 for module in network.lora_modules.values())
    path = save_kohya(tmp_path / "locon.safetensors", network, {})
    unet = pipeline.unet
    latents, timesteps = torch.randn(1, unet.config.in_channels, 8, 8), torch.tensor([500])
    with torch.no_grad(), network.applied(1.0):
        context = backend.encode_text(["a sks circle"]).context
        ours = unet(latents, timesteps, context).sample
    pipeline.load_lora_weights(str(path))
    with torch.no_grad():
        assert (backend.encode_text(["a sks circle"]).context - context).abs().max() <= 1e-5
        assert (unet(latents, timesteps, context).sample - ours).abs().max() <= 1e-5
