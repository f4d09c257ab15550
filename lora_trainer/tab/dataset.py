"""The Dataset panel: the folder, a gallery of its usable images with their captions, the images the trainer
would skip (with its reasons), and the caption editor."""

from __future__ import annotations

import html
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_trainer.caption.writer import read_caption, write_caption
from lora_trainer.data.images import UnreadableImage, is_image_file, thumbnail_file
from lora_trainer.data.masks import mask_overlay
from lora_trainer.data.scan import image_files
from lora_trainer.errors import UserError
from lora_trainer.tab.notices import notice

NO_CAPTION = "(no caption)"
UNREADABLE_CAPTION = "(caption file is not UTF-8 text)"
PREVIEWS_DIR = Path(tempfile.gettempdir()) / "lora-trainer-thumbnails"
"""Where the gallery's previews are cached (in the temp folder, which gradio serves files from)."""


@dataclass
class DatasetContents:
    """What the trainer will find in a dataset folder, in training order."""

    images: list[tuple[Path, str | None]] = field(default_factory=list)
    """The usable images with their captions ("" without one, None when the caption file is unreadable)."""
    previews: list[Path] = field(default_factory=list)
    """A small JPEG of each usable image."""
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Image files the trainer skips, with its reason."""

    def summary_html(self, folder: Path) -> str:
        """How many images are ready, how many lack a caption, and each skipped file with the reason."""
        if not self.images and not self.skipped:
            return notice(f"No images in {folder} yet: put the training images there (PNG, JPEG, WebP...), each "
                          "with its caption in a .txt file of the same name, then press 'Load the images'.")
        missing = sum(1 for _, caption in self.images if not caption)
        parts = [f"{len(self.images)} images ready to train", f"{missing} without a caption"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        lines = "".join(f"<li><code>{html.escape(path.name)}</code>: {html.escape(reason)}</li>"
                        for path, reason in self.skipped)
        skipped = f'<ul class="lora-trainer-skipped">{lines}</ul>' if lines else ""
        return f'<div class="lora-trainer-notice">{html.escape(" · ".join(parts))}.{skipped}</div>'


def dataset_contents(folder: str | Path, previews_dir: Path = PREVIEWS_DIR) -> DatasetContents:
    """Open every image below `folder` as the trainer would: the usable ones with their captions and previews
    (cached in `previews_dir`), the others with the reason they are skipped."""
    contents = DatasetContents()
    for image in image_files(dataset_folder(folder)):
        try:
            preview = thumbnail_file(image, previews_dir)
        except UnreadableImage as error:
            contents.skipped.append((image, str(error)))
            continue
        try:
            caption = read_caption(image)
        except UnicodeDecodeError:
            caption = None
        contents.images.append((image, caption))
        contents.previews.append(preview)
    return contents


def save_caption(folder: str | Path, image: str | Path, caption: str) -> Path:
    """Write `caption` beside `image` atomically; `image` must be an image file below `folder`."""
    image = Path(image).resolve()
    if not (image.is_relative_to(dataset_folder(folder)) and is_image_file(image) and image.is_file()):
        raise UserError(f"{image} is not an image of the dataset folder {folder}. Pick an image in the gallery.")
    return write_caption(image, caption.strip())


def dataset_folder(folder: str | Path) -> Path:
    """`folder` as an existing folder, or a `UserError` that says what to enter."""
    if not str(folder).strip():
        raise UserError("Enter the dataset folder: the folder that holds the training images.")
    path = Path(str(folder).strip()).expanduser()
    if not path.is_dir():
        raise UserError(f"Dataset folder {path} does not exist or is not a folder. Check the path.")
    return path.resolve()


def prepare_default_folder(folder: Path | None) -> None:
    """Create the host's default datasets folder if it is missing, so that a first visit finds an empty folder
    to fill rather than an error (a folder that cannot be created is left to the view to report)."""
    if folder is not None:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError:
            pass


@dataclass
class DatasetPanel:
    """The panel's components; the folder box is the form's `train_data_dir` field."""

    folder: Any
    load_button: Any
    info: Any
    gallery: Any
    selected_image: Any
    caption_box: Any
    mask_view: Any
    """The selected image with what its loss mask leaves out tinted (hidden when it has no mask)."""
    save_button: Any
    notice: Any
    image_paths: Any
    """State: the gallery's image paths, in its order."""

    @classmethod
    def build(cls, folder: Any) -> DatasetPanel:
        """Lay the panel out below `folder` (already placed by the caller)."""
        import gradio as gr

        load_button = gr.Button("Load the images", size="sm", elem_id="lora_trainer_load_dataset")
        info = gr.HTML(elem_id="lora_trainer_dataset_info")
        gallery = gr.Gallery(label="Images and captions: click one to edit its caption", columns=6, height=360,
                             allow_preview=False, elem_id="lora_trainer_dataset_gallery")
        with gr.Row():
            selected_image = gr.Textbox(label="Image", interactive=False, max_lines=1, scale=2,
                                        elem_id="lora_trainer_selected_image")
            caption_box = gr.Textbox(label="Caption", lines=2, scale=5, elem_id="lora_trainer_caption")
        mask_view = gr.Image(label="Loss mask: the tinted part does not count", type="pil", interactive=False,
                             visible=False, height=256, elem_id="lora_trainer_mask_view")
        save_button = gr.Button("Save caption", elem_id="lora_trainer_save_caption")
        panel_notice = gr.HTML(elem_id="lora_trainer_dataset_notice")
        return cls(folder, load_button, info, gallery, selected_image, caption_box, mask_view, save_button,
                   panel_notice, gr.State([]))

    @property
    def view_outputs(self) -> list:
        """What `view` updates."""
        return [self.gallery, self.info, self.image_paths]

    def view(self, folder_text: str) -> dict:
        """The gallery and summary of the folder as it is now."""
        if not str(folder_text or "").strip():
            return {self.gallery: [], self.info: "", self.image_paths: []}
        try:
            contents = dataset_contents(folder_text)
        except UserError as error:
            return {self.gallery: [], self.info: notice(str(error), error=True), self.image_paths: []}
        labels = [UNREADABLE_CAPTION if caption is None else caption or NO_CAPTION for _, caption in contents.images]
        return {self.gallery: [(str(preview), label) for preview, label in zip(contents.previews, labels)],
                self.info: contents.summary_html(dataset_folder(folder_text)),
                self.image_paths: [str(path) for path, _ in contents.images]}

    def load(self, folder_text: str) -> dict:
        """The folder's view with the caption editor cleared."""
        import gradio as gr

        return {**self.view(folder_text), self.selected_image: "", self.caption_box: "",
                self.mask_view: gr.update(value=None, visible=False), self.notice: ""}

    @property
    def load_outputs(self) -> list:
        """What `load` updates."""
        return [*self.view_outputs, self.selected_image, self.caption_box, self.mask_view, self.notice]

    def reload_after(self, event: Any) -> None:
        """Load the folder again after `event` (one that may change the folder box)."""
        event.then(self.load, [self.folder], self.load_outputs)

    def wire(self, mask_folder: Any) -> None:
        """Connect the panel's own events; `mask_folder` is the form's `mask_dir` field."""
        import gradio as gr

        def select_image(paths: list[str], mask_folder: str, event: gr.SelectData) -> dict:
            path = Path(paths[event.index])
            try:
                caption = read_caption(path)
            except UnicodeDecodeError:
                caption = ""
            try:
                overlay = mask_overlay(path, Path(mask_folder) if str(mask_folder or "").strip() else None)
            except (OSError, UnreadableImage):
                overlay = None  # the gallery's summary already lists an unreadable mask
            return {self.selected_image: str(path), self.caption_box: caption,
                    self.mask_view: gr.update(value=overlay, visible=overlay is not None)}

        # gradio finds the event argument by its type; the string annotation cannot name the local `gr`.
        select_image.__annotations__["event"] = gr.SelectData

        def save_selected_caption(folder_text: str, image: str, caption: str) -> dict:
            try:
                path = save_caption(folder_text, image, caption)
            except UserError as error:
                return {self.notice: notice(str(error), error=True)}
            return {**self.view(folder_text), self.notice: notice(f"Saved {path.name}.")}

        self.load_button.click(self.load, [self.folder], self.load_outputs)
        self.folder.submit(self.load, [self.folder], self.load_outputs)
        self.gallery.select(select_image, [self.image_paths, mask_folder],
                            [self.selected_image, self.caption_box, self.mask_view])
        self.save_button.click(save_selected_caption, [self.folder, self.selected_image, self.caption_box],
                               [self.notice, *self.view_outputs])
