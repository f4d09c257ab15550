"""The config explained: each key's help from the docstrings in `config.py`, and a commented YAML template with
every key, its value and its help, grouped (`lora-trainer init-config`, `train --print-config`)."""

from __future__ import annotations

import ast
import inspect
import textwrap

import yaml

from lora_trainer import config as config_module
from lora_trainer.config import GROUP_TITLES, GROUPS, TrainConfig, layer_set_name


def config_field_docs() -> dict[str, str]:
    """The docstring under each config field, joined into one line."""
    docs = {}
    source = ast.parse(inspect.getsource(config_module))
    group_classes = {group_type.__name__ for group_type in GROUPS.values()}
    for class_node in source.body:
        if not (isinstance(class_node, ast.ClassDef) and class_node.name in group_classes):
            continue
        for field_node, doc_node in zip(class_node.body, class_node.body[1:]):
            if isinstance(field_node, ast.AnnAssign) and isinstance(doc_node, ast.Expr) and \
                    isinstance(doc_node.value, ast.Constant) and isinstance(doc_node.value.value, str):
                docs[field_node.target.id] = " ".join(doc_node.value.value.split())
    return docs


def config_template(config: TrainConfig | None = None) -> str:
    """YAML with every key of `config` (default: the defaults) under its group, each after its help as a
    comment; `load_config` reads it back to an equal config."""
    docs = config_field_docs()
    lines = ["# lora-trainer config: every key with its value and what it does. Keys may also be written flat",
             "# (without their group) or given on the command line: --lora_rank 8 or --network.lora_rank 8.", ""]
    for group, values in (config or TrainConfig()).to_dict().items():
        lines += [f"{group}:  # {GROUP_TITLES[group]}: {inspect.getdoc(GROUPS[group])}"]
        for name, value in values.items():
            value = layer_set_name(name, value) or value  # `kohya`, not the 21 layer names of SD and Flux
            lines += textwrap.wrap(docs.get(name, ""), 110, initial_indent="  # ", subsequent_indent="  # ")
            text = yaml.safe_dump(value, default_flow_style=True, width=1000, allow_unicode=True)
            text = text.removesuffix("...\n").strip()  # a bare scalar is dumped as a document with an end mark
            lines.append(f"  {name}: {text}")
        lines.append("")
    return "\n".join(lines)
