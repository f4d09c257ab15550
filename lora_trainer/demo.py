"""The embedded demo: a tiny base that has learned to draw, a LoRA that teaches it a new colour, a PNG strip.

Nothing is downloaded. The learned tiny SD1 base (`lora_trainer.bases`) knows red, yellow, green and blue
circles, squares and triangles; the demo's dataset shows magenta shapes captioned with the trigger word
("a sks circle"), a colour the base has never drawn. The base is written as a diffusers folder and loaded
back the way a user's model is, so the demo runs the same code paths as a real run. The PNG shows samples at
LoRA strength 0 / 0.5 / 1, how many seeds drew magenta at each strength, and the training loss.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from lora_trainer.bases import save_learned_model
from lora_trainer.config import TrainConfig, config_from_dict
from lora_trainer.console import ConsoleEvents
from lora_trainer.files import atomic_write, atomic_write_text
from lora_trainer.grid import BACKGROUND, PADDING, TEXT_COLOUR, labelled_grid
from lora_trainer.lora.targets import network_from_file
from lora_trainer.models.base import resolve_device
from lora_trainer.models.diffusers_backend import DiffusersBackend, load_pipeline
from lora_trainer.train.events import StepReport
from lora_trainer.train.loop import train
from lora_trainer.world import WORLD_RESOLUTION, colour_rate, write_concept_dataset

TRIGGER = "sks"
CONCEPT_COLOUR = "magenta"
STRENGTHS = (0.0, 0.5, 1.0)
PROMPTS = (f"a {TRIGGER} circle", f"a {TRIGGER} triangle")
RATE_SEEDS = range(1, 9)
GUIDANCE_SCALE = 7.5
SAMPLING_STEPS = 25
DEFAULT_STEPS = 300
LOSS_COLOUR = (200, 40, 40)


def write_demo_dataset(folder: Path) -> Path:
    """Write the demo's 12 captioned pictures of magenta shapes into `folder` (kept if already there)."""
    write_concept_dataset(folder, CONCEPT_COLOUR, TRIGGER)
    return Path(folder)


def demo_config(workdir: Path, steps: int = DEFAULT_STEPS) -> TrainConfig:
    """The demo's training settings: a few hundred steps on the tiny base, UNet and text encoder."""
    return config_from_dict(dict(
        train_data_dir=workdir / "dataset", base_model=str(workdir / "tiny-sd1"), resolution=WORLD_RESOLUTION,
        bucket_step=8, lora_rank=8, train_text_encoder=True, learning_rate=2e-3, batch_size=4,
        max_train_steps=steps, scheduler="cosine", warmup_steps=min(10, steps // 10), output_dir=workdir / "lora",
        output_name="demo", save_every_n_steps=100, logging_dir=workdir / "logs", log_every_n_steps=10))


class _LossRecorder(ConsoleEvents):
    """Console progress, and every reported loss kept for the chart."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[tuple[int, float]] = []

    def on_step(self, report: StepReport) -> None:
        super().on_step(report)
        if report.loss is not None:
            self.losses.append((report.step, report.loss))


def loss_chart(losses: list[tuple[int, float]], width: int, height: int) -> Image.Image:
    """A line chart of (step, loss) points, titled with the first and last loss."""
    chart = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(chart)
    (first_step, first_loss), (last_step, last_loss) = losses[0], losses[-1]
    draw.text((PADDING, PADDING), f"training loss: {first_loss:.3f} at step {first_step}, {last_loss:.3f} at step "
                                  f"{last_step}", fill=TEXT_COLOUR)
    top, bottom, left, right = 8 * PADDING, height - 2 * PADDING, 2 * PADDING, width - 2 * PADDING
    low, high = min(loss for _, loss in losses), max(loss for _, loss in losses)
    span_steps, span_losses = max(1, last_step - first_step), (high - low) or 1.0
    points = [(left + (step - first_step) / span_steps * (right - left),
               bottom - (loss - low) / span_losses * (bottom - top)) for step, loss in losses]
    draw.rectangle((left, top, right, bottom), outline=TEXT_COLOUR)
    draw.line(points, fill=LOSS_COLOUR, width=2)
    return chart


def run_demo(workdir: Path, device: str | None = None, steps: int = DEFAULT_STEPS) -> Path:
    """Train the demo LoRA in `workdir` (`steps` optimizer steps) and write `demo.png`: samples at strengths
    0 / 0.5 / 1 with the share of seeds that drew the new colour, and the loss curve. Returns its path."""
    workdir = Path(workdir)
    save_learned_model(workdir / "tiny-sd1", "sd1")
    write_demo_dataset(workdir / "dataset")
    config = demo_config(workdir, steps)
    final = config.saving.output_dir / f"{config.saving.output_name}.safetensors"
    losses_path = config.saving.output_dir / "losses.json"
    if final.exists():
        print(f"{final} is from an earlier demo run; delete {config.saving.output_dir} to train again")
    else:
        backend = DiffusersBackend(load_pipeline(config.model.base_model), resolve_device(device),
                                   model_name="tiny-sd1")
        with _LossRecorder() as events:
            train(config, backend, events)
        atomic_write_text(losses_path, json.dumps(events.losses))
    losses = json.loads(losses_path.read_text(encoding="utf-8")) if losses_path.exists() else []

    backend = DiffusersBackend(load_pipeline(config.model.base_model), resolve_device(device), model_name="tiny-sd1")
    network = network_from_file(backend.lora_roots(), final).to(backend.device)
    rows = [[] for _ in PROMPTS]
    labels = []
    for strength in STRENGTHS:
        with network.applied(strength):
            images = [_sample(backend, prompt, seed) for prompt in PROMPTS for seed in RATE_SEEDS]
        for row, shown in zip(rows, images[::len(RATE_SEEDS)]):
            row.append(shown.resize((128, 128), Image.NEAREST))
        rate = colour_rate(images, CONCEPT_COLOUR)
        print(f"strength {strength:g}: {CONCEPT_COLOUR} in {rate:.0%} of {len(images)} samples")
        labels.append(f"strength {strength:g}: {CONCEPT_COLOUR} {rate:.0%}")
    strip = labelled_grid(rows, labels, list(PROMPTS), title=f"demo LoRA: '{TRIGGER}' is {CONCEPT_COLOUR}")
    picture = strip
    if losses:
        chart = loss_chart([(int(step), float(loss)) for step, loss in losses], strip.width, 160)
        picture = Image.new("RGB", (strip.width, strip.height + chart.height), BACKGROUND)
        picture.paste(strip, (0, 0))
        picture.paste(chart, (0, strip.height))
    png = workdir / "demo.png"
    atomic_write(png, lambda tmp: picture.save(tmp, format="PNG"))
    print(f"wrote {png}")
    return png


def _sample(backend: DiffusersBackend, prompt: str, seed: int) -> Image.Image:
    return backend.generate(prompt, "", seed=seed, steps=SAMPLING_STEPS, width=WORLD_RESOLUTION,
                            height=WORLD_RESOLUTION, guidance_scale=GUIDANCE_SCALE)
