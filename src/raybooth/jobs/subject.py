"""One subject of a batch, in the process that trains it (a Ray actor of jobs/pool.py): `raybooth
run`'s job (jobs/run.py) with its output in the subject's own log file, and what the batch keeps of
it. The actor's process outlives its subjects: the next subject finds torch, diffusers and Ray
Train imported and the base model's files in the page cache."""

from __future__ import annotations

import json
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from raybooth.errors import RayboothError
from raybooth.files.writes import write_atomically
from raybooth.jobs.run import RunPlan, carry_out
from raybooth.models.output import TRAINING_LOG

SUBJECT_FILE = "subject.json"  # in the subject's folder once it is done: what batch.json says of it
LOG_FILE = "log.txt"  # the subject's own lines (its `raybooth run` output)
LOSS_WINDOW = 10  # the final loss is the mean of the last steps': one step's loss is mostly noise


def finished(work_dir: Path) -> dict | None:
    """What a subject that finished in an earlier run left (None if it did not)."""
    try:
        done = json.loads((work_dir / SUBJECT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return done if done.get("status") == "done" and (work_dir / "model-tuned" / TRAINING_LOG).is_file() else None


class SubjectRunner:
    """Trains subjects one after another in its own process."""

    def run(self, plan: RunPlan) -> dict:
        """The subject trained, sampled and measured; {"status": "done", ...} or {"status": "failed", "error"}."""
        started, began = time.monotonic(), time.time()
        plan.work_dir.mkdir(parents=True, exist_ok=True)
        with open(plan.work_dir / LOG_FILE, "a") as lines, redirect_stderr(lines), redirect_stdout(lines):
            try:
                measures = carry_out(plan)
            except RayboothError as error:
                return failure(str(error), started)
            except Exception as error:  # noqa: BLE001 - one subject's failure, told in one line
                traceback.print_exc(file=lines)
                first = (str(error).strip().splitlines() or [""])[0]
                return failure(f"{type(error).__name__}: {first} (the traceback is in {plan.work_dir / LOG_FILE})",
                               started)
        history = json.loads((Path(plan.train.output_dir) / TRAINING_LOG).read_text())["history"]
        last = history[-LOSS_WINDOW:]
        result = {"status": "done", "steps": history[-1]["step"] if history else 0,
                  "final_loss": sum(row["loss"] for row in last) / len(last) if last else None,
                  "seconds": round(time.monotonic() - started, 1), "began": round(began, 1),
                  "ended": round(time.time(), 1),
                  "measures": {"before": measures["before"], "after": measures["after"]} if measures else None}
        write_atomically(plan.work_dir / SUBJECT_FILE, (json.dumps(result, indent=2) + "\n").encode())
        return result


def failure(error: str, started: float) -> dict:
    return {"status": "failed", "error": error, "seconds": round(time.monotonic() - started, 1)}
