"""The parameter bytes each process holds under FSDP (the trainer's `shard_model`) against data parallelism
(DDP: every process holds the whole model), for the tests' tiny Llama and a LLaMA-7B configuration.

    python -m bench.fsdp_shards                 # 2 and 4 CPU processes (gloo), a few seconds

The 7B model is built on the meta device: its shards are computed by `fully_shard` itself, nothing is
allocated. The LoRA is the trainer's default (rank 8 on q_proj and v_proj, fp32); the 7B base is in bf16.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def _model(name: str, folder: Path):
    """The peft model of `name` with the trainer's default LoRA, frozen base."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lora_trainer.llm.config import NetworkConfig
    from lora_trainer.llm.model import add_lora

    if name == "tiny":
        base = AutoModelForCausalLM.from_pretrained(str(folder / "tiny"))
    else:
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_7B), dtype=torch.bfloat16)
    base.requires_grad_(False)
    return add_lora(base, NetworkConfig(), folder)


def _held_bytes(name: str, folder: Path, count: int) -> int:
    """In one of the launch's processes: shard the model over the `count` processes and write the bytes this
    one holds and those of the whole model."""
    import torch

    from lora_trainer.train.sharding import local_parameter_bytes, shard_model

    torch.distributed.init_process_group("gloo")
    model = _model(name, folder)
    whole = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    shard_model(model, torch.device("cpu"), count)
    print(local_parameter_bytes(model), whole)
    torch.distributed.destroy_process_group()
    return 0


def _measure(name: str, folder: Path, count: int) -> tuple[list[int], int]:
    """(bytes each of `count` sharded processes holds, bytes of the whole model)."""
    from tests.launched import exit_code_of, fork_processes

    output = folder / f"{name}-{count}"
    pids = fork_processes(count, output, lambda: _held_bytes(name, folder, count))
    if any(exit_code_of(pid, 600) != 0 for pid in pids):
        raise SystemExit(f"{name}: a sharding process failed: {(output / 'rank-0.err').read_text()[-2000:]}")
    measured = [[int(number) for number in (output / f"rank-{rank}.out").read_text().split()]
                for rank in range(count)]
    return [held for held, _ in measured], measured[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    arguments = parser.parse_args()
    from tests.llm_models import save_tiny_llama

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        save_tiny_llama(folder / "tiny")
        print("| model | processes | DDP bytes per process | FSDP bytes per process (each) | FSDP / DDP |")
        print("|---|---|---|---|---|")
        for name in ("tiny", "llama-7b"):
            for count in arguments.processes:
                held, whole = _measure(name, folder, count)
                print(f"| {name} | {count} | {whole:,} | {', '.join(f'{size:,}' for size in held)} | "
                      f"{max(held) / whole:.3f} |")


if __name__ == "__main__":
    main()
