"""`--use_lora` through the whole workflow: one `raybooth run --use_lora` on the tiny model (two
CPU workers, so DDP over frozen weights too), shared by the tests, then `generate
--lora_weights_dir` and `merge-lora` on what it wrote."""

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import train_config
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import safe_open

import raybooth.driver.generation
from raybooth.commands.cli import build_parser, main, run_settings
from raybooth.config.watch import LOGS_DIR, METRICS_FILE, REPORT_FILE
from raybooth.driver.generation import ImageGenerator
from raybooth.errors import RayboothError
from raybooth.files.names import image_name, image_seed
from raybooth.models.loading import load_for_training
from raybooth.models.lora import LORA_WEIGHTS, add_to_models
from raybooth.models.output import LORA_SETTINGS, TRAINING_LOG, check_output_dir
from raybooth.train.optim import build_optimization

PROMPT = "a unqtkn toy car on the beach"
STEPS = ["--num_inference_steps", "2"]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def image(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def lora_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-run")
    base = Path(shutil.copytree(tiny_model_dir, root / "base"))
    before = digests(base)
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        code = main(["run", "--model_dir", str(base), "--work_dir", str(root / "work"), "--use_lora", "--no_use_gpu",
                     "--num_workers", "2", "--num_class_images", "4", *STEPS, "--train_batch_size", "2",
                     "--max_train_steps", "4", "--lr", "1e-2", "--report_every_n_steps", "2",
                     "--storage_path", str(root / "ray-storage"), "--sample_prompts", PROMPT,
                     "--num_samples_per_prompt", "1"])
    return SimpleNamespace(code=code, root=root, base=base, before=before, adapter=root / "work" / "model-tuned",
                           samples=root / "work" / "images-new", log=log.getvalue())


@pytest.fixture(scope="module")
def generated(lora_run, tmp_path_factory):
    """The prompt's first image through `raybooth generate --lora_weights_dir`, and as its actor
    makes it (in this process, to save a Ray job each) from the base model and at --lora_scale 0."""
    assert lora_run.code == 0, lora_run.log
    output = tmp_path_factory.mktemp("lora-generate")
    assert main(["generate", "--model_dir", str(lora_run.base), "--output_dir", str(output), "--prompts", PROMPT,
                 *STEPS, "--no_use_gpu", "--lora_weights_dir", str(lora_run.adapter)]) == 0
    return {"lora": image(output / image_name(PROMPT, 0)), "base": render(lora_run.base),
            "scale 0": render(lora_run.base, lora_weights=str(lora_run.adapter), lora_scale=0.0)}


def render(model_dir: Path, **lora) -> np.ndarray:
    """The prompt's first image as a `raybooth generate` actor makes it."""
    actor = ImageGenerator(str(model_dir), use_gpu=False, dtype="auto", sampler="dpm++", num_inference_steps=2,
                           guidance_scale=7.5, resolution=64, **lora)
    out = actor({"prompt": np.array([PROMPT]), "seed": np.array([image_seed(0, PROMPT, 0)]), "file": np.array(["x"])})
    return out["image"][0].astype(np.int16)


def test_run_use_lora_writes_only_the_adapter_and_leaves_the_base_alone(lora_run):
    assert lora_run.code == 0, lora_run.log
    # The adapter, its settings and the run's record (log, report, metrics, TensorBoard logs): no pipeline.
    assert sorted(p.name for p in lora_run.adapter.iterdir()) == sorted(
        [LORA_WEIGHTS, LORA_SETTINGS, TRAINING_LOG, REPORT_FILE, METRICS_FILE, LOGS_DIR])
    assert digests(lora_run.base) == lora_run.before
    assert not list(lora_run.adapter.parent.glob(".model-tuned*"))  # no partial folder left behind
    settings = json.loads((lora_run.adapter / LORA_SETTINGS).read_text())
    assert settings["base_model"] == str(lora_run.base) and (settings["rank"], settings["alpha"]) == (4, 4)
    assert settings["text_encoder_targets"] and settings["learning_rate"] == 1e-2
    with safe_open(lora_run.adapter / LORA_WEIGHTS, framework="pt") as weights:
        assert {key.split(".")[0] for key in weights.keys()} == {"unet", "text_encoder"}
    log = json.loads((lora_run.adapter / TRAINING_LOG).read_text())
    history = log["history"]
    assert log["learning_rate"] == 1e-2  # the rate used: --lr itself stays None where its default applies
    assert [row["step"] for row in history] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in history)
    assert f"LoRA adapter: {lora_run.adapter}" in lora_run.log
    assert f"--model_dir {lora_run.base} --lora_weights_dir {lora_run.adapter}" in lora_run.log


def test_generate_with_the_adapter_draws_as_the_workers_samples_and_scale_0_as_the_base(lora_run, generated):
    assert np.abs(generated["lora"] - generated["base"]).max() > 10
    np.testing.assert_array_equal(generated["scale 0"], generated["base"])
    # The workers sampled with the adapter live (fused into a copy); `generate` fuses it the same way.
    sample = image(lora_run.samples / image_name(PROMPT, 0))
    assert np.abs(sample - generated["lora"]).max() <= 1


def test_merge_lora_writes_a_pipeline_that_draws_as_the_adapter(lora_run, generated, tmp_path, capsys):
    merged = tmp_path / "merged"
    args = ["merge-lora", "--model_dir", str(lora_run.base), "--lora_weights_dir", str(lora_run.adapter),
            "--output_dir", str(merged)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(merged)
    assert (merged / "model_index.json").is_file() and not (merged / LORA_WEIGHTS).exists()
    assert np.abs(render(merged) - generated["lora"]).max() <= 1
    assert main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--lora_scale", "0"]) == 0
    assert render(merged).tolist() == generated["base"].tolist()


def test_a_bad_lora_weights_dir_is_one_error_line_before_ray(lora_run, tiny_model_dir, tmp_path, capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(raybooth.driver.generation, "connect", no_ray)
    missing = tmp_path / "nowhere"
    assert main(["generate", "--model_dir", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"),
                 "--prompts", PROMPT, "--lora_weights_dir", str(missing)]) == 1
    assert capsys.readouterr().err.strip() == f"raybooth: error: LoRA folder {missing} does not exist"
    (tmp_path / "model").mkdir()  # a full model's weights where the adapter should be
    shutil.copy(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "model" / LORA_WEIGHTS)
    assert main(["generate", "--model_dir", str(tiny_model_dir), "--output_dir", str(tmp_path / "out"),
                 "--prompts", PROMPT, "--lora_weights_dir", str(tmp_path / "model")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("raybooth: error: ") and "holds no LoRA weights" in error and "\n" not in error
    assert main(["merge-lora", "--model_dir", str(tiny_model_dir), "--lora_weights_dir", str(lora_run.adapter),
                 "--output_dir", str(tmp_path / "merged"), "--lora_scale", "nan"]) == 1
    assert "--lora_scale must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


def test_an_adapter_folder_is_replaced_only_with_overwrite_and_only_when_it_is_ours(lora_run, tmp_path):
    folder = Path(shutil.copytree(lora_run.adapter, tmp_path / "adapter"))
    with pytest.raises(RayboothError, match="already holds a LoRA adapter; pass --overwrite"):
        check_output_dir(folder, overwrite=False)
    check_output_dir(folder, overwrite=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RayboothError, match=r"other files \(notes.txt\)"):
        check_output_dir(folder, overwrite=True)
    (folder / "notes.txt").unlink()
    (folder / LORA_SETTINGS).unlink()  # a LoRA file alone: someone else's, not a raybooth output
    with pytest.raises(RayboothError, match="holds no model"):
        check_output_dir(folder, overwrite=True)


def trained_with(model_dir: Path, *flags: str):
    """The tiny model as a worker sets it up for `raybooth train` with these flags, and its optimizer."""
    cfg, cpu = train_config(*flags), torch.device("cpu")
    models = load_for_training(model_dir, cpu, cpu, torch.float32, cfg.trains_text_encoder, lora=cfg.use_lora)
    if cfg.use_lora:
        add_to_models(models, cfg)
    return models, build_optimization(models, cfg, total_steps=10).optimizer


def adapter_scales(models) -> set[float]:
    """By how much each LoRA layer scales its adapter's update (peft's alpha / rank)."""
    return {scale for module in (models.unet, models.text_encoder) for layer in module.modules()
            if isinstance(layer, LoraLayer) for scale in layer.scaling.values()}


def test_adapters_train_at_a_larger_default_rate_than_full_fine_tuning_and_lr_sets_both(tiny_model_dir):
    # LoRA adapters start at zero and need larger steps than the pretrained weights can take.
    for flags, rate in [([], 5e-6), (["--use_lora"], 1e-4), (["--lr", "3e-4"], 3e-4),
                        (["--use_lora", "--lr", "3e-4"], 3e-4)]:
        _, optimizer = trained_with(tiny_model_dir, *flags)
        assert [group["lr"] for group in optimizer.param_groups] == [rate, rate], flags  # UNet, text encoder


def test_an_adapter_adds_its_whole_update_at_any_rank_unless_lora_alpha_scales_it(tiny_model_dir):
    models, _ = trained_with(tiny_model_dir, "--use-lora", "--lora-rank", "8")
    assert adapter_scales(models) == {1.0} and models.train_text_encoder  # alpha is the rank by default
    models, _ = trained_with(tiny_model_dir, "--use_lora", "--lora_rank", "8", "--lora_alpha", "16")
    assert adapter_scales(models) == {2.0}


def test_lora_and_learning_rate_flags_are_checked():
    for flags, message in [(["--lr", "0"], "--lr must be positive"), (["--lr", "nan"], "--lr must be a finite"),
                           (["--use_lora", "--lora_rank", "0"], "--lora_rank must be at least 1"),
                           (["--use_lora", "--lora_alpha", "-1"], "--lora_alpha must be positive"),
                           (["--use_lora", "--lora_alpha", "inf"], "--lora_alpha must be a finite"),
                           (["--lora_rank", "8"], "need --use_lora"), (["--no_lora_text_encoder"], "need --use_lora")]:
        with pytest.raises(RayboothError, match=message):
            train_config(*flags).validate()
    _, training = run_settings(build_parser().parse_args(["run", "--use_lora", "--lora_rank", "8"]))
    assert training == {"use_lora": True, "lora_rank": 8}


@pytest.mark.parametrize("lora_text_encoder", [True, False])
def test_with_lora_only_the_adapters_train(tiny_model_dir, lora_text_encoder):
    flags = ["--use_lora"] + ([] if lora_text_encoder else ["--no_lora_text_encoder"])
    cfg = train_config(*flags)
    cpu = torch.device("cpu")
    models = load_for_training(tiny_model_dir, cpu, cpu, torch.float32, cfg.trains_text_encoder, lora=True)
    assert not models.trainable_parameters()  # frozen until the adapters come
    add_to_models(models, cfg)
    assert models.train_text_encoder == lora_text_encoder
    trained = {id(p) for p in models.trainable_parameters()}
    adapters = {id(p) for module in (models.unet, models.text_encoder) for name, p in module.named_parameters()
                if ".lora_" in name}
    assert trained == adapters and bool(adapters)
    assert all(p.dtype == torch.float32 for p in models.trainable_parameters())
    assert any(".lora_" in name for name, _ in models.text_encoder.named_parameters()) == lora_text_encoder
