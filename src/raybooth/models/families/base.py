"""What one model family is to the rest of raybooth: the small interface a family module fills in.
The training loop, generation and the driver ask a family for what differs between families (its
pipeline class, the components a folder must hold, its tokenizers and text encoders and how their
outputs condition the UNet, how its VAE tolerates fp16) and never name a family themselves, so a
new family is one more module here, not a fork of the loop. Loading is written once, here, for
every family whose parts are a diffusers UNet, an AutoencoderKL and transformers text encoders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelFamily:
    name: str  # as messages name it, e.g. "Stable Diffusion 1.x/2.x"
    key: str  # as flags name it: `raybooth tiny-model --family KEY`
    pipeline_classes: tuple[str, ...]  # the model_index.json `_class_name`s of its folders
    components: tuple[str, ...]  # the components training and generation load
    weighted: tuple[str, ...]  # those of them that hold weights (a config.json and weight files)
    tokenizers: tuple[str, ...]  # tokenizer folders; a prompt's ids stack in this order
    text_encoders: tuple[tuple[str, str], ...]  # (folder, transformers class), in the tokenizers' order
    # (text encoders, prompt ids) -> (the UNet's encoder_hidden_states, the pooled embedding or None)
    encode_text: Callable[[list, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    # SDXL's micro-conditioning: each row's original size, crop corner and target size as `time_ids`
    micro_conditioning: bool = False
    vae_overflows_in_fp16: bool = False  # SDXL's VAE: kept in fp32 where the frozen modules are fp16
    safety_checker: bool = True  # whether its pipelines carry one (to switch off when generating)
    pipeline_options: dict = field(default_factory=dict)  # more keyword arguments its pipelines load with
    # The text encoders' modules whose output the conditioning never reads (SDXL's first encoder's last
    # layer): they can get no gradient, and DDP refuses trained parameters that get none.
    unused_modules: Callable[[dict], list] = lambda encoders: []

    def pipeline_class(self):
        """The diffusers pipeline class that generates with this family's folders."""
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def generation_options(self, safety_checker: bool) -> dict:
        """Keyword arguments for `pipeline_class().from_pretrained`: no safety checker unless asked for."""
        without = {} if safety_checker or not self.safety_checker else dict(safety_checker=None,
                                                                              requires_safety_checker=False)
        return {**without, **self.pipeline_options}

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.text_encoders)

    def load_for_training(self, model_dir: Path, device: torch.device, text_encoder_device: torch.device,
                          frozen_dtype: torch.dtype, train_text_encoder: bool, lora: bool = False,
                          vae_dir: Path | None = None):
        """The models one training worker needs (models/modules.DreamBoothModels). Trained modules
        keep fp32 weights (autocast gives the speed; fp32 masters keep small updates from rounding
        away); frozen ones take `frozen_dtype`. With `lora` the UNet and text encoders are frozen
        too: only the adapters added later (models/lora/) train. `vae_dir`: a VAE folder of its own
        (--pretrained_vae_model_name_or_path) in place of the pipeline's."""
        import torch
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        from raybooth.models.modules import DreamBoothModels

        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        unet.to(device, frozen_dtype if lora else torch.float32)
        unet.requires_grad_(not lora)
        encoders = []
        for name, class_name in self.text_encoders:
            encoder = getattr(transformers, class_name).from_pretrained(model_dir, subfolder=name)
            encoder.to(text_encoder_device, torch.float32 if train_text_encoder and not lora else frozen_dtype)
            encoder.requires_grad_(train_text_encoder and not lora)
            encoders.append(encoder.train(train_text_encoder))
        vae = (AutoencoderKL.from_pretrained(vae_dir) if vae_dir is not None
               else AutoencoderKL.from_pretrained(model_dir, subfolder="vae"))
        overflows = self.vae_overflows_in_fp16 and frozen_dtype == torch.float16 and vae.config.force_upcast
        vae.to(device, torch.float32 if overflows else frozen_dtype).requires_grad_(False).eval()
        models = DreamBoothModels(
            unet=unet.train(), text_encoder=encoders[0], vae=vae,
            noise_scheduler=DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler"),
            train_text_encoder=train_text_encoder, text_encoder_2=encoders[1] if len(encoders) > 1 else None,
            family=self)
        self.freeze_unused(models)
        return models

    def freeze_unused(self, models) -> None:
        """No training for what the conditioning never reads: after loading, and after adapters are added."""
        for module in self.unused_modules(models.text_encoders()):
            module.requires_grad_(False)
