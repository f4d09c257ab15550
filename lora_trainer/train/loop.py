"""The training loop: batch -> noise -> predict -> loss -> step -> log -> maybe save. One function, top to bottom."""

from __future__ import annotations

import math
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.config_template import config_template
from lora_trainer.data.class_images import write_class_images
from lora_trainer.data.dataset import Batch, TrainingData
from lora_trainer.data.latent_cache import LatentDiskCache
from lora_trainer.data.sources import gather_images
from lora_trainer.errors import UserError
from lora_trainer.files import remove_stale_temporaries
from lora_trainer.lora.files import LoraFile, check_matches_network, read_lora, save_diffusers_layout, save_kohya
from lora_trainer.lora.metadata import file_metadata, run_metadata
from lora_trainer.lora.network import LoraNetwork
from lora_trainer.lora.targets import find_lora_targets, network_from_file
from lora_trainer.models.base import DiffusionBackend, TextConditioning
from lora_trainer.models.parking import ParkedModules
from lora_trainer.train.events import RunPlan, StepReport, TrainingEvents
from lora_trainer.train.loss import add_noise, diffusion_loss, diffusion_target, huber_thresholds, sample_noise
from lora_trainer.train.max_norm import scale_weight_norms
from lora_trainer.train.memory import plan_run_memory
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
    if leftovers := remove_stale_temporaries(saving.output_dir):
        events.on_message(f"Removed {len(leftovers)} temporary file(s) and folder(s) that killed saves left in "
                          f"{saving.output_dir}.")
    started_at = time.time()
    torch.manual_seed(training.seed)
    data_rng = random.Random(training.seed)
    noise_generator = torch.Generator(backend.device).manual_seed(training.seed)
    result = TrainingResult()

    # --- data and plan ---
    dataset = config.dataset
    if dataset.class_prompt:
        events.on_message(f"Drawing the missing class images of {dataset.class_prompt!r} with the base model...")
        write_class_images(dataset.reg_data_dir, dataset.class_prompt, dataset.num_class_images,
                           lambda prompt, seed: backend.generate(prompt, "", seed, sampling.sample_steps,
                                                                 dataset.resolution, dataset.resolution, 7.0),
                           progress=lambda done, total: events.on_message(f"Drew class image {done}/{total}."))
    sources = gather_images(dataset, training.seed)
    scan, reg_records, held_out = sources.scan, sources.reg_records, sources.held_out
    data = TrainingData(scan, config, backend.latent_scale, reg_records)
    validation = ValidationSet(held_out, config, backend.latent_scale) if held_out else None
    steps_per_epoch = math.ceil(data.batches_per_epoch() / training.gradient_accumulation_steps)
    total_steps = training.max_train_steps or steps_per_epoch * training.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    validate_every = config.logging.validate_every_n_steps or max(1, total_steps // DEFAULT_MEASUREMENTS)
    final_path = Path(saving.output_dir) / f"{saving.output_name}.safetensors"
    if final_path.exists() and saving.resume is None:
        raise UserError(f"{final_path} already exists; choose another output_name or move the old file")

    prompts = sample_prompts(config)
    if config.model.clip_skip is not None and config.model.clip_skip != (backend.clip_skip or 1):
        raise UserError(f"the config asks for clip_skip {config.model.clip_skip}, but this model's text conditioning "
                        f"uses {backend.clip_skip or 1}; in the WebUI, set Clip skip in its settings instead")

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
            initial = read_lora(config.network.init_lora_weights,
                                {peft: key for key, peft in network.peft_keys.items()})
            check_matches_network(initial, network, f"init_lora_weights {config.network.init_lora_weights}")
            network.load_kohya_state_dict(initial.state)
    parameter_groups = lora_parameter_groups(network, config.optimizer)
    trainable = [p for group in parameter_groups for p in group["params"]]

    accelerator = _accelerator(config, backend.device)
    if training.mixed_precision != "no" and not accelerator.native_amp:
        events.on_message(f"Note: mixed_precision {training.mixed_precision} has no effect on {backend.device.type}: "
                          "this run computes in fp32.")
    optimizer = make_optimizer(config, parameter_groups)
    scheduler = make_scheduler(config, optimizer, total_steps)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    metadata = run_metadata(config, network, backend.family, backend.prediction_type, backend.model_name,
                            backend.clip_skip, scan, data, total_steps, epochs, started_at)
    run_log = RunLog(config.logging.logging_dir, saving.output_name)
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
        if not all(torch.isfinite(p).all() for p in trainable):
            raise UserError(f"the LoRA weights became NaN/inf by step {step}; nothing was saved. {nan_advice}")
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
                save_state(saved.with_suffix(".state"), network.kohya_state_dict(), optimizer, scheduler, step,
                           epoch, next_batch, noise_generator, data_rng)
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
        # --- caches: VAE latents and text-encoder outputs, computed once ---
        if data.uses_latent_cache:
            events.on_message(f"Caching latents of {len(data.examples)} images...")
            disk = LatentDiskCache(backend.vae_fingerprint(), backend.device) if dataset.cache_latents_to_disk \
                else None
            encoded = data.cache_latents(backend.encode_images, progress=events.on_caching, disk=disk)
            if disk is not None:
                events.on_message(f"Latents: {len(data.examples) - encoded} read from the disk cache, "
                                  f"{encoded} encoded.")
        if validation is not None:
            validation.encode(backend)
        text_cache: dict[str, TextConditioning] = {}
        if config.uses_text_encoder_cache:
            text_cache = _encode_captions(backend, {example.record.caption for example in data.examples})

        parked = run_stack.enter_context(_idle_parts_parked(backend, data.uses_latent_cache, bool(text_cache)))

        if saving.resume is not None:
            resume_point, weights = load_state(saving.resume, optimizer, scheduler, noise_generator, data_rng)
            check_matches_network(LoraFile(weights, {}), network, f"the resume state {saving.resume}")
            network.load_kohya_state_dict(weights)
            step, start_epoch, skip_batches = resume_point.step, resume_point.epoch, resume_point.next_batch
            events.on_message(f"Resuming at step {step} (epoch {start_epoch + 1}).")

        skipped_list = None
        if scan.skipped:
            skipped_list = scan.write_skipped_list(
                Path(config.logging.logging_dir or saving.output_dir) / f"{saving.output_name}-skipped.txt")
        held_out_line = f"; {len(validation)} held out for the validation loss" if validation else ""
        reg_line = f"; {len(reg_records)} regularisation images" if reg_records else ""
        plan = RunPlan(total_steps, epochs, steps_per_epoch,
                       f"{scan.summary(skipped_list)}{held_out_line}{reg_line}\n{data.summary()}\n"
                       f"{len(network.lora_modules)} LoRA layers, {sum(p.numel() for p in trainable):,} "
                       f"parameters; {total_steps} steps over {epochs} epoch(s)\n{memory.line()}", memory)
        events.on_start(plan)
        validate(step)
        if sampling.sample_at_first and prompts and step == 0:
            sample(0)

        loss_settings = config.loss
        alphas_cumprod = backend.alphas_cumprod
        if loss_settings.zero_terminal_snr:
            alphas_cumprod = zero_terminal_snr(alphas_cumprod)

        def training_loss(batch: Batch) -> torch.Tensor:
            if batch.latents is not None:
                latents = batch.latents.to(backend.device)
            else:
                latents = backend.encode_images(batch.pixels)
            if text_cache:
                text = TextConditioning.stack([text_cache[caption] for caption in batch.captions],
                                              padding=text_cache[""].context)
            else:
                text = backend.encode_text(batch.captions)
            noise = sample_noise(latents, loss_settings.noise_offset, noise_generator)
            if loss_settings.multires_noise_iterations:
                noise = add_multires_noise(noise, loss_settings.multires_noise_iterations,
                                           loss_settings.multires_noise_discount, noise_generator).to(latents.dtype)
            timesteps = torch.randint(0, len(alphas_cumprod), (latents.shape[0],),
                                      generator=noise_generator, device=backend.device)
            input_noise = perturbed_input_noise(noise, loss_settings.ip_noise_gamma, noise_generator) \
                if loss_settings.ip_noise_gamma else noise
            noisy_latents = add_noise(latents, input_noise, timesteps, alphas_cumprod)
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
        loss_sum = torch.zeros((), device=backend.device)
        losses_in_sum = 0
        window_start, window_step = time.perf_counter(), step
        seconds_per_step = 0.0
        spill_watch = SpillWatch(memory_share_reader(backend.device))
        stopping = False
        resume_at = (start_epoch, skip_batches)  # (epoch, next batch) after the last finished step
        in_step = False
        try:
            for epoch in range(start_epoch, epochs):
                batches = data.epoch_plan(epoch)
                for batch_index, indices in enumerate(batches):
                    if epoch == start_epoch and batch_index < skip_batches:
                        continue
                    # --- one forward/backward pass; the optimizer steps every `gradient_accumulation_steps` ---
                    in_step = True
                    batch = data.load_batch(indices, data_rng)
                    loss = training_loss(batch)
                    accelerator.backward(loss / training.gradient_accumulation_steps)
                    loss_sum += loss.detach()
                    losses_in_sum += 1
                    end_of_epoch = batch_index + 1 == len(batches)
                    if (batch_index + 1) % training.gradient_accumulation_steps and not end_of_epoch:
                        continue
                    # With clipping off, an infinite bound still measures the norm for the log.
                    gradient_norm = accelerator.clip_grad_norm_(trainable, config.optimizer.max_grad_norm or math.inf)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if config.optimizer.scale_weight_norms:
                        keys_scaled, largest_norm = scale_weight_norms(network, config.optimizer.scale_weight_norms)
                    step += 1
                    in_step, resume_at = False, (epoch, batch_index + 1)

                    # --- report (reading the loss back only every few steps keeps the device busy) ---
                    report_loss = None
                    if step % config.logging.log_every_n_steps == 0 or step == total_steps:
                        report_loss = (loss_sum / losses_in_sum).item()
                        if not math.isfinite(report_loss):
                            raise UserError(f"the loss became {report_loss} by step {step}; nothing more was "
                                            f"saved. {nan_advice}")
                        result.last_loss = report_loss
                        loss_sum.zero_()
                        losses_in_sum = 0
                        now = time.perf_counter()
                        seconds_per_step = (now - window_start) / max(1, step - window_step)
                        window_start, window_step = now, step
                        if spilling := spill_watch.observe(seconds_per_step):
                            events.on_message(spilling)
                    steps_per_second = 1 / seconds_per_step if seconds_per_step else 0.0
                    report = StepReport(
                        step=step, total_steps=total_steps, epoch=epoch + 1, loss=report_loss,
                        learning_rate=scheduler.get_last_lr()[0], steps_per_second=steps_per_second,
                        samples_per_second=(steps_per_second * training.batch_size
                                            * training.gradient_accumulation_steps),
                        seconds_elapsed=time.time() - started_at,
                        seconds_left=seconds_per_step * (total_steps - step))
                    events.on_step(report)
                    if report_loss is not None:
                        scalars = {f"lr/{group['name']}": group["lr"] for group in optimizer.param_groups}
                        if gradient_norm is not None:
                            scalars["gradient_norm"] = float(gradient_norm)
                        if config.optimizer.scale_weight_norms:
                            scalars.update({"max_norm/keys_scaled": float(keys_scaled),
                                            "max_norm/largest_norm": float(largest_norm)})
                        run_log.log_step(report, scalars)

                    # --- saves, samples, stop (their time is left out of the speed) ---
                    stopping = events.should_stop()
                    if step >= total_steps or stopping:
                        break
                    paused_at = time.perf_counter()
                    if (saving.save_every_n_steps and step % saving.save_every_n_steps == 0) or \
                            events.save_requested():
                        save(Path(saving.output_dir) / f"{saving.output_name}-s{step:06d}.safetensors", step,
                             epoch, batch_index + 1)
                    if saving.save_every_n_epochs and end_of_epoch and (epoch + 1) % saving.save_every_n_epochs == 0:
                        save(Path(saving.output_dir) / f"{saving.output_name}-e{epoch + 1:04d}.safetensors", step,
                             epoch, batch_index + 1)
                    if sampling.sample_every_n_steps and prompts and \
                            step % sampling.sample_every_n_steps == 0:
                        sample(step)
                    if step % validate_every == 0:
                        validate(step)
                    window_start += time.perf_counter() - paused_at
                    if events.interrupt_requested():
                        raise KeyboardInterrupt
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


@torch.no_grad()
def _encode_captions(backend: DiffusionBackend, captions: set[str]) -> dict[str, TextConditioning]:
    """Each caption's text conditioning (batch size 1) exactly as if encoded alone, always with "" (caption
    dropout gives it, and its context pads longer ones).

    The WebUI encodes a caption of more than 75 tokens as several 77-token chunks and pads the shorter captions
    of its batch with empty chunks; a group that comes back longer than the empty caption's context is encoded
    again one caption at a time, so that each cached context keeps its own length and is padded only as far as
    its training batch needs (`TextConditioning.stack`).
    """
    cache = {"": backend.encode_text([""])}
    chunk_length = cache[""].context.shape[1]
    ordered = sorted(captions - {""})
    for start in range(0, len(ordered), 16):
        group = ordered[start:start + 16]
        encoded = backend.encode_text(group)
        if encoded.context.shape[1] == chunk_length:
            cache.update((caption, encoded[i:i + 1]) for i, caption in enumerate(group))
        else:
            cache.update((caption, backend.encode_text([caption])) for caption in group)
    return cache


def _idle_parts_parked(backend: DiffusionBackend, latents_cached: bool, captions_cached: bool) -> ParkedModules:
    """The VAE (once the latents are cached) and the text encoders (once the captions are) parked in CPU memory
    for the run, where the backend allows it."""
    parts = backend.model_parts()
    idle = ([parts.vae] if latents_cached else []) + (parts.text_encoders if captions_cached else [])
    return ParkedModules(idle if backend.parks_idle_parts else [], backend.device)


def _accelerator(config: TrainConfig, device: torch.device):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # One process may train many times (the WebUI): accelerate keeps global state that pins the first
    # run's precision, so it is reset for every run.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=config.training.mixed_precision, cpu=device.type == "cpu")
