"""The training loop: batch -> noise -> predict -> loss -> step -> log -> maybe save. One function, top to bottom."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lora_trainer.config import TrainConfig
from lora_trainer.config_template import config_template
from lora_trainer.data.class_images import write_class_images
from lora_trainer.data.dataset import Batch, TrainingData
from lora_trainer.data.disk_cache import DiskCache
from lora_trainer.data.sources import gather_images
from lora_trainer.errors import UserError
from lora_trainer.files import atomic_write_text, remove_stale_temporaries
from lora_trainer.lora.files import LoraFile, check_matches_network, read_lora, save_diffusers_layout, save_kohya
from lora_trainer.lora.metadata import file_metadata, run_metadata
from lora_trainer.lora.network import LoraNetwork
from lora_trainer.lora.targets import find_lora_targets, network_from_file, never_run_keys
from lora_trainer.models.base import DiffusionBackend, TextConditioning
from lora_trainer.models.parking import ParkedModules
from lora_trainer.train.distributed import (
    agree,
    gather_objects,
    make_accelerator,
    process_share,
)
from lora_trainer.train.events import RunPlan, TrainingEvents
from lora_trainer.train.loss import (
    add_noise,
    diffusion_loss,
    diffusion_target,
    draw_timesteps,
    huber_thresholds,
    refuse_for_flow,
    sample_noise,
)
from lora_trainer.train.max_norm import scale_weight_norms
from lora_trainer.train.memory import plan_run_memory
from lora_trainer.train.meter import StepMeter, all_finite
from lora_trainer.train.noise import (
    add_multires_noise,
    debiased_estimation_weights,
    perturbed_input_noise,
    zero_terminal_snr,
)
from lora_trainer.train.optim import (
    evaluation_weights,
    lora_parameter_groups,
    make_optimizer,
    make_scheduler,
    start_training_weights,
)
from lora_trainer.train.preflight import check_run_paths
from lora_trainer.train.rescue import save_or_rescue
from lora_trainer.train.retention import prune_saves
from lora_trainer.train.samples import SAMPLES_FOLDER, render_samples, sample_prompts, save_samples
from lora_trainer.train.sharding import sharding_requested
from lora_trainer.train.spill import SpillWatch, memory_share_reader
from lora_trainer.train.state import load_state, save_state
from lora_trainer.train.tensorboard import RunLog
from lora_trainer.train.validation import DEFAULT_MEASUREMENTS, ValidationSet


@dataclass
class TrainingResult:
    """What a run produced."""

    saved: list[Path] = field(default_factory=list)
    steps: int = 0
    stopped: bool = False
    last_loss: float | None = None
    samples: list[Path] = field(default_factory=list)
    """Every sample image written (in `output_dir/samples`)."""
    log_folder: Path | None = None
    """This run's TensorBoard folder (None without logging)."""
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, validation loss) of every measurement, when the run has held-out images."""

    @property
    def best_validation_step(self) -> int | None:
        """The step with the lowest validation loss."""
        return min(self.validation_losses, key=lambda measured: measured[1])[0] if self.validation_losses else None


def train(config: TrainConfig, backend: DiffusionBackend, events: TrainingEvents | None = None) -> TrainingResult:
    """Train a LoRA on `backend`'s model as `config` says. The model is left exactly as it was."""
    events = events or TrainingEvents()
    training, saving, sampling = config.training, config.saving, config.sampling
    check_run_paths(config)
    if sharding_requested():
        raise UserError("FSDP (--use_fsdp in accelerate's config) shards the language-model trainer's base only: "
                        "the image trainer's LoRA is small and its base frozen, so it trains data-parallel; launch "
                        "it with `accelerate launch --multi_gpu` (no --use_fsdp)")
    accelerator = make_accelerator(training.mixed_precision, backend.device, training.distributed_timeout_seconds)
    share = process_share(accelerator, training.batch_size)
    if share.count > 1 and backend.device.type == "cuda" and accelerator.device != backend.device:
        raise UserError(f"under a launcher this process trains on {accelerator.device}, but the model is on "
                        f"{backend.device}: leave the config's device unset (or cuda) so that each process takes "
                        "its own GPU")
    if share.is_main and (leftovers := remove_stale_temporaries(saving.output_dir)):
        events.on_message(f"Removed {len(leftovers)} temporary file(s) and folder(s) that killed saves left in "
                          f"{saving.output_dir}.")
    started_at = time.time()
    torch.manual_seed(training.seed)
    data_rng = random.Random(training.seed)
    noise_generator = torch.Generator(backend.device).manual_seed(training.seed)
    result = TrainingResult()

    # --- data and plan ---
    dataset = config.dataset

    def stop_asked() -> bool:
        """A stop before the first step (the tab's Stop): one process only, several agree on stops per step."""
        return share.count == 1 and events.should_stop()

    if dataset.class_prompt and share.is_main:
        events.on_message(f"Drawing the missing class images of {dataset.class_prompt!r} with the base model...")
        write_class_images(dataset.reg_data_dir, dataset.class_prompt, dataset.num_class_images,
                           lambda prompt, seed: backend.generate(prompt, "", seed, sampling.sample_steps,
                                                                 dataset.resolution, dataset.resolution, 7.0),
                           progress=lambda done, total: events.on_message(f"Drew class image {done}/{total}."),
                           should_stop=stop_asked)
        if stop_asked():
            return _stopped_before_training(events, result)
    accelerator.wait_for_everyone()  # the others read the class images the main process drew
    sources = gather_images(dataset, training.seed)
    scan, reg_records, held_out = sources.scan, sources.reg_records, sources.held_out
    data = TrainingData(scan, config, backend.latent_scale, reg_records, share.count)
    validation = ValidationSet(held_out, config, backend.latent_scale) if held_out and share.is_main else None
    steps_per_epoch = math.ceil(data.batches_per_epoch() / training.gradient_accumulation_steps)
    total_steps = training.max_train_steps or steps_per_epoch * training.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    validate_every = config.logging.validate_every_n_steps or max(1, total_steps // DEFAULT_MEASUREMENTS)
    final_path = Path(saving.output_dir) / f"{saving.output_name}.safetensors"
    if final_path.exists() and saving.resume is None:
        raise UserError(f"{final_path} already exists; choose another output_name or move the old file")

    prompts = sample_prompts(config) if share.is_main else []
    if config.model.clip_skip is not None and config.model.clip_skip != (backend.clip_skip or 1):
        raise UserError(f"the config asks for clip_skip {config.model.clip_skip}, but this model's text conditioning "
                        f"uses {backend.clip_skip or 1}; in the WebUI, set Clip skip in its settings instead")

    if backend.prediction_type == "flow":
        refuse_for_flow(config.loss)
    if saving.save_diffusers_format and not backend.diffusers_names:
        raise UserError(f"save_diffusers_format cannot name this {backend.family} model's layers as diffusers does; "
                        "turn it off (the kohya file loads in the WebUI, Forge and ComfyUI)")
    memory = plan_run_memory(config, backend)
    if not memory.fits:
        events.on_message(memory.line())

    # --- LoRA on the model ---
    if config.network.dim_from_weights:
        network = network_from_file(backend.lora_roots(), config.network.init_lora_weights,
                                    config.network.lora_dropout).to(backend.device)
    else:
        network = LoraNetwork(find_lora_targets(backend.lora_roots(), config.network),
                              config.network.lora_dropout).to(backend.device)
        if config.network.init_lora_weights:
            initial = read_lora(config.network.init_lora_weights, {peft: key for key, peft in network.peft_keys.items()}
                                ).without_modules(never_run_keys(backend.lora_roots()))
            check_matches_network(initial, network, f"init_lora_weights {config.network.init_lora_weights}")
            network.load_kohya_state_dict(initial.state)
    network.use_dropouts(config.network.rank_dropout, config.network.module_dropout)
    parameter_groups = lora_parameter_groups(network, config.optimizer)
    trainable = [p for group in parameter_groups for p in group["params"]]

    if training.mixed_precision != "no" and not accelerator.native_amp:
        events.on_message(f"Note: mixed_precision {training.mixed_precision} has no effect on {backend.device.type}: "
                          "this run computes in fp32.")
    optimizer = make_optimizer(config, parameter_groups)
    # The scheduler is stepped here, once per optimizer step: accelerate's would step once per process.
    scheduler = make_scheduler(config, optimizer, total_steps)
    optimizer = accelerator.prepare(optimizer)
    metadata = run_metadata(config, network, backend, scan, data, total_steps, epochs, started_at)
    run_log = RunLog(config.logging.logging_dir if share.is_main else None, saving.output_name)
    result.log_folder = run_log.folder
    run_log.log_text("config", config_template(config))

    nan_advice = "Lower the learning rate" + (
        ", or train in bf16/fp32 instead of fp16" if training.mixed_precision == "fp16" else "") + "."

    def validate(step: int) -> None:
        """Measure the validation loss after `step` (once per step), when the run has held-out images."""
        if validation is None or (result.validation_losses and result.validation_losses[-1][0] == step):
            return
        events.on_busy("measuring the validation loss")
        network.eval()
        with parked.lent():
            loss = validation.loss(backend, accelerator.autocast)
        network.train()
        result.validation_losses.append((step, loss))
        events.on_validation(step, loss)
        run_log.log_validation(step, loss)

    def save(path: Path, step: int, epoch: int, next_batch: int, with_state: bool = True) -> None:
        """Save the weights after `step`; a resumed run continues at batch `next_batch` of epoch index `epoch`.
        The file records the validation loss of its weights, measured now unless `with_state` is off (an
        interrupted save does not wait for it)."""
        if not all_finite(trainable):
            raise UserError(f"the LoRA weights became NaN/inf by step {step}; nothing was saved. {nan_advice}")
        if not share.is_main:
            return
        if with_state:
            validate(step)
        measured = dict(result.validation_losses)
        per_file = {"lora_trainer_validation_loss": repr(measured[step])} if step in measured else {}
        with_state = with_state and saving.save_state

        def write(folder: Path) -> Path:
            file_data = {**file_metadata(metadata, step, epoch + 1), **per_file}
            saved = save_kohya(folder / path.name, network, file_data, saving.save_precision)
            if saving.save_diffusers_format:
                save_diffusers_layout(saved.with_suffix(".diffusers.safetensors"), network, file_data,
                                      saving.save_precision)
            if with_state:
                save_state(saved.with_suffix(".state"), network.kohya_state_dict(), optimizer.state_dict(), scheduler,
                           step, epoch, next_batch, noise_generator, data_rng, data.global_batch_size)
            return saved

        events.on_busy(f"saving {path.name}")
        what = f"the weights of step {step}" + (" (and their .state folder beside them)" if with_state else "")
        with evaluation_weights(optimizer):
            saved = save_or_rescue(write, path.parent, what, result.saved[-1] if result.saved else None)
        result.saved.append(saved)
        with parked.lent():  # the host may render a preview with the new file
            events.on_saved(saved, step, epoch + 1)
        if saving.keep_last_n_saves:
            for removed in prune_saves(result.saved, saving.keep_last_n_saves, final_path):
                result.saved.remove(removed)
                events.on_removed(removed)

    def sample(step: int) -> None:
        events.on_busy("rendering samples")
        network.eval()
        with evaluation_weights(optimizer), parked.lent():
            images = render_samples(backend, prompts)
        network.train()
        result.samples += save_samples(Path(saving.output_dir) / SAMPLES_FOLDER, saving.output_name, step, prompts,
                                       images)
        run_log.log_images("samples", images, step)
        events.on_sample(step, images, [sample.prompt for sample in prompts])

    step, start_epoch, skip_batches = 0, 0, 0
    with backend.training_mode(training.gradient_checkpointing), network.applied(1.0), ExitStack() as run_stack:
        network.train()
        if config.model.fp8_base:
            run_stack.enter_context(backend.fp8_storage())
        # --- caches: VAE latents and text-encoder outputs, computed once (per process: its rows change with
        # every epoch; with the disk cache, each process encodes a share and all read the whole from disk) ---
        if data.uses_latent_cache:
            events.on_message(f"Caching latents of {len(data.examples)} images...")
            disk = DiskCache(backend.vae_fingerprint(), backend.device) if dataset.cache_latents_to_disk \
                else None
            if share.count > 1:
                # Each process encodes its share of the chunks; the disk cache or a gather hands them to all.
                encoded = data.cache_latents(backend.encode_images, progress=events.on_caching, disk=disk,
                                             share=(share.index, share.count))
                if disk is not None:
                    accelerator.wait_for_everyone()
                    data.cache_latents(backend.encode_images, disk=disk)
                else:
                    for index, other in enumerate(gather_objects(accelerator, data.cached_share())):
                        if index != share.index:
                            data.add_cached_share(other, backend.device)
                events.on_message(f"Latents: this process encoded {encoded} of the {len(data.examples)} images, "
                                  f"the other {share.count - 1} process(es) the rest"
                                  + (" (shared through the disk cache)." if disk is not None else "."))
            else:
                encoded = data.cache_latents(backend.encode_images, progress=events.on_caching, disk=disk,
                                             should_stop=stop_asked)
                if disk is not None:
                    events.on_message(f"Latents: {len(data.examples) - encoded} read from the disk cache, "
                                      f"{encoded} encoded.")
        if validation is not None:
            validation.encode(backend)
        text_cache: dict[str, TextConditioning] = {}
        if config.uses_text_encoder_cache:
            disk = DiskCache(backend.text_encoder_fingerprint(), backend.device) \
                if dataset.cache_text_encoder_outputs_to_disk else None
            folders = {example.record.caption: example.record.path.parent for example in reversed(data.examples)}
            text_cache, encoded = _encode_captions(backend, folders, disk)
            if disk is not None:
                events.on_message(f"Text-encoder outputs: {len(text_cache) - 1 - encoded} read from the disk cache, "
                                  f"{encoded} encoded.")

        if stop_asked():  # while the caches were made
            run_log.close()
            return _stopped_before_training(events, result)

        parked = run_stack.enter_context(_idle_parts_parked(backend, data.uses_latent_cache, bool(text_cache)))

        if saving.resume is not None:
            resume_point, weights = load_state(saving.resume, optimizer, scheduler, noise_generator, data_rng)
            if resume_point.global_batch_size not in (None, data.global_batch_size):
                raise UserError(f"the resume state {saving.resume} was saved by a run whose batches held "
                                f"{resume_point.global_batch_size} images (batch_size x processes), this run's hold "
                                f"{data.global_batch_size}: resume with the same batch_size and number of processes")
            check_matches_network(LoraFile(weights, {}), network, f"the resume state {saving.resume}")
            network.load_kohya_state_dict(weights)
            step, start_epoch, skip_batches = resume_point.step, resume_point.epoch, resume_point.next_batch
            events.on_message(f"Resuming at step {step} (epoch {start_epoch + 1}).")

        skipped_list = None
        if scan.skipped and share.is_main:
            skipped_list = scan.write_skipped_list(
                Path(config.logging.logging_dir or saving.output_dir) / f"{saving.output_name}-skipped.txt")
        held_out_line = f"; {len(validation)} held out for the validation loss" if validation else ""
        reg_line = f"; {len(reg_records)} regularisation images" if reg_records else ""
        processes_line = (f"; {share.count} processes: a global batch of {data.global_batch_size} is "
                          f"{training.batch_size} per process" if share.count > 1 else "")
        plan = RunPlan(total_steps, epochs, steps_per_epoch,
                       f"{scan.summary(skipped_list)}{held_out_line}{reg_line}\n{data.summary()}\n"
                       f"{len(network.lora_modules)} LoRA layers, {sum(p.numel() for p in trainable):,} "
                       f"parameters; {total_steps} steps over {epochs} epoch(s){processes_line}\n{memory.line()}",
                       memory)
        events.on_start(plan)
        validate(step)
        if sampling.sample_at_first and prompts and step == 0:
            sample(0)

        loss_settings = config.loss
        alphas_cumprod = None if backend.prediction_type == "flow" else backend.alphas_cumprod
        if loss_settings.zero_terminal_snr:
            alphas_cumprod = zero_terminal_snr(alphas_cumprod)

        def training_loss(batch: Batch, global_rows: int, rows: range) -> torch.Tensor:
            """The loss of `batch`: rows `rows` of a global batch of `global_rows`, whose noise and timesteps are
            all drawn (the same on every process), so that the run does not depend on how many processes share
            it."""
            if batch.latents is not None:
                latents = batch.latents.to(backend.device)
            else:
                latents = backend.encode_images(batch.pixels)
            if text_cache:
                text = TextConditioning.stack([text_cache[caption] for caption in batch.captions],
                                              padding=text_cache[""].context)
            else:
                text = backend.encode_text(batch.captions)
            noise = sample_noise(latents.new_empty((global_rows, *latents.shape[1:])), loss_settings.noise_offset,
                                 noise_generator)
            if loss_settings.multires_noise_iterations:
                noise = add_multires_noise(noise, loss_settings.multires_noise_iterations,
                                           loss_settings.multires_noise_discount, noise_generator).to(latents.dtype)
            timesteps = draw_timesteps(global_rows, alphas_cumprod, backend.flow_shift, noise_generator,
                                       backend.device)
            input_noise = perturbed_input_noise(noise, loss_settings.ip_noise_gamma, noise_generator) \
                if loss_settings.ip_noise_gamma else noise
            own = slice(rows.start, rows.stop)
            noise, timesteps, input_noise = noise[own], timesteps[own], input_noise[own]
            noisy_latents = add_noise(latents, input_noise, timesteps, alphas_cumprod, backend.prediction_type)
            with accelerator.autocast():
                prediction = backend.predict(noisy_latents, timesteps, text, batch.size_conditioning)
            target = diffusion_target(latents, noise, timesteps, alphas_cumprod, backend.prediction_type)
            sample_weights = batch.sample_weights
            if loss_settings.debiased_estimation_loss:
                debiased = debiased_estimation_weights(timesteps, alphas_cumprod, backend.prediction_type)
                sample_weights = debiased if sample_weights is None else sample_weights.to(debiased) * debiased
            huber_c = None if loss_settings.loss_type == "l2" else huber_thresholds(
                timesteps, alphas_cumprod, loss_settings.huber_schedule, loss_settings.huber_c)
            return diffusion_loss(prediction, target, timesteps, alphas_cumprod, backend.prediction_type,
                                  loss_settings.min_snr_gamma, batch.masks, sample_weights, loss_settings.loss_type,
                                  huber_c)

        start_training_weights(optimizer)  # after a resume, whose state was saved with the evaluation weights
        # With several processes the LoRA network is wrapped in DDP, whose all-reduce averages its gradients at
        # every optimizer step. Its forward is the whole loss, hooks included: the base model's layers call the
        # network's modules, and text encoding does too when the text encoder is trained.
        batch_loss = _BatchLoss(network, training_loss)
        if share.count > 1:
            batch_loss = accelerator.prepare(batch_loss)
        shard_lines: list[str] = []
        meter = StepMeter(backend.device, step, total_steps, config.logging.log_every_n_steps,
                          data.global_batch_size * training.gradient_accumulation_steps, started_at, nan_advice)
        spill_watch = SpillWatch(memory_share_reader(backend.device))
        stopping = False
        resume_at = (start_epoch, skip_batches)  # (epoch, next batch) after the last finished step
        in_step = False
        try:
            for epoch in range(start_epoch, epochs):
                batches = data.epoch_plan(epoch)
                trained_examples: list[int] = []
                for batch_index, indices in enumerate(batches):
                    if epoch == start_epoch and batch_index < skip_batches:
                        continue
                    # --- one forward/backward pass (of this process's rows of the global batch); the optimizer
                    # steps every `gradient_accumulation_steps`, when the processes' gradients are averaged ---
                    in_step = True
                    rows, loss_weight = share.rows(len(indices))
                    trained_examples += [indices[row] for row in rows] if loss_weight else []
                    batch = data.load_batch(indices, data_rng, rows)
                    end_of_epoch = batch_index + 1 == len(batches)
                    steps_now = not (batch_index + 1) % training.gradient_accumulation_steps or end_of_epoch
                    with nullcontext() if steps_now else accelerator.no_sync(batch_loss):
                        loss = batch_loss(batch, len(indices), rows) * loss_weight
                        accelerator.backward(loss / training.gradient_accumulation_steps)
                    meter.add(loss)
                    if not steps_now:
                        continue
                    # With clipping off, an infinite bound still measures the norm for the log.
                    gradient_norm = accelerator.clip_grad_norm_(trainable, config.optimizer.max_grad_norm or math.inf)
                    optimizer.step()
                    if not optimizer.step_was_skipped:  # fp16's gradient scaler skips steps with inf gradients
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if config.optimizer.scale_weight_norms:
                        keys_scaled, largest_norm = scale_weight_norms(network, config.optimizer.scale_weight_norms)
                    step += 1
                    in_step, resume_at = False, (epoch, batch_index + 1)

                    # --- report ---
                    report = meter.report(accelerator, step, epoch + 1, scheduler.get_last_lr()[0])
                    if report.loss is not None:
                        result.last_loss = report.loss
                        if spilling := spill_watch.observe(meter.seconds_per_step):
                            events.on_message(spilling)
                    events.on_step(report)
                    if report.loss is not None:
                        scalars = {f"lr/{group['name']}": group["lr"] for group in optimizer.param_groups}
                        if gradient_norm is not None:
                            scalars["gradient_norm"] = float(gradient_norm)
                        if config.optimizer.scale_weight_norms:
                            scalars.update({"max_norm/keys_scaled": float(keys_scaled),
                                            "max_norm/largest_norm": float(largest_norm)})
                        run_log.log_step(report, scalars)

                    # --- saves, samples, stop (their time is left out of the speed) ---
                    stopping, save_asked, interrupting = agree(accelerator, events.should_stop(),
                                                               events.save_requested(), events.interrupt_requested())
                    if step >= total_steps or stopping:
                        break
                    with meter.paused():
                        if (saving.save_every_n_steps and step % saving.save_every_n_steps == 0) or save_asked:
                            save(Path(saving.output_dir) / f"{saving.output_name}-s{step:06d}.safetensors", step,
                                 epoch, batch_index + 1)
                        if saving.save_every_n_epochs and end_of_epoch and \
                                (epoch + 1) % saving.save_every_n_epochs == 0:
                            save(Path(saving.output_dir) / f"{saving.output_name}-e{epoch + 1:04d}.safetensors",
                                 step, epoch, batch_index + 1)
                        if sampling.sample_every_n_steps and prompts and \
                                step % sampling.sample_every_n_steps == 0:
                            sample(step)
                        if step % validate_every == 0:
                            validate(step)
                    if interrupting:
                        raise KeyboardInterrupt
                if share.count > 1:
                    shard_lines.append(_shard_line(epoch, gather_objects(accelerator, trained_examples), data))
                    if run_log.folder is not None:
                        atomic_write_text(run_log.folder / "shards.jsonl", "".join(shard_lines))
                if step >= total_steps or stopping:
                    break
        except KeyboardInterrupt:
            # In the middle of a step (a second Ctrl-C) the weights are those of the last finished step, but
            # the random streams have moved on: that state would not resume exactly, so it is left out.
            if in_step and saving.save_state:
                events.on_message("Interrupted in the middle of a step: the weights are saved without their state.")
            save(Path(saving.output_dir) / f"{saving.output_name}-interrupted-s{step:06d}.safetensors", step,
                 *resume_at, with_state=not in_step)
            run_log.close()
            raise
        except torch.cuda.OutOfMemoryError:
            raise UserError("out of GPU memory: lower batch_size or resolution, turn on gradient_checkpointing "
                            "and cache_latents, or use mixed_precision bf16/fp16") from None

        result.stopped = step < total_steps
        result.steps = step
        if result.stopped:
            save(Path(saving.output_dir) / f"{saving.output_name}-s{step:06d}.safetensors", step, epoch,
                 batch_index + 1)
        else:
            save(final_path, step, epoch, batch_index + 1)
        if prompts:
            sample(step)
    run_log.close()
    return result


def _stopped_before_training(events: TrainingEvents, result: TrainingResult) -> TrainingResult:
    """The result of a run asked to stop while it prepared (class images, caches): nothing trained or saved."""
    events.on_message("Stopped before training began: nothing was trained or saved.")
    result.stopped = True
    return result


@torch.no_grad()
def _encode_captions(backend: DiffusionBackend, folders: dict[str, Path], disk: DiskCache | None
                     ) -> tuple[dict[str, TextConditioning], int]:
    """Each caption's text conditioning (batch size 1) exactly as if encoded alone, always with "" (caption
    dropout gives it, and its context pads longer ones), and how many captions besides "" were encoded rather
    than read from `disk` (where each caption's entry lives in the folder `folders` names).

    The WebUI encodes a caption of more than 75 tokens as several 77-token chunks and pads the shorter captions
    of its batch with empty chunks; a group that comes back longer than the empty caption's context is encoded
    again one caption at a time, so that each cached context keeps its own length and is padded only as far as
    its training batch needs (`TextConditioning.stack`).
    """
    cache = {"": backend.encode_text([""])}
    chunk_length = cache[""].context.shape[1]
    entries = {caption: disk.text_path(folder, caption) for caption, folder in folders.items()} if disk else {}
    for caption, entry in entries.items():
        if caption and (kept := disk.load_text(entry)) is not None:
            cache[caption] = kept
    missing = sorted(set(folders) - cache.keys())
    for start in range(0, len(missing), 16):
        group = missing[start:start + 16]
        encoded = backend.encode_text(group)
        if encoded.context.shape[1] == chunk_length:
            cache.update((caption, encoded[i:i + 1]) for i, caption in enumerate(group))
        else:
            cache.update((caption, backend.encode_text([caption])) for caption in group)
        for caption in group if disk else []:
            disk.store_text(entries[caption], cache[caption])
    return cache, len(missing)


class _BatchLoss(nn.Module):
    """The LoRA network as a module whose forward is a batch's training loss (`loss_of_batch`), which DDP can
    wrap: the network's parameters are its only ones, the frozen base is reached through the hooks."""

    def __init__(self, network: LoraNetwork, loss_of_batch: Callable[[Batch, int, range], torch.Tensor]):
        super().__init__()
        self.network = network
        self.loss_of_batch = loss_of_batch

    def forward(self, batch: Batch, global_rows: int, rows: range) -> torch.Tensor:
        return self.loss_of_batch(batch, global_rows, rows)


def _shard_line(epoch: int, examples_of_processes: list[list[int]], data: TrainingData) -> str:
    """One JSON line of the shards log: the images each process trained in `epoch`."""
    return json.dumps({"epoch": epoch + 1, "processes": [[str(data.examples[index].record.path) for index in examples]
                                                         for examples in examples_of_processes]}) + "\n"


def _idle_parts_parked(backend: DiffusionBackend, latents_cached: bool, captions_cached: bool) -> ParkedModules:
    """The VAE (once the latents are cached) and the text encoders (once the captions are) parked in CPU memory
    for the run, where the backend allows it."""
    parts = backend.model_parts()
    idle = ([parts.vae] if latents_cached else []) + (parts.text_encoders if captions_cached else [])
    return ParkedModules(idle if backend.parks_idle_parts else [], backend.device)

