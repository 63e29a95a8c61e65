"""DINO, CLIP-I and CLIP-T on tiny random CLIP and ViT models: the mechanics only (shapes, ranges,
pairing), since random weights say nothing about subjects."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from raybooth.commands.cli import main
from raybooth.errors import RayboothError
from raybooth.evaluate.judges import (
    ClipJudge,
    DinoJudge,
    Preprocessing,
    distinct_pairs_distance,
    paper_metrics,
    resolve_pretrained,
    text_for_clip,
)


@pytest.fixture(scope="module")
def judges_dir(tmp_path_factory) -> Path:
    """A tiny CLIP model with raybooth's character-level tokenizer, and a tiny ViT as DINO."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from raybooth.models.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("judges")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    ViTModel(ViTConfig(**vision)).save_pretrained(folder / "dino")
    return folder


@pytest.fixture(scope="module")
def judges(judges_dir) -> tuple[ClipJudge, DinoJudge]:
    return ClipJudge(judges_dir / "clip"), DinoJudge(judges_dir / "dino")


def random_images(count: int, seed: int, shape=(64, 48, 3)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def test_embeddings_are_unit_vectors_of_the_models_sizes(judges):
    clip, dino = judges
    images = random_images(3, 0) + random_images(2, 1, shape=(40, 90, 3))  # mixed sizes and shapes
    for vectors, width in ((clip.images(images), 16), (dino.images(images), 32),
                           (clip.texts(["a dog", "a toy car on the beach"]), 16)):
        assert vectors.shape[1] == width
        assert torch.allclose(vectors.norm(dim=1), torch.ones(len(vectors)), atol=1e-5)
    assert len(clip.images(images)) == 5


def test_identical_images_score_one_and_every_measure_lies_in_range(judges):
    clip, dino = judges
    real = random_images(1, 2)
    same = paper_metrics(real * 3, ["a photo of unqtkn dog"] * 3, real, clip, dino, "unqtkn", class_samples=real * 2)
    assert same["dino"] == pytest.approx(1, abs=1e-5) and same["clip_i"] == pytest.approx(1, abs=1e-5)
    assert same["pres"] == pytest.approx(1, abs=1e-5)  # class samples that are the subject: no prior left
    assert same["class_dino_diversity"] == pytest.approx(0, abs=1e-5)
    other = paper_metrics(random_images(4, 3), ["a unqtkn dog in the snow"] * 4, real, clip, dino, "unqtkn",
                          class_samples=random_images(3, 4))
    for name in ("dino", "clip_i", "clip_t", "pres"):
        assert -1 <= other[name] <= 1
    assert other["dino"] < 1 - 1e-4 and other["clip_i"] < 1 - 1e-4
    assert 0 < other["class_dino_diversity"] <= 2


def test_clip_t_pairs_each_sample_with_its_own_prompt(judges):
    clip, dino = judges
    samples = random_images(2, 5)
    prompts = ["a unqtkn dog on the beach", "a unqtkn dog in the jungle"]
    images, texts = clip.images(samples), clip.texts(["a dog on the beach", "a dog in the jungle"])
    paired = paper_metrics(samples, prompts, samples[:1], clip, dino, "unqtkn")
    assert paired["clip_t"] == pytest.approx(float((images * texts).sum(dim=1).mean()), abs=1e-5)
    crossed = paper_metrics(samples, prompts[::-1], samples[:1], clip, dino, "unqtkn")
    assert crossed["clip_t"] == pytest.approx(float((images * texts.flip(0)).sum(dim=1).mean()), abs=1e-5)
    assert paired["clip_t"] != pytest.approx(crossed["clip_t"], abs=1e-6)
    beach = paired["per_prompt"][prompts[0]]
    assert beach["samples"] == 1 and beach["clip_t"] == pytest.approx(float(images[0] @ texts[0]), abs=1e-5)


def test_the_identifier_is_left_out_of_clip_t_and_bad_input_is_refused(judges):
    clip, dino = judges
    assert text_for_clip("a unqtkn dog on the beach", "unqtkn") == "a dog on the beach"
    assert text_for_clip("a photo of unqtkn toy car", "unqtkn") == "a photo of toy car"
    assert text_for_clip("a photo of unqtknx", "unqtkn") == "a photo of unqtknx"  # only the whole word
    with pytest.raises(ValueError, match="2 samples for 1 prompts"):
        paper_metrics(random_images(2, 0), ["a dog"], random_images(1, 0), clip, dino)
    with pytest.raises(RayboothError, match="at least one"):
        paper_metrics(random_images(1, 0), ["a dog"], [], clip, dino)
    assert np.isnan(distinct_pairs_distance(torch.ones(1, 4)))


def test_preprocessing_follows_the_models_preprocessor_config(tmp_path):
    image = np.zeros((60, 120, 3), dtype=np.uint8)
    image[:, :60] = 255  # left half white: a centre crop keeps half white, a squash keeps it too
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 36, "width": 36}, "do_center_crop": True,
         "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2}))
    clip_like = Preprocessing.for_model(tmp_path, 224, clip=True)
    assert (clip_like.size, clip_like.square, clip_like.crop) == (40, False, 36)
    pixels = clip_like([image])
    assert pixels.shape == (1, 3, 36, 36)
    assert pixels.min() == pytest.approx(-1) and pixels.max() == pytest.approx(1)  # mean 0.5, std 0.5
    vit_like = Preprocessing.for_model(None, 32, clip=False)  # no config: ViT's square resize, ImageNet stats
    assert vit_like([image]).shape == (1, 3, 32, 32) and vit_like.crop is None


def test_models_are_found_in_a_folder_or_a_hugging_face_cache_folder(judges_dir, tmp_path):
    assert resolve_pretrained(judges_dir / "dino", "DINO model") == judges_dir / "dino"
    snapshot = tmp_path / "cache" / "models--facebook--dino-vits16" / "snapshots" / "0123abc"
    shutil.copytree(judges_dir / "dino", snapshot)
    assert resolve_pretrained(tmp_path / "cache", "DINO model") == snapshot
    assert DinoJudge(tmp_path / "cache").images(random_images(1, 0)).shape == (1, 32)
    assert resolve_pretrained("facebook/dino-vits16", "DINO model") == "facebook/dino-vits16"  # for the hub's cache
    with pytest.raises(RayboothError, match="holds no config.json"):
        resolve_pretrained(tmp_path, "CLIP model")
    with pytest.raises(RayboothError, match="neither a model folder"):
        resolve_pretrained(tmp_path / "missing" / "x" / "y", "CLIP model")
    with pytest.raises(RayboothError, match="without a network"):
        ClipJudge("raybooth-tests/no-such-model")


def test_evaluate_with_clip_metrics_writes_the_papers_measures(ray_cluster, tiny_model_dir, judges_dir, tmp_path,
                                                               capsys):
    from raybooth.world.scenes import write_subject

    write_subject(tmp_path / "subject", count=2)
    output = tmp_path / "evaluation"
    assert main(["evaluate", "--model_dir", str(tiny_model_dir), "--instance_images_dir", str(tmp_path / "subject"),
                 "--class_noun", "dog", "--clip_model_dir", str(judges_dir / "clip"), "--dino_model_dir",
                 str(judges_dir / "dino"), "--prompts", "a unqtkn dog on the beach", "a unqtkn dog in the snow",
                 "--num_samples", "2", "--num_class_samples", "2", "--num_inference_steps", "2",
                 "--output_dir", str(output)]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["settings"]["metrics"] == "clip"
    assert {"dino", "clip_i", "clip_t", "pres", "class_dino_diversity"} <= set(metrics)
    assert all(-1 <= metrics[name] <= 1 for name in ("dino", "clip_i", "clip_t", "pres"))
    assert set(metrics["per_prompt"]) == {"a unqtkn dog on the beach", "a unqtkn dog in the snow"}
    assert "CLIP-T" in capsys.readouterr().out
