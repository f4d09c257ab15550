"""The Training panel's memory estimate before Start, on the host's loaded model."""

from __future__ import annotations

import pytest

pytest.importorskip("ldm")

from fake_host import FakeHost  # noqa: E402
from ldm_models import tiny_sd1  # noqa: E402

from lora_trainer.config import config_from_dict  # noqa: E402
from lora_trainer.models.webui_backend import WebUIBackend  # noqa: E402
from lora_trainer.tab.training import memory_estimate_note  # noqa: E402
from lora_trainer.train.memory import model_footprint  # noqa: E402


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return FakeHost(tiny_sd1(tmp_path_factory.mktemp("sd1")), tmp_path_factory.mktemp("Lora"))


def test_the_estimate_shows_the_loaded_models_parts_and_leaves_the_host_free(host):
    note = memory_estimate_note(host, config_from_dict({"resolution": 32, "bucket_step": 8, "lora_rank": 4}))
    assert "Memory: ~" in note and "weights" in note and "activations" in note
    assert not host.queue_lock.locked()


def test_the_estimate_waits_for_no_running_job_and_says_the_model_is_busy(host):
    with host.busy("training"):
        note = memory_estimate_note(host, config_from_dict({}))
    assert "busy" in note and "Memory" not in note


def test_the_footprint_counts_the_loaded_models_own_tensors(host):
    backend = WebUIBackend(host.model)
    footprint = model_footprint(backend, config_from_dict({"lora_rank": 4}).network)
    unet = host.model.model.diffusion_model
    assert footprint.unet_bytes == sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
    vae = host.model.first_stage_model
    assert footprint.vae_bytes == sum(t.numel() * t.element_size() for t in [*vae.parameters(), *vae.buffers()])
    assert footprint.resident_bytes >= footprint.unet_bytes  # the tiny model lives on the CPU, the run's device
    assert footprint.lora_parameters > 0
    assert footprint.vae_encoder_bytes_per_pixel > 0 and footprint.vae_decoder_bytes_per_pixel > 0  # ldm VAE on meta
