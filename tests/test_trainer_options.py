"""`raybooth train` end to end with many of diffusers' training options at once."""

import json

import torch
from diffusers import StableDiffusionPipeline
from helpers import differs, train_args, weights

from raybooth.commands.cli import main


def test_train_with_the_optimizer_options_and_a_config_file(ray_cluster, tiny_model_dir, subject_dir, tmp_path):
    output = tmp_path / "tuned"
    options = tmp_path / "options.yaml"
    options.write_text("lr_scheduler: cosine\nlr_warmup_steps: 1\ngradient_accumulation_steps: 2\nuse_ema: true\n"
                       "lr: 1e-2\n")
    assert main(train_args(tiny_model_dir, output, subject_dir, tmp_path / "class", "--config", str(options),
                           "--no_use_gpu", "--num_epochs", "2", "--lr", "1e-3", "--use_8bit_adam",
                           "--gradient_checkpointing", "--snr_gamma", "5", "--offset_noise", "--random_flip",
                           "--text_encoder_lr", "1e-4", "--train_text_encoder_steps", "2", "--adam_weight_decay",
                           "0")) == 0

    log = json.loads((output / "training_log.json").read_text())
    # 5 photos against 4 class images: 5 pairs, 2 a step (2 micro-batches of 1), so 3 steps an epoch.
    assert [row["step"] for row in log["history"]] == [1, 2, 3, 4, 5, 6]
    cfg = log["config"]
    assert (cfg["lr_scheduler"], cfg["gradient_accumulation_steps"], cfg["use_ema"]) == ("cosine", 2, True)
    assert log["learning_rate"] == 1e-3  # the flag beat the file
    for part in ("unet", "text_encoder"):
        assert differs(weights(output, part), weights(tiny_model_dir, part))
    assert not differs(weights(output, "vae"), weights(tiny_model_dir, "vae"))
    StableDiffusionPipeline.from_pretrained(output)


def test_train_compiled_with_prompts_encoded_once_samples_with_the_encoder_loaded_again(
        ray_cluster, tiny_model_dir, subject_dir, tmp_path, capsys):
    # --compile: the step's UNet is compiled; the samples after training use the eager one. The
    # photos' crops are encoded ahead of the step (by the eager VAE: batches.py), once each.
    output, samples = tmp_path / "tuned", tmp_path / "samples"
    assert main(train_args(tiny_model_dir, output, subject_dir, tmp_path / "class", "--no_use_gpu", "--compile",
                           "--max_train_steps", "3", "--pre_compute_text_embeddings", "--no_train_text_encoder",
                           "--center_crop", "--tokenizer_max_length", "40", "--lr_scheduler", "linear",
                           "--sample_prompts", "a unqtkn toy car on the beach", "--num_samples_per_prompt", "1",
                           "--samples_dir", str(samples))) == 0
    assert differs(weights(output, "unet"), weights(tiny_model_dir, "unet"))
    assert not differs(weights(output, "text_encoder"), weights(tiny_model_dir, "text_encoder"))
    assert len(list(samples.glob("*.png"))) == 1
    err = capsys.readouterr().err
    assert "compiled by Inductor" in err and "possible crops is encoded once, when first drawn" in err
    assert json.loads((output / "training_log.json").read_text())["config"]["compile"] is True


def test_two_compiled_workers_in_bf16_train_bf16_weights_over_fp32_masters_and_save_the_masters(
        ray_cluster, tiny_model_dir, subject_dir, tmp_path, capsys):
    # Several workers in bf16: the trained weights are bf16 copies, their fp32 masters what AdamW
    # steps, checkpoints hold and the output gets (--bf16_gradients' default). With --compile,
    # Dynamo compiles the UNet's DDP wrapper, split at its gradient buckets.
    output = tmp_path / "tuned"
    assert main(train_args(tiny_model_dir, output, subject_dir, tmp_path / "class", "--no_use_gpu",
                           "--num_workers", "2", "--mixed_precision", "bf16", "--max_train_steps", "3",
                           "--checkpointing_steps", "2", "--lr", "1e-3", "--compile")) == 0
    err = capsys.readouterr().err
    assert "bf16 weights over fp32 masters" in err and "compiled by Inductor" in err
    log = json.loads((output / "training_log.json").read_text())
    assert log["bf16_gradients"] is True and len(log["history"]) == 3
    for part in ("unet", "text_encoder"):
        trained = weights(output, part)
        assert {tensor.dtype for tensor in trained.values()} == {torch.float32}
        assert differs(trained, weights(tiny_model_dir, part))


def test_two_workers_train_a_channels_last_unet_checkpoint_it_and_save_it_contiguous(
        ray_cluster, tiny_model_dir, subject_dir, tmp_path, capsys):
    # DDP over channels-last weights, a checkpoint mid-run and the output (safetensors takes
    # contiguous tensors only), on CPU workers where --channels_last is asked for.
    output = tmp_path / "tuned"
    assert main(train_args(tiny_model_dir, output, subject_dir, tmp_path / "class", "--no_use_gpu",
                           "--num_workers", "2", "--channels_last", "--max_train_steps", "3",
                           "--checkpointing_steps", "2", "--lr", "1e-3")) == 0
    assert "channels-last UNet" in capsys.readouterr().err
    log = json.loads((output / "training_log.json").read_text())
    assert log["channels_last"] is True and len(log["history"]) == 3
    assert differs(weights(output, "unet"), weights(tiny_model_dir, "unet"))
    StableDiffusionPipeline.from_pretrained(output)  # loads as a whole pipeline
