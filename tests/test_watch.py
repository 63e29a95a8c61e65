"""A run you can watch (issue 8): Ray's output routed to a log file, the per-report line, TensorBoard
events, validation grids, report.png and metrics.json. The parts first, then one training run
read back from its output folder."""

import contextlib
import io
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import write_solid_images
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raybooth.commands.cli import main
from raybooth.files.checkpoints import run_name
from raybooth.terminal import raylog
from raybooth.terminal.progress import ImageProgress
from raybooth.terminal.raylog import RayOutput, restore_ray_output, send_ray_output
from raybooth.train.loss import Loss
from raybooth.train.losslog import LossLog
from raybooth.watch.monitor import gpu_memory
from raybooth.watch.report import PANEL_SIZE, PANELS, TITLE_HEIGHT, draw_report, panel_boxes, write_metrics
from raybooth.watch.tensorboard import Board
from raybooth.watch.validation import grid

OURS = "[raybooth   12.0s] step 2/4 epoch 1 loss 0.5"
RAYS = "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'step': 2})"
BAR = '{"__magic_token__": "__ray_tqdm_magic_token__", "x": 1}'
NOISE = ("Reporting training result", "TrainingReport(", "Setting up process group", "Progress bars disabled")


def batch(*lines: str) -> dict:
    return {"lines": list(lines), "pid": 4242, "actor_name": "RayTrainWorker", "is_err": True}


@pytest.mark.parametrize("verbose, bars, shown", [(False, False, [OURS]), (True, False, [OURS, RAYS]),
                                                  (False, True, [OURS, BAR])])
def test_forwarded_lines_ours_to_the_terminal_rays_to_the_file(tmp_path, verbose, bars, shown):
    output = RayOutput(tmp_path / "logs" / "ray.log", verbose, bars=bars)
    printed = []
    output.forwarded(batch(OURS, RAYS, BAR), printed.append)
    output.close()
    assert [line for data in printed for line in data["lines"]] == shown
    assert all(data["pid"] == 4242 for data in printed)  # printed as Ray prints it, prefix and all
    logged = (tmp_path / "logs" / "ray.log").read_text()
    assert f"(RayTrainWorker pid=4242) {RAYS}" in logged and OURS not in logged and BAR not in logged


def test_lines_written_to_descriptor_2_past_python_go_to_the_file(tmp_path):
    """Ray's C++ core writes some lines straight to descriptor 2 (a warning of Ray Data's actor
    pool): they go to the file, while Python's writes to sys.stderr, ours among them, still show."""
    script = f"""
import os, sys
from raybooth.terminal.log import log
from raybooth.terminal.raylog import restore_ray_output, send_ray_output
send_ray_output({str(tmp_path / "ray.log")!r}, verbose=False)
os.write(2, b"E core_worker.cc:2465: Actor with class name\\n")
log("made 1/2 images")
print("a path on stdout")
restore_ray_output()
os.write(2, b"after the command\\n")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "made 1/2 images" in done.stderr and "after the command" in done.stderr
    assert "core_worker" not in done.stderr and done.stdout == "a path on stdout\n"
    assert "(ray core) E core_worker.cc:2465: Actor with class name" in (tmp_path / "ray.log").read_text()


def test_restoring_leaves_a_stderr_redirected_since_alone(tmp_path):
    """A command that did not restore (train() called directly) is restored by the next one,
    perhaps inside a caller's redirect of sys.stderr: that stream is not raybooth's to close."""
    send_ray_output(tmp_path / "ray.log", verbose=False)
    with contextlib.redirect_stderr(io.StringIO()) as caught:
        restore_ray_output()
        caught.write("still open")
    assert caught.getvalue() == "still open"


def test_a_line_of_ours_forwarded_twice_is_shown_once(tmp_path):
    output = RayOutput(tmp_path / "ray.log", verbose=False, bars=False)
    printed = []
    output.forwarded(batch(OURS), printed.append)
    output.forwarded({**batch(OURS, OURS.replace("12.0s", "14.5s")), "pid": 4343}, printed.append)
    assert [line for data in printed for line in data["lines"]] == [OURS, OURS.replace("12.0s", "14.5s")]


def test_the_router_prints_as_ray_does_outside_a_command_and_to_the_file_inside(tmp_path, monkeypatch, capsys):
    printed = []
    monkeypatch.setattr(raylog._router, "ray_printer", printed.append)
    raylog._router(batch(RAYS))
    assert printed[-1]["lines"] == [RAYS]
    send_ray_output(tmp_path / "ray.log", verbose=False)
    try:
        raylog._router(batch(OURS, RAYS))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            send_ray_output(tmp_path / "ray.log", verbose=False)  # a second command takes over
            warnings.warn("`exclude_resources` is deprecated", UserWarning)
    finally:
        restore_ray_output()
    assert printed[-1]["lines"] == [OURS]
    logged = (tmp_path / "ray.log").read_text()
    assert RAYS in logged and "UserWarning: `exclude_resources` is deprecated" in logged
    err = capsys.readouterr().err
    assert "exclude_resources" not in err and f"Ray's own output goes to {tmp_path / 'ray.log'}" in err
    raylog._router(batch(RAYS))  # restored: Ray's printing again
    assert printed[-1]["lines"] == [RAYS]


def test_connect_puts_the_router_in_place_of_rays_printer(ray_cluster):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    handlers = dict(global_worker_stdstream_dispatcher.handlers)
    assert handlers[raylog.RAY_PRINTER] is raylog._router and raylog._router.ray_printer is not None


@pytest.mark.parametrize("lr", [3e-4, torch.tensor(3e-4)])  # a scheduler may hold the rate as a tensor
def test_the_report_line_shows_the_optimizers_rate_and_tensorboard_gets_the_steps(tmp_path, capsys, lr):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    board = Board(tmp_path)
    losses = LossLog(total_steps=4, world_size=1, images_per_step=2, verbose=True, optimizer=optimizer, board=board)
    for step, value in enumerate([4.0, 2.0, 1.0, 3.0], start=1):
        losses.add(step, 0, Loss(torch.tensor(value), torch.tensor(value / 2), torch.tensor(value / 2)))
        if step % 2 == 0:
            metrics = losses.flush()
    board.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if " loss " in line]
    assert len(lines) == 2 and all(" lr 0.0003 " in line and "images/s" in line and "s left" in line
                                   for line in lines)
    assert metrics["lr"] == pytest.approx(3e-4)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [event.value for event in events.Scalars("train/loss")] == [4.0, 2.0, 1.0, 3.0]
    assert [event.step for event in events.Scalars("train/learning_rate")] == [2, 4]
    assert {"train/instance_loss", "train/prior_loss", "throughput/images_per_s"} <= set(events.Tags()["scalars"])


def test_progress_is_a_bar_in_a_terminal_and_a_line_now_and_then_elsewhere(capsys):
    said = []
    progress = ImageProgress(10, "class images", said.append, bar=False, every=4)
    for _ in range(5):
        progress.update(2)
    progress.close()
    assert [line.split(" (")[0] for line in said] == [f"made {n}/10 class images on this worker" for n in (4, 8, 10)]
    said.clear()
    progress = ImageProgress(3, "samples", said.append, bar=True)  # outside Ray: tqdm itself, on stderr
    progress.update(3)
    progress.close()
    assert "samples: 100%" in capsys.readouterr().err and said[0].startswith("made 3 samples on this worker")


def test_the_metrics_keep_what_rank_0_measured_of_its_gpus_memory(tmp_path):
    gpu = {"peak_gpu_memory_gib": 64.4, "peak_gpu_reserved_gib": 70.1, "gpu_allocation_retries": 0}
    metrics = write_metrics(tmp_path, [{"step": 3}], {"steps_run": 3, "loss": 0.5, **gpu}, 9.0, tmp_path, [])
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["steps"] == 3 and metrics["final_loss"] == 0.5 and gpu.items() <= metrics.items()
    assert gpu_memory() == {}  # CUDA never started in this process


def test_a_grid_is_near_square_row_by_row():
    images = [np.full((64, 48, 3), 10 * i, dtype=np.uint8) for i in range(1, 6)]
    canvas = grid(images)
    assert canvas.shape == (2 * 64, 3 * 48, 3)
    assert canvas[64, 48].tolist() == [50] * 3 and canvas[-1, -1].tolist() == [0] * 3  # 5th image; empty cell


def panel_content(page: Image.Image, name: str) -> np.ndarray:
    left, top, right, bottom = panel_boxes()[name]
    return np.asarray(page.crop((left + 1, top + TITLE_HEIGHT, right - 1, bottom - 1)).convert("L"), np.float32)


def check_report(path, panels_with_content=PANELS):
    page = Image.open(path)
    assert page.size == (2 * PANEL_SIZE[0], 2 * PANEL_SIZE[1])
    assert json.loads(page.text["panels"]) == {name: list(box) for name, box in panel_boxes().items()}
    for name in panels_with_content:
        content = panel_content(page, name)
        assert (content != np.median(content)).mean() > 0.002, f"the {name} panel is blank"


def test_the_report_has_four_panels_each_drawn(tmp_path):
    photos = write_solid_images(tmp_path / "photos", (200, 30, 30), 3, size=(90, 120))
    grids = write_solid_images(tmp_path / "grids", (30, 200, 30), 4, size=(128, 128))
    samples = write_solid_images(tmp_path / "samples", (30, 30, 200), 2)
    history = [{"step": step, "loss": 1 / step} for step in range(1, 30)]
    draw_report(tmp_path / "report.png", photos, grids, samples, history, title="tuned")
    check_report(tmp_path / "report.png")
    draw_report(tmp_path / "bare.png", photos, [], [], history[:1], title="tuned")  # says what is missing
    check_report(tmp_path / "bare.png")


INSTANCE_PROMPT, CLASS_PROMPT = "a photo of unqtkn toy car", "a photo of a toy car"


def train_args(model_dir, output_dir, instance_dir, class_dir, *extra) -> list[str]:
    return ["train", "--model_dir", str(model_dir), "--output_dir", str(output_dir),
            "--instance_images_dir", str(instance_dir), "--instance_prompt", INSTANCE_PROMPT,
            "--class_images_dir", str(class_dir), "--class_prompt", CLASS_PROMPT, "--num_class_images", "4",
            "--num_inference_steps", "2", "--report_every_n_steps", "2", "--max_train_steps", "4", "--no_use_gpu",
            "--lr", "2e-4", "--storage_path", str(output_dir.parent / "ray-storage"), *extra]


def run_capturing_stderr(argv: list[str]) -> tuple[int, str]:
    """Our lines and whatever Ray's driver prints of its processes' output both go to sys.stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stderr.getvalue()


@pytest.fixture(scope="module")
def watched_run(ray_cluster, tiny_model_dir, subject_dir, tmp_path_factory):
    """One short training run with validation grids and samples, as the user would watch it, on a
    Ray Train worker process (not local mode): Ray forwards its lines, and they must not clutter ours."""
    folder = tmp_path_factory.mktemp("watched")
    code, err = run_capturing_stderr(train_args(
        tiny_model_dir, folder / "tuned", subject_dir, folder / "class", "--validation_prompt", INSTANCE_PROMPT,
        "--validation_steps", "2", "--num_validation_images", "3", "--validation_inference_steps", "2",
        "--sample_prompts", INSTANCE_PROMPT, "--num_samples_per_prompt", "2", "--samples_dir", str(folder / "samples"),
        "--no_local_mode"))
    assert code == 0, err
    return folder, err


def test_a_run_shows_our_lines_alone_and_names_its_logs(watched_run):
    folder, err = watched_run
    # While the run lasts its logs are in Ray Train's run folder; then they move into the output.
    live = folder / "ray-storage" / run_name(folder / "tuned") / "logs"
    assert f"watch the run: tensorboard --logdir {live}" in err
    logs = folder / "tuned" / "logs"
    run_logs = [path for path in logs.iterdir() if path.is_dir()]
    assert len(run_logs) == 1 and f"Ray's own output goes to {live / run_logs[0].name / 'ray.log'}" in err
    assert f"{run_logs[0]}; tensorboard --logdir {logs}" in err
    assert not (folder / "ray-storage" / run_name(folder / "tuned")).exists()
    report_lines = [line for line in err.splitlines() if " loss " in line and "images/s" in line]
    assert len(report_lines) == 2 and all(" lr 0.0002 " in line and "s left" in line for line in report_lines)
    # Ray's lines from the middle of the run are in the log file, not in the terminal.
    assert not [line for line in err.splitlines() if any(noise in line for noise in NOISE)], err
    assert "Reporting training result 1: TrainingReport(" in (run_logs[0] / "ray.log").read_text()


def test_tensorboard_events_and_validation_grids_are_in_the_runs_logs(watched_run):
    folder, _ = watched_run
    (run_logs,) = [path for path in (folder / "tuned" / "logs").iterdir() if path.is_dir()]
    events = EventAccumulator(str(run_logs), size_guidance={"images": 0})
    events.Reload()
    assert {"train/loss", "train/instance_loss", "train/prior_loss", "train/learning_rate",
            "throughput/images_per_s"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [event.value for event in events.Scalars("train/learning_rate")] == pytest.approx([2e-4, 2e-4])
    assert [(event.step, event.width, event.height) for event in events.Images("validation")] == [
        (2, 128, 128), (4, 128, 128)]  # 3 images of 64 px: a 2 x 2 grid
    grids = sorted((run_logs / "validation").glob("*.png"))
    assert [path.name for path in grids] == ["step-000002.png", "step-000004.png"]
    assert all(Image.open(path).size == (128, 128) for path in grids)


def test_the_output_holds_the_report_and_the_metrics(watched_run):
    folder, _ = watched_run
    check_report(folder / "tuned" / "report.png")
    metrics = json.loads((folder / "tuned" / "metrics.json").read_text())
    assert metrics["steps"] == metrics["steps_run"] == 4
    assert metrics["final_loss"] > 0 and metrics["images_per_s"] > 0 and metrics["wall_time_s"] > 0
    assert metrics["learning_rate"] == pytest.approx(2e-4)
    assert {"setup", "train", "save", "samples", "validation"} <= set(metrics["phases_s"])
    (run_logs,) = [path for path in (folder / "tuned" / "logs").iterdir() if path.is_dir()]
    assert metrics["logs_dir"] == str(run_logs)
    assert metrics["validation_grids"] == ["validation/step-000002.png", "validation/step-000004.png"]
    assert not [key for key in metrics if "gpu" in key]  # no GPU memory to tell of on the CPU
    # The logs belong to the output: --overwrite replaces the model and keeps the earlier runs' logs.
    from raybooth.models.output import check_output_dir

    check_output_dir(folder / "tuned", overwrite=True)


def test_verbose_shows_rays_lines_and_a_lora_output_gets_its_report(watched_run, tiny_model_dir, subject_dir,
                                                                    tmp_path):
    folder, _ = watched_run
    output = tmp_path / "lora"
    code, err = run_capturing_stderr(train_args(tiny_model_dir, output, subject_dir, folder / "class", "--use_lora",
                                                "--report_to", "none", "--verbose", "--no_local_mode"))
    assert code == 0, err
    assert "Reporting training result 1: TrainingReport(" in err
    assert "watch the run: tensorboard" not in err
    check_report(output / "report.png", panels_with_content=("subject", "loss"))
    assert json.loads((output / "metrics.json").read_text())["steps"] == 4
    assert not list((output / "logs").rglob("events.out.tfevents*"))
