"""The nested learning configuration: one YAML/JSON document, validated with errors that name the key.

A configuration says what the model is, how its parameters split into levels and how each
level trains. Baselines are configurations too (all fast = local-only, all slow = FedAvg,
head fast with an alternating schedule = FedRep-style), so every method runs the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODEL_KINDS = ("auto", "mlp", "robot")
SCHEDULES = ("nested", "alternating")
OPTIMIZERS = ("adam", "sgd")
PERSONALIZE = ("none", "finetune", "ditto", "select")
MODALITIES = ("vision", "audio", "imu", "nav")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names the key."""


def _require(mapping: Any, where: str) -> dict:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    return mapping


def _no_unknown(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _number(mapping: dict, key: str, where: str, default: float, minimum: float, strict: bool = False) -> float:
    value = mapping.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        bound = ">" if strict else ">="
        raise ConfigError(f"{where}.{key}: expected {bound} {minimum}, got {value!r}")
    return float(value)


def _int(mapping: dict, key: str, where: str, default: int, minimum: int) -> int:
    value = mapping.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}.{key}: expected >= {minimum}, got {value!r}")
    return value


def _choice(mapping: dict, key: str, where: str, default: str, choices: tuple[str, ...]) -> str:
    value = mapping.get(key, default)
    if value not in choices:
        raise ConfigError(f"{where}.{key}: expected one of {list(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class LevelConfig:
    """One level of the nested model: which parameters, how often they step, how fast, whether shared."""

    name: str
    patterns: tuple[str, ...]
    period: int = 1
    lr: float = 0.05
    shared: bool = False
    epochs: int = 1  # only read by the alternating (FedRep-style) schedule
    # A Gaussian prior toward the level's initial values (for adapters: the identity), worth
    # ``prox`` samples: the gradient gains (prox / n_local) * (w - w_init). A device with little
    # data stays close to the shared model; one with much data personalises freely.
    prox: float = 0.0

    @staticmethod
    def from_dict(raw: Any, where: str) -> LevelConfig:
        raw = _require(raw, where)
        _no_unknown(raw, {"name", "patterns", "period", "lr", "shared", "epochs", "prox"}, where)
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name: expected a non-empty string, got {name!r}")
        patterns = raw.get("patterns")
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"{where}.patterns: expected a non-empty list of glob strings, got {patterns!r}")
        shared = raw.get("shared", name == "slow")
        if not isinstance(shared, bool):
            raise ConfigError(f"{where}.shared: expected true or false, got {shared!r}")
        return LevelConfig(
            name=name,
            patterns=tuple(patterns),
            period=_int(raw, "period", where, 1, 1),
            lr=_number(raw, "lr", where, 0.05, 0.0, strict=True),
            shared=shared,
            epochs=_int(raw, "epochs", where, 1, 0),
            prox=_number(raw, "prox", where, 0.0, 0.0),
        )


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "auto"
    width: int = 64
    adapters: bool = True
    num_classes: int | None = None  # inferred from the data in simulation; required on a real device

    @staticmethod
    def from_dict(raw: Any, where: str = "model") -> ModelConfig:
        raw = _require(raw, where)
        _no_unknown(raw, {"kind", "width", "adapters", "num_classes"}, where)
        adapters = raw.get("adapters", True)
        if not isinstance(adapters, bool):
            raise ConfigError(f"{where}.adapters: expected true or false, got {adapters!r}")
        num_classes = raw.get("num_classes")
        if num_classes is not None:
            num_classes = _int(raw, "num_classes", where, 2, 2)
        return ModelConfig(
            kind=_choice(raw, "kind", where, "auto", MODEL_KINDS),
            width=_int(raw, "width", where, 64, 4),
            adapters=adapters,
            num_classes=num_classes,
        )


@dataclass(frozen=True)
class TrainingConfig:
    schedule: str = "nested"
    optimizer: str = "adam"
    local_epochs: int = 2
    batch_size: int = 32
    momentum: float = 0.9
    weight_decay: float = 0.0
    # After new global slow layers are merged, the fast levels refit for this many local steps
    # before the device serves the merged model (0 = serve the raw merge).
    merge_adapt_steps: int = 0
    # True: the device serves the model it trains, as it trains. False: it serves only merged
    # versions (new slow layers + its fast layers, refit), and local training runs in a working
    # copy: the served model changes once per global version, never mid-round.
    serve_trained: bool = True
    # With serve_trained false, what the device serves after each merge (the fast layers never leave
    # it either way):
    # - "none": the merged model (new slow layers + its fast layers, refit);
    # - "finetune": the merged model with every layer fine-tuned for ``finetune_epochs`` epochs on
    #   its own data (FedAvg + fine-tuning);
    # - "ditto": its personal model (every layer its own, trained ``personal_epochs`` epochs a
    #   round with a proximal pull of ``personal_prox`` toward the merged model: Ditto);
    # - "select": whichever of the shared model alone, the merged model, the fine-tuned and the
    #   personal model and mixes of the last two (``mix_grid``) is most accurate on the device's own
    #   held-out samples, and only when it is at least as accurate there as what it serves now.
    personalize: str = "none"
    # Share of the device's own training samples held out for its decisions: never trained on.
    holdout: float = 0.0
    personal_epochs: int = 0
    personal_prox: float = 0.1
    finetune_epochs: int = 0
    mix_grid: tuple[float, ...] = (0.25, 0.5, 0.75)

    @staticmethod
    def from_dict(raw: Any, where: str = "training") -> TrainingConfig:
        raw = _require(raw, where)
        allowed = {
            "schedule",
            "optimizer",
            "local_epochs",
            "batch_size",
            "momentum",
            "weight_decay",
            "merge_adapt_steps",
            "serve_trained",
            "personalize",
            "holdout",
            "personal_epochs",
            "personal_prox",
            "finetune_epochs",
            "mix_grid",
        }
        _no_unknown(raw, allowed, where)
        serve_trained = raw.get("serve_trained", True)
        if not isinstance(serve_trained, bool):
            raise ConfigError(f"{where}.serve_trained: expected true or false, got {serve_trained!r}")
        personalize = _choice(raw, "personalize", where, "none", PERSONALIZE)
        if personalize != "none" and serve_trained:
            raise ConfigError(
                f"{where}.personalize: {personalize!r} needs serve_trained: false (a separate served model)"
            )
        holdout = _number(raw, "holdout", where, 0.0, 0.0)
        if holdout >= 0.5:
            raise ConfigError(f"{where}.holdout: expected < 0.5 (a share of the device's samples), got {holdout}")
        if personalize == "select" and holdout == 0.0:
            raise ConfigError(f"{where}.holdout: personalize 'select' decides on held-out samples: expected > 0")
        personal_epochs = _int(raw, "personal_epochs", where, 0, 0)
        finetune_epochs = _int(raw, "finetune_epochs", where, 0, 0)
        if personalize == "ditto" and personal_epochs == 0:
            raise ConfigError(f"{where}.personal_epochs: personalize 'ditto' trains a personal model: expected >= 1")
        if personalize == "finetune" and finetune_epochs == 0:
            raise ConfigError(f"{where}.finetune_epochs: personalize 'finetune' fine-tunes: expected >= 1")
        mix_grid = raw.get("mix_grid", [0.25, 0.5, 0.75])
        if not isinstance(mix_grid, (list, tuple)) or not all(
            not isinstance(a, bool) and isinstance(a, (int, float)) and 0.0 < a < 1.0 for a in mix_grid
        ):
            raise ConfigError(
                f"{where}.mix_grid: expected a list of numbers strictly between 0 and 1, got {mix_grid!r}"
            )
        momentum = _number(raw, "momentum", where, 0.9, 0.0)
        if momentum >= 1.0:
            raise ConfigError(f"{where}.momentum: expected < 1, got {momentum}")
        return TrainingConfig(
            schedule=_choice(raw, "schedule", where, "nested", SCHEDULES),
            optimizer=_choice(raw, "optimizer", where, "adam", OPTIMIZERS),
            local_epochs=_int(raw, "local_epochs", where, 2, 1),
            batch_size=_int(raw, "batch_size", where, 32, 1),
            momentum=momentum,
            weight_decay=_number(raw, "weight_decay", where, 0.0, 0.0),
            merge_adapt_steps=_int(raw, "merge_adapt_steps", where, 0, 0),
            serve_trained=serve_trained,
            personalize=personalize,
            holdout=holdout,
            personal_epochs=personal_epochs,
            personal_prox=_number(raw, "personal_prox", where, 0.1, 0.0),
            finetune_epochs=finetune_epochs,
            mix_grid=tuple(float(a) for a in mix_grid),
        )


@dataclass(frozen=True)
class NestedConfig:
    """The whole nested learning configuration of one method."""

    levels: tuple[LevelConfig, ...]
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    seed: int = 0

    @property
    def shared_levels(self) -> tuple[LevelConfig, ...]:
        return tuple(level for level in self.levels if level.shared)

    @property
    def private_levels(self) -> tuple[LevelConfig, ...]:
        return tuple(level for level in self.levels if not level.shared)

    @staticmethod
    def from_dict(raw: Any, where: str = "config") -> NestedConfig:
        raw = _require(raw, where)
        _no_unknown(raw, {"levels", "model", "training", "seed"}, where)
        levels_raw = raw.get("levels")
        if not isinstance(levels_raw, list) or not levels_raw:
            raise ConfigError(f"{where}.levels: expected a non-empty list of levels, got {levels_raw!r}")
        levels = tuple(LevelConfig.from_dict(item, f"{where}.levels[{i}]") for i, item in enumerate(levels_raw))
        names = [level.name for level in levels]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ConfigError(f"{where}.levels: level names must be unique, repeated: {duplicated}")
        seed = raw.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{where}.seed: expected an integer, got {seed!r}")
        return NestedConfig(
            levels=levels,
            model=ModelConfig.from_dict(raw.get("model", {}), f"{where}.model"),
            training=TrainingConfig.from_dict(raw.get("training", {}), f"{where}.training"),
            seed=seed,
        )

    @staticmethod
    def from_yaml(path: str | Path) -> NestedConfig:
        text = Path(path).read_text()
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        return NestedConfig.from_dict(raw, where=str(path))
