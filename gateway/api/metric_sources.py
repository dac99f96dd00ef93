"""What the metrics read from the supervisor, as read-only protocols.

The metrics only look: they never change a model's state, and depending on these few
attributes rather than on the supervisor's classes keeps them independent of how the
supervisor arranges its records.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Protocol

from gateway.backends.launcher import Backend
from gateway.lifecycle.admission import Admission
from gateway.registry.config import ModelEntry

READY = "ready"


class ModelView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def entry(self) -> ModelEntry: ...
    @property
    def state(self) -> Enum: ...
    @property
    def backend(self) -> Backend | None: ...
    @property
    def admission(self) -> Admission: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def load_seconds(self) -> float | None: ...


class ModelsView(Protocol):
    @property
    def models(self) -> Mapping[str, ModelView]: ...
