"""`raybooth evaluate` end to end on the tiny random model (its samples are noise: the numbers
mean nothing, the files and keys do), and its checks, which fail before any sampling."""

import json

import numpy as np
import pytest
from PIL import Image

from raybooth.commands.cli import main
from raybooth.config.evaluate import EvaluateConfig
from raybooth.errors import RayboothError
from raybooth.evaluate.measure import clear_samples, evaluate, image_grid
from raybooth.files.names import image_name
from raybooth.world.metrics import WORLD_METRICS, world_subject_prompts
from raybooth.world.scenes import write_subject


def test_evaluate_writes_world_metrics_and_a_grid(ray_cluster, tiny_model_dir, tmp_path, capsys):
    write_subject(tmp_path / "subject", count=3)
    output = tmp_path / "evaluation"
    stale = output / "samples" / image_name("a photo of unqtkn toy car", 5)  # an earlier run's sample
    stale.parent.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(stale)
    assert main(["evaluate", "--model_dir", str(tiny_model_dir), "--instance_images_dir", str(tmp_path / "subject"),
                 "--class_noun", "toy car", "--num_samples", "2", "--num_class_samples", "2",
                 "--num_inference_steps", "2", "--output_dir", str(output)]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    prompts = world_subject_prompts("unqtkn", "toy car")
    assert set(WORLD_METRICS) | {"instance_recognition", "per_prompt", "settings"} == set(metrics)
    assert metrics["settings"]["metrics"] == "world" and metrics["settings"]["subject_prompts"] == prompts
    assert metrics["instance_recognition"] == 1.0  # the classifier knows the built-in subject's photos
    # The random model's samples are coloured noise: no subject, no class, no context, no colours.
    assert metrics["subject_fidelity"] == metrics["prompt_fidelity"] == metrics["class_recognition"] == 0.0
    assert metrics["prior_leakage"] == 0.0 and metrics["class_diversity"] is None
    assert 0 < metrics["class_pixel_diversity"] < 1
    assert set(metrics["per_prompt"]) == set(prompts)
    samples = sorted(p.name for p in (output / "samples").glob("*.png"))
    assert len(samples) == 2 * len(prompts) + 2 and stale.name not in samples
    # Rows: the subject's photos, one per subject prompt, one of class samples; 3 columns (3 photos) of 64 px.
    assert Image.open(output / "samples.png").size == (3 * 66 + 2, (1 + len(prompts) + 1) * 66 + 2)
    printed = capsys.readouterr().out
    assert "subject fidelity" in printed and "lower is better" in printed and "n/a" in printed
    assert str(output.absolute()) in printed


def settings(tmp_path, **overrides) -> EvaluateConfig:
    return EvaluateConfig(**dict(model_dir=tmp_path, instance_images_dir=tmp_path, class_noun="toy car") | overrides)


def test_bad_settings_fail_before_sampling(tiny_model_dir, tmp_path):
    with pytest.raises(RayboothError, match="--metrics clip needs --clip_model_dir and --dino_model_dir"):
        evaluate(settings(tmp_path, metrics="clip"))
    with pytest.raises(RayboothError, match="judges the small world's classes"):
        evaluate(settings(tmp_path, class_noun="dog"))
    with pytest.raises(RayboothError, match="--num_samples must be at least 1"):
        evaluate(settings(tmp_path, num_samples=0))
    write_subject(tmp_path / "subject", count=1)
    with pytest.raises(RayboothError, match="plain class prompt"):
        evaluate(settings(tmp_path, model_dir=tiny_model_dir, instance_images_dir=tmp_path / "subject",
                          prompts=["a photo of a toy car"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RayboothError, match="holds no images"):
        evaluate(settings(tmp_path, model_dir=tiny_model_dir, instance_images_dir=tmp_path / "empty"))
    assert settings(tmp_path).chosen_metrics == "world"
    assert settings(tmp_path, clip_model_dir=tmp_path).chosen_metrics == "clip"
    assert settings(tmp_path, num_samples=3).class_sample_count == 12


def test_only_generated_samples_are_cleared_and_the_grid_is_square(tmp_path):
    (tmp_path / image_name("a dog", 0)).write_bytes(b"old")
    (tmp_path / "notes.png").write_bytes(b"mine")
    clear_samples(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.png"]
    wide = np.zeros((30, 90, 3), np.uint8)
    wide[:, 30:60] = 255  # the centre third is white: the centre square of the image
    sheet = image_grid([[wide], [wide, wide]], 16, gap=0)
    assert sheet.size == (32, 32)
    assert np.asarray(sheet)[:16, :16].min() == 255 and np.asarray(sheet)[:16, 16:].min() == 255  # blank cell
