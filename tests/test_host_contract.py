"""The host contract: what every `lora_trainer.host.Host` does, checked on the one host a test can build.

The WebUI's adapter (`scripts/lora_trainer_webui.py`) implements the same contract over AUTOMATIC1111's
objects. The WebUI skin's `install.py` and `preload.py` run without the WebUI and are checked here too.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fake_host import FakeHost

import install
import preload
from lora_trainer.config import config_from_dict
from lora_trainer.errors import UserError
from lora_trainer.host import Host, RenderDefaults, RenderRequest, list_loras
from lora_trainer.jobs import JobRunner
from lora_trainer.lora.files import save_kohya
from lora_trainer.lora.network import LoraNetwork
from lora_trainer.lora.targets import find_lora_targets

NO_DEADLOCK_SECONDS = 30
WEBUI_PINNED = {
    "torch", "torchvision", "xformers", "setuptools", "gitpython", "pillow", "accelerate", "blendmodes", "clean-fid",
    "diskcache", "einops", "facexlib", "fastapi", "gradio", "httpcore", "inflection", "jsonmerge", "kornia", "lark",
    "numpy", "omegaconf", "open-clip-torch", "piexif", "protobuf", "psutil", "pytorch_lightning", "resize-right",
    "safetensors", "scikit-image", "spandrel", "spandrel-extra-arches", "tomesd", "torchdiffeq", "torchsde",
    "transformers", "httpx", "pillow-avif-plugin", "pydantic"}
"""What AUTOMATIC1111 v1.10.1 pins (requirements_versions.txt, TORCH_COMMAND) or gets through its pins (pydantic)."""
FORGE_PINS = {
    "setuptools": "69.5.1", "gitpython": "3.1.32", "pillow": "9.5.0", "accelerate": "0.31.0", "blendmodes": "2022",
    "clean-fid": "0.1.35", "diskcache": "5.6.3", "einops": "0.4.1", "facexlib": "0.3.0", "fastapi": "0.104.1",
    "gradio": "4.40.0", "httpcore": "0.15", "inflection": "0.5.1", "jsonmerge": "1.8.0", "kornia": "0.6.7",
    "lark": "1.1.2", "numpy": "1.26.2", "omegaconf": "2.2.3", "open-clip-torch": "2.20.0", "piexif": "1.1.3",
    "protobuf": "3.20.0", "psutil": "5.9.5", "pytorch_lightning": "1.9.4", "resize-right": "0.0.2",
    "safetensors": "0.4.2", "scikit-image": "0.21.0", "spandrel": "0.3.4", "spandrel-extra-arches": "0.1.1",
    "tomesd": "0.1.3", "torchdiffeq": "0.2.3", "torchsde": "0.2.6", "transformers": "4.46.1", "httpx": "0.24.1",
    "pillow-avif-plugin": "1.4.3", "diffusers": "0.31.0", "gradio_rangeslider": "0.0.6",
    "gradio_imageslider": "0.0.20", "loadimg": "0.1.2", "tqdm": "4.66.1", "peft": "0.13.2", "pydantic": "2.8.2",
    "huggingface-hub": "0.26.2"}
"""What Stable Diffusion WebUI Forge pins (requirements_versions.txt at dfdcbab6; torch comes from its
TORCH_COMMAND)."""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("ldm")
    from ldm_models import tiny_sd1

    return tiny_sd1(tmp_path_factory.mktemp("sd1"))


@pytest.fixture
def host(model, tmp_path) -> FakeHost:
    return FakeHost(model, tmp_path / "Lora")


def press_interrupt(host: FakeHost) -> None:
    """The host's own Interrupt button."""
    host.task.interrupt.set()


def press_stop_generating(host: FakeHost) -> None:
    """The host's "stop after the current item" (A1111's Interrupt under "Don't Interrupt in the middle")."""
    host.task.stop_generating.set()


def registered_names(host: FakeHost) -> list[str]:
    """The LoRA names the host was asked to register, in order."""
    return host.registered


def run_in_thread(work) -> BaseException | None:
    """Run `work` in another thread; fail if it has not ended in time (a deadlock); return what it raised."""
    raised: list[BaseException] = []

    def target():
        try:
            work()
        except BaseException as error:  # handed back to the test
            raised.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(NO_DEADLOCK_SECONDS)
    assert not thread.is_alive(), "deadlock: the call did not return"
    return raised[0] if raised else None


def take_and_release(host: FakeHost) -> None:
    with host.busy("next"):
        pass


def write_lora(host: FakeHost, name: str) -> Path:
    """A LoRA file in the host's folder whose weights change the image (the `up` matrices are not zero)."""
    with host.busy("make a LoRA"):
        backend = host.loaded_model_backend()
    config = config_from_dict(dict(lora_rank=4, train_text_encoder=True))
    network = LoraNetwork(find_lora_targets(backend.lora_roots(), config.network))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.lora_modules.values():
            module.up.copy_(torch.randn(module.up.shape, generator=generator) * 0.5)
    return save_kohya(Path(host.lora_dir()) / f"{name}.safetensors", network, {})


def render(host: FakeHost, prompt: str, seed: int = 1) -> bytes:
    defaults = host.render_defaults()
    request = RenderRequest(prompt=prompt, seed=seed, steps=defaults.steps, cfg_scale=defaults.cfg_scale,
                            width=defaults.width, height=defaults.height, sampler_name=defaults.sampler_name)
    with host.busy("render"):
        return host.render(request).tobytes()


def test_busy_shows_a_job_that_starts_uninterrupted(host):
    with host.busy("job") as task:
        assert not task.interrupted()
        task.update(1, 2, "step 1 of 2")


def test_busy_is_not_reentrant_and_a_nested_busy_fails_at_once_instead_of_deadlocking(host):
    def nested():
        with host.busy("outer"), host.busy("inner"):
            pass

    assert isinstance(run_in_thread(nested), UserError)


def test_busy_is_exclusive_and_another_thread_is_refused_at_once(host):
    with host.busy("first"):
        def second():
            with host.busy("second"):
                pass

        assert isinstance(run_in_thread(second), UserError)


def test_busy_is_released_when_the_job_fails(host):
    with pytest.raises(ValueError), host.busy("failing"):
        raise ValueError("the job failed")
    assert run_in_thread(lambda: take_and_release(host)) is None


def test_a_job_after_an_interrupted_one_starts_uninterrupted(host):
    with host.busy("interrupted") as task:
        press_interrupt(host)
        assert task.interrupted()
    with host.busy("next") as task:
        assert not task.interrupted()


def test_a_job_after_a_stop_request_starts_without_one(host):
    with host.busy("stopped") as task:
        press_stop_generating(host)
        assert task.stop_requested() and not task.interrupted()
    with host.busy("next") as task:
        assert not task.stop_requested()


def test_the_loaded_model_is_handed_out_only_inside_busy(host):
    with pytest.raises(AssertionError):
        host.loaded_model_backend()


def test_the_backend_trains_the_loaded_model_of_the_reported_family(host):
    with host.busy("train"):
        backend = host.loaded_model_backend()
    assert backend.family == host.model_family()


def test_render_outside_busy_is_refused(host):
    with pytest.raises(AssertionError):
        host.render(RenderRequest("a red shape", width=32, height=32, steps=2))


def test_render_defaults_make_a_request_the_host_renders(host):
    defaults = host.render_defaults()
    assert isinstance(defaults, RenderDefaults) and defaults.sampler_name
    request = RenderRequest(prompt="a red shape", steps=defaults.steps, cfg_scale=defaults.cfg_scale,
                            width=defaults.width, height=defaults.height, sampler_name=defaults.sampler_name)
    with host.busy("render"):
        image = host.render(request)
    assert image.size == (defaults.width, defaults.height)


def test_render_is_repeatable_for_a_seed_and_varies_with_it(host):
    assert render(host, "a red shape", seed=1) == render(host, "a red shape", seed=1)
    assert render(host, "a red shape", seed=1) != render(host, "a red shape", seed=2)


def test_a_lora_tag_at_weight_zero_renders_the_base_image_exactly(host):
    write_lora(host, "contract")
    assert render(host, "a red shape <lora:contract:0>") == render(host, "a red shape")


def test_a_lora_tag_at_weight_one_changes_the_image(host):
    write_lora(host, "contract")
    assert render(host, "a red shape <lora:contract:1>") != render(host, "a red shape")


def test_a_training_job_registers_every_saved_file_once_and_ends_without_deadlock(host, shapes_dataset):
    config = config_from_dict(dict(train_data_dir=shapes_dataset, resolution=32, bucket_step=8, lora_rank=4,
                                   max_train_steps=3, save_every_n_steps=1, output_name="contract", logging_dir=None))
    runner = JobRunner(host)
    runner.start_training(config, preview_prompt="sks, a red shape")
    status = runner.wait(120)
    assert status.state == "finished", status.message
    assert registered_names(host) == [path.stem for path in status.saved]
    assert len(set(registered_names(host))) == len(status.saved) == 3
    assert set(list_loras(host)) == set(status.saved)
    assert run_in_thread(lambda: take_and_release(host)) is None


def test_the_folders_are_paths(host):
    assert isinstance(Path(host.lora_dir()), Path) and isinstance(Path(host.grids_dir()), Path)
    assert host.datasets_dir() is None or isinstance(host.datasets_dir(), Path)
    assert isinstance(Path(host.queue_dir()), Path)


def test_the_fake_and_the_webui_adapters_implement_every_method_of_the_host_protocol():
    import ast

    protocol = {name for name, value in vars(Host).items() if callable(value) and not name.startswith("_")}
    skin = ast.parse((Path(__file__).resolve().parents[1] / "scripts" / "lora_trainer_webui.py").read_text())
    a1111 = next(node for node in skin.body if isinstance(node, ast.ClassDef) and node.name == "A1111Host")
    assert protocol - {node.name for node in a1111.body if isinstance(node, ast.FunctionDef)} == set()
    assert {name for name in protocol if not callable(getattr(FakeHost, name, None))} == set()


def test_install_adds_nothing_to_a_webui_that_has_every_package():
    assert install.missing_requirements(lambda module: True) == []
    assert install.missing_webui_packages(lambda module: True) == []


def test_install_adds_a_missing_package_exactly_pinned_and_without_its_dependencies():
    assert install.missing_requirements(lambda module: module != "yaml") == ["PyYAML==6.0.1"]
    assert install.pip_arguments("PyYAML==6.0.1") == "install --no-deps PyYAML==6.0.1"


def test_install_never_installs_or_changes_what_the_webui_pins():
    everything_missing = install.missing_requirements(lambda module: False)
    names = {requirement.split("==")[0].lower() for requirement in everything_missing}
    assert names and not names & WEBUI_PINNED
    assert all("==" in requirement for requirement in everything_missing)
    assert "torch" in install.missing_webui_packages(lambda module: False)


def test_install_never_installs_a_version_forge_pins_otherwise():
    everything_missing = install.missing_requirements(lambda module: False)
    for requirement in everything_missing:
        name, version = requirement.lower().split("==")
        assert FORGE_PINS.get(name, version) == version, requirement
    assert "torch" in install.missing_webui_packages(lambda module: False)


def test_install_runs_pip_through_the_webui_only_for_what_is_missing(monkeypatch, capsys):
    calls = []
    launch = SimpleNamespace(is_installed=lambda module: module not in ("tqdm", "torch"),
                             run_pip=lambda arguments, description: calls.append(arguments))
    monkeypatch.setitem(sys.modules, "launch", launch)
    install.main()
    assert calls == ["install --no-deps tqdm==4.66.1"]
    printed = capsys.readouterr().out
    assert "installing tqdm==4.66.1" in printed and "torch are missing" in printed


def test_preload_adds_the_datasets_dir_option(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    preload.preload(parser)
    assert parser.parse_args([]).lora_trainer_datasets_dir is None
    monkeypatch.chdir(tmp_path)
    chosen = parser.parse_args(["--lora-trainer-datasets-dir", "sets"]).lora_trainer_datasets_dir
    assert chosen == str(tmp_path / "sets")
