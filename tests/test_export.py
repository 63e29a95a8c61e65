"""`raybooth export` and single-file checkpoints as --model_dir, proven by round trips through
diffusers' own readers, never against a copy of the tables: a single file loads with
`from_single_file` into a pipeline whose every weight is the folder's and whose images are the
folder's; at full size its keys are the ones diffusers' readers expect of SD 1.x, 2.x and XL
checkpoints; a kohya LoRA loads with `load_lora_weights` and draws as the diffusers-format one;
a single file fine-tunes as its folder does. Bad input: one line each."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.loaders import single_file_utils as diffusers_single_file
from helpers import differs, train_briefly, weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from raybooth.commands.cli import build_parser, main
from raybooth.commands.single_files import with_model_folder
from raybooth.errors import RayboothError
from raybooth.models.export import write_extra_formats
from raybooth.models.export.ldm import CONVERTERS
from raybooth.models.export.sd import SD1, SD2
from raybooth.models.export.sdxl import SDXL
from raybooth.models.from_single_file import STAMP, single_file_to_folder
from raybooth.models.lora import LORA_SETTINGS, LORA_WEIGHTS, add_adapters, save_adapters
from raybooth.models.output import KOHYA_WEIGHTS, check_output_dir
from raybooth.models.tiny import SCHEDULER, build_tiny_pipeline, build_tokenizer, write_tiny_model

PROMPT = "a photo of unqtkn toy car"
RANK, ALPHA = 4, 16.0  # alpha != rank: an exporter that wrote alpha = rank would load at a quarter of the strength
PIPELINES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def image(pipeline, seed=0):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(PROMPT, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(seed),
                    output_type="np").images[0]


def text_config(tokenizer, hidden: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                          hidden_act=act, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def tiny_sd2(seed: int) -> StableDiffusionPipeline:
    """SD 2.x's architecture in small: an OpenCLIP-style (GELU) text encoder, linear projections
    in the UNet's attention, v-prediction; two resnets a level, attention in the first level only."""
    torch.manual_seed(seed)
    base, tokenizer = build_tiny_pipeline(seed), build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=2, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D",
        "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)
    return StableDiffusionPipeline(
        vae=base.vae, text_encoder=CLIPTextModel(text_config(tokenizer, 32, "gelu")), tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER | {"prediction_type": "v_prediction"}), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each family's tiny pipeline folder, and another of the same architecture with other
    weights, to read single files with: what it lends is configs only."""
    root, found = tmp_path_factory.mktemp("families"), {}
    found["sd1"] = (tiny_model_dir, write_tiny_model(root / "sd1-other", seed=1))
    for seed, folder in ((0, root / "sd2"), (1, root / "sd2-other")):
        tiny_sd2(seed).save_pretrained(folder)
    found["sd2"] = (root / "sd2", root / "sd2-other")
    found["sdxl"] = tuple(write_tiny_model(root / name, seed=seed, family="sdxl")
                          for seed, name in ((0, "sdxl"), (1, "sdxl-other")))
    return found


def export(model_dir, output, *flags) -> None:
    assert main(["export", "--model_dir", str(model_dir), "--format", "single-file", "--output_file", str(output),
                 *flags]) == 0


def components(pipeline) -> dict[str, dict[str, torch.Tensor]]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {name: getattr(pipeline, name).state_dict() for name in names if getattr(pipeline, name, None) is not None}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_single_file_loads_in_diffusers_with_every_weight_and_image_of_the_folder(family, models, tmp_path, capsys):
    folder, other = models[family]
    export(folder, tmp_path / "model.safetensors")
    assert capsys.readouterr().out.strip() == str(tmp_path / "model.safetensors")
    # diffusers' own reader, with the configs of a folder whose weights are all other ones
    loaded = PIPELINES[family].from_single_file(str(tmp_path / "model.safetensors"), config=str(other),
                                                local_files_only=True)
    original = PIPELINES[family].from_pretrained(folder)
    ours, theirs = components(loaded), components(original)
    assert ours.keys() == theirs.keys() == ({"unet", "vae", "text_encoder", "text_encoder_2"} if family == "sdxl"
                                            else {"unet", "vae", "text_encoder"})
    for name in theirs:
        assert ours[name].keys() == theirs[name].keys(), name
        assert all(torch.equal(ours[name][key], theirs[name][key]) for key in theirs[name]), name
    assert differs(components(PIPELINES[family].from_pretrained(other))["unet"], theirs["unet"])
    # Bit-exact weights; the images agree to float rounding (a tensor read from one file or another
    # may meet other summation orders in the CPU's kernels: seen at 2e-6 on the pooled text embedding).
    np.testing.assert_allclose(image(loaded), image(original), rtol=0, atol=1e-5)


def test_half_writes_every_weight_rounded_to_fp16(models, tmp_path):
    folder, other = models["sdxl"]
    export(folder, tmp_path / "half.safetensors", "--half")
    with safe_open(tmp_path / "half.safetensors", framework="pt") as file:
        assert {file.get_slice(key).get_dtype() for key in file.keys()} == {"F16"}
    loaded = components(StableDiffusionXLPipeline.from_single_file(str(tmp_path / "half.safetensors"),
                                                                   config=str(other), local_files_only=True))
    for name, state in components(StableDiffusionXLPipeline.from_pretrained(folder)).items():
        assert all(torch.equal(loaded[name][key].half(), value.half()) for key, value in state.items()), name
        assert any(not torch.equal(loaded[name][key].float(), value) for key, value in state.items()), name


# The real models' sizes, on the meta device (no memory): SD 1.5, SD 2.1 and SDXL base.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu")
REAL = {
    "v1": (dict(cross_attention_dim=768), [("text_encoder", CLIPTextModel, CLIP_L)]),
    "v2": (dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
           [("text_encoder", CLIPTextModel, dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                                  num_attention_heads=16, hidden_act="gelu"))]),
    "xl_base": (dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, use_linear_projection=True,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                     addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816),
                [("text_encoder", CLIPTextModel, CLIP_L),
                 ("text_encoder_2", CLIPTextModelWithProjection, dict(hidden_size=1280, intermediate_size=5120,
                  num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280))]),
}


@pytest.mark.parametrize("model_type", REAL)
def test_at_full_size_the_file_has_the_keys_diffusers_reads_as_that_model(model_type):
    """Full-size SD 1.5, 2.1 and SDXL base, exported by the same tables: diffusers recognises each
    file as that model (by the keys its loader looks for) and its readers give back every weight
    name and shape of the diffusers modules."""
    unet_config, encoders = REAL[model_type]
    layout = {"v1": SD1, "v2": SD2, "xl_base": SDXL}[model_type]
    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel(**unet_config), "vae": AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)}
        modules |= {name: kind(CLIPTextConfig(**config)) for name, kind, config in encoders}
    checkpoint = {}
    for name, prefix, kind in layout.parts:
        state, config = modules[name].state_dict(), modules[name].config
        converted = CONVERTERS[kind](state, config if isinstance(config, dict) else config.to_dict())
        checkpoint |= {prefix + key: value for key, value in converted.items()}
    assert diffusers_single_file.infer_diffusers_model_type(checkpoint) == model_type
    read = {"unet": diffusers_single_file.convert_ldm_unet_checkpoint(checkpoint, modules["unet"].config),
            "vae": diffusers_single_file.convert_ldm_vae_checkpoint(checkpoint, modules["vae"].config)}
    if model_type == "v2":
        read["text_encoder"] = diffusers_single_file.convert_open_clip_checkpoint(modules["text_encoder"], checkpoint)
    else:
        read["text_encoder"] = diffusers_single_file.convert_ldm_clip_checkpoint(checkpoint)
    if model_type == "xl_base":
        read["text_encoder_2"] = diffusers_single_file.convert_open_clip_checkpoint(
            modules["text_encoder_2"], checkpoint, prefix="conditioner.embedders.1.model.")
    for name, state in read.items():
        state = {key.removeprefix("text_model.") if name == "text_encoder" else key: value
                 for key, value in state.items()}
        expected = {key: value.shape for key, value in modules[name].state_dict().items()
                    if not key.endswith("position_ids")}
        assert {key: value.shape for key, value in state.items()} == expected, name


# Kohya-format LoRA.

def adapted(pipeline, folder: Path):
    """`pipeline` with adapters on the UNet and every text encoder, their B matrices random (as
    after training), saved by raybooth's own writer into `folder` with the settings beside it."""
    add_adapters(pipeline.unet, pipeline.text_encoder, RANK, ALPHA, True, getattr(pipeline, "text_encoder_2", None))
    torch.manual_seed(1)
    with torch.no_grad():
        for module in components(pipeline).values():
            for name, parameter in module.items():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
    save_adapters(pipeline.unet, pipeline.text_encoder, folder, getattr(pipeline, "text_encoder_2", None))
    (folder / LORA_SETTINGS).write_text(json.dumps({"rank": RANK, "alpha": ALPHA}))
    return folder


def lora_layers(module) -> int:
    return sum(name.endswith("lora_A.default_0.weight") or name.endswith("lora_A.default.weight")
               for name, _ in module.named_parameters())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_kohya_lora_draws_as_the_diffusers_adapter_with_every_module_mapped(family, models, tmp_path):
    folder, _ = models[family]
    kind = PIPELINES[family]
    lora = adapted(kind.from_pretrained(folder), tmp_path / "lora")
    assert main(["export", "--model_dir", str(lora), "--format", "kohya", "--output_file",
                 str(tmp_path / "kohya.safetensors")]) == 0

    diffusers_file, kohya = load_file(lora / LORA_WEIGHTS), load_file(tmp_path / "kohya.safetensors")
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    parts = ("unet", "text_encoder", "text_encoder_2") if family == "sdxl" else ("unet", "text_encoder")
    for part in parts:  # every adapted module of each part, with its down and up matrices and its alpha
        modules = {key for key in diffusers_file if key.startswith(f"{part}.") and key.endswith("down.weight")}
        assert modules, part
        for matrix in ("lora_down.weight", "lora_up.weight", "alpha"):
            assert sum(key.startswith(prefixes[part]) and key.endswith(matrix) for key in kohya) == len(modules)
    assert len(kohya) == 3 * sum(key.endswith("down.weight") for key in diffusers_file)
    assert {value.item() for key, value in kohya.items() if key.endswith(".alpha")} == {ALPHA}

    as_diffusers, as_kohya = kind.from_pretrained(folder), kind.from_pretrained(folder)
    as_diffusers.load_lora_weights(lora)
    as_kohya.load_lora_weights(str(tmp_path / "kohya.safetensors"))  # diffusers' reader of kohya's keys
    for part in parts:
        assert lora_layers(getattr(as_kohya, part)) == lora_layers(getattr(as_diffusers, part)) > 0, part
    drawn = image(as_kohya)
    np.testing.assert_allclose(drawn, image(as_diffusers), atol=1e-6)
    assert np.abs(drawn - image(kind.from_pretrained(folder))).max() > 1e-3  # the adapter does change the image


def test_kohya_half_keeps_the_alphas_exact(models, tmp_path):
    lora = adapted(StableDiffusionPipeline.from_pretrained(models["sd1"][0]), tmp_path / "lora")
    assert main(["export", "--model_dir", str(lora), "--format", "kohya", "--output_file",
                 str(tmp_path / "kohya.safetensors"), "--half"]) == 0
    kohya, source = load_file(tmp_path / "kohya.safetensors"), load_file(lora / LORA_WEIGHTS)
    assert {value.dtype for key, value in kohya.items() if not key.endswith(".alpha")} == {torch.float16}
    assert {(value.dtype, value.item()) for key, value in kohya.items() if key.endswith(".alpha")} == \
        {(torch.float32, ALPHA)}
    assert sorted(value.half().numpy().tobytes() for value in source.values()) == \
        sorted(value.numpy().tobytes() for key, value in kohya.items() if not key.endswith(".alpha"))


# A single file as --model_dir.

def parsed(*argv):
    return build_parser().parse_args(list(argv))


def test_a_single_file_model_dir_is_read_once_into_a_folder_with_the_configs_given(models, tmp_path, monkeypatch):
    folder, other = models["sd1"]
    downloads = tmp_path / "downloads"  # no pipeline folder here: the configs must be given
    export(folder, downloads / "community.safetensors")
    args = with_model_folder(parsed("generate", "--model_dir", str(downloads / "community.safetensors"),
                                    "--original_config_dir", str(other), "--output_dir", "o", "--prompts", "x"))
    read = downloads / "community-diffusers"
    assert args.model_dir == read and json.loads((read / STAMP).read_text())["original_config_dir"] == str(other)
    for part in ("unet", "vae", "text_encoder"):  # the file's weights, not the config folder's
        assert not differs(weights(read, part), weights(folder, part)) and differs(weights(read, part),
                                                                                   weights(other, part))
    assert (read / "scheduler" / "scheduler_config.json").read_text() == \
        (other / "scheduler" / "scheduler_config.json").read_text()

    def no_second_reading(*_):
        raise AssertionError("read again")

    with monkeypatch.context() as patched:
        patched.setattr("raybooth.models.from_single_file._convert", no_second_reading)
        assert single_file_to_folder(downloads / "community.safetensors", other) == read  # reused
        # `run --model_name FILE` takes it as its model
        args = with_model_folder(parsed("run", "--model_name", str(downloads / "community.safetensors"),
                                        "--original_config_dir", str(other)))
        assert (args.model_dir, args.model_name) == (read, None)
    export(other, downloads / "community.safetensors", "--overwrite")  # a new file of that name: read anew...

    def fail_midway(path, layout, configs, dtype, folder):
        (folder / "unet").mkdir(parents=True)
        raise OSError("disk full")

    with monkeypatch.context() as patched:  # ... whole or not at all: a reading cut short leaves the old one
        patched.setattr("raybooth.models.from_single_file._convert", fail_midway)
        with pytest.raises(OSError, match="disk full"):
            single_file_to_folder(downloads / "community.safetensors", other)
    assert not differs(weights(read, "unet"), weights(folder, "unet"))
    assert single_file_to_folder(downloads / "community.safetensors", other) == read
    assert not differs(weights(read, "unet"), weights(other, "unet"))
    assert sorted(entry.name for entry in downloads.iterdir()) == ["community-diffusers", "community.safetensors"]


def test_a_single_file_fine_tunes_as_its_folder_does(models, subject_dir, tmp_path, capsys):
    """Its default configs: the pipeline folder the file lies in (here one of other weights)."""
    folder, other = models["sd1"]
    beside = Path(shutil.copytree(other, tmp_path / "other"))
    export(folder, beside / "tuned.safetensors")
    from_folder = train_briefly(folder, subject_dir, tmp_path / "a", capsys)
    from_file = train_briefly(beside / "tuned.safetensors", subject_dir, tmp_path / "b", capsys)
    assert from_folder[0] == from_file[0] == 0, from_file[1]
    assert from_file[2]["config"]["model_dir"] == str(beside / "tuned-diffusers")
    for part in ("unet", "text_encoder", "vae"):
        trained = weights(tmp_path / "a" / "tuned", part)
        assert trained.keys() == weights(tmp_path / "b" / "tuned", part).keys()
        assert not differs(trained, weights(tmp_path / "b" / "tuned", part)), part
    assert differs(weights(tmp_path / "a" / "tuned", "unet"), weights(folder, "unet"))  # it did train


# Bad input: one line each, and nothing half-written.

def one_line_error(capsys, *argv) -> str:
    assert main(list(argv)) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("raybooth: error: ")
    return error


def test_a_model_file_raybooth_cannot_read_is_one_line(models, tmp_path, capsys):
    folder, other = models["sd1"]
    export(folder, tmp_path / "whole.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    unet_only = {key: value for key, value in load_file(tmp_path / "whole.safetensors").items()
                 if key.startswith("model.diffusion_model.")}
    save_file(unet_only, tmp_path / "unet-only.safetensors")
    lora = adapted(StableDiffusionPipeline.from_pretrained(folder), tmp_path / "lora")
    assert main(["export", "--model_dir", str(lora), "--format", "kohya", "--output_file",
                 str(tmp_path / "kohya.safetensors")]) == 0
    capsys.readouterr()
    cases = {"junk.safetensors": "is not a checkpoint raybooth can read",
             "unet-only.safetensors": "cannot tell which model family",
             "kohya.safetensors": "is a LoRA, not a checkpoint"}
    for name, message in cases.items():
        error = one_line_error(capsys, "generate", "--model_dir", str(tmp_path / name), "--original_config_dir",
                               str(other), "--output_dir", str(tmp_path / "out"), "--prompts", PROMPT)
        assert message in error, error
    # No configs to read it with: the default (the file's own folder) and the flag are named.
    error = one_line_error(capsys, "merge-lora", "--model_dir", str(tmp_path / "whole.safetensors"),
                           "--lora_weights_dir", str(lora), "--output_dir", str(tmp_path / "merged"))
    assert "--original_config_dir" in error and f"its folder {tmp_path} is no diffusers pipeline folder" in error
    error = one_line_error(capsys, "generate", "--model_dir", str(tmp_path / "whole.safetensors"),
                           "--original_config_dir", str(models["sd2"][1]), "--output_dir", "o", "--prompts", "x")
    assert "is a Stable Diffusion 1.x checkpoint, but" in error and "is a Stable Diffusion 2.x pipeline" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


def test_export_refuses_the_wrong_kind_of_folder_and_an_existing_file_in_one_line(models, tmp_path, capsys):
    folder, _ = models["sd1"]
    lora = adapted(StableDiffusionPipeline.from_pretrained(folder), tmp_path / "lora")
    output = tmp_path / "out.safetensors"
    error = one_line_error(capsys, "export", "--model_dir", str(lora), "--format", "single-file", "--output_file",
                           str(output))
    assert "is a LoRA adapter, not a pipeline: export it with --format kohya" in error
    error = one_line_error(capsys, "export", "--model_dir", str(folder), "--format", "kohya", "--output_file",
                           str(output))
    assert "is a full pipeline, not a LoRA adapter: export it with --format single-file" in error
    error = one_line_error(capsys, "export", "--model_dir", str(folder), "--format", "single-file", "--output_file",
                           str(tmp_path / "out.ckpt"))
    assert "must end in .safetensors" in error
    assert not output.exists()
    output.write_bytes(b"someone's file")
    for kind, source in (("single-file", folder), ("kohya", lora)):
        error = one_line_error(capsys, "export", "--model_dir", str(source), "--format", kind, "--output_file",
                               str(output))
        assert f"{output} already exists; pass --overwrite to replace it" in error
        assert output.read_bytes() == b"someone's file"
    export(folder, output, "--overwrite")
    assert "model.diffusion_model.out.2.weight" in load_file(output)


def test_an_export_that_fails_midway_leaves_no_file_and_the_old_one_whole(models, tmp_path, monkeypatch):
    folder, _ = models["sd1"]
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"the earlier export")

    def fail_midway(weights, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        main(["export", "--model_dir", str(folder), "--format", "single-file", "--output_file", str(output),
              "--overwrite"])
    assert output.read_bytes() == b"the earlier export"
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


# What `train --save_single_file` and `--output_kohya_format` add to a finished output.

def test_the_extra_formats_land_in_the_output_and_overwrite_still_replaces_it(models, tmp_path):
    folder, _ = models["sd1"]
    pipeline = Path(shutil.copytree(folder, tmp_path / "model-tuned"))
    write_extra_formats(pipeline, pipeline, single_file=True, kohya=False)
    loaded = StableDiffusionPipeline.from_single_file(str(pipeline / "model-tuned.safetensors"), config=str(folder),
                                                      local_files_only=True)
    assert not differs(loaded.unet.state_dict(), StableDiffusionPipeline.from_pretrained(folder).unet.state_dict())
    check_output_dir(pipeline, overwrite=True)  # the file is the output's own: --overwrite may replace it
    lora = adapted(StableDiffusionPipeline.from_pretrained(folder), tmp_path / "lora-tuned")
    write_extra_formats(lora, lora, single_file=False, kohya=True)
    assert any(key.startswith("lora_unet_") for key in load_file(lora / KOHYA_WEIGHTS))
    check_output_dir(lora, overwrite=True)
    (pipeline / "notes.txt").write_text("mine")
    with pytest.raises(RayboothError, match="notes.txt"):
        check_output_dir(pipeline, overwrite=True)


def test_a_dora_adapter_is_refused_for_kohya_in_one_line(models, tmp_path, capsys):
    from peft import LoraConfig

    pipeline = StableDiffusionPipeline.from_pretrained(models["sd1"][0])
    pipeline.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q", "to_v"], use_dora=True))
    save_adapters(pipeline.unet, None, tmp_path / "dora")
    error = one_line_error(capsys, "export", "--model_dir", str(tmp_path / "dora"), "--format", "kohya",
                           "--output_file", str(tmp_path / "kohya.safetensors"))
    assert "is a DoRA adapter (--use_dora)" in error and "raybooth merge-lora" in error
    assert not (tmp_path / "kohya.safetensors").exists()
