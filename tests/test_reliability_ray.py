"""How commands end when something around them goes wrong (issue 33): a cluster address nothing
answers, a scheduler's SIGTERM or a closed terminal's SIGHUP, Ctrl-C while images are written,
writes still going as the command exits; and the local Ray that no other machine can reach."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import train_args, write_solid_images

from raybooth.errors import RayboothError
from raybooth.files.checkpoints import latest_checkpoint
from raybooth.generate import on_worker
from raybooth.terminal.progress import ImageProgress

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def without_ray_address() -> dict:
    return {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}


# 1. A cluster address that nothing answers: one line at once, not minutes of silence.

@pytest.mark.parametrize("command", ["train", "generate"])
def test_an_address_nothing_answers_is_one_line_at_once(tiny_model_dir, subject_dir, tmp_path, command):
    port = closed_port()
    if command == "train":  # by --address
        class_dir = write_solid_images(tmp_path / "class", (0, 0, 200), 4)[0].parent
        args = train_args(tiny_model_dir, tmp_path / "tuned", subject_dir, class_dir, "--no_use_gpu",
                          "--address", f"127.0.0.1:{port}")
        environment, fix = without_ray_address(), "drop --address"
    else:  # by RAY_ADDRESS
        args = ["generate", "--model_dir", str(tiny_model_dir), "--output_dir", str(tmp_path / "images"),
                "--prompts", "a photo of a toy car", "--no_use_gpu"]
        environment, fix = without_ray_address() | {"RAY_ADDRESS": f"127.0.0.1:{port}"}, "unset RAY_ADDRESS"
    # Before the fix ray.init retried for more than 10 minutes: the time-out fails the test.
    done = subprocess.run([sys.executable, "-m", "raybooth", *args], capture_output=True, text=True, timeout=240,
                          env=environment)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"raybooth: error: no Ray cluster answers at 127.0.0.1:{port}"), done.stderr
    assert "connection refused" in last and fix in last
    assert not (tmp_path / "tuned").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_auto_with_no_ray_running_or_a_stale_one_and_ray_client_addresses_fail_in_one_line(monkeypatch):
    from ray._private import services

    from raybooth.driver.address import check_reachable

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset())  # no Ray on this machine
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    with pytest.raises(RayboothError, match=r"no Ray cluster runs on this machine for RAY_ADDRESS=auto: .*"
                                            r"unset RAY_ADDRESS"):
        check_reachable("auto", "RAY_ADDRESS")
    port = closed_port()  # the address the last `ray start` left behind, of a cluster gone since
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: f"127.0.0.1:{port}")
    with pytest.raises(RayboothError, match="no Ray cluster answers at auto, from --address"):
        check_reachable("auto", "--address")
    with pytest.raises(RayboothError, match=f"no Ray cluster answers at ray://127.0.0.1:{port}, from --address"):
        check_reachable(f"ray://127.0.0.1:{port}", "--address")


def test_an_address_that_answers_passes_and_a_ray_on_loopback_alone_is_reached_as_written():
    from ray._private.services import canonicalize_bootstrap_address

    from raybooth.driver.address import check_reachable

    with socket.socket() as server:
        server.bind(("", 0))  # every interface, as a GCS listens: Ray turns 127.0.0.1 into this machine's address
        server.listen()
        assert check_reachable(f"127.0.0.1:{server.getsockname()[1]}", "--address") is False
        assert check_reachable(f"ray://127.0.0.1:{server.getsockname()[1]}", "--address") is False
    with socket.socket() as server:  # as the Ray that raybooth starts (and test_generate attaches to) listens
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        assert check_reachable(address, "RAY_ADDRESS") is (canonicalize_bootstrap_address(address) != address)
    assert check_reachable("local", "RAY_ADDRESS") is False  # Ray starts one: nothing to reach


# 2. SIGTERM and SIGHUP stop a command as Ctrl-C does.

def test_sigterm_mid_training_stops_as_ctrl_c_does_and_leaves_the_checkpoint(tiny_model_dir, subject_dir, tmp_path):
    class_dir = write_solid_images(tmp_path / "class", (0, 0, 200), 4)[0].parent
    args = train_args(tiny_model_dir, tmp_path / "tuned", subject_dir, class_dir, "--max_train_steps", "60",
                      "--num_epochs", "1000", "--checkpointing_steps", "6", "--no_use_gpu")
    with open(tmp_path / "run.log", "w+") as log:
        run = subprocess.Popen([sys.executable, "-m", "raybooth", *args], stderr=log, text=True,
                               env=without_ray_address())
        deadline = time.monotonic() + 300
        while "checkpoint at step 12 written" not in (tmp_path / "run.log").read_text():
            assert time.monotonic() < deadline and run.poll() is None, (tmp_path / "run.log").read_text()
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=300)
    output = (tmp_path / "run.log").read_text()
    assert run.returncode == 143, output  # 128 + 15, not Ray's abort (134)
    assert output.strip().splitlines()[-1] == "raybooth: stopped by SIGTERM", output
    assert not any(native in output for native in ("*** SIGTERM", "Stack trace", "Aborted")), output
    assert "re-run the same command to resume from it" in output
    assert not (tmp_path / "tuned").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert latest_checkpoint(next((tmp_path / "ray-storage").glob("raybooth-*"))) is not None  # to resume from


SIGNALLED = ("import os, signal, sys, time\n"
             "import raybooth.commands.cli as cli\n"
             "name = sys.argv[1]\n"
             "def command(args):\n"
             "    os.kill(os.getpid(), getattr(signal, name))\n"
             "    time.sleep(3)\n"
             "    print('not stopped', file=sys.stderr)\n"
             "cli.COMMANDS['tiny-model'] = (command, *cli.COMMANDS['tiny-model'][1:])\n"
             "sys.argv[1:] = ['tiny-model', '--output_dir', 'unused']\n"
             "cli.run()\n")


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_stop_signal_is_one_line_and_its_exit_code(name, code):
    done = subprocess.run([sys.executable, "-c", SIGNALLED, name], capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().splitlines() == [f"raybooth: stopped by {name}"]


def test_sighup_left_ignored_as_nohup_leaves_it_stays_ignored():
    done = subprocess.run([sys.executable, "-c", SIGNALLED, "SIGHUP"], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert done.returncode == 0 and "not stopped" in done.stderr, done.stderr


# 3. What the progress says is made is on disk, interrupted or not.

def test_images_counted_as_made_are_on_disk_when_making_them_is_interrupted(tmp_path, monkeypatch):
    batches = []

    def render(pipeline, rows, device, settings):
        if len(batches) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the fourth batch renders
        batches.append(rows)
        return [np.full((8, 8, 3), 100, np.uint8) for _ in rows]

    def slow_write(folder, files, images):
        time.sleep(0.4)  # still writing as the interrupt comes
        on_worker.write_pngs(folder, files, images)

    monkeypatch.setattr(on_worker, "render", render)
    rows = [{"prompt": "p", "seed": index, "file": f"{index:03d}.png"} for index in range(10)]
    progress = ImageProgress(len(rows), "images", lambda line: None, False)
    writer = ThreadPoolExecutor(1)
    with pytest.raises(KeyboardInterrupt):
        on_worker.render_and_write(SimpleNamespace(device=SimpleNamespace(type="cpu")), rows, tmp_path, 2, {},
                                   progress, lambda *args: writer.submit(slow_write, *args))
    on_disk = len(list(tmp_path.glob("*.png")))  # now: the clean-up that follows (Ray's shutdown) drops the rest
    writer.shutdown(cancel_futures=True)
    assert progress.done == on_disk == 6  # the three batches made, written before the interrupt went on


def test_images_are_counted_once_written_and_a_failed_write_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(on_worker, "render", lambda pipeline, rows, device, settings:
                        [np.zeros((8, 8, 3), np.uint8) for _ in rows])
    rows = [{"prompt": "p", "seed": index, "file": f"{index:03d}.png"} for index in range(5)]
    progress = ImageProgress(len(rows), "images", lambda line: None, False)
    with ThreadPoolExecutor(1) as writer:
        on_worker.render_and_write(SimpleNamespace(device=SimpleNamespace(type="cpu")), rows, tmp_path, 2, {},
                                   progress, lambda *args: writer.submit(on_worker.write_pngs, *args))
        assert progress.done == 5 == len(list(tmp_path.glob("*.png")))
        with pytest.raises(FileNotFoundError):
            on_worker.render_and_write(SimpleNamespace(device=SimpleNamespace(type="cpu")), rows, tmp_path, 2, {},
                                       progress, lambda *args: writer.submit(open, tmp_path / "none" / "x", "rb"))


def test_local_generations_png_writers_finish_their_writes_through_ctrl_c(tmp_path):
    # A terminal's Ctrl-C reaches each of the command's processes: the writers must not die of it.
    from raybooth.driver.local_generation import png_writers

    with png_writers("cpu") as pool:
        pool.submit(on_worker.write_pngs, "", [], []).result(timeout=120)  # up, its set-up done
        for process in pool._processes.values():
            os.kill(process.pid, signal.SIGINT)
        time.sleep(0.5)
        image = np.zeros((8, 8, 3), np.uint8)
        pool.submit(on_worker.write_pngs, str(tmp_path), ["after.png"], [image]).result(timeout=60)
    assert (tmp_path / "after.png").is_file()


# 4. The Ray raybooth starts listens on the loopback interface alone.

def test_the_local_ray_listens_on_loopback_alone_and_asks_for_a_token():
    code = ("import json, os, psutil, ray, ray.data\n"
            "from raybooth.driver.cluster import connect\n"
            "connect()\n"
            "@ray.remote\n"
            "def pid():\n"
            "    return os.getpid()\n"
            "ray.get([pid.remote() for _ in range(2)])\n"
            "ray.data.range(4).map_batches(lambda batch: batch).take_all()\n"
            "me = psutil.Process()\n"
            "ours = {p.pid: p.name() for p in [me] + me.children(recursive=True)}\n"
            "listening = [(ours[c.pid], c.laddr.ip, c.laddr.port) for c in psutil.net_connections('inet')\n"
            "             if c.status == psutil.CONN_LISTEN and c.pid in ours]\n"
            "from ray._raylet import AuthenticationMode, get_authentication_mode\n"
            "token = get_authentication_mode() == AuthenticationMode.TOKEN\n"
            "print(json.dumps([ray.get_runtime_context().gcs_address, listening, token]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=without_ray_address())
    assert done.returncode == 0, done.stderr
    gcs_address, listening, token = json.loads(done.stdout.splitlines()[-1])
    assert gcs_address.startswith("127.0.0.1:")
    assert token  # Ray's token authentication stays on: raybooth never turns it off
    assert {name for name, _, _ in listening} >= {"gcs_server", "raylet"}, listening
    assert [entry for entry in listening if entry[1] not in LOOPBACK] == []


# 5. Writes still going as the command exits finish, or are said to be lost.

WRITING = ("import pathlib, sys, threading, time\n"
           "import raybooth.commands.cli as cli\n"
           "import raybooth.driver.launch as launch\n"
           "launch.WRITES_WAIT_S = float(sys.argv[2])\n"
           "def write():\n"
           "    time.sleep(float(sys.argv[3]))\n"
           "    pathlib.Path(sys.argv[1]).write_text('written')\n"
           "def main():\n"
           "    threading.Thread(target=write, name='raybooth-checkpoint', daemon=True).start()\n"
           "    return 0\n"
           "cli.main = main\n"
           "cli.run()\n")


def test_a_checkpoint_being_written_as_the_command_ends_is_finished(tmp_path):
    done = subprocess.run([sys.executable, "-c", WRITING, str(tmp_path / "checkpoint"), "60", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (tmp_path / "checkpoint").read_text() == "written"


def test_a_write_that_does_not_finish_in_time_is_said_to_be_lost(tmp_path):
    done = subprocess.run([sys.executable, "-c", WRITING, str(tmp_path / "checkpoint"), "0.5", "60"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stderr.strip().splitlines()[-1] == ("raybooth: a checkpoint being written did not finish in 0.5 s: "
                                                    "it is lost")
    assert not (tmp_path / "checkpoint").exists()
