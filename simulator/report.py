"""``report.json`` and the PNG plots of one ``fleetnest simulate`` run."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from app_custom.egress import SECAGG_KEY
from app_custom.flare.fast_layer_guard import RESULT_KEYS
from app_custom.nested.config import NestedConfig
from app_custom.nested.device_data import FleetData
from app_custom.nested.learner import SERVING_KINDS
from app_custom.nested.levels import partition_parameters
from app_custom.nested.models import build_model, input_spec
from app_custom.privacy.private_update import PrivacySettings

from .methods import method_config

FLOAT32_BYTES = 4


def _site_order(name: str) -> int:
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else 0


def _drops(log: dict, after_key: str) -> list[float]:
    """Every device's accuracy drop at every merge (negative: the merge raised its accuracy)."""
    drops = []
    for metrics in [m for entry in log["rounds"] for m in entry["devices"].values()] + list(log["final"].values()):
        if metrics.get("acc_before_merge") is not None and metrics.get(after_key) is not None:
            drops.append(metrics["acc_before_merge"] - metrics[after_key])
    return drops


def drop_distribution(drops: list[float]) -> dict | None:
    """How merges moved devices' accuracy: the tail matters as much as the largest drop."""
    if not drops:
        return None
    ordered = sorted(drops)
    return {
        "merges": len(drops),
        "share_gain": sum(d < 0 for d in drops) / len(drops),
        "share_drop_over_1pt": sum(d > 0.01 for d in drops) / len(drops),
        "median": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def shared_shapes(config: NestedConfig, fleet: FleetData) -> dict[str, tuple[int, ...]]:
    """The exact names and shapes of the shared parameters, from the model and its partition
    (independently of the guard's patterns)."""
    torch.manual_seed(config.seed)
    model = build_model(
        config.model, input_spec(fleet.devices[0].train.x), config.model.num_classes or fleet.num_classes
    )
    params = dict(model.named_parameters())
    return {name: tuple(params[name].shape) for name in partition_parameters(model, config.levels).shared_names}


def fast_values_sent(shapes: dict[str, tuple[int, ...]], audit: list[dict], update_extra: int = 0) -> int:
    """Values in outbound results that are not shared-level parameters (must be 0): every value of
    a parameter that is not exactly a shared one, and one per extra payload beside the DXO. A
    secure-aggregation message counts by what it decoded as: a masked vector longer than the
    shared parameters and ``update_extra`` (a sample weight: 1) counts the excess, a message that is
    no device message counts every byte."""
    sent = 0
    shared_values = sum(math.prod(shape) for shape in shapes.values())
    for record in audit:
        sent += len(set(record["keys"]) - RESULT_KEYS)
        for key, shape in record["params"].items():
            if key == SECAGG_KEY and "secagg" in record:
                secagg = record["secagg"]
                if secagg["type"] is None:
                    sent += secagg["bytes"]
                elif secagg["type"] == "MaskedInput":
                    sent += max(0, secagg["length"] - shared_values - update_extra)
            elif tuple(shape) != shapes.get(key):
                sent += math.prod(shape) if shape else 1
    return sent


def privacy_summary(log: dict) -> dict | None:
    """Epsilon per device per round (as the devices' own ledgers report it) and what secure
    aggregation did each round; None for a run without privacy."""
    rounds = log["rounds"]
    if not any("dp_epsilon" in m for entry in rounds for m in entry["devices"].values()):
        return None
    per_round = [
        {device: m["dp_epsilon"] for device, m in sorted(entry["devices"].items()) if "dp_epsilon" in m}
        for entry in rounds
    ]
    deltas = {m["dp_delta"] for entry in rounds for m in entry["devices"].values() if "dp_delta" in m}
    final = per_round[-1] if per_round else {}
    mechanism = next((entry["dp"] for entry in rounds if "dp" in entry), {})
    return {
        "mechanism": mechanism.get("mechanism"),
        "accounting": mechanism.get("accounting"),
        "noise_multiplier": mechanism.get("noise_multiplier"),
        "delta": deltas.pop() if len(deltas) == 1 else sorted(deltas),
        "epsilon_per_device_per_round": per_round,
        "final_epsilon_max": max(final.values(), default=None),
        "skipped_over_budget": sum(len(entry.get("dp_skipped", {})) for entry in rounds),
        "secure_aggregation": {
            "rounds_aborted": sum("aborted" in entry.get("secagg", {}) for entry in rounds),
            "survivors_per_round": [len(entry.get("secagg", {}).get("survivors", [])) for entry in rounds],
            "rejected_messages": sum(len(entry.get("secagg", {}).get("rejections", [])) for entry in rounds),
        },
    }


def upload_bytes_per_update(audit: list[dict]) -> list[float]:
    """Bytes one device uploads per contributed update: a plain training result's float32 values,
    or, under secure aggregation, every protocol message it sent (key advert, sealed shares,
    masked vector, unmask shares) spread over the masked vectors it contributed."""
    if any("secagg" in record for record in audit):
        sizes = []
        for site in sorted({record["site"] for record in audit}):
            mine = [record["secagg"] for record in audit if record["site"] == site and "secagg" in record]
            vectors = sum(m["type"] == "MaskedInput" for m in mine)
            if vectors:
                sizes.append(sum(m["bytes"] for m in mine) / vectors)
        return sizes
    return [
        sum(math.prod(shape) for shape in record["params"].values()) * FLOAT32_BYTES
        for record in audit
        if record.get("task") == "train" and record["params"]
    ]


def method_summary(log: dict) -> dict:
    if not log.get("final"):
        raise ValueError("the run has no final validation results (did every device fail?)")
    final = sorted(log["final"].items(), key=lambda item: _site_order(item[0]))
    per_device = [metrics["test_acc"] for _, metrics in final]
    by_round = []
    for entry in log["rounds"]:
        accs = [m["acc_after_merge"] for m in entry["devices"].values() if "acc_after_merge" in m]
        by_round.append(sum(accs) / len(accs) if accs else None)
    by_round.append(sum(per_device) / len(per_device))
    statuses = [entry.get("status") for entry in log["rounds"]]
    drops = _drops(log, "acc_after_merge")
    choices = [device_choice(metrics) for _, metrics in final]
    return {
        "mean_acc": sum(per_device) / len(per_device),
        "worst_acc": min(per_device),
        "per_device_acc": per_device,
        "acc_by_round": by_round,
        "max_drop_after_merge": max(drops, default=None),
        "max_drop_naive_overwrite": max(_drops(log, "acc_naive_overwrite"), default=None),
        "drops_after_merge": drops,
        "drops_naive_overwrite": _drops(log, "acc_naive_overwrite"),
        "versions": {"accepted": statuses.count("accepted"), "rejected": statuses.count("rejected")},
        "rejected_updates": sum(len(entry.get("rejected", {})) for entry in log["rounds"]),
        "privacy": privacy_summary(log),
        **({"per_device_choice": choices} if any(c is not None for c in choices) else {}),
    }


def device_choice(metrics: dict) -> dict | None:
    """What one device serves at the end and why, from its scalar metrics: the kind of model, the
    personal model's weight in it, whether it kept its previous model, and the held-out accuracy
    of every candidate it weighed."""
    if "serving_kind" not in metrics:
        return None
    kind = SERVING_KINDS[int(metrics["serving_kind"])]
    choice = {"serves": kind, "personal_weight": metrics.get("serving_personal_weight", 0.0)}
    if "holdout_samples" in metrics:
        prefix = "holdout_acc_"
        choice |= {
            "kept_previous": bool(metrics.get("serving_kept")),
            "holdout_samples": int(metrics["holdout_samples"]),
            "holdout_acc": {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)},
            "test_acc": metrics.get("test_acc"),
        }
    return choice


def build_report(experiment, fleet: FleetData, runs: dict[str, tuple[dict, list[dict]]]) -> dict:
    methods = {method: method_summary(log) for method, (log, _) in runs.items()}
    extra = 1 if experiment.privacy and PrivacySettings.from_dict(experiment.privacy).weighted else 0
    fast_sent = sum(
        fast_values_sent(
            shared_shapes(NestedConfig.from_dict(method_config(method, experiment.seed)), fleet), audit, extra
        )
        for method, (_, audit) in runs.items()
    )
    nested_audit = runs.get("nested", (None, []))[1]
    update_sizes = upload_bytes_per_update(nested_audit)
    nested = methods.get("nested", {})
    return {
        "setup": {
            "dataset": experiment.dataset,
            "regime": None if experiment.is_plugin else experiment.regime,
            "devices": len(next(iter(methods.values()))["per_device_acc"]) if methods else 0,
            "rounds": experiment.rounds,
            "seed": experiment.seed,
            "runtime": "NVFlare simulator (SimEnv), one FLARE client per device"
            if getattr(experiment, "engine", "flare") == "flare"
            else "in-process: the same learners and cluster versions, no FLARE transport",
            # one test sample moves a device's accuracy by about 1/n: the resolution of every
            # per-device number (Kish's effective size where the test set is weighted)
            "test_samples_per_device": [round(device.test.effective_size, 1) for device in fleet.devices],
        },
        "privacy": experiment.privacy,
        "methods": methods,
        "fast_params_sent": fast_sent,
        "bytes_per_update": max(update_sizes) if update_sizes else 0,
        "forgetting": {
            "max_drop_after_merge": nested.get("max_drop_after_merge"),
            "max_drop_naive_overwrite": nested.get("max_drop_naive_overwrite"),
            "after_merge": drop_distribution(nested.get("drops_after_merge", [])),
            "drops_after_merge": nested.get("drops_after_merge", []),
        },
    }


def _choice_label(choice: dict | None) -> str:
    if not choice:
        return ""
    label = f"mix {choice['personal_weight']:.0%}" if choice["serves"] == "mix" else choice["serves"]
    return label + (" (kept)" if choice.get("kept_previous") else "")


def write_plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(methods), 1)
    for i, (method, summary) in enumerate(methods.items()):
        xs = [d + i * width for d in range(len(summary["per_device_acc"]))]
        ax.bar(xs, summary["per_device_acc"], width, label=f"{method} (mean {summary['mean_acc']:.2f})")
    ax.set_xlabel("device (and what the nested method serves on it)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    choices = methods.get("nested", {}).get("per_device_choice") or []
    if choices:
        ticks = range(len(choices))
        ax.set_xticks([d + 0.4 - width / 2 for d in ticks])
        ax.set_xticklabels([f"{d}\n{_choice_label(c)}" for d, c in zip(ticks, choices)], fontsize=7)
    ax.set_title(f"Per-device accuracy, {report['setup']['dataset']} / {report['setup']['regime']}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "per_device_accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, summary in methods.items():
        ax.plot(range(len(summary["acc_by_round"])), summary["acc_by_round"], marker="o", label=method)
    ax.set_xlabel("round (last point: final version)")
    ax.set_ylabel("mean device accuracy after merge")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_over_rounds.png", dpi=120)
    plt.close(fig)
