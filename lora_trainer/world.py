"""The synthetic world the tiny bases learned: coloured shapes on white, their captions, and a measure of what
an image shows.

Everything is procedural and seeded, so the data the bases were pretrained on, the concepts the demo and the
tests teach, and the judgement of a generated image are all reproducible without a download. The measure is
deliberately simple and honest: the hue of the saturated pixels names the colour, and how much of its bounding
box the foreground fills names the shape (a square fills all of it, a circle pi/4, a triangle half).
"""

from __future__ import annotations

import colorsys
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lora_trainer.files import atomic_write, atomic_write_text

WORLD_RESOLUTION = 32

BASE_COLOURS = {"red": (220, 30, 30), "yellow": (235, 200, 20), "green": (30, 170, 50), "blue": (30, 60, 220)}
"""The colours the bases were pretrained on."""
NEW_COLOURS = {"magenta": (220, 30, 220), "cyan": (20, 200, 210)}
"""Colours the bases have never seen: what the demo and the tests teach a LoRA."""
COLOURS = BASE_COLOURS | NEW_COLOURS
SHAPES = ("circle", "square", "triangle")
_FILL_RATIO = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}


@dataclass(frozen=True)
class Scene:
    """One picture of the world: a shape of a colour, its size and where it sits."""

    colour: str
    shape: str
    size: int
    left: int
    top: int

    @property
    def caption(self) -> str:
        """What the picture shows, in the words the bases learned ("a red circle")."""
        return f"a {self.colour} {self.shape}"


def random_scene(rng: random.Random, colours: tuple[str, ...] = tuple(BASE_COLOURS), shapes: tuple[str, ...] = SHAPES,
                 resolution: int = WORLD_RESOLUTION) -> Scene:
    """A scene with a random colour and shape out of the given ones, random size and position."""
    size = rng.randint(resolution * 3 // 8, resolution * 3 // 4)
    return Scene(rng.choice(colours), rng.choice(shapes), size, rng.randint(1, resolution - size - 1),
                 rng.randint(1, resolution - size - 1))


def render(scene: Scene, resolution: int = WORLD_RESOLUTION) -> Image.Image:
    """The scene as an RGB image on white."""
    image = Image.new("RGB", (resolution, resolution), "white")
    draw = ImageDraw.Draw(image)
    box = (scene.left, scene.top, scene.left + scene.size - 1, scene.top + scene.size - 1)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
    return image


def scenes(seed: int, count: int, colours: tuple[str, ...] = tuple(BASE_COLOURS),
           shapes: tuple[str, ...] = SHAPES) -> Iterator[Scene]:
    """`count` random scenes, the same ones for the same seed."""
    rng = random.Random(seed)
    for _ in range(count):
        yield random_scene(rng, colours, shapes)


@dataclass(frozen=True)
class Seen:
    """What the measure saw in an image: the nearest named colour and shape, or None where nothing stands out."""

    colour: str | None
    shape: str | None


def what_it_shows(image: Image.Image, colours: tuple[str, ...] = tuple(COLOURS)) -> Seen:
    """Name the dominant saturated colour (nearest hue among `colours`) and the shape of the foreground."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    maximum, minimum = pixels.max(axis=2), pixels.min(axis=2)
    saturation = (maximum - minimum) / np.maximum(maximum, 1e-6)
    foreground = (saturation > 0.35) & (maximum > 0.25)
    if foreground.sum() < max(4, foreground.size // 100):
        return Seen(None, None)
    hues = np.array([colorsys.rgb_to_hsv(*pixel)[0] for pixel in pixels[foreground]]) * 2 * math.pi
    mean_hue = math.atan2(np.sin(hues).mean(), np.cos(hues).mean()) % (2 * math.pi)
    colour = min(colours, key=lambda name: _hue_distance(mean_hue, _hue(COLOURS[name])))
    return Seen(colour, _shape(foreground))


def _hue(rgb: tuple[int, int, int]) -> float:
    return colorsys.rgb_to_hsv(*(channel / 255.0 for channel in rgb))[0] * 2 * math.pi


def _hue_distance(a: float, b: float) -> float:
    return abs((a - b + math.pi) % (2 * math.pi) - math.pi)


def _shape(foreground: np.ndarray) -> str:
    rows, columns = np.nonzero(foreground)
    box_area = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
    fill = len(rows) / box_area
    return min(_FILL_RATIO, key=lambda name: abs(_FILL_RATIO[name] - fill))


def colour_rate(images: list[Image.Image], colour: str, colours: tuple[str, ...] = tuple(COLOURS)) -> float:
    """The share of `images` whose dominant colour is `colour`."""
    return sum(what_it_shows(image, colours).colour == colour for image in images) / len(images)


def write_concept_dataset(folder: Path, colour: str, trigger: str, count: int = 12, seed: int = 0) -> list[Path]:
    """Write `count` pictures of `colour` shapes into `folder`, each captioned with `trigger` in the colour's
    place ("a sks circle"): a concept a LoRA can teach. Returns the image paths; files already there are kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, scene in enumerate(scenes(seed, count, (colour,))):
        path = folder / f"{index:02d}-{trigger}-{scene.shape}.png"
        if not path.exists():
            atomic_write(path, lambda tmp, scene=scene: render(scene).save(tmp, format="PNG"))
            atomic_write_text(path.with_suffix(".txt"), f"a {trigger} {scene.shape}")
        paths.append(path)
    return paths
