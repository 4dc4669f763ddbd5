"""The ``ray:`` section: which Ray cluster a run uses.
"""

from __future__ import annotations

from pydantic import Field

from core.config import Section


class RayConfig(Section):
    """How to reach Ray. ``address: null`` starts an embedded local cluster."""

    address: str | None = None
    # CPUs for the embedded local cluster (null: all of this machine's).
    num_cpus: int | None = Field(default=None, ge=1)
