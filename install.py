"""Run by the WebUI on every launch (`launch_utils.run_extension_installer`), in its own Python environment.

The extension needs nothing the WebUI does not already have. Its own packages (torch, transformers,
open_clip...) are pinned by the WebUI, which puts its pins back on every launch: they are checked, never
installed or changed here. PyYAML and tqdm come with the WebUI's packages too (omegaconf, transformers);
they are installed only if missing, exactly pinned and with --no-deps, so that nothing else moves.
TensorBoard is optional (training logs are skipped with a message without it) and never installed.
"""

from __future__ import annotations

from collections.abc import Callable

WEBUI_PACKAGES = ("torch", "safetensors", "transformers", "accelerate", "open_clip", "numpy", "PIL", "gradio")
"""Modules the extension imports that the WebUI itself installs and pins (requirements_versions.txt)."""
OWN_REQUIREMENTS = {"yaml": "PyYAML==6.0.1", "tqdm": "tqdm==4.66.1"}
"""Module -> what to install when it is missing."""


def missing_requirements(is_installed: Callable[[str], bool]) -> list[str]:
    """The pinned requirements to install: those of `OWN_REQUIREMENTS` whose module is missing."""
    return [requirement for module, requirement in OWN_REQUIREMENTS.items() if not is_installed(module)]


def missing_webui_packages(is_installed: Callable[[str], bool]) -> list[str]:
    """The WebUI's own packages that are missing: a broken WebUI install, for the WebUI's installer to fix."""
    return [module for module in WEBUI_PACKAGES if not is_installed(module)]


def pip_arguments(requirement: str) -> str:
    """The `launch.run_pip` arguments that install exactly `requirement` and nothing else."""
    return f"install --no-deps {requirement}"


def main() -> None:
    import launch

    for requirement in missing_requirements(launch.is_installed):
        print(f"sd-webui-lora-trainer: installing {requirement} (missing; --no-deps, so nothing else changes)")
        launch.run_pip(pip_arguments(requirement), f"{requirement} for sd-webui-lora-trainer")
    broken = missing_webui_packages(launch.is_installed)
    if broken:
        print(f"sd-webui-lora-trainer: the WebUI's own packages {', '.join(broken)} are missing; this extension "
              "does not install them (the WebUI pins them): run the WebUI's installer again (webui.sh / webui.bat)")


if __name__ == "__main__":
    main()
