"""`raybooth batch` and `raybooth sweep` on the small world: the demo batch's three subjects (two
classes) and one subject whose photo is broken, trained in one command; then the same command again;
then a sweep of two trials sharing the batch's class images, whose best settings train again. On the
tiny model: Ctrl-C and the re-run that resumes, and two subjects trained side by side."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from raybooth.commands.arguments import run_settings_from
from raybooth.commands.cli import main
from raybooth.errors import RayboothError
from raybooth.files.images import image_files
from raybooth.jobs.manifest import manifest_from
from raybooth.jobs.sweep import SWEEP_FILE, plan_sweep
from raybooth.world.demo import DEMO_BATCH_DEFAULTS, DEMO_BATCH_SUBJECTS, demo_batch

GOOD = list(DEMO_BATCH_SUBJECTS)


def command(*argv: str) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return SimpleNamespace(code=code, out=out.getvalue(), log=err.getvalue())


@pytest.fixture(scope="module")
def batch(ray_cluster, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("batch")
    broken = root / "photos" / "broken"
    broken.mkdir(parents=True)
    (broken / "photo.png").write_bytes(b"not a png")
    content = demo_batch(root / "photos")
    content["subjects"].append({"name": "broken", "instance_images_dir": "photos/broken", "class_noun": "ball"})
    manifest = root / "subjects.yaml"
    manifest.write_text(yaml.safe_dump(content))
    argv = ("batch", "--manifest", str(manifest), "--output_dir", str(root / "out"))
    first = command(*argv)
    done = {name: (root / "out" / name / "subject.json").stat().st_mtime_ns for name in GOOD
            if (root / "out" / name / "subject.json").exists()}
    return SimpleNamespace(root=root, out=root / "out", manifest=manifest, first=first, again=command(*argv),
                           done=done, results=json.loads((root / "out" / "batch.json").read_text())["subjects"])


def test_each_subject_learns_its_own_and_the_broken_one_fails_alone(batch):
    assert batch.first.code == 1, batch.first.log  # a subject failed: the command says so
    assert [name for name, result in batch.results.items() if result["status"] == "done"] == GOOD
    learned = {}
    for name in GOOD:
        measures = json.loads((batch.out / name / "evaluation.json").read_text())
        before, after = measures["before"]["subject_fidelity"], measures["after"]["subject_fidelity"]
        # Its adapter draws its subject: the untuned model never does, the tuned one in at least 2 of its
        # 12 samples. Measured on a 2-core machine: 4, 9 and 3 of 12 (the cup's is low: the world's
        # classifier knows the checkerboard on toy cars, and calls only 2 of the cup's 5 photos the subject).
        assert before == 0.0 and after >= 2 / 12, (name, after)
        learned[name] = after
        assert (batch.out / name / "model-tuned" / "pytorch_lora_weights.safetensors").is_file()
        assert (batch.out / name / "model-tuned" / "report.png").is_file()
        assert batch.results[name]["steps"] == 300 and batch.results[name]["measures"]["after"] == measures["after"]
    assert sum(learned.values()) / len(learned) >= 0.3, learned  # measured: 0.44
    assert batch.results["broken"]["status"] == "failed" and "photo.png" in batch.results["broken"]["error"]
    told = [line for line in batch.first.log.splitlines() if "subject broken:" in line]
    assert len(told) == 1 and "photo.png is not a readable image" in told[0], told  # one line, before any training
    assert (batch.out / "batch.png").is_file()
    assert "subject fidelity" in batch.first.log  # the table at the end


def test_class_images_are_made_once_per_class_and_shared(batch):
    folders = sorted(path for path in (batch.out / "class-images").iterdir() if path.is_dir())
    assert len(folders) == 2  # toy car and cup: none for the broken subject's ball
    assert all(len(image_files(folder)) == 50 for folder in folders)
    for name in GOOD:  # no subject made class images of its own
        assert "(0 to generate first)" in (batch.out / name / "log.txt").read_text()
        assert not (batch.out / name / "images-reg").exists()


def test_the_same_command_again_trains_nothing_that_finished(batch):
    assert batch.again.code == 1  # the broken subject is tried again, and fails again
    for name in GOOD:
        assert f"subject {name}: finished in an earlier run, kept" in batch.again.log
        assert f"subject {name}: started" not in batch.again.log
        assert (batch.out / name / "subject.json").stat().st_mtime_ns == batch.done[name]
    assert "class images" not in batch.again.log  # nothing to train, nothing to make


def test_a_sweep_scores_its_trials_and_its_best_settings_train(batch, tmp_path):
    content = yaml.safe_load(batch.manifest.read_text())
    content["sweep"] = {"subject": "checker-car", "flags": {"max_train_steps": [10, 300]}}
    manifest = batch.root / "sweep.yaml"
    manifest.write_text(yaml.safe_dump(content))
    swept = command("sweep", "--manifest", str(manifest), "--output_dir", str(tmp_path / "sweep"),
                    "--class_images_store", str(batch.out / "class-images"))
    assert swept.code == 0, swept.log
    summary = json.loads((tmp_path / "sweep" / SWEEP_FILE).read_text())
    scores = {name: trial["score"] for name, trial in summary["trials"].items()}
    assert summary["objective"].startswith("the mean of subject_fidelity, prompt_fidelity")
    assert summary["best"]["trial"] == max(scores, key=scores.get) and len(set(scores.values())) == 2, scores
    assert summary["best"]["flags"] == {"max_train_steps": 300}  # 10 steps do not teach the checkerboard
    assert re.search(r"50 of 50 images already in .*; generating 0\n", swept.log)  # the batch's served the trials

    best = tmp_path / "sweep" / "best.yaml"
    trained = command("train", "--config", str(best), "--output_dir", str(tmp_path / "again"), "--max_train_steps", "2",
                      "--no_use_gpu")
    assert trained.code == 0, trained.log
    assert "(0 to generate first)" in trained.log
    log = json.loads((tmp_path / "again" / "training_log.json").read_text())
    assert log["config"]["lr"] == DEMO_BATCH_DEFAULTS["lr"] and log["config"]["use_lora"] and len(log["history"]) == 2


def test_a_manifest_is_checked_before_anything_runs(tmp_path):
    def read(content):
        return manifest_from(content, tmp_path, "m.yaml")

    for content, message in [({"subject": []}, "unknown section 'subject'"),
                             ({"subjects": []}, "needs a `subjects` list"),
                             ({"subjects": [{"name": "a b"}]}, "needs a `name`"),
                             ({"subjects": [{"name": "a"}, {"name": "a"}]}, "two subjects are named 'a'"),
                             ({"subjects": [{"name": "a", "work_dir": "x"}]}, "work_dir is set by the batch")]:
        with pytest.raises(RayboothError, match=message):
            read(content)
    manifest = read({"defaults": {"lr": "2e-4", "instance_images_dir": "photos"},
                     "subjects": [{"name": "a"}, {"name": "b", "lr": 1e-3, "instance_images_dir": "/abs"}]})
    (run_a, training_a), (run_b, training_b) = (run_settings_from(s.options, s.name) for s in manifest.subjects)
    assert training_a["lr"] == 2e-4 and training_b["lr"] == 1e-3  # YAML's string, read as the flag reads it
    assert run_a.instance_images_dir == tmp_path / "photos" and run_b.instance_images_dir == Path("/abs")
    with pytest.raises(RayboothError, match="'lrr' is not an option of `raybooth run`"):
        run_settings_from({"lrr": 1}, "a")
    with pytest.raises(RayboothError, match="a: lr must be a number"):
        run_settings_from({"lr": "fast"}, "a")


def test_a_sweep_expands_grids_and_draws_random_trials(tmp_path):
    subjects = [{"name": "a"}]
    grid, trials = plan_sweep(manifest_from({"subjects": subjects, "sweep": {
        "flags": {"lr": [1e-4, 1e-3], "lora_rank": [4, 8, 16]}}}, tmp_path, "m"))
    assert len(trials) == 6 and {(t.options["lr"], t.options["lora_rank"]) for t in trials} == {
        (lr, rank) for lr in (1e-4, 1e-3) for rank in (4, 8, 16)}
    spec = {"search": "random", "num_trials": 5, "seed": 3,
            "flags": {"lr": {"loguniform": [1e-5, 1e-3]}, "max_train_steps": {"randint": [100, 200]}}}
    _, drawn = plan_sweep(manifest_from({"subjects": subjects, "sweep": spec}, tmp_path, "m"))
    _, redrawn = plan_sweep(manifest_from({"subjects": subjects, "sweep": spec}, tmp_path, "m"))
    assert len(drawn) == 5 and [t.options for t in drawn] == [t.options for t in redrawn]  # the seed decides
    assert all(1e-5 <= t.options["lr"] <= 1e-3 and 100 <= t.options["max_train_steps"] <= 200 for t in drawn)
    assert len({t.options["lr"] for t in drawn}) == 5
    with pytest.raises(RayboothError, match="not in the manifest's subjects"):
        plan_sweep(manifest_from({"subjects": subjects, "sweep": {"subject": "b", "flags": {"lr": [1]}}}, tmp_path, "m"))


def test_ctrl_c_stops_the_batch_and_the_same_command_resumes_it(tiny_model_dir, subject_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    manifest = tmp_path / "subjects.yaml"
    manifest.write_text(yaml.safe_dump({
        "defaults": {"model_dir": str(tiny_model_dir), "use_lora": True, "max_train_steps": 400, "num_epochs": 1000,
                     "checkpointing_steps": 20, "report_every_n_steps": 10, "num_class_images": 2,
                     "num_samples_per_prompt": 1, "num_class_samples": 1, "sample_prompts": ["a photo of unqtkn toy car"]},
        "subjects": [{"name": "car", "instance_images_dir": str(subject_dir), "class_noun": "toy car"}]}))
    argv = [sys.executable, "-m", "raybooth", "batch", "--manifest", str(manifest), "--output_dir", str(tmp_path / "out"),
            "--no_use_gpu"]
    subject_log = tmp_path / "out" / "car" / "log.txt"
    with open(tmp_path / "first.log", "w+") as log:
        # A shell without job control starts background jobs with SIGINT ignored: give it Python's Ctrl-C.
        process = subprocess.Popen(argv, stderr=log, stdout=subprocess.DEVNULL,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if subject_log.exists() and "step 50/400" in subject_log.read_text():
                process.send_signal(signal.SIGINT)  # past the checkpoint at step 40
                break
            time.sleep(0.1)
        assert process.wait(timeout=120) == 130
        log.seek(0)
        first = log.read()
    assert "raybooth: interrupted" in first
    assert json.loads((tmp_path / "out" / "batch.json").read_text())["subjects"]["car"]["status"] == "interrupted"
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    result = json.loads((tmp_path / "out" / "batch.json").read_text())["subjects"]["car"]
    assert result["status"] == "done" and result["steps"] == 400
    resumed = re.search(r"left a checkpoint at step (\d+): resuming", subject_log.read_text())
    assert resumed and int(resumed.group(1)) >= 40, subject_log.read_text()[-3000:]


def test_subjects_at_once_train_side_by_side(ray_cluster, tiny_model_dir, subject_dir, tmp_path):
    manifest = tmp_path / "subjects.yaml"
    manifest.write_text(yaml.safe_dump({
        "defaults": {"model_dir": str(tiny_model_dir), "use_lora": True, "max_train_steps": 30, "num_epochs": 1000,
                     "num_class_images": 2,
                     "num_samples_per_prompt": 1, "num_class_samples": 1, "sample_prompts": ["a photo of unqtkn toy car"],
                     "class_noun": "toy car", "instance_images_dir": str(subject_dir)},
        "subjects": [{"name": "first"}, {"name": "second", "unique_token": "sks"}]}))
    ran = command("batch", "--manifest", str(manifest), "--output_dir", str(tmp_path / "out"), "--subjects_at_once",
                  "2", "--no_use_gpu")
    assert ran.code == 0, ran.log
    first, second = (json.loads((tmp_path / "out" / name / "subject.json").read_text()) for name in ("first", "second"))
    assert first["steps"] == second["steps"] == 30
    # Each began before the other ended: two actors, each with half of the CPU Ray Data leaves.
    assert first["began"] < second["ended"] and second["began"] < first["ended"], (first, second)
