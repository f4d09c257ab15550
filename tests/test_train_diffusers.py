"""End-to-end training on tiny diffusers models, and the exported file read back by diffusers itself."""

from __future__ import annotations

import copy
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from measures import TINY_SIZES, fixed_noise_loss  # noqa: E402

from lora_trainer.config import TrainConfig, config_from_dict  # noqa: E402
from lora_trainer.errors import UserError  # noqa: E402
from lora_trainer.lora.targets import network_from_file  # noqa: E402
from lora_trainer.models.diffusers_backend import DiffusersBackend  # noqa: E402
from lora_trainer.tiny import tiny_sd_pipeline  # noqa: E402
from lora_trainer.train.events import TrainingEvents  # noqa: E402
from lora_trainer.train.loop import train  # noqa: E402


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    return {family: tiny_sd_pipeline(family, seed=0, tokenizer_folder=folder) for family in ("sd1", "sd2", "sdxl")}


def _config(dataset, output_dir, **overrides) -> TrainConfig:
    settings = dict(train_data_dir=dataset, resolution=32, bucket_step=8, lora_rank=4, learning_rate=2e-3,
                    batch_size=2, max_train_steps=40, output_dir=output_dir, logging_dir=None, log_every_n_steps=1)
    settings.update(overrides)
    return config_from_dict(settings)


class _Recorder(TrainingEvents):
    def __init__(self, stop_at: int | None = None, save_at: int | None = None):
        self.losses: list[float] = []
        self.stop_at, self.save_at, self.step = stop_at, save_at, 0

    def on_step(self, report):
        self.step = report.step
        if report.loss is not None:
            self.losses.append(report.loss)

    def should_stop(self):
        return self.stop_at is not None and self.step >= self.stop_at

    def save_requested(self):
        return self.save_at is not None and self.step == self.save_at


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_trained_lora_lowers_the_denoising_loss_on_its_training_images(family, pipelines, shapes_dataset, tmp_path):
    backend = DiffusersBackend(pipelines[family], "cpu")
    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=60, learning_rate=1e-2)
    result = train(config, backend)
    network = network_from_file(backend.lora_roots(), result.saved[-1])
    with network.applied(0.0):
        base_loss = fixed_noise_loss(backend, config)
    with network.applied(1.0):
        trained_loss = fixed_noise_loss(backend, config)
    # Measured (60 steps, lr 1e-2): sd1 1.206 -> 0.751 (x0.62), sdxl 1.162 -> 1.038 (x0.89).
    bound = {"sd1": 0.8, "sdxl": 0.95}[family]
    assert trained_loss < bound * base_loss, f"{family}: {base_loss:.4f} -> {trained_loss:.4f}"


def test_training_leaves_the_model_bit_identical(pipelines, shapes_dataset, tmp_path):
    pipeline = pipelines["sd1"]
    modules = [pipeline.unet, pipeline.text_encoder, pipeline.vae]
    before = [copy.deepcopy(m.state_dict()) for m in modules]
    flags = [[p.requires_grad for p in m.parameters()] for m in modules]
    train(_config(shapes_dataset, tmp_path / "out", max_train_steps=3, train_text_encoder=True,
                  gradient_checkpointing=True), DiffusersBackend(pipeline, "cpu"))
    for module, state, module_flags in zip(modules, before, flags):
        assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
        assert [p.requires_grad for p in module.parameters()] == module_flags
        assert not any(m._forward_hooks for m in module.modules())
    assert not pipeline.unet.is_gradient_checkpointing


@pytest.mark.parametrize(("family", "alpha", "text_encoder"), [
    ("sd1", None, False), ("sd1", 2.0, True), ("sd2", 8.0, True), ("sdxl", 2.0, True)])
def test_diffusers_load_lora_weights_reproduces_our_outputs(family, alpha, text_encoder, pipelines,
                                                            shapes_dataset, tmp_path):
    backend = DiffusersBackend(pipelines[family], "cpu")
    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=5, lora_alpha=alpha,
                     train_text_encoder=text_encoder, learning_rate=1e-2)
    path = train(config, backend).saved[-1]

    reference = copy.deepcopy(pipelines[family])
    reference.load_lora_weights(str(path.parent), weight_name=path.name)
    reference_backend = DiffusersBackend(reference, "cpu")

    torch.manual_seed(0)
    latents = torch.randn(1, 4, 16, 16)
    timesteps = torch.tensor([500])
    sizes = TINY_SIZES
    captions = ["sks, a red shape"]
    network = network_from_file(backend.lora_roots(), path)
    with torch.no_grad():
        with network.applied(1.0):
            ours_text = backend.encode_text(captions)
            ours = backend.predict(latents, timesteps, ours_text, sizes)
        with network.applied(0.0):
            base = backend.predict(latents, timesteps, backend.encode_text(captions), sizes)
        theirs_text = reference_backend.encode_text(captions)
        theirs = reference_backend.predict(latents, timesteps, theirs_text, sizes)
        reference.disable_lora()
        theirs_base = reference_backend.predict(latents, timesteps, reference_backend.encode_text(captions), sizes)
    assert (ours - base).abs().max() > 1e-3  # the LoRA does something
    assert (ours_text.context - theirs_text.context).abs().max() <= 1e-4
    assert (ours - theirs).abs().max() <= 1e-4
    assert torch.equal(base, theirs_base)


def test_init_lora_weights_continues_from_the_saved_weights(pipelines, shapes_dataset, tmp_path):
    backend = DiffusersBackend(pipelines["sd1"], "cpu")
    first = _Recorder()
    path = train(_config(shapes_dataset, tmp_path / "a", max_train_steps=60), backend, first).saved[-1]
    fresh, continued = _Recorder(), _Recorder()
    train(_config(shapes_dataset, tmp_path / "fresh", max_train_steps=3, seed=7), backend, fresh)
    train(_config(shapes_dataset, tmp_path / "b", max_train_steps=3, seed=7, init_lora_weights=path), backend,
          continued)
    last_level = sum(first.losses[-10:]) / 10
    # Measured: fresh start ~1.1, end of the first run ~0.65, continued run ~0.65.
    assert sum(continued.losses) / 3 < 0.5 * (last_level + sum(fresh.losses) / 3)


def test_init_lora_weights_with_another_rank_says_what_differs(pipelines, shapes_dataset, tmp_path):
    backend = DiffusersBackend(pipelines["sd1"], "cpu")
    path = train(_config(shapes_dataset, tmp_path / "a", max_train_steps=1), backend).saved[-1]
    with pytest.raises(UserError, match=r"rank differs on \d+ layers: the file has rank 4, this run uses 8"):
        train(_config(shapes_dataset, tmp_path / "b", max_train_steps=1, lora_rank=8, init_lora_weights=path),
              backend)


def test_init_lora_weights_from_another_family_is_refused(pipelines, shapes_dataset, tmp_path):
    sdxl_file = train(_config(shapes_dataset, tmp_path / "xl", max_train_steps=1),
                      DiffusersBackend(pipelines["sdxl"], "cpu")).saved[-1]
    with pytest.raises(UserError, match="does not match this run"):
        train(_config(shapes_dataset, tmp_path / "b", max_train_steps=1, init_lora_weights=sdxl_file),
              DiffusersBackend(pipelines["sd1"], "cpu"))


def test_an_existing_output_is_never_overwritten(pipelines, shapes_dataset, tmp_path):
    backend = DiffusersBackend(pipelines["sd1"], "cpu")
    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=2, save_every_n_steps=1)
    first = train(config, backend).saved
    contents = {path: path.read_bytes() for path in first}
    with pytest.raises(UserError, match="already exists"):
        train(config, backend)
    assert {path: path.read_bytes() for path in first} == contents


def test_metadata_says_family_dimensions_and_dataset(pipelines, shapes_dataset, tmp_path):
    from safetensors import safe_open

    path = train(_config(shapes_dataset, tmp_path / "out", max_train_steps=2, lora_alpha=2.0),
                 DiffusersBackend(pipelines["sdxl"], "cpu", model_name="tiny-xl")).saved[-1]
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        keys = list(handle.keys())
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2.0")
    assert metadata["ss_sd_model_name"] == "tiny-xl" and metadata["ss_steps"] == "2"
    assert '"sks": 4' in metadata["ss_tag_frequency"]
    assert any(key.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for key in keys)


def test_stop_and_save_now_write_step_versioned_files(pipelines, shapes_dataset, tmp_path):
    events = _Recorder(stop_at=4, save_at=2)
    result = train(_config(shapes_dataset, tmp_path / "out", max_train_steps=50), DiffusersBackend(
        pipelines["sd1"], "cpu"), events)
    assert result.stopped and result.steps == 4
    assert [p.name for p in result.saved] == ["lora-s000002.safetensors", "lora-s000004.safetensors"]


def test_interrupt_saves_the_weights_before_leaving(pipelines, shapes_dataset, tmp_path):
    class Interrupting(TrainingEvents):
        def on_step(self, report):
            if report.step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(shapes_dataset, tmp_path / "out"), DiffusersBackend(pipelines["sd1"], "cpu"), Interrupting())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["lora-interrupted-s000003.safetensors"]


def test_a_save_into_a_folder_that_went_away_keeps_the_weights_in_a_rescue_folder(pipelines, shapes_dataset,
                                                                                   tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    output_dir = tmp_path / "out"

    class ReplacingTheFolder(TrainingEvents):
        def on_step(self, report):
            if report.step == 1:  # someone moves the output folder away and a file takes its name
                shutil.rmtree(output_dir, ignore_errors=True)
                output_dir.write_text("")

    backend = DiffusersBackend(pipelines["sd1"], "cpu")
    with pytest.raises(UserError, match="cannot take the file") as error:
        train(_config(shapes_dataset, output_dir, max_train_steps=2), backend, ReplacingTheFolder())
    rescued = tmp_path / "home" / "lora-trainer-rescue" / "lora.safetensors"
    assert f"kept in {rescued}" in str(error.value)
    assert network_from_file(backend.lora_roots(), rescued).lora_modules


def test_a_full_disk_at_a_save_says_so_leaves_no_partial_file_and_keeps_the_weights(pipelines, shapes_dataset,
                                                                                     tmp_path, monkeypatch):
    from lora_trainer.lora import files

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    output_dir = tmp_path / "out"
    write_safetensors = files.save_file

    def full_disk_in_output_dir(state, filename, metadata=None):
        if Path(filename).parent == output_dir:
            Path(filename).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_safetensors(state, filename, metadata=metadata)

    monkeypatch.setattr(files, "save_file", full_disk_in_output_dir)
    with pytest.raises(UserError, match=f"the disk holding {output_dir} is full") as error:
        train(_config(shapes_dataset, output_dir, max_train_steps=2, save_state=True),
              DiffusersBackend(pipelines["sd1"], "cpu"))
    rescued = tmp_path / "home" / "lora-trainer-rescue" / "lora.safetensors"
    assert f"kept in {rescued}" in str(error.value)
    assert rescued.is_file() and (rescued.with_suffix(".state") / "training_state.pt").is_file()
    assert list(output_dir.iterdir()) == []


def test_a_full_disk_at_a_state_save_says_so_and_keeps_weights_and_state_elsewhere(pipelines, shapes_dataset,
                                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    output_dir = tmp_path / "out"
    write_state = torch.save

    def full_disk_in_output_dir(state, filename, *arguments, **options):
        if Path(filename).parent.parent == output_dir:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_state(state, filename, *arguments, **options)

    monkeypatch.setattr(torch, "save", full_disk_in_output_dir)
    with pytest.raises(UserError, match=f"the disk holding {output_dir} is full") as error:
        train(_config(shapes_dataset, output_dir, max_train_steps=2, save_state=True),
              DiffusersBackend(pipelines["sd1"], "cpu"))
    rescued = tmp_path / "home" / "lora-trainer-rescue" / "lora.safetensors"
    assert f"kept in {rescued}" in str(error.value)
    assert (rescued.with_suffix(".state") / "training_state.pt").is_file()
    assert not list(output_dir.glob("*.state/*"))


def test_nan_loss_stops_with_a_clear_message_and_writes_nothing(pipelines, shapes_dataset, tmp_path):
    with pytest.raises(UserError, match="NaN|nan|inf"):
        train(_config(shapes_dataset, tmp_path / "out", learning_rate=1e30, max_grad_norm=None),
              DiffusersBackend(pipelines["sd1"], "cpu"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_weights_that_became_nan_after_the_last_loss_are_not_saved(pipelines, shapes_dataset, tmp_path, monkeypatch):
    from lora_trainer.train import loop

    make_optimizer = loop.make_optimizer

    def optimizer_that_breaks_the_last_weight(config, groups):
        optimizer = make_optimizer(config, groups)

        def break_the_last_weight(optimizer, arguments, options):
            with torch.no_grad():
                optimizer.param_groups[-1]["params"][-1].view(-1)[-1] = float("inf")

        optimizer.register_step_post_hook(break_the_last_weight)
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", optimizer_that_breaks_the_last_weight)
    with pytest.raises(UserError, match="the LoRA weights became NaN/inf by step 1; nothing was saved"):
        train(_config(shapes_dataset, tmp_path / "out", max_train_steps=1), DiffusersBackend(pipelines["sd1"], "cpu"))
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_a_stop_while_the_latents_are_cached_ends_the_run_there_with_nothing_trained_or_saved(
        pipelines, shapes_dataset, tmp_path):
    class StopWhileCaching(TrainingEvents):
        def __init__(self):
            self.cached, self.steps = [], 0

        def on_caching(self, done, total):
            self.cached.append((done, total))

        def on_step(self, report):
            self.steps += 1

        def should_stop(self):
            return bool(self.cached)

    events = StopWhileCaching()
    result = train(_config(shapes_dataset, tmp_path / "out", vae_batch_size=1, max_train_steps=50),
                   DiffusersBackend(pipelines["sd1"], "cpu"), events)
    assert (result.stopped, result.steps, result.saved) == (True, 0, [])
    assert events.cached == [(1, 4)] and events.steps == 0
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_resume_continues_exactly_where_the_state_was_saved(pipelines, shapes_dataset, tmp_path):
    backend = DiffusersBackend(pipelines["sd1"], "cpu")
    straight = _Recorder()
    train(_config(shapes_dataset, tmp_path / "straight", max_train_steps=6), backend, straight)
    first_half = train(_config(shapes_dataset, tmp_path / "resumed", max_train_steps=6, save_every_n_steps=3,
                               save_state=True), backend, _Recorder(stop_at=3))
    state = first_half.saved[0].with_suffix(".state")
    resumed = _Recorder()
    train(_config(shapes_dataset, tmp_path / "resumed", max_train_steps=6, resume=state), backend, resumed)
    assert resumed.losses == pytest.approx(straight.losses[3:], rel=1e-4)


def test_a_single_file_checkpoint_loads_offline_with_a_local_config(pipelines, tmp_path):
    from original_checkpoint import save_original_checkpoint

    from lora_trainer.models.diffusers_backend import load_pipeline

    pipelines["sd1"].save_pretrained(tmp_path / "config")
    checkpoint = save_original_checkpoint(pipelines["sd1"], tmp_path / "model.safetensors")
    loaded = load_pipeline(str(checkpoint), str(tmp_path / "config"))
    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(pipelines["sd1"], name).state_dict()
        for key, value in getattr(loaded, name).state_dict().items():
            assert torch.equal(value, expected[key].reshape(value.shape)), f"{name}.{key}"


def test_a_single_file_without_a_local_config_says_what_to_do_offline(pipelines, tmp_path, monkeypatch):
    from original_checkpoint import save_original_checkpoint

    from lora_trainer.models.diffusers_backend import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = save_original_checkpoint(pipelines["sd1"], tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="base_model_config"):
        load_pipeline(str(checkpoint))


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_clip_skip_2_conditions_on_the_normed_penultimate_layer_in_training_and_sampling(family, pipelines):
    pipeline = pipelines[family]
    captions = ["sks, a red shape", "a blue shape"]
    skipped = DiffusersBackend(pipeline, "cpu", clip_skip=2)
    plain = DiffusersBackend(pipeline, "cpu")
    # What the WebUI does for Clip skip 2 (sd_hijack_clip.py): hidden_states[-2], then the final layer norm.
    token_ids = pipeline.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipeline.text_encoder(token_ids, output_hidden_states=True).hidden_states[-2]
        expected = getattr(pipeline.text_encoder, "text_model", pipeline.text_encoder).final_layer_norm(hidden)
        assert torch.allclose(skipped.encode_text(captions).context, expected, atol=1e-6)
        assert not torch.allclose(skipped.encode_text(captions).context, plain.encode_text(captions).context,
                                  atol=1e-3)
        assert torch.equal(DiffusersBackend(pipeline, "cpu", clip_skip=1).encode_text(captions).context,
                           plain.encode_text(captions).context)
    # Sampling: without clip_skip the pipeline's own prompt encoding; with it, a different image.
    settings = dict(prompt="sks, a red shape", negative_prompt="", seed=3, steps=3, width=32, height=32,
                    guidance_scale=5.0)
    generator = torch.Generator("cpu").manual_seed(3)
    own = pipeline("sks, a red shape", num_inference_steps=3, width=32, height=32, guidance_scale=5.0,
                   generator=generator).images[0]
    assert list(plain.generate(**settings).getdata()) == list(own.getdata())
    assert list(skipped.generate(**settings).getdata()) != list(own.getdata())


def test_clip_skip_is_recorded_and_a_mismatch_with_the_model_is_refused(pipelines, shapes_dataset, tmp_path):
    from safetensors import safe_open

    config = _config(shapes_dataset, tmp_path / "out", max_train_steps=1, clip_skip=2)
    path = train(config, DiffusersBackend(pipelines["sd1"], "cpu", clip_skip=2)).saved[-1]
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["ss_clip_skip"] == "2"
    with pytest.raises(UserError, match="clip_skip 2, but this model's text conditioning uses 1"):
        train(_config(shapes_dataset, tmp_path / "other", clip_skip=2), DiffusersBackend(pipelines["sd1"], "cpu"))
    with pytest.raises(UserError, match="SD1 and SD2 only"):
        DiffusersBackend(pipelines["sdxl"], "cpu", clip_skip=2)
    with pytest.raises(UserError, match="clip_skip"):
        config_from_dict(dict(clip_skip=0))


def test_text_encoder_layers_after_the_conditioning_layer_are_neither_trained_nor_saved(pipelines, shapes_dataset,
                                                                                         tmp_path):
    from safetensors import safe_open

    def text_layers(path) -> set[str]:
        with safe_open(str(path), "pt") as handle:
            return {key.split("_layers_")[0] + "_layers_" + key.split("_layers_")[1].split("_")[0]
                    for key in handle.keys() if key.startswith("lora_te")}

    def trained(family: str, name: str, clip_skip: int | None = None, **overrides):
        config = _config(shapes_dataset, tmp_path / "out", max_train_steps=1, train_text_encoder=True,
                         output_name=name, clip_skip=clip_skip, **overrides)
        return train(config, DiffusersBackend(pipelines[family], "cpu", clip_skip=clip_skip)).saved[-1]

    last = pipelines["sd1"].text_encoder.config.num_hidden_layers - 1
    full = trained("sd1", "full")
    assert f"lora_te_text_model_encoder_layers_{last}" in text_layers(full)
    assert text_layers(trained("sd1", "skip2", clip_skip=2)) == text_layers(full) - {
        f"lora_te_text_model_encoder_layers_{last}"}
    # A file that adapts the skipped layer still starts a clip-skip-2 run (that layer is left out).
    trained("sd1", "from-full", clip_skip=2, init_lora_weights=str(full))
    sdxl_layers = text_layers(trained("sdxl", "xl"))
    assert f"lora_te1_text_model_encoder_layers_{last}" not in sdxl_layers
    assert f"lora_te2_text_model_encoder_layers_{last}" in sdxl_layers
