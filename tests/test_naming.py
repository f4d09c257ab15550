"""kohya key names: diffusers <-> original (compvis) UNet names, checked against known real-model pairs."""

import pytest

from lora_trainer.lora.naming import hf_clip_path, kohya_key, unet_compvis_to_diffusers, unet_diffusers_to_compvis

# SD1.5's UNet: 4 levels, 2 resnets each, attention on levels 0-2 going down and 1-3 going up.
SD1_UP_BLOCKS_WITH_ATTENTION = {1, 2, 3}
SD1_PAIRS = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.3.resnets.1.time_emb_proj", "input_blocks.11.0.emb_layers.1"),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "middle_block.1.transformer_blocks.0.attn2.to_k"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.resnets.2.conv1", "output_blocks.2.0.in_layers.2"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
     "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj"),
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_2", "time_embed.2"),
]


@pytest.mark.parametrize(("diffusers", "compvis"), SD1_PAIRS)
def test_sd1_unet_names_translate_both_ways(diffusers, compvis):
    assert unet_diffusers_to_compvis(diffusers, 2, SD1_UP_BLOCKS_WITH_ATTENTION) == compvis
    assert unet_compvis_to_diffusers(compvis, 2) == diffusers


def test_sdxl_attention_in_second_level_maps_like_kohya_sdxl_files():
    # SDXL: 3 levels, no attention on level 0; kohya's SDXL keys use these original names.
    assert unet_diffusers_to_compvis("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_v", 2, {0, 1}) == \
        "input_blocks.4.1.transformer_blocks.1.attn1.to_v"
    assert unet_diffusers_to_compvis("up_blocks.0.attentions.2.proj_out", 2, {0, 1}) == "output_blocks.2.1.proj_out"
    assert unet_diffusers_to_compvis("add_embedding.linear_1", 2, {0, 1}) == "label_emb.0.0"


def test_kohya_key_joins_prefix_and_path_with_underscores():
    key = kohya_key("lora_unet", "down_blocks.0.attentions.0.proj_in")
    assert key == "lora_unet_down_blocks_0_attentions_0_proj_in"


def test_text_model_level_is_added_for_transformers_5_paths_and_kept_otherwise():
    assert hf_clip_path("encoder.layers.0.self_attn.q_proj") == "text_model.encoder.layers.0.self_attn.q_proj"
    assert hf_clip_path("text_model.encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
