import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from raybooth.driver import cluster
from raybooth.errors import RayboothError


@pytest.fixture
def fake_cluster(monkeypatch):
    resources = {}
    monkeypatch.setattr(cluster, "cluster_resource", lambda name: resources.get(name, 0.0))
    monkeypatch.setattr(cluster, "_started_here", True)
    return resources


def test_one_cpu_always_stays_free_for_ray_data(fake_cluster):
    fake_cluster["CPU"] = 2  # the CI machine
    assert cluster.cpus_per_worker(1, use_gpu=False) == 1
    assert cluster.cpus_per_worker(2, use_gpu=False) == 0.5
    fake_cluster["CPU"] = 1
    assert cluster.cpus_per_worker(1, use_gpu=False) == 0


def test_cpu_workers_share_the_cpus_and_gpu_workers_take_one(fake_cluster):
    fake_cluster["CPU"] = 16
    assert cluster.cpus_per_worker(1, use_gpu=False) == 15
    assert cluster.cpus_per_worker(4, use_gpu=False) == 3
    assert cluster.cpus_per_worker(4, use_gpu=True) == 1


def test_gpus_are_used_by_default_when_the_cluster_has_them(fake_cluster):
    assert cluster.decide_use_gpu(None) is False
    assert cluster.decide_use_gpu(False) is False
    with pytest.raises(RayboothError, match="sees no GPU"):
        cluster.decide_use_gpu(True)
    fake_cluster["GPU"] = 2
    assert cluster.decide_use_gpu(None) is True
    assert cluster.decide_use_gpu(False) is False


def test_what_a_local_ray_cannot_grant_fails_at_once_but_an_attached_cluster_may_grow(fake_cluster, monkeypatch,
                                                                                         capsys):
    fake_cluster["GPU"] = 2
    cluster.check_fits("2 workers", 2, "GPU")
    with pytest.raises(RayboothError, match="4 workers needs 4 GPUs but the Ray cluster has 2"):
        cluster.check_fits("4 workers", 4, "GPU")
    monkeypatch.setattr(cluster, "_started_here", False)
    cluster.check_fits("4 workers", 4, "GPU")
    assert "waiting for the cluster to grow" in capsys.readouterr().err


def test_whether_connect_will_start_ray_here_is_known_before_it_runs(monkeypatch):
    ray_state = SimpleNamespace(up=False)
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: ray_state.up))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.ray_started_here(None)
    assert not cluster.ray_started_here("10.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not cluster.ray_started_here(None)
    ray_state.up = True  # a Ray already up in this process is reused, whatever the address says
    monkeypatch.setattr(cluster, "_started_here", True)
    assert cluster.ray_started_here("10.0.0.1:6379")
    monkeypatch.setattr(cluster, "_started_here", False)
    monkeypatch.delenv("RAY_ADDRESS")
    assert not cluster.ray_started_here(None)


def test_gpu_communication_settings_are_handed_to_the_workers(monkeypatch):
    # Some machines must keep NVLink multicast off; a worker on another node would not inherit it.
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "1")
    monkeypatch.setenv("UNRELATED_SETTING", "x")
    forwarded = cluster.forwarded_environment()
    assert {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}.items() <= forwarded.items()
    assert "UNRELATED_SETTING" not in forwarded


def test_the_ray_a_command_started_is_gone_when_the_command_exits():
    # cluster.stop_local_ray replaces Ray's slower exit hook: it must still stop every process.
    code = ("import ray\n"
            "from raybooth.driver.cluster import connect\n"
            "connect()\n"
            "node = ray._private.worker._global_node\n"
            "print(' '.join(str(info.process.pid) for infos in node.all_processes.values() for info in infos))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) >= 3  # GCS, raylet, monitor at least

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    assert [pid for pid in pids if alive(pid)] == []


def test_a_local_rays_workers_get_its_address_and_the_nccl_settings_without_a_runtime_env():
    # A job-wide runtime_env would keep Ray from handing out its idle workers (each task would
    # start a process); the settings reach the workers through the environment they inherit.
    code = ("import json, os, ray\n"
            "from raybooth.driver.cluster import connect\n"
            "connect()\n"
            "@ray.remote(num_cpus=0)\n"
            "def seen():\n"
            "    return (os.environ.get('RAY_ADDRESS'), os.environ.get('NCCL_NVLS_ENABLE'),\n"
            "            os.environ.get('RAY_prestart_worker_first_driver'))\n"
            "context = ray.get_runtime_context()\n"
            "print(json.dumps([ray.get(seen.remote()), os.environ.get('RAY_ADDRESS'), dict(context.runtime_env),\n"
            "                  context.gcs_address]))\n")
    environment = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=environment | {"NCCL_NVLS_ENABLE": "0"})
    assert done.returncode == 0, done.stderr
    (worker_address, worker_nccl, prestart), driver_address, runtime_env, gcs_address = json.loads(
        done.stdout.splitlines()[-1])
    assert worker_address == gcs_address and worker_nccl == "0"
    assert prestart == "0"  # Ray's node started no idle worker per CPU for this driver
    assert driver_address is None  # the command's own environment is as it was
    assert not runtime_env.get("env_vars")
