"""Tiny randomly initialised components of the real classes (the diffusers test pattern), built in code.

Used by the test-suite and by training-script smoke runs: nothing is downloaded, every
pipeline and script runs in seconds on a CPU with these.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

_WORDS = ("a an the with on of and red orange yellow green teal blue purple pink brown white black grey glass "
          "circle square triangle star heart ring cross crescent hexagon arrow letter digit soft drop shadow glow "
          "glowing background gradient striped noise texture horizon sky ground to").split()


def tiny_tokenizer(max_length: int = 16):
    """A BERT word-piece tokenizer over a small fixed vocabulary, written to a temp folder."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(_WORDS) + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] \
        + list("abcdefghijklmnopqrstuvwxyz0123456789") + ["<", ">", ",", "."]
    folder = Path(tempfile.mkdtemp(prefix="layergen-tok-"))
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=max_length)


def tiny_text_encoder(hidden: int = 32, vocab_size: int = 128):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64)
    return BertModel(cfg).eval()


def tiny_clip_text_encoder(hidden: int = 32, projection: bool = False, vocab_size: int = 128):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
                         bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=32)


def tiny_unet(in_channels: int = 8, cross_attention_dim: int = 32, num_class_embeds: int | None = 3,
              sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=cross_attention_dim // 2 + 6 * 8)
    return UNet2DConditionModel(
        sample_size=4, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=4,
        num_class_embeds=num_class_embeds, **extra)


def tiny_codec(latent_channels: int = 4):
    from .models.transparent_codec import TransparentDecoder, TransparentEncoder

    torch.manual_seed(0)
    enc = TransparentEncoder(block_out_channels=(4, 4, 8, 8), latent_channels=latent_channels)
    dec = TransparentDecoder(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                             down_block_types=("DownBlock2D",) * 3 + ("AttnDownBlock2D",),
                             up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * 3, latent_channels=latent_channels,
                             latent_injection_index=3, attention_head_dim=4, norm_num_groups=4)
    return enc, dec


def tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")


def tiny_layer_components(conditional: bool = True, sdxl: bool = False) -> dict:
    """Everything a LayerDiffusion pipeline takes, tiny. `sdxl=True` adds a second CLIP text encoder."""
    enc, dec = tiny_codec()
    comps = dict(vae=tiny_vae(), tokenizer=tiny_tokenizer(), scheduler=tiny_scheduler(), transparent_decoder=dec,
                 transparent_encoder=enc)
    if sdxl:
        comps.update(text_encoder=tiny_clip_text_encoder(16), tokenizer_2=tiny_tokenizer(),
                     text_encoder_2=tiny_clip_text_encoder(16, projection=True))
        comps["unet"] = tiny_unet(8 if conditional else 4, 32, 3 if conditional else None, sdxl=True)
    else:
        comps.update(text_encoder=tiny_text_encoder(32), text_encoder_2=None, tokenizer_2=None)
        comps["unet"] = tiny_unet(8 if conditional else 4, 32, 3 if conditional else None)
    return comps
