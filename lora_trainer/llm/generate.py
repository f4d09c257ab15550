"""Greedy answers to prompts, put to the model in the prompt format its adapter was trained in."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_trainer.errors import UserError
from lora_trainer.llm.model import read_adapter
from lora_trainer.llm.templates import PromptFormat, render_prompt


def adapter_prompt_format(adapter: Path) -> PromptFormat:
    """The prompt format recorded in a saved adapter's metadata."""
    _, _, metadata = read_adapter(adapter)
    prompt_format = PromptFormat.from_metadata(metadata)
    if prompt_format is None:
        raise UserError(f"{adapter} records no prompt template (it was not saved by this trainer); "
                        "give the template explicitly")
    return prompt_format


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], prompt_format: PromptFormat | None,
                     max_new_tokens: int = 64) -> list[str]:
    """Each prompt's greedy answer (up to EOS or `max_new_tokens`), without special tokens. With
    `prompt_format` None the prompt is given as bare text, as a user who forgot the template would."""
    was_training = model.training
    model.eval()
    answers = []
    device = next(model.parameters()).device
    for prompt in prompts:
        text = render_prompt(prompt, prompt_format, tokenizer) if prompt_format is not None else prompt
        input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
