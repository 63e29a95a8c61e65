"""`raybooth train`'s optimizer, schedule and example options, under the names and meanings of
diffusers' train_dreambooth.py (its train_dreambooth_lora_sdxl.py's for Prodigy and the text
encoders' weight decay; kohya's sd-scripts where diffusers has none). TrainConfig
inherits them; keyword-only, so their defaults may precede TrainConfig's required fields."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from raybooth.config.fields import finite, given, option, positive
from raybooth.errors import RayboothError
from raybooth.terminal.log import log

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "prodigy")
PRODIGY_INSTALL = "pip install 'raybooth[prodigy]'"
PRODIGY_DEFAULT_LR = 1.0
# diffusers' train_dreambooth_lora_sdxl.py's defaults for Prodigy (its --prodigy_* flags).
PRODIGY_DEFAULTS = {"prodigy_beta3": None, "prodigy_decouple": True, "prodigy_use_bias_correction": True,
                    "prodigy_safeguard_warmup": True}
# torchvision's InterpolationMode names, lowercased, as diffusers' scripts list them for --image_interpolation_mode.
INTERPOLATION_MODES = ("bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact")


@dataclass(kw_only=True)
class OptimizationOptions:
    lr_scheduler: str = option("constant", "Learning-rate schedule over the optimizer steps (diffusers' "
                                           "get_scheduler); with a CUDA graph the graph reads the rate as a "
                                           "tensor updated each step.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, "Steps of linear warm-up from 0 to --lr (every schedule but constant).")
    lr_num_cycles: int = option(1, "Hard restarts of the cosine_with_restarts schedule.")
    lr_power: float = option(1.0, "Power of the polynomial schedule.")
    scale_lr: bool = option(False, "Multiply --lr by train_batch_size x gradient_accumulation_steps x "
                                   "num_workers (as diffusers does; --text_encoder_lr is taken as given).")
    gradient_accumulation_steps: int = option(1, "Micro-batches of --train_batch_size whose gradients add up "
                                                 "to one optimizer step; --max_train_steps counts optimizer "
                                                 "steps. A CUDA graph captures all of them with the step.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass instead of keeping "
                                                 "them: less memory, about a third more compute (the CUDA "
                                                 "graph stays).")
    optimizer: str = option("adamw", "adamw, or prodigy: Prodigy (arXiv 2306.06101, the prodigyopt package: pip "
                                     "install 'raybooth[prodigy]') estimates the step size itself, and --lr (default "
                                     "1.0 with it) scales that estimate; it takes --adam_beta1, --adam_beta2, "
                                     "--adam_epsilon and the weight decays as AdamW does (eager: no CUDA graph).",
                            choices=OPTIMIZERS)
    use_8bit_adam: bool = option(False, "bitsandbytes' 8-bit AdamW: optimizer state in 8 bits, weights still "
                                        "fp32 (pip install 'raybooth[8bit]'; eager: no CUDA graph).")
    adam_beta1: float = option(0.9, "AdamW's (and Prodigy's) beta1.")
    adam_beta2: float = option(0.999, "AdamW's (and Prodigy's) beta2.")
    adam_weight_decay: float = option(1e-2, "AdamW's (and Prodigy's) decoupled weight decay.")
    adam_weight_decay_text_encoder: float | None = option(None, "Weight decay of the text encoders' parameter group "
                                                                "(default: --adam_weight_decay).")
    adam_epsilon: float = option(1e-08, "AdamW's (and Prodigy's) epsilon.")
    prodigy_beta3: float | None = option(None, "Prodigy's coefficient for the running averages behind its step "
                                               "size (default: the square root of --adam_beta2; with --optimizer "
                                               "prodigy).")
    prodigy_decouple: bool = option(True, "Prodigy: AdamW-style decoupled weight decay (with --optimizer prodigy).")
    prodigy_use_bias_correction: bool = option(True, "Prodigy: Adam's bias correction (with --optimizer prodigy).")
    prodigy_safeguard_warmup: bool = option(True, "Prodigy: leave the learning rate out of the denominator of its "
                                                  "step-size estimate, against trouble during warm-up (with "
                                                  "--optimizer prodigy).")
    text_encoder_lr: float | None = option(None, "Learning rate of the text encoder, a parameter group of its "
                                                 "own (default: --lr; eager: no CUDA graph).")
    train_text_encoder_steps: int | None = option(None, "Stop training the text encoder after this many steps, "
                                                        "as kohya's --stop_text_encoder_training (its rate and "
                                                        "gradients drop to zero; the CUDA graph stays).")
    use_ema: bool = option(False, "Keep an exponential moving average of the UNet's trained weights (diffusers' "
                                  "EMAModel, decay up to 0.9999 with its warm-up) and save it as the output's "
                                  "UNet; costs a copy of those weights (the CUDA graph stays).")

    def validate_optimization(self, trains_text_encoder: bool, lr: float) -> None:
        positive(lr_num_cycles=self.lr_num_cycles, gradient_accumulation_steps=self.gradient_accumulation_steps,
                 **given(train_text_encoder_steps=self.train_text_encoder_steps))
        finite(lr_power=self.lr_power, adam_beta1=self.adam_beta1, adam_beta2=self.adam_beta2,
               adam_weight_decay=self.adam_weight_decay, adam_epsilon=self.adam_epsilon,
               **given(text_encoder_lr=self.text_encoder_lr))
        if self.lr_warmup_steps < 0:
            raise RayboothError(f"--lr_warmup_steps must be 0 or more, got {self.lr_warmup_steps}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise RayboothError("--adam_beta1 and --adam_beta2 must be in [0, 1)")
        if self.adam_weight_decay < 0 or self.adam_epsilon <= 0:
            raise RayboothError("--adam_weight_decay must be >= 0 and --adam_epsilon > 0")
        if self.text_encoder_lr is not None and self.text_encoder_lr <= 0:
            raise RayboothError(f"--text_encoder_lr must be positive, got {self.text_encoder_lr}")
        if not trains_text_encoder and (self.text_encoder_lr is not None or self.train_text_encoder_steps is not None
                                        or self.adam_weight_decay_text_encoder is not None):
            raise RayboothError("--text_encoder_lr, --train_text_encoder_steps and --adam_weight_decay_text_encoder "
                                "need a trained text encoder (--train_text_encoder)")
        self.validate_optimizer(lr)

    def validate_optimizer(self, lr: float) -> None:
        """Prodigy's settings and combinations, as diffusers' SDXL script has them; `lr` is the
        resolved --lr."""
        if self.adam_weight_decay_text_encoder is not None:
            finite(adam_weight_decay_text_encoder=self.adam_weight_decay_text_encoder)
            if self.adam_weight_decay_text_encoder < 0:
                raise RayboothError("--adam_weight_decay_text_encoder must be >= 0")
        if self.optimizer != "prodigy":
            changed = [f"--{name}" for name, default in PRODIGY_DEFAULTS.items() if getattr(self, name) != default]
            if changed:
                verb = "needs" if len(changed) == 1 else "need"
                raise RayboothError(f"{', '.join(changed)} {verb} --optimizer prodigy")
            return
        if self.use_8bit_adam:
            raise RayboothError("--use_8bit_adam is 8-bit AdamW; it does not go with --optimizer prodigy")
        if self.prodigy_beta3 is not None and not (math.isfinite(self.prodigy_beta3) and 0 <= self.prodigy_beta3 < 1):
            raise RayboothError(f"--prodigy_beta3 must be in [0, 1), got {self.prodigy_beta3}")
        # Prodigy steps every parameter group at one rate (or 0): diffusers' script overrides
        # --text_encoder_lr with --learning_rate; a different one here would be silently dropped.
        if self.text_encoder_lr is not None and self.text_encoder_lr != lr:
            raise RayboothError(f"--optimizer prodigy steps the text encoder at --lr ({lr:g}), as it takes one rate "
                                f"for every parameter group: drop --text_encoder_lr {self.text_encoder_lr:g}")
        if importlib.util.find_spec("prodigyopt") is None:
            raise RayboothError(f"--optimizer prodigy needs prodigyopt, which is not installed: {PRODIGY_INSTALL}")
        if lr <= 0.1:  # diffusers' script warns alike: Prodigy's --lr scales the step size it finds
            log(f"warning: --lr {lr:g} is low for --optimizer prodigy, whose --lr multiplies the step size it "
                "estimates; around 1.0 is generally better")

    def text_encoder_weight_decay(self) -> float:
        """The weight decay of the text encoders' parameter group."""
        if self.adam_weight_decay_text_encoder is not None:
            return self.adam_weight_decay_text_encoder
        return self.adam_weight_decay


@dataclass(kw_only=True)
class ExampleOptions:
    center_crop: bool = option(False, "Crop the subject's photos at their center (default: a fresh random crop "
                                      "each step).")
    random_flip: bool = option(False, "Flip each subject crop horizontally with probability 0.5.")
    offset_noise: bool = option(False, "Add 0.1 x per-channel offset noise to the noise (diffusers' "
                                       "--offset_noise): lets the model learn very dark and bright images.")
    snr_gamma: float | None = option(None, "Min-SNR loss weighting (arXiv 2303.09556): each example's loss, "
                                           "subject and class alike, weighted by min(SNR, gamma) / SNR (v-prediction:"
                                           " / (SNR + 1)); 5.0 is the paper's choice.")
    pre_compute_text_embeddings: bool = option(False, "Encode the two prompts once with the frozen text encoder and "
                                                      "free it for training (needs --no_train_text_encoder).")
    tokenizer_max_length: int | None = option(None, "Tokens the training prompts are padded or cut to (default: "
                                                    "the tokenizer's, 77 for SD).")
    repeats: int = option(1, "Times each subject photo counts in an epoch (diffusers' --repeats): an epoch is as many "
                             "pairs as the larger of photos x repeats and class images.")
    image_interpolation_mode: str = option("bicubic", "Filter that resizes photos and class images on reading (the "
                                                      "names of diffusers' --image_interpolation_mode, whose default "
                                                      "is lanczos).", choices=INTERPOLATION_MODES)
    caption_column: str | None = option(None, "Column of metadata.jsonl or metadata.csv in --instance_images_dir "
                                              "(Hugging Face's imagefolder layout, photos named by its file_name "
                                              "column) holding each photo's own prompt, in place of "
                                              "--instance_prompt (a NAME.txt beside a photo is its prompt without "
                                              "this flag).")

    def validate_examples(self, train_text_encoder: bool) -> None:
        positive(repeats=self.repeats, **given(tokenizer_max_length=self.tokenizer_max_length))
        if self.caption_column is not None and not self.caption_column.strip():
            raise RayboothError("--caption_column must name a column")
        if self.snr_gamma is not None:
            finite(snr_gamma=self.snr_gamma)
            if self.snr_gamma <= 0:
                raise RayboothError(f"--snr_gamma must be positive, got {self.snr_gamma}")
        if self.pre_compute_text_embeddings and train_text_encoder:
            raise RayboothError("--pre_compute_text_embeddings needs a frozen text encoder: add "
                                "--no_train_text_encoder")
