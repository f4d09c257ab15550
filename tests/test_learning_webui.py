"""What a LoRA trained on the model the WebUI has loaded teaches it, judged by the pictures it draws.

The learned tiny bases (lora_trainer/bases) are loaded the way the WebUI loads a single-file checkpoint, into
the real ldm classes (SD1, SD2 v-prediction) and the sgm-shaped SDXL object; training runs through the WebUI
backend, and the pictures come from the host's txt2img with a `<lora:name:strength>` tag, as a user draws them.
"""

from __future__ import annotations

import pytest

pytest.importorskip("ldm")

from fake_host import FakeHost, ddim_sample  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from measures import CONCEPT, RATE_SEEDS, concept_config, drawn_colour_rate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lora_trainer.bases.checkpoint import write_webui_checkpoint  # noqa: E402
from lora_trainer.host import RenderRequest  # noqa: E402
from lora_trainer.train.loop import train  # noqa: E402
from lora_trainer.world import BASE_COLOURS, colour_rate, write_concept_dataset  # noqa: E402
from tests.ldm_models import learned_ldm_model  # noqa: E402

GUIDANCE_SCALE = 7.5
SAMPLING_STEPS = 20


@pytest.fixture(scope="module")
def concept_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concept")
    write_concept_dataset(folder, *CONCEPT)
    return folder


def _txt2img(host: FakeHost, lora_strength: float | None):
    def generate(prompt: str, seed: int):
        tagged = prompt if lora_strength is None else f"{prompt} <lora:concept:{lora_strength:g}>"
        with host.busy("txt2img"):
            return host.render(RenderRequest(tagged, "", seed, SAMPLING_STEPS, GUIDANCE_SCALE, 32, 32))
    return generate


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_lora_trained_on_the_loaded_model_teaches_it_a_colour_it_never_drew(family, concept_dataset,
                                                                              tmp_path):
    host = FakeHost(learned_ldm_model(family, tmp_path / "model"), tmp_path / "Lora", family=family)
    with host.busy("train"):
        train(concept_config(concept_dataset, host.lora_dir()), host.loaded_model_backend())
    colour, trigger = CONCEPT
    prompt = f"a {trigger} circle"
    base_rate = drawn_colour_rate(_txt2img(host, None), prompt, colour)
    lora_rate = drawn_colour_rate(_txt2img(host, 1.0), prompt, colour)
    print(f"{family}: {colour} in {base_rate:.0%} of the base's samples, {lora_rate:.0%} with the LoRA")
    assert base_rate <= 0.25
    assert lora_rate >= 0.75
    base = [_txt2img(host, None)(prompt, seed).tobytes() for seed in RATE_SEEDS[:2]]
    assert [_txt2img(host, 0.0)(prompt, seed).tobytes() for seed in RATE_SEEDS[:2]] == base


@pytest.mark.parametrize("options", [
    {"loraplus_lr_ratio": 4.0, "learning_rate": 2.5e-3},  # the up matrices at the plain run's 1e-2
    {"multires_noise_iterations": 6, "multires_noise_discount": 0.3, "ip_noise_gamma": 0.1, "loss_type": "huber",
     "huber_schedule": "snr", "debiased_estimation_loss": True, "rank_dropout": 0.1, "module_dropout": 0.1},
], ids=["loraplus", "noise-loss-and-dropouts"])
def test_the_lora_plus_noise_loss_and_dropout_options_still_teach_the_concept(options, concept_dataset, tmp_path):
    host = FakeHost(learned_ldm_model("sd1", tmp_path / "model"), tmp_path / "Lora", family="sd1")
    with host.busy("train"):
        train(concept_config(concept_dataset, host.lora_dir(), **options), host.loaded_model_backend())
    colour, trigger = CONCEPT
    lora_rate = drawn_colour_rate(_txt2img(host, 1.0), f"a {trigger} circle", colour)
    print(f"{options}: {colour} in {lora_rate:.0%} of the samples with the LoRA")
    assert lora_rate >= 0.75


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_base_loaded_as_the_webui_loads_it_draws_the_colour_it_is_asked_for(family, tmp_path):
    host = FakeHost(learned_ldm_model(family, tmp_path / "model"), tmp_path / "Lora", family=family)
    rates = [drawn_colour_rate(_txt2img(host, None), f"a {colour} square", colour, range(4),
                               tuple(BASE_COLOURS))
             for colour in BASE_COLOURS]
    assert sum(rates) / len(rates) >= 0.75


def test_the_sd1_base_written_as_a_webui_checkpoint_loads_from_its_yaml_and_draws_the_asked_colours(tmp_path):
    checkpoint = write_webui_checkpoint(tmp_path / "Stable-diffusion")
    model = instantiate_from_config(OmegaConf.load(checkpoint.with_suffix(".yaml")).model)
    missing, unexpected = model.load_state_dict(load_file(str(checkpoint)), strict=False)
    assert not unexpected
    assert set(missing) <= {name for name, _ in model.named_buffers()}
    model.cond_stage_model.device = "cpu"  # ldm's default is "cuda"; the WebUI's prompt encoding ignores it
    model.eval()
    rates = [colour_rate([ddim_sample(model, f"a {colour} triangle", seed, SAMPLING_STEPS, 32, 32,
                                      guidance_scale=GUIDANCE_SCALE) for seed in range(2)], colour, tuple(BASE_COLOURS))
             for colour in BASE_COLOURS]
    assert sum(rates) / len(rates) >= 0.75
