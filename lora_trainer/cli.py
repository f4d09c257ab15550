"""`python -m lora_trainer` / `lora-trainer`: train, caption, grid and demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lora_trainer.errors import UserError

if TYPE_CHECKING:
    from lora_trainer.train.loop import TrainingResult


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code (2 for a problem the user can fix)."""
    parser = argparse.ArgumentParser(prog="lora-trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser(
        "train", help="train a LoRA from a YAML config",
        description="Train a LoRA. Any config key can be overridden: --lora_rank 8 --unet_lr 2e-4 ... "
                    "A config with 'task: llm' trains a language model's LoRA (lora_trainer/llm/config.py).")
    train_parser.add_argument("--config", type=Path, help="YAML file with TrainConfig (or LLMTrainConfig) keys")
    train_parser.add_argument("--print-config", action="store_true",
                              help="print the config as it would run (every key, with help) and exit")

    init_parser = commands.add_parser("init-config", help="write a config file with every key, its default and help")
    init_parser.add_argument("path", type=Path, help="the YAML file to write (never overwritten)")

    from lora_trainer.caption import cli as caption_cli

    caption_cli.add_arguments(commands.add_parser("caption", help="write a caption .txt beside every image"))

    grid_parser = commands.add_parser("grid", help="render a strength x file grid of LoRAs on a base model")
    grid_parser.add_argument("--base-model", required=True, help="diffusers folder or single-file checkpoint")
    grid_parser.add_argument("--base-model-config", help="local diffusers folder describing a single file")
    grid_parser.add_argument("--lora", type=Path, nargs="+", required=True, help="LoRA files: one row each")
    grid_parser.add_argument("--strengths", default="0,0.25,0.5,0.75,1", help="comma-separated: one column each")
    grid_parser.add_argument("--seeds", default="1", help="comma-separated; with one LoRA file, rows are seeds")
    grid_parser.add_argument("--prompt", required=True)
    grid_parser.add_argument("--negative-prompt", default="")
    grid_parser.add_argument("--steps", type=int, default=20)
    grid_parser.add_argument("--cfg", type=float, default=7.0)
    grid_parser.add_argument("--width", type=int, default=512)
    grid_parser.add_argument("--height", type=int, default=512)
    grid_parser.add_argument("--clip-skip", type=int, help="the clip_skip the LoRAs were trained with (SD1/SD2)")
    grid_parser.add_argument("--device")
    grid_parser.add_argument("--out", type=Path, required=True, help="PNG to write (never overwritten)")

    demo_parser = commands.add_parser("demo", help="train a LoRA on an embedded tiny model and write a PNG")
    demo_parser.add_argument("--workdir", type=Path, default=Path("out/demo"))
    demo_parser.add_argument("--device")
    demo_parser.add_argument("--steps", type=int, default=300, help="optimizer steps to train (default 300)")

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return _train(args.config, extra, args.print_config)
        if args.command == "init-config":
            return _init_config(args.path)
        if args.command == "caption":
            return caption_cli.run(args)
        if args.command == "grid":
            return _grid(args)
        from lora_trainer.demo import run_demo

        run_demo(args.workdir, args.device, args.steps)
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _init_config(path: Path) -> int:
    from lora_trainer.config_template import config_template

    if path.exists():
        raise UserError(f"{path} already exists; choose another name")
    path.write_text(config_template(), encoding="utf-8")
    print(f"wrote {path}: every key with its default; then: lora-trainer train --config {path}")
    return 0


def _train(config_path: Path | None, override_words: list[str], print_config: bool = False) -> int:
    import torch

    from lora_trainer.config import load_config, parse_overrides, read_config_file
    from lora_trainer.console import ConsoleEvents
    from lora_trainer.interrupts import StopSignals
    from lora_trainer.models.base import resolve_device
    from lora_trainer.models.diffusers_backend import DiffusersBackend, load_pipeline
    from lora_trainer.train.distributed import launched_as_main, process_device, reporting_lost_processes
    from lora_trainer.train.loop import train
    from lora_trainer.train.preflight import check_run_paths

    started = time.monotonic()
    overrides = parse_overrides(override_words)
    file_values = read_config_file(config_path)
    if overrides.get("task", file_values.get("task")) == "llm":
        return _train_llm(file_values, overrides)
    notes: list[str] = []
    config = load_config(config_path, overrides, notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if print_config:
        from lora_trainer.config_template import config_template

        print(config_template(config))
        return 0
    if config.dataset.train_data_dir is None or config.model.base_model is None:
        raise UserError("train needs train_data_dir and base_model (in the config or as --train_data_dir ...)")
    check_run_paths(config)
    with StopSignals() as signals:
        try:
            device = process_device(resolve_device(config.training.device))
            weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
                config.training.mixed_precision, torch.float32) if device.type == "cuda" else torch.float32
            pipeline = load_pipeline(config.model.base_model, config.model.base_model_config, weight_dtype)
            model = config.model
            backend = DiffusersBackend(pipeline, device, weight_dtype, model_name=Path(model.base_model).stem,
                                       v_parameterization=model.v_parameterization, clip_skip=model.clip_skip)
            with ConsoleEvents(signals, shown=launched_as_main()) as events, \
                    reporting_lost_processes(config.training.distributed_timeout_seconds):
                result = train(config, backend, events)
        except KeyboardInterrupt:
            message, exit_code = signals.outcome()
            print(message, file=sys.stderr)
            return exit_code
    if launched_as_main():
        print(run_summary(result, time.monotonic() - started))
    return 0


def _train_llm(file_values: dict, overrides: dict) -> int:
    from lora_trainer.console import ConsoleEvents
    from lora_trainer.interrupts import StopSignals
    from lora_trainer.llm.config import llm_config_from_dict
    from lora_trainer.llm.loop import check_llm_paths, train_llm
    from lora_trainer.train.distributed import launched_as_main, reporting_lost_processes

    config = llm_config_from_dict(file_values, overrides)
    check_llm_paths(config)
    with StopSignals() as signals:
        try:
            with ConsoleEvents(signals, shown=launched_as_main()) as events, \
                    reporting_lost_processes(config.training.distributed_timeout_seconds):
                result = train_llm(config, events)
        except KeyboardInterrupt:
            message, exit_code = signals.outcome()
            print(message, file=sys.stderr)
            return exit_code
    if launched_as_main():
        print(f"done: {result.steps} steps, last loss {result.last_loss}, saved: "
              + ", ".join(str(path) for path in result.saved))
    return 0


def run_summary(result: TrainingResult, seconds: float) -> str:
    """What a finished run tells the user: its length, where its files, samples and logs are, the prompt tag."""
    minutes, seconds = divmod(round(seconds), 60)
    lines = [f"done: {result.steps} steps in {minutes}m {seconds:02d}s, last loss {result.last_loss}"]
    if result.saved:
        lines.append(f"LoRA files: {', '.join(str(path) for path in result.saved)}")
    if result.samples:
        lines.append(f"sample images: {result.samples[0].parent} ({len(result.samples)} images)")
    if result.log_folder is not None:
        lines.append(f"TensorBoard logs: {result.log_folder} (tensorboard --logdir {result.log_folder.parent})")
    if result.saved:
        lines.append(f"in a prompt: <lora:{result.saved[-1].stem}:0.8>")
    return "\n".join(lines)


def _grid(args: argparse.Namespace) -> int:
    from lora_trainer.grid import GridPlan, parse_seeds, parse_strengths, render_grid, save_png, tag_renderer
    from lora_trainer.models.base import resolve_device
    from lora_trainer.models.diffusers_backend import DiffusersBackend, load_pipeline

    plan = GridPlan(prompt=args.prompt, loras=list(args.lora), strengths=parse_strengths(args.strengths),
                    seeds=parse_seeds(args.seeds), negative_prompt=args.negative_prompt,
                    steps=args.steps, cfg_scale=args.cfg, width=args.width, height=args.height)
    backend = DiffusersBackend(load_pipeline(args.base_model, args.base_model_config), resolve_device(args.device),
                               clip_skip=args.clip_skip)
    grid, _ = render_grid(plan, tag_renderer(backend, {name: path for path, name in plan.tag_names().items()}))
    out = save_png(grid, args.out, plan.infotext())
    print(f"wrote {out}")
    return 0
