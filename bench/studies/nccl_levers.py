"""Issue 10: NCCL's settings and DDP's bucket size for the graphed DDP step, one at a time, on
the GPUs of one machine. NCCL reads its variables when a process starts, so each setting runs
`ddp_levers.py` under a torchrun of its own. If a setting beats NCCL's defaults at the most GPUs
by a millisecond or more, `raybooth train` (through `scaling.py`) is then run with it on 2..N
GPUs, beside one GPU, on the same machine. Writes nccl-levers.json and the logs to OUT_DIR.

    python bench/studies/nccl_levers.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Each setting is added to the machine's (NVLink multicast stays off: the rule of these machines).
SETTINGS = {"defaults": {}, "channels-8": {"NCCL_MAX_NCHANNELS": "8"}, "channels-16": {"NCCL_MAX_NCHANNELS": "16"},
            "channels-32": {"NCCL_MIN_NCHANNELS": "32"}, "simple-protocol": {"NCCL_PROTO": "Simple"},
            "tree": {"NCCL_ALGO": "Tree"}}
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def levers(model_dir: str, gpus: int, setting: dict, variants: list[str], log) -> list[dict]:
    command = ["torchrun", "--standalone", f"--nproc_per_node={gpus}", "bench/studies/ddp_levers.py", model_dir, *variants]
    done = subprocess.run(command, env={**os.environ, **MULTICAST_OFF, **setting}, capture_output=True, text=True)
    log.write(f"$ {setting} {' '.join(command)}\n{done.stdout}\n{done.stderr[-4000:]}\n")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return rows or [{"gpus": gpus, "error": f"exit {done.returncode}"}]


def main(model_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    most = torch.cuda.device_count()
    report: dict = {"device": torch.cuda.get_device_name(), "gpus": most, "torch": torch.__version__, "rows": []}

    def add(rows: list[dict], name: str) -> None:
        for row in rows:
            report["rows"].append({"setting": name, **row})
            print(json.dumps(report["rows"][-1]), flush=True)
        (out / "nccl-levers.json").write_text(json.dumps(report, indent=1))

    with open(out / "nccl-levers.log", "w") as log:
        add(levers(model_dir, 1, {}, [], log), "defaults")
        for gpus in sorted({2, most}):
            for name, setting in SETTINGS.items():
                variants = ["views-100", "views-200", "views-400"] if name == "defaults" else ["views-100"]
                add(levers(model_dir, gpus, setting, variants, log), name)
    one = next(row["step_ms"] for row in report["rows"] if row.get("gpus") == 1 and "step_ms" in row)
    for row in report["rows"]:
        if "step_ms" in row and row["gpus"] > 1:
            row["efficiency"] = round(one / row["step_ms"], 3)  # same batch per GPU: step time ratio
    at_most = [row for row in report["rows"] if row.get("gpus") == most and row.get("variant") == "views-100"
               and "step_ms" in row]
    default = next(row for row in at_most if row["setting"] == "defaults")
    best = min(at_most, key=lambda row: row["step_ms"])
    report["best"] = {"setting": best["setting"], "step_ms": best["step_ms"], "defaults_step_ms": default["step_ms"]}
    (out / "nccl-levers.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["best"]), flush=True)
    if best["setting"] != "defaults" and default["step_ms"] - best["step_ms"] >= 1.0:
        subprocess.run([sys.executable, "bench/scaling.py", model_dir, str(out / "confirm-1gpu"), "train", "1"])
        counts = ",".join(str(n) for n in sorted({2, most}))
        subprocess.run([sys.executable, "bench/scaling.py", model_dir, str(out / f"confirm-{best['setting']}"),
                        "train", counts], env={**os.environ, **SETTINGS[best["setting"]]})


if __name__ == "__main__":
    main(*sys.argv[1:])
