"""The `ss_*` (kohya) and `modelspec.*` metadata written into every LoRA file."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch

from lora_trainer.config import NetworkConfig, TrainConfig, warmup_steps_for
from lora_trainer.data.dataset import TrainingData
from lora_trainer.data.scan import DatasetScan
from lora_trainer.lora.network import LoraNetwork
from lora_trainer.models.base import DiffusionBackend

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}
MODELSPEC_IMPLEMENTATION = {"sdxl": "https://github.com/Stability-AI/generative-models",
                            "flux": "https://github.com/black-forest-labs/flux"}
"""`modelspec.implementation` per family (diffusers for the others), as kohya writes it."""


def modelspec_architecture(backend: DiffusionBackend) -> str:
    """The `modelspec.architecture` string the WebUIs read to show a LoRA only for its model family."""
    family, prediction_type = backend.family, backend.prediction_type
    if family == "sdxl":
        return "stable-diffusion-xl-v1-base/lora"
    if family == "flux":
        return f"flux-1-{backend.flux_variant}/lora"
    if family == "sd2":
        return "stable-diffusion-v2-768-v/lora" if prediction_type == "v_prediction" else \
            "stable-diffusion-v2-512/lora"
    return "stable-diffusion-v1/lora"


def network_metadata(settings: NetworkConfig, network: LoraNetwork) -> dict[str, str]:
    """`ss_network_module`, `_dim`, `_alpha`, `_args` and `_train_unet_only` as kohya (lora) and LyCORIS (locon,
    loha, lokr, dora) write them, so the WebUI's card and Civitai show the type. The sizes are the network's own
    (the most common rank and alpha of its linear and of its 3x3 layers): the file's, when it came from one."""
    modules = list(network.lora_modules.values())
    linear = Counter((m.rank, m.alpha) for m in modules if m.weight_shape[2:] in ((), (1, 1)))
    conv = Counter((m.rank, m.alpha) for m in modules if m.weight_shape[2:] not in ((), (1, 1)))
    rank, alpha = linear.most_common(1)[0][0] if linear else (0, 0.0)
    args: dict[str, str] = {}
    if conv:
        conv_rank, conv_alpha = conv.most_common(1)[0][0]
        args = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)}
    network_type = settings.network_type
    kinds = {module.kind for module in modules}
    if kinds and {"locon": "lora"}.get(network_type, network_type) not in kinds:  # dim_from_weights: the file's
        network_type = sorted(kinds)[0]
    module = "networks.lora"
    if network_type != "lora":
        module = "lycoris.kohya"
        args = {"algo": {"dora": "lora"}.get(network_type, network_type), **args}
        if network_type == "dora":
            args.update(dora_wd="True", wd_on_output="False")
        if network_type == "lokr":
            args.update(factor=str(settings.lokr_factor), full_matrix=str(settings.lokr_full_matrix))
    for name in ("rank_dropout", "module_dropout"):
        if getattr(settings, name):
            args[name] = str(getattr(settings, name))
    return {"ss_network_module": module, "ss_network_dim": str(rank), "ss_network_alpha": _number(alpha),
            "ss_network_args": json.dumps(args),
            "ss_network_train_unet_only": str(not network.parameters_with_prefix("lora_te"))}


def run_metadata(config: TrainConfig, network: LoraNetwork, backend: DiffusionBackend, scan: DatasetScan,
                 data: TrainingData, total_steps: int, epochs: int, started_at: float) -> dict[str, str]:
    """Metadata that stays the same for every file of one run. Images in the dataset folder itself are listed
    under that folder's name, as kohya names a subset by its folder."""
    root_name = Path(config.dataset.train_data_dir or "").name
    subsets: dict[str, dict[str, int]] = {}
    reg_subsets: dict[str, dict[str, int]] = {}
    for record in [*scan.records, *(example.record for example in data.examples if example.record.is_reg)]:
        folders = reg_subsets if record.is_reg else subsets
        folder = record.subset or ("" if record.is_reg else root_name)
        entry = folders.setdefault(folder, {"n_repeats": record.repeats, "img_count": 0})
        entry["img_count"] += 1
    tag_frequency = {subset or root_name: counts for subset, counts in scan.tag_frequency().items()}
    family, prediction_type = backend.family, backend.prediction_type
    buckets = {str(index): {"resolution": [width, height], "count": count}
               for index, ((width, height), count) in enumerate(data.bucket_counts.items())}
    metadata = {
        **network_metadata(config.network, network),
        "ss_network_dropout": _number(config.network.lora_dropout),
        "ss_base_model_version": BASE_MODEL_VERSION[family] + (
            "_v" if prediction_type == "v_prediction" and family != "sdxl" else ""),
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_sd_model_name": str(backend.model_name),
        "ss_resolution": f"({config.dataset.resolution}, {config.dataset.resolution})",
        "ss_clip_skip": str(backend.clip_skip),
        "ss_num_train_images": str(data.examples_per_epoch),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(subsets),
        "ss_reg_dataset_dirs": json.dumps(reg_subsets),
        "ss_num_reg_images": str(sum(entry["img_count"] for entry in reg_subsets.values())),
        "ss_prior_loss_weight": _number(config.loss.prior_loss_weight),
        "ss_masked_loss": str(config.dataset.masked_loss),
        "ss_bucket_info": json.dumps({"buckets": buckets, "mean_img_ar_error": 0.0}),
        "ss_enable_bucket": str(config.dataset.enable_bucket),
        "ss_output_name": config.saving.output_name,
        "ss_training_started_at": str(int(started_at)),
        "ss_max_train_steps": str(total_steps),
        "ss_num_epochs": str(epochs),
        "ss_learning_rate": _number(config.optimizer.learning_rate),
        "ss_unet_lr": _number(config.optimizer.effective_unet_lr),
        "ss_text_encoder_lr": _number(config.optimizer.effective_text_encoder_lr),
        "ss_optimizer": optimizer_description(config),
        "ss_lr_scheduler": config.optimizer.scheduler,
        "ss_lr_warmup_steps": str(warmup_steps_for(config.optimizer.warmup_steps, total_steps)),
        "ss_batch_size_per_device": str(config.training.batch_size),
        "ss_gradient_accumulation_steps": str(config.training.gradient_accumulation_steps),
        "ss_mixed_precision": config.training.mixed_precision,
        "ss_gradient_checkpointing": str(config.training.gradient_checkpointing),
        "ss_fp8_base": str(config.model.fp8_base),
        "ss_max_grad_norm": _number(config.optimizer.max_grad_norm),
        "ss_scale_weight_norms": _number(config.optimizer.scale_weight_norms),
        "ss_min_snr_gamma": _number(config.loss.min_snr_gamma),
        "ss_noise_offset": _number(config.loss.noise_offset),
        "ss_multires_noise_iterations": str(config.loss.multires_noise_iterations or None),
        "ss_multires_noise_discount": _number(config.loss.multires_noise_discount),
        "ss_ip_noise_gamma": _number(config.loss.ip_noise_gamma or None),
        "ss_zero_terminal_snr": str(config.loss.zero_terminal_snr),
        "ss_debiased_estimation": str(config.loss.debiased_estimation_loss),
        "ss_loss_type": config.loss.loss_type,
        "ss_huber_schedule": config.loss.huber_schedule,
        "ss_huber_c": _number(config.loss.huber_c),
        "ss_flip_aug": str(config.dataset.flip_aug),
        "ss_shuffle_caption": str(config.dataset.shuffle_caption),
        "ss_keep_tokens": str(config.dataset.keep_tokens),
        "ss_caption_dropout_rate": _number(config.dataset.caption_dropout_rate),
        "ss_cache_latents": str(data.uses_latent_cache),
        "ss_seed": str(config.training.seed),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(backend),
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION.get(family, "diffusers"),
        "modelspec.title": config.saving.output_name,
        "modelspec.resolution": f"{config.dataset.resolution}x{config.dataset.resolution}",
    }
    if prediction_type != "flow":  # kohya writes no prediction type for Flux
        metadata["modelspec.prediction_type"] = "v" if prediction_type == "v_prediction" else "epsilon"
    if config.optimizer.lr_scheduler_min_lr_ratio:
        metadata["ss_lr_scheduler_min_lr_ratio"] = _number(config.optimizer.lr_scheduler_min_lr_ratio)
    if config.optimizer.loraplus_lr_ratio:
        metadata["ss_loraplus_lr_ratio"] = _number(config.optimizer.loraplus_lr_ratio)
    if config.network.init_lora_weights:
        metadata["ss_network_weights"] = str(config.network.init_lora_weights)
    return metadata


def optimizer_description(config: TrainConfig) -> str:
    """`ss_optimizer` as kohya writes it: the optimizer, then its arguments in parentheses when any are given."""
    settings = config.optimizer
    name = settings.optimizer_class or settings.optimizer_type
    if not settings.optimizer_args:
        return name
    return f"{name}({','.join(f'{key}={value!r}' for key, value in settings.optimizer_args.items())})"


def file_metadata(run: dict[str, str], step: int, epoch: int) -> dict[str, str]:
    """`run` plus what differs per saved file: its step, epoch and time."""
    now = time.time()
    return {**run, "ss_steps": str(step), "ss_epoch": str(epoch), "ss_training_finished_at": str(int(now)),
            "modelspec.date": datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")}


def safetensors_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """`sshs_model_hash` and `sshs_legacy_hash`, the hashes kohya stores so that the WebUI's additional-networks
    extension need not read the file: of the file as written with only its `ss_*` metadata (so that metadata
    added later leaves them valid), the SHA-256 of its tensor data and the first 8 hex digits of the SHA-256 of
    the 64 KiB at 1 MiB."""
    data = safetensors.torch.save(state, {key: value for key, value in metadata.items() if key.startswith("ss_")})
    header_length = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + header_length:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def _number(value: float | int | None) -> str:
    return "None" if value is None else repr(value)
