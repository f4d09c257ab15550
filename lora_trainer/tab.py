"""The Train LoRA tab: a dataset with editable captions, settings and presets, a job's live status, a test grid.

Written against `Host` only: the WebUI skin calls `build_tab(A1111Host())`, the tests call it with a fake.
The functions above `build_tab` are the tab's logic and need no gradio. The job itself lives in the
`JobRunner`, not in the page, so a reloaded page shows the run still going. The Test panel renders its
strength x file grid as one more job of that runner: the same queue, progress and Stop as training.
`javascript/lora_trainer.js` clicks the hidden poll button, draws the loss chart and refreshes the WebUI's
Lora cards after a save.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import html
import inspect
import json
import math
import re
import tempfile
import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import yaml

from lora_trainer import config as config_module
from lora_trainer.caption import CaptionOptions, CocaDecoding
from lora_trainer.caption.coca import DECODING_STRATEGIES
from lora_trainer.caption.writer import CAPTION_MODES, read_caption, write_caption
from lora_trainer.config import MixedPrecision, TrainConfig, config_from_dict, load_config, save_config
from lora_trainer.data.images import is_image_file, thumbnail_file
from lora_trainer.data.scan import image_files
from lora_trainer.errors import UserError
from lora_trainer.grid import DEFAULT_STRENGTHS, GridPlan, parse_seeds, parse_strengths
from lora_trainer.host import Host, list_loras
from lora_trainer.jobs import JobRunner, JobStatus
from lora_trainer.models.base import ModelFamily

if TYPE_CHECKING:
    import gradio as gr

FAMILY_RESOLUTION: dict[ModelFamily, int] = {"sd1": 512, "sd2": 768, "sdxl": 1024}
FAMILY_LABEL: dict[ModelFamily, str] = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
HOST_OWNED_KEYS = ("base_model", "base_model_config", "output_dir", "device", "clip_skip")
"""Config keys the host decides (its loaded model, its LoRA folder, that model's device, its Clip skip
setting): not in the form."""
MAIN_KEYS = ("output_name", "resolution", "lora_rank", "lora_alpha", "unet_lr", "epochs", "batch_size",
             "max_train_steps", "save_every_n_epochs", "mixed_precision", "cache_latents", "sample_prompts",
             "sample_every_n_steps")
"""Settings shown outside the Advanced accordion (besides the dataset folder)."""
LABELS = {"train_data_dir": "Dataset folder", "resolution": "Resolution (px)", "lora_rank": "Rank",
          "lora_alpha": "Alpha", "unet_lr": "UNet learning rate", "max_train_steps": "Max steps",
          "save_every_n_epochs": "Save every N epochs", "sample_prompts": "Sample prompts (one per line)",
          "sample_every_n_steps": "Sample every N steps"}
CHART_POINTS = 400
"""At most this many loss points go to the page; longer runs are averaged into this many."""
SAMPLES_SHOWN = 12
PRESET_NAME = re.compile(r"^\w[\w .-]{0,63}$")
NO_CAPTION = "(no caption)"
UNREADABLE_CAPTION = "(caption file is not UTF-8 text)"
THUMBNAILS_DIR = Path(tempfile.gettempdir()) / "lora-trainer-thumbnails"
"""Where the dataset gallery's previews are cached (in the temp folder, which gradio serves files from)."""
"""As in the WebUI's seed box: a random seed, drawn once so that every cell of the grid shares it."""

FieldKind = Literal["check", "choice", "int", "text", "number", "optional", "optional_path", "list", "lines"]


# --- dataset and captions ---------------------------------------------------------------------------------------

def dataset_images(folder: str | Path) -> list[tuple[Path, str | None]]:
    """The images below `folder`, in training order, with their captions ("" without one, None if unreadable)."""
    entries: list[tuple[Path, str | None]] = []
    for image in image_files(_dataset_folder(folder)):
        try:
            entries.append((image, read_caption(image)))
        except UnicodeDecodeError:
            entries.append((image, None))
    return entries


def caption_options(model: str, mode: str, prefix: str, arch: str, weights: str, decoding: str, max_tokens: float,
                    repetition_penalty: float) -> CaptionOptions:
    """The captioning job's options from the tab's fields (blank architecture or weights: the defaults)."""
    max_tokens = int(max_tokens)
    return CaptionOptions(
        model=model, mode=mode, prefix=prefix, arch=arch.strip() or None, pretrained=weights.strip() or None,
        decoding=CocaDecoding(strategy=decoding, max_tokens=max_tokens,
                              min_tokens=min(CocaDecoding.min_tokens, max_tokens),
                              repetition_penalty=float(repetition_penalty)))


def save_caption(folder: str | Path, image: str | Path, caption: str) -> Path:
    """Write `caption` beside `image` atomically; `image` must be an image file below `folder`."""
    image = Path(image).resolve()
    if not (image.is_relative_to(_dataset_folder(folder)) and is_image_file(image) and image.is_file()):
        raise UserError(f"{image} is not an image of the dataset folder {folder}. Pick an image in the gallery.")
    return write_caption(image, caption.strip())


def _dataset_folder(folder: str | Path) -> Path:
    if not str(folder).strip():
        raise UserError("Enter the dataset folder: the folder that holds the training images.")
    path = Path(str(folder).strip()).expanduser()
    if not path.is_dir():
        raise UserError(f"Dataset folder {path} does not exist or is not a folder. Check the path.")
    return path.resolve()


def _dataset_summary(entries: list[tuple[Path, str | None]]) -> str:
    missing = sum(1 for _, caption in entries if not caption)
    return f"{len(entries)} images, {missing} without a caption." if entries else "No images in this folder."


# --- settings ---------------------------------------------------------------------------------------------------

def gpu_mixed_precision() -> MixedPrecision:
    """bf16 on a GPU that has it, fp16 on other GPUs, "no" (fp32) without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def default_config(family: ModelFamily | None, mixed_precision: MixedPrecision | None = None) -> TrainConfig:
    """The tab's starting settings for a model family: its native resolution, rank 16 / alpha 8, UNet lr 1e-4,
    10 epochs of batch 1 saved after each, cached latents, the GPU's mixed precision, no TensorBoard logs."""
    return TrainConfig(resolution=FAMILY_RESOLUTION[family or "sd1"], lora_rank=16, lora_alpha=8.0, unet_lr=1e-4,
                       epochs=10, batch_size=1, save_every_n_epochs=1, cache_latents=True,
                       mixed_precision=mixed_precision or gpu_mixed_precision(), logging_dir=None)


@dataclass(frozen=True)
class FormField:
    """How one `TrainConfig` key appears in the tab."""

    name: str
    kind: FieldKind
    """check, choice (dropdown), int (number box) or a text box: text, number (a float), optional (empty is
    None, else YAML), optional_path (empty is None), list (comma-separated) or lines (one item per line)."""
    label: str
    info: str
    choices: tuple[str, ...] = ()


@functools.cache
def form_fields() -> tuple[FormField, ...]:
    """Every `TrainConfig` key the tab shows (all but `HOST_OWNED_KEYS`), documented by the config's docstrings."""
    hints = typing.get_type_hints(TrainConfig)
    docs = config_field_docs()
    fields = []
    for name in (f.name for f in dataclasses.fields(TrainConfig) if f.name not in HOST_OWNED_KEYS):
        choices = get_args(hints[name]) if get_origin(hints[name]) is Literal else ()
        label = LABELS.get(name, name.replace("_", " ").capitalize())
        fields.append(FormField(name, _kind(name, hints[name]), label, docs.get(name, ""), choices))
    return tuple(fields)


def config_field_docs() -> dict[str, str]:
    """The docstring under each `TrainConfig` field, joined into one line."""
    source = ast.parse(inspect.getsource(config_module))
    body = next(node for node in source.body if isinstance(node, ast.ClassDef) and node.name == "TrainConfig").body
    docs = {}
    for field_node, doc_node in zip(body, body[1:]):
        if isinstance(field_node, ast.AnnAssign) and isinstance(doc_node, ast.Expr) and \
                isinstance(doc_node.value, ast.Constant) and isinstance(doc_node.value.value, str):
            docs[field_node.target.id] = " ".join(doc_node.value.value.split())
    return docs


def _kind(name: str, annotation: Any) -> FieldKind:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return "optional_path" if Path in args else "optional"
    if origin is Literal:
        return "choice"
    if origin is list:
        return "lines" if name == "sample_prompts" else "list"
    return {bool: "check", int: "int", float: "number"}.get(annotation, "text")


def form_values(config: TrainConfig) -> dict[str, Any]:
    """The widget value of every form field for `config`."""
    return {field.name: _to_widget(field, getattr(config, field.name)) for field in form_fields()}


def config_from_form(values: dict[str, Any]) -> TrainConfig:
    """A validated `TrainConfig` from widget values (keys missing from `values` keep their defaults)."""
    fields = {field.name: field for field in form_fields()}
    return config_from_dict({name: _from_widget(fields[name], value) for name, value in values.items()})


def _to_widget(field: FormField, value: Any) -> Any:
    if field.kind in ("optional", "optional_path"):
        return "" if value is None else str(value)
    if field.kind == "list":
        return ", ".join(value)
    if field.kind == "lines":
        return "\n".join(value)
    return str(value) if field.kind in ("text", "number") else value


def _from_widget(field: FormField, value: Any) -> Any:
    if field.kind in ("check", "choice"):
        return value
    if field.kind == "int":
        return int(value) if isinstance(value, float) and value.is_integer() else value
    text = "" if value is None else str(value).strip()
    if field.kind == "lines":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if field.kind == "list":
        return [item.strip() for item in text.split(",") if item.strip()]
    if field.kind == "optional_path" or (field.kind == "optional" and not text):
        return text or None
    if field.kind == "optional":
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise UserError(f"{field.label}: {text!r} is not a value; leave it empty for the default") from None
    return text


# --- presets ----------------------------------------------------------------------------------------------------

def preset_names(folder: Path) -> list[str]:
    """Names of the presets (YAML configs) in `folder`, sorted."""
    return sorted(path.stem for path in Path(folder).glob("*.yaml")) if Path(folder).is_dir() else []


def save_preset(folder: Path, name: str, config: TrainConfig, overwrite: bool = False) -> Path:
    """Save `config` as `folder/name.yaml`, the YAML the CLI reads; an existing preset only with `overwrite`."""
    path = _preset_path(folder, name)
    if path.exists() and not overwrite:
        raise UserError(f"A preset named {path.stem!r} exists. Tick 'Overwrite' to replace it, or pick another name.")
    save_config(config, path)
    return path


def load_preset(folder: Path, name: str) -> TrainConfig:
    """The config saved as preset `name`."""
    path = _preset_path(folder, name)
    if not path.is_file():
        raise UserError(f"There is no preset named {name!r} in {folder}.")
    return load_config(path)


def _preset_path(folder: Path, name: str) -> Path:
    name = (name or "").strip()
    if not PRESET_NAME.match(name) or name.endswith("."):
        raise UserError(f"Preset name {name!r} is not usable: use letters, digits, spaces, '-', '_' and '.', "
                        "starting with a letter or digit (at most 64 characters).")
    return Path(folder) / f"{name}.yaml"


# --- status view ------------------------------------------------------------------------------------------------

def chart_points(losses: list[tuple[int, float]], limit: int = CHART_POINTS) -> list[tuple[int, float]]:
    """`losses` as at most `limit` (step, loss) points: consecutive runs averaged, each at its last step."""
    if len(losses) <= limit:
        return list(losses)
    size = -(-len(losses) // limit)
    chunks = [losses[start:start + size] for start in range(0, len(losses), size)]
    return [(chunk[-1][0], sum(loss for _, loss in chunk) / len(chunk)) for chunk in chunks]


def chart_json(status: JobStatus, refresh_lora_cards: bool) -> str:
    """What the page's script needs: the loss points, the saved file names, the job state, and whether it may
    refresh the host's Lora cards when a file is saved."""
    return json.dumps({"losses": chart_points(status.losses), "saved": [path.name for path in status.saved],
                       "state": status.state, "refresh_lora_cards": refresh_lora_cards})


def status_html(status: JobStatus) -> str:
    """The job's state, progress bar, speed, ETA, memory and latest message, as HTML."""
    if status.state == "idle":
        return '<div class="lora-trainer-status">No job has run yet.</div>'
    lines = [f'<div class="lora-trainer-status-title">{html.escape(status.kind.capitalize())}: {status.state}</div>']
    if status.total_steps:
        percent = min(100.0, 100.0 * status.step / status.total_steps)
        lines.append(f'<div class="lora-trainer-bar"><div style="width: {percent:.1f}%"></div></div>')
        lines.append(f'<div class="lora-trainer-details">{html.escape(" · ".join(_progress_details(status)))}</div>')
    if status.message:
        css_class = "lora-trainer-message lora-trainer-error" if status.state == "failed" else "lora-trainer-message"
        lines.append(f'<div class="{css_class}">{html.escape(status.message)}</div>')
    return f'<div class="lora-trainer-status lora-trainer-{status.state}">{"".join(lines)}</div>'


def _progress_details(status: JobStatus) -> list[str]:
    if status.kind != "training":
        return [f"{status.step}/{status.total_steps}"]
    details = [f"Step {status.step}/{status.total_steps}", f"epoch {status.epoch}"]
    if status.losses:
        details.append(f"loss {status.losses[-1][1]:.4f}")
    if status.steps_per_second:
        details.append(f"{status.steps_per_second:.2f} it/s, {status.samples_per_second:.1f} samples/s")
    if status.running and status.seconds_left:
        details.append(f"ETA {format_duration(status.seconds_left)}")
    if status.memory:
        details.append(status.memory)
    return details


def format_duration(seconds: float) -> str:
    """"m:ss", or "h:mm:ss" from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def saved_html(status: JobStatus, cards_refreshed: bool) -> str:
    """The files the job saved, newest last; when the page cannot refresh the Lora cards, how to see them."""
    if not status.saved:
        return '<div class="lora-trainer-saved">No file saved yet.</div>'
    items = "".join(f'<li><code>{html.escape(path.name)}</code> <span>{html.escape(str(path.parent))}</span></li>'
                    for path in status.saved)
    note = "" if cards_refreshed else (
        "<p>They work in prompts now. Their cards appear after the Lora tab's Refresh, which also selects the "
        "--ckpt checkpoint again (a WebUI quirk): the tab does not press it for you.</p>")
    return f'<div class="lora-trainer-saved">Saved:<ul>{items}</ul>{note}</div>'


def _notice(text: str, error: bool = False) -> str:
    css_class = "lora-trainer-notice lora-trainer-error" if error else "lora-trainer-notice"
    return f'<div class="{css_class}">{html.escape(text)}</div>'


# --- test grid --------------------------------------------------------------------------------------------------

def default_grid_prompt(trigger_word: str, folder: str | Path | None) -> str:
    """The trigger word and the first caption of the dataset in `folder` ("sks, a red bike"): the caption alone
    when it holds the trigger word already, the trigger word alone when no caption can be read."""
    trigger = trigger_word.strip()
    caption = _first_caption(folder)
    if not caption or (trigger and re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption)):
        return caption or trigger
    return f"{trigger}, {caption}" if trigger else caption


def _first_caption(folder: str | Path | None) -> str:
    try:
        images = image_files(_dataset_folder(folder or ""))
    except UserError:
        return ""
    for image in images:
        try:
            caption = read_caption(image)
        except UnicodeDecodeError:
            continue
        if caption:
            return caption
    return ""


def lora_choices(host: Host) -> list[str]:
    """The LoRA files of the host's folder as the grid's file picker names them (relative paths), newest first."""
    return list(_lora_names(host).values())


def last_run_choices(host: Host, saved: list[Path]) -> list[str]:
    """The file picker's names for `saved` (the last run's files, in saving order) still in the host's folder."""
    names = _lora_names(host)
    return [names[path.resolve()] for path in map(Path, saved) if path.resolve() in names]


def _lora_names(host: Host) -> dict[Path, str]:
    lora_dir = Path(host.lora_dir()).resolve()
    return {path.resolve(): path.resolve().relative_to(lora_dir).as_posix() for path in list_loras(host)}


def grid_plan_from_form(host: Host, prompt: str, negative_prompt: str, files: list[str], strengths: str,
                        seeds: str, sampler_name: str, steps: Any, cfg_scale: Any, width: Any,
                        height: Any) -> GridPlan:
    """The grid the Test panel asks for: `files` are names from `lora_choices`, the rest widget values."""
    if not str(prompt or "").strip():
        raise UserError("Enter a prompt for the grid, e.g. the trigger word and a caption of the dataset.")
    if not files:
        raise UserError("Pick at least one LoRA file to compare.")
    lora_dir = Path(host.lora_dir()).resolve()
    loras = []
    for name in files:
        path = (lora_dir / name).resolve()
        if not (path.is_relative_to(lora_dir) and path.is_file()):
            raise UserError(f"There is no LoRA file {name!r} in {lora_dir}: refresh the list of files and pick "
                            "again.")
        loras.append(path)
    try:
        cfg = float(cfg_scale)
    except (TypeError, ValueError):
        cfg = math.nan
    if not math.isfinite(cfg) or cfg < 0:
        raise UserError(f"CFG scale {cfg_scale!r} is not usable: enter a number such as 7.")
    return GridPlan(prompt=prompt.strip(), loras=loras, strengths=parse_strengths(strengths),
                    seeds=parse_seeds(seeds), negative_prompt=(negative_prompt or "").strip(),
                    steps=_whole_number(steps, "Steps", 1), cfg_scale=cfg, width=_image_side(width, "Width"),
                    height=_image_side(height, "Height"), sampler_name=(sampler_name or "").strip())


def _whole_number(value: Any, label: str, minimum: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"{label} must be a whole number of at least {minimum}, not {value!r}.")
    return value


def _image_side(value: Any, label: str) -> int:
    side = _whole_number(value, label, 8)
    if side % 8:
        raise UserError(f"{label} must be a multiple of 8 pixels (e.g. 512), not {side}.")
    return side


def grid_cell_captions(plan: GridPlan) -> list[str]:
    """A caption per cell of `plan`'s grid, row by row: the row's file (or seed) and the column's strength."""
    return [f"{label}, strength {strength:g}" for *_, label in plan.rows() for strength in plan.strengths]


# --- the tab ----------------------------------------------------------------------------------------------------

def build_tab(host: Host, runner: JobRunner | None = None, presets_dir: Path | None = None) -> gr.Blocks:
    """The whole Train LoRA tab as a `gr.Blocks` (gradio 3.41 and 4), driving `runner` on `host`.

    The host should pass one long-lived `runner`: a page (or a rebuilt UI) then finds the running job.
    Presets go to `presets_dir`, by default `lora_trainer_presets` beside the host's LoRA folder.
    """
    import gradio as gr

    runner = runner or JobRunner(host)
    presets_dir = Path(presets_dir or Path(host.lora_dir()).parent / "lora_trainer_presets")
    fields = form_fields()
    initial = form_values(replace(default_config(host.model_family()), train_data_dir=host.datasets_dir()))
    components: dict[str, Any] = {}

    def field_component(field: FormField, **layout) -> Any:
        common = dict(label=field.label, info=field.info, elem_id=f"lora_trainer_{field.name}", **layout)
        value = initial[field.name]
        if field.kind == "check":
            component = gr.Checkbox(value=value, **common)
        elif field.kind == "choice":
            component = gr.Dropdown(choices=list(field.choices), value=value, **common)
        elif field.kind == "int":
            component = gr.Number(value=value, precision=0, **common)
        else:
            lines = 3 if field.kind == "lines" else 1
            component = gr.Textbox(value=value, lines=lines, max_lines=8 if field.kind == "lines" else 1, **common)
        components[field.name] = component
        return component

    by_name = {field.name: field for field in fields}
    txt2img_defaults = host.render_defaults()
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Column(elem_id="lora_trainer_tab"):
            model_note = gr.HTML(elem_id="lora_trainer_model_note")
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### Dataset")
                    folder = field_component(by_name["train_data_dir"])
                    load_button = gr.Button("Load the images", size="sm", elem_id="lora_trainer_load_dataset")
                    dataset_info = gr.HTML(elem_id="lora_trainer_dataset_info")
                    dataset_gallery = gr.Gallery(label="Images and captions: click one to edit its caption",
                                                 columns=6, height=360, allow_preview=False,
                                                 elem_id="lora_trainer_dataset_gallery")
                    with gr.Row():
                        selected_image = gr.Textbox(label="Image", interactive=False, max_lines=1, scale=2,
                                                    elem_id="lora_trainer_selected_image")
                        caption_box = gr.Textbox(label="Caption", lines=2, scale=5, elem_id="lora_trainer_caption")
                    save_caption_button = gr.Button("Save caption", elem_id="lora_trainer_save_caption")
                    with gr.Accordion("Caption the images automatically", open=False,
                                      elem_id="lora_trainer_captioning"):
                        with gr.Row():
                            captioner = gr.Radio(["coca", "clip-tags"], value="coca", label="Captioner",
                                                 info="coca writes a sentence, clip-tags ranks tag phrases",
                                                 elem_id="lora_trainer_captioner")
                            caption_mode = gr.Radio(list(CAPTION_MODES), value="skip",
                                                    label="Images that already have a caption",
                                                    elem_id="lora_trainer_caption_mode")
                        caption_prefix = gr.Textbox(label="Prefix", info="Put first in every new caption, e.g. "
                                                    "the trigger word", elem_id="lora_trainer_caption_prefix")
                        with gr.Row():
                            caption_decoding = gr.Radio(list(DECODING_STRATEGIES), value=CocaDecoding.strategy,
                                                        label="coca decoding", info="beam: the likeliest sentence; "
                                                        "sample: varied ones", elem_id="lora_trainer_caption_decoding")
                            caption_max_tokens = gr.Slider(1, 77, value=CocaDecoding.max_tokens, step=1,
                                                           label="coca max length (tokens)",
                                                           elem_id="lora_trainer_caption_max_tokens")
                            caption_repetition = gr.Number(value=CocaDecoding.repetition_penalty,
                                                           label="coca repetition penalty",
                                                           info="above 1 avoids repeated words",
                                                           elem_id="lora_trainer_caption_repetition")
                        with gr.Row():
                            caption_arch = gr.Textbox(label="open_clip architecture", placeholder="the captioner's "
                                                      "default", elem_id="lora_trainer_caption_arch")
                            caption_weights = gr.Textbox(label="Weights: a file or an open_clip pretrained tag",
                                                         placeholder="the captioner's default (downloaded once)",
                                                         elem_id="lora_trainer_caption_weights")
                        caption_button = gr.Button("Caption", elem_id="lora_trainer_caption_button")
                with gr.Column():
                    gr.Markdown("### Training")
                    with gr.Row():
                        field_component(by_name["output_name"])
                        trigger_word = gr.Textbox(label="Trigger word", info="Saved as the LoRA's activation text",
                                                  elem_id="lora_trainer_trigger_word")
                    for row in (("resolution", "lora_rank", "lora_alpha"), ("unet_lr", "epochs", "batch_size"),
                                ("max_train_steps", "save_every_n_epochs", "mixed_precision"),
                                ("sample_prompts",), ("sample_every_n_steps", "cache_latents")):
                        with gr.Row():
                            for name in row:
                                field_component(by_name[name])
                    advanced = [field for field in fields if field.name not in (*MAIN_KEYS, "train_data_dir")]
                    with gr.Accordion("Advanced", open=False, elem_id="lora_trainer_advanced"):
                        for start in range(0, len(advanced), 3):
                            with gr.Row():
                                for field in advanced[start:start + 3]:
                                    field_component(field)
                    with gr.Accordion("Presets", open=False, elem_id="lora_trainer_presets"):
                        with gr.Row():
                            preset_choice = gr.Dropdown(choices=preset_names(presets_dir), label="Preset",
                                                        elem_id="lora_trainer_preset_choice")
                            load_preset_button = gr.Button("Load preset", elem_id="lora_trainer_load_preset")
                        with gr.Row():
                            preset_name = gr.Textbox(label="Save as", elem_id="lora_trainer_preset_name")
                            overwrite_preset = gr.Checkbox(label="Overwrite", value=False,
                                                           elem_id="lora_trainer_preset_overwrite")
                            save_preset_button = gr.Button("Save preset", elem_id="lora_trainer_save_preset")
                    with gr.Row():
                        start_button = gr.Button("Start", variant="primary", elem_id="lora_trainer_start")
                        save_now_button = gr.Button("Save now", interactive=False, elem_id="lora_trainer_save_now")
                        stop_button = gr.Button("Stop", variant="stop", interactive=False,
                                                elem_id="lora_trainer_stop")
                    defaults_button = gr.Button("Defaults for the loaded model", size="sm",
                                                elem_id="lora_trainer_defaults")
                    notice = gr.HTML(elem_id="lora_trainer_notice")
            with gr.Row():
                with gr.Column():
                    status_box = gr.HTML(status_html(JobStatus()), elem_id="lora_trainer_status")
                    gr.HTML('<div class="lora-trainer-chart"></div>', elem_id="lora_trainer_chart")
                    saved_box = gr.HTML(elem_id="lora_trainer_saved")
                with gr.Column():
                    samples_gallery = gr.Gallery(label="Samples, newest first", columns=4, height=320,
                                                 elem_id="lora_trainer_samples")
            with gr.Accordion("Test: compare strengths and epochs in a grid", open=False,
                              elem_id="lora_trainer_test"):
                with gr.Row():
                    with gr.Column(scale=3):
                        grid_prompt = gr.Textbox(label="Prompt", lines=2, info="Default: the trigger word and a "
                                                 "caption of the dataset", elem_id="lora_trainer_grid_prompt")
                        grid_negative = gr.Textbox(label="Negative prompt", lines=1,
                                                   elem_id="lora_trainer_grid_negative")
                        with gr.Row():
                            grid_files = gr.Dropdown(choices=lora_choices(host), value=[], multiselect=True,
                                                     label="LoRA files: one row each", scale=5,
                                                     info="Default: every file saved by the last run",
                                                     elem_id="lora_trainer_grid_files")
                            grid_refresh_button = gr.Button("Refresh", size="sm", scale=0, min_width=80,
                                                            elem_id="lora_trainer_grid_refresh")
                        with gr.Row():
                            grid_strengths = gr.Textbox(DEFAULT_STRENGTHS, label="Strengths: one column each",
                                                        max_lines=1, elem_id="lora_trainer_grid_strengths")
                            grid_seeds = gr.Textbox("1", label="Seeds", max_lines=1, info="The same seed in "
                                                    "every cell; several seeds (with one file) make the rows; "
                                                    "-1: a random one", elem_id="lora_trainer_grid_seeds")
                    with gr.Column(scale=2):
                        with gr.Row():
                            grid_sampler = gr.Textbox(txt2img_defaults.sampler_name, label="Sampler", max_lines=1,
                                                      info="As txt2img names it", elem_id="lora_trainer_grid_sampler")
                            grid_steps = gr.Number(txt2img_defaults.steps, precision=0, label="Steps",
                                                   elem_id="lora_trainer_grid_steps")
                            grid_cfg = gr.Number(txt2img_defaults.cfg_scale, label="CFG scale",
                                                 elem_id="lora_trainer_grid_cfg")
                        with gr.Row():
                            grid_width = gr.Number(txt2img_defaults.width, precision=0, label="Width",
                                                   elem_id="lora_trainer_grid_width")
                            grid_height = gr.Number(txt2img_defaults.height, precision=0, label="Height",
                                                    elem_id="lora_trainer_grid_height")
                        with gr.Row():
                            grid_button = gr.Button("Render the grid", variant="primary",
                                                    elem_id="lora_trainer_grid_button")
                            grid_defaults_button = gr.Button("Defaults from the last run",
                                                             elem_id="lora_trainer_grid_defaults")
                        grid_notice = gr.HTML(elem_id="lora_trainer_grid_notice")
                grid_image = gr.Image(label="Grid (saved with its parameters in the WebUI's grids folder)", type="pil",
                                      interactive=False, height=640, elem_id="lora_trainer_grid_image")
                grid_cells = gr.Gallery(label="Cells: click one to see it large", columns=5, height=480,
                                        elem_id="lora_trainer_grid_cells")
            chart_data = gr.Textbox(visible=False, elem_id="lora_trainer_chart_data")
            poll_button = gr.Button("Poll", visible=False, elem_id="lora_trainer_poll")
            seen = gr.State(None)
            image_paths = gr.State([])
            cell_captions = gr.State([])

        form = [components[field.name] for field in fields]
        dataset_outputs = [dataset_gallery, dataset_info, image_paths]

        def dataset_view(folder_text: str) -> dict:
            if not str(folder_text or "").strip():
                return {dataset_gallery: [], dataset_info: "", image_paths: []}
            try:
                entries = dataset_images(folder_text)
            except UserError as error:
                return {dataset_gallery: [], dataset_info: _notice(str(error), error=True), image_paths: []}
            labels = [UNREADABLE_CAPTION if caption is None else caption or NO_CAPTION for _, caption in entries]
            # Thumbnails: the browser gets a few KB per image instead of the full files.
            previews = [thumbnail_file(path, THUMBNAILS_DIR) for path, _ in entries]
            return {dataset_gallery: [(str(preview), label) for preview, label in zip(previews, labels)],
                    dataset_info: _notice(_dataset_summary(entries)), image_paths: [str(path) for path, _ in entries]}

        def load_dataset(folder_text: str) -> dict:
            return {**dataset_view(folder_text), selected_image: "", caption_box: ""}

        def select_image(paths: list[str], event: gr.SelectData) -> dict:
            path = Path(paths[event.index])
            try:
                caption = read_caption(path)
            except UnicodeDecodeError:
                caption = ""
            return {selected_image: str(path), caption_box: caption}

        # gradio finds the event argument by its type; the string annotation cannot name the local `gr`.
        select_image.__annotations__["event"] = gr.SelectData

        def save_selected_caption(folder_text: str, image: str, caption: str) -> dict:
            try:
                path = save_caption(folder_text, image, caption)
            except UserError as error:
                return {notice: _notice(str(error), error=True)}
            return {**dataset_view(folder_text), notice: _notice(f"Saved {path.name}.")}

        def started(seen_now: dict | None, kind: str) -> dict:
            # What the poll has seen, as if it had seen the job running: the poll then acts on the job's end
            # (refreshes the gallery, fills the Test panel, shows the grid) even when it ends before the next poll.
            return {**(seen_now or {}), "kind": kind, "state": "running"}

        def start_captioning(folder_text: str, model: str, mode: str, prefix: str, arch: str, weights: str,
                             decoding: str, max_tokens: float, repetition_penalty: float,
                             seen_now: dict | None) -> dict:
            try:
                options = caption_options(model, mode, prefix, arch, weights, decoding, max_tokens,
                                          repetition_penalty)
                runner.start_captioning(_dataset_folder(folder_text), options)
            except UserError as error:
                return {notice: _notice(str(error), error=True)}
            return {notice: _notice("Captioning started."), seen: started(seen_now, "captioning")}

        def form_config(values: tuple) -> TrainConfig:
            values_by_name = {field.name: value for field, value in zip(fields, values, strict=True)}
            return replace(config_from_form(values_by_name), output_dir=Path(host.lora_dir()))

        def start_training(seen_now: dict | None, trigger: str, *values) -> dict:
            try:
                config = form_config(values)
                if config.train_data_dir is None:
                    raise UserError("Enter the dataset folder first.")
                preview_prompt = config.sample_prompts[0] if config.sample_prompts else trigger.strip()
                runner.start_training(config, trigger.strip(), preview_prompt)
            except UserError as error:
                return {notice: _notice(str(error), error=True)}
            return {notice: _notice(f"Training {config.output_name} started."), seen: started(seen_now, "training")}

        def save_now() -> dict:
            runner.save_now()
            return {notice: _notice("Saving at the next step.")}

        def stop() -> dict:
            runner.stop()
            kind = runner.status().kind
            if kind == "training":
                return {notice: _notice("Stopping: the weights so far are saved first.")}
            return {notice: _notice(f"Stopping the {kind}.")}

        def save_current_preset(name: str, overwrite: bool, *values) -> dict:
            try:
                path = save_preset(presets_dir, name, form_config(values), overwrite)
            except UserError as error:
                return {notice: _notice(str(error), error=True)}
            return {notice: _notice(f"Saved preset {path}."),
                    preset_choice: gr.update(choices=preset_names(presets_dir), value=path.stem)}

        def load_chosen_preset(name: str) -> dict:
            try:
                loaded = load_preset(presets_dir, name)
            except UserError as error:
                return {notice: _notice(str(error), error=True)}
            values = form_values(loaded)
            return {notice: _notice(f"Loaded preset {name}."),
                    **{components[field.name]: values[field.name] for field in fields}}

        def model_defaults() -> dict:
            family = host.model_family()
            values = form_values(default_config(family))
            return {model_note: _model_note(family),
                    **{components[f.name]: values[f.name] for f in fields if f.name != "train_data_dir"}}

        grid_form = [grid_prompt, grid_negative, grid_files, grid_strengths, grid_seeds, grid_sampler, grid_steps,
                     grid_cfg, grid_width, grid_height]
        grid_defaults_outputs = [grid_prompt, grid_files, grid_sampler, grid_steps, grid_cfg, grid_width, grid_height]

        def grid_defaults(trigger: str, folder_text: str) -> dict:
            txt2img = host.render_defaults()
            last_run = last_run_choices(host, runner.status().saved)
            # Without a last run (or after another job), the files picked so far stay picked.
            files = gr.update(choices=lora_choices(host), value=last_run) if last_run else \
                gr.update(choices=lora_choices(host))
            return {grid_prompt: default_grid_prompt(trigger, folder_text), grid_files: files,
                    grid_sampler: txt2img.sampler_name, grid_steps: txt2img.steps, grid_cfg: txt2img.cfg_scale,
                    grid_width: txt2img.width, grid_height: txt2img.height}

        def refresh_lora_files() -> dict:
            return {grid_files: gr.update(choices=lora_choices(host))}

        def start_grid(seen_now: dict | None, *values) -> dict:
            try:
                plan = grid_plan_from_form(host, *values)
                runner.start_grid(plan)
            except UserError as error:
                return {grid_notice: _notice(str(error), error=True)}
            seeds = ", ".join(map(str, plan.seeds))
            return {grid_notice: _notice(f"Rendering {len(plan.rows())} x {len(plan.strengths)} images with seed "
                                         f"{seeds}: progress above, the grid below when it is done."),
                    cell_captions: grid_cell_captions(plan), seen: started(seen_now, "grid")}

        def page_load(folder_text: str, trigger: str) -> dict:
            family = host.model_family()
            return {**dataset_view(folder_text), model_note: _model_note(family),
                    components["resolution"]: FAMILY_RESOLUTION[family or "sd1"],
                    preset_choice: gr.update(choices=preset_names(presets_dir)), **grid_defaults(trigger, folder_text)}

        def poll(seen_before: dict | None, folder_text: str, trigger: str, captions: list[str]) -> dict:
            status = runner.status()
            seen_now = {"kind": status.kind, "state": status.state, "samples": len(status.samples)}
            refresh_cards = host.can_refresh_lora_cards()
            updates = {status_box: status_html(status), chart_data: chart_json(status, refresh_cards),
                       saved_box: saved_html(status, refresh_cards),
                       start_button: gr.update(interactive=not status.running),
                       caption_button: gr.update(interactive=not status.running),
                       stop_button: gr.update(interactive=status.running),
                       save_now_button: gr.update(interactive=status.running and status.kind == "training"),
                       grid_button: gr.update(interactive=not status.running)}
            if seen_now == seen_before:
                return updates
            updates[seen] = seen_now
            if status.kind == "training":
                newest = status.samples[::-1][:SAMPLES_SHOWN]
                updates[samples_gallery] = [(image, f"step {step}: {prompt}") for step, prompt, image in newest]
            if status.kind == "grid" and not status.running:
                updates[grid_notice] = _notice(status.message, error=status.state == "failed")
            if status.kind == "grid" and status.grid is not None:  # the last grid stays up until a new one is done
                cells = [cell for row in status.grid_cells for cell in row]
                labels = captions if len(captions) == len(cells) else [None] * len(cells)
                updates[grid_image] = status.grid
                updates[grid_cells] = gr.update(value=list(zip(cells, labels)), columns=len(status.grid_cells[0]))
            ended = seen_before is not None and seen_before.get("state") == "running" and not status.running
            if ended and seen_before.get("kind") == "captioning":
                updates.update(dataset_view(folder_text))
            if ended and seen_before.get("kind") == "training":
                updates.update(grid_defaults(trigger, folder_text))
            return updates

        folder_events = dict(fn=load_dataset, inputs=[folder],
                             outputs=[*dataset_outputs, selected_image, caption_box])
        load_button.click(**folder_events)
        folder.submit(**folder_events)
        dataset_gallery.select(select_image, [image_paths], [selected_image, caption_box])
        save_caption_button.click(save_selected_caption, [folder, selected_image, caption_box],
                                  [notice, *dataset_outputs])
        caption_button.click(start_captioning, [folder, captioner, caption_mode, caption_prefix, caption_arch,
                                                caption_weights, caption_decoding, caption_max_tokens,
                                                caption_repetition, seen], [notice, seen])
        start_button.click(start_training, [seen, trigger_word, *form], [notice, seen])
        save_now_button.click(save_now, None, [notice])
        stop_button.click(stop, None, [notice])
        save_preset_button.click(save_current_preset, [preset_name, overwrite_preset, *form],
                                 [notice, preset_choice])
        load_preset_button.click(load_chosen_preset, [preset_choice], [notice, *form]).then(**folder_events)
        defaults_button.click(model_defaults, None, [model_note, *form])
        grid_button.click(start_grid, [seen, *grid_form], [grid_notice, cell_captions, seen])
        grid_defaults_button.click(grid_defaults, [trigger_word, folder], grid_defaults_outputs)
        grid_refresh_button.click(refresh_lora_files, None, [grid_files])
        # Clicked by javascript/lora_trainer.js about once a second. A `load(every=...)` event would hold a
        # queue worker per open page for as long as the page is open.
        poll_button.click(poll, [seen, folder, trigger_word, cell_captions],
                          [status_box, chart_data, saved_box, start_button, caption_button, stop_button,
                           save_now_button, grid_button, seen, samples_gallery, grid_notice, grid_image, grid_cells,
                           *dataset_outputs, *grid_defaults_outputs], queue=False, show_progress="hidden")
        tab.load(page_load, [folder, trigger_word], [*dataset_outputs, model_note, components["resolution"],
                                                     preset_choice, *grid_defaults_outputs], queue=False)
    return tab


def _model_note(family: ModelFamily | None) -> str:
    if family is None:
        return _notice("No model is loaded: load a checkpoint in the WebUI before training.", error=True)
    return _notice(f"Loaded model: {FAMILY_LABEL[family]}. Defaults: {FAMILY_RESOLUTION[family]} px, "
                   "rank 16, alpha 8, UNet learning rate 1e-4, 10 epochs.")
