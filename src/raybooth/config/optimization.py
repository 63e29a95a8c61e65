"""`raybooth train`'s optimizer, schedule and example options, under the names and meanings of
diffusers' train_dreambooth.py (and kohya's sd-scripts where diffusers has none). TrainConfig
inherits them; keyword-only, so their defaults may precede TrainConfig's required fields."""

from __future__ import annotations

from dataclasses import dataclass

from raybooth.config.fields import finite, given, option, positive
from raybooth.errors import RayboothError

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


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
    use_8bit_adam: bool = option(False, "bitsandbytes' 8-bit AdamW: optimizer state in 8 bits, weights still "
                                        "fp32 (pip install 'raybooth[8bit]'; eager: no CUDA graph).")
    adam_beta1: float = option(0.9, "AdamW's beta1.")
    adam_beta2: float = option(0.999, "AdamW's beta2.")
    adam_weight_decay: float = option(1e-2, "AdamW's decoupled weight decay.")
    adam_epsilon: float = option(1e-08, "AdamW's epsilon.")
    text_encoder_lr: float | None = option(None, "Learning rate of the text encoder, a parameter group of its "
                                                 "own (default: --lr; eager: no CUDA graph).")
    train_text_encoder_steps: int | None = option(None, "Stop training the text encoder after this many steps, "
                                                        "as kohya's --stop_text_encoder_training (its rate and "
                                                        "gradients drop to zero; the CUDA graph stays).")
    use_ema: bool = option(False, "Keep an exponential moving average of the UNet's trained weights (diffusers' "
                                  "EMAModel, decay up to 0.9999 with its warm-up) and save it as the output's "
                                  "UNet; costs a copy of those weights (the CUDA graph stays).")

    def validate_optimization(self, trains_text_encoder: bool) -> None:
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
        if not trains_text_encoder and (self.text_encoder_lr is not None or self.train_text_encoder_steps is not None):
            raise RayboothError("--text_encoder_lr and --train_text_encoder_steps need a trained text encoder "
                                "(--train_text_encoder)")


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

    def validate_examples(self, train_text_encoder: bool) -> None:
        positive(**given(tokenizer_max_length=self.tokenizer_max_length))
        if self.snr_gamma is not None:
            finite(snr_gamma=self.snr_gamma)
            if self.snr_gamma <= 0:
                raise RayboothError(f"--snr_gamma must be positive, got {self.snr_gamma}")
        if self.pre_compute_text_embeddings and train_text_encoder:
            raise RayboothError("--pre_compute_text_embeddings needs a frozen text encoder: add "
                                "--no_train_text_encoder")
