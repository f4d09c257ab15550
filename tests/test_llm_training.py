"""LLM LoRA training on a tiny random Llama: it learns a toy fact task, v2 learns a second task from v1 and keeps
the first, the prompt template matters and is recorded, and the saved adapters load in peft and transformers."""

from __future__ import annotations

import pytest
import torch
from llm_models import COLOUR_TASK, HOME_TASK, FactTask, save_tiny_llama, write_jsonl
from safetensors.torch import load_file

from lora_trainer.cli import main
from lora_trainer.errors import UserError
from lora_trainer.llm.config import llm_config_from_dict
from lora_trainer.llm.generate import adapter_prompt_format, generate_answers
from lora_trainer.llm.loop import train_llm
from lora_trainer.llm.templates import PromptFormat
from lora_trainer.train.events import TrainingEvents

pytest.importorskip("peft")  # the webui environment (the WebUI's pins) has no peft: language models need it

LEARNING_RATE = 1e-2


def run_config(base, data, out, **values):
    return llm_config_from_dict({"task": "llm", "base_model": str(base), "train_data": str(data),
                                 "output_dir": str(out), "logging_dir": None, "lora_dropout": 0.0,
                                 "learning_rate": LEARNING_RATE, "batch_size": 8, **values})


def answer_rate(model, tokenizer, task: FactTask, prompt_format: PromptFormat | None) -> float:
    """The share of held-out prompts (each animal in the phrasing it was not trained with) answered exactly."""
    pairs = task.held_out()
    answers = generate_answers(model, tokenizer, [prompt for prompt, _ in pairs], prompt_format, max_new_tokens=4)
    return sum(answer == expected for answer, (_, expected) in zip(answers, pairs)) / len(pairs)


def load_adapter(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llm") / "base")


@pytest.fixture(scope="module")
def version_1(base, tmp_path_factory):
    """v1: the colour of each animal (the llama2 template, the default q_proj/v_proj targets, rank 8)."""
    folder = tmp_path_factory.mktemp("v1")
    data = write_jsonl(folder / "colours.jsonl", COLOUR_TASK.training_records())
    return train_llm(run_config(base, data, folder / "out", epochs=25, output_name="v1"))


@pytest.fixture(scope="module")
def incremental(base, tmp_path_factory):
    """(v1, v2) on every linear layer: v1 learns the colours; v2 learns the homes from v1's adapter at 40% of
    v1's learning rate, with half of v1's examples kept in its data (on homes alone it forgets the colours)."""
    folder = tmp_path_factory.mktemp("incremental")
    learning_rate = 3e-3
    version_1 = train_llm(run_config(
        base, write_jsonl(folder / "colours.jsonl", COLOUR_TASK.training_records()), folder / "out",
        target_modules=["all-linear"], learning_rate=learning_rate, epochs=25, output_name="v1"))
    kept_from_v1 = COLOUR_TASK.training_records()[::2]
    version_2 = train_llm(run_config(
        base, write_jsonl(folder / "homes.jsonl", HOME_TASK.training_records() + kept_from_v1), folder / "out",
        target_modules=["all-linear"], learning_rate=0.4 * learning_rate, epochs=12, output_name="v2",
        init_lora_weights=str(version_1.saved[-1])))
    return version_1, version_2


def test_a_tiny_model_learns_facts_it_answers_to_held_out_prompts(version_1):
    rate = answer_rate(version_1.model, version_1.tokenizer, COLOUR_TASK, adapter_prompt_format(version_1.saved[-1]))
    print(f"v1 colour answers on held-out prompts: {rate:.0%}")
    assert rate >= 0.9


def test_qlora_on_a_four_bit_base_learns_the_facts_and_its_adapter_loads_on_that_base(base, tmp_path):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    data = write_jsonl(tmp_path / "colours.jsonl", COLOUR_TASK.training_records())
    result = train_llm(run_config(base, data, tmp_path / "out", epochs=25, output_name="q", load_in_4bit=True))
    assert isinstance(result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer,
                      bitsandbytes.nn.Linear4bit)
    assert answer_rate(result.model, result.tokenizer, COLOUR_TASK, adapter_prompt_format(result.saved[-1])) >= 0.9

    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        base, quantization_config=four_bit, device_map={"": "cpu"}), result.saved[-1]).eval()
    tokens = result.tokenizer(["What colour is the zorp ?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**tokens).logits, result.model.eval()(**tokens).logits, atol=1e-5, rtol=0)


def test_prompting_without_the_recorded_template_answers_worse(version_1):
    recorded = adapter_prompt_format(version_1.saved[-1])
    assert recorded == PromptFormat("llama2")
    with_template = answer_rate(version_1.model, version_1.tokenizer, COLOUR_TASK, recorded)
    without = answer_rate(version_1.model, version_1.tokenizer, COLOUR_TASK, None)
    print(f"v1 colour answers: {with_template:.0%} in its [INST] template, {without:.0%} without it")
    assert without <= with_template - 0.5


def answer_rates(model, tokenizer) -> dict[FactTask, float]:
    return {task: answer_rate(model, tokenizer, task, PromptFormat("llama2")) for task in (COLOUR_TASK, HOME_TASK)}


def test_v2_from_v1_learns_the_second_task_and_keeps_the_first(base, incremental):
    version_1, version_2 = incremental
    before = answer_rates(load_adapter(base, version_1.saved[-1]), version_1.tokenizer)
    after = answer_rates(version_2.model, version_2.tokenizer)
    print(f"colours (A): v1 {before[COLOUR_TASK]:.0%} -> v2 {after[COLOUR_TASK]:.0%}; "
          f"homes (B): v1 {before[HOME_TASK]:.0%} -> v2 {after[HOME_TASK]:.0%}")
    assert before[COLOUR_TASK] >= 0.9 and before[HOME_TASK] <= 0.3
    assert after[HOME_TASK] >= 0.9
    assert after[COLOUR_TASK] >= 0.9


def test_v2_starts_exactly_from_v1s_weights(base, version_1, tmp_path):
    data = write_jsonl(tmp_path / "homes.jsonl", HOME_TASK.training_records())
    config = run_config(base, data, tmp_path / "out", init_lora_weights=str(version_1.saved[-1] /
                                                                            "adapter_model.safetensors"),
                        max_train_steps=1, learning_rate=1e-12, output_name="same")
    started = train_llm(config)
    from peft import get_peft_model_state_dict

    expected = get_peft_model_state_dict(version_1.model)
    for name, tensor in get_peft_model_state_dict(started.model).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-9)


@pytest.mark.parametrize(("change", "message"), [
    ({"lora_rank": 4}, "its rank is 8, the config's lora_rank is 4"),
    ({"target_modules": ["q_proj", "k_proj", "v_proj"]},
     "it adapts q_proj, v_proj, the config's target_modules select k_proj, q_proj, v_proj"),
    ({"lora_alpha": 8}, "lora_alpha 16.0 there, 8.0 here"),
])
def test_an_initial_adapter_of_another_shape_is_refused_saying_what_differs(base, version_1, tmp_path, change,
                                                                           message):
    data = write_jsonl(tmp_path / "homes.jsonl", HOME_TASK.training_records())
    config = run_config(base, data, tmp_path / "out", init_lora_weights=str(version_1.saved[-1]), **change)
    with pytest.raises(UserError, match=message):
        train_llm(config)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_saved_adapter_loads_in_peft_with_the_trainers_logits(base, version_1):
    tokens = version_1.tokenizer("<s> [INST] What colour is the zorp ? [/INST] red </s>", add_special_tokens=False,
                                 return_tensors="pt")["input_ids"]
    with torch.no_grad():
        trained = version_1.model.eval()(input_ids=tokens).logits
        loaded = load_adapter(base, version_1.saved[-1])(input_ids=tokens).logits
    assert (trained - loaded).abs().max() <= 1e-5


def test_merge_writes_a_model_equal_to_base_plus_adapter(base, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "colours.jsonl", COLOUR_TASK.training_records())
    result = train_llm(run_config(base, data, tmp_path / "out", max_train_steps=4, merge=True, output_name="m"))
    adapter, merged = result.saved
    assert (adapter.name, merged.name) == ("m", "m-merged")
    tokens = torch.tensor([[1, 5, 9, 12, 30, 2]])
    with torch.no_grad():
        expected = load_adapter(base, adapter)(input_ids=tokens).logits
        actual = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=tokens).logits
    assert (expected - actual).abs().max() <= 1e-5


def test_a_dora_adapter_trains_and_loads_in_peft_with_the_trainers_logits(base, tmp_path):
    data = write_jsonl(tmp_path / "colours.jsonl", COLOUR_TASK.training_records())
    result = train_llm(run_config(base, data, tmp_path / "out", max_train_steps=3, use_dora=True))
    tokens = torch.tensor([[1, 5, 9, 12, 30, 2]])
    with torch.no_grad():
        trained = result.model.eval()(input_ids=tokens).logits
        loaded = load_adapter(base, result.saved[-1])(input_ids=tokens).logits
    assert (trained - loaded).abs().max() <= 1e-5
    assert any("lora_magnitude_vector" in name for name in load_file(result.saved[-1] / "adapter_model.safetensors"))


def test_gradient_checkpointing_trains_the_same_adapter(base, tmp_path):
    data = write_jsonl(tmp_path / "colours.jsonl", COLOUR_TASK.training_records())
    plain = train_llm(run_config(base, data, tmp_path / "plain", max_train_steps=3))
    checkpointed = train_llm(run_config(base, data, tmp_path / "checkpointed", max_train_steps=3,
                                        gradient_checkpointing=True))
    expected = load_file(plain.saved[-1] / "adapter_model.safetensors")
    for name, tensor in load_file(checkpointed.saved[-1] / "adapter_model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)


def test_resuming_a_saved_state_ends_with_the_uninterrupted_runs_adapter(base, tmp_path):
    data = write_jsonl(tmp_path / "colours.jsonl", COLOUR_TASK.training_records())
    settings = {"max_train_steps": 6, "save_state": True, "lora_dropout": 0.1}
    whole = train_llm(run_config(base, data, tmp_path / "whole", **settings, save_every_n_steps=3))
    first_half = whole.saved[0]
    assert first_half.name == "lora-s000003" and (first_half / "training_state.pt").is_file()
    resumed = train_llm(run_config(base, data, tmp_path / "resumed", **settings, resume=str(first_half)))
    expected = load_file(whole.saved[-1] / "adapter_model.safetensors")
    for name, tensor in load_file(resumed.saved[-1] / "adapter_model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


class InterruptAtStep(TrainingEvents):
    def __init__(self, step: int):
        self.step, self.stop_step = 0, step

    def on_step(self, report):
        self.step = report.step

    def interrupt_requested(self) -> bool:
        return self.step == self.stop_step


def test_an_interrupt_saves_the_adapter_and_a_finished_name_is_never_overwritten(base, tmp_path):
    data = write_jsonl(tmp_path / "colours.jsonl", COLOUR_TASK.training_records())
    config = run_config(base, data, tmp_path / "out", max_train_steps=5)
    with pytest.raises(KeyboardInterrupt):
        train_llm(config, InterruptAtStep(2))
    assert (tmp_path / "out" / "lora-interrupted-s000002" / "adapter_config.json").is_file()
    train_llm(config)
    with pytest.raises(UserError, match="already exists; choose another output_name"):
        train_llm(config)


def test_the_command_line_trains_a_task_llm_config(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "colours.jsonl", COLOUR_TASK.training_records())
    config = tmp_path / "llm.yaml"
    config.write_text(f"task: llm\nbase_model: {base}\ntrain_data: {data}\noutput_dir: {tmp_path / 'out'}\n"
                      "logging_dir: null\nlora_rank: 4\nlora_alpha: 8\nmax_train_steps: 20\n"
                      "sample_prompts: What colour is the zorp ?\nsample_max_new_tokens: 3\n")
    assert main(["train", "--config", str(config), "--max_train_steps", "2", "--output_name", "cli"]) == 0
    output = capsys.readouterr()
    assert (tmp_path / "out" / "cli" / "adapter_model.safetensors").is_file()
    assert "done: 2 steps" in output.out
    assert "sample at step 2: 'What colour is the zorp ?' ->" in output.err + output.out
