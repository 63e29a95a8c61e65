"""Attaching to Ray and sizing what the steps ask of it."""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager, nullcontext

from raybooth.driver.address import check_reachable
from raybooth.errors import RayboothError
from raybooth.terminal.log import log
from raybooth.terminal.raylog import take_over_forwarded_output

GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"  # read by Ray when it starts a head node
PRESTART_VARIABLE = "RAY_prestart_worker_first_driver"  # Ray's setting: an idle worker per CPU for the first driver
LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's: "0" has "localhost" mean 127.0.0.1, not the node's IP

_started_here = False  # whether this process started the Ray instance it uses (a fixed-size one)


def connect(address: str | None = None, verbose: bool = False) -> None:
    """Attach to the cluster at `address` or RAY_ADDRESS; with neither, start Ray on this machine.
    A Ray already initialized in this process is reused. `verbose` (--verbose) lets Ray Data show
    its progress bars and notices."""
    global _started_here
    import ray
    import ray.data

    # Ray Train polls its workers every 2 s by default, so a finished run waited seconds to be
    # noticed; the controller reads this when a TorchTrainer starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    if not ray.is_initialized():
        target = cluster_address(address)
        # Workers log errors only: without Ray's dashboard, Ray Train's placement group cleaner
        # warns every second that it cannot reach the state API, burying our progress lines.
        quiet = dict(logging_level=logging.WARNING, logging_config=ray.LoggingConfig(encoding="TEXT", log_level="ERROR"))
        handler = signal.getsignal(signal.SIGTERM)
        if target:
            loopback = check_reachable(target, "--address" if address else "RAY_ADDRESS")
            with localhost_is_loopback() if loopback else nullcontext():
                ray.init(address=target, runtime_env={"env_vars": forwarded_environment()}, **quiet)
        else:
            start_local_ray(**quiet)
        if callable(handler) and threading.current_thread() is threading.main_thread():
            # ray.init set one that exits there and then (the training thread aborts in Ray's C++): the command's back
            signal.signal(signal.SIGTERM, handler)
        _started_here = not target
        resources = ray.cluster_resources()
        where = f"attached to the Ray cluster at {target}" if target else "started Ray on this machine"
        log(f"{where}: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
        start_autoscaling_coordinator()
    take_over_forwarded_output()  # Ray's lines to a command's log file, ours to the terminal
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose  # else our own progress lines say what is happening
    context.print_on_execution_start = verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)  # e.g. that bars are off


def start_local_ray(**options) -> None:
    """Start Ray on this machine on a GCS port chosen here, and give its processes that address.
    Ray's helpers that look a cluster up by themselves (Ray Train's placement-group cleaner uses
    the state API) otherwise find every Ray on the machine, and fail when two commands run at once.

    The address reaches the workers through the environment they inherit from the node's
    processes, as this process's NCCL settings do, not through a job-wide runtime_env: with one,
    Ray starts a fresh process for every task and actor of the driver's instead of handing out the
    idle workers it has (bench/RESULTS.md).

    Nor does Ray start an idle worker per CPU when this process attaches (unless the user sets
    PRESTART_VARIABLE): on an H100 machine of 16 CPUs those 16 processes slowed Ray's own start
    and the models' load beside it; the few tasks of a local-mode run start the workers they need.
    It listens on loopback alone (GCS, raylet, workers): no other machine can reach it. No dashboard."""
    import ray

    with socket.socket() as probe:  # a free port; Ray takes it a moment later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inherited = {GCS_PORT_VARIABLE: str(port), "RAY_ADDRESS": f"127.0.0.1:{port}",
                 PRESTART_VARIABLE: os.environ.get(PRESTART_VARIABLE, "0"), LOOPBACK_VARIABLE: "0"}
    before = {name: os.environ.get(name) for name in inherited}
    os.environ.update(inherited)
    try:
        with localhost_is_loopback():
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **options)
    finally:  # this process's own environment as it was: a later connect() must not take RAY_ADDRESS for a cluster
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    atexit.unregister(stop_local_ray)
    atexit.register(stop_local_ray)  # runs before Ray's own exit hook, registered when Ray was imported


@contextmanager
def localhost_is_loopback():
    """Ray's servers listen on 127.0.0.1 alone where the node's IP is that (else on every interface),
    but ray.init makes a node IP of 127.0.0.1 the machine's own address unless Ray's constant says
    clusters are off (as on macOS): Ray's processes read it from LOOPBACK_VARIABLE, this one has."""
    from ray._private import ray_constants

    enabled, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = enabled


def stop_local_ray() -> None:
    """Stop the Ray started here, as the command exits. Ray's own exit hook sleeps half a second
    for late error messages, then stops its processes one after the other, giving each up to a
    second to go, and its autoscaler monitor, which a fixed-size local Ray has no use for, takes
    its whole second. The monitor is killed first; the rest go as Ray stops them."""
    import ray

    if not ray.is_initialized():
        return
    node = getattr(ray._private.worker, "_global_node", None)  # an internal of Ray's: without it, Ray's own pace
    for info in getattr(node, "all_processes", {}).get("monitor", []):
        info.process.kill()
    ray.shutdown()


# Settings of the GPU communication libraries that must reach every worker as the user set them
# (some machines must keep NVLink multicast off: NCCL_NVLS_ENABLE=0 and the like).
FORWARDED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_SYMM_MEM_", "NVSHMEM_")


def forwarded_environment() -> dict[str, str]:
    """This process's NCCL/NVSHMEM settings, for the workers' environment on any node."""
    return {name: value for name, value in os.environ.items() if name.startswith(FORWARDED_PREFIXES)}


def start_autoscaling_coordinator() -> None:
    """Ray Train's controller asks Ray Data's autoscaling coordinator (an actor) for resources,
    giving up after 5 s; an actor started on demand takes longer than that, so a run lost 5 s
    to the time-out. Starting it now, in the background, has it ready by then."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)
    except ImportError:  # an internal of Ray's that may move; without it a run is only slower
        return
    get_or_create_autoscaling_coordinator()


def started_here() -> bool:
    """Whether this process started the Ray it uses (rather than attaching to a cluster)."""
    return _started_here


def cluster_address(address: str | None) -> str | None:
    """The cluster `connect(address)` attaches to when no Ray is up in this process; None: none, it starts one."""
    return address or os.environ.get("RAY_ADDRESS")


def ray_started_here(address: str | None) -> bool:
    """What `started_here()` will say once `connect(address)` has run, known before it runs and
    without importing Ray: a Ray already up in this process is reused as it is."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return _started_here
    return cluster_address(address) is None


def cluster_resource(name: str) -> float:
    import ray

    return ray.cluster_resources().get(name, 0.0)


def node_count() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"])


def decide_use_gpu(requested: bool | None) -> bool:
    """Use GPUs when asked to, or by default when the cluster has any."""
    gpus = cluster_resource("GPU")
    if requested is None:
        return gpus > 0
    if requested and not gpus and _started_here:
        raise RayboothError("--use_gpu was given but this machine's Ray sees no GPU")
    return requested


def check_fits(what: str, needed: float, resource: str) -> None:
    """Fail at once where a fixed-size local Ray can never grant `needed`; on an attached cluster,
    which may autoscale, only warn."""
    available = cluster_resource(resource)
    if needed <= available:
        return
    message = f"{what} needs {needed:g} {resource}s but the Ray cluster has {available:g}"
    if _started_here:
        raise RayboothError(message)
    log(f"warning: {message}; waiting for the cluster to grow")


def cpus_per_worker(workers: int, use_gpu: bool, cpus: float | None = None) -> float:
    """CPUs to reserve for each of `workers` training workers or generation actors, of the
    cluster's (or `cpus`). One CPU stays free: Ray Data feeds them with CPU tasks, and workers
    that reserve every CPU starve it, which hangs the job. With GPUs doing the work one CPU each is
    plenty; on CPUs the rest is shared out (Ray sizes torch's thread pool to it)."""
    share = ((cluster_resource("CPU") if cpus is None else cpus) - 1) / workers
    if use_gpu or share < 1:
        return max(0.0, min(1.0, share))
    return float(math.floor(share))
