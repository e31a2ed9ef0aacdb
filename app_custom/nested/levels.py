"""Partition a torch module's parameters into levels by name patterns.

The partition is configuration, not code: any ``torch.nn.Module`` works, and every mistake in
the patterns (a pattern that matches nothing, two levels claiming one parameter, a parameter
no level claims) is an error that names the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from .config import LevelConfig


class PartitionError(ValueError):
    """The level patterns do not split the model's parameters into disjoint, complete levels."""


@dataclass(frozen=True)
class Partition:
    """Which level owns each parameter name, in the model's parameter order."""

    levels: tuple[LevelConfig, ...]
    level_of: dict[str, str]

    def names(self, level: str) -> list[str]:
        return [name for name, owner in self.level_of.items() if owner == level]

    @property
    def shared_names(self) -> list[str]:
        shared = {level.name for level in self.levels if level.shared}
        return [name for name, owner in self.level_of.items() if owner in shared]

    @property
    def private_names(self) -> list[str]:
        shared = set(self.shared_names)
        return [name for name in self.level_of if name not in shared]


def partition_parameters(model: torch.nn.Module, levels: tuple[LevelConfig, ...]) -> Partition:
    """Assign every named parameter of ``model`` to exactly one level."""
    names = [name for name, _ in model.named_parameters()]
    claims: dict[str, list[tuple[str, str]]] = {name: [] for name in names}
    for level in levels:
        for pattern in level.patterns:
            matched = [name for name in names if fnmatchcase(name, pattern)]
            if not matched:
                raise PartitionError(
                    f"level {level.name!r}: pattern {pattern!r} matches no parameter; the model has {names}"
                )
            for name in matched:
                if (level.name, pattern) not in claims[name]:
                    claims[name].append((level.name, pattern))

    overlapping = {name: owners for name, owners in claims.items() if len({level_name for level_name, _ in owners}) > 1}
    if overlapping:
        detail = "; ".join(
            f"{name} <- " + ", ".join(f"{lvl} ({pat!r})" for lvl, pat in owners) for name, owners in overlapping.items()
        )
        raise PartitionError(f"parameters claimed by more than one level: {detail}")
    unassigned = [name for name, owners in claims.items() if not owners]
    if unassigned:
        raise PartitionError(f"parameters assigned to no level: {unassigned}")
    return Partition(levels=levels, level_of={name: owners[0][0] for name, owners in claims.items()})
