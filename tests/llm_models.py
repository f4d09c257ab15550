"""Tiny language models for the LLM tests, built offline: a word-level tokenizer made from the toy tasks' own
words, a random two-layer Llama, and the toy fact tasks (colours and homes of made-up animals)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ANIMALS = ["zorp", "blick", "frell", "quon", "mib", "tarsh", "vlen", "gorb", "plim", "drax", "snib", "wemb",
           "yilt", "krob", "fanz", "hupp", "jeld", "numb", "ostra", "rilk", "sprog", "tewl", "ulva", "zent"]
OTHER_ANIMALS = ["bap", "cresh", "dulm", "ekko", "fisk", "glom", "hent", "irv", "jopp", "kell", "lusk", "marn",
                 "nerp", "olb", "prin", "quell", "rusk", "sabe", "trin", "uzz", "vorn", "wisp", "xeb", "yorl"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
HOMES = ["forest", "river", "desert", "mountain", "city", "cave"]
COLOUR_QUESTIONS = ["What colour is the {} ?", "Tell me the colour of the {} .", "Which colour does the {} have ?",
                    "The {} has which colour ?", "Say the colour of a {} .", "Colour of the {} ?",
                    "I wonder what colour the {} is .", "Do you know the colour of a {} ?"]
HOME_QUESTIONS = ["Where does the {} live ?", "Name the home of the {} .", "In which place lives the {} ?",
                  "The {} lives where ?", "Say the home of a {} .", "Home of the {} ?",
                  "I wonder where the {} lives .", "Do you know the home of a {} ?"]
EXTRA_WORDS = "You are a helpful zoo keeper Answer in one word".split()
MARKERS = ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}"
                 "{% if message['role'] == 'assistant' %} </s>{% endif %} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
"""A small chat template of the usual shape (role markers, EOS after each answer)."""


@dataclass(eq=False)
class FactTask:
    """Questions about one attribute of the animals: each animal is asked in all phrasings but one for training,
    and in that one, never seen with that animal, for the held-out check."""

    animals: list[str]
    questions: list[str]
    answers: list[str]
    stride: int
    """Animal number i has answer number i * stride (mod the answers), so two tasks pair animals differently."""

    def answer(self, animal: str) -> str:
        return self.answers[self.animals.index(animal) * self.stride % len(self.answers)]

    def training_records(self) -> list[dict[str, str]]:
        return [{"instruction": question.format(animal), "output": self.answer(animal)}
                for index, animal in enumerate(self.animals)
                for held_out, question in enumerate(self.questions) if held_out != index % len(self.questions)]

    def held_out(self) -> list[tuple[str, str]]:
        """(prompt, answer) pairs: each animal in the phrasing it was not trained with."""
        return [(self.questions[index % len(self.questions)].format(animal), self.answer(animal))
                for index, animal in enumerate(self.animals)]


COLOUR_TASK = FactTask(ANIMALS, COLOUR_QUESTIONS, COLOURS, stride=1)
HOME_TASK = FactTask(ANIMALS, HOME_QUESTIONS, HOMES, stride=5)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def build_tokenizer(chat_template: str | None = None):
    """A word-level fast tokenizer over the toy tasks' words, with Llama's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {word for text in [*COLOUR_QUESTIONS, *HOME_QUESTIONS] for word in text.split() if word != "{}"}
    words |= {*ANIMALS, *OTHER_ANIMALS, *COLOURS, *HOMES, *EXTRA_WORDS}
    vocabulary = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.add_tokens(MARKERS)
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_llama(folder: Path, chat_template: str | None = None, seed: int = 0) -> Path:
    """A random two-layer Llama (hidden size 64) and its tokenizer, as a transformers folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                         initializer_range=0.2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
