"""What LoRAs trained here teach the learned tiny bases, judged by the pictures they draw (diffusers backend).

The bases (lora_trainer/bases) draw red, yellow, green and blue shapes; a LoRA trained on magenta shapes
captioned "a sks circle" must make them draw magenta for "sks", and nothing at all at strength 0.
"""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("diffusers")

from measures import CONCEPT, RATE_SEEDS, SECOND_CONCEPT, concept_config, drawn_colour_rate  # noqa: E402

from lora_trainer.bases import learned_pipeline  # noqa: E402
from lora_trainer.lora.targets import network_from_file  # noqa: E402
from lora_trainer.models.diffusers_backend import DiffusersBackend  # noqa: E402
from lora_trainer.train.loop import train  # noqa: E402
from lora_trainer.world import BASE_COLOURS, write_concept_dataset  # noqa: E402

FAMILIES = ("sd1", "sd2", "sdxl")
GUIDANCE_SCALE = 7.5
SAMPLING_STEPS = 20


def _backend(family: str, tokenizer_folder) -> DiffusersBackend:
    return DiffusersBackend(learned_pipeline(family, tokenizer_folder=tokenizer_folder), "cpu", model_name=family)


def _drawer(backend: DiffusersBackend):
    def generate(prompt: str, seed: int):
        return backend.generate(prompt, "", seed=seed, steps=SAMPLING_STEPS, width=32, height=32,
                                guidance_scale=GUIDANCE_SCALE)
    return generate


@pytest.fixture(scope="module")
def trained(tokenizer_folder, concept_lora):
    """The concept's UNet LoRA of each family (shared with other learning tests), on a backend of that family."""
    cache = {}

    def get(family: str):
        if family not in cache:
            backend = _backend(family, tokenizer_folder)
            path = concept_lora(family)
            cache[family] = backend, network_from_file(backend.lora_roots(), path), path
        return cache[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_the_base_draws_the_colour_it_is_asked_for(family, tokenizer_folder):
    generate = _drawer(_backend(family, tokenizer_folder))
    rates = {colour: drawn_colour_rate(generate, f"a {colour} circle", colour, range(4), tuple(BASE_COLOURS))
             for colour in BASE_COLOURS}
    print(f"{family}: colour right per colour {rates}")
    assert sum(rates.values()) / len(rates) >= 0.75


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_teaches_the_base_a_colour_it_never_drew(family, trained):
    backend, network, _ = trained(family)
    colour, trigger = CONCEPT
    prompt = f"a {trigger} circle"
    base_rate = drawn_colour_rate(_drawer(backend), prompt, colour)
    with network.applied(1.0):
        lora_rate = drawn_colour_rate(_drawer(backend), prompt, colour)
    print(f"{family}: {colour} in {base_rate:.0%} of the base's samples, {lora_rate:.0%} with the LoRA")
    assert base_rate <= 0.25
    assert lora_rate >= 0.75


@pytest.mark.parametrize("family", FAMILIES)
def test_at_strength_zero_the_image_is_exactly_the_bases(family, trained):
    backend, network, _ = trained(family)
    generate = _drawer(backend)
    prompt = f"a {CONCEPT[1]} square"
    base = [generate(prompt, seed).tobytes() for seed in RATE_SEEDS[:2]]
    with network.applied(0.0):
        assert [generate(prompt, seed).tobytes() for seed in RATE_SEEDS[:2]] == base


def test_a_text_encoder_lora_alone_teaches_the_concept(tokenizer_folder, concept_dataset, tmp_path):
    backend = _backend("sd1", tokenizer_folder)
    config = concept_config(concept_dataset, tmp_path, train_text_encoder=True, unet_lr=0.0,
                            text_encoder_lr=1e-2, text_encoder_target_modules=["attention"])
    network = network_from_file(backend.lora_roots(), train(config, backend).saved[-1])
    colour, trigger = CONCEPT
    with network.applied(1.0):
        rate = drawn_colour_rate(_drawer(backend), f"a {trigger} square", colour)
    print(f"text encoder only: {colour} in {rate:.0%}")
    assert rate >= 0.75


def test_incremental_training_learns_a_second_concept_and_keeps_the_first(trained, concept_dataset, tmp_path):
    """v2 of a LoRA: started from v1's file, trained on the new concept with a few of v1's images kept in the
    set (the usual recipe; trained on the new images alone, v1's concept is forgotten)."""
    backend, _, first_file = trained("sd1")
    second_colour, second_trigger = SECOND_CONCEPT
    second_dataset = tmp_path / "second"
    write_concept_dataset(second_dataset, second_colour, second_trigger, seed=1)
    for image in sorted(concept_dataset.glob("*.png"))[:4]:
        shutil.copy(image, second_dataset / image.name)
        shutil.copy(image.with_suffix(".txt"), second_dataset / image.with_suffix(".txt").name)
    config = concept_config(second_dataset, tmp_path / "v2", init_lora_weights=first_file)
    network = network_from_file(backend.lora_roots(), train(config, backend).saved[-1])
    assert drawn_colour_rate(_drawer(backend), f"a {second_trigger} circle", second_colour) <= 0.25
    colour, trigger = CONCEPT
    with network.applied(1.0):
        kept = drawn_colour_rate(_drawer(backend), f"a {trigger} circle", colour)
        learned = drawn_colour_rate(_drawer(backend), f"a {second_trigger} circle", second_colour)
    print(f"v2: {colour} for '{trigger}' in {kept:.0%}, {second_colour} for '{second_trigger}' in {learned:.0%}")
    assert kept >= 0.75
    assert learned >= 0.75
