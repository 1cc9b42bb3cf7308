"""Named latency classes (`interactive`, `batch`, ...): the SLO a request gets by naming one."""
from __future__ import annotations

from dataclasses import dataclass, field

from sloserve.request import SLO


@dataclass(slots=True)
class SLOClasses:
    classes: dict[str, SLO] = field(default_factory=dict)
    default: str | None = None  # the class of a request that names none and gives no SLO of its own

    def __post_init__(self) -> None:
        if self.default is not None and self.default not in self.classes:
            raise ValueError(f"the default SLO class {self.default!r} is not defined; defined: {self.names()}")

    def names(self) -> str:
        return ", ".join(self.classes) or "none"

    def resolve(self, name: str | None) -> SLO | None:
        """The named class's SLO (the default class's when `name` is None); ValueError for an unknown name."""
        if name is None:
            return self.classes[self.default] if self.default else None
        if name not in self.classes:
            raise ValueError(f"unknown SLO class {name!r}; this server defines: {self.names()}")
        return self.classes[name]
