"""The base of every recipe section and step params model: strict, immutable, documented."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Unknown keys are errors; values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
