"""A continual scenario: each device's data arrives over the rounds and its environment changes part-way.

Every device of an ``env_shift`` fleet (``simulator.fleets``: its own sensors) records its training
recordings over the rounds, a chunk a round, and keeps the most recent ``window`` samples, as a real
device's sample store does. At ``change_round`` its environment changes:

- ``sensor_shift``: its sensors change (a recalibration, a replaced part): every sample it records
  from then on, and its environment-2 test set, passes through a new per-device gain / offset per
  channel (and mirror or axis flips) on top of the old sensors (``fleets.Sensors``, drawn afresh).
- ``new_classes``: half of the classes (the same for the whole fleet) appear only from then on; the
  old ones go on arriving beside them. Environment 1's test set holds the old classes only.

The recordings before and after the change are disjoint halves of the device's own. Each device is
tested on the held-out pool through its sensors of each environment (``env1``, ``env2``), never
trained on. The window holds ``window_rounds`` rounds of environment-2 chunks, so environment 1's
samples have left it by round ``change + window_rounds - 1`` (once ``window_rounds`` rounds of
environment 2 have arrived): what the device still knows of
environment 1 then is what its models kept.

``ContinualStream`` is a ``simulator.inprocess.DeviceStream``; ``run_continual`` runs methods over
it and ``continual_metrics`` reads a method's round log: accuracy over time, backward transfer
(environment 1's accuracy at the end less just before the change), forward transfer (environment 2's
accuracy after the first round of its data) and the final accuracy, per device mean and worst.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app_custom.nested.device_data import DeviceData, FleetData, LabelledSet, concat
from app_custom.nested.learner import SERVING_KINDS

from .fleets import Sensors, make_fleet
from .inprocess import run_method_inprocess
from .methods import METHODS
from .runner import Experiment

SCENARIOS = ("sensor_shift", "new_classes")
ENVIRONMENTS = ("env1", "env2")
NEW_CLASS_SHARE = 0.5  # of the classes, those that appear only after the change (``new_classes``)


@dataclass(frozen=True)
class ContinualSetup:
    """One continual run: the fleet (as ``make_fleet``'s ``env_shift`` regime), the rounds, when the
    environment changes (default: half-way) and how many rounds of new data the sample store holds."""

    dataset: str = "digits"
    scenario: str = "sensor_shift"
    devices: int = 4
    rounds: int = 10
    seed: int = 0
    records_per_device: int | None = None
    change_round: int | None = None
    window_rounds: int = 3

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; known: {list(SCENARIOS)}")
        if not isinstance(self.rounds, int) or self.rounds < 2:
            raise ValueError(f"rounds must be an integer >= 2 (one before the change, one after), got {self.rounds!r}")
        if not 1 <= self.change <= self.rounds - 1:
            raise ValueError(f"change_round must be in [1, {self.rounds - 1}], got {self.change_round!r}")
        if not isinstance(self.window_rounds, int) or not 1 <= self.window_rounds <= self.rounds - self.change:
            raise ValueError(
                f"window_rounds must be in [1, {self.rounds - self.change}] (rounds after the change), "
                f"got {self.window_rounds!r}"
            )

    @property
    def change(self) -> int:
        """The first round of environment 2."""
        return self.rounds // 2 if self.change_round is None else self.change_round

    def experiment(self) -> Experiment:
        """The in-process engine's view of the run (its rounds and seed; the data comes from the stream)."""
        return Experiment(self.dataset, "env_shift", self.devices, self.rounds, self.seed, engine="inprocess")


@dataclass(frozen=True)
class DeviceTimeline:
    """One device's training samples in the order they arrive, and its test set of each environment."""

    samples: LabelledSet
    environment: np.ndarray  # 1 or 2, per sample
    arrival: np.ndarray  # the round each sample arrives in
    tests: dict[str, LabelledSet]


def _chunks(index: np.ndarray, first_round: int, rounds: int) -> np.ndarray:
    """The round each of ``index``'s samples arrives in: consecutive, near-equal chunks over ``rounds``."""
    arrival = np.empty(len(index), dtype=np.int64)
    for offset, part in enumerate(np.array_split(np.arange(len(index)), rounds)):
        arrival[part] = first_round + offset
    return arrival


class ContinualStream:
    """The devices of a ``ContinualSetup``: what each trains on in each round (its sample store) and
    its test sets of both environments."""

    def __init__(self, setup: ContinualSetup) -> None:
        self.setup = setup
        base = make_fleet(
            setup.dataset, "env_shift", setup.devices, setup.seed, records_per_device=setup.records_per_device
        )
        rng = np.random.default_rng([setup.seed, 7])  # independent of the fleet's own draws
        num_new = max(1, int(round(base.num_classes * NEW_CLASS_SHARE)))
        self.new_classes = np.sort(rng.permutation(base.num_classes)[:num_new])
        self.timelines = [self._timeline(device, rng) for device in base.devices]
        after = setup.rounds - setup.change
        # environment 2 brings at least this many samples a round, so its chunks fill the store within
        # ``window_rounds`` rounds of the change
        per_round = min(int((t.environment == 2).sum()) // after for t in self.timelines)
        if per_round < 1:
            raise ValueError(f"{setup.dataset}: too few samples per device for {after} rounds after the change")
        self.window = setup.window_rounds * per_round
        self.fleet = FleetData(
            tuple(self.data_for(i, 0) for i in range(len(self.timelines))), base.cluster_validation, base.num_classes
        )

    def _timeline(self, device: DeviceData, rng: np.random.Generator) -> DeviceTimeline:
        setup, train, test = self.setup, device.train, device.test
        groups = train.groups if train.groups is not None else np.arange(len(train))
        order = rng.permutation(np.unique(groups))
        half = len(order) // 2
        # recordings arrive one after another; a recording's windows together
        rank = {g: i for i, g in enumerate(order)}
        by_arrival = np.array(sorted(range(len(train)), key=lambda i: rank[groups[i]]))
        in_first = np.isin(groups[by_arrival], order[:half])
        first, second = by_arrival[in_first], by_arrival[~in_first]
        if setup.scenario == "new_classes":
            first = first[~np.isin(train.y[first], self.new_classes)]
            old = ~np.isin(test.y, self.new_classes)
            tests = {"env1": test.subset(np.flatnonzero(old)), "env2": test}
            x_second = train.subset(second).x
        else:
            new_sensors = Sensors(train.x, rng)
            tests = {"env1": test, "env2": LabelledSet(new_sensors(test.x), test.y, test.weight, test.groups)}
            x_second = new_sensors(train.subset(second).x)
        samples = LabelledSet(
            concat([train.subset(first).x, x_second]),
            np.concatenate([train.y[first], train.y[second]]),
            groups=np.concatenate([groups[first], groups[second]]),
        )
        return DeviceTimeline(
            samples=samples,
            environment=np.repeat([1, 2], [len(first), len(second)]),
            arrival=np.concatenate(
                [_chunks(first, 0, setup.change), _chunks(second, setup.change, setup.rounds - setup.change)]
            ),
            tests=tests,
        )

    def window_of(self, device: int, round_: int) -> np.ndarray:
        """Indices into the device's timeline of what its sample store holds in round ``round_``: the
        ``window`` most recent samples that have arrived."""
        arrived = np.flatnonzero(self.timelines[device].arrival <= round_)
        return arrived[-self.window :]

    def environment(self, round_: int) -> str:
        return "env1" if round_ < self.setup.change else "env2"

    def data_for(self, device: int, round_: int) -> DeviceData:
        """The device's sample store in round ``round_``; tested on its current environment."""
        timeline = self.timelines[device]
        return DeviceData(
            timeline.samples.subset(self.window_of(device, round_)), timeline.tests[self.environment(round_)]
        )

    def test_sets(self, device: int) -> Mapping[str, LabelledSet]:
        return self.timelines[device].tests


def _mean_worst(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "worst": min(values)}


def continual_metrics(log: dict, change: int) -> dict:
    """What a method's round log (``run_method_inprocess`` over a ``ContinualStream``) says of it.

    The log scores each device's served model at every merge: point ``p`` (of ``rounds + 1``) is the
    model served after ``p`` rounds of data, the last point the one after the final merge.
    ``acc_over_time``: per point, the mean device accuracy on each environment's test set and on the
    environment the devices are in (environment 1 through point ``change``). Per device, then mean and
    worst device: ``acc_env1_before_change`` (point ``change``: every round of environment 1 learnt,
    none of environment 2), ``acc_env1_final``, ``backward_transfer`` (their difference),
    ``forward_transfer`` (environment 2 after the first round of its data), ``acc_env2_final`` and
    ``final_acc`` (the accuracy on the environment each device is in at the end, environment 2); and
    ``final_serving``, what each device serves at the end (``mix50``: half personal, half merged)."""
    points = [entry["devices"] for entry in log["rounds"]] + [log["final"]]
    sites = list(log["final"])

    def acc(point: int, env: str) -> list[float]:
        return [points[point][site][f"acc_{env}"] for site in sites]

    over_time = {env: [statistics.mean(acc(p, env)) for p in range(len(points))] for env in ENVIRONMENTS}
    over_time["current"] = [over_time["env1" if p <= change else "env2"][p] for p in range(len(points))]
    before, final_env1, final_env2 = acc(change, "env1"), acc(-1, "env1"), acc(-1, "env2")
    return {
        "acc_over_time": over_time,
        "acc_env1_before_change": _mean_worst(before),
        "acc_env1_final": _mean_worst(final_env1),
        "backward_transfer": _mean_worst([f - b for f, b in zip(final_env1, before)]),
        "forward_transfer": _mean_worst(acc(change + 1, "env2")),
        "acc_env2_final": _mean_worst(final_env2),
        "final_acc": _mean_worst(final_env2),
        "final_serving": [_serving(log["final"][site]) for site in sites],
    }


def _serving(metrics: dict) -> str:
    """A device's serving choice from its scalar merge metrics (``MergeReport.metrics``)."""
    kind = SERVING_KINDS[int(metrics["serving_kind"])]
    return f"mix{round(metrics['serving_personal_weight'] * 100)}" if kind == "mix" else kind


def run_continual(setup: ContinualSetup, out: Path, methods: tuple[str, ...] = METHODS) -> dict:
    """Every method over the same stream: ``{"setup": ..., "methods": {method: continual_metrics}}``."""
    stream = ContinualStream(setup)
    results = {}
    for method in methods:
        log, _ = run_method_inprocess(setup.experiment(), method, out, stream)
        results[method] = continual_metrics(log, setup.change)
        print(
            f"    {setup.dataset}/{setup.scenario} seed {setup.seed} {method}: "
            f"final {results[method]['final_acc']['mean']:.3f}, "
            f"BWT {results[method]['backward_transfer']['mean']:+.3f}",
            file=sys.stderr,
            flush=True,
        )
    return {
        "setup": {"change_round": setup.change, "window": stream.window, "new_classes": stream.new_classes.tolist()},
        "methods": results,
    }
