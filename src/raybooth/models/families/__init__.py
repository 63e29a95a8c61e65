"""Model families, one module each behind ModelFamily (base.py): Stable Diffusion 1.x/2.x
(stable_diffusion.py) and Stable Diffusion XL (stable_diffusion_xl.py). `family_named` tells a
pipeline folder's family from the class its model_index.json names."""

from __future__ import annotations

from raybooth.models.families.base import ModelFamily
from raybooth.models.families.stable_diffusion import STABLE_DIFFUSION
from raybooth.models.families.stable_diffusion_xl import STABLE_DIFFUSION_XL, time_ids

FAMILIES = (STABLE_DIFFUSION, STABLE_DIFFUSION_XL)


def family_named(pipeline_class: str | None) -> ModelFamily | None:
    """The family whose folders carry `pipeline_class` in model_index.json; None for none. A
    folder that names no class (hand-made) is taken for Stable Diffusion, as raybooth always did."""
    if pipeline_class is None:
        return STABLE_DIFFUSION
    return next((family for family in FAMILIES if pipeline_class in family.pipeline_classes), None)


def family_keyed(key: str) -> ModelFamily:
    """The family a flag names (`--family sdxl`)."""
    return next(family for family in FAMILIES if family.key == key)


__all__ = ["FAMILIES", "ModelFamily", "STABLE_DIFFUSION", "STABLE_DIFFUSION_XL", "family_keyed", "family_named",
           "time_ids"]
