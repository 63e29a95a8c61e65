"""Model families, one module each behind ModelFamily (base.py): Stable Diffusion 1.x/2.x
(stable_diffusion.py) today. `family_of` tells a pipeline folder's family from its
model_index.json, and refuses one of a family raybooth does not train in one line."""

from __future__ import annotations

from raybooth.models.families.base import ModelFamily
from raybooth.models.families.stable_diffusion import STABLE_DIFFUSION

FAMILIES = (STABLE_DIFFUSION,)


def family_named(pipeline_class: str | None) -> ModelFamily | None:
    """The family whose folders carry `pipeline_class` in model_index.json; None for none. A
    folder that names no class (hand-made) is taken for Stable Diffusion, as raybooth always did."""
    if pipeline_class is None:
        return STABLE_DIFFUSION
    return next((family for family in FAMILIES if pipeline_class in family.pipeline_classes), None)


__all__ = ["FAMILIES", "ModelFamily", "STABLE_DIFFUSION", "family_named"]
