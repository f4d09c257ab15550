"""The embedded demo: a tiny model, a synthetic captioned dataset, a LoRA trained end to end, a PNG strip.

Nothing is downloaded. The tiny model is written as a diffusers folder and loaded back the way a user's
model is, so the demo runs the same code paths as a real run.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from lora_trainer.config import TrainConfig
from lora_trainer.console import ConsoleEvents
from lora_trainer.files import atomic_write
from lora_trainer.grid import labelled_grid
from lora_trainer.lora.targets import network_from_file
from lora_trainer.models.base import resolve_device
from lora_trainer.models.diffusers_backend import DiffusersBackend, load_pipeline
from lora_trainer.tiny import TINY_RESOLUTION, save_tiny_model
from lora_trainer.train.loop import train

TRIGGER = "sks"
SHAPES = [("red", "circle"), ("blue", "square"), ("green", "circle"), ("orange", "square"),
          ("purple", "circle"), ("teal", "square"), ("red", "square"), ("blue", "circle")]
STRENGTHS = (0.0, 0.5, 1.0)
PROMPTS = (f"{TRIGGER}, a red circle", f"{TRIGGER}, a blue square")


def write_demo_dataset(folder: Path, size: int = TINY_RESOLUTION) -> Path:
    """Write small images of coloured shapes with `.txt` captions into `folder` (kept if already there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, (colour, shape) in enumerate(SHAPES):
        image_path = folder / f"{index:02d}-{colour}-{shape}.png"
        if image_path.exists():
            continue
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        box = (size // 8, size // 8, size - size // 8, size - size // 8)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        atomic_write(image_path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        image_path.with_suffix(".txt").write_text(f"{TRIGGER}, a {colour} {shape}", encoding="utf-8")
    return folder


def demo_config(workdir: Path) -> TrainConfig:
    """The demo's training settings: a few hundred steps on the tiny model, UNet and text encoder."""
    return TrainConfig(
        train_data_dir=workdir / "dataset", base_model=str(workdir / "tiny-sd1"), resolution=TINY_RESOLUTION,
        bucket_step=8, lora_rank=8, train_text_encoder=True, learning_rate=2e-3, batch_size=4,
        max_train_steps=300, scheduler="cosine", warmup_steps=10, output_dir=workdir / "lora",
        output_name="demo", save_every_n_steps=100, logging_dir=workdir / "logs", log_every_n_steps=10)


def run_demo(workdir: Path, device: str | None = None) -> Path:
    """Train the demo LoRA in `workdir` and write `demo.png`: samples at strengths 0 / 0.5 / 1. Returns its path."""
    workdir = Path(workdir)
    save_tiny_model(workdir / "tiny-sd1", "sd1")
    write_demo_dataset(workdir / "dataset")
    config = demo_config(workdir)
    final = config.output_dir / f"{config.output_name}.safetensors"
    if final.exists():
        print(f"{final} is from an earlier demo run; delete {config.output_dir} to train again")
    else:
        backend = DiffusersBackend(load_pipeline(config.base_model), resolve_device(device),
                                   model_name="tiny-sd1")
        train(config, backend, ConsoleEvents())

    backend = DiffusersBackend(load_pipeline(config.base_model), resolve_device(device), model_name="tiny-sd1")
    network = network_from_file(backend.lora_roots(), final).to(backend.device)
    rows = []
    for prompt in PROMPTS:
        row = []
        for strength in STRENGTHS:
            with network.applied(strength):
                row.append(backend.generate(prompt, "", seed=1, steps=20, width=TINY_RESOLUTION,
                                            height=TINY_RESOLUTION, guidance_scale=3.0).resize((128, 128)))
        rows.append(row)
    strip = labelled_grid(rows, [f"strength {s:g}" for s in STRENGTHS], list(PROMPTS), title="demo LoRA")
    png = workdir / "demo.png"
    atomic_write(png, lambda tmp: strip.save(tmp, format="PNG"))
    print(f"wrote {png}")
    return png

