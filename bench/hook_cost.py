"""What ours' LoRA hooks cost: the UNet's forward and backward with the network attached and detached.

    python -m bench.hook_cost                                  # tiny SD1 on the CPU, seconds
    python -m bench.hook_cost --workload sd15-512 --batch-size 1 4 --layers attention kohya   # on a GPU

One process, one model (`bench.train_speed.build_pipeline`: seeded random weights in the training dtype), the
two cases alternated round by round, each round timed to the device's end (`torch.cuda.synchronize`), median of
the rounds after two warm-up rounds. The latents require a gradient in both cases, so the frozen UNet runs its
backward without the LoRA too; on a GPU the forward runs under bf16 autocast as in training. At batch 1 a GPU
step is launch-bound, and each adapted layer adds kernels (two small matmuls and an add, and their backward):
the "hooks" column is that cost as a share of the bare UNet's step.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.train_speed import WORKLOADS, RunSettings, build_pipeline


def time_hooks(workload: str, batch_size: int, layer_set: str, rounds: int, rank: int = 16) -> dict:
    """Median milliseconds of one forward and backward of the workload's UNet, bare and with the LoRA hooks."""
    from lora_trainer.config import NetworkConfig
    from lora_trainer.lora.network import LoraNetwork
    from lora_trainer.lora.targets import find_lora_targets
    from lora_trainer.models.diffusers_backend import DiffusersBackend
    from lora_trainer.tiny import write_clip_tokenizer_files

    spec = WORKLOADS[workload]
    with tempfile.TemporaryDirectory() as folder:
        settings = RunSettings(
            workload=workload, contender="ours", batch_size=batch_size, train_text_encoder=False,
            gradient_checkpointing=False, resolution=spec.resolution, mixed_precision=spec.mixed_precision,
            device=spec.device, rank=rank, learning_rate=1e-4, warmup_steps=0, windows=1, window_steps=1, seed=0,
            threads=torch.get_num_threads(), dataset="",
            tokenizer_folder=str(write_clip_tokenizer_files(Path(folder) / "tokenizer")), output_dir="")
        pipeline = build_pipeline(settings)
    device = torch.device(spec.device)
    weight_dtype = torch.bfloat16 if spec.mixed_precision == "bf16" else torch.float32
    backend = DiffusersBackend(pipeline, device, weight_dtype, model_name=workload)
    unet = backend.unet.requires_grad_(False).train()
    network = LoraNetwork(find_lora_targets(backend.lora_roots(), NetworkConfig(
        lora_rank=rank, target_modules=[layer_set]))).to(device).train()
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.up.normal_(std=0.01)  # a LoRA past its first step: `up` is no longer zero
    side = spec.resolution // 8  # the SD VAE's 8x
    latents = torch.randn(batch_size, unet.config.in_channels, side, side, device=device, dtype=weight_dtype,
                          requires_grad=True)
    timesteps = torch.full((batch_size,), 500, device=device)
    with torch.no_grad():
        text = backend.encode_text([""] * batch_size)
    size_conditioning = torch.tensor([[spec.resolution] * 2 + [0, 0] + [spec.resolution] * 2] * batch_size,
                                     device=device, dtype=torch.float32)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast:
            output = backend.predict(latents, timesteps, text, size_conditioning)
        output.float().pow(2).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        latents.grad = None
        for parameter in network.parameters():
            parameter.grad = None
        return (time.perf_counter() - started) * 1000

    times: dict[str, list[float]] = {"bare": [], "hooks": []}
    for _ in range(rounds + 2):
        for case in times:
            if case == "hooks":
                network.attach()
            times[case].append(step())
            network.detach()
    bare, hooked = (statistics.median(times[case][2:]) for case in ("bare", "hooks"))
    return {"workload": workload, "batch_size": batch_size, "layers": layer_set,
            "adapted_layers": len(network.lora_modules), "bare_ms": bare, "hooks_ms": hooked,
            "hook_share": hooked / bare - 1, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny-sd1")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--layers", nargs="+", default=["attention"], help="named layer sets (attention, kohya)")
    parser.add_argument("--rounds", type=int, default=20)
    arguments = parser.parse_args()
    print("| workload | batch | layers | adapted | bare UNet fwd+bwd (ms) | with LoRA hooks (ms) | hooks | device |")
    print("|---|---|---|---|---|---|---|---|")
    for batch_size in arguments.batch_size:
        for layer_set in arguments.layers:
            row = time_hooks(arguments.workload, batch_size, layer_set, arguments.rounds)
            print(f"| {row['workload']} | {batch_size} | {layer_set} | {row['adapted_layers']} | "
                  f"{row['bare_ms']:.1f} | {row['hooks_ms']:.1f} | {row['hook_share']:+.0%} | {row['device']} |",
                  flush=True)


if __name__ == "__main__":
    main()
