"""The base of every stage's config: typed, frozen, and strict about unknown keys.

Each stage declares a `StageConfig` subclass named like its `params.yaml` block; pydantic checks
types and ranges (`Field(ge=..., le=...)`) when params are loaded, before any work, and an
unknown key is refused with its name.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
