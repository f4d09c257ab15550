"""Prompt formats: how a conversation becomes the text a model trains on, with the character spans of its
responses, and how a prompt is put to the model afterwards in the same format."""

from __future__ import annotations

from dataclasses import dataclass

from lora_trainer.errors import UserError

ROLES = ("system", "user", "assistant")
_METADATA_TEMPLATE = "lora_trainer.template"
_METADATA_CHAT_TEMPLATE = "lora_trainer.chat_template"


@dataclass(frozen=True)
class PromptFormat:
    """A template name (chat_template, llama2 or plain) and, for chat_template, its Jinja text, so that the
    format a model was trained in can be recorded with its adapter and reused exactly."""

    template: str
    chat_template: str | None = None

    @classmethod
    def for_tokenizer(cls, template: str, tokenizer) -> PromptFormat:
        """The format `template` names (`auto`: the tokenizer's chat template when it has one, else llama2)."""
        if template == "auto":
            template = "chat_template" if tokenizer.chat_template else "llama2"
        if template == "chat_template":
            if not tokenizer.chat_template:
                raise UserError("template: chat_template, but this model's tokenizer has no chat template; "
                                "use template: llama2 (or plain)")
            return cls("chat_template", tokenizer.chat_template)
        return cls(template)

    def metadata(self) -> dict[str, str]:
        """String metadata that `from_metadata` reads back."""
        recorded = {_METADATA_TEMPLATE: self.template}
        if self.chat_template is not None:
            recorded[_METADATA_CHAT_TEMPLATE] = self.chat_template
        return recorded

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> PromptFormat | None:
        """The format recorded in an adapter's metadata, or None when it records none."""
        if _METADATA_TEMPLATE not in metadata:
            return None
        return cls(metadata[_METADATA_TEMPLATE], metadata.get(_METADATA_CHAT_TEMPLATE))


@dataclass
class RenderedText:
    """A conversation as text, and the character spans [start, end) that are responses (trained on)."""

    text: str
    response_spans: list[tuple[int, int]]


def render_conversation(messages: list[dict[str, str]], prompt_format: PromptFormat, tokenizer) -> RenderedText:
    """`messages` (system?, then user/assistant turns) in `prompt_format`; responses end with the EOS token."""
    if prompt_format.template == "chat_template":
        return _render_with_chat_template(messages, prompt_format.chat_template, tokenizer)
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    text, spans = "", []
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    for message in messages[1:] if system is not None else messages:
        if message["role"] == "user":
            content = message["content"]
            if system is not None and prompt_format.template == "llama2":
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            elif system is not None:
                content = f"{system}\n{content}"
            system = None
            text += _prompt_text(content, prompt_format.template, bos)
        else:
            start = len(text)
            text += f" {message['content']} {eos}" if prompt_format.template == "llama2" else \
                f"{message['content']}{eos}\n"
            spans.append((start, len(text)))
    return RenderedText(text, spans)


def render_prompt(prompt: str, prompt_format: PromptFormat, tokenizer) -> str:
    """A single user `prompt` as the model expects it before its answer."""
    if prompt_format.template == "chat_template":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=prompt_format
                                             .chat_template, tokenize=False, add_generation_prompt=True)
    return _prompt_text(prompt, prompt_format.template, tokenizer.bos_token or "")


def _prompt_text(content: str, template: str, bos: str) -> str:
    return f"{bos}[INST] {content} [/INST]" if template == "llama2" else f"{bos}{content}\n"


def _render_with_chat_template(messages: list[dict[str, str]], chat_template: str, tokenizer) -> RenderedText:
    def render(turns: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:index], generation_prompt=True), render(messages[:index + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise UserError("the tokenizer's chat template does not render a conversation as its turns one after "
                            "another, so the responses cannot be told from the prompts; use template: llama2")
        spans.append((len(before), len(through)))
    return RenderedText(text, spans)
