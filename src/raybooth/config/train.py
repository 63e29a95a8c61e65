"""`raybooth train`'s settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raybooth.config.fields import (DDP_BUCKET_MB, FULL_DEFAULT_LR, LORA_DEFAULT_LR, LORA_DEFAULT_RANK, PRECISIONS,
                                    ORIGINAL_CONFIG_HELP, SAMPLER_HELP, SAMPLERS, STEPS_HELP, check_prompts_given,
                                    finite, given, option, positive)
from raybooth.config.optimization import PRODIGY_DEFAULT_LR, ExampleOptions, OptimizationOptions
from raybooth.config.watch import WatchOptions
from raybooth.errors import RayboothError


@dataclass
class TrainConfig(OptimizationOptions, ExampleOptions, WatchOptions):
    model_dir: Path = option(help="Pretrained diffusers pipeline folder (or a Hugging Face cache folder holding one).")
    output_dir: Path = option(help="Folder for the fine-tuned pipeline; must be new, empty, or --overwrite.")
    instance_images_dir: Path = option(help="Photos of the subject (3-6 are typical).")
    instance_prompt: str = option(help='Prompt naming the subject, e.g. "a photo of unqtkn toy car".')
    class_images_dir: Path = option(help="Images of the subject's class, for prior preservation; "
                                         "missing ones are generated first.")
    class_prompt: str = option(help='Prompt for the class, e.g. "a photo of a toy car".')
    pretrained_vae_model_name_or_path: Path | None = option(
        None, "A VAE folder (diffusers AutoencoderKL) to train and sample with in place of the model's own, such as "
              "SDXL's fp16-fixed VAE; a full fine-tune's output then holds it.")
    original_config_dir: Path | None = option(None, ORIGINAL_CONFIG_HELP)
    class_noun: str | None = option(None, "The class noun both prompts must name (default: inferred "
                                          "from the words the prompts end with).")
    num_class_images: int = option(200, "Class images to train with; the folder is topped up to this many.")
    train_batch_size: int = option(1, "Instance images per step per worker (each paired with a class image).")
    lr: float | None = option(None, "Learning rate (default: 5e-6 for full fine-tuning, 1e-4 with --use_lora, "
                                    "1.0 with --optimizer prodigy).")
    num_epochs: int = option(4, "Passes over the instance/class pairs.")
    max_train_steps: int = option(800, "Stop after this many optimizer steps, even mid-epoch.")
    prior_loss_weight: float = option(1.0, "Weight of the class (prior-preservation) loss.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm.")
    resolution: int | None = option(None, "Training image side in pixels (default: the model's native size).")
    seed: int = option(0, "Seed for weights' noise and timesteps (and class image generation).")
    mixed_precision: str = option("auto", "Autocast dtype over fp32 master weights; auto is bf16 on GPUs "
                                          "that have it, fp16 on older GPUs, no on CPU.", choices=PRECISIONS)
    train_text_encoder: bool = option(True, "Fine-tune the text encoder along with the UNet.")
    num_workers: int = option(1, "Data-parallel Ray Train workers.")
    use_gpu: bool | None = option(None, "Train on GPUs (default: when the Ray cluster has any).")
    gpus_per_worker: int = option(1, "GPUs per worker; 2 puts the UNet on one and the text encoder on the other.",
                                  choices=(1, 2))
    placement_strategy: str = option("PACK", "Where Ray places the workers: PACK fills a node first (fast all-reduce), "
                                             "SPREAD puts them on different nodes.", choices=("PACK", "SPREAD"))
    ddp_bucket_mb: int = option(DDP_BUCKET_MB, "Size of DDP's gradient buckets in MB: each is all-reduced as soon "
                                               "as its gradients are ready, overlapping the backward pass.")
    bf16_gradients: bool | None = option(None, "Train bf16 copies of the weights: they compute in bf16 without "
                                               "autocast and their gradients are bf16 (half the all-reduce), while the "
                                               "optimizer steps fp32 masters. Costs 4 bytes a weight of GPU memory, "
                                               "saves more in activations from batch 4 up (default: with several "
                                               "one-GPU workers or at --train_batch_size 4 and up, in bf16 mixed "
                                               "precision, without LoRA, 8-bit Adam, EMA or accumulation).")
    channels_last: bool | None = option(None, "Keep the UNet's weights and activations channels-last (NHWC) while "
                                              "training: faster at batch 1 (77 against 82 ms a step on an H100), "
                                              "slower at 4 (default: on one GPU worker at --train_batch_size 1, "
                                              "for full fine-tuning).")
    cudnn_attention: bool | None = option(None, "Run the training step's attention with cuDNN's kernels first, "
                                                "flash attention's where cuDNN's do not apply: at SD 1.5's "
                                                "64x64 self-attention 1.75x as fast at batch 32 on an H100, but "
                                                "cuDNN builds a plan per shape at the first step (default: at "
                                                "--train_batch_size 4 and up, or with --compile).")
    report_every_n_steps: int = option(10, "Average the loss over workers and report it every N steps.")
    cuda_graphs: bool = option(True, "On GPUs, capture the training step (all-reduce included) as a CUDA graph "
                                     "and replay it (same math, about 2.5x faster; not with fp16 or "
                                     "--gpus_per_worker 2).")
    compile: bool = option(False, "Compile the UNet and the VAE's encoder with Inductor (torch.compile) for the "
                                  "training step: 1.48 against 1.16 steps/s at --train_batch_size 32 on an H100, but "
                                  "the first step compiles for about 3 minutes (21 s when Inductor's cache already "
                                  "holds the same model and batch), so it pays off on long runs at large batches.")
    use_lora: bool = option(False, "Train LoRA adapters beside the frozen UNet (and text encoder) instead of "
                                   "the full weights; --output_dir then holds only the adapter "
                                   "(pytorch_lora_weights.safetensors, a few MB).")
    lora_rank: int = option(4, "Rank of the LoRA adapters (with --use_lora).")
    lora_alpha: float | None = option(None, "LoRA alpha; the adapters' update is scaled by alpha / rank "
                                            "(with --use_lora; default: the rank).")
    lora_text_encoder: bool = option(True, "With --use_lora and --train_text_encoder, give the text encoder "
                                           "adapters too (else it stays frozen).")
    use_dora: bool = option(False, "Train DoRA adapters (arXiv 2402.09353) instead of plain LoRA: each adapted "
                                   "weight is split into a trained magnitude per output and a direction that the "
                                   "low-rank update turns (with --use_lora).")
    lora_dropout: float = option(0.0, "Dropout probability on the adapters' input while training (with "
                                      "--use_lora; samples never drop).")
    save_single_file: bool = option(False, "Also write the fine-tuned pipeline as one checkpoint file in the original "
                                           "layout, OUTPUT_DIR/NAME.safetensors (NAME: the output folder's name), as "
                                           "ComfyUI and AUTOMATIC1111 load checkpoints (not with --use_lora).")
    output_kohya_format: bool = option(False, "With --use_lora: also write the adapter in kohya's format, "
                                              "OUTPUT_DIR/pytorch_lora_weights_kohya.safetensors, as ComfyUI and "
                                              "AUTOMATIC1111 load LoRAs.")
    address: str | None = option(None, "Ray cluster to attach to (default: RAY_ADDRESS, else a local Ray).")
    storage_path: str | None = option(None, "Folder or URI (pyarrow) that all nodes share, for Ray Train's "
                                            "checkpoints (default: ~/ray_results).")
    checkpointing_steps: int = option(500, "Save a resumable checkpoint (weights, optimizer, step, data position, "
                                           "random state) every N steps, under --storage_path.")
    checkpoints_total_limit: int = option(2, "Checkpoints to keep, the newest; each holds the trained weights and "
                                            "the optimizer state.")
    resume_from_checkpoint: str = option("latest", "latest: continue from the newest checkpoint of an earlier run "
                                                   "of this command, if any; a checkpoint folder; or none: start "
                                                   "over.")
    max_failures: int = option(0, "Times Ray Train may restart the workers after one dies (lost node, OOM), "
                                  "each time from the latest checkpoint.")
    local_mode: bool | None = option(None, "Run the one worker in this command's own process (Ray Train's local "
                                           "mode): no worker process to start, 11-16 s sooner on an H100, but "
                                           "Ray Train cannot restart it (default: on for one worker on a Ray this "
                                           "command starts, with --max_failures 0 and a local --storage_path).")
    overwrite: bool = option(False, "Replace a model already in --output_dir.")
    sample_batch_size: int | None = option(None, "Batch size for generating missing class images and samples, as "
                                                 "diffusers' --sample_batch_size (default: 16 on GPU, 4 on CPU; "
                                                 "diffusers' is 4).")
    sampler: str = option("dpm++", SAMPLER_HELP + " For class images and samples.", choices=SAMPLERS)
    num_inference_steps: int | None = option(None, STEPS_HELP)
    guidance_scale: float = option(7.5, "Guidance scale for generated class images (and samples).")
    sample_prompts: list[str] | None = option(None, "After training, sample these prompts with the tuned model, "
                                                    "on the workers while it is in memory.", nargs="+")
    num_samples_per_prompt: int = option(4, "Samples per prompt of --sample_prompts.")
    samples_dir: Path | None = option(None, "Folder for the samples of --sample_prompts (required with them).")

    def validate(self) -> None:
        positive(num_class_images=self.num_class_images, train_batch_size=self.train_batch_size,
                 num_epochs=self.num_epochs, max_train_steps=self.max_train_steps, num_workers=self.num_workers,
                 report_every_n_steps=self.report_every_n_steps,
                 checkpointing_steps=self.checkpointing_steps, checkpoints_total_limit=self.checkpoints_total_limit,
                 ddp_bucket_mb=self.ddp_bucket_mb,
                 **given(sample_batch_size=self.sample_batch_size, resolution=self.resolution,
                         num_inference_steps=self.num_inference_steps))
        finite(prior_loss_weight=self.prior_loss_weight, max_grad_norm=self.max_grad_norm,
               guidance_scale=self.guidance_scale, **given(lr=self.lr, lora_alpha=self.lora_alpha))
        if self.lr is not None and self.lr <= 0:
            raise RayboothError(f"--lr must be positive, got {self.lr}")
        self.validate_lora()
        self.validate_optimization(self.trains_text_encoder, self.learning_rate())
        self.validate_examples(self.train_text_encoder)
        self.validate_watch(self.output_dir)
        if self.max_failures < 0:
            raise RayboothError(f"--max_failures must be 0 or more, got {self.max_failures}")
        if self.local_mode and (blocker := self.local_mode_blocker()):
            raise RayboothError(f"--local_mode runs one worker in this process; it does not go with {blocker}")
        if self.prior_loss_weight < 0 or self.max_grad_norm <= 0:
            raise RayboothError("--prior_loss_weight must be >= 0 and --max_grad_norm > 0")
        if self.gpus_per_worker == 2 and self.use_gpu is False:
            raise RayboothError("--gpus_per_worker 2 needs GPUs; drop --no_use_gpu")
        if self.bf16_gradients and (blocker := self.bf16_gradients_blocker()):
            raise RayboothError(f"--bf16_gradients does not go with {blocker}")
        if self.sample_prompts is not None:
            positive(num_samples_per_prompt=self.num_samples_per_prompt)
            check_prompts_given("--sample_prompts", self.sample_prompts)
            if self.samples_dir is None:
                raise RayboothError("--sample_prompts needs --samples_dir, the folder for the samples")

    def validate_lora(self) -> None:
        positive(lora_rank=self.lora_rank)
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise RayboothError(f"--lora_alpha must be positive, got {self.lora_alpha}")
        if not self.use_lora and (self.lora_rank != LORA_DEFAULT_RANK or self.lora_alpha is not None
                                  or not self.lora_text_encoder):
            raise RayboothError("--lora_rank, --lora_alpha and --no_lora_text_encoder need --use_lora")
        if not 0 <= self.lora_dropout < 1:  # nan fails this too
            raise RayboothError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.use_lora and (self.use_dora or self.lora_dropout):
            raise RayboothError("--use_dora and --lora_dropout need --use_lora")
        if self.output_kohya_format and (not self.use_lora or self.use_dora):
            raise RayboothError("--output_kohya_format writes a LoRA adapter in kohya's format: it needs --use_lora, "
                                "without --use_dora (for a full fine-tune: --save_single_file)")
        if self.save_single_file and self.use_lora:
            raise RayboothError("--save_single_file writes a fine-tuned pipeline; with --use_lora, write the adapter "
                                "for ComfyUI and AUTOMATIC1111 with --output_kohya_format")

    def bf16_gradients_blocker(self) -> str | None:
        """The option that rules out --bf16_gradients, if any: LoRA adapters and EMA weights stay
        fp32, 8-bit Adam keeps its own state, fp16 and full precision have no bf16 weights."""
        for flag, on in (("--use_lora", self.use_lora), ("--use_8bit_adam", self.use_8bit_adam),
                         ("--use_ema", self.use_ema),
                         (f"--mixed_precision {self.mixed_precision}", self.mixed_precision in ("fp16", "no"))):
            if on:
                return flag
        return None

    def local_mode_blocker(self) -> str | None:
        """The option that needs Ray Train's worker processes, if any: several workers, restarts
        of a lost one, and storage that only Ray Train writes to (a URI)."""
        for flag, on in (("--num_workers above 1", self.num_workers > 1), ("--max_failures", self.max_failures > 0),
                         ("a --storage_path URI", "://" in (self.storage_path or ""))):
            if on:
                return flag
        return None

    def learning_rate(self) -> float:
        """--lr, or its default for the kind of training: LoRA adapters start at zero and need
        larger steps than the pretrained weights can take."""
        if self.lr is not None:
            return self.lr
        if self.optimizer == "prodigy":
            return PRODIGY_DEFAULT_LR  # a multiplier of the step size Prodigy finds, which its authors keep at 1
        return LORA_DEFAULT_LR if self.use_lora else FULL_DEFAULT_LR

    def adapter_alpha(self) -> float:
        return self.lora_rank if self.lora_alpha is None else self.lora_alpha

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the text encoder is trained at all: fully, or through its adapters."""
        return self.train_text_encoder and (self.lora_text_encoder or not self.use_lora)
