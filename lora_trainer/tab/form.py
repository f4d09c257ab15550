"""The training settings as a form: one field per `TrainConfig` key, its label, help and group, and the mapping
between widget values and a validated config. No gradio here but `field_widget`."""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from lora_trainer.config import FIELD_GROUPS, GROUPS, MixedPrecision, SubsetConfig, TrainConfig, config_from_dict
from lora_trainer.config_template import config_field_docs
from lora_trainer.errors import UserError
from lora_trainer.models.base import ModelFamily

FAMILY_RESOLUTION: dict[ModelFamily, int] = {"sd1": 512, "sd2": 768, "sdxl": 1024, "flux": 1024}
FAMILY_LABEL: dict[ModelFamily, str] = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "flux": "Flux"}
FAMILY_SAMPLE_CFG_SCALE: dict[ModelFamily, float] = {"sd1": 7.0, "sd2": 7.0, "sdxl": 7.0, "flux": 1.0}
"""The sample images' guidance scale: Flux-dev is guidance-distilled (Forge gives it its Distilled CFG Scale, 3.5),
and a real CFG above 1 would double each step's cost and overcook its images."""
HOST_OWNED_KEYS = ("base_model", "base_model_config", "output_dir", "device", "clip_skip")
"""Config keys the host decides (its loaded model, its LoRA folder, that model's device, its Clip skip
setting): not in the form."""
SUBSET_COLUMNS = tuple(f.name for f in dataclasses.fields(SubsetConfig))
"""The subsets table's columns: one per `SubsetConfig` key; an empty cell takes the dataset's value."""
MAIN_KEYS = ("output_name", "network_type", "resolution", "lora_rank", "lora_alpha", "unet_lr", "epochs",
             "batch_size", "max_train_steps", "save_every_n_epochs", "keep_last_n_saves", "mixed_precision",
             "cache_latents", "sample_prompts", "sample_every_n_steps")
"""Settings shown outside the Advanced accordion (besides the dataset folder)."""
LABELS = {"train_data_dir": "Dataset folder",
          "subsets": "Subsets: more folders, each with its own repeats and caption options (empty cells take "
                     "the dataset's settings; is_reg: regularisation images)",
          "network_type": "Network type", "lokr_factor": "LoKr factor",
          "lokr_full_matrix": "LoKr full matrix", "resolution": "Resolution (px)",
          "lora_rank": "Rank", "lora_alpha": "Alpha", "unet_lr": "UNet learning rate", "max_train_steps": "Max steps",
          "save_every_n_epochs": "Save every N epochs", "keep_last_n_saves": "Keep the last N saves",
          "sample_prompts": "Sample prompts (one per line)",
          "sample_every_n_steps": "Sample every N steps"}
TAB_HELP = {
    "lora_alpha": "Scale: the LoRA's output is multiplied by Alpha / Rank (8 / 16 = 0.5). Empty: equal to the Rank.",
    "conv_rank": "Rank on the UNet's 3x3 convolutions (resnets, samplers); 0 leaves them alone. Empty: the Rank "
                 "for locon, loha and lokr, 0 for lora and dora.",
    "conv_alpha": "Alpha for the convolution layers. Empty: equal to the Conv rank.",
}
"""Help where the config's own words do not fit the form (the form's defaults differ from the config's)."""

FieldKind = Literal["check", "choice", "int", "text", "number", "optional", "optional_path", "list", "lines",
                    "mapping", "table"]
OPTIONAL_KINDS = ("optional", "optional_path")


def gpu_mixed_precision() -> MixedPrecision:
    """bf16 on a GPU that has it, fp16 on other GPUs, "no" (fp32) without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def default_config(family: ModelFamily | None, mixed_precision: MixedPrecision | None = None) -> TrainConfig:
    """The tab's starting settings for a model family: its native resolution and sample guidance, rank 16 /
    alpha 8, UNet lr 1e-4, 10 epochs of batch 1 saved after each (the last 5 of those kept), cached latents, the
    GPU's mixed precision, no TensorBoard logs, the loss read every step (the chart starts at the first)."""
    family = family or "sd1"
    return config_from_dict(dict(resolution=FAMILY_RESOLUTION[family], sample_cfg_scale=FAMILY_SAMPLE_CFG_SCALE[family],
                                 lora_rank=16, lora_alpha=8.0, unet_lr=1e-4, epochs=10, batch_size=1,
                                 save_every_n_epochs=1, keep_last_n_saves=5, cache_latents=True,
                                 mixed_precision=mixed_precision or gpu_mixed_precision(), logging_dir=None,
                                 log_every_n_steps=1))


@dataclass(frozen=True)
class FormField:
    """How one `TrainConfig` key appears in the tab."""

    name: str
    kind: FieldKind
    """check, choice (dropdown), int (number box) or a text box: text, number (a float), optional (empty is
    None, else YAML), optional_path (empty is None), list (comma-separated), lines (one item per line) or
    mapping (YAML, empty is none), or table (the subsets: a row per folder, a column per option)."""
    label: str
    info: str
    group: str
    """The config group the key is in (`GROUPS`: dataset, model, network, optimizer, ...)."""
    choices: tuple[str, ...] = ()


@functools.cache
def form_fields() -> tuple[FormField, ...]:
    """Every `TrainConfig` key the tab shows (all but `HOST_OWNED_KEYS`), with help from the config's docstrings
    in the form's words."""
    hints = {name: typing.get_type_hints(group_type)[name] for group_type in GROUPS.values()
             for name in typing.get_type_hints(group_type)}
    docs = config_field_docs()
    names = [name for name in FIELD_GROUPS if name not in HOST_OWNED_KEYS]
    labels = {name: LABELS.get(name, name.replace("_", " ").capitalize()) for name in names}
    fields = []
    for name in names:
        choices = get_args(hints[name]) if get_origin(hints[name]) is Literal else ()
        kind = _kind(name, hints[name])
        info = TAB_HELP.get(name) or _in_form_words(docs.get(name, ""), labels, kind in OPTIONAL_KINDS)
        fields.append(FormField(name, kind, labels[name], info, FIELD_GROUPS[name], choices))
    return tuple(fields)


def _in_form_words(doc: str, labels: dict[str, str], optional: bool) -> str:
    """A config docstring as form help: `key` becomes the field's label, code marks go, None is "empty"."""
    text = re.sub(r"`([^`]+)`", lambda match: _short(labels.get(match.group(1), match.group(1))), doc)
    if not optional:
        return text
    text = re.sub(r"(^|[.!?]\s+)None\b", r"\1Empty", text)
    return re.sub(r"\bNone\b", "empty", text)


def _short(label: str) -> str:
    """A label without its parenthesis, to name the field in running text ("Resolution (px)": "Resolution")."""
    return re.sub(r" \(.*\)$", "", label)


def _kind(name: str, annotation: Any) -> FieldKind:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) not in args:  # int | float: a number either way
            return "number"
        return "optional_path" if Path in args else "optional"
    if origin is dict:
        return "mapping"
    if origin is Literal:
        return "choice"
    if origin is list:
        if args[0] is SubsetConfig:
            return "table"
        return "lines" if name == "sample_prompts" else "list"
    return {bool: "check", int: "int", float: "number"}.get(annotation, "text")


def form_values(config: TrainConfig) -> dict[str, Any]:
    """The widget value of every form field for `config`."""
    values = config.flat()
    return {field.name: _to_widget(field, values[field.name]) for field in form_fields()}


def config_from_form(values: dict[str, Any]) -> TrainConfig:
    """A validated `TrainConfig` from widget values (keys missing from `values` keep their defaults)."""
    fields = {field.name: field for field in form_fields()}
    return config_from_dict({name: _from_widget(fields[name], value) for name, value in values.items()})


def field_widget(field: FormField, value: Any, **layout) -> Any:
    """The gradio component that edits `field`, showing `value`."""
    import gradio as gr

    common = dict(label=field.label, info=field.info, elem_id=f"lora_trainer_{field.name}", **layout)
    if field.kind == "check":
        return gr.Checkbox(value=value, **common)
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), value=value, **common)
    if field.kind == "int":
        return gr.Number(value=value, precision=0, **common)
    if field.kind == "table":
        common.pop("info")  # gr.Dataframe has no help line; the label says what the table is
        return gr.Dataframe(value=value or [[""] * len(SUBSET_COLUMNS)], headers=list(SUBSET_COLUMNS),
                            datatype="str", type="array", col_count=(len(SUBSET_COLUMNS), "fixed"),
                            row_count=(1, "dynamic"), interactive=True, **common)
    lines = 3 if field.kind == "lines" else 1
    return gr.Textbox(value=value, lines=lines, max_lines=8 if field.kind == "lines" else 1, **common)


def _subsets_from_rows(rows: Any) -> list[dict[str, Any]]:
    """The subsets table's rows (a list of rows, or a pandas frame from gradio) as `subsets` entries: rows without
    a folder are left out, empty cells too (they take the dataset's value), the others read as YAML values."""
    rows = rows.values.tolist() if hasattr(rows, "values") else rows or []
    subsets = []
    for row in rows:
        cells = {column: str(cell).strip() for column, cell in zip(SUBSET_COLUMNS, row) if str(cell or "").strip()}
        if not cells.get("image_dir"):
            continue
        subsets.append({column: text if column == "image_dir" else _yaml_cell(column, text)
                        for column, text in cells.items()})
    return subsets


def _yaml_cell(column: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"Subsets: {column} {text!r} is not a value") from None


def _to_widget(field: FormField, value: Any) -> Any:
    if field.kind in OPTIONAL_KINDS:
        return "" if value is None else str(value)
    if field.kind == "list":
        return ", ".join(value)
    if field.kind == "lines":
        return "\n".join(value)
    if field.kind == "mapping":
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip() if value else ""
    if field.kind == "table":
        # At least one row: gradio 3 titles the columns of a table updated with no rows 0, 1, 2, ...
        return [["" if getattr(subset, column) is None else str(getattr(subset, column)) for column in SUBSET_COLUMNS]
                for subset in value] or [[""] * len(SUBSET_COLUMNS)]
    return str(value) if field.kind in ("text", "number") else value


def _from_widget(field: FormField, value: Any) -> Any:
    if field.kind in ("check", "choice"):
        return value
    if field.kind == "table":
        return _subsets_from_rows(value)
    if field.kind == "int":
        return int(value) if isinstance(value, float) and value.is_integer() else value
    text = "" if value is None else str(value).strip()
    if field.kind == "lines":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if field.kind == "list":
        return [item.strip() for item in text.split(",") if item.strip()]
    if field.kind == "optional_path" or (field.kind == "optional" and not text):
        return text or None
    if field.kind == "mapping" and not text:
        return {}
    if field.kind in ("optional", "mapping"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise UserError(f"{field.label}: {text!r} is not a value; leave it empty for the default") from None
    return text
