"""The base of every recipe section and step params model: strict, immutable, documented."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Unknown keys are errors; values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    DIR_FIELDS: ClassVar[frozenset[str]] = frozenset()  # external paths that must be directories
    FILE_OR_DIR_FIELDS: ClassVar[frozenset[str]] = frozenset()  # external paths that may be either

    def may_be_directory(self, field: str) -> bool:
        """Whether the external path in `field` may be a directory as well as a file."""
        return field in self.FILE_OR_DIR_FIELDS

    def external_paths(self) -> dict[str, str]:
        """Files or directories this step reads, by field name; their content enters the step's key."""
        return {}
