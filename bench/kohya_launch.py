"""Run kohya sd-scripts' `train_network.py` unchanged, on the bench's reduced-width SD1 model.

    <kohya python> bench/kohya_launch.py <kohya dir> <unet widths, e.g. 64,128,256,256> <kohya|attention> ARGS...

Run by `bench/peers.py` with kohya's own interpreter, so it imports nothing of ours. Two settings kohya has no
option for are made here, before its script runs:
- its U-Net class (`library/original_unet.py`) takes the channel widths from module constants fixed at SD1.5's
  (320, 640, 1280, 1280) whatever the loaded config says; the bench's model is narrower.
- `networks.lora` adapts every Linear and 1x1 Conv2d inside the classes listed in
  `UNET_TARGET_REPLACE_MODULE` (`Transformer2DModel`: kohya's default layer set). Listing its attention class
  instead (`CrossAttention`: to_q, to_k, to_v, to_out.0) gives the attention-only set the other trainers use.
"""

import runpy
import sys


def main() -> None:
    kohya_dir, widths, layer_set, *kohya_arguments = sys.argv[1:]
    sys.path.insert(0, kohya_dir)
    import library.original_unet as original_unet
    import networks.lora

    block_out_channels = tuple(int(width) for width in widths.split(","))
    original_unet.BLOCK_OUT_CHANNELS = block_out_channels
    original_unet.TIMESTEP_INPUT_DIM = block_out_channels[0]
    original_unet.TIME_EMBED_DIM = block_out_channels[0] * 4
    if layer_set == "attention":
        networks.lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = ["CrossAttention"]
    script = f"{kohya_dir}/train_network.py"
    sys.argv = [script, *kohya_arguments]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
