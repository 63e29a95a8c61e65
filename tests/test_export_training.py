"""`train --save_single_file` and `train --use_lora --output_kohya_format`: the output folder also
holds the pipeline as one checkpoint file, or the adapter in kohya's format, each read back by
diffusers' own readers to the weights or the images of what the run trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import config, differs, train_briefly, weights
from safetensors.torch import load_file

from raybooth.errors import RayboothError
from raybooth.models.lora import LORA_WEIGHTS
from raybooth.models.output import KOHYA_WEIGHTS


def image(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline("a photo of unqtkn toy car", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]


def test_save_single_file_writes_the_trained_pipeline_as_one_file(tiny_model_dir, subject_dir, tmp_path, capsys):
    code, log, _ = train_briefly(tiny_model_dir, subject_dir, tmp_path, capsys, "--save_single_file")
    assert code == 0, log
    output = tmp_path / "tuned"
    loaded = StableDiffusionPipeline.from_single_file(str(output / "tuned.safetensors"), config=str(tiny_model_dir),
                                                      local_files_only=True)
    for part in ("unet", "text_encoder", "vae"):
        state = getattr(loaded, part).state_dict()
        assert not differs(weights(output, part), {key: state[key] for key in weights(output, part)}), part
    assert differs(weights(output, "unet"), weights(tiny_model_dir, "unet"))  # the trained weights, not the base's


def test_output_kohya_format_writes_the_trained_adapter_for_comfyui(tiny_model_dir, subject_dir, tmp_path, capsys):
    code, log, _ = train_briefly(tiny_model_dir, subject_dir, tmp_path, capsys, "--use_lora", "--lora_alpha", "8",
                                 "--output_kohya_format")
    assert code == 0, log
    output = tmp_path / "tuned"
    kohya = load_file(output / KOHYA_WEIGHTS)
    assert {value.item() for key, value in kohya.items() if key.endswith(".alpha")} == {8.0}
    assert 3 * sum(key.endswith("down.weight") for key in load_file(output / LORA_WEIGHTS)) == len(kohya)
    as_diffusers = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    as_diffusers.load_lora_weights(output)
    as_kohya = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    as_kohya.load_lora_weights(str(output / KOHYA_WEIGHTS))
    np.testing.assert_allclose(image(as_kohya), image(as_diffusers), atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (dict(output_kohya_format=True), "--output_kohya_format writes a LoRA adapter in kohya's format: it needs "
                                     "--use_lora"),
    (dict(use_lora=True, use_dora=True, output_kohya_format=True), "without --use_dora"),
    (dict(use_lora=True, save_single_file=True), "--save_single_file writes a fine-tuned pipeline; with --use_lora"),
])
def test_a_format_that_does_not_fit_the_output_is_refused_in_one_line(flags, message):
    with pytest.raises(RayboothError, match=message):
        config(**flags).validate()
