"""The `ss_*` (kohya) and `modelspec.*` metadata written into every LoRA file."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from lora_trainer.config import NetworkConfig, TrainConfig
from lora_trainer.data.dataset import TrainingData
from lora_trainer.data.scan import DatasetScan
from lora_trainer.models.base import ModelFamily, PredictionType

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def modelspec_architecture(family: ModelFamily, prediction_type: PredictionType) -> str:
    """The `modelspec.architecture` string the WebUIs read to show a LoRA only for its model family."""
    if family == "sdxl":
        return "stable-diffusion-xl-v1-base/lora"
    if family == "sd2":
        return "stable-diffusion-v2-768-v/lora" if prediction_type == "v_prediction" else \
            "stable-diffusion-v2-512/lora"
    return "stable-diffusion-v1/lora"


def network_module_and_args(network: NetworkConfig) -> tuple[str, dict[str, str]]:
    """`ss_network_module` and `ss_network_args` as kohya (lora) or LyCORIS (locon, loha, lokr, dora) write
    them, so the WebUI's card and Civitai show the type."""
    conv = {"conv_dim": str(network.effective_conv_rank), "conv_alpha": str(network.effective_conv_alpha)} \
        if network.effective_conv_rank else {}
    if network.network_type == "lora":
        return "networks.lora", conv
    algo = {"dora": "lora"}.get(network.network_type, network.network_type)
    args = {"algo": algo, **conv}
    if network.network_type == "dora":
        args.update(dora_wd="True", wd_on_output="False")
    if network.network_type == "lokr":
        args.update(factor=str(network.lokr_factor), full_matrix=str(network.lokr_full_matrix))
    return "lycoris.kohya", args


def run_metadata(config: TrainConfig, family: ModelFamily, prediction_type: PredictionType, model_name: str,
                 clip_skip: int | None, scan: DatasetScan, data: TrainingData, total_steps: int,
                 started_at: float) -> dict[str, str]:
    """Metadata that stays the same for every file of one run."""
    subsets: dict[str, dict[str, int]] = {}
    reg_subsets: dict[str, dict[str, int]] = {}
    for record in [*scan.records, *(example.record for example in data.examples if example.record.is_reg)]:
        folders = reg_subsets if record.is_reg else subsets
        entry = folders.setdefault(record.subset, {"n_repeats": record.repeats, "img_count": 0})
        entry["img_count"] += 1
    buckets = {str(index): {"resolution": [width, height], "count": count}
               for index, ((width, height), count) in enumerate(data.bucket_counts.items())}
    network_module, network_args = network_module_and_args(config.network)
    metadata = {
        "ss_network_module": network_module,
        "ss_network_dim": str(config.network.lora_rank),
        "ss_network_alpha": _number(config.network.effective_lora_alpha),
        "ss_network_dropout": _number(config.network.lora_dropout),
        "ss_network_args": json.dumps(network_args),
        "ss_network_train_unet_only": str(not config.network.train_text_encoder),
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_sd_model_name": str(model_name),
        "ss_resolution": f"({config.dataset.resolution}, {config.dataset.resolution})",
        "ss_clip_skip": str(clip_skip),
        "ss_num_train_images": str(data.examples_per_epoch),
        "ss_tag_frequency": json.dumps(scan.tag_frequency()),
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
        "ss_num_epochs": str(config.training.epochs),
        "ss_learning_rate": _number(config.optimizer.learning_rate),
        "ss_unet_lr": _number(config.optimizer.effective_unet_lr),
        "ss_text_encoder_lr": _number(config.optimizer.effective_text_encoder_lr),
        "ss_optimizer": config.optimizer.optimizer_type,
        "ss_lr_scheduler": config.optimizer.scheduler,
        "ss_lr_warmup_steps": str(config.optimizer.warmup_steps),
        "ss_batch_size_per_device": str(config.training.batch_size),
        "ss_gradient_accumulation_steps": str(config.training.gradient_accumulation_steps),
        "ss_mixed_precision": config.training.mixed_precision,
        "ss_gradient_checkpointing": str(config.training.gradient_checkpointing),
        "ss_max_grad_norm": _number(config.optimizer.max_grad_norm),
        "ss_min_snr_gamma": _number(config.loss.min_snr_gamma),
        "ss_noise_offset": _number(config.loss.noise_offset),
        "ss_flip_aug": str(config.dataset.flip_aug),
        "ss_shuffle_caption": str(config.dataset.shuffle_caption),
        "ss_keep_tokens": str(config.dataset.keep_tokens),
        "ss_caption_dropout_rate": _number(config.dataset.caption_dropout_rate),
        "ss_cache_latents": str(data.uses_latent_cache),
        "ss_seed": str(config.training.seed),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": modelspec_architecture(family, prediction_type),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if family == "sdxl"
        else "diffusers",
        "modelspec.title": config.saving.output_name,
        "modelspec.resolution": f"{config.dataset.resolution}x{config.dataset.resolution}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    if config.network.init_lora_weights:
        metadata["ss_network_weights"] = str(config.network.init_lora_weights)
    return metadata


def file_metadata(run: dict[str, str], step: int, epoch: int) -> dict[str, str]:
    """`run` plus what differs per saved file: its step, epoch and time."""
    now = time.time()
    return {**run, "ss_steps": str(step), "ss_epoch": str(epoch), "ss_training_finished_at": str(int(now)),
            "modelspec.date": datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")}


def _number(value: float | int | None) -> str:
    return "None" if value is None else repr(value)
