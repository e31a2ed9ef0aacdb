"""Multi-frequency optimisation: each level steps with its own period and learning rate.

In the spirit of Nested Learning's levels (Behrouz et al., 2025): the fast level steps every
local step; a slower level accumulates its gradient over ``period`` steps and steps once with
the mean, so it changes at a lower frequency and integrates more data per change.
"""

from __future__ import annotations

import torch

from .config import LevelConfig, TrainingConfig
from .levels import Partition


def _optimizer(params: list[torch.nn.Parameter], level: LevelConfig, training: TrainingConfig) -> torch.optim.Optimizer:
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=level.lr, weight_decay=training.weight_decay)
    return torch.optim.SGD(params, lr=level.lr, momentum=training.momentum, weight_decay=training.weight_decay)


class MultiFrequencySchedule:
    """One optimiser per level; call ``after_backward()`` once per local step."""

    def __init__(
        self, model: torch.nn.Module, partition: Partition, training: TrainingConfig, num_samples: int = 1
    ) -> None:
        params = dict(model.named_parameters())
        self.levels: tuple[LevelConfig, ...] = partition.levels
        self._params = {level.name: [params[n] for n in partition.names(level.name)] for level in self.levels}
        self.optimizers = {level.name: _optimizer(self._params[level.name], level, training) for level in self.levels}
        self._pending = {level.name: 0 for level in self.levels}
        self._num_samples = max(1, num_samples)
        self._anchors = {
            level.name: [p.detach().clone() for p in self._params[level.name]]
            for level in self.levels
            if level.prox > 0
        }

    def _step(self, level: str, accumulated: int) -> None:
        if accumulated > 1:
            for p in self._params[level]:
                if p.grad is not None:
                    p.grad.div_(accumulated)
        if level in self._anchors:
            prox = next(lv.prox for lv in self.levels if lv.name == level) / self._num_samples
            with torch.no_grad():
                for p, anchor in zip(self._params[level], self._anchors[level]):
                    if p.grad is not None:
                        p.grad.add_(p - anchor, alpha=prox)
        self.optimizers[level].step()
        self.optimizers[level].zero_grad(set_to_none=True)
        self._pending[level] = 0

    def after_backward(self, active: set[str] | None = None) -> None:
        """Count one local step for the active levels and step those whose period has come."""
        for level in self.levels:
            if active is not None and level.name not in active:
                self.optimizers[level.name].zero_grad(set_to_none=True)
                continue
            self._pending[level.name] += 1
            if self._pending[level.name] >= level.period:
                self._step(level.name, self._pending[level.name])

    def reset(self, level_names: set[str]) -> None:
        """Forget the optimiser state of these levels (their weights were just replaced from outside)."""
        for level in self.levels:
            if level.name in level_names:
                self.optimizers[level.name].state.clear()
                self.optimizers[level.name].zero_grad(set_to_none=True)
                self._pending[level.name] = 0

    def flush(self) -> None:
        """Step every level that has accumulated gradient since its last step (end of a round)."""
        for name, pending in self._pending.items():
            if pending:
                self._step(name, pending)

    def state_dict(self) -> dict:
        return {"optimizers": {n: o.state_dict() for n, o in self.optimizers.items()}, "pending": dict(self._pending)}

    def load_state_dict(self, state: dict) -> None:
        """Restore optimiser state; the hyperparameters stay those of the current configuration."""
        for name, optimizer in self.optimizers.items():
            configured = [dict(group) for group in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizers"][name])
            for group, wanted in zip(optimizer.param_groups, configured):
                group.update({k: v for k, v in wanted.items() if k != "params"})
        self._pending = dict(state["pending"])
