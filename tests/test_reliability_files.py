"""Issue 33's holes: moves across filesystems, the trained weights kept when placing the output
fails, one run per output folder, broken links among the photos, the step count's cap said, and
bitsandbytes' stray line."""

import errno
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import differs, train_args, weights, write_solid_images

from raybooth.commands.cli import main
from raybooth.driver.plan import step_cap
from raybooth.errors import RayboothError
from raybooth.files.images import find_images
from raybooth.files.lock import lock_path, output_lock
from raybooth.files.writes import move
from raybooth.train.plan import TrainPlan
from raybooth.watch.folders import RunLogs


def other_filesystem(monkeypatch, root: Path) -> None:
    """Renames out of `root` fail as they do from another filesystem (EXDEV); others go through."""
    rename = os.rename

    def fake(source, target, *args, **kwargs):
        if Path(source).is_relative_to(root):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(source), None, str(target))
        return rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "rename", fake)


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_a_move_across_filesystems_lands_whole_and_the_source_goes(tmp_path, monkeypatch):
    disk, tmpfs = tmp_path / "disk", tmp_path / "tmpfs"
    source = tmpfs / "logs"
    (source / "validation").mkdir(parents=True)
    (source / "events.out").write_bytes(b"events")
    (source / "validation" / "step-1.png").write_bytes(b"png")
    (tmpfs / "elsewhere.txt").write_text("not to be copied")
    (source / "link").symlink_to("../elsewhere.txt")  # kept a link, as a rename keeps it: never followed
    (tmpfs / "ray.log").write_text("lines")
    disk.mkdir()
    expected = tree(source)
    other_filesystem(monkeypatch, tmpfs)
    with pytest.raises(OSError):  # the stand-in for the other filesystem holds
        os.rename(source, disk / "logs")

    move(source, disk / "logs")
    move(tmpfs / "ray.log", disk / "ray.log")
    assert tree(disk / "logs") == expected and (disk / "logs" / "link").is_symlink()
    assert (disk / "ray.log").read_text() == "lines"
    assert not source.exists() and not (tmpfs / "ray.log").exists()
    assert sorted(p.name for p in disk.iterdir()) == ["logs", "ray.log"]  # no hidden copy left


def test_a_move_that_fails_halfway_leaves_the_source_and_no_copy(tmp_path, monkeypatch):
    (tmp_path / "tmpfs" / "logs").mkdir(parents=True)
    (tmp_path / "tmpfs" / "logs" / "events.out").write_bytes(b"events")
    (tmp_path / "disk").mkdir()
    rename = os.rename

    def fake(source, target):
        if Path(source).is_relative_to(tmp_path / "tmpfs"):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        if Path(source).name.startswith("."):  # the copy's rename into place
            raise OSError(errno.ENOSPC, "No space left on device")
        return rename(source, target)

    monkeypatch.setattr(os, "rename", fake)
    with pytest.raises(OSError, match="No space"):
        move(tmp_path / "tmpfs" / "logs", tmp_path / "disk" / "logs")
    assert (tmp_path / "tmpfs" / "logs" / "events.out").read_bytes() == b"events"
    assert list((tmp_path / "disk").iterdir()) == []


def test_logs_move_into_the_output_from_ray_trains_folder_on_another_filesystem(tmp_path, monkeypatch):
    # Issue 33: a tmpfs --output_dir and a disk --storage_path gave "Invalid cross-device link"
    # after training, and lost the model.
    root = tmp_path / "ray-storage" / "run" / "logs"
    logs = RunLogs(root, root / "20260101-000000", Path("logs"))
    logs.validation.mkdir(parents=True)
    (logs.run / "events.out.tfevents").write_bytes(b"events")
    (logs.validation / "step-2.png").write_bytes(b"png")
    partial = tmp_path / "out" / ".tuned.partial-1234"
    partial.mkdir(parents=True)
    other_filesystem(monkeypatch, tmp_path / "ray-storage")

    logs.keep_with_output(tmp_path / "out" / "tuned", partial)
    moved = partial / "logs" / "20260101-000000"
    assert (moved / "events.out.tfevents").read_bytes() == b"events"
    assert (moved / "validation" / "step-2.png").read_bytes() == b"png"
    assert not root.exists()


def test_a_failure_while_placing_the_output_keeps_the_trained_weights(ray_cluster, tiny_model_dir, subject_dir,
                                                                       tmp_path, monkeypatch, capsys):
    output, class_dir = tmp_path / "tuned", tmp_path / "class"
    write_solid_images(class_dir, (0, 0, 200), 4)
    crashed = hold_lock(output)
    crashed.kill()  # the lock file stays, as after a crash; its flock goes with the process
    crashed.wait()
    assert lock_path(output).is_file()

    def swap_fails(partial, path):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr("raybooth.driver.training.finish_model_dir", swap_fails)
    assert main(train_args(tiny_model_dir, output, subject_dir, class_dir, "--num_epochs", "1", "--no_use_gpu",
                           "--no_train_text_encoder")) == 1
    err = capsys.readouterr().err
    # The stale lock did not block; the cap of the step count was said at the start.
    assert f"taking over {lock_path(output)}, left by a run that ended without releasing it (pid {crashed.pid} " in err
    pairs = max(len(find_images(subject_dir, "instance images")), 4)  # photos, or the 4 class images
    assert f"{pairs} steps, not --max_train_steps 800: --num_epochs 1 passes over {pairs} pairs per worker end " \
           f"first; --num_epochs {-(-800 // pairs)} would take all 800" in err
    error = err.strip().splitlines()[-1]
    kept = re.fullmatch(r"raybooth: error: training finished, but placing the output failed \(OSError: .*Invalid "
                        r"cross-device link\); the trained model is kept in (\S+): move it to (\S+) yourself, or "
                        r"train again", error)
    assert kept, error
    partial = Path(kept[1])
    assert partial.parent == tmp_path and Path(kept[2]) == output and not output.exists()
    assert differs(weights(partial, "unet"), weights(tiny_model_dir, "unet"))
    assert (partial / "training_log.json").is_file() and (partial / "model_index.json").is_file()
    assert not lock_path(output).exists()  # released on the way out


def hold_lock(output: Path) -> subprocess.Popen:
    """Another process holding the lock on `output` until its stdin closes; back once it holds it."""
    code = ("import sys\n"
            "from raybooth.files.lock import output_lock\n"
            "with output_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(output)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_run_into_the_same_output_is_refused_before_anything_is_written(tiny_model_dir, subject_dir,
                                                                                 tmp_path, monkeypatch, capsys):
    output = tmp_path / "tuned"
    holder = hold_lock(output)
    try:
        for step in ("start_output", "preload", "connect", "launch"):
            monkeypatch.setattr(f"raybooth.driver.training.{step}", lambda *_, **__: pytest.fail("it went on"))
        assert main(train_args(tiny_model_dir, output, subject_dir, tmp_path / "class", "--no_use_gpu")) == 1
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.fullmatch(rf"raybooth: error: --output_dir {re.escape(str(output))} is being written by another run "
                            rf"\(pid {holder.pid} on \S+; lock \S+\): wait for it to finish, or choose another "
                            r"folder", error), error
        assert sorted(p.name for p in tmp_path.iterdir()) == [".tuned.lock"]  # the holder's; nothing of ours
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and list(tmp_path.iterdir()) == []  # released by its holder


def test_the_lock_of_a_crashed_run_is_taken_over_and_released(tmp_path, capsys):
    output = tmp_path / "tuned"
    crashed = hold_lock(output)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    with output_lock(output) as path:
        assert path.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(RayboothError, match=f"pid {os.getpid()} "):  # held now, by us
            with output_lock(output):
                pass
    assert f"left by a run that ended without releasing it (pid {crashed.pid} on " in capsys.readouterr().err
    assert not path.exists()


def test_a_broken_link_among_the_photos_is_named(tmp_path):
    write_solid_images(tmp_path, (1, 2, 3), 2)
    (tmp_path / "002.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(RayboothError, match=r"002.png is a symbolic link to .*gone.png, which does not exist; fix "
                                            "the link or remove it"):
        find_images(tmp_path, "instance images")
    (tmp_path / "002.png").unlink()
    (tmp_path / "003.jpg").symlink_to("004.jpg")
    (tmp_path / "004.jpg").symlink_to("003.jpg")
    with pytest.raises(RayboothError, match=r"003.jpg is a symbolic link in a loop; fix the link or remove it"):
        find_images(tmp_path, "class images", may_be_empty=True)
    for link in ("003.jpg", "004.jpg"):
        (tmp_path / link).unlink()
    (tmp_path / ".hidden.png").symlink_to("nowhere")  # hidden, as other hidden files: not looked at
    assert len(find_images(tmp_path, "instance images")) == 2


def plan_of(pairs: int, **settings) -> TrainPlan:
    from helpers import config

    return TrainPlan(config=config(**settings), model_dir=Path("m"), resolution=64, class_images_dir=Path("c"),
                     class_shares=[[{}] * 2], pairs_per_worker=pairs, output_partial="p", output_token="t")


def test_the_start_says_when_the_epochs_end_a_run_before_max_train_steps():
    # Issue 33: --max_train_steps 400 with 4 photos and 2 class images trained 16 steps, unsaid.
    assert step_cap(plan_of(4, max_train_steps=400)) == (
        "16 steps, not --max_train_steps 400: --num_epochs 4 passes over 4 pairs per worker end first; "
        "--num_epochs 100 would take all 400")
    assert step_cap(plan_of(4, max_train_steps=400, train_batch_size=3)) == (
        "8 steps, not --max_train_steps 400: --num_epochs 4 passes over 4 pairs per worker end first; "
        "--num_epochs 200 would take all 400")
    assert step_cap(plan_of(4, max_train_steps=16)) is None
    assert step_cap(plan_of(4, max_train_steps=400, num_epochs=100)) is None


# As on a CPU with AVX512-BF16, where bitsandbytes tries its optional 4-bit kernel on import:
# this machine's answer is replaced in every Python process that the command starts.
AVX512_BF16 = """import importlib.abc, sys

class AVX512BF16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "bitsandbytes.backends.cpu.ops":
            import bitsandbytes.functional
            bitsandbytes.functional.has_avx512bf16 = lambda: True

sys.meta_path.insert(0, AVX512BF16())
"""


def test_bitsandbytes_cpu_kernel_line_is_not_shown(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(AVX512_BF16)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    line = "Failed to load CPU gemm_4bit_forward"
    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], env=env, capture_output=True, text=True)
    assert line in plain.stderr  # the stand-in CPU shows it, as such a CPU does
    run = subprocess.run([sys.executable, "-m", "raybooth", "tiny-model", "--output_dir", str(tmp_path / "tiny")],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0 and (tmp_path / "tiny" / "model_index.json").is_file(), run.stderr
    assert line not in run.stderr
