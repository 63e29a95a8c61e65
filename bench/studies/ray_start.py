"""Issue 5: why starting Ray takes 7-12 s of `raybooth train` on the GPU machine (2.3-3.7 s on
the 2-core CPU machine). Each try is a fresh process that starts Ray as raybooth does
(`cluster.start_local_ray`) and stops it as raybooth does at exit (`cluster.stop_local_ray`),
profiled; `beside-load` loads the SD-1.5-sized UNet on a thread meanwhile, as the preload does;
`cli` starts Ray with `ray start --head` in a process of its own, then attaches.

    python bench/studies/ray_start.py MODEL_DIR [TRIES]     # one JSON line per try, and the profiles
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def one_try(mode: str, model_dir: str) -> None:
    import cProfile
    import io
    import pstats
    import threading

    if mode == "cli":  # a cluster of its own makes a token the attaching process would need
        os.environ["RAY_AUTH_MODE"] = "disabled"
    started = time.perf_counter()
    import ray

    from raybooth.driver import cluster
    imported = time.perf_counter() - started
    loader = None
    if mode == "beside-load":
        def load() -> None:
            import torch
            from diffusers import UNet2DConditionModel
            UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").to("cuda")
            torch.cuda.synchronize()
        loader = threading.Thread(target=load)
        loader.start()
    profiler = cProfile.Profile()
    begun = time.perf_counter()
    if mode == "cli":
        address = f"{ray.util.get_node_ip_address()}:6390"
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--port=6390", "--disable-usage-stats"], check=True,
                       capture_output=True)
        cli_s = time.perf_counter() - begun
        profiler.enable()
        ray.init(address=address, logging_level="WARNING")
        profiler.disable()
    else:
        cli_s = None
        profiler.enable()
        cluster.start_local_ray(**({"include_dashboard": False} if mode == "no-dashboard" else {}))
        profiler.disable()
    up = time.perf_counter() - begun
    if loader:
        loader.join()
    begun = time.perf_counter()
    if mode == "cli":
        ray.shutdown()
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
    else:
        cluster.stop_local_ray()
    stopped = time.perf_counter() - begun
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(18)
    print(json.dumps({"mode": mode, "import_ray_s": round(imported, 2), "ray_start_cli_s": cli_s and round(cli_s, 2),
                      "ray_up_s": round(up, 2), "stop_s": round(stopped, 2)}), flush=True)
    print("\n".join(line for line in text.getvalue().splitlines() if "{" in line or "/" in line)[:3000], flush=True)


def main(model_dir: str, tries: int = 2) -> None:
    for mode in ["plain", "beside-load", "no-dashboard", "cli"] * tries:
        subprocess.run([sys.executable, __file__, "--one", mode, model_dir], timeout=120)


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        one_try(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], *map(int, sys.argv[2:]))
