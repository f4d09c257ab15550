"""Training speed: the library's trainer ("ours") against the plain diffusers + peft loop ("reference").

    python -m bench.train_speed                                   # tiny SD1 on the CPU, about a minute
    python -m bench.train_speed --text-encoder                    # the same, training the text encoder too
    python -m bench.train_speed --workload sd15-512 --grid        # full-size SD1.5 on a GPU: batch 1/4 x TE x ckpt
    python -m bench.train_speed --workload sdxl-1024 --batch-size 1 --gradient-checkpointing
    python -m bench.train_speed --contenders kohya,kohya-layers,diffusers-example --kohya-dir ~/sd-scripts \
        --kohya-python ~/sd-scripts/venv/bin/python --diffusers-examples-dir ~/diffusers/examples/text_to_image \
        --diffusers-python ~/diffusers/venv/bin/python --repeats 3    # the real peers (bench/peers.py)

Both contenders get the same model weights (built from one seed, random: nothing is downloaded), the same
captioned images, batch size, rank, alpha, learning rate, optimizer settings and precision. Each run is a
fresh subprocess, so peak memory (CUDA max allocated on a GPU, with the allocator's peak reserved, and peak RSS
on the CPU) is that contender's own; on a GPU, our rows also give the memory plan's estimated peak and its
error against the peak reserved. Samples/s is the median of several timed windows after a warm-up; time to
first step runs from handing the in-memory model to the trainer until its first optimizer step has finished,
caches included.
Nothing here asserts a speed: CI may run the tiny workload once as a smoke check.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench import peers
from bench.peers import PEER_CONTENDERS

IN_PROCESS_CONTENDERS = ("ours", "ours-webui", "reference", "ours-channels-last", "ours-compile", "ours-fp8")
"""ours-fp8 stores the frozen UNet in fp8 (e4m3) during the run (`fp8_base`), as kohya's --fp8_base does."""
CONTENDERS = IN_PROCESS_CONTENDERS + PEER_CONTENDERS
WEBUI_WORKLOADS = ("tiny-sd1", "sd15-512")
"""Workloads with an ldm model for the WebUI backend (SDXL needs sgm, which is not installable here)."""
BF16_DENSE_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0}
"""Dense bf16 peak by GPU name, first match wins."""
REPOSITORY = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Workload:
    """A model architecture at a training resolution, with the defaults it is timed at."""

    resolution: int
    bucket_step: int
    device: str
    mixed_precision: str
    unet_step_gflop: float | None = None
    """UNet LoRA train step (forward + backward) per sample, from /work/shared/performance-facts.md."""
    unet_step_gflop_checkpointed: float | None = None
    text_encoder_forward_gflop: float | None = None


WORKLOADS = {
    "tiny-sd1": Workload(resolution=32, bucket_step=8, device="cpu", mixed_precision="no"),
    "sd15-512": Workload(resolution=512, bucket_step=64, device="cuda", mixed_precision="bf16",
                         unet_step_gflop=1725, unet_step_gflop_checkpointed=2317, text_encoder_forward_gflop=13),
    "sdxl-1024": Workload(resolution=1024, bucket_step=64, device="cuda", mixed_precision="bf16",
                          unet_step_gflop=14188, unet_step_gflop_checkpointed=19336, text_encoder_forward_gflop=111),
}


@dataclass(frozen=True)
class RunSettings:
    """One timed run of one contender; the child process gets exactly this."""

    workload: str
    contender: str
    batch_size: int
    train_text_encoder: bool
    gradient_checkpointing: bool
    resolution: int
    mixed_precision: str
    device: str
    rank: int
    learning_rate: float
    warmup_steps: int
    windows: int
    window_steps: int
    seed: int
    threads: int
    """torch CPU threads (intra-op), the same for every contender."""
    dataset: str
    tokenizer_folder: str
    output_dir: str

    @property
    def total_steps(self) -> int:
        """The first step (timed alone), the warm-up, then the timed windows."""
        return 1 + self.warmup_steps + self.windows * self.window_steps


# --- models: the published architectures with random weights ---------------------------------------------

def clip_text_config(hidden_size: int, layers: int, heads: int, hidden_act: str, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          hidden_act=hidden_act, projection_dim=projection_dim, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407)


def sd_vae(sample_size: int, scaling_factor: float, width: int = 128):
    """The SD VAE's 4-level (8x) layout; `width` is its first level's channels (128 in the published VAEs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                         block_out_channels=(width, 2 * width, 4 * width, 4 * width),
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size,
                         scaling_factor=scaling_factor)


def sd_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, prediction_type="epsilon", timestep_spacing="leading",
                                  steps_offset=1)


def build_pipeline(settings: RunSettings):
    """The workload's pipeline with seeded random weights, on the device, base weights in the training dtype.

    Built and cast before the clock starts, so neither contender pays for (or counts the memory of) fp32
    construction; the VAE stays fp32 as the library's backend keeps it.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.tiny import clip_tokenizer, tiny_sd_pipeline

    device = torch.device(settings.device)
    weight_dtype = torch.bfloat16 if settings.mixed_precision == "bf16" else torch.float32
    torch.manual_seed(settings.seed)
    if settings.workload == "tiny-sd1":
        pipeline = tiny_sd_pipeline("sd1", seed=settings.seed, tokenizer_folder=Path(settings.tokenizer_folder))
    else:
        tokenizer, scheduler = clip_tokenizer(Path(settings.tokenizer_folder)), sd_scheduler()
        with device:  # random initialisation on the device: seconds for SDXL on a GPU, not minutes
            clip_l = CLIPTextModel(clip_text_config(768, 12, 12, "quick_gelu", 768))
            if settings.workload == "sd15-512":
                unet = UNet2DConditionModel(
                    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280, 1280),
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                    cross_attention_dim=768, attention_head_dim=8)
                pipeline = StableDiffusionPipeline(
                    vae=sd_vae(512, 0.18215), text_encoder=clip_l, tokenizer=tokenizer, unet=unet,
                    scheduler=scheduler, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)
            else:
                unet = UNet2DConditionModel(
                    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(320, 640, 1280),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                    use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
                big_g = CLIPTextModelWithProjection(clip_text_config(1280, 32, 20, "gelu", 1280))
                pipeline = StableDiffusionXLPipeline(
                    vae=sd_vae(1024, 0.13025), text_encoder=clip_l, text_encoder_2=big_g,
                    tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipeline.to(device, weight_dtype)
    pipeline.vae.to(torch.float32)
    return pipeline


def build_ldm_model(settings: RunSettings, workdir: Path):
    """The same architecture as `build_pipeline`'s, as the `ldm` model object the WebUI loads (for ours-webui).

    Attention runs through SDPA, as the WebUI's default cross-attention optimisation makes it do.
    """
    from ldm.modules.attention import CrossAttention
    from ldm.util import instantiate_from_config
    from transformers import CLIPTextModel

    from lora_trainer.tiny import clip_tokenizer, text_encoder_config
    from tests.ldm_models import WebUITextEncoder

    CrossAttention.forward = _webui_sdp_attention
    tiny = settings.workload == "tiny-sd1"
    clip_folder = workdir / f"ldm-clip-{settings.workload}"
    if not (clip_folder / "config.json").is_file():
        torch.manual_seed(settings.seed)
        text_config = text_encoder_config() if tiny else clip_text_config(768, 12, 12, "quick_gelu", 768)
        clip_tokenizer(Path(settings.tokenizer_folder)).save_pretrained(clip_folder)
        CLIPTextModel(text_config).save_pretrained(clip_folder)
    if tiny:
        unet = {"image_size": 16, "model_channels": 32, "attention_resolutions": [1], "channel_mult": [1, 2],
                "context_dim": 32}
    else:
        unet = {"image_size": 64, "model_channels": 320, "attention_resolutions": [4, 2, 1],
                "channel_mult": [1, 2, 4, 4], "context_dim": 768}
    autoencoder = {"resolution": 32, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1} if tiny else {
        "resolution": 256, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}
    torch.manual_seed(settings.seed)
    model = instantiate_from_config({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "first_stage_key": "jpg",
        "cond_stage_key": "txt", "image_size": unet["image_size"], "channels": 4, "cond_stage_trainable": False,
        "conditioning_key": "crossattn", "scale_factor": 0.18215, "use_ema": False, "monitor": None,
        "parameterization": "eps",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            **unet, "in_channels": 4, "out_channels": 4, "num_res_blocks": 2, "num_heads": 2 if tiny else 8,
            "use_spatial_transformer": True, "transformer_depth": 1, "use_linear_in_transformer": False,
            "legacy": False, "use_checkpoint": True}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"}, "ddconfig": {
                **autoencoder, "double_z": True, "z_channels": 4, "in_channels": 3, "out_ch": 3,
                "attn_resolutions": [], "dropout": 0.0}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                              "params": {"version": str(clip_folder), "device": settings.device}},
    }})
    model.cond_stage_model = WebUITextEncoder(model.cond_stage_model)  # the WebUI's prompt-parsing wrapper
    model.is_sd1, model.is_sd2, model.is_sdxl = True, False, False
    weight_dtype = torch.bfloat16 if settings.mixed_precision == "bf16" else torch.float32
    model.model.to(weight_dtype)
    model.cond_stage_model.to(weight_dtype)
    return model.to(settings.device).eval()


def _webui_sdp_attention(self, x: torch.Tensor, context: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """ldm's CrossAttention.forward as the WebUI's `sdp` optimisation replaces it."""
    context = x if context is None else context
    batch_size = x.shape[0]
    query, key, value = self.to_q(x), self.to_k(context), self.to_v(context)
    head_dim = query.shape[-1] // self.heads
    query, key, value = (t.view(batch_size, -1, self.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    hidden_states = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return self.to_out(hidden_states.transpose(1, 2).reshape(batch_size, -1, self.heads * head_dim))


def write_captioned_images(folder: Path, count: int, size: int) -> Path:
    """`count` images of coloured shapes at `size` px, each with its own `.txt` caption (kept if present)."""
    from PIL import Image, ImageDraw

    colours = ["red", "blue", "green", "orange", "purple", "teal", "black", "yellow", "pink", "brown"]
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image_path = folder / f"{index:03d}.png"
        if image_path.exists():
            continue
        colour, shape = colours[index % len(colours)], ("circle", "square")[index // len(colours) % 2]
        image = Image.new("RGB", (size, size), "white")
        margin = size // 8 + index % 5 * size // 40
        box = (margin, margin, size - margin, size - margin)
        (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)(box, fill=colour)
        image.save(image_path)
        image_path.with_suffix(".txt").write_text(f"sks, a {colour} {shape}, picture {index}", encoding="utf-8")
    return folder


# --- timing -----------------------------------------------------------------------------------------------

class StepClock:
    """Marks the time after the first step and at window boundaries; the device syncs only there.

    Besides wall time it keeps the process's CPU time: on a shared CPU machine, where other jobs steal
    cores, samples per CPU-second of a single-threaded run is the steadier measure of the work done.
    """

    def __init__(self, settings: RunSettings):
        self.device = torch.device(settings.device)
        first_window = 1 + settings.warmup_steps
        self.boundaries = [first_window + k * settings.window_steps for k in range(settings.windows + 1)]
        self.marks: dict[int, tuple[float, float]] = {}
        self.phases: dict[str, float] = {}
        self.started = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        """The trainer gets the model now."""
        self.started = self._now()

    def tick(self, step: int) -> None:
        """An optimizer step has been issued."""
        if step == 1 or step in self.boundaries:
            self.marks[step] = (self._now(), time.process_time())

    def phase(self, name: str) -> None:
        """Note when a named phase of the start-up begins (the first time only), in seconds since `start`."""
        self.phases.setdefault(name, self._now() - self.started)

    def seconds_to_first_step(self) -> float:
        """From `start` until the first optimizer step had finished."""
        return self.marks[1][0] - self.started

    def window_rates(self, batch_sizes: list[int], cpu_time: bool = False) -> list[float]:
        """Samples/s (or per CPU-second) of each timed window; `batch_sizes[i]` is the samples of step i + 1."""
        clock = 1 if cpu_time else 0
        return [sum(batch_sizes[begin:end]) / (self.marks[end][clock] - self.marks[begin][clock])
                for begin, end in itertools.pairwise(self.boundaries)]


# --- the contenders (each runs in its own child process) --------------------------------------------------

def run_ours(settings: RunSettings, model, clock: StepClock) -> tuple[list[int], float | None, float]:
    """The library's trainer with the defaults a user gets. Returns samples per step, the last loss and the
    memory plan's estimated peak (GiB)."""
    from lora_trainer.config import config_from_dict
    from lora_trainer.data.dataset import TrainingData
    from lora_trainer.data.scan import scan_dataset
    from lora_trainer.train.events import RunPlan, StepReport, TrainingEvents
    from lora_trainer.train.loop import train

    class TimedEvents(TrainingEvents):
        def on_message(self, text: str) -> None:
            clock.phase("caching")

        def on_start(self, plan: RunPlan) -> None:
            clock.phase("training")
            estimates.append(plan.memory.estimate.total / 2**30)

        def on_step(self, report: StepReport) -> None:
            clock.tick(report.step)

    if settings.contender == "ours-channels-last":
        model.unet.to(memory_format=torch.channels_last)
    if settings.contender == "ours-compile":
        model.unet.compile()
    config = config_from_dict(dict(
        train_data_dir=Path(settings.dataset), resolution=settings.resolution,
        bucket_step=WORKLOADS[settings.workload].bucket_step, lora_rank=settings.rank, lora_alpha=float(settings.rank),
        train_text_encoder=settings.train_text_encoder, learning_rate=settings.learning_rate,
        batch_size=settings.batch_size, max_train_steps=settings.total_steps,
        mixed_precision=settings.mixed_precision, gradient_checkpointing=settings.gradient_checkpointing,
        cache_latents=True, cache_text_encoder_outputs=not settings.train_text_encoder,
        fp8_base=settings.contender == "ours-fp8",
        output_dir=Path(settings.output_dir), output_name="bench", logging_dir=None, seed=settings.seed,
        device=settings.device))
    estimates: list[float] = []
    clock.start()
    backend = _backend(settings, model)
    result = train(config, backend, TimedEvents())
    # The batch plan is deterministic per seed: rebuild it to count the samples of every step exactly.
    data = TrainingData(scan_dataset(config.dataset.train_data_dir), config, backend.latent_scale)
    epochs = -(-settings.total_steps // data.batches_per_epoch())
    batch_sizes = [len(batch) for epoch in range(epochs) for batch in data.epoch_plan(epoch)]
    return batch_sizes, result.last_loss, estimates[0]


def _backend(settings: RunSettings, model):
    if settings.contender == "ours-webui":
        from lora_trainer.models.webui_backend import WebUIBackend

        return WebUIBackend(model, model_name=settings.workload, device=settings.device)
    from lora_trainer.models.diffusers_backend import DiffusersBackend

    weight_dtype = torch.bfloat16 if settings.mixed_precision == "bf16" else torch.float32
    return DiffusersBackend(model, settings.device, weight_dtype, model_name=settings.workload)


def run_reference(settings: RunSettings, pipeline, clock: StepClock) -> tuple[list[int], float | None, None]:
    """The documented diffusers + peft loop (bench/reference_loop.py); it has no memory estimate."""
    from bench.reference_loop import ReferenceSettings, train_reference

    batch_sizes: list[int] = []

    def on_step(step: int, batch_size: int) -> None:
        batch_sizes.append(batch_size)
        clock.tick(step)

    reference = ReferenceSettings(
        dataset=Path(settings.dataset), resolution=settings.resolution, batch_size=settings.batch_size,
        rank=settings.rank, learning_rate=settings.learning_rate, train_text_encoder=settings.train_text_encoder,
        gradient_checkpointing=settings.gradient_checkpointing, mixed_precision=settings.mixed_precision,
        max_steps=settings.total_steps, seed=settings.seed)
    clock.start()
    loss = train_reference(pipeline, reference, torch.device(settings.device), on_step)
    return batch_sizes, loss, None


def child_main(settings_path: Path, result_path: Path) -> None:
    """Build the model, time one contender, write its measurements as JSON."""
    settings = RunSettings(**json.loads(settings_path.read_text()))
    torch.set_num_threads(settings.threads)
    if settings.contender == "ours-webui":
        model = build_ldm_model(settings, settings_path.parent)
    else:
        model = build_pipeline(settings)
    on_cuda = torch.device(settings.device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(settings)
    contender = run_reference if settings.contender == "reference" else run_ours
    batch_sizes, last_loss, estimated_peak = contender(settings, model, clock)
    rates = clock.window_rates(batch_sizes)
    result = {
        "settings": asdict(settings),
        "samples_per_second": statistics.median(rates),
        "window_samples_per_second": rates,
        "window_samples_per_cpu_second": clock.window_rates(batch_sizes, cpu_time=True),
        "seconds_to_first_step": clock.seconds_to_first_step(),
        "startup_phases": clock.phases,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
        "peak_cuda_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_cuda else None,
        "estimated_peak_gib": estimated_peak,
        "last_loss": last_loss,
    }
    result_path.write_text(json.dumps(result, indent=1))


# --- the parent: plan, run, tabulate ----------------------------------------------------------------------

def machine_description() -> dict:
    """CPU, GPU, thread count, load and library versions, for the record."""
    import diffusers
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_default_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "peft": peft.__version__, "transformers": transformers.__version__,
    }


def webui_python_problem(python: str, workload: str, device: str, precision: str) -> str | None:
    """Why ours-webui cannot run with interpreter `python` on `workload`, or None when it can."""
    if workload not in WEBUI_WORKLOADS:
        return f"no ldm model for {workload} here (SDXL's model object needs `sgm`, which is not installable)"
    if device == "cpu" and precision == "bf16":
        return ("ldm's GroupNorm32 upcasts its input but not bf16 weights, which CPU autocast does not fix "
                "(the WebUI runs fp32 on the CPU)")
    if importlib.util.find_spec("lora_trainer.models.webui_backend") is None:
        return "lora_trainer/models/webui_backend.py does not exist"
    check = subprocess.run([python, "-c", "import ldm, omegaconf, lora_trainer.models.webui_backend"],
                           capture_output=True, text=True, cwd=REPOSITORY)
    if check.returncode != 0:
        return (f"{python} cannot import the `ldm` package (the WebUI's model code); pass --webui-python with an "
                "interpreter that can (./dev env webui)")
    return None


def mfu(settings: RunSettings, samples_per_second: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: the UNet LoRA step (+ a trained TE's forward and backward) per sample."""
    workload = WORKLOADS[settings.workload]
    if peak_tflops is None or workload.unet_step_gflop is None or settings.resolution != workload.resolution:
        return None
    gflop = workload.unet_step_gflop_checkpointed if settings.gradient_checkpointing else workload.unet_step_gflop
    if settings.train_text_encoder:  # forward + backward to the inputs ~ 3 forwards (4 with recompute)
        gflop += (4 if settings.gradient_checkpointing else 3) * workload.text_encoder_forward_gflop
    return gflop * 1e9 * samples_per_second / (peak_tflops * 1e12)


def summarise(results: list[dict]) -> list[dict]:
    """One row per setting and contender: repeats pooled (median over all their windows), ratio to reference."""
    rows: dict[tuple, dict] = {}
    for result in results:
        settings = RunSettings(**result["settings"])
        row = rows.setdefault((*_setting_key(settings), settings.contender), {
            "settings": settings, "windows": [], "cpu_windows": [], "first_step": [], "rss_mib": [], "cuda_gib": [],
            "reserved_gib": [], "estimate_gib": []})
        row["windows"] += result["window_samples_per_second"]
        row["cpu_windows"] += result["window_samples_per_cpu_second"]
        row["first_step"].append(result["seconds_to_first_step"])
        row["rss_mib"].append(result["peak_rss_mib"])
        if result["peak_cuda_allocated_gib"] is not None:
            row["cuda_gib"].append(result["peak_cuda_allocated_gib"])
            row["reserved_gib"].append(result["peak_cuda_reserved_gib"])
        if result.get("estimated_peak_gib") is not None:
            row["estimate_gib"].append(result["estimated_peak_gib"])
    for row in rows.values():
        row["samples_per_second"] = statistics.median(row["windows"])
        row["samples_per_cpu_second"] = statistics.median(row["cpu_windows"])
    for key, row in rows.items():
        reference = rows.get((*key[:-1], "reference"))
        row["ratio"] = row["samples_per_second"] / reference["samples_per_second"] if reference else None
        row["cpu_ratio"] = row["samples_per_cpu_second"] / reference["samples_per_cpu_second"] if reference else None
    return list(rows.values())


def markdown_table(rows: list[dict], peak_tflops: float | None) -> str:
    """The summary rows as a Markdown table (on the CPU with samples per CPU-second too, on a GPU with MFU)."""
    on_cpu = all(torch.device(row["settings"].device).type == "cpu" for row in rows)
    last = "samples/CPU-s | ours/ref (CPU-s)" if on_cpu else "MFU"
    lines = ["| workload | batch | TE | ckpt | contender | runs | samples/s (median) | windows min-max | ours/ref "
             f"| peak memory | first step (s) | {last} |", "|" + "---|" * (12 + on_cpu)]
    for row in rows:
        settings = row["settings"]
        memory = (f"{max(row['cuda_gib']):.2f} GiB (CUDA; reserved {max(row['reserved_gib']):.2f})"
                  if row["cuda_gib"] else f"{max(row['rss_mib']):.0f} MiB (RSS)")
        if row["cuda_gib"] and row["estimate_gib"]:
            estimate = row["estimate_gib"][0]
            memory += f"; estimate {estimate:.2f}, {estimate / max(row['reserved_gib']) - 1:+.0%} of reserved"
        utilisation = mfu(settings, row["samples_per_second"], peak_tflops)
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        if on_cpu:
            cpu_ratio = "-" if row["cpu_ratio"] is None else f"{row['cpu_ratio']:.2f}x"
            last = f"{row['samples_per_cpu_second']:.2f} | {cpu_ratio}"
        else:
            last = "-" if utilisation is None else f"{utilisation:.1%}"
        text_encoder = "on" if settings.train_text_encoder else "off"
        checkpointing = "on" if settings.gradient_checkpointing else "off"
        lines.append(
            f"| {settings.workload} {settings.resolution}px | {settings.batch_size} | {text_encoder} | "
            f"{checkpointing} | {settings.contender} | {len(row['first_step'])} | {row['samples_per_second']:.2f} | "
            f"{min(row['windows']):.2f}-{max(row['windows']):.2f} | "
            f"{ratio} | {memory} | "
            f"{statistics.median(row['first_step']):.2f} | {last} |")
    return "\n".join(lines)


def _setting_key(settings: RunSettings) -> tuple:
    return (settings.workload, settings.batch_size, settings.train_text_encoder, settings.gradient_checkpointing,
            settings.resolution)


def run_child(settings: RunSettings, python: str, workdir: Path, index: int) -> dict:
    """Run one contender in a fresh Python process and read back its measurements."""
    settings_path, result_path = workdir / f"run{index}-settings.json", workdir / f"run{index}-result.json"
    settings_path.write_text(json.dumps(asdict(settings)))
    command = [python, "-m", "bench.train_speed", "--child", str(settings_path), str(result_path)]
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPOSITORY)
    if completed.returncode != 0:
        raise SystemExit(f"{settings.contender} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny-sd1")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[4], help="one run per value (default 4)")
    parser.add_argument("--text-encoder", action="store_true", help="train the text encoder LoRA too")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--grid", action="store_true",
                        help="batch 1 and 4 x UNet-only and UNet+TE x with and without gradient checkpointing")
    parser.add_argument("--contenders", default="ours,ours-webui,reference",
                        help=f"comma-separated, from {', '.join(CONTENDERS)} (default: %(default)s)")
    parser.add_argument("--webui-python", default=sys.executable,
                        help="interpreter for ours-webui, one that can import the WebUI's `ldm` package")
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender, interleaved")
    parser.add_argument("--steps", type=int, default=50, help="timed optimizer steps, split into --windows")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--resolution", type=int, help="override the workload's (e.g. a CPU smoke run of sd15)")
    parser.add_argument("--precision", choices=["no", "bf16"], help="override the workload's (no = fp32)")
    parser.add_argument("--device", help="override the workload's (cpu / cuda)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads per run (default: 1 on the CPU, steadier on a shared machine and "
                             "what the tests use; torch's default with a GPU)")
    parser.add_argument("--kohya-dir", type=Path, help="a kohya sd-scripts checkout, for kohya and kohya-layers")
    parser.add_argument("--kohya-python", help="the interpreter of kohya's environment")
    parser.add_argument("--diffusers-examples-dir", type=Path,
                        help="diffusers' examples/text_to_image folder, for diffusers-example")
    parser.add_argument("--diffusers-python", help="an interpreter with diffusers (from that checkout) and the "
                        "example's requirements")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (known: H100, H200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write every measurement as JSON here")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Plan the runs, time every contender in its own process, print the table."""
    argv = sys.argv[1:] if argv is None else argv
    arguments = parse_arguments(argv)
    if arguments.child:
        child_main(*arguments.child)
        return
    workload = WORKLOADS[arguments.workload]
    contenders = [name.strip() for name in arguments.contenders.split(",") if name.strip()]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown or arguments.steps < arguments.windows:
        raise SystemExit(f"unknown contender(s) {unknown}" if unknown else "--steps must be at least --windows")
    device = arguments.device or workload.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--workload {arguments.workload} needs a CUDA GPU (or --device cpu for a smoke run)")
    peer_contenders = [name for name in contenders if name in PEER_CONTENDERS]
    contenders = [name for name in contenders if name not in PEER_CONTENDERS]
    notes = ["ours: cache_latents on, cache_text_encoder_outputs on when the TE is frozen (the library's defaults)"]
    precision = arguments.precision or workload.mixed_precision
    webui_problem = None
    if "ours-webui" in contenders:
        webui_problem = webui_python_problem(arguments.webui_python, arguments.workload, device, precision)
    if webui_problem:
        contenders = [name for name in contenders if name != "ours-webui"]
        notes.append(f"TODO ours-webui (the WebUI-model backend) not measured: {webui_problem}")
    elif "ours-webui" in contenders:
        notes.append("ours-webui: the WebUI backend on an ldm `LatentDiffusion` of the same architecture (its own "
                     "random weights), attention through SDPA as the WebUI's `sdp` optimisation does")
    resolution = arguments.resolution or workload.resolution
    if arguments.grid:
        variants = list(itertools.product([1, 4], [False, True], [False, True]))
    else:
        variants = [(batch, arguments.text_encoder, arguments.gradient_checkpointing)
                    for batch in arguments.batch_size]

    machine = machine_description()
    peak_tflops = arguments.peak_tflops or next(
        (peak for name, peak in BF16_DENSE_PEAK_TFLOPS.items() if machine["gpu"] and name in machine["gpu"]), None)
    started = datetime.datetime.now().astimezone()
    results, peer_table, peer_results = [], None, []
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as temporary:
        workdir = Path(temporary)
        from lora_trainer.tiny import write_clip_tokenizer_files

        base = RunSettings(
            workload=arguments.workload, contender="", batch_size=0, train_text_encoder=False,
            gradient_checkpointing=False, resolution=resolution,
            mixed_precision=precision, device=device, rank=arguments.rank,
            learning_rate=arguments.learning_rate, warmup_steps=arguments.warmup_steps, windows=arguments.windows,
            window_steps=arguments.steps // arguments.windows, seed=arguments.seed,
            threads=arguments.threads or (1 if device == "cpu" else torch.get_num_threads()),
            dataset=str(write_captioned_images(workdir / "dataset", arguments.images, resolution)),
            tokenizer_folder=str(write_clip_tokenizer_files(workdir / "tokenizer")), output_dir="")
        plan = [replace(base, contender=contender, batch_size=batch, train_text_encoder=text_encoder,
                        gradient_checkpointing=checkpointing)
                for batch, text_encoder, checkpointing in variants for _ in range(arguments.repeats)
                for contender in contenders]
        for index, settings in enumerate(plan):
            print(f"[{index + 1}/{len(plan)}] {settings.contender}: batch {settings.batch_size}, "
                  f"TE {'on' if settings.train_text_encoder else 'off'}, "
                  f"ckpt {'on' if settings.gradient_checkpointing else 'off'}", file=sys.stderr, flush=True)
            python = arguments.webui_python if settings.contender == "ours-webui" else sys.executable
            results.append(run_child(replace(settings, output_dir=str(workdir / f"out{index}")), python, workdir,
                                     index))
        peer_settings = peers.PeerSettings(
            resolution=arguments.resolution or peers.DEFAULT_RESOLUTION, batch_size=arguments.batch_size[0],
            rank=base.rank, learning_rate=base.learning_rate, warmup_steps=base.warmup_steps, windows=base.windows,
            window_steps=base.window_steps, seed=base.seed, threads=base.threads, images=arguments.images,
            device=device, mixed_precision=arguments.precision or ("bf16" if device.startswith("cuda") else "no"),
            kohya_dir=arguments.kohya_dir, kohya_python=arguments.kohya_python,
            diffusers_examples_dir=arguments.diffusers_examples_dir, diffusers_python=arguments.diffusers_python)
        peer_contenders, peer_notes = peers.missing_checkouts(peer_contenders, peer_settings)
        notes += peer_notes
        if peer_contenders:
            peer_table, peer_results = peers.run_peers(peer_contenders, peer_settings, arguments.repeats, workdir)
    machine["load_average_1min_after"] = os.getloadavg()[0]

    command = shlex.join(["python", "-m", "bench.train_speed", *argv])
    title = arguments.workload if results else "the peers"
    print(f"# Training speed: {title}, {started:%Y-%m-%d %H:%M %Z}\n")
    print(f"command: `{command}`  ")
    print(f"machine: {machine['cpu']}, {machine['cpu_count']} cores, torch threads {base.threads}, "
          f"GPU {machine['gpu'] or 'none'}; load average {machine['load_average_1min']:.2f} before, "
          f"{machine['load_average_1min_after']:.2f} after  ")
    print(f"versions: python {machine['python']}, torch {machine['torch']}, diffusers {machine['diffusers']}, "
          f"peft {machine['peft']}, transformers {machine['transformers']}  ")
    print(f"settings: {base.device}, {resolution if results else peer_settings.resolution} px, {arguments.images} "
          f"images, rank {base.rank} (alpha = rank), lr {base.learning_rate:g}, AdamW (wd 0.01, clip 1.0), "
          f"precision {base.mixed_precision if results else peer_settings.mixed_precision}; "
          f"1 first step + {base.warmup_steps} warm-up + {base.windows} windows x {base.window_steps} steps; "
          f"seed {base.seed}  ")
    print("".join(f"{note}  \n" for note in notes))
    if results:
        print(markdown_table(summarise(results), peak_tflops))
    if peer_table:
        print(f"\n## The peers, each run as a command: {peer_settings.resolution} px, batch {peer_settings.batch_size}"
              f", UNet widths {peers.UNET_WIDTHS}, {peer_settings.device}, precision {peer_settings.mixed_precision}, "
              f"{peer_settings.threads} thread(s)\n")
        print(f"peer environments: {peers.peer_versions(peer_settings)}  \n")
        print(peer_table)
    if arguments.out:
        arguments.out.write_text(json.dumps({"command": command, "date": started.isoformat(), "machine": machine,
                                             "peak_tflops": peak_tflops, "notes": notes, "results": results,
                                             "peer_results": peer_results}, indent=1))


if __name__ == "__main__":
    main()
