"""The captioning panel: open_clip captions written beside the dataset's images, as one job of the runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_trainer.caption import CaptionOptions, CocaDecoding
from lora_trainer.caption.coca import DECODING_STRATEGIES
from lora_trainer.caption.writer import CAPTION_MODES
from lora_trainer.errors import UserError
from lora_trainer.jobs import JobStatus
from lora_trainer.server.queue import JobQueue
from lora_trainer.server.specs import CaptionJob
from lora_trainer.tab.dataset import dataset_folder
from lora_trainer.tab.notices import notice
from lora_trainer.tab.queue import submit_job

WEIGHTS_HELP = ("Empty: the captioner's default, downloaded once. A tag names weights open_clip downloads "
                "(e.g. mscoco_finetuned_laion2b_s13b_b90k for coca). A file must be a PyTorch checkpoint "
                "(.pt, .pth, .bin) holding plain tensors: the WebUI's safe loader refuses files that hold other "
                "Python objects, and its open_clip (2.20) cannot read .safetensors.")


def caption_options(model: str, mode: str, prefix: str, arch: str, weights: str, decoding: str, max_tokens: float,
                    repetition_penalty: float) -> CaptionOptions:
    """The captioning job's options from the tab's fields (blank architecture or weights: the defaults)."""
    max_tokens = int(max_tokens)
    return CaptionOptions(
        model=model, mode=mode, prefix=prefix, arch=arch.strip() or None, pretrained=weights.strip() or None,
        decoding=CocaDecoding(strategy=decoding, max_tokens=max_tokens,
                              min_tokens=min(CocaDecoding.min_tokens, max_tokens),
                              repetition_penalty=float(repetition_penalty)))


@dataclass
class CaptioningPanel:
    """The panel's components, in the Dataset column's "Caption the images automatically" accordion."""

    captioner: Any
    mode: Any
    prefix: Any
    decoding: Any
    max_tokens: Any
    repetition: Any
    arch: Any
    weights: Any
    button: Any
    notice: Any

    @classmethod
    def build(cls) -> CaptioningPanel:
        import gradio as gr

        with gr.Accordion("Caption the images automatically", open=False, elem_id="lora_trainer_captioning"):
            with gr.Row():
                captioner = gr.Radio(["coca", "clip-tags"], value="coca", label="Captioner",
                                     info="coca writes a sentence, clip-tags ranks tag phrases",
                                     elem_id="lora_trainer_captioner")
                mode = gr.Radio(list(CAPTION_MODES), value="skip", label="Images that already have a caption",
                                elem_id="lora_trainer_caption_mode")
            prefix = gr.Textbox(label="Prefix", info="Put first in every new caption, e.g. the trigger word",
                                elem_id="lora_trainer_caption_prefix")
            with gr.Row():
                decoding = gr.Radio(list(DECODING_STRATEGIES), value=CocaDecoding.strategy, label="coca decoding",
                                    info="beam: the likeliest sentence; sample: varied ones",
                                    elem_id="lora_trainer_caption_decoding")
                max_tokens = gr.Slider(1, 77, value=CocaDecoding.max_tokens, step=1, label="coca max length (tokens)",
                                       elem_id="lora_trainer_caption_max_tokens")
                repetition = gr.Number(value=CocaDecoding.repetition_penalty, label="coca repetition penalty",
                                       info="above 1 avoids repeated words", elem_id="lora_trainer_caption_repetition")
            with gr.Row():
                arch = gr.Textbox(label="open_clip architecture", placeholder="the captioner's default",
                                  elem_id="lora_trainer_caption_arch")
                weights = gr.Textbox(label="Weights: a file or an open_clip pretrained tag", info=WEIGHTS_HELP,
                                     placeholder="the captioner's default (downloaded once)",
                                     elem_id="lora_trainer_caption_weights")
            button = gr.Button("Caption", elem_id="lora_trainer_caption_button")
            panel_notice = gr.HTML(elem_id="lora_trainer_caption_notice")
        return cls(captioner, mode, prefix, decoding, max_tokens, repetition, arch, weights, button, panel_notice)

    def wire(self, queue: JobQueue, folder: Any, progress) -> None:
        """Queue captioning the images of `folder` on `queue`; `progress` (the progress panel) shows the job."""

        def start(folder_text: str, model: str, mode: str, prefix: str, arch: str, weights: str, decoding: str,
                  max_tokens: float, repetition_penalty: float, seen_now: dict | None) -> dict:
            try:
                options = caption_options(model, mode, prefix, arch, weights, decoding, max_tokens,
                                          repetition_penalty)
                submitted = submit_job(queue, CaptionJob(dataset_folder(folder_text), options), progress, seen_now,
                                       "Captioning started: progress below.")
            except UserError as error:
                return {self.notice: notice(str(error), error=True)}
            return {self.notice: submitted.pop("notice"), **submitted}

        self.button.click(start, [folder, self.captioner, self.mode, self.prefix, self.arch, self.weights,
                                  self.decoding, self.max_tokens, self.repetition, progress.seen],
                          [self.notice, *progress.started_outputs])

    def on_status(self, status: JobStatus, ended: str | None) -> dict:
        """Updates for a poll: the start notice goes when captioning has ended. (The button stays: while a job
        runs, it queues the captioning behind it.)"""
        return {self.notice: ""} if ended == "captioning" else {}
