"""The language-model training loop: batch -> loss -> step -> log -> maybe save, eval or sample. One function,
top to bottom, reusing the image trainer's optimizers, state files, events and TensorBoard log."""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import UserError
from lora_trainer.files import remove_stale_temporaries
from lora_trainer.llm.config import LLMTrainConfig
from lora_trainer.llm.data import (
    IGNORED_LABEL,
    TokenizedExamples,
    collate,
    read_examples,
    split_validation,
    tokenize_examples,
)
from lora_trainer.llm.generate import generate_answers
from lora_trainer.llm.model import (
    adapter_weights,
    add_lora,
    check_adapter_config,
    load_adapter_weights,
    load_base_model,
    load_tokenizer,
    read_adapter,
    save_adapter,
    save_merged_model,
)
from lora_trainer.llm.templates import PromptFormat
from lora_trainer.models.base import resolve_device
from lora_trainer.train.distributed import (
    agree,
    gather_objects,
    make_accelerator,
    process_device,
    process_share,
)
from lora_trainer.train.events import RunPlan, TrainingEvents
from lora_trainer.train.loop import TrainingResult
from lora_trainer.train.meter import StepMeter, all_finite
from lora_trainer.train.optim import make_optimizer, make_scheduler
from lora_trainer.train.preflight import check_writable_folder
from lora_trainer.train.rescue import save_or_rescue
from lora_trainer.train.sharding import (
    full_optimizer_state,
    local_parameter_bytes,
    shard_model,
    shard_optimizer_state,
    sharding_requested,
)
from lora_trainer.train.state import load_state, save_state
from lora_trainer.train.tensorboard import RunLog


@dataclass
class LLMTrainingResult(TrainingResult):
    """What a language-model run produced, and the model itself, to generate with in the same process."""

    model: Any = field(default=None, repr=False)
    """The trained peft model (with `merge: true`, the plain model with the LoRA merged in)."""
    tokenizer: Any = field(default=None, repr=False)


def train_llm(config: LLMTrainConfig, events: TrainingEvents | None = None) -> LLMTrainingResult:
    """Train a LoRA on a causal language model as `config` says; saves peft adapter folders."""
    events = events or TrainingEvents()
    data_config, saving, training = config.data, config.saving, config.training
    check_llm_paths(config)
    device = process_device(resolve_device(config.model.device))
    accelerator = make_accelerator("no", device, training.distributed_timeout_seconds)
    share = process_share(accelerator, training.batch_size)
    sharded = share.count > 1 and sharding_requested()
    if sharded:
        check_shardable(config)
    if share.is_main and (leftovers := remove_stale_temporaries(saving.output_dir)):
        events.on_message(f"Removed {len(leftovers)} temporary file(s) and folder(s) that killed saves left in "
                          f"{saving.output_dir}.")
    final_folder = Path(saving.output_dir) / saving.output_name
    if final_folder.exists() and saving.resume is None:
        raise UserError(f"{final_folder} already exists; choose another output_name or move the old adapter")
    started_at = time.time()
    torch.manual_seed(training.seed)

    # --- data (checked before the model loads) and plan ---
    tokenizer = load_tokenizer(config.model.base_model)
    prompt_format = PromptFormat.for_tokenizer(data_config.template, tokenizer)
    examples = read_examples(data_config.train_data, data_config.data_format)
    if data_config.validation_data is not None:
        validation_examples = read_examples(data_config.validation_data, data_config.data_format)
    else:
        examples, validation_examples = split_validation(examples, data_config.validation_split, training.seed)
    train_set = tokenize_examples(examples, tokenizer, prompt_format, data_config)
    validation_set = tokenize_examples(validation_examples, tokenizer, prompt_format, data_config)
    if not train_set.input_ids:
        raise UserError(f"no training sequence is left: every example was longer than max_seq_length "
                        f"{data_config.max_seq_length} and dropped; raise it or use overlong: truncate")
    global_batch_size = training.batch_size * share.count
    batches_per_epoch = math.ceil(len(train_set.input_ids) / global_batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / training.gradient_accumulation_steps)
    total_steps = training.max_train_steps or steps_per_epoch * training.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)

    # --- model and LoRA ---
    # A sharded model loads into CPU memory: each process's GPU then receives only its shards.
    load_device = torch.device("cpu") if sharded else device
    model = add_lora(load_base_model(config.model, load_device), config.network, config.model.base_model)
    result = LLMTrainingResult(model=model, tokenizer=tokenizer)
    if config.network.init_lora_weights is not None:
        weights, adapter_config, _ = read_adapter(config.network.init_lora_weights)
        what = f"init_lora_weights {config.network.init_lora_weights}"
        check_adapter_config(adapter_config, config.network, what)
        load_adapter_weights(model, weights, what)
    if sharded:
        shard_model(model, device, share.count)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = make_optimizer(config, [{"params": trainable, "lr": config.optimizer.learning_rate}])
    scheduler = make_scheduler(config, optimizer, total_steps)
    # The run draws from neither: its data order is seeded per epoch and dropout uses torch's global
    # generator, which the state file saves. The state format asks for both.
    unused_generator, unused_rng = torch.Generator(), random.Random(training.seed)
    metadata = {**prompt_format.metadata(), "lora_trainer.base_model": str(config.model.base_model),
                "lora_trainer.config": json.dumps(config.to_dict())}
    run_log = RunLog(config.logging.logging_dir if share.is_main else None, saving.output_name)
    # With several processes the model is wrapped in DDP, which averages the LoRA's gradients (the frozen base
    # has none) at every optimizer step; a sharded model averages them itself.
    forward = accelerator.prepare(model) if share.count > 1 and not sharded else model

    def save(folder: Path, step: int, epoch: int, next_batch: int, with_state: bool = True) -> None:
        """Save the adapter after `step`; a resumed run continues at batch `next_batch` of epoch index `epoch`.
        Every process takes part: a sharded model's weights are gathered to be saved."""
        weights = adapter_weights(model)
        if not all_finite(weights.values()):
            raise UserError(f"the LoRA weights became NaN/inf by step {step}; nothing was saved. Lower the "
                            "learning rate, or train in bf16/fp32 instead of fp16.")
        with_state = with_state and saving.save_state
        optimizer_state = full_optimizer_state(optimizer) if with_state else None
        if not share.is_main:
            return

        def write_state(tmp_folder: Path) -> None:
            save_state(tmp_folder, weights, optimizer_state, scheduler, step, epoch, next_batch, unused_generator,
                       unused_rng, global_batch_size)

        events.on_busy(f"saving {folder.name}")
        what = f"the adapter of step {step}" + (" (with its training state)" if with_state else "")
        saved = save_or_rescue(
            lambda parent: save_adapter(model, weights, parent / folder.name,
                                        {**metadata, "lora_trainer.step": str(step),
                                         "lora_trainer.epoch": str(epoch + 1)},
                                        write_state if with_state else None),
            folder.parent, what, result.saved[-1] if result.saved else None)
        result.saved.append(saved)
        events.on_saved(saved, step, epoch + 1)

    # Every process evaluates and samples (a sharded model computes only together); the main one reports.
    def evaluate(step: int) -> None:
        if validation_set.input_ids:
            validation_loss = _mean_loss(model, validation_set, training.batch_size, tokenizer.pad_token_id, device)
            events.on_message(f"step {step}: validation loss {validation_loss:.4f}")
            run_log.log_validation(step, validation_loss)

    def sample(step: int) -> None:
        events.on_busy("answering the sample prompts")
        answers = generate_answers(model, tokenizer, config.sampling.sample_prompts, prompt_format,
                                   config.sampling.sample_max_new_tokens)
        for prompt, answer in zip(config.sampling.sample_prompts, answers):
            events.on_message(f"sample at step {step}: {prompt!r} -> {answer!r}")

    step, start_epoch, skip_batches = 0, 0, 0
    if saving.resume is not None:
        resume_point, weights = load_state(saving.resume, optimizer, scheduler, unused_generator, unused_rng)
        if resume_point.global_batch_size not in (None, global_batch_size):
            raise UserError(f"the resume state {saving.resume} was saved by a run whose batches held "
                            f"{resume_point.global_batch_size} sequences (batch_size x processes), this run's hold "
                            f"{global_batch_size}: resume with the same batch_size and number of processes")
        shard_optimizer_state(optimizer)
        load_adapter_weights(model, weights, f"the resume state {saving.resume}")
        step, start_epoch, skip_batches = resume_point.step, resume_point.epoch, resume_point.next_batch
        events.on_message(f"Resuming at step {step} (epoch {start_epoch + 1}).")

    plan_lines = [f"{data_config.train_data}: {train_set.summary(data_config.max_seq_length)}"]
    if validation_set.input_ids:
        plan_lines.append(f"validation: {validation_set.summary(data_config.max_seq_length)}")
    plan_lines.append(f"prompt template {prompt_format.template}; LoRA rank {config.network.lora_rank} on "
                      f"{', '.join(config.network.target_modules)}: {sum(p.numel() for p in trainable):,} "
                      f"parameters; {total_steps} steps over {epochs} epoch(s)"
                      + (f"; {share.count} processes: a global batch of {global_batch_size} is {training.batch_size} "
                         "per process" if share.count > 1 else ""))
    if sharded:
        held = gather_objects(accelerator, local_parameter_bytes(model))
        plan_lines.append(f"FSDP: the {share.count} processes hold {', '.join(f'{size:,}' for size in held)} of the "
                          f"model's {sum(p.numel() * p.element_size() for p in model.parameters()):,} parameter "
                          "bytes")
    events.on_start(RunPlan(total_steps, epochs, steps_per_epoch, "\n".join(plan_lines)))

    model.train()
    meter = StepMeter(device, step, total_steps, config.logging.log_every_n_steps,
                      global_batch_size * training.gradient_accumulation_steps, started_at,
                      "Lower the learning rate, or train in bf16/fp32 instead of fp16.")
    stopping = False
    resume_at = (start_epoch, skip_batches)  # (epoch, next batch) after the last finished step
    in_step = False
    epoch, batch_index = start_epoch, skip_batches - 1
    try:
        for epoch in range(start_epoch, epochs):
            order = list(range(len(train_set.input_ids)))
            random.Random(f"{training.seed}-{epoch}").shuffle(order)
            batches = [order[start:start + global_batch_size] for start in range(0, len(order), global_batch_size)]
            for batch_index, indices in enumerate(batches):
                if epoch == start_epoch and batch_index < skip_batches:
                    continue
                # --- one forward/backward pass (of this process's rows of the global batch); the optimizer
                # steps every `gradient_accumulation_steps`, when the processes' gradients are averaged ---
                in_step = True
                rows, loss_weight = share.rows(len(indices), [_trained_tokens(train_set.labels[i]) for i in indices])
                own = [indices[row] for row in rows]
                batch = collate([train_set.input_ids[i] for i in own], [train_set.labels[i] for i in own],
                                tokenizer.pad_token_id)
                end_of_epoch = batch_index + 1 == len(batches)
                steps_now = not (batch_index + 1) % training.gradient_accumulation_steps or end_of_epoch
                with nullcontext() if steps_now else accelerator.no_sync(forward):
                    loss = forward(**{name: tensor.to(device) for name, tensor in batch.items()}).loss * loss_weight
                    (loss / training.gradient_accumulation_steps).backward()
                meter.add(loss)
                if not steps_now:
                    continue
                if config.optimizer.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(trainable, config.optimizer.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                in_step, resume_at = False, (epoch, batch_index + 1)

                # --- report ---
                report = meter.report(accelerator, step, epoch + 1, scheduler.get_last_lr()[0])
                if report.loss is not None:
                    result.last_loss = report.loss
                events.on_step(report)
                if report.loss is not None:
                    run_log.log_step(report)

                # --- saves, evals, samples, stop (their time is left out of the speed) ---
                stopping, save_asked, interrupting = agree(accelerator, events.should_stop(), events.save_requested(),
                                                           events.interrupt_requested())
                if step >= total_steps or stopping:
                    break
                with meter.paused():
                    if (saving.save_every_n_steps and step % saving.save_every_n_steps == 0) or save_asked:
                        save(final_folder.with_name(f"{saving.output_name}-s{step:06d}"), step, epoch, batch_index + 1)
                    if end_of_epoch:
                        evaluate(step)
                        if saving.save_every_n_epochs and (epoch + 1) % saving.save_every_n_epochs == 0:
                            save(final_folder.with_name(f"{saving.output_name}-e{epoch + 1:04d}"), step, epoch,
                                 batch_index + 1)
                    if config.sampling.sample_every_n_steps and config.sampling.sample_prompts and \
                            step % config.sampling.sample_every_n_steps == 0:
                        sample(step)
                if interrupting:
                    raise KeyboardInterrupt
            if step >= total_steps or stopping:
                break
    except KeyboardInterrupt:
        # In the middle of a step (a second Ctrl-C) the weights are those of the last finished step, but the
        # random streams have moved on: that state would not resume exactly, so it is left out.
        if in_step and saving.save_state:
            events.on_message("Interrupted in the middle of a step: the adapter is saved without its state.")
        save(final_folder.with_name(f"{saving.output_name}-interrupted-s{step:06d}"), step, *resume_at,
             with_state=not in_step)
        run_log.close()
        raise
    except torch.cuda.OutOfMemoryError:
        raise UserError("out of GPU memory: lower batch_size or max_seq_length, turn on gradient_checkpointing, "
                        "or load the base model in bf16 or 4-bit (load_in_4bit)") from None

    result.stopped = step < total_steps
    result.steps = step
    save(final_folder.with_name(f"{saving.output_name}-s{step:06d}") if result.stopped else final_folder, step,
         epoch, batch_index + 1)
    evaluate(step)
    if config.sampling.sample_prompts:
        sample(step)
    run_log.close()
    if saving.merge and share.is_main:
        events.on_busy("merging the adapter into the base model")
        merged = save_merged_model(model, tokenizer, final_folder.with_name(f"{saving.output_name}-merged"))
        result.model = model.get_base_model()
        result.saved.append(merged)
        events.on_saved(merged, step, epoch + 1)
    return result


def check_shardable(config: LLMTrainConfig) -> None:
    """Raise a `UserError` for a setting that does not combine with FSDP (accelerate's `--use_fsdp`)."""
    if config.model.load_in_4bit:
        raise UserError("load_in_4bit (QLoRA) does not combine with FSDP here: bitsandbytes' 4-bit weights are not "
                        "sharded. Launch without --use_fsdp (each GPU holds the 4-bit base), or load the base in "
                        "bf16 (dtype: bf16, load_in_4bit: false) to shard it")
    if config.saving.merge:
        raise UserError("merge: true does not combine with FSDP: no process holds the whole base to merge into. "
                        "Train with merge: false and merge the saved adapter afterwards on one machine "
                        "(peft's merge_and_unload)")


def check_llm_paths(config: LLMTrainConfig) -> None:
    """Raise a `UserError` naming the config key for the first path the run could not use; nothing is created."""
    if config.data.train_data is None or config.model.base_model is None:
        raise UserError("an llm run needs train_data and base_model (in the config or as --train_data ...)")
    inputs = (("train_data", config.data.train_data), ("validation_data", config.data.validation_data),
              ("base_model", config.model.base_model), ("init_lora_weights", config.network.init_lora_weights),
              ("resume", config.saving.resume))
    for key, path in inputs:
        if path is not None and not Path(path).exists():
            raise UserError(f"{key} {path} does not exist: fix the path")
    for key, folder in (("output_dir", config.saving.output_dir), ("logging_dir", config.logging.logging_dir)):
        if folder is not None:
            check_writable_folder(folder, key)


@torch.no_grad()
def _mean_loss(model, examples: TokenizedExamples, batch_size: int, pad_token_id: int, device: torch.device) -> float:
    """The loss per trained token over all of `examples`."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples.input_ids), batch_size):
        batch = collate(examples.input_ids[start:start + batch_size], examples.labels[start:start + batch_size],
                        pad_token_id)
        count = int((batch["labels"][:, 1:] != -100).sum())
        if count:
            total += model(**{name: tensor.to(device) for name, tensor in batch.items()}).loss.item() * count
            tokens += count
    model.train(was_training)
    return total / max(1, tokens)


def _trained_tokens(labels: list[int]) -> int:
    """How many tokens of a sequence its loss is a mean over: those with a label, after the shift by one."""
    return sum(label != IGNORED_LABEL for label in labels[1:])
