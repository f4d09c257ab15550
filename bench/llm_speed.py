"""LLM LoRA training speed: ours (`lora_trainer.llm.loop.train_llm`) against a plain transformers `Trainer` + peft.

    python -m bench.llm_speed                 # the tests' tiny Llama on the CPU, one thread, about a minute

Both contenders get the same random model (built from one seed), the same tokenized toy examples (ours'
tokenization, llama2 template, prompt masked), batch size, rank 8, alpha 16, q_proj/v_proj, lr, AdamW,
clipping at 1.0, fp32. Each runs in a fresh subprocess, so peak RSS is its own. Tokens/s counts the non-padding
tokens of the timed steps (after warm-up steps) over their wall time; tokens/CPU-s over the process's CPU time,
the steadier number on a shared machine. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS, WARMUP_STEPS, BATCH_SIZE = 60, 10, 8


def run_contender(name: str, folder: Path) -> dict:
    """Train `name` in this process and return its measurements."""
    import torch

    torch.set_num_threads(1)
    from lora_trainer.llm.config import llm_config_from_dict
    from lora_trainer.llm.data import read_examples, tokenize_examples
    from lora_trainer.llm.model import load_tokenizer
    from lora_trainer.llm.templates import PromptFormat
    from tests.llm_models import COLOUR_TASK, save_tiny_llama, write_jsonl

    base = save_tiny_llama(folder / "base")
    data = write_jsonl(folder / "data.jsonl", COLOUR_TASK.training_records())
    config = llm_config_from_dict({"task": "llm", "base_model": str(base), "train_data": str(data),
                                   "output_dir": str(folder / name), "logging_dir": None, "lora_dropout": 0.0,
                                   "batch_size": BATCH_SIZE, "max_train_steps": STEPS, "log_every_n_steps": 1,
                                   "template": "llama2"})
    tokenizer = load_tokenizer(base)
    tokens = tokenize_examples(read_examples(data, "auto"), tokenizer, PromptFormat("llama2"), config.data)
    step_times: list[tuple[float, float]] = []
    if name == "ours":
        from lora_trainer.llm.loop import train_llm
        from lora_trainer.train.events import TrainingEvents

        class Timer(TrainingEvents):
            def on_step(self, report) -> None:
                step_times.append((time.perf_counter(), time.process_time()))

        train_llm(config, Timer())
    else:
        step_times = _train_with_trainer(base, tokens, tokenizer, config, folder / name)
    timed = step_times[WARMUP_STEPS:]
    steps_per_epoch = -(-len(tokens.input_ids) // BATCH_SIZE)
    tokens_per_epoch = sum(len(ids) for ids in tokens.input_ids)
    timed_tokens = tokens_per_epoch / steps_per_epoch * (len(timed) - 1)
    return {"contender": name, "tokens_per_second": timed_tokens / (timed[-1][0] - timed[0][0]),
            "tokens_per_cpu_second": timed_tokens / (timed[-1][1] - timed[0][1]),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _train_with_trainer(base: Path, tokens, tokenizer, config, output: Path) -> list[tuple[float, float]]:
    """The loop of peft's and transformers' documentation: get_peft_model + Trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lora_trainer.llm.data import collate

    step_times: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_times.append((time.perf_counter(), time.process_time()))

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    examples = [{"input_ids": ids, "labels": labels} for ids, labels in zip(tokens.input_ids, tokens.labels)]
    arguments = TrainingArguments(output_dir=str(output), per_device_train_batch_size=BATCH_SIZE,
                                  max_steps=STEPS, learning_rate=config.optimizer.learning_rate, weight_decay=0.0,
                                  max_grad_norm=1.0, lr_scheduler_type="constant", logging_steps=1,
                                  save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                                  seed=config.training.seed)
    trainer = Trainer(model=model, args=arguments, train_dataset=examples, callbacks=[Timer()],
                      data_collator=lambda rows: collate([row["input_ids"] for row in rows],
                                                         [row["labels"] for row in rows], tokenizer.pad_token_id))
    trainer.train()
    return step_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", choices=["ours", "trainer"], help="run one contender here (internal)")
    args = parser.parse_args()
    if args.contender:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(run_contender(args.contender, Path(folder))))
        return
    for name in ("ours", "trainer"):
        output = subprocess.run([sys.executable, "-m", "bench.llm_speed", "--contender", name], check=True,
                                capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        print(f"{name:8s} {row['tokens_per_second']:7.0f} tokens/s {row['tokens_per_cpu_second']:7.0f} tokens/CPU-s "
              f"  peak RSS {row['peak_rss_mib']:5.0f} MiB")


if __name__ == "__main__":
    main()
