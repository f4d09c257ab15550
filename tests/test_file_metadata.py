"""Metadata as kohya writes it, and the precision files are saved in."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

pytest.importorskip("diffusers")

import safetensors.torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from lora_trainer.config import config_from_dict  # noqa: E402
from lora_trainer.models.diffusers_backend import DiffusersBackend  # noqa: E402
from lora_trainer.tiny import tiny_sd_pipeline  # noqa: E402
from lora_trainer.train.loop import train  # noqa: E402


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return {family: tiny_sd_pipeline(family, seed=0, tokenizer_folder=folder) for family in ("sd1", "sd2")}


def _train(pipeline, dataset, tmp_path, **overrides):
    settings = dict(train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=4, max_train_steps=1,
                    output_dir=tmp_path / "out", logging_dir=None)
    path = train(config_from_dict({**settings, **overrides}), DiffusersBackend(pipeline, "cpu")).saved[-1]
    with safe_open(str(path), "pt") as handle:
        return path, handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}


def test_sd2_v_prediction_is_kohyas_sd_v2_v(pipelines, shapes_dataset, tmp_path):
    _, metadata, _ = _train(pipelines["sd2"], shapes_dataset, tmp_path)
    assert metadata["ss_base_model_version"] == "sd_v2_v"


def test_num_epochs_is_the_runs_when_max_train_steps_sets_its_length(pipelines, shapes_dataset, tmp_path):
    # 4 images in batches of 2: 2 steps an epoch, so 5 steps take 3 epochs.
    _, metadata, _ = _train(pipelines["sd1"], shapes_dataset, tmp_path, batch_size=2, max_train_steps=5, epochs=1)
    assert metadata["ss_num_epochs"] == "3"


def test_images_in_the_dataset_folder_are_listed_under_its_name(pipelines, shapes_dataset, tmp_path):
    _, metadata, _ = _train(pipelines["sd1"], shapes_dataset, tmp_path)
    assert json.loads(metadata["ss_dataset_dirs"]) == {"dataset": {"n_repeats": 1, "img_count": 4}}
    assert list(json.loads(metadata["ss_tag_frequency"])) == ["dataset"]


def test_kohyas_precomputed_hashes_match_the_file(pipelines, shapes_dataset, tmp_path):
    path, metadata, tensors = _train(pipelines["sd1"], shapes_dataset, tmp_path)
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_length:]).hexdigest()
    training_only = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(training_only[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_precision_sets_the_tensor_type_of_the_file(precision, dtype, pipelines, shapes_dataset, tmp_path):
    _, _, tensors = _train(pipelines["sd1"], shapes_dataset, tmp_path, save_precision=precision)
    assert {tensor.dtype for tensor in tensors.values()} == {dtype}
