"""`raybooth sweep`: one subject trained under many settings at once, every trial scored by `raybooth
evaluate`'s measures (the small world's with the world model, DINO/CLIP-I/CLIP-T with
clip_model_dir and dino_model_dir), the best named and written as a `--config` file. The trials'
settings come from Ray Tune's search spaces (grid_search, choice, uniform, loguniform, randint,
expanded by its variant generator); they train as a batch's subjects do (jobs/batch.py), sharing
their class images."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from raybooth.config import TrainConfig
from raybooth.config.batch import BatchConfig
from raybooth.errors import RayboothError
from raybooth.files.writes import write_atomically
from raybooth.jobs.batch import SubjectSettings, run_batch
from raybooth.jobs.classes import image_class
from raybooth.jobs.manifest import Manifest, Subject
from raybooth.jobs.run import plan_run
from raybooth.terminal.log import log
from raybooth.world.demo import DEMO_CLASS_NOUN, DEMO_TRAINING
from raybooth.world.metrics import WORLD_METRICS
from raybooth.world.scenes import CLASSES

SWEEP_KEYS = ("flags", "subject", "objective", "search", "num_trials", "seed")
OBJECTIVES = {"world": ["subject_fidelity", "prompt_fidelity"], "clip": ["dino", "clip_t"]}
LOWER_IS_BETTER = ("prior_leakage",)  # counted as 1 - leakage
SWEEP_FILE, BEST_FILE, TRIALS_FILE = "sweep.json", "best.yaml", "trials.json"


@dataclass
class Sweep:
    subject: str
    trials: dict[str, dict[str, Any]]  # {trial name: the flags it sets}
    objective: list[str] | None  # None: the measures' default (OBJECTIVES)


def plan_sweep(manifest: Manifest) -> tuple[Sweep, list[Subject]]:
    """The trials of the manifest's `sweep` section, each a subject of its own (the swept subject's
    options under the trial's flags)."""
    spec, where = manifest.sweep, f"{manifest.where}: sweep"
    if not spec:
        raise RayboothError(f"{manifest.where} has no `sweep` section: it says which flags to try (docs/batch.md)")
    if unknown := sorted(set(spec) - set(SWEEP_KEYS)):
        raise RayboothError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(SWEEP_KEYS)}")
    names = [subject.name for subject in manifest.subjects]
    name = str(spec.get("subject", names[0]))
    if name not in names:
        raise RayboothError(f"{where}: subject {name!r} is not in the manifest's subjects ({', '.join(names)})")
    flags = spec.get("flags")
    if not isinstance(flags, dict) or not flags:
        raise RayboothError(f"{where}: `flags` must map each flag to sweep to its values")
    objective = spec.get("objective")
    if objective is not None:
        objective = [objective] if isinstance(objective, str) else objective
        if not isinstance(objective, list) or not objective or not all(isinstance(m, str) for m in objective):
            raise RayboothError(f"{where}: `objective` must be a measure's name or a list of them")
    variants = expand(flags, str(spec.get("search", "grid")), spec.get("num_trials", 8), spec.get("seed", 0), where)
    trials = {f"trial-{number:02d}": variant for number, variant in enumerate(variants, 1)}
    base = next(subject for subject in manifest.subjects if subject.name == name)
    return Sweep(name, trials, objective), [Subject(trial, base.options | variant) for trial, variant in trials.items()]


def expand(flags: dict[str, Any], search: str, num_trials: Any, seed: Any, where: str) -> list[dict[str, Any]]:
    """Every trial's flags: Ray Tune's grid over the lists, or `num_trials` draws from its distributions."""
    import numpy as np
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants

    if search not in ("grid", "random"):
        raise RayboothError(f"{where}: `search` must be grid or random, got {search!r}")
    space = {}
    for flag, values in flags.items():
        flag = str(flag).replace("-", "_")
        if isinstance(values, list) and values:
            space[flag] = tune.grid_search(values) if search == "grid" else tune.choice(values)
        elif search == "random" and isinstance(values, dict) and len(values) == 1:
            (kind, bounds), = values.items()
            if kind not in ("uniform", "loguniform", "randint") or not (isinstance(bounds, list) and len(bounds) == 2):
                raise RayboothError(f"{where}: {flag}: a distribution is {{uniform|loguniform|randint: [low, high]}}")
            low, high = bounds
            space[flag] = tune.randint(int(low), int(high) + 1) if kind == "randint" else getattr(tune, kind)(
                float(low), float(high))
        else:
            raise RayboothError(f"{where}: {flag} needs a list of values" + (
                "" if search == "grid" else " or a distribution ({loguniform: [low, high]}, ...)"))
    if search == "grid":
        return [variant for _, variant in generate_variants(space)]
    if not isinstance(num_trials, int) or num_trials < 1:
        raise RayboothError(f"{where}: `num_trials` must be a whole number of at least 1")
    random_state = np.random.RandomState(int(seed))
    return [variant for _ in range(num_trials) for _, variant in generate_variants(space, random_state=random_state)]


def run_sweep(cfg: BatchConfig, sweep: Sweep, trials: list[SubjectSettings]) -> dict:
    """Train and score every trial; write sweep.json and the best trial's settings as best.yaml."""
    objective = checked_objective(sweep.objective, metrics_kind(trials[0]))
    stated = (f"the mean of {', '.join(m if m not in LOWER_IS_BETTER else f'1 - {m}' for m in objective)} "
              "(the tuned model's), higher is better")
    log(f"{len(trials)} trials of subject {sweep.subject}; objective: {stated}")
    results = run_batch(cfg, trials, noun="trial", results_file=TRIALS_FILE)
    scores = {name: score(result, objective) for name, result in results.items()}
    scored = {name: value for name, value in scores.items() if value is not None}
    output = Path(cfg.output_dir).expanduser().absolute()
    summary: dict[str, Any] = {"objective": stated, "measures": objective, "subject": sweep.subject,
                               "trials": {name: {"flags": flags, "score": scores.get(name), **results.get(name, {})}
                                          for name, flags in sweep.trials.items()}}
    lines = [f"  {name}: {'-' if scores.get(name) is None else f'{scores[name]:.3f}'}  {flags}"
             for name, flags in sweep.trials.items()]
    log("scores (" + stated + "):\n" + "\n".join(lines))
    if scored:
        best = max(scored, key=scored.get)
        summary["best"] = {"trial": best, "score": scored[best], "flags": sweep.trials[best]}
        path = output / BEST_FILE
        write_config(path, best_settings(cfg, next(t for t in trials if t.name == best), output))
        log(f"best: {best} ({scored[best]:.3f}) with {sweep.trials[best]}; its settings: {path} "
            f"(`raybooth train --config {path} --output_dir OUT`)")
    else:
        log("no trial finished: nothing to choose from")
    write_atomically(output / SWEEP_FILE, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def checked_objective(objective: list[str] | None, kind: str | None) -> list[str]:
    """The measures to score by, checked before anything trains."""
    if kind is None:
        raise RayboothError("a sweep needs measures to score its trials: the world model has them; other models need "
                            "clip_model_dir and dino_model_dir in the manifest's defaults")
    known = WORLD_METRICS if kind == "world" else ("dino", "clip_i", "clip_t")
    for measure in objective or []:
        if measure not in known:
            raise RayboothError(f"sweep: objective {measure!r} is not a measure of this sweep's; they are "
                                f"{', '.join(known)}")
    return objective or OBJECTIVES[kind]


def metrics_kind(trial: SubjectSettings) -> str | None:
    if trial.run.clip_model_dir and trial.run.dino_model_dir:
        return "clip"
    return "world" if trial.run.uses_world_model and (trial.run.class_noun or DEMO_CLASS_NOUN) in CLASSES else None


def score(result: dict, objective: list[str]) -> float | None:
    """The mean of the tuned model's `objective` measures (1 - each lower-is-better one); None without them."""
    after = (result.get("measures") or {}).get("after") or {}
    if result.get("status") != "done" or any(after.get(m) is None for m in objective):
        return None
    values = [1 - after[m] if m in LOWER_IS_BETTER else after[m] for m in objective]
    return sum(values) / len(values)


def best_settings(cfg: BatchConfig, trial: SubjectSettings, output: Path) -> dict[str, Any]:
    """The best trial's training settings as `raybooth train --config` takes them: the subject and its
    class images (made already), the training options the manifest gave and the trial's flags, each
    as the trial trained with it."""
    plan = plan_run(replace(trial.run, work_dir=output / trial.name, overwrite=True), trial.training)
    train = plan.train
    store = Path(cfg.class_images_store or output / "class-images").expanduser().absolute()
    train.class_images_dir = image_class(train).folder(store)
    chosen = set(trial.training) | (set(DEMO_TRAINING) if trial.run.uses_world_model else set())  # run's own choices
    names = ["model_dir", "instance_images_dir", "instance_prompt", "class_images_dir", "class_prompt", "class_noun"]
    names += [name for name in TrainConfig.__dataclass_fields__ if name in chosen]
    return {name: plain(getattr(train, name)) for name in dict.fromkeys(names)}


def plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def write_config(path: Path, settings: dict[str, Any]) -> None:
    import yaml

    text = "# The best trial of `raybooth sweep`: `raybooth train --config THIS --output_dir OUT`\n" + yaml.safe_dump(
        settings, sort_keys=False)
    write_atomically(path, text.encode())
