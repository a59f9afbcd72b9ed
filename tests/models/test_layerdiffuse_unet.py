"""Key coverage of the published LayerDiffuse UNet files, against the real SD 1.5 / SDXL UNet layouts.

The published key lists are written down here from the release's documented layout (SGM block
names, rank-256 LoRA on q/k/v/out of every attn1/attn2), not derived from our own model, so a
mapping mistake cannot hide. The UNets are built on the meta device: full size, no memory.
"""
import pytest
import torch
from diffusers import UNet2DConditionModel

from layergen import LayergenError
from layergen.models.layerdiffuse_unet import (load_layerdiffuse_unet, plan_layerdiffuse_unet, sgm_block_map,
                                               widen_conv_in)

SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
SD15 = dict(sample_size=64, cross_attention_dim=768)

# SGM attention blocks of SDXL with their transformer depth and channel width (published layout).
SDXL_ATTN_BLOCKS = {"input_blocks.4.1": (2, 640), "input_blocks.5.1": (2, 640), "input_blocks.7.1": (10, 1280),
                    "input_blocks.8.1": (10, 1280), "middle_block.1": (10, 1280), "output_blocks.0.1": (10, 1280),
                    "output_blocks.1.1": (10, 1280), "output_blocks.2.1": (10, 1280), "output_blocks.3.1": (2, 640),
                    "output_blocks.4.1": (2, 640), "output_blocks.5.1": (2, 640)}
SD15_ATTN_BLOCKS = {f"input_blocks.{k}.1": (1, c) for k, c in ((1, 320), (2, 320), (4, 640), (5, 640), (7, 1280),
                                                                (8, 1280))}
SD15_ATTN_BLOCKS.update({"middle_block.1": (1, 1280)})
SD15_ATTN_BLOCKS.update({f"output_blocks.{k}.1": (1, c) for k, c in ((3, 1280), (4, 1280), (5, 1280), (6, 640),
                                                                     (7, 640), (8, 640), (9, 320), (10, 320),
                                                                     (11, 320))})


def published_attn_lora(blocks, context_dim, rank=256):
    keys = {}
    for blk, (depth, ch) in blocks.items():
        for n in range(depth):
            for attn in ("attn1", "attn2"):
                for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                    in_dim = context_dim if attn == "attn2" and proj in ("to_k", "to_v") else ch
                    base = f"diffusion_model.{blk}.transformer_blocks.{n}.{attn}.{proj}.weight"
                    keys[base + "::lora::0"] = torch.Size((ch, rank))
                    keys[base + "::lora::1"] = torch.Size((rank, in_dim))
    return keys


def meta_unet(cfg):
    with torch.device("meta"):
        return UNet2DConditionModel(**cfg)


def fake(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_sdxl_transparent_attn_every_key_has_a_home():
    unet = meta_unet(SDXL)
    keys = published_attn_lora(SDXL_ATTN_BLOCKS, 2048)
    assert len(keys) == 2 * 70 * 2 * 4, "70 transformer blocks x attn1/attn2 x q/k/v/out x up/down"
    plan = plan_layerdiffuse_unet(unet, fake(keys))
    assert len(plan) == len(keys) // 2
    assert "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight" in plan
    assert "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0.weight" in plan
    assert "mid_block.attentions.0.transformer_blocks.9.attn2.to_v.weight" in plan


def test_sd15_attention_blocks_map_to_every_cross_attention_layer():
    unet = meta_unet(SD15)
    plan = plan_layerdiffuse_unet(unet, fake(published_attn_lora(SD15_ATTN_BLOCKS, 768, rank=8)))
    attn2 = {k for k in plan if ".attn2.to_q" in k}
    assert len(attn2) == 16, "SD 1.5 has 16 cross-attention layers"


def test_dense_offsets_for_resnets_and_embeddings_map_with_shapes():
    unet = meta_unet(SDXL)
    shapes = {"diffusion_model.input_blocks.0.0.weight::diff::": (320, 4, 3, 3),
              "diffusion_model.input_blocks.1.0.in_layers.2.weight::diff::": (320, 320, 3, 3),
              "diffusion_model.input_blocks.3.0.op.weight::diff::": (320, 320, 3, 3),
              "diffusion_model.input_blocks.4.0.skip_connection.weight::diff::": (640, 320, 1, 1),
              "diffusion_model.middle_block.2.emb_layers.1.weight::diff::": (1280, 1280),
              "diffusion_model.output_blocks.2.2.conv.weight::diff::": (1280, 1280, 3, 3),
              "diffusion_model.output_blocks.8.0.out_layers.3.bias::diff::": (320,),
              "diffusion_model.label_emb.0.0.weight::diff::": (1280, 2816),
              "diffusion_model.time_embed.2.bias::diff::": (1280,),
              "diffusion_model.out.2.weight::diff::": (4, 320, 3, 3)}
    plan = plan_layerdiffuse_unet(unet, fake({k: torch.Size(v) for k, v in shapes.items()}))
    assert set(plan) == {"conv_in.weight", "down_blocks.0.resnets.0.conv1.weight",
                         "down_blocks.0.downsamplers.0.conv.weight", "down_blocks.1.resnets.0.conv_shortcut.weight",
                         "mid_block.resnets.1.time_emb_proj.weight", "up_blocks.0.upsamplers.0.conv.weight",
                         "up_blocks.2.resnets.2.conv2.bias", "add_embedding.linear_1.weight",
                         "time_embedding.linear_2.bias", "conv_out.weight"}


def test_wrong_shape_or_unknown_key_is_a_clear_error():
    unet = meta_unet(SD15)
    with pytest.raises(LayergenError, match="does not fit"):  # SDXL file on an SD 1.5 UNet
        plan_layerdiffuse_unet(unet, fake(published_attn_lora({"input_blocks.1.1": (1, 640)}, 768)))
    with pytest.raises(LayergenError, match="no counterpart"):
        plan_layerdiffuse_unet(unet, fake({"diffusion_model.input_blocks.99.1.proj_in.weight::diff::":
                                           torch.Size((1, 1))}))


def test_fusing_applies_lora_and_offsets_numerically():
    from layergen.testing import tiny_unet

    unet = tiny_unet(in_channels=4, num_class_embeds=None)
    bm = {v: k for k, v in sgm_block_map(unet).items()}
    sgm = bm["down_blocks.0.attentions.0"]
    w = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    up, down = torch.randn(w.shape[0], 2), torch.randn(2, w.shape[1])
    b = unet.conv_out.bias.detach().clone()
    sd = {f"diffusion_model.{sgm}.transformer_blocks.0.attn1.to_q.weight::lora::0": up,
          f"diffusion_model.{sgm}.transformer_blocks.0.attn1.to_q.weight::lora::1": down,
          "diffusion_model.out.2.bias::diff::": torch.ones_like(b)}
    assert load_layerdiffuse_unet(unet, sd) == 2
    w2 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert torch.allclose(w2, w + up @ down, atol=1e-5)
    assert torch.allclose(unet.conv_out.bias, b + 1)


def test_widen_conv_in_keeps_the_old_behaviour_for_zero_condition():
    from layergen.testing import tiny_unet

    unet = tiny_unet(in_channels=4, num_class_embeds=None).eval()
    x, t, e = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 32)
    before = unet(x, t, encoder_hidden_states=e).sample
    widen_conv_in(unet, 8)
    assert unet.config.in_channels == 8
    after = unet(torch.cat([x, torch.zeros_like(x)], 1), t, encoder_hidden_states=e).sample
    assert torch.allclose(before, after, atol=1e-6)


def test_pipeline_method_loads_a_file_and_widens_conv_in(tmp_path):
    from safetensors.torch import save_file

    from layergen.pipelines import TransparentLayerPipeline
    from layergen.testing import tiny_layer_components

    pipe = TransparentLayerPipeline(**tiny_layer_components(conditional=False))
    out_ch = pipe.unet.conv_in.out_channels
    path = tmp_path / "fg2ble.safetensors"
    save_file({"diffusion_model.input_blocks.0.0.weight::diff::": torch.ones(out_ch, 8, 3, 3)}, str(path))
    w = pipe.unet.conv_in.weight.detach().clone()
    assert pipe.load_layerdiffuse_unet_weights(path) == 1
    assert pipe.unet.config.in_channels == 8
    assert torch.allclose(pipe.unet.conv_in.weight[:, :4], w + 1) and torch.allclose(pipe.unet.conv_in.weight[:, 4:],
                                                                                      torch.ones(1))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file")
    with pytest.raises(LayergenError, match="safetensors"):
        pipe.load_layerdiffuse_unet_weights(bad)
