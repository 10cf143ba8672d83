"""Tiny random text-to-image pipelines and a tiny CLIP, built from config and saved locally: nothing downloads.

The components follow diffusers' own pipeline tests (`get_dummy_components()` in tests/pipelines/<family>/) and
../shared/TEXT-TO-IMAGE.md: a CLIP tokenizer needs only vocab.json and merges.txt, so a byte-level vocabulary with no
merges works; a T5 tokenizer is a `tokenizers` Unigram model wrapped as T5TokenizerFast.
"""

import json
from pathlib import Path

import torch


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the CLIP tokenizer's byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer(path: Path, max_length: int = 16):
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length,
                              pad_token="<|endoftext|>")
    return tokenizer


def clip_text_config(tokenizer, hidden=32, projection=None, max_length=16):
    from transformers import CLIPTextConfig

    kwargs = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=max_length,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if projection is not None:
        kwargs["projection_dim"] = projection
    return CLIPTextConfig(**kwargs)


def t5_tokenizer(path: Path):
    """A T5TokenizerFast over the byte-ish characters of ASCII, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(33, 127)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=32)
    fast.save_pretrained(path)
    return fast


def t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0))


def _vae(latent_channels=4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16, **extra)


def _randomise(module, std=0.05):
    """Zero-initialised output layers make a random network's output independent of its input: give every
    all-zero weight random values, so that each condition and time changes the prediction."""
    for p in module.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, std)


def sd_folder(path: Path, prediction_type="epsilon") -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(path / "_tok")
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=2)
    _randomise(unet)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def sdxl_folder(path: Path) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(path / "_tok")
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64, norm_num_groups=4)
    _randomise(unet)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    text_encoder = CLIPTextModel(clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer, projection=32))
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                     text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(path)
    return path


def clip_folder(path: Path) -> Path:
    """A tiny CLIPModel with its processor (tokenizer + image processor), the way a hub CLIP folder is laid out."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(path / "_tok", max_length=32)
    text = clip_text_config(tokenizer, max_length=32).to_dict()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8).to_dict()
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
