"""The cluster's global slow-layer versions: make a candidate, judge it, archive it.

One object owns what every cluster workflow shares (the flat job's controller and the
hierarchy's assessor): the version archive, the cluster's validation probe, the validation gate
and the server optimiser. ``open`` starts from the archive's current version when there is one
(a restarted server resumes there, momentum included) or archives the initial weights as
version 0. ``propose`` turns what the ``SlowDeltaAggregator`` holds into a candidate, scores it,
lets the gate decide and archives it as accepted (it becomes current) or rejected (the current
version stays). A rejected candidate never becomes current.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import LabelledSet
from app_custom.nested.models import input_spec
from app_custom.nested.slow_delta import shapes_of

from .aggregation import SlowDeltaAggregator
from .archive import ACCEPTED, REJECTED, VersionArchive, VersionRecord
from .gate import Scores, SlowLayerValidator, ValidationGate


@dataclass
class Proposal:
    record: VersionRecord
    accepted: bool


class GlobalVersions:
    def __init__(
        self,
        config: dict,
        validation: LabelledSet,
        num_classes: int,
        archive_root: str | os.PathLike,
        aggregator: SlowDeltaAggregator,
        gate: ValidationGate,
    ) -> None:
        self.probe = SlowLayerValidator(NestedConfig.from_dict(config), validation, num_classes)
        self.archive = VersionArchive(archive_root)
        self.archive.write_model_card(
            {
                "config": config,
                "input_spec": input_spec(validation.x),
                "num_classes": self.probe.num_classes,
                "shared_names": self.probe.shared_names,
            }
        )
        self.aggregator = aggregator
        self.gate = gate
        self.resumed = False
        version = self.archive.current_version()
        if version is None:
            weights = {name: p.detach().numpy().copy() for name, p in self.probe.model.named_parameters()}
            self.current = {name: weights[name] for name in self.probe.shared_names}
            self.record = self.archive.save(
                self.current,
                VersionRecord(0, ACCEPTED, None, None, 0, self.probe.measure(self.current), "initial weights"),
            )
        else:
            self.current, self.record = self.archive.load(version)
            self.aggregator.restore_velocity(self.archive.load_server_state(version))
            self.resumed = True
        self.expected = shapes_of(self.current)
        # the gate compares per-sample scores; the untrained initial version is no reference
        self._scores: Scores | None = None if self.record.round is None else self.probe.score(self.current)

    @property
    def version(self) -> int:
        return self.record.version

    def next_round(self) -> int:
        """The first round not yet archived (0 on a fresh archive)."""
        last = self.archive.last_round()
        return 0 if last is None else last + 1

    def propose(self, round_: int, num_devices: int | None = None) -> Proposal:
        """Judge and archive the candidate made from the aggregator's accepted deltas; ``num_devices``
        when the aggregator's contributors are not devices (a leaf sum holds many)."""
        if not self.aggregator.count:
            raise ValueError("no accepted slow delta to make a version from")
        candidate = self.aggregator.apply(self.current)
        scores = self.probe.score(candidate)
        verdict = self.gate.assess(scores, self._scores)
        record = VersionRecord(
            version=self.archive.next_version(),
            status=ACCEPTED if verdict.accepted else REJECTED,
            parent=self.record.version,
            round=round_,
            num_devices=self.aggregator.count if num_devices is None else num_devices,
            metrics=scores.summary(),
            reason=verdict.reason,
        )
        velocity = self.aggregator.pending_velocity if verdict.accepted else None
        self.archive.save(candidate, record, server_state=velocity)
        if verdict.accepted:
            self.aggregator.commit()
            self.current, self.record, self._scores = candidate, record, scores
        return Proposal(record, verdict.accepted)
