"""Sample images during training: prompts with kohya's options, kept on disk and in TensorBoard."""

from __future__ import annotations

import pytest

from lora_trainer.config import config_from_dict
from lora_trainer.errors import UserError
from lora_trainer.train.samples import SamplePrompt, parse_prompt_line, sample_prompts

DEFAULTS = SamplePrompt("", "", 512, 512, 20, 1, 7.0)


def test_kohya_prompt_options_set_negative_size_steps_seed_and_cfg():
    sample = parse_prompt_line("sks, a cat --n blurry, ugly --w 768 --h 640 --s 30 --d 5 --l 6.5", DEFAULTS)
    assert sample == SamplePrompt("sks, a cat", "blurry, ugly", 768, 640, 30, 5, 6.5)


def test_a_prompt_without_options_takes_the_configured_defaults():
    assert parse_prompt_line("a dog", DEFAULTS) == SamplePrompt("a dog", "", 512, 512, 20, 1, 7.0)


def test_an_unknown_prompt_option_is_named():
    with pytest.raises(UserError, match="unknown option --x"):
        parse_prompt_line("a dog --x 3", DEFAULTS)


def test_a_prompt_file_adds_its_lines_after_the_inline_prompts(tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# comment\n\na red cat --d 3\na blue dog\n", encoding="utf-8")
    config = config_from_dict({"sample_prompts": ["inline --w 64"], "sample_prompts_file": prompts_file,
                               "resolution": 32, "bucket_step": 8, "sample_seed": 9})
    assert [(p.prompt, p.width, p.seed) for p in sample_prompts(config)] == [
        ("inline", 64, 9), ("a red cat", 32, 3), ("a blue dog", 32, 9)]


def test_samples_are_kept_on_disk_and_in_tensorboard_from_before_the_first_step(shapes_dataset, tmp_path):
    pytest.importorskip("diffusers")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from lora_trainer.models.diffusers_backend import DiffusersBackend
    from lora_trainer.tiny import tiny_sd_pipeline
    from lora_trainer.train.loop import train

    backend = DiffusersBackend(tiny_sd_pipeline("sd1", seed=0, tokenizer_folder=tmp_path / "tok"), "cpu")
    config = config_from_dict(dict(
        train_data_dir=shapes_dataset, resolution=32, bucket_step=8, lora_rank=4, max_train_steps=2,
        output_dir=tmp_path / "out", output_name="run", logging_dir=tmp_path / "logs", sample_steps=2,
        sample_prompts=["sks, a shape", "a red shape --d 7"], sample_every_n_steps=1, sample_at_first=True))
    result = train(config, backend)
    names = sorted(path.name for path in (tmp_path / "out" / "samples").iterdir())
    assert names == ["run-s000000-00-seed1.png", "run-s000000-01-seed7.png", "run-s000001-00-seed1.png",
                     "run-s000001-01-seed7.png", "run-s000002-00-seed1.png", "run-s000002-01-seed7.png"]
    assert sorted(path.name for path in result.samples) == names
    log = event_accumulator.EventAccumulator(str(result.log_folder), size_guidance={"images": 0})
    log.Reload()
    assert sorted(log.Tags()["images"]) == ["samples/00", "samples/01"]
    assert [event.step for event in log.Images("samples/01")] == [0, 1, 2]
