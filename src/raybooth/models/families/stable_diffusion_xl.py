"""Stable Diffusion XL (base): two text encoders (CLIP ViT-L and OpenCLIP bigG with a projection)
whose penultimate hidden states are joined, the second's pooled, projected embedding, and
"micro-conditioning": each image's original size, crop corner and target size as `time_ids`,
added to the UNet's timestep embedding (arXiv 2307.01952, section 2.2). Native at 1024 px; its
VAE overflows in fp16 (the pipeline upcasts it, and so does training). The refiner (one text
encoder, an aesthetic score in place of the target size) is another family, not trained here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raybooth.models.families.base import ModelFamily

if TYPE_CHECKING:
    import torch


def encode_text(encoders: list, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As StableDiffusionXLPipeline.encode_prompt and diffusers' SDXL DreamBooth script encode a
    prompt: each encoder's penultimate hidden states, joined along the channels, and the pooled
    embedding of the last encoder. `prompt_ids`: (rows, encoders, tokens)."""
    import torch

    hidden_states = []
    for index, encoder in enumerate(encoders):
        output = encoder(prompt_ids[:, index], output_hidden_states=True)
        pooled = output[0]  # the projected text embedding of CLIPTextModelWithProjection, for the last one
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), pooled


def unused_modules(encoders: dict) -> list:
    """The first encoder conditions through its penultimate hidden states alone: its last layer and
    final norm never reach the UNet."""
    first = encoders.get("text_encoder")
    if first is None:
        return []
    from raybooth.models.modules import unwrap

    first = unwrap(first)
    text_model = getattr(first, "text_model", first)  # transformers 5 flattens CLIPTextModel
    return [text_model.encoder.layers[-1], text_model.final_layer_norm]


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> list:
    """One row's micro-conditioning, in the order SDXL was trained with: (height, width) of the
    image before it was resized, the crop's (top, left) corner, the (height, width) made."""
    return [*original_size, *crop_top_left, *target_size]


STABLE_DIFFUSION_XL = ModelFamily(
    name="Stable Diffusion XL",
    key="sdxl",
    pipeline_classes=("StableDiffusionXLPipeline",),
    components=("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    weighted=("unet", "vae", "text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    text_encoders=(("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")),
    encode_text=encode_text,
    micro_conditioning=True,
    vae_overflows_in_fp16=True,
    unused_modules=unused_modules,
    safety_checker=False,
    # No invisible watermark on class images (they would teach it) or samples; and none needs the package.
    pipeline_options={"add_watermarker": False},
)
