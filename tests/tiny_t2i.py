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


def sd3_folder(path: Path, with_t5: bool = True) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(path / "_tok")
    t5_tok = t5_tokenizer(path / "_t5")
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64, out_channels=4)
    _randomise(transformer)
    text_encoder = CLIPTextModelWithProjection(clip_text_config(tokenizer, projection=32))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer, projection=32))
    t5 = None
    if with_t5:
        from transformers import T5Config, T5EncoderModel

        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, decoder_start_token_id=0))
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
                                    vae=_vae(shift_factor=0.0609, scaling_factor=1.5305), text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=t5, tokenizer_3=t5_tok if with_t5 else None)
    pipe.save_pretrained(path)
    return path


def flux_folder(path: Path, guidance_embeds: bool = True) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(path / "_tok")
    t5_tok = t5_tokenizer(path / "_t5")
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    _randomise(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=guidance_embeds, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(shift_factor=0.1159, scaling_factor=0.3611),
                        text_encoder=CLIPTextModel(clip_text_config(tokenizer)), tokenizer=tokenizer,
                        text_encoder_2=t5_encoder(t5_tok), tokenizer_2=t5_tok, transformer=transformer)
    pipe.save_pretrained(path)
    return path


def pixart_folder(path: Path) -> Path:
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    t5_tok = t5_tokenizer(path / "_t5")
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=32, in_channels=4,
                                           cross_attention_dim=24, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    _randomise(transformer)
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                              set_alpha_to_one=True)
    pipe = PixArtSigmaPipeline(tokenizer=t5_tok, text_encoder=t5_encoder(t5_tok), vae=_vae(),
                               transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(path)
    return path
