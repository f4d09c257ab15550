#!/bin/bash
# The Python packages bench/gpu_session.sh needs that the device image lacks, as wheels for its Python 3.12, in
# .whl/ (git ignores it; name it in the device call's carry). The image has torch, transformers, accelerate,
# peft, safetensors, tensorboard and pytorch-lightning 2; ours-webui needs the WebUI's ldm and its pins.
set -eu
cd "$(dirname "$0")/.."
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl diffusers==0.42.1 importlib_metadata open_clip_torch ftfy wcwidth stable-diffusion-sdkit==2.1.5 \
  omegaconf==2.2.3 pytorch_lightning==1.9.4
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # omegaconf 2.2's; an sdist only
du -sh .whl
