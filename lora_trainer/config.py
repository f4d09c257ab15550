"""The typed training config: small dataclasses, one per group of settings, loaded from YAML, overridable from
the command line.

Key names follow what LoRA users already write for kohya's sd-scripts, and every key's name is unique across
the groups, so a YAML file may list them flat (`lora_rank: 16`) or under their group (`network: {lora_rank: 16}`).
All validation lives in the `__post_init__` methods, so a config built in code, from YAML or from the WebUI tab
is checked the same way.
"""

from __future__ import annotations

import codecs
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from lora_trainer.errors import UserError

Typed = TypeVar("Typed")
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "lion", "adafactor", "dadaptation", "adamw_schedulefree"]
OPTIMIZER_SPELLINGS = {"dadaptadam": "dadaptation", "adamwschedulefree": "adamw_schedulefree"}
"""kohya's names of our optimizers, lowercased, where they differ from ours (`DAdaptAdam`, `AdamWScheduleFree`)."""
Scheduler = Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"]
MixedPrecision = Literal["no", "fp16", "bf16"]
SavePrecision = Literal["float", "fp16", "bf16"]
LossType = Literal["l2", "huber", "smooth_l1"]
HuberSchedule = Literal["snr", "exponential", "constant"]
NetworkType = Literal["lora", "locon", "loha", "lokr", "dora"]
CONV_NETWORK_TYPES = ("locon", "loha", "lokr")
"""Network types that adapt the UNet's 3x3 convolutions by default, as LyCORIS does."""

FLUX_BLOCK_LAYERS = ["img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mod.lin",
                     "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "linear1", "linear2", "modulation.lin"]
"""Every linear layer of Flux's double and single stream blocks: kohya's default for Flux (networks/lora_flux.py)."""
UNET_TARGET_SETS = {
    "kohya": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
              *FLUX_BLOCK_LAYERS],
    "attention": ["to_q", "to_k", "to_v", "to_out.0", "img_attn.qkv", "img_attn.proj", "txt_attn.qkv",
                  "txt_attn.proj"],
}
"""Named UNet layer sets: kohya's default (every linear layer of the transformer blocks; of a UNet's or of Flux's)
and attention only (Flux: its double blocks' attention; a single block's fused linear1 is not only attention)."""
TEXT_ENCODER_TARGET_SETS = {
    "kohya": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
"""Named text-encoder layer sets: kohya's default (attention and MLP) and attention only."""

AT_LEAST_ONE = ("lora_rank", "repeats", "resolution", "bucket_step", "batch_size", "gradient_accumulation_steps",
                "epochs", "log_every_n_steps", "scheduler_num_cycles", "sample_steps")
AT_LEAST_ONE_OR_NONE = ("max_train_steps", "save_every_n_epochs", "save_every_n_steps", "keep_last_n_saves",
                        "sample_every_n_steps", "clip_skip", "validate_every_n_steps", "vae_batch_size")
POSITIVE_OR_NONE = ("learning_rate", "lora_alpha", "conv_alpha", "max_grad_norm", "min_snr_gamma",
                    "prior_loss_weight", "sample_cfg_scale", "loraplus_lr_ratio", "scale_weight_norms")
ZERO_LEAVES_UNTRAINED = ("unet_lr", "text_encoder_lr")
PROBABILITIES = ("lora_dropout", "rank_dropout", "module_dropout", "caption_dropout_rate", "validation_split")
NOT_NEGATIVE = ("conv_rank", "warmup_steps", "keep_tokens", "noise_offset", "num_class_images",
                "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma")
FLAT_ALIASES = {"optimizer": "optimizer_type"}
"""Flat keys spelled differently from their field (`optimizer: adamw` is the optimizer group's `optimizer_type`
unless its value is the group's mapping)."""
KOHYA_ALIASES = {
    "pretrained_model_name_or_path": "base_model", "network_dim": "lora_rank", "network_alpha": "lora_alpha",
    "network_dropout": "lora_dropout", "network_weights": "init_lora_weights", "train_batch_size": "batch_size",
    "max_train_epochs": "epochs", "lr_scheduler": "scheduler", "lr_warmup_steps": "warmup_steps",
    "lr_scheduler_num_cycles": "scheduler_num_cycles", "lr_scheduler_power": "scheduler_power",
    "bucket_reso_steps": "bucket_step", "min_bucket_reso": "min_bucket_side", "max_bucket_reso": "max_bucket_side",
    "dataset_repeats": "repeats", "save_last_n_epochs": "keep_last_n_saves", "save_last_n_steps": "keep_last_n_saves",
}
"""kohya sd-scripts' spellings of keys this config names otherwise: accepted, with a note naming ours."""


@dataclass
class SubsetConfig:
    """One folder of a dataset made of several (kohya's dataset-config subsets), with its own options; an
    option left out takes the dataset's value."""

    image_dir: Path
    """The folder of images and captions (kohya-style `N_name` subfolders repeat as usual)."""
    repeats: int = 1
    """Repeats per epoch of this folder's images."""
    caption_extension: str | None = None
    """Extension of this folder's caption files."""
    keep_tokens: int | None = None
    """Leading caption tags kept in place when shuffling."""
    shuffle_caption: bool | None = None
    """Shuffle this folder's caption tags."""
    caption_dropout_rate: float | None = None
    """Probability of an empty caption for this folder's images."""
    flip_aug: bool | None = None
    """Randomly mirror this folder's images."""
    is_reg: bool = False
    """The folder holds regularisation (prior-preservation) images."""

    def __post_init__(self) -> None:
        _check_group(self)


@dataclass
class DatasetConfig:
    """Where the images and captions are and how they become batches."""

    train_data_dir: Path | None = None
    """Folder of images. Captions come from `name.txt` beside each image or from `metadata_path`;
    kohya-style subfolders `N_name` repeat their images N times per epoch."""
    subsets: list[SubsetConfig] = field(default_factory=list)
    """Several folders, each with its own repeats, caption and flip options (`image_dir`, `repeats`,
    `caption_extension`, `keep_tokens`, `shuffle_caption`, `caption_dropout_rate`, `flip_aug`, `is_reg`),
    instead of or beside `train_data_dir`."""
    metadata_path: Path | None = None
    """Optional `metadata.csv` with columns `filename,prompt` (a `.txt` beside an image wins)."""
    caption_extension: str = ".txt"
    """Extension of caption sidecar files."""
    repeats: int = 1
    """Repeats per epoch for images not in an `N_name` subfolder."""
    resolution: int = 512
    """Training side length in pixels; buckets keep about this many pixels in total."""
    enable_bucket: bool = True
    """Aspect-ratio bucketing: images are resized to the bucket nearest their aspect ratio instead of squares."""
    bucket_step: int = 64
    """Bucket sides are multiples of this (must divide `resolution`)."""
    min_bucket_side: int | None = None
    """Smallest bucket side (default: half the resolution)."""
    max_bucket_side: int | None = None
    """Largest bucket side (default: twice the resolution)."""
    random_crop: bool = False
    """Crop at a random position instead of the centre (turns off latent caching's reuse)."""
    flip_aug: bool = False
    """Randomly mirror images horizontally."""
    shuffle_caption: bool = False
    """Shuffle the comma-separated tags of each caption every time it is used."""
    keep_tokens: int = 0
    """How many leading caption tags stay in place when shuffling (e.g. the trigger word)."""
    caption_dropout_rate: float = 0.0
    """Probability of training an image with an empty caption."""
    cache_latents: bool = True
    """Encode every image with the VAE once, before training (not with random_crop)."""
    vae_batch_size: int | None = None
    """Images per VAE call while caching latents, mirror images included (kohya's key). Default: as many as
    make a megapixel, at most 8 (4 at 512 px, 1 at 1024 px): the encoder holds about 2.5 GB of activations per
    megapixel in fp32, which the memory plan counts."""
    cache_latents_to_disk: bool = False
    """Also keep the cached latents in a `.lora-trainer-latents` folder beside the images, named by the image's
    content, bucket, flips and the VAE, so that the next run with the same images starts at once."""
    cache_text_encoder_outputs: bool | None = None
    """Encode every caption once (needs a frozen text encoder and no caption shuffling).
    Default: on whenever that holds."""
    cache_text_encoder_outputs_to_disk: bool = False
    """Also keep each caption's text-encoder outputs in the `.lora-trainer-latents` folder beside its images,
    named by the caption and the text encoders, so that the next run reads them instead of encoding."""
    masked_loss: bool = False
    """Learn only the masked part of each image: its mask is `name.mask.png` beside it (or `name.png` in
    `mask_dir`), else its alpha channel; white counts, black is ignored. Images without a mask count whole."""
    mask_dir: Path | None = None
    """A folder of masks named like their images (`photo.png` for `photo.jpg`), instead of masks beside them."""
    reg_data_dir: Path | None = None
    """Regularisation (prior-preservation) images of the class, kohya's layout (`N_class` subfolders repeat N
    times): each epoch mixes in as many of them as there are training images, their loss weighted by
    `prior_loss_weight`."""
    class_prompt: str | None = None
    """Generate `num_class_images` regularisation images of this prompt ("a photo of a person") with the base
    model itself, before training, into a `1_<prompt>` subfolder of `reg_data_dir`; kept for the next run."""
    num_class_images: int = 0
    """How many class images `reg_data_dir` should hold for `class_prompt` (only the missing ones are drawn)."""
    validation_split: float = 0.0
    """Hold out this share of the images (at least one; chosen by the seed) to measure a validation loss."""
    validation_data_dir: Path | None = None
    """A folder of held-out images and captions for the validation loss, instead of `validation_split`."""

    def __post_init__(self) -> None:
        if not isinstance(self.subsets, list):
            raise UserError("config key 'subsets' should be a list of folders with their options, "
                            f"got {self.subsets!r}")
        self.subsets = [_subset(number, entry) for number, entry in enumerate(self.subsets, start=1)]
        _check_group(self)
        if self.cache_latents_to_disk and (not self.cache_latents or self.random_crop):
            raise UserError("cache_latents_to_disk keeps the cached latents: turn on cache_latents (and off "
                            "random_crop, which encodes every step)")
        if self.class_prompt and (self.reg_data_dir is None or self.num_class_images < 1):
            raise UserError("class_prompt generates regularisation images: set reg_data_dir (where they go) and "
                            "num_class_images (how many)")
        if self.validation_split and self.validation_data_dir is not None:
            raise UserError("validation_split and validation_data_dir both choose the validation images: "
                            "set one of them")


@dataclass
class ModelConfig:
    """The base model (the command line's; in the WebUI, the loaded checkpoint)."""

    base_model: str | None = None
    """A diffusers model folder, or a single-file checkpoint (.safetensors/.ckpt)."""
    base_model_config: str | None = None
    """For a single-file checkpoint: a local diffusers folder whose configs describe it (works offline)."""
    v_parameterization: bool | None = None
    """Force v-prediction on (True) or off (False); by default the model's own setting is used."""
    clip_skip: int | None = None
    """Condition on the text encoder's output this many layers from the end, as kohya and the WebUI count
    (2: the penultimate layer, then the final layer norm). SD1/SD2 only; in the WebUI, its Clip skip
    setting decides."""
    fp8_base: bool = False
    """Store the frozen UNet weights in fp8 (e4m3) and upcast each layer's weight as it runs: the UNet takes half
    the memory of fp16 (kohya's fp8_base). The model is restored exactly afterwards; not with dora."""

    def __post_init__(self) -> None:
        _check_group(self)


@dataclass
class NetworkConfig:
    """The LoRA network: its type, its size, the layers it adapts and where it starts."""

    network_type: NetworkType = "lora"
    """lora: low-rank up/down matrices (kohya's networks.lora). locon: the same, on the 3x3 convolutions too.
    loha: a Hadamard product of two low-rank products (LyCORIS). lokr: a Kronecker product of a small and a
    low-rank (or full) matrix (LyCORIS). dora: LoRA with the weight's column norms as a trained magnitude."""
    lora_rank: int = 16
    """Rank (kohya: network_dim) of each LoRA matrix pair."""
    lora_alpha: float | None = None
    """Scale numerator: the LoRA output is multiplied by alpha/rank. Default: equal to the rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input during training (kohya: network_dropout)."""
    rank_dropout: float = 0.0
    """During training, drop each rank of each LoRA's output with this probability, per sample (kohya's
    rank_dropout; the kept ranks are scaled up to keep the mean)."""
    module_dropout: float = 0.0
    """During training, skip each adapted layer's LoRA for a whole step with this probability (kohya's
    module_dropout)."""
    target_modules: list[str] = field(default_factory=lambda: list(UNET_TARGET_SETS["kohya"]))
    """UNet (or Flux transformer) modules to adapt, matched as suffixes of module paths, or a named set: `kohya`
    (the default: every linear layer of the transformer blocks; Flux's double and single stream blocks) or
    `attention` (to_q, to_k, to_v, to_out.0; Flux: the double blocks' qkv and proj)."""
    conv_rank: int | None = None
    """Rank on the UNet's 3x3 convolutions (resnets, samplers); 0 leaves them alone. Default: `lora_rank` for
    locon, loha and lokr, 0 for lora and dora."""
    conv_alpha: float | None = None
    """Alpha for the convolution layers. Default: equal to the conv rank."""
    lokr_factor: int = -1
    """lokr: split each dimension into two factors, the smaller at most this (-1: as square as possible)."""
    lokr_full_matrix: bool = False
    """lokr: train the larger Kronecker factor as a full matrix instead of a low-rank product."""
    train_text_encoder: bool = False
    """Also train LoRA on the text encoder(s)."""
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGET_SETS["kohya"]))
    """Text-encoder modules to adapt, matched as suffixes of module paths, or a named set: `kohya` (the
    default: attention and MLP) or `attention`. Layers the model never runs (after the one it conditions on:
    Clip skip, SD2, SDXL's first encoder) are left out."""
    init_lora_weights: Path | None = None
    """Start from this LoRA file (kohya/LyCORIS, peft or diffusers layout); its type, layers and ranks must match
    this run's, unless `dim_from_weights`."""
    dim_from_weights: bool = False
    """Take the ranks, alphas and adapted layers from `init_lora_weights` instead of `lora_rank`, `lora_alpha`,
    `target_modules`, `conv_rank` and `train_text_encoder` (kohya's dim_from_weights)."""

    def __post_init__(self) -> None:
        _check_group(self)
        self.target_modules = _named_set(self.target_modules, UNET_TARGET_SETS)
        self.text_encoder_target_modules = _named_set(self.text_encoder_target_modules, TEXT_ENCODER_TARGET_SETS)
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise UserError(f"lokr_factor must be -1 (as square as possible) or a positive number, "
                            f"got {self.lokr_factor}")

    @property
    def effective_lora_alpha(self) -> float:
        """Alpha of the attention LoRA (the rank when not set)."""
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)

    @property
    def effective_conv_rank(self) -> int:
        """Rank on the 3x3 convolutions (0: not adapted)."""
        if self.conv_rank is not None:
            return self.conv_rank
        return self.lora_rank if self.network_type in CONV_NETWORK_TYPES else 0

    @property
    def effective_conv_alpha(self) -> float:
        """Alpha of the convolution layers (their rank when not set)."""
        return self.conv_alpha if self.conv_alpha is not None else float(self.effective_conv_rank)


@dataclass
class OptimizerConfig:
    """The optimizer, its learning rates and their schedule."""

    optimizer_type: Optimizer = "adamw"
    """adamw (torch), adamw8bit (bitsandbytes), prodigy (prodigyopt), lion (lion-pytorch), adafactor
    (transformers), dadaptation (DAdaptAdam, from dadaptation) or adamw_schedulefree (schedulefree); kohya's
    spellings (AdamW8bit, DAdaptAdam, ...) are read too."""
    optimizer_class: str | None = None
    """Any optimizer class by import path (`torch.optim.SGD`, `pytorch_optimizer.CAME`), built with the
    parameter groups and `optimizer_args`; replaces `optimizer_type` (and its weight decay)."""
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the optimizer (`{betas: [0.9, 0.99], eps: 1.0e-8}`, `{d_coef: 2}`); kohya's list of
    `key=value` strings is read too. They win over `weight_decay` and the defaults."""
    learning_rate: float = 1e-4
    """Learning rate for every LoRA parameter unless `unet_lr`/`text_encoder_lr` say otherwise."""
    unet_lr: float | None = None
    """Learning rate of the UNet LoRA (default: `learning_rate`); 0 trains the text encoder's alone."""
    text_encoder_lr: float | None = None
    """Learning rate of the text-encoder LoRA (default: `learning_rate`); 0 leaves it untrained."""
    weight_decay: float = 1e-2
    """Decoupled weight decay."""
    scheduler: Scheduler = "constant"
    """Learning-rate schedule after the warmup."""
    warmup_steps: int | float = 0
    """Optimizer steps of linear warmup from 0; a fraction below 1 is that share of the run's steps."""
    lr_scheduler_min_lr_ratio: float = 0.0
    """The decaying schedules (linear, cosine, cosine_with_restarts, polynomial) end at this fraction of the
    learning rate instead of 0."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: the up matrices learn this many times faster than the down matrices (16 is the paper's choice)."""
    scheduler_num_cycles: int = 1
    """Restarts for cosine_with_restarts."""
    scheduler_power: float = 1.0
    """Power of the polynomial schedule."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (None: no clipping)."""
    scale_weight_norms: float | None = None
    """Max-norm regularisation: after each step, scale back every LoRA whose weight change is longer than this
    (kohya's scale_weight_norms; 1 is usual)."""

    def __post_init__(self) -> None:
        if isinstance(self.optimizer_type, str):
            lowered = self.optimizer_type.lower()
            self.optimizer_type = OPTIMIZER_SPELLINGS.get(lowered, lowered)
            if "." in self.optimizer_type:
                raise UserError(f"optimizer_type {self.optimizer_type!r} looks like an import path: set "
                                f"optimizer_class: {self.optimizer_type} for an optimizer class by its path")
        if isinstance(self.optimizer_args, list):  # kohya: ["betas=0.9,0.99", "weight_decay=0.1"]
            self.optimizer_args = dict(_key_value(item) for item in self.optimizer_args)
        _check_group(self)
        if isinstance(self.warmup_steps, float) and not (self.warmup_steps < 1 or self.warmup_steps.is_integer()):
            raise UserError(f"config key 'warmup_steps' must be a whole number of steps or a fraction below 1, got "
                            f"{self.warmup_steps}")
        if not 0.0 <= self.lr_scheduler_min_lr_ratio <= 1.0:
            raise UserError(f"config key 'lr_scheduler_min_lr_ratio' must be in [0, 1], got "
                            f"{self.lr_scheduler_min_lr_ratio}")

    @property
    def effective_unet_lr(self) -> float:
        """The UNet LoRA learning rate."""
        return self.unet_lr if self.unet_lr is not None else self.learning_rate

    @property
    def effective_text_encoder_lr(self) -> float:
        """The text-encoder LoRA learning rate."""
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate


@dataclass
class TrainingConfig:
    """How long the run is, in what batches and precision, on which device."""

    batch_size: int = 1
    """Images per forward pass (of each process, when several train together)."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step."""
    epochs: int = 1
    """Passes over the (repeated) dataset; ignored when `max_train_steps` is set."""
    max_train_steps: int | None = None
    """Stop after this many optimizer steps."""
    mixed_precision: MixedPrecision = "no"
    """Compute precision: fp16 or bf16 autocast with fp32 LoRA weights, or no (fp32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    seed: int = 42
    """Seed for data order, augmentation, noise and LoRA initialisation."""
    device: str | None = None
    """cuda, cpu, cuda:1, ... (default: cuda when available). Under `accelerate launch` or `torchrun` each
    process takes its own GPU."""
    distributed_timeout_seconds: float = 600.0
    """With several processes: how long one waits for the others (while the main one saves or renders samples,
    or when one died) before it stops with an error instead of hanging."""

    def __post_init__(self) -> None:
        _check_group(self)
        if self.distributed_timeout_seconds <= 0:
            raise UserError("config key 'distributed_timeout_seconds' must be a positive number of seconds, got "
                            f"{self.distributed_timeout_seconds}")


@dataclass
class LossConfig:
    """The loss's weighting and the training noise."""

    min_snr_gamma: float | None = None
    """Min-SNR loss weighting (5 is the paper's choice); None: plain MSE."""
    noise_offset: float = 0.0
    """Add this much per-channel offset noise (helps very dark/bright images)."""
    prior_loss_weight: float = 1.0
    """Weight of the regularisation images' loss against the training images' (kohya's prior loss weight)."""
    multires_noise_iterations: int = 0
    """Pyramid noise: add this many levels of coarser noise (6-10 is usual); 0 turns it off."""
    multires_noise_discount: float = 0.3
    """Weight of each coarser level of pyramid noise, raised to the power of its level."""
    ip_noise_gamma: float = 0.0
    """Input perturbation: noise the latents with this much extra noise that the target leaves out (0.1 is usual)."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule so that its last step is pure noise (for v-prediction models)."""
    debiased_estimation_loss: bool = False
    """Weight each sample's loss by 1/sqrt(SNR) of its timestep, undoing the schedule's bias to low noise."""
    loss_type: LossType = "l2"
    """l2 (squared error), or huber / smooth_l1 (kohya's pseudo-Huber: like l2 below the threshold, like the
    absolute error above it, so outliers pull less)."""
    huber_schedule: HuberSchedule = "snr"
    """How the Huber threshold changes with the timestep: snr (from 1 towards `huber_c` as noise grows),
    exponential, or constant (`huber_c` throughout)."""
    huber_c: float = 0.1
    """The Huber threshold (its value at the noisiest steps under the snr and exponential schedules)."""

    def __post_init__(self) -> None:
        _check_group(self)
        if not 0.0 < self.huber_c <= 1.0:
            raise UserError(f"config key 'huber_c' must be in (0, 1], got {self.huber_c}")


@dataclass
class SavingConfig:
    """Where the LoRA files go, how often they are written and how many are kept."""

    output_dir: Path = Path("output")
    """Folder for the LoRA files."""
    output_name: str = "lora"
    """File stem: `name.safetensors` at the end, `name-e0003.safetensors` / `name-s000500.safetensors` on the way."""
    save_every_n_epochs: int | None = None
    """Also save after every N epochs."""
    save_every_n_steps: int | None = None
    """Also save after every N optimizer steps."""
    keep_last_n_saves: int | None = None
    """Keep only the newest N files saved on the way (by epoch, by step or on request) and delete the older
    ones with their state; the final file always stays. None keeps them all."""
    save_state: bool = False
    """With each save, also write the optimizer/scheduler/RNG state so `resume` can continue."""
    save_precision: SavePrecision = "float"
    """Tensor type of the saved files: float (fp32), or fp16/bf16 (half the size, as LoRAs are usually shared)."""
    save_diffusers_format: bool = False
    """Also write the diffusers/peft layout (`name.diffusers.safetensors`)."""
    resume: Path | None = None
    """A state folder written by `save_state`: continue that run exactly."""

    def __post_init__(self) -> None:
        _check_group(self)
        if not _is_plain_file_name(self.output_name):
            raise UserError(f"output_name {self.output_name!r} must be a plain file name (no folders, no '..')")
        if not tag_can_name(self.output_name):
            raise UserError(f"output_name {self.output_name!r} has ':', '<' or '>' in it: a <lora:name:weight> "
                            "prompt tag could not name the LoRA; choose another name")


@dataclass
class LoggingConfig:
    """TensorBoard logs."""

    logging_dir: Path | None = Path("logs")
    """TensorBoard logs go to a subfolder per run; None turns logging off."""
    log_every_n_steps: int = 10
    """How often the loss is read back from the device and logged."""
    validate_every_n_steps: int | None = None
    """With held-out images: measure the validation loss every N steps (default: 20 times a run), before the
    first step and at every save, with fixed noise and timesteps so that the values compare."""

    def __post_init__(self) -> None:
        _check_group(self)


@dataclass
class SamplingConfig:
    """Sample images rendered during training."""

    sample_every_n_steps: int | None = None
    """Render the sample prompts with the LoRA as trained so far every N steps (and at the end), into
    `output_dir/samples` and TensorBoard."""
    sample_prompts: list[str] = field(default_factory=list, metadata={"commas_are_text": True})
    """Prompts for the sample images: a list, or one string for one prompt (commas are part of a prompt)."""
    sample_prompts_file: Path | None = None
    """A text file of more sample prompts, one a line; a prompt may end in kohya's options: `--n` negative
    prompt, `--w`/`--h` size, `--s` steps, `--d` seed, `--l` CFG scale (inline prompts take them too)."""
    sample_at_first: bool = False
    """Also render the samples before the first step (the base model, or the `init_lora_weights` start)."""
    sample_steps: int = 20
    """Sampler steps for sample images."""
    sample_seed: int = 1
    """Seed of every sample image, so they are comparable across steps."""
    sample_cfg_scale: float = 7.0
    """Classifier-free guidance scale of the sample images."""

    def __post_init__(self) -> None:
        _check_group(self)


GROUPS: dict[str, type] = {"dataset": DatasetConfig, "model": ModelConfig, "network": NetworkConfig,
                           "optimizer": OptimizerConfig, "training": TrainingConfig, "loss": LossConfig,
                           "saving": SavingConfig, "logging": LoggingConfig, "sampling": SamplingConfig}
GROUP_TITLES = {"dataset": "Dataset", "model": "Model", "network": "Network", "optimizer": "Optimizer",
                "training": "Training", "loss": "Loss and noise", "saving": "Saving", "logging": "Logging",
                "sampling": "Sampling"}
FIELD_GROUPS: dict[str, str] = {f.name: group for group, group_type in GROUPS.items()
                                for f in dataclasses.fields(group_type)}
"""Which group each config key belongs to (key names are unique across the groups)."""


@dataclass
class TrainConfig:
    """Everything one training run needs, in groups. Paths may be relative to the directory the run starts in.

    Build one from flat keys or group sections with `config_from_dict`; change one with `updated`."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    saving: SavingConfig = field(default_factory=SavingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        dataset, network = self.dataset, self.network
        if dataset.resolution % dataset.bucket_step:
            raise UserError(f"resolution {dataset.resolution} must be a multiple of bucket_step {dataset.bucket_step}")
        if not network.target_modules and not network.effective_conv_rank and not network.train_text_encoder:
            raise UserError("nothing to train: target_modules is empty, conv_rank is 0 and train_text_encoder is off")
        if network.network_type in ("loha", "lokr") and (self.optimizer.loraplus_lr_ratio or
                                                         self.optimizer.scale_weight_norms):
            raise UserError(f"loraplus_lr_ratio and scale_weight_norms work on up/down matrices, which a "
                            f"{network.network_type} network does not have: use them with lora, locon or dora")
        if network.network_type == "dora" and self.optimizer.scale_weight_norms:
            raise UserError("scale_weight_norms scales the LoRA's up/down matrices, which under dora does not scale "
                            "its weight change: use it with lora or locon")
        if self.model.fp8_base and network.network_type == "dora":
            raise UserError("dora reads the UNet's own weights, which fp8_base stores in fp8: use another "
                            "network_type, or turn fp8_base off")
        if network.dim_from_weights and network.init_lora_weights is None:
            raise UserError("dim_from_weights takes the network's shape from init_lora_weights: set that to a "
                            "LoRA file")
        if self.saving.save_diffusers_format and network.network_type in ("loha", "lokr", "dora"):
            raise UserError(f"save_diffusers_format writes plain LoRA only; a {network.network_type} network is "
                            "saved in the kohya/LyCORIS layout, which is what the WebUI, ComfyUI and Forge read: "
                            "turn off save_diffusers_format")
        if dataset.cache_text_encoder_outputs and (network.train_text_encoder or self._shuffles_captions):
            raise UserError("cache_text_encoder_outputs needs a frozen text encoder and fixed captions: "
                            "turn off train_text_encoder and shuffle_caption, or turn off the cache")
        if dataset.cache_text_encoder_outputs_to_disk and not self.uses_text_encoder_cache:
            raise UserError("cache_text_encoder_outputs_to_disk needs the text-encoder cache, which needs a frozen "
                            "text encoder and fixed captions: turn off train_text_encoder and shuffle_caption (and "
                            "leave cache_text_encoder_outputs on), or turn off cache_text_encoder_outputs_to_disk")

    @property
    def uses_text_encoder_cache(self) -> bool:
        """Whether caption encodings are computed once up front."""
        if self.dataset.cache_text_encoder_outputs is not None:
            return self.dataset.cache_text_encoder_outputs
        return not self.network.train_text_encoder and not self._shuffles_captions

    @property
    def _shuffles_captions(self) -> bool:
        return self.dataset.shuffle_caption or any(subset.shuffle_caption for subset in self.dataset.subsets)

    def flat(self) -> dict[str, Any]:
        """Every key's value by its flat name."""
        return {f.name: getattr(getattr(self, group), f.name)
                for group in GROUPS for f in dataclasses.fields(getattr(self, group))}

    def updated(self, **changes: Any) -> TrainConfig:
        """A validated copy with the flat keys in `changes` set."""
        return config_from_dict({**self.flat(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready values, one section per group (paths as strings)."""
        return {group: {f.name: _plain(getattr(getattr(self, group), f.name))
                        for f in dataclasses.fields(getattr(self, group))} for group in GROUPS}


def warmup_steps_for(warmup_steps: int | float, total_steps: int) -> int:
    """The warmup in optimizer steps for a run of `total_steps`: `warmup_steps` itself, or below 1 that share of
    the run."""
    if isinstance(warmup_steps, float) and warmup_steps < 1:
        return round(warmup_steps * total_steps)
    return int(warmup_steps)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None,
                notes: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults when `path` is None) and apply `overrides`; a note for each
    kohya spelling of a key goes to `notes`."""
    values = flat_config_values(read_config_file(path), notes=notes)
    values.update(flat_config_values(overrides or {}, notes=notes))
    return config_from_dict(values)


def read_config_file(path: Path | None) -> dict[str, Any]:
    """The mapping a YAML config file holds, as written (empty for None)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(_config_text(path))
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {error}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"config file {path} must be a mapping of keys to values")
    return loaded or {}


def _config_text(path: Path) -> str:
    """The file's text: UTF-8 (with or without a byte-order mark), or UTF-16 with one (Windows Notepad's
    "Unicode"); anything else is an error that says to save the file as UTF-8."""
    data = path.read_bytes()
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise UserError(f"config file {path} is not UTF-8 text (byte {data[error.start]:#04x} at position "
                        f"{error.start}); save it with the encoding UTF-8 and try again") from None


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a `TrainConfig` from flat keys, group sections or `group.key` keys, rejecting unknown keys with
    the closest valid one."""
    by_group: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    for name, value in flat_config_values(values).items():
        by_group[FIELD_GROUPS[name]][name] = value
    return TrainConfig(**{group: GROUPS[group](**items) for group, items in by_group.items()})


def dataclass_from_dict(cls: type[Typed], values: Any, where: str) -> Typed:
    """`cls` (a dataclass) from the mapping `values` of its field names, nested dataclasses from nested mappings,
    each value checked against its declared type; errors name `where` and the key, as config errors do."""
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            hint = _closest(str(key), known)
            raise UserError(f"{where}: unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "")
                            + f"; its keys: {', '.join(sorted(known))}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            checked[key] = dataclass_from_dict(annotation, value, f"{where}.{key}")
            continue
        coerced = _coerce(value, annotation)
        if coerced is _INVALID:
            raise UserError(f"{where}: key '{key}' should be {_describe(annotation)}, got {value!r}")
        checked[key] = coerced
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in checked
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{where} needs the key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return cls(**checked)


def flat_config_values(values: dict[str, Any], groups: dict[str, type] | None = None,
                       notes: list[str] | None = None) -> dict[str, Any]:
    """The same settings keyed by their flat names; a key given twice, or one that no group has, is an error.
    `groups` (section name -> dataclass) describes the config (default: `TrainConfig`'s). A note for each kohya
    spelling (`network_dim`) goes to `notes`."""
    groups = groups or GROUPS
    field_groups = {f.name: group for group, group_type in groups.items() for f in dataclasses.fields(group_type)}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        group, _, name = str(key).rpartition(".")
        if not group and key in groups and (isinstance(value, dict) or value is None):
            for name, item in (value or {}).items():
                _put(flat, _known_key(str(name), key, field_groups, notes), item, field_groups)
        else:
            _put(flat, _known_key(name, group or None, field_groups, notes), value, field_groups)
    return flat


def _known_key(name: str, section: str | None, field_groups: dict[str, str], notes: list[str] | None = None) -> str:
    if name in KOHYA_ALIASES and name not in field_groups and KOHYA_ALIASES[name] in field_groups:
        ours = KOHYA_ALIASES[name]
        if notes is not None:
            notes.append(f"'{name}' is kohya's name for '{ours}' (in section '{field_groups[ours]}'); read as {ours}")
        name = ours
    if name in FLAT_ALIASES and FLAT_ALIASES[name] in field_groups:
        name = FLAT_ALIASES[name]
    sections = list(dict.fromkeys(field_groups.values()))
    if name in field_groups and (section is None or field_groups[name] == section):
        return name
    if section is not None and section not in sections:
        raise UserError(f"unknown config section '{section}'; the sections are {', '.join(sections)}")
    if section is not None and name in field_groups:
        raise UserError(f"config key '{name}' belongs in section '{field_groups[name]}', not '{section}'")
    if name in sections:
        raise UserError(f"config section '{name}' must be a mapping of its keys")
    candidates = set(field_groups) if section is None else {n for n, g in field_groups.items() if g == section}
    hint = _closest(name, candidates)
    where = f" in section '{section}'" if section else ""
    raise UserError(f"unknown config key '{name}'{where}" + (f" (did you mean '{hint}'?)" if hint else "")
                    + f"; valid keys: {', '.join(sorted(candidates))}")


def _put(flat: dict[str, Any], name: str, value: Any, field_groups: dict[str, str]) -> None:
    if name in flat:
        raise UserError(f"config key '{name}' is given twice (once flat, once under '{field_groups[name]}')")
    flat[name] = value


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the config as YAML that `load_config` reads back to an equal config."""
    from lora_trainer.files import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))


def parse_overrides(arguments: list[str]) -> dict[str, Any]:
    """Turn `--key value` / `--key=value` / `--group.key value` command-line words into typed overrides
    (values parsed as YAML)."""
    overrides: dict[str, Any] = {}
    words = list(arguments)
    while words:
        word = words.pop(0)
        if not word.startswith("--") or len(word) == 2:
            raise UserError(f"expected --key value, got {word!r}")
        key, has_value, text = word[2:].partition("=")
        key = key.replace("-", "_")
        if not has_value:
            if not words or words[0].startswith("--"):
                raise UserError(f"--{key} needs a value")
            text = words.pop(0)
        overrides[key] = yaml.safe_load(text) if text != "" else None
    return overrides


def _subset(number: int, entry: Any) -> SubsetConfig:
    """Subset `number` (counted from 1) of `subsets` as a `SubsetConfig`; errors name the subset and the key."""
    if isinstance(entry, SubsetConfig):
        return entry
    if not isinstance(entry, dict):
        raise UserError(f"dataset subset {number} must be a mapping of its keys (image_dir, repeats, ...), "
                        f"got {entry!r}")
    known = {f.name for f in dataclasses.fields(SubsetConfig)}
    for key in entry:
        if key not in known:
            hint = _closest(str(key), known)
            raise UserError(f"dataset subset {number}: unknown key '{key}'"
                            + (f" (did you mean '{hint}'?)" if hint else "")
                            + f"; its keys: {', '.join(sorted(known))}")
    if "image_dir" not in entry:
        raise UserError(f"dataset subset {number} has no image_dir: say which folder it is")
    try:
        return SubsetConfig(**entry)
    except UserError as error:
        raise UserError(f"dataset subset {number} ({entry['image_dir']}): {error}") from None


def _check_group(group: Any) -> None:
    """Coerce a group's values to their declared types and check each value's range."""
    hints = typing.get_type_hints(type(group))
    for f in dataclasses.fields(group):
        value = getattr(group, f.name)
        if isinstance(value, str) and f.metadata.get("commas_are_text"):
            value = [value]
        coerced = _coerce(value, hints[f.name])
        if coerced is _INVALID:
            raise UserError(f"config key '{f.name}' should be {_describe(hints[f.name])}, got {value!r}")
        setattr(group, f.name, coerced)
        _check_range(f.name, coerced)


def _named_set(names: list[str], sets: dict[str, list[str]]) -> list[str]:
    """`names`, or the layer set it names when it is one set's name."""
    return list(sets[names[0]]) if len(names) == 1 and names[0] in sets else names


def layer_set_name(key: str, names: list[str]) -> str | None:
    """The name of the named layer set (`kohya`, `attention`) that `names` is, for the config key `key`."""
    sets = {"target_modules": UNET_TARGET_SETS, "text_encoder_target_modules": TEXT_ENCODER_TARGET_SETS}.get(key, {})
    return next((name for name, members in sets.items() if members == names), None)


def _check_range(name: str, value: Any) -> None:
    if value is None:
        return
    if name in AT_LEAST_ONE and value < 1:
        raise UserError(f"config key '{name}' must be at least 1, got {value}")
    if name in AT_LEAST_ONE_OR_NONE and value < 1:
        raise UserError(f"config key '{name}' must be at least 1 (or left out), got {value}")
    if name in POSITIVE_OR_NONE and value <= 0:
        raise UserError(f"config key '{name}' must be positive, got {value}")
    if name in ZERO_LEAVES_UNTRAINED and value < 0:
        raise UserError(f"config key '{name}' must be positive, or 0 to leave that part untrained; got {value}")
    if name in PROBABILITIES and not 0.0 <= value < 1.0:
        raise UserError(f"config key '{name}' must be in [0, 1), got {value}")
    if name in NOT_NEGATIVE and value < 0:
        raise UserError(f"config key '{name}' cannot be negative, got {value}")


_INVALID = object()


def _coerce(value: Any, annotation: Any) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            coerced = _coerce(value, option)
            if coerced is not _INVALID:
                return coerced
        return _INVALID
    if origin is Literal:
        return value if value in args else _INVALID
    if origin is dict:
        return value if isinstance(value, dict) and all(isinstance(key, str) for key in value) else _INVALID
    if origin is list:
        if isinstance(value, str):  # "to_q, to_k" on the command line
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            return _INVALID
        items = [_coerce(item, args[0]) for item in value]
        return _INVALID if any(item is _INVALID for item in items) else items
    if annotation is bool:
        return value if isinstance(value, bool) else _INVALID
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                return _INVALID
        return _INVALID
    if annotation is str:
        return value if isinstance(value, str) else _INVALID
    if dataclasses.is_dataclass(annotation):
        return value if isinstance(value, annotation) else _INVALID
    if annotation is Path:
        return Path(value).expanduser() if isinstance(value, (str, Path)) else _INVALID
    raise TypeError(f"unsupported config annotation {annotation}")


def _describe(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if dataclasses.is_dataclass(annotation):
        return "a mapping"
    if origin is dict:
        return "a mapping of names to values"
    return {bool: "true/false", int: "a whole number", float: "a number", str: "a string",
            Path: "a path"}[annotation]


def _key_value(text: Any) -> tuple[str, Any]:
    """kohya's `key=value` optimizer argument, its value read as a Python literal (`0.9,0.99` is a tuple)."""
    import ast

    key, equals, value = str(text).partition("=")
    if not equals or not key.strip():
        raise UserError(f"optimizer_args item {text!r} should be key=value")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key.strip(), value.strip()


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _closest(name: str, candidates: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.75)
    return matches[0] if matches else None


def tag_can_name(name: str) -> bool:
    """Whether a `<lora:name:weight>` prompt tag can name a LoRA called `name` (no ':', '<' or '>')."""
    return not any(character in name for character in ":<>")


def _is_plain_file_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
