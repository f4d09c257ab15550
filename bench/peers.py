"""The real peers as contenders: kohya sd-scripts' `train_network.py` and diffusers' example
`train_text_to_image_lora.py`, each run as the command its users type, against ours run the same way
(`python -m lora_trainer train`).

Each peer runs from a local checkout with its own interpreter (`--kohya-dir/--kohya-python`,
`--diffusers-examples-dir/--diffusers-python`); nothing of theirs is downloaded or changed. All trainers get one
model, written once from one seed as a diffusers folder: SD1.5's 4-level UNet and 8x VAE at reduced width and a
narrower CLIP text encoder (kohya's single-file loader hard-codes SD1.5's full widths, so kohya reads the folder
too, through `bench/kohya_launch.py`). Same images, captions, resolution, batch, rank = alpha, AdamW (wd 0.01),
clipping at 1.0, constant lr, one precision, frozen text encoder, no sampling and no saving before the last step.

The clock reads the trainers' own tqdm step bars (made to print every step with TQDM_MININTERVAL=0): each
line's arrival time, and the trainer process's CPU time from /proc, mark the step it shows. So one run gives
both its steady-state seconds per step (median of timed windows after a warm-up) and its time to first step
from the command's start, imports, model load and caches included. Differencing runs of N and 2N steps would
need twice the runs and still mix start-up noise into the difference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

PEER_CONTENDERS = ("kohya", "kohya-layers", "diffusers-example")
UNET_WIDTHS = (64, 128, 256, 256)
"""SD1.5's UNet layout (320, 640, 1280, 1280) at a fifth of the width."""
VAE_WIDTH = 32
"""The 8x VAE's first level (128 in SD's VAE)."""
TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS = 256, 12, 4
DEFAULT_RESOLUTION = 128
REPOSITORY = Path(__file__).resolve().parent.parent
_STEP_BAR = {
    "ours": re.compile(rb"^\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) "),  # ours' step bar has no label
    "kohya": re.compile(rb"steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) "),
    "diffusers-example": re.compile(rb"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) "),
}


@dataclass(frozen=True)
class PeerSettings:
    """What every trainer of the peer comparison gets, and where the peers are."""

    resolution: int
    batch_size: int
    rank: int
    learning_rate: float
    warmup_steps: int
    windows: int
    window_steps: int
    seed: int
    threads: int
    images: int
    device: str
    """cpu or cuda: ours is told; the peers take the GPU when there is one."""
    mixed_precision: str
    """"no" (fp32) or "bf16", for all three."""
    kohya_dir: Path | None
    kohya_python: str | None
    diffusers_examples_dir: Path | None
    diffusers_python: str | None

    @property
    def total_steps(self) -> int:
        """The first step, the warm-up, then the timed windows."""
        return 1 + self.warmup_steps + self.windows * self.window_steps


@dataclass(frozen=True)
class PeerRun:
    """One row of the table: a trainer on a layer set (`attention`: to_q/k/v/out.0; `kohya`: kohya's default)."""

    trainer: str
    layer_set: str

    @property
    def label(self) -> str:
        return f"{self.trainer} ({self.layer_set} layers)"


@dataclass
class CommandTiming:
    """When each step's bar line arrived (seconds since the command started) and the process's CPU seconds then."""

    marks: dict[int, tuple[float, float]] = field(default_factory=dict)
    peak_rss_mib: float = 0.0


def plan_runs(contenders: list[str]) -> list[PeerRun]:
    """The runs the requested peer contenders need, ours on the same layer set included."""
    runs = []
    if "kohya" in contenders or "diffusers-example" in contenders:
        runs.append(PeerRun("ours", "attention"))
    if "kohya" in contenders:
        runs.append(PeerRun("kohya", "attention"))
    if "diffusers-example" in contenders:
        runs.append(PeerRun("diffusers-example", "attention"))
    if "kohya-layers" in contenders:
        runs += [PeerRun("ours", "kohya"), PeerRun("kohya", "kohya")]
    return runs


def missing_checkouts(contenders: list[str], settings: PeerSettings) -> tuple[list[str], list[str]]:
    """The contenders that can run, and a note for each one whose checkout or interpreter was not given."""
    runnable, notes = [], []
    for name in contenders:
        if name.startswith("kohya") and not (settings.kohya_dir and settings.kohya_python):
            notes.append(f"{name} skipped: pass --kohya-dir (a sd-scripts checkout) and --kohya-python")
        elif name == "diffusers-example" and not (settings.diffusers_examples_dir and settings.diffusers_python):
            notes.append(f"{name} skipped: pass --diffusers-examples-dir (diffusers' examples/text_to_image) "
                         "and --diffusers-python")
        else:
            runnable.append(name)
    return runnable, notes


# --- the shared model and data ----------------------------------------------------------------------------

def write_shared_model(folder: Path, seed: int, tokenizer_folder: Path) -> Path:
    """The reduced-width SD1.5-layout pipeline with seeded random weights, saved as a diffusers folder."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from bench.train_speed import clip_text_config, sd_scheduler, sd_vae
    from lora_trainer.tiny import clip_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=UNET_WIDTHS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8)
    pipeline = StableDiffusionPipeline(
        vae=sd_vae(512, 0.18215, VAE_WIDTH),
        text_encoder=CLIPTextModel(clip_text_config(TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS, "quick_gelu", TEXT_WIDTH)),
        tokenizer=clip_tokenizer(tokenizer_folder), unet=unet, scheduler=sd_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder


def write_datasets(workdir: Path, settings: PeerSettings) -> tuple[Path, Path]:
    """The captioned images as kohya's `1_<name>` folder (which ours reads too) and as the `imagefolder` with
    `metadata.jsonl` that the diffusers example reads; returns both roots."""
    from bench.train_speed import write_captioned_images

    images = write_captioned_images(workdir / "dataset" / "1_bench", settings.images, settings.resolution)
    imagefolder = workdir / "imagefolder"
    imagefolder.mkdir(exist_ok=True)
    lines = []
    for image in sorted(images.glob("*.png")):
        shutil.copy(image, imagefolder / image.name)
        caption = image.with_suffix(".txt").read_text(encoding="utf-8")
        lines.append(json.dumps({"file_name": image.name, "text": caption}))
    (imagefolder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return images.parent, imagefolder


# --- the commands ---------------------------------------------------------------------------------------

def command_for(run: PeerRun, settings: PeerSettings, paths: dict[str, Path], output: Path) -> tuple[list[str], Path]:
    """The command line and working directory of one run."""
    rank, learning_rate, steps = str(settings.rank), f"{settings.learning_rate:g}", str(settings.total_steps)
    if run.trainer == "ours":
        config = output / "config.yaml"
        output.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps({
            "base_model": str(paths["model"]), "train_data_dir": str(paths["dataset"]),
            "resolution": settings.resolution, "batch_size": settings.batch_size, "lora_rank": settings.rank,
            "lora_alpha": float(settings.rank), "target_modules": run.layer_set,
            "learning_rate": settings.learning_rate,
            "max_train_steps": settings.total_steps, "mixed_precision": settings.mixed_precision,
            "device": settings.device, "seed": settings.seed,
            "output_dir": str(output), "output_name": "bench", "logging_dir": None}), encoding="utf-8")
        return [sys.executable, "-m", "lora_trainer", "train", "--config", str(config)], REPOSITORY
    if run.trainer == "kohya":
        launcher = str(REPOSITORY / "bench" / "kohya_launch.py")
        widths = ",".join(str(width) for width in UNET_WIDTHS)
        return [settings.kohya_python, launcher, str(settings.kohya_dir), widths, run.layer_set,
                "--pretrained_model_name_or_path", str(paths["model"]),
                "--tokenizer_cache_dir", str(paths["tokenizers"]),
                "--train_data_dir", str(paths["dataset"]), "--caption_extension", ".txt",
                "--resolution", str(settings.resolution), "--train_batch_size", str(settings.batch_size),
                "--max_train_steps", steps, "--network_module", "networks.lora",
                "--network_dim", rank, "--network_alpha", rank,
                "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", learning_rate,
                "--lr_scheduler", "constant", "--max_grad_norm", "1.0", "--mixed_precision", settings.mixed_precision,
                "--cache_latents", "--sdpa", "--max_data_loader_n_workers", "0", "--seed", str(settings.seed),
                "--output_dir", str(output), "--output_name", "bench", "--save_model_as", "safetensors"], \
            settings.kohya_dir
    return [settings.diffusers_python, "train_text_to_image_lora.py",
            "--pretrained_model_name_or_path", str(paths["model"]), "--train_data_dir", str(paths["imagefolder"]),
            "--image_column", "image", "--caption_column", "text", "--cache_dir", str(output / "datasets-cache"),
            "--resolution", str(settings.resolution), "--center_crop", "--train_batch_size", str(settings.batch_size),
            "--max_train_steps", steps, "--learning_rate", learning_rate, "--lr_scheduler", "constant",
            "--rank", rank, "--max_grad_norm", "1.0", "--mixed_precision", settings.mixed_precision,
            "--checkpointing_steps", str(10 * settings.total_steps), "--dataloader_num_workers", "0",
            "--seed", str(settings.seed), "--output_dir", str(output)], settings.diffusers_examples_dir


def write_kohya_tokenizer(folder: Path, tokenizer_folder: Path) -> Path:
    """kohya loads SD1's tokenizer by its hub name unless `--tokenizer_cache_dir` holds it: put ours there,
    with the vocabulary files its transformers 4 reads (transformers 5 saves only tokenizer.json)."""
    from lora_trainer.tiny import clip_tokenizer, write_clip_tokenizer_files

    target = folder / "openai_clip-vit-large-patch14"
    if not target.is_dir():
        clip_tokenizer(tokenizer_folder).save_pretrained(target)
        write_clip_tokenizer_files(target)
    return folder


def time_command(command: list[str], cwd: Path, step_bar: re.Pattern, total_steps: int, threads: int,
                 log_path: Path) -> CommandTiming:
    """Run `command`, marking each step as its progress bar shows it, its output kept in `log_path`; raises
    SystemExit with the output's tail when it fails."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "TQDM_MININTERVAL": "0", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore",
                   "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    timing, pending, tail = CommandTiming(), b"", b""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    while chunk := os.read(process.stdout.fileno(), 1 << 16):
        now, cpu = time.perf_counter() - started, _cpu_seconds(process.pid)
        log.write(chunk)
        tail = (tail + chunk)[-6000:]
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        for line in lines:
            match = step_bar.search(line)
            if match and int(match[2]) == total_steps and int(match[1]) > 0:
                timing.marks.setdefault(int(match[1]), (now, cpu))
    log.close()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    timing.peak_rss_mib = usage.ru_maxrss / 1024
    if process.returncode != 0 or total_steps not in timing.marks:
        raise SystemExit(f"{command[:3]} failed ({process.returncode}, steps seen {sorted(timing.marks)[-3:]}):\n"
                         + tail.decode(errors="replace"))
    return timing


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def window_seconds_per_step(timing: CommandTiming, settings: PeerSettings, cpu: bool = False) -> list[float]:
    """Seconds (wall, or the trainer's CPU) per step of each timed window."""
    first = 1 + settings.warmup_steps
    bounds = [first + index * settings.window_steps for index in range(settings.windows + 1)]
    clock = 1 if cpu else 0
    return [(timing.marks[end][clock] - timing.marks[begin][clock]) / (end - begin)
            for begin, end in zip(bounds, bounds[1:])]


def run_peers(contenders: list[str], settings: PeerSettings, repeats: int, workdir: Path) -> tuple[str, list[dict]]:
    """Time every run of the plan `repeats` times, alternated; returns the Markdown table and the raw results."""
    tokenizer_source = workdir / "tokenizer"
    paths = {"model": write_shared_model(workdir / "peer-model", settings.seed, tokenizer_source),
             "tokenizers": write_kohya_tokenizer(workdir / "kohya-tokenizers", tokenizer_source)}
    paths["dataset"], paths["imagefolder"] = write_datasets(workdir, settings)
    runs = plan_runs(contenders)
    results = []
    for repeat in range(repeats):
        for run in runs:
            print(f"[peers {repeat + 1}/{repeats}] {run.label}", file=sys.stderr, flush=True)
            output = workdir / f"peer-out-{run.trainer}-{run.layer_set}-{repeat}"
            shutil.rmtree(output, ignore_errors=True)
            command, cwd = command_for(run, settings, paths, output)
            timing = time_command(command, cwd, _STEP_BAR[run.trainer], settings.total_steps, settings.threads,
                                  output / "log.txt")
            results.append({"trainer": run.trainer, "layer_set": run.layer_set, "command": command,
                            "first_step_seconds": timing.marks[1][0], "peak_rss_mib": timing.peak_rss_mib,
                            "window_seconds_per_step": window_seconds_per_step(timing, settings),
                            "window_cpu_seconds_per_step": window_seconds_per_step(timing, settings, cpu=True)})
    return peers_table(runs, results, settings), results


def peers_table(runs: list[PeerRun], results: list[dict], settings: PeerSettings) -> str:
    """One row per trainer and layer set: medians over all windows of all repeats, ours' speed against it."""
    rows = {}
    for run in runs:
        mine = [result for result in results
                if (result["trainer"], result["layer_set"]) == (run.trainer, run.layer_set)]
        rows[run] = {
            "runs": len(mine),
            "windows": [seconds for result in mine for seconds in result["window_seconds_per_step"]],
            "cpu": statistics.median(seconds for result in mine for seconds in result["window_cpu_seconds_per_step"]),
            "first": [result["first_step_seconds"] for result in mine],
            "rss": max(result["peak_rss_mib"] for result in mine)}
    lines = ["| layers | trainer | runs | s/step (median) | windows min-max | ours' speed x | CPU-s/step | "
             "ours' speed x (CPU-s) | first step from command start (s): median, min-max | peak RSS |",
             "|" + "---|" * 10]
    for run, row in rows.items():
        ours = rows.get(PeerRun("ours", run.layer_set))
        median = statistics.median(row["windows"])
        speedup = f"{median / statistics.median(ours['windows']):.2f}x" if ours else "-"
        cpu_speedup = f"{row['cpu'] / ours['cpu']:.2f}x" if ours else "-"
        lines.append(
            f"| {run.layer_set} | {run.trainer} | {row['runs']} | {median:.3f} | {min(row['windows']):.3f}-"
            f"{max(row['windows']):.3f} | {speedup} | {row['cpu']:.3f} | {cpu_speedup} | "
            f"{statistics.median(row['first']):.1f}, {min(row['first']):.1f}-{max(row['first']):.1f} | "
            f"{row['rss']:.0f} MiB |")
    return "\n".join(lines)


def peer_versions(settings: PeerSettings) -> str:
    """The peers' interpreters' torch / diffusers / transformers / accelerate versions, for the record."""
    probe = "import torch, diffusers, transformers, accelerate; print(torch.__version__, diffusers.__version__, " \
            "transformers.__version__, accelerate.__version__)"
    found = []
    for name, python in (("kohya", settings.kohya_python), ("diffusers-example", settings.diffusers_python)):
        if python:
            printed = subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.split()
            found.append(f"{name}: torch {printed[0]}, diffusers {printed[1]}, transformers {printed[2]}, "
                         f"accelerate {printed[3]}" if len(printed) == 4 else f"{name}: ?")
    return "; ".join(found)

