"""What the data options change in what a LoRA learns, judged by the learned tiny SD1 base's pictures:
masks keep a background out of the LoRA, regularisation images keep the class prompt the base's, and the
validation loss finds the step before overtraining."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from measures import CONCEPT, concept_config  # noqa: E402

from lora_trainer.bases import learned_pipeline  # noqa: E402
from lora_trainer.lora.targets import network_from_file  # noqa: E402
from lora_trainer.models.diffusers_backend import DiffusersBackend  # noqa: E402
from lora_trainer.train.loop import train  # noqa: E402
from lora_trainer.world import (  # noqa: E402
    BASE_COLOURS,
    COLOURS,
    colour_rate,
    render,
    scenes,
    write_concept_dataset,
)

SEEDS = range(8)


def _backend(tokenizer_folder) -> DiffusersBackend:
    return DiffusersBackend(learned_pipeline("sd1", tokenizer_folder=tokenizer_folder), "cpu", model_name="sd1")


def _draw(backend: DiffusersBackend, prompt: str, seed: int) -> Image.Image:
    return backend.generate(prompt, "", seed=seed, steps=20, width=32, height=32, guidance_scale=7.5)


def _share_of(colour: str, image: Image.Image) -> float:
    """The share of the picture's pixels near `colour`."""
    pixels = np.asarray(image, dtype=np.float32)
    return float((np.linalg.norm(pixels - np.array(COLOURS[colour], dtype=np.float32), axis=-1) < 90).mean())


def test_validation_loss_falls_then_rises_when_two_images_are_overtrained(tmp_path, tokenizer_folder):
    colour, trigger = CONCEPT
    train_images = tmp_path / "two"
    write_concept_dataset(train_images, colour, trigger, count=2, seed=5)
    held_out = tmp_path / "held-out"
    write_concept_dataset(held_out, colour, trigger, count=6, seed=7)
    config = concept_config(train_images, tmp_path / "out", validation_data_dir=held_out, validate_every_n_steps=25,
                            max_train_steps=150, batch_size=2, learning_rate=2e-2, scheduler="constant",
                            lora_rank=16)
    result = train(config, _backend(tokenizer_folder))
    losses = dict(result.validation_losses)
    print("validation loss by step:", {step: round(loss, 4) for step, loss in losses.items()})
    best = result.best_validation_step
    assert losses[best] == min(losses.values()) and 0 < best < 150
    assert losses[best] < losses[0] and losses[150] > losses[best] * 1.2


def test_regularisation_images_keep_the_class_prompt_closer_to_the_base(tmp_path, tokenizer_folder, concept_dataset,
                                                                        concept_lora):
    """A LoRA teaching "a sks circle" (magenta) leaks magenta into "a red circle"; class images of circles in the
    colours the base knows, mixed in as regularisation images, hold the class prompt near the base's pictures."""
    colour, trigger = CONCEPT
    reg = tmp_path / "reg" / "1_circle"
    reg.mkdir(parents=True)
    for index, scene in enumerate(scenes(99, 24, shapes=("circle",))):
        render(scene).save(reg / f"{index:02d}.png")
        (reg / f"{index:02d}.txt").write_text(f"a {scene.colour} circle")
    class_prompts = [f"a {name} circle" for name in BASE_COLOURS]
    backend = _backend(tokenizer_folder)
    base = {(prompt, seed): np.asarray(_draw(backend, prompt, seed), dtype=np.float32)
            for prompt in class_prompts for seed in range(4)}
    measured = {}
    for name in ("without", "with"):
        backend = _backend(tokenizer_folder)
        path = concept_lora("sd1") if name == "without" else \
            train(concept_config(concept_dataset, tmp_path / name, reg_data_dir=tmp_path / "reg"), backend).saved[-1]
        with network_from_file(backend.lora_roots(), path).applied(1.0):
            drawn = {key: _draw(backend, *key) for key in base}
            distance = np.mean([np.abs(np.asarray(image, dtype=np.float32) - base[key]).mean()
                                for key, image in drawn.items()])
            class_right = np.mean([colour_rate([drawn[(prompt, seed)] for seed in range(4)], prompt.split()[1])
                                   for prompt in class_prompts])
            concept_rate = colour_rate([_draw(backend, f"a {trigger} circle", seed) for seed in SEEDS], colour)
        measured[name] = distance, class_right, concept_rate
        print(f"{name} regularisation images: class prompts {distance:.1f} from the base's pictures (mean abs "
              f"pixel difference), their colour right in {class_right:.0%}; '{trigger}' {colour} in {concept_rate:.0%}")
    (distance_without, right_without, _), (distance_with, right_with, concept_with) = measured["without"], \
        measured["with"]
    assert distance_with < 0.75 * distance_without
    assert right_with >= right_without + 0.25
    assert concept_with >= 0.5


def test_masks_keep_a_watermark_out_of_what_the_lora_learns(tmp_path, tokenizer_folder):
    """Every training picture has a cyan square in its top-left corner (a watermark); its mask leaves the
    corner out. Without the masks the LoRA draws cyan there, with them the corner stays the base's white."""
    colour, trigger = CONCEPT
    concept = tmp_path / "watermarked"
    for path in write_concept_dataset(concept, colour, trigger):
        pixels = np.asarray(Image.open(path).convert("RGB")).copy()
        pixels[1:11, 1:11] = COLOURS["cyan"]
        Image.fromarray(pixels).save(path)
        mask = np.full((32, 32), 255, dtype=np.uint8)
        mask[:12, :12] = 0
        Image.fromarray(mask, "L").save(path.with_name(f"{path.stem}.mask.png"))
    measured = {}
    for masked in (False, True):
        backend = _backend(tokenizer_folder)
        # Attention only: at this learning rate kohya's larger layer set learned neither the watermark nor the
        # concept as well on the tiny base (cyan 0.0% unmasked, magenta 62% / 50%).
        config = concept_config(concept, tmp_path / f"masked-{masked}", masked_loss=masked,
                                target_modules=["attention"])
        with network_from_file(backend.lora_roots(), train(config, backend).saved[-1]).applied(1.0):
            drawn = [_draw(backend, f"a {trigger} circle", seed) for seed in SEEDS]
        measured[masked] = (np.mean([_share_of("cyan", image.crop((0, 0, 12, 12))) for image in drawn]),
                            colour_rate(drawn, colour))
        print(f"masked_loss {masked}: cyan in {measured[masked][0]:.1%} of the corner's pixels, "
              f"{colour} drawn in {measured[masked][1]:.0%} of the seeds")
    assert measured[False][0] >= 0.02
    assert measured[True][0] <= 0.005 and measured[True][1] >= 0.5
