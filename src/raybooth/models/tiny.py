"""Tiny Stable Diffusion and SDXL architecture pipelines, built offline from configs, and a small toy
car photo set: what the tests and the demo run on where no real weights can be had."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from raybooth.models.output import write_model_dir

# The real SD 1.x scheduler settings, so the tiny model trains and samples the way SD does.
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type="epsilon")


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (CLIP's tokenizer) maps bytes to."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + i for i in range(256 - len(printable))]
    return [chr(c) for c in printable + shifted]


def build_tokenizer():
    """A CLIP tokenizer with a character-level vocabulary (no merges), made from the same
    vocab.json/merges.txt files a real CLIP tokenizer ships, so no hub is involved."""
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        Path(folder, "merges.txt").write_text("#version: 0.2\n")
        Path(folder, "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
        return CLIPTokenizer.from_pretrained(folder)


def tiny_vae(**settings):
    """SD's VAE architecture at 4x downsampling (so a 64 px image has 16x16 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=64, **settings)


def build_tiny_pipeline(seed: int = 0):
    """UNet, VAE and text encoder of SD's architecture at a few hundred thousand parameters each.
    The VAE downsamples 4x and the UNet's sample size is 16, so the native resolution is 64 px."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = tiny_vae()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_xl_pipeline(seed: int = 0):
    """SDXL's architecture in miniature, as diffusers' own SDXL tests build it: two CLIP text
    encoders (the second with a projection) whose hidden states join into the UNet's 80-channel
    cross-attention, and a UNet that adds the pooled embedding and six time ids to its timestep
    embedding. Native resolution 64 px; the SDXL scheduler's settings (Euler, leading spacing)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    # The second encoder wider than the first, as bigG is beside ViT-L: two encoders of one shape would
    # make their weights interchangeable to readers that tell them apart by shape (from_single_file).
    # Its projection narrower than it, as SDXL's is not: a layout that forgot to transpose it would fail.
    time_embed_dim, width, width_2, projection = 8, 32, 48, 40
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width + width_2, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection)
    vae = tiny_vae(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE settings
    def config(hidden: int, act: str):  # CLIP ViT-L's activation is quick_gelu, OpenCLIP bigG's gelu
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=projection,
            hidden_act=act, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(config(width, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(config(width_2, "gelu")),
        tokenizer=tokenizer, tokenizer_2=build_tokenizer(), unet=unet, scheduler=scheduler, add_watermarker=False)


def write_tiny_model(output_dir: Path, seed: int = 0, overwrite: bool = False, family: str = "sd") -> Path:
    """A tiny pipeline of `family` ("sd" or "sdxl") in `output_dir`."""
    from raybooth.terminal.log import quiet_model_libraries

    quiet_model_libraries()  # no shard-writing bar or notices among the demo's lines
    pipeline = build_tiny_xl_pipeline(seed) if family == "sdxl" else build_tiny_pipeline(seed)
    return write_model_dir(output_dir, lambda folder: pipeline.save_pretrained(folder), overwrite)


def write_demo_subject(folder: Path, count: int = 5, seed: int = 0) -> list[Path]:
    """Photos of one toy car (the same red body, cabin and wheels) in different spots, sizes and
    scenes. They are larger than the tiny model's 64 px and of mixed aspect, as real photos are."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        width, height = rng.choice([(160, 120), (120, 160), (144, 144)])
        sky = tuple(rng.randint(120, 230) for _ in range(3))
        floor = tuple(rng.randint(40, 140) for _ in range(3))
        image = Image.new("RGB", (width, height), sky)
        draw = ImageDraw.Draw(image)
        horizon = int(height * rng.uniform(0.5, 0.7))
        draw.rectangle([0, horizon, width, height], fill=floor)
        car_w = int(min(width, height) * rng.uniform(0.55, 0.75))
        car_h = car_w // 3
        x = rng.randint(4, width - car_w - 4)
        y = min(height - car_h - car_w // 6 - 2, horizon + rng.randint(-car_h // 2, car_h // 2))
        draw.rounded_rectangle([x, y, x + car_w, y + car_h], radius=car_h // 3, fill=(200, 20, 30))
        draw.polygon([(x + car_w * 0.25, y), (x + car_w * 0.35, y - car_h * 0.7),
                      (x + car_w * 0.7, y - car_h * 0.7), (x + car_w * 0.8, y)], fill=(180, 15, 25))
        draw.rectangle([x + car_w * 0.38, y - car_h * 0.55, x + car_w * 0.67, y - car_h * 0.1], fill=(170, 210, 240))
        wheel = car_w // 6
        for cx in (x + car_w * 0.22, x + car_w * 0.78):
            draw.ellipse([cx - wheel / 2, y + car_h - wheel / 2, cx + wheel / 2, y + car_h + wheel / 2], fill=(20, 20, 20))
        path = folder / f"toy-car-{index:02d}.jpg"
        image.save(path, quality=92)
        paths.append(path)
    return paths
