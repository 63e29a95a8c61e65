"""Settings of the commands other than `train`: cache, tiny-model, generate, merge-lora, export, run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raybooth.config.fields import (DTYPES, ORIGINAL_CONFIG_HELP, SAMPLER_HELP, SAMPLERS, STEPS_HELP,
                                    check_prompts_given, finite, given, option, positive)
from raybooth.config.watch import VERBOSE_HELP
from raybooth.errors import RayboothError


@dataclass
class CacheConfig:
    model_name: str = option(help="Hugging Face model repository, e.g. CompVis/stable-diffusion-v1-4.")
    revision: str = option(help="Commit hash (or branch) of the repository to cache.")
    model_dir: Path = option(help="Cache folder; the model lands in DIR/models--ORG--NAME/snapshots/HASH.")


@dataclass
class TinyModelConfig:
    output_dir: Path = option(help="Folder to write the tiny diffusers pipeline to.")
    seed: int = option(0, "Seed for the random weights.")
    overwrite: bool = option(False, "Replace a model already in --output_dir.")
    family: str = option("sd", "Model family: sd (Stable Diffusion 1.x architecture) or sdxl (Stable Diffusion XL: "
                               "two text encoders, micro-conditioning).", choices=("sd", "sdxl"))


@dataclass
class GenerateConfig:
    model_dir: Path = option(help="Diffusers pipeline folder (or a Hugging Face cache folder holding one, or a "
                                  "single-file checkpoint: see --original_config_dir).")
    output_dir: Path = option(help="Folder for the images; images already there are kept, not redone.")
    prompts: list[str] = option(help="One or more prompts.", nargs="+")
    num_samples_per_prompt: int = option(1, "Images per prompt.")
    batch_size: int | None = option(None, "Images per pipeline call on each worker (default: 16 on GPU, 4 on CPU).")
    sampler: str = option("dpm++", SAMPLER_HELP, choices=SAMPLERS)
    num_inference_steps: int | None = option(None, STEPS_HELP)
    guidance_scale: float = option(7.5, "Classifier-free guidance scale.")
    resolution: int | None = option(None, "Image side in pixels (default: the model's native size).")
    seed: int = option(0, "Base seed; each image's seed derives from it, its prompt and its index.")
    dtype: str = option("auto", "Inference dtype; auto is bf16 (fp16 where bf16 is unsupported) on GPU, fp32 on CPU.",
                        choices=DTYPES)
    safety_checker: bool = option(True, "Run the model's safety checker, if it has one (flagged images come "
                                        "out black).")
    lora_weights_dir: Path | None = option(None, "A LoRA adapter to apply to --model_dir: the --output_dir of "
                                                 "`raybooth train --use_lora` (or a diffusers LoRA folder or file).")
    lora_scale: float = option(1.0, "Strength of --lora_weights_dir: 0 is the base model, 1 the adapter as trained.")
    original_config_dir: Path | None = option(None, ORIGINAL_CONFIG_HELP)
    num_workers: int | None = option(None, "Generation actors (default: one per GPU, or one on CPU).")
    use_gpu: bool | None = option(None, "Generate on GPUs (default: when the Ray cluster has any).")
    address: str | None = option(None, "Ray cluster to attach to (default: RAY_ADDRESS, else a local Ray).")
    local_mode: bool | None = option(None, "Render in this command's own process, without Ray; processes of its "
                                           "own write the PNGs (default: on where one actor would render, on a Ray "
                                           "this command would start).")
    verbose: bool = option(False, VERBOSE_HELP)
    use_ray_data: bool = option(True, "Accepted for the seed scripts; Ray Data runs generation's actors.",
                                hidden=True)

    def validate(self) -> None:
        positive(num_samples_per_prompt=self.num_samples_per_prompt,
                 **given(batch_size=self.batch_size, resolution=self.resolution,
                         num_inference_steps=self.num_inference_steps, num_workers=self.num_workers))
        finite(guidance_scale=self.guidance_scale, lora_scale=self.lora_scale)
        check_prompts_given("--prompts", self.prompts)
        if self.local_mode and (self.num_workers or 1) > 1:
            raise RayboothError("--local_mode renders in this process; it does not go with --num_workers above 1")



@dataclass
class MergeLoraConfig:
    model_dir: Path = option(help="The base pipeline the adapter was trained on (or a Hugging Face cache folder "
                                  "holding it).")
    lora_weights_dir: Path = option(help="The adapter: the --output_dir of `raybooth train --use_lora`.")
    output_dir: Path = option(help="Folder for the merged pipeline; must be new, empty, or --overwrite.")
    lora_scale: float = option(1.0, "Strength to merge the adapter at: 1 is as trained.")
    original_config_dir: Path | None = option(None, ORIGINAL_CONFIG_HELP)
    overwrite: bool = option(False, "Replace a model already in --output_dir.")

    def validate(self) -> None:
        finite(lora_scale=self.lora_scale)


EXPORT_FORMATS = ("single-file", "kohya")


@dataclass
class ExportConfig:
    model_dir: Path = option(help="What to export: a fine-tuned pipeline folder (for --format single-file) or a LoRA "
                                  "adapter folder, the output of `raybooth train --use_lora` (for --format kohya).")
    format: str = option(help="single-file: the pipeline as one checkpoint in the original layout (UNet, VAE, text "
                              "encoders), as ComfyUI and AUTOMATIC1111 load checkpoints; kohya: the LoRA adapter in "
                              "kohya's key format with its alpha, as they load LoRAs.", choices=EXPORT_FORMATS)
    output_file: Path = option(help="The .safetensors file to write; must be new, unless --overwrite.")
    half: bool = option(False, "Write the weights in fp16: half the size, as such files are usually shared.")
    overwrite: bool = option(False, "Replace --output_file if it exists.")


@dataclass
class RunConfig:
    """`raybooth run`: every step in one go. With no model and no subject, it is the demo."""

    work_dir: Path | None = option(None, "Folder for every step's output (default: ./raybooth-demo with "
                                         "the world model, ./raybooth-run otherwise).")
    model_name: str | None = option(None, "Hugging Face repository to cache and fine-tune (or a local single-file "
                                          "checkpoint, as --model_dir takes one).")
    revision: str = option("main", "Revision of --model_name.")
    model_dir: Path | None = option(None, "Use this local pipeline (or single-file checkpoint) instead of caching "
                                          "one (default: the built-in world model, for the demo).")
    original_config_dir: Path | None = option(None, ORIGINAL_CONFIG_HELP)
    instance_images_dir: Path | None = option(None, "Photos of the subject (default: the built-in toy car).")
    unique_token: str = option("unqtkn", "Rare token that names the subject.")
    class_noun: str | None = option(None, 'Class of the subject, e.g. "dog" (required with '
                                          '--instance_images_dir; the built-in subject is a "toy car").')
    sample_prompts: list[str] | None = option(None, "Prompts to sample the tuned model (and, for the "
                                                    "before-and-after grid, the pretrained one) with (default: a "
                                                    "few scenes of the subject).", nargs="+")
    num_samples_per_prompt: int = option(4, "Samples per prompt from the tuned model.")
    class_images_dir: Path | None = option(None, "Class images for prior preservation, made there where missing; "
                                                 "runs of one class and model can share it (default: "
                                                 "WORK_DIR/images-reg).")
    overwrite: bool = option(False, "Replace the tuned model of an earlier run in WORK_DIR/model-tuned.")
    num_class_samples: int | None = option(None, "Plain class samples of the tuned model for the grid and the "
                                                 "measures (default: 16 in the demo, 8 otherwise).")
    clip_model_dir: Path | None = option(None, "With --dino_model_dir: judge the run with CLIP and DINO, as "
                                               "`raybooth evaluate --metrics clip` does (default: the small "
                                               "world's measures in the demo, none otherwise).")
    dino_model_dir: Path | None = option(None, "DINO ViT model for the measures with --clip_model_dir.")

    @property
    def uses_world_model(self) -> bool:
        """No model given: the demo's, the world model that ships with raybooth."""
        return self.model_name is None and self.model_dir is None


# `raybooth run` takes these TrainConfig flags as they are; the rest it derives from --work_dir,
# --unique_token and --class_noun.
RUN_DERIVED_TRAIN_FIELDS = ("model_dir", "output_dir", "instance_images_dir", "instance_prompt",
                            "class_images_dir", "class_prompt", "class_noun", "overwrite", "sample_prompts",
                            "num_samples_per_prompt", "samples_dir", "original_config_dir")
