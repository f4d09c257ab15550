"""Training examples for a language model: reading JSONL/JSON/CSV/text files, checking every record (errors
name the file and line), and turning them into token sequences with labels (prompt tokens masked)."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_trainer.errors import UserError
from lora_trainer.llm.config import DataConfig
from lora_trainer.llm.templates import ROLES, PromptFormat, render_conversation

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
IGNORED_LABEL = -100
"""The label of a token the loss leaves out (transformers' convention)."""
_MAX_REPORTED_ERRORS = 10


@dataclass
class Example:
    """One checked record: raw `text`, or a conversation (`messages` of role/content, ending with a response)."""

    source: str
    """`file:line`, for messages about it."""
    text: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class TokenizedExamples:
    """Token sequences ready for batching, and what happened on the way."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    examples: int = 0
    truncated: int = 0
    dropped: int = 0

    def summary(self, max_seq_length: int) -> str:
        """One line for the run plan."""
        tokens = sum(sum(label != IGNORED_LABEL for label in labels) for labels in self.labels)
        line = f"{self.examples} examples -> {len(self.input_ids)} sequences, {tokens:,} trained tokens"
        if self.truncated or self.dropped:
            line += (f"; longer than max_seq_length {max_seq_length}: {self.truncated} truncated, "
                     f"{self.dropped} dropped")
        return line


def read_examples(path: Path, data_format: str) -> list[Example]:
    """Every record of the file, or of the data files in the folder (sorted, recursively), checked.

    All problems found (up to ten) are raised together in one `UserError`, each with its file and line.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in DATA_SUFFIXES and p.is_file()) \
        if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path} holds no data files ({', '.join(DATA_SUFFIXES)})")
    examples, problems = [], []
    for file in files:
        for source, record in _records(file, problems):
            try:
                examples.append(_example(source, record, data_format))
            except ValueError as problem:
                problems.append(f"{source}: {problem}")
    if problems:
        shown = problems[:_MAX_REPORTED_ERRORS]
        more = f"\n(and {len(problems) - len(shown)} more)" if len(problems) > len(shown) else ""
        raise UserError("the training data has problems; fix these records:\n" + "\n".join(shown) + more)
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, validation): a seeded random `fraction` of the examples held out (at least one when > 0)."""
    if not fraction:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = max(1, round(fraction * len(examples)))
    if count >= len(examples):
        raise UserError(f"validation_split {fraction} leaves no training examples out of {len(examples)}")
    held_out = set(order[:count])
    return ([example for i, example in enumerate(examples) if i not in held_out],
            [example for i, example in enumerate(examples) if i in held_out])


def tokenize_examples(examples: list[Example], tokenizer, prompt_format: PromptFormat,
                      config: DataConfig) -> TokenizedExamples:
    """Raw text is joined (each text ending with EOS) and cut into blocks of max_seq_length; each conversation
    is one sequence (or several are packed into one with `packing`), labelled on its responses only unless
    `train_on_prompt`. Over-long conversations are truncated or dropped as `overlong` says."""
    result = TokenizedExamples(examples=len(examples))
    text_stream: list[int] = []
    conversations: list[tuple[list[int], list[int]]] = []
    for example in examples:
        if example.text is not None:
            text_stream += tokenizer(example.text, add_special_tokens=False)["input_ids"]
            text_stream.append(tokenizer.eos_token_id)
            continue
        input_ids, labels = _tokenize_conversation(example, tokenizer, prompt_format, config.train_on_prompt)
        if len(input_ids) > config.max_seq_length:
            input_ids, labels = input_ids[:config.max_seq_length], labels[:config.max_seq_length]
            if config.overlong == "drop" or all(label == IGNORED_LABEL for label in labels):
                result.dropped += 1
                continue
            result.truncated += 1
        conversations.append((input_ids, labels))
    for start in range(0, len(text_stream), config.max_seq_length):
        block = text_stream[start:start + config.max_seq_length]
        if len(block) > 1:
            result.input_ids.append(block)
            result.labels.append(list(block))
    if config.packing:
        conversations = _packed(conversations, config.max_seq_length)
    for input_ids, labels in conversations:
        result.input_ids.append(input_ids)
        result.labels.append(labels)
    return result


def collate(input_ids: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, attention_mask and labels (padding is not trained)."""
    length = max(len(ids) for ids in input_ids)
    batch_ids = torch.full((len(input_ids), length), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(input_ids), length), IGNORED_LABEL, dtype=torch.long)
    attention_mask = torch.zeros((len(input_ids), length), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(zip(input_ids, labels)):
        batch_ids[row, :len(ids)] = torch.tensor(ids)
        batch_labels[row, :len(ids)] = torch.tensor(row_labels)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": batch_ids, "attention_mask": attention_mask, "labels": batch_labels}


def _tokenize_conversation(example: Example, tokenizer, prompt_format: PromptFormat,
                           train_on_prompt: bool) -> tuple[list[int], list[int]]:
    try:
        rendered = render_conversation(example.messages, prompt_format, tokenizer)
    except UserError:
        raise
    except Exception as error:  # the chat template's own checks (jinja's raise_exception) and syntax errors
        raise UserError(f"{example.source}: the chat template cannot render this conversation: {error}") from None
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    if train_on_prompt:
        return input_ids, list(input_ids)
    labels = [token if any(start <= token_start < end for start, end in rendered.response_spans)
              else IGNORED_LABEL for token, (token_start, _) in zip(input_ids, encoding["offset_mapping"])]
    return input_ids, labels


def _packed(sequences: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Consecutive sequences joined while they fit in `max_length` tokens."""
    packed: list[tuple[list[int], list[int]]] = []
    for input_ids, labels in sequences:
        if packed and len(packed[-1][0]) + len(input_ids) <= max_length:
            packed[-1][0].extend(input_ids)
            packed[-1][1].extend(labels)
        else:
            packed.append((list(input_ids), list(labels)))
    return packed


def _records(file: Path, problems: list[str]):
    """(source, record) pairs of one file; unreadable parts are added to `problems`."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        problems.append(f"{file}: not UTF-8 text (byte {error.start}); save it as UTF-8")
        return
    suffix = file.suffix.lower()
    if suffix == ".txt":
        if text.strip():
            yield f"{file}:1", {"text": text}
        return
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"{file}:{number}", json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{file}:{number}: not valid JSON ({error.msg} at column {error.colno})")
        return
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            yield f"{file}:{reader.line_num}", {key: value for key, value in row.items() if key is not None}
        return
    yield from _json_array_records(file, text, problems)


def _json_array_records(file: Path, text: str, problems: list[str]):
    """The elements of a JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    position = len(text) - len(text.lstrip())
    if not text.startswith("[", position):
        problems.append(f"{file}:1: a .json data file must hold a list of records (use .jsonl for one per line)")
        return
    position += 1
    while True:
        position = len(text) - len(text[position:].lstrip())
        if text.startswith("]", position):
            return
        line = text.count("\n", 0, position) + 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            problems.append(f"{file}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})")
            return
        yield f"{file}:{line}", record
        position = len(text) - len(text[position:].lstrip())
        if text.startswith(",", position):
            position += 1
        elif not text.startswith("]", position):
            problems.append(f"{file}:{text.count(chr(10), 0, position) + 1}: not valid JSON (expected ',' or ']')")
            return


def _example(source: str, record: object, data_format: str) -> Example:
    """The record checked as `data_format` (auto: by its fields); a ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be an object with fields, got {type(record).__name__}")
    if data_format == "auto":
        if "messages" in record:
            data_format = "chat"
        elif "instruction" in record or "output" in record:
            data_format = "instruction"
        elif "text" in record:
            data_format = "text"
        else:
            raise ValueError("a record needs 'text', 'instruction' and 'output', or 'messages'; it has "
                             + (", ".join(f"'{key}'" for key in record) or "no fields"))
    if data_format == "text":
        return Example(source, text=_string_field(record, "text"))
    if data_format == "instruction":
        prompt = _string_field(record, "instruction")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError(f"'input' must be text, got {type(extra).__name__}")
        messages = [{"role": "user", "content": f"{prompt}\n\n{extra}" if extra.strip() else prompt},
                    {"role": "assistant", "content": _string_field(record, "output", "an empty response")}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _string_field(record, "system")})
        return Example(source, messages=messages)
    return Example(source, messages=_checked_messages(record))


def _checked_messages(record: dict) -> list[dict[str, str]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    checked = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {number} must be an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"message {number} has the unknown role {role!r} (known: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {number}'s content must be text, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise ValueError(f"message {number} is an empty response")
        if role == "system" and number != 1:
            raise ValueError(f"message {number}: a system message can only come first")
        checked.append({"role": role, "content": content})
    turns = [message["role"] for message in checked if message["role"] != "system"]
    if not turns or turns[0] != "user" or any(a == b for a, b in zip(turns, turns[1:])):
        raise ValueError("the turns must alternate user, assistant, user, ... starting with user")
    if turns[-1] != "assistant":
        raise ValueError("the conversation must end with an assistant response")
    return checked


def _string_field(record: dict, key: str, empty: str | None = None) -> str:
    if key not in record:
        raise ValueError(f"missing the field '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(empty or f"'{key}' is empty")
    return value
