"""What every block of the federation config shares: frozen models that refuse unknown fields and infinite or NaN
numbers, and the pattern of a name (an id, a metric, a region)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class Frozen(BaseModel):
    # allow_inf_nan=False: TOML has inf and nan, and an infinite cap or resolution would pass `gt=0`.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


Name = Annotated[str, Field(pattern=_NAME)]
