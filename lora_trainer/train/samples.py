"""Sample images during training: the prompts (inline or from a file, with kohya's per-prompt options), their
rendering, and the PNG files they are kept in."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lora_trainer.config import TrainConfig
from lora_trainer.errors import UserError
from lora_trainer.files import write_new_file
from lora_trainer.models.base import DiffusionBackend

SAMPLES_FOLDER = "samples"
"""The subfolder of `output_dir` that keeps every sample image."""

_OPTIONS = {"n": "negative_prompt", "w": "width", "h": "height", "s": "steps", "d": "seed", "l": "cfg_scale"}
"""kohya's per-prompt options (`--n` negative prompt, `--w`/`--h` size, `--s` steps, `--d` seed, `--l` cfg)."""


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image's prompt and settings."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    seed: int
    cfg_scale: float


def sample_prompts(config: TrainConfig) -> list[SamplePrompt]:
    """The run's sample prompts: `sample_prompts`, then the lines of `sample_prompts_file` (blank lines and
    `#` comments skipped); each may carry kohya's options (`a cat --n blurry --w 768 --d 5 --l 6 --s 30`)."""
    sampling, resolution = config.sampling, config.dataset.resolution
    defaults = SamplePrompt("", "", resolution, resolution, sampling.sample_steps, sampling.sample_seed,
                            sampling.sample_cfg_scale)
    lines = [(line, "sample_prompts") for line in sampling.sample_prompts]
    if sampling.sample_prompts_file is not None:
        path = Path(sampling.sample_prompts_file)
        if not path.is_file():
            raise UserError(f"sample_prompts_file {path} does not exist")
        lines += [(line, f"{path}, line {number}")
                  for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1)
                  if line.strip() and not line.lstrip().startswith("#")]
    return [parse_prompt_line(line, defaults, where) for line, where in lines]


def parse_prompt_line(line: str, defaults: SamplePrompt, where: str = "sample prompt") -> SamplePrompt:
    """A prompt with kohya's ` --x value` options split off and applied over `defaults`."""
    prompt, *options = line.split(" --")
    settings: dict[str, object] = {"prompt": prompt.strip()}
    for option in options:
        letter, _, value = option.strip().partition(" ")
        field_name = _OPTIONS.get(letter)
        if field_name is None:
            raise UserError(f"{where}: unknown option --{letter}; the options are "
                            + ", ".join(f"--{name}" for name in _OPTIONS))
        value = value.strip()
        try:
            settings[field_name] = (value if field_name == "negative_prompt" else
                                    float(value) if field_name == "cfg_scale" else int(value))
        except ValueError:
            raise UserError(f"{where}: --{letter} needs a number, got {value!r}") from None
    return replace(defaults, **settings)


def render_samples(backend: DiffusionBackend, prompts: list[SamplePrompt]) -> list[Image.Image]:
    """One image per prompt from the model as it is now."""
    return [backend.generate(sample.prompt, sample.negative_prompt, sample.seed, sample.steps, sample.width,
                             sample.height, sample.cfg_scale) for sample in prompts]


def save_samples(folder: Path, run_name: str, step: int, prompts: list[SamplePrompt],
                 images: list[Image.Image]) -> list[Path]:
    """Write each image as `run_name-s000100-00-seed1.png` (step, prompt index, seed), its prompt and settings
    in the PNG's text; an existing file is never replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (sample, image) in enumerate(zip(prompts, images)):
        info = PngInfo()
        info.add_text("parameters", describe(sample) + f", Step: {step}")
        path = folder / f"{run_name}-s{step:06d}-{index:02d}-seed{sample.seed}.png"
        paths.append(write_new_file(path, lambda tmp, image=image, info=info: image.save(tmp, "PNG", pnginfo=info)))
    return paths


def describe(sample: SamplePrompt) -> str:
    """The prompt and its settings as the WebUI's infotext writes them."""
    negative = f"\nNegative prompt: {sample.negative_prompt}" if sample.negative_prompt else ""
    return (f"{sample.prompt}{negative}\nSteps: {sample.steps}, CFG scale: {sample.cfg_scale}, "
            f"Seed: {sample.seed}, Size: {sample.width}x{sample.height}")

