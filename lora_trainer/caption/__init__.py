"""Caption a folder of images in place with open_clip: CoCa sentences or CLIP tags."""

from lora_trainer.caption.coca import CocaDecoding
from lora_trainer.caption.folder import CaptionOptions, CaptionReport, FailedImage, caption_folder

__all__ = ["CaptionOptions", "CaptionReport", "CocaDecoding", "FailedImage", "caption_folder"]
