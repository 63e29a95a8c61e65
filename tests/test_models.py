import json
import shutil

import pytest
from helpers import as_hub_cache

from raybooth.errors import RayboothError
from raybooth.models.folders import resolve_model_dir, resolve_resolution
from raybooth.models.loading import use_flash_attention
from raybooth.models.output import (
    check_output_dir,
    copy_base_components,
    copy_trained,
    finish_model_dir,
    start_model_dir,
    write_model_dir,
)


def test_a_hub_cache_folder_resolves_to_its_snapshot(tiny_model_dir, tmp_path):
    snapshot = as_hub_cache(tiny_model_dir, tmp_path)
    assert resolve_model_dir(snapshot) == snapshot
    assert resolve_model_dir(tmp_path) == snapshot  # the --model_dir given to cache-model works too
    as_hub_cache(tiny_model_dir, tmp_path, name="raybooth/other")
    with pytest.raises(RayboothError, match="caches several models"):
        resolve_model_dir(tmp_path)


def test_a_relative_model_folder_resolves_to_an_absolute_path(tiny_model_dir, monkeypatch):
    # Ray Train workers run in a folder of their own, where a relative path means something else.
    monkeypatch.chdir(tiny_model_dir.parent)
    assert resolve_model_dir(tiny_model_dir.name) == tiny_model_dir


def test_folders_that_are_no_model_are_refused(tmp_path):
    with pytest.raises(RayboothError, match="does not exist"):
        resolve_model_dir(tmp_path / "nothing")
    with pytest.raises(RayboothError, match="no model_index.json"):
        resolve_model_dir(tmp_path)


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("damage, message", [
    (lambda m: shutil.rmtree(m / "unet"), "missing its unet/ folder"),
    (lambda m: (m / "vae" / "diffusion_pytorch_model.safetensors").unlink(), r"no weights in vae/"),
    (lambda m: (m / "text_encoder" / "config.json").unlink(), "missing text_encoder/config.json"),
    (lambda m: shutil.rmtree(m / "tokenizer") or (m / "tokenizer").mkdir(), "empty tokenizer/ folder"),
    (lambda m: (m / "model_index.json").write_text("{"), "not valid JSON"),
    (lambda m: truncate(m / "unet" / "diffusion_pytorch_model.safetensors"),
     r"unet/diffusion_pytorch_model.safetensors is not a readable safetensors file .*incomplete metadata"),
    (lambda m: (m / "text_encoder" / "model.safetensors").write_bytes(b"not weights"),
     r"text_encoder/model.safetensors is not a readable safetensors file"),
])
def test_a_model_folder_missing_a_component_is_refused(model_copy, damage, message):
    damage(model_copy)
    with pytest.raises(RayboothError, match=message):
        resolve_model_dir(model_copy)


def test_an_unsupported_prediction_type_is_refused(model_copy):
    config = model_copy / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": "sample"}))
    with pytest.raises(RayboothError, match="predicts 'sample'"):
        resolve_model_dir(model_copy)


def test_resolution_defaults_to_the_native_one_and_must_divide_evenly(tiny_model_dir):
    assert resolve_resolution(tiny_model_dir, None) == 64
    assert resolve_resolution(tiny_model_dir, 96) == 96
    with pytest.raises(RayboothError, match="multiple of 8"):
        resolve_resolution(tiny_model_dir, 100)


def test_output_folder_rules(tmp_path, tiny_model_dir):
    check_output_dir(tmp_path / "new", overwrite=False)
    check_output_dir(tmp_path, overwrite=False)  # empty
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RayboothError, match="not empty and holds no model"):
        check_output_dir(tmp_path, overwrite=True)
    with pytest.raises(RayboothError, match="already holds a model; pass --overwrite"):
        check_output_dir(tiny_model_dir, overwrite=False)
    check_output_dir(tiny_model_dir, overwrite=True)


def test_overwrite_never_deletes_files_that_are_not_part_of_the_model(model_copy):
    (model_copy / "training_log.json").write_text("{}")
    check_output_dir(model_copy, overwrite=True)
    (model_copy / "my-notes.txt").write_text("x")
    with pytest.raises(RayboothError, match=r"other files \(my-notes.txt\)"):
        check_output_dir(model_copy, overwrite=True)


def test_a_failed_write_leaves_the_output_as_it_was(tmp_path):
    output = tmp_path / "out"

    def fails_halfway(folder):
        (folder / "model_index.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_model_dir(output, fails_halfway, overwrite=False)
    assert list(tmp_path.iterdir()) == []  # no output, no partial folder

    write_model_dir(output, lambda f: (f / "model_index.json").write_text('{"v": "old"}'), overwrite=False)
    with pytest.raises(OSError):
        write_model_dir(output, fails_halfway, overwrite=True)
    assert (output / "model_index.json").read_text() == '{"v": "old"}'
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    write_model_dir(output, lambda f: (f / "model_index.json").write_text('{"v": "new"}'), overwrite=True)
    assert (output / "model_index.json").read_text() == '{"v": "new"}'
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_assembled_pipeline_takes_trained_parts_and_copies_the_rest(tiny_model_dir, tmp_path):
    snapshot = as_hub_cache(tiny_model_dir, tmp_path / "cache")
    trained = tmp_path / "trained"
    shutil.copytree(tiny_model_dir / "unet", trained / "unet")
    (trained / "unet" / "config.json").write_text(json.dumps({"marker": "trained"}))
    (trained / "training_log.json").write_text("{}")
    partial = start_model_dir(tmp_path / "out", overwrite=False)
    copy_base_components(snapshot, partial, skip=("unet",))
    assert not (partial / "unet").exists()
    copy_trained(trained, partial)
    output = finish_model_dir(partial, tmp_path / "out")
    assert json.loads((output / "unet" / "config.json").read_text()) == {"marker": "trained"}
    assert (output / "training_log.json").exists()
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        files = [f for f in (output / part).iterdir()]
        assert files and not any(f.is_symlink() for f in files)  # real files, not links into the cache


def test_flash_attention_replaces_cudnns_on_a_gpu_and_cpus_are_left_alone(monkeypatch):
    import torch

    switched = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", switched.append)
    use_flash_attention(torch.device("cpu"))
    use_flash_attention("cpu")
    assert switched == []
    use_flash_attention(torch.device("cuda", 0))
    use_flash_attention("cuda")
    assert switched == [False, False]
