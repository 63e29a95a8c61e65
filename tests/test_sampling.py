"""Sample sets the training workers make: named and seeded as `raybooth generate` does, shared out
among the workers, and an earlier model's images of the same names removed first."""

import pytest

from raybooth.errors import RayboothError
from raybooth.files.names import image_name, image_seed
from raybooth.generate.sample_plans import SampleSet, plan_sample_set


def test_a_sample_set_is_named_seeded_and_shared_as_generate_would(tmp_path):
    samples = SampleSet(tmp_path / "before", ["a photo of a toy car", "a photo of a ball"], 3, seed=7,
                        before_training=True, what="samples of the pretrained model")
    (tmp_path / "before").mkdir()
    stale = tmp_path / "before" / image_name("a photo of a ball", 1)
    stale.write_bytes(b"an earlier model's")
    kept = tmp_path / "before" / "my-own.png"
    kept.write_bytes(b"the user's")
    planned = plan_sample_set(samples, workers=2)
    assert not stale.exists() and kept.exists()
    rows = [row for share in planned.shares for row in share]
    assert sorted(row["file"] for row in rows) == sorted(path.name for path in samples.paths())
    assert all(row["seed"] == image_seed(7, row["prompt"], int(row["file"][-8:-4])) for row in rows)
    assert [len(share) for share in planned.shares] == [3, 3] and planned.before_training
    assert samples.paths("a photo of a ball") == [tmp_path / "before" / image_name("a photo of a ball", i)
                                                   for i in range(3)]


def test_a_file_where_the_folder_should_be_is_one_error_line(tmp_path):
    (tmp_path / "images").write_text("")
    with pytest.raises(RayboothError, match="is a file"):
        plan_sample_set(SampleSet(tmp_path / "images", ["a photo of a cup"], 1, seed=0), workers=1)
