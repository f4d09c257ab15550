"""LLM runs before training: the config's keys, data files and their errors, templates and labels, folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from llm_models import CHAT_TEMPLATE, build_tokenizer, save_tiny_llama, write_jsonl

from lora_trainer.config import read_config_file
from lora_trainer.errors import UserError
from lora_trainer.files import remove_stale_temporaries, write_new_folder
from lora_trainer.llm.config import DataConfig, llm_config_from_dict
from lora_trainer.llm.data import IGNORED_LABEL, read_examples, tokenize_examples
from lora_trainer.llm.model import load_base_model
from lora_trainer.llm.templates import PromptFormat

pytest.importorskip("peft")  # the webui environment (the WebUI's pins) has no peft: language models need it


def test_flat_and_grouped_keys_land_in_their_groups():
    config = llm_config_from_dict({"task": "llm", "lora_rank": 4, "learning_rate": "1e-4", "optimizer": "lion",
                                   "target_modules": "q_proj, k_proj", "data": {"max_seq_length": 64}},
                                  {"network.lora_rank": 8})
    assert config.network.lora_rank == 8
    assert config.optimizer.optimizer_type == "lion"
    assert config.optimizer.learning_rate == 1e-4
    assert config.network.target_modules == ["q_proj", "k_proj"]
    assert config.data.max_seq_length == 64
    assert llm_config_from_dict(config.to_dict()) == config


def test_the_example_config_is_a_valid_llm_config():
    config = llm_config_from_dict(read_config_file(Path(__file__).parent.parent / "examples" / "llm.yaml"))
    assert (config.network.lora_rank, config.network.target_modules) == (8, ["q_proj", "v_proj"])


def test_an_unknown_or_misplaced_key_is_named_with_a_hint():
    with pytest.raises(UserError, match="unknown config key 'lora_rnak' \\(did you mean 'lora_rank'\\?\\)"):
        llm_config_from_dict({"lora_rnak": 4})
    with pytest.raises(UserError, match="config key 'lora_rank' belongs in section 'network', not 'data'"):
        llm_config_from_dict({"data": {"lora_rank": 4}})
    with pytest.raises(UserError, match="config key 'lora_rank' should be a whole number, got 'big'"):
        llm_config_from_dict({"lora_rank": "big"})


def test_bad_records_are_reported_together_with_file_and_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([
        json.dumps({"instruction": "What colour is the zorp ?", "output": "red"}),
        '{"instruction": "broken", ',
        json.dumps({"instruction": "What colour is the mib ?"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "red"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}),
        json.dumps({"prompt": "x"}),
    ]) + "\n")
    with pytest.raises(UserError) as raised:
        read_examples(data, "auto")
    message = str(raised.value)
    assert f"{data}:2: not valid JSON" in message
    assert f"{data}:3: missing the field 'output'" in message
    assert f"{data}:4: message 2 has the unknown role 'robot'" in message
    assert f"{data}:5: message 2 is an empty response" in message
    assert f"{data}:6: a record needs 'text', 'instruction' and 'output', or 'messages'; it has 'prompt'" in message
    assert f"{data}:1" not in message


def test_json_arrays_and_csv_rows_are_read_with_their_line_numbers(tmp_path):
    (tmp_path / "a.json").write_text('[\n  {"instruction": "q1", "output": "a1"},\n\n  {"instruction": "q2", '
                                     '"output": ""}\n]\n')
    (tmp_path / "b.csv").write_text("instruction,input,output\nq3,,a3\nq4,extra,a4\n")
    with pytest.raises(UserError) as raised:
        read_examples(tmp_path, "auto")
    assert f"{tmp_path / 'a.json'}:4: an empty response" in str(raised.value)
    (tmp_path / "a.json").unlink()
    examples = read_examples(tmp_path, "auto")
    assert [example.source for example in examples] == [f"{tmp_path / 'b.csv'}:2", f"{tmp_path / 'b.csv'}:3"]
    assert examples[1].messages[0]["content"] == "q4\n\nextra"


def test_llama2_template_trains_on_the_response_and_its_eos_only(tmp_path):
    tokenizer = build_tokenizer()
    examples = read_examples(write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "What colour is the zorp ?", "output": "red"}]), "auto")
    tokens = tokenize_examples(examples, tokenizer, PromptFormat("llama2"), DataConfig())
    words = tokenizer.convert_ids_to_tokens(tokens.input_ids[0])
    assert words == ["<s>", "[INST]", "What", "colour", "is", "the", "zorp", "?", "[/INST]", "red", "</s>"]
    trained = [word for word, label in zip(words, tokens.labels[0]) if label != IGNORED_LABEL]
    assert trained == ["red", "</s>"]
    with_prompt = tokenize_examples(examples, tokenizer, PromptFormat("llama2"), DataConfig(train_on_prompt=True))
    assert with_prompt.labels[0] == with_prompt.input_ids[0]


def test_chat_template_conversations_train_on_every_assistant_turn(tmp_path):
    tokenizer = build_tokenizer(CHAT_TEMPLATE)
    prompt_format = PromptFormat.for_tokenizer("auto", tokenizer)
    assert prompt_format.template == "chat_template"
    examples = read_examples(write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "You are a helpful zoo keeper"},
        {"role": "user", "content": "What colour is the zorp ?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Where does the zorp live ?"}, {"role": "assistant", "content": "river"}]}]),
        "auto")
    tokens = tokenize_examples(examples, tokenizer, prompt_format, DataConfig())
    words = tokenizer.convert_ids_to_tokens(tokens.input_ids[0])
    assert [word for word, label in zip(words, tokens.labels[0]) if label != IGNORED_LABEL] == \
        ["red", "</s>", "river", "</s>"]
    assert PromptFormat.from_metadata(prompt_format.metadata()) == prompt_format


def test_a_tokenizer_without_a_chat_template_gets_llama2_and_chat_template_is_refused():
    tokenizer = build_tokenizer()
    assert PromptFormat.for_tokenizer("auto", tokenizer).template == "llama2"
    with pytest.raises(UserError, match="has no chat template; use template: llama2"):
        PromptFormat.for_tokenizer("chat_template", tokenizer)


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path):
    tokenizer = build_tokenizer()
    examples = read_examples(write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "What colour is the zorp ?", "output": "red blue green yellow"},  # 14 tokens
        {"instruction": "What colour is the zorp ? What colour is the zorp ?", "output": "red"},  # 17 tokens
        {"instruction": "Colour of the mib ?", "output": "red"}]), "auto")  # 9 tokens
    truncated = tokenize_examples(examples, tokenizer, PromptFormat("llama2"), DataConfig(max_seq_length=12))
    assert (truncated.truncated, truncated.dropped, len(truncated.input_ids)) == (1, 1, 2)
    assert "1 truncated, 1 dropped" in truncated.summary(12)
    dropped = tokenize_examples(examples, tokenizer, PromptFormat("llama2"),
                                DataConfig(max_seq_length=12, overlong="drop"))
    assert (dropped.truncated, dropped.dropped, len(dropped.input_ids)) == (0, 2, 1)


def test_raw_text_is_packed_into_blocks_and_examples_can_be_packed(tmp_path):
    tokenizer = build_tokenizer()
    (tmp_path / "story.txt").write_text("the zorp is red " * 10)
    text = tokenize_examples(read_examples(tmp_path / "story.txt", "auto"), tokenizer, PromptFormat("llama2"),
                             DataConfig(max_seq_length=16))
    assert [len(block) for block in text.input_ids] == [16, 16, 9]  # 40 words and EOS
    examples = read_examples(write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Colour of the mib ?", "output": "red"}] * 5), "auto")
    packed = tokenize_examples(examples, tokenizer, PromptFormat("llama2"), DataConfig(max_seq_length=20,
                                                                                       packing=True))
    assert [len(sequence) for sequence in packed.input_ids] == [20, 20, 10]  # 10 tokens each


def test_qlora_with_a_bitsandbytes_without_kernels_for_the_device_says_so(tmp_path, monkeypatch):
    functional = pytest.importorskip("bitsandbytes.functional")

    def cuda_only(*args, **kwargs):  # what releases before bitsandbytes' CPU backend did on a CPU tensor
        raise NotImplementedError("quantize_4bit is only implemented on CUDA")

    monkeypatch.setattr(functional, "quantize_4bit", cuda_only)
    config = llm_config_from_dict({"base_model": str(save_tiny_llama(tmp_path / "base")), "load_in_4bit": True,
                                   "device": "cpu"})
    with pytest.raises(UserError, match="has no 4-bit layers for the cpu .*pip install -U bitsandbytes"):
        load_base_model(config.model, torch.device("cpu"))


def test_adapter_folders_are_written_whole_and_never_replace_one(tmp_path):
    first = write_new_folder(tmp_path / "lora", lambda folder: (folder / "a.txt").write_text("1"))
    second = write_new_folder(tmp_path / "lora", lambda folder: (folder / "a.txt").write_text("2"))
    assert (first.name, second.name) == ("lora", "lora-2")
    assert (first / "a.txt").read_text() == "1"

    def failing(folder):
        (folder / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_new_folder(tmp_path / "lora", failing)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lora", "lora-2"]
    stale = tmp_path / ".lora.999999999-0123456789abcdef0123456789abcdef.tmp"
    stale.mkdir()
    os.utime(stale, (0, 0))
    assert remove_stale_temporaries(tmp_path) == [stale]
