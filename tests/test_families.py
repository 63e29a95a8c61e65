"""A pipeline folder's model family is told from its model_index.json; training and generation
load it as that family says, and a family raybooth does not train is refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from raybooth.commands.cli import main
from raybooth.errors import RayboothError
from raybooth.models.families import STABLE_DIFFUSION
from raybooth.models.folders import model_family, resolve_model_dir


def test_a_stable_diffusion_folder_is_of_its_family(tiny_model_dir):
    assert model_family(tiny_model_dir) is STABLE_DIFFUSION
    assert STABLE_DIFFUSION.pipeline_class().__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize("pipeline_class", ["FluxPipeline", "StableDiffusion3Pipeline",
                                            "StableDiffusionXLImg2ImgPipeline"])
def test_a_folder_of_another_family_is_refused_naming_what_it_is(tiny_model_dir, tmp_path, pipeline_class, capsys):
    folder = tmp_path / "other"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"_class_name": pipeline_class}))
    with pytest.raises(RayboothError, match=f"is a {pipeline_class} pipeline; raybooth trains Stable Diffusion"):
        resolve_model_dir(folder)
    # Every command that reads a model says so in one line, before any work.
    assert main(["generate", "--model_dir", str(folder), "--prompts", "a toy car", "--output_dir",
                 str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and pipeline_class in error[0]
    assert not (tmp_path / "out").exists()


def test_a_family_needs_its_own_components(tiny_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(RayboothError, match="text_encoder"):
        resolve_model_dir(folder)
