"""The options of diffusers' SDXL script that shape the data, under its names and meanings, for
both families: per-photo captions (NAME.txt beside a photo, or --caption_column of the folder's
metadata.jsonl / metadata.csv) in place of --instance_prompt, --repeats, --image_interpolation_mode
and --sample_batch_size."""

from __future__ import annotations

import csv
import json
import math
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import CLASS_PROMPT, INSTANCE_PROMPT, config, solid, train_args, train_config, write_solid_images
from PIL import Image

import raybooth.generate.on_worker
import raybooth.train.step
from raybooth.commands.cli import main
from raybooth.config.optimization import INTERPOLATION_MODES
from raybooth.driver.datasets import image_dataset
from raybooth.driver.plan import Inputs, check_inputs, make_plan
from raybooth.driver.preload import preload
from raybooth.errors import RayboothError
from raybooth.files.captions import read_captions
from raybooth.files.images import RESAMPLING, load_image, read_images
from raybooth.models.loading import load_for_training, load_tokenizers, prompt_ids
from raybooth.train.batches import TrainingSet, pairing
from raybooth.train.data import read_all, read_worker_images
from raybooth.train.loss import dreambooth_loss
from raybooth.train.optim import precompute_prompt_embeddings
from raybooth.train.plan import TrainPlan
from raybooth.train.precision import Precision
from raybooth.train.preload import preloaded_models

CPU = torch.device("cpu")
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]  # one a photo: a row's pixels tell its photo


def colored_photos(folder: Path, size=(80, 64)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, color in enumerate(COLORS):
        paths.append(folder / f"photo-{index}.png")
        Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(paths[-1])
    return paths


def write_metadata(folder: Path, kind: str, rows: list[dict]) -> None:
    if kind == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with open(folder / "metadata.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=sorted({key for row in rows for key in row}))
            writer.writeheader()
            writer.writerows(rows)


def model(family: str, request) -> Path:
    return request.getfixturevalue("tiny_xl_dir" if family == "sdxl" else "tiny_model_dir")


# Photo 0 and 2 have captions; photo 1's is empty (the instance prompt, as in diffusers' script); photo 3 has none.
CAPTIONS = {0: "unqtkn toy car on red sand, from above", 1: "", 2: "a close-up of unqtkn toy car in green grass"}


@pytest.mark.parametrize("source", ["txt", "jsonl", "csv"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_each_instance_row_carries_the_prompt_of_the_photo_it_shows(family, source, request, tmp_path):
    model_dir, folder = model(family, request), tmp_path / "photos"
    paths = colored_photos(folder)
    if source == "txt":
        for index, caption in CAPTIONS.items():
            paths[index].with_suffix(".txt").write_text(caption + "\n")
    else:
        write_metadata(folder, source, [{"file_name": paths[index].name, "text": caption}
                                        for index, caption in CAPTIONS.items()])
    cfg = config(model_dir=model_dir, output_dir=tmp_path / "out", instance_images_dir=folder,
                 instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT,
                 caption_column=None if source == "txt" else "text")
    inputs = check_inputs(cfg)  # as the driver reads them, before Ray starts
    plan = TrainPlan(config=cfg, model_dir=model_dir, resolution=64, class_images_dir=tmp_path, class_shares=[[]],
                     pairs_per_worker=8, output_partial="p", output_token="t",
                     instance_paths=[str(path) for path in inputs.instance_paths], instance_captions=inputs.captions)
    read = read_images(plan.instance_paths[::-1], 64)  # in another order than the plan's
    photos, _ = read_worker_images(0, [], lambda line: None, lambda: (read, {}))  # in the order a worker holds them
    tokenizers = load_tokenizers(model_dir)
    training_set = TrainingSet(photos, [solid(9)], 64, pairing(4, 1, 8, 0, 1), 2,
                               prompt_ids(tokenizers, INSTANCE_PROMPT), prompt_ids(tokenizers, CLASS_PROMPT), CPU, 0,
                               photo_prompt_ids=[prompt_ids(tokenizers, p) for p in plan.photo_prompts()])
    expected = {color: prompt_ids(tokenizers, CAPTIONS.get(index) or INSTANCE_PROMPT)
                for index, color in enumerate(COLORS)}
    seen = set()
    for _, _, batch in training_set.batches(num_epochs=2, max_steps=100):
        assert batch.prompt_ids.shape == (4, *expected[COLORS[0]].shape)  # one shape, captions or not
        for row in range(2):
            color = tuple(((batch.pixels[row, :, 0, 0] + 1) * 127.5).round().int().tolist())
            np.testing.assert_array_equal(batch.prompt_ids[row].numpy(), expected[color])
            seen.add(color)
        for row in (2, 3):  # class rows keep the class prompt
            np.testing.assert_array_equal(batch.prompt_ids[row].numpy(), prompt_ids(tokenizers, CLASS_PROMPT))
    assert seen == set(COLORS)


def test_a_metadata_file_without_caption_column_is_left_unread_and_said_so(tmp_path, capsys):
    paths = colored_photos(tmp_path)
    write_metadata(tmp_path, "jsonl", [{"file_name": paths[0].name, "text": "unqtkn toy car"}])
    assert read_captions(tmp_path, paths, None) == {}
    assert "metadata.jsonl is left unread: pass --caption_column" in capsys.readouterr().err
    assert read_captions(tmp_path, paths, "text") == {str(paths[0]): "unqtkn toy car"}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_captions_encoded_once_give_the_loss_of_encoding_each_step(family, request):
    model_dir = model(family, request)
    tokenizers = load_tokenizers(model_dir)
    captions = ["a unqtkn toy car on sand", "a unqtkn toy car on sand", "unqtkn toy car, close up"]
    photos = [solid(40 + 60 * k, 64, 80) for k in range(3)]
    training_set = TrainingSet(photos, [solid(9)], 64, pairing(3, 1, 3, 0, 1), 3,
                               prompt_ids(tokenizers, INSTANCE_PROMPT), prompt_ids(tokenizers, CLASS_PROMPT), CPU, 0,
                               original_sizes=[(64, 80)] * 3 if family == "sdxl" else None,
                               photo_prompt_ids=[prompt_ids(tokenizers, caption) for caption in captions])
    draw = training_set.draw(training_set.pairs)  # rows of photos 0, 1 and 2
    models = load_for_training(model_dir, CPU, CPU, torch.float32, train_text_encoder=False)
    torch.manual_seed(0)
    each_step = dreambooth_loss(models, training_set.batch(draw), 1.0).total.item()
    rows, encode = [], models.encode_prompts
    models.encode_prompts = lambda ids: rows.append(len(ids)) or encode(ids)
    precision = Precision("no", CPU)
    encoded = training_set.prompts.encode_once(lambda ids: precompute_prompt_embeddings(models, ids, precision))
    assert encoded == 3 and rows == [3]  # two distinct captions and the class prompt, each once, in one call
    torch.manual_seed(0)
    once = dreambooth_loss(models, training_set.batch(draw), 1.0).total.item()
    assert once == pytest.approx(each_step, rel=1e-5)


@pytest.mark.parametrize("photos, classes, repeats, batch", [(5, 2, 1, 2), (5, 2, 3, 2), (4, 10, 3, 4), (5, 200, 3, 1)])
def test_repeats_make_an_epoch_as_long_as_diffusers_dataset_makes_it(photos, classes, repeats, batch, tmp_path,
                                                                     monkeypatch):
    # diffusers' DreamBoothDataset lists each photo `repeats` times; with prior preservation an
    # epoch is max(class images, photos x repeats) examples, in batches of train_batch_size.
    script_steps = math.ceil(max(classes, photos * repeats) / batch)
    monkeypatch.setattr("raybooth.driver.plan.worker_gpus", lambda cfg: (False, 0))  # no Ray to ask
    paths = write_solid_images(tmp_path / "photos", (90, 90, 90), photos)
    cfg = config(repeats=repeats, train_batch_size=batch, num_epochs=1, max_train_steps=10_000,
                 num_class_images=classes)
    plan = make_plan(cfg, Inputs(Path("m"), 64, paths, {}), [{"path": f"c{i}.png"} for i in range(classes)], [],
                     tmp_path / "partial", SimpleNamespace(local_path=None), tmp_path, None)
    assert plan.total_steps() == script_steps
    pairs = pairing(photos, classes, plan.pairs_per_worker, 0, 1)
    per_photo = Counter(photo for photo, _ in pairs)
    assert sum(per_photo.values()) == max(classes, photos * repeats)
    assert max(per_photo.values()) - min(per_photo.values()) <= 1  # spread evenly
    if photos * repeats >= classes:
        assert set(per_photo.values()) == {repeats}


def noise_photo(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
    return path


def test_the_interpolation_mode_is_the_filter_photos_are_resized_with(tmp_path):
    path = noise_photo(tmp_path / "noise.png")
    read = {mode: load_image(path, 32, mode) for mode in ("lanczos", "nearest", "bilinear")}
    for mode, image in read.items():  # PIL's own resize with that filter
        expected = Image.open(path).convert("RGB").resize((43, 32), RESAMPLING[mode])
        np.testing.assert_array_equal(image, np.asarray(expected))
    assert not np.array_equal(read["lanczos"], read["nearest"])
    np.testing.assert_array_equal(load_image(path, 32), load_image(path, 32, "bicubic"))  # raybooth's default kept


def test_both_readers_resize_with_the_mode_asked(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    path = noise_photo(tmp_path / "noise.png")
    nearest = load_image(path, 32, "nearest")
    by_ray_data = read_all(image_dataset([path], 32, parallelism=1, interpolation="nearest").iterator())
    np.testing.assert_array_equal(by_ray_data[str(path)], nearest)
    # Local mode's own read, while the model loads before Ray starts.
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: False))  # a command's start
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    loading = preload(config(use_gpu=False, image_interpolation_mode="nearest"), tiny_model_dir, [path], [], 32)
    instance, _ = loading.images.take()
    np.testing.assert_array_equal(instance[str(path)], nearest)
    preloaded_models(loading, SimpleNamespace(local_devices=["cpu"]))  # let the load finish here


def test_the_interpolation_modes_are_diffusers_names_and_another_is_refused(capsys):
    # diffusers' choices: torchvision's InterpolationMode names, lowercased.
    for mode in ("bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact"):
        assert train_config("--image_interpolation_mode", mode).image_interpolation_mode == mode
    assert set(RESAMPLING) == set(INTERPOLATION_MODES)  # each has its filter
    with pytest.raises(SystemExit):
        train_config("--image_interpolation_mode", "cubic")
    assert "invalid choice: 'cubic'" in capsys.readouterr().err


def caption_files(folder: Path, case: str) -> list[str]:
    """A folder of photos with the caption files of `case`; the flags it is trained with."""
    paths = colored_photos(folder)
    if case == "not utf-8":
        paths[0].with_suffix(".txt").write_bytes("unqtkn toy car in the Caf\u00e9".encode("latin-1"))
    elif case == "stray txt":
        (folder / "photo-9.txt").write_text("unqtkn toy car")
    elif case == "too long":
        paths[1].with_suffix(".txt").write_text("a " * 80 + "unqtkn toy car")
    elif case == "txt and column":
        paths[1].with_suffix(".txt").write_text("unqtkn toy car")
        write_metadata(folder, "jsonl", [{"file_name": paths[0].name, "text": "unqtkn toy car"}])
    elif case == "not json":
        (folder / "metadata.jsonl").write_text('{"file_name": "photo-0.png", "text": "a"}\n'
                                               '{"file_name": photo-1.png}\n')
    elif case == "no such photo":
        write_metadata(folder, "csv", [{"file_name": "photo-7.png", "text": "unqtkn toy car"}])
    elif case in ("no column", "no file_name"):
        write_metadata(folder, "jsonl", [{"file_name" if case == "no column" else "image": paths[0].name,
                                          "caption": "unqtkn toy car"}])
    return [] if case in ("not utf-8", "stray txt", "too long") else ["--caption_column", "text"]


@pytest.mark.parametrize("case, says", [
    ("not utf-8", "photo-0.txt is not UTF-8 text (byte 25 is 0xe9)"),
    ("stray txt", "files that are not images: photo-9.txt (images end in ... the caption of NAME.jpg is NAME.txt)"),
    ("too long", "the caption of photo-1.png is ... tokens, and the text encoder reads 75: 'unqtkn toy car' falls"),
    ("txt and column", "also holds caption files (photo-1.txt): keep one kind"),
    ("no metadata", "--caption_column text reads the captions from metadata.jsonl or metadata.csv in"),
    ("not json", "metadata.jsonl line 2 is not JSON"),
    ("no such photo", "metadata.csv row 1: file_name 'photo-7.png' is not a photo in"),
    ("no column", "metadata.jsonl has no column 'text' that --caption_column names (its columns: caption, file_name)"),
    ("no file_name", "metadata.jsonl has no column 'file_name' naming each row's photo"),
])
def test_a_bad_caption_is_one_line_before_ray_starts(case, says, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("raybooth.driver.training.connect", lambda *_: pytest.fail("Ray was started"))
    flags = caption_files(tmp_path / "photos", case)
    assert main(train_args(tiny_model_dir, tmp_path / "out", tmp_path / "photos", tmp_path / "class", *flags)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raybooth: error:")]
    assert len(errors) == 1 and all(part in errors[0] for part in says.split(" ... ")), errors


def test_a_caption_without_the_identifier_or_cut_short_is_said_in_one_line_each(tiny_model_dir, tmp_path, capsys):
    paths = colored_photos(tmp_path / "photos")
    paths[0].with_suffix(".txt").write_text("a toy car on a red table")  # no identifier
    paths[1].with_suffix(".txt").write_text("unqtkn toy car, " + "very " * 80 + "shiny")  # the cut keeps the subject
    inputs = check_inputs(config(model_dir=tiny_model_dir, output_dir=tmp_path / "out",
                                 instance_images_dir=tmp_path / "photos", instance_prompt=INSTANCE_PROMPT,
                                 class_prompt=CLASS_PROMPT))
    assert inputs.captions[str(paths[1])].startswith("unqtkn toy car, very")
    lines = capsys.readouterr().err.splitlines()
    assert len([line for line in lines if "identifier" in line]) == 1
    assert any("1 of 2 captions do not name the identifier 'unqtkn' (photo-0.png)" in line for line in lines)
    assert any("the caption of photo-1.png is" in line and "is cut off" in line for line in lines)
    assert any("2 of 4 photos train with their own prompt, from their .txt captions; the others train with "
               "--instance_prompt" in line for line in lines)


def test_train_on_the_tiny_sdxl_model_with_captions_repeats_and_its_class_images_batched(
        ray_cluster, tiny_xl_dir, tmp_path, monkeypatch):
    paths = colored_photos(tmp_path / "photos")[:2]
    for path in colored_photos(tmp_path / "photos")[2:]:
        path.unlink()
    captions = ["unqtkn toy car on red sand", "a unqtkn toy car in the grass"]
    write_metadata(tmp_path / "photos", "jsonl", [{"file_name": p.name, "text": c} for p, c in zip(paths, captions)])
    chunks, rows = [], []
    render, loss = raybooth.generate.on_worker.render, raybooth.train.step.dreambooth_loss
    monkeypatch.setattr(raybooth.generate.on_worker, "render",
                        lambda pipeline, chunk, *rest: chunks.append(len(chunk)) or render(pipeline, chunk, *rest))
    monkeypatch.setattr(raybooth.train.step, "dreambooth_loss",
                        lambda models, batch, *rest, **options: rows.append(batch.prompt_ids[0].numpy().copy())
                        or loss(models, batch, *rest, **options))
    output = tmp_path / "tuned"
    assert main(train_args(tiny_xl_dir, output, tmp_path / "photos", tmp_path / "class", "--no_use_gpu",
                           "--local_mode", "--caption_column", "text", "--repeats", "3", "--num_class_images", "3",
                           "--sample_batch_size", "2", "--num_epochs", "1", "--max_train_steps", "100",
                           "--image_interpolation_mode", "lanczos", "--no_train_text_encoder",
                           "--pre_compute_text_embeddings", "--use_lora")) == 0
    assert chunks == [2, 1]  # the 3 class images made 2 at a time, as --sample_batch_size says
    history = json.loads((output / "training_log.json").read_text())["history"]
    assert len(history) == 6 and all(np.isfinite(row["loss"]) for row in history)  # 2 photos x 3 > 3 class images
    tokenizers = load_tokenizers(tiny_xl_dir)
    assert len(rows) == 6 and {row.tobytes() for row in rows} == {prompt_ids(tokenizers, c).tobytes() for c in captions}


def test_workers_of_their_own_read_with_the_mode_asked(ray_cluster, tiny_model_dir, tmp_path, monkeypatch, capsys):
    # Ray Train's worker processes read through Ray Data (driver/datasets.py): the mode must reach it.
    asked = []

    def datasets(*args, **kwargs):
        asked.append(args[3:] + tuple(kwargs.values()))
        raise RayboothError("read no further")

    monkeypatch.setattr("raybooth.driver.training.datasets", datasets)
    colored_photos(tmp_path / "photos")
    class_dir = write_solid_images(tmp_path / "class", (0, 0, 200), 4)[0].parent
    assert main(train_args(tiny_model_dir, tmp_path / "out", tmp_path / "photos", class_dir, "--no_use_gpu",
                           "--no_local_mode", "--image_interpolation_mode", "nearest")) == 1
    assert asked == [("nearest",)]
