"""What moves between the tiers of the hierarchy inside FLARE (Shareables between the server, the
cluster-tier clients and the leaves), and its checks on arrival.

Down (the task, and replies to update reports): ``{"global_version": int, "slow": {name: array}}``;
a reply carries ``slow`` only when the child's ``known_version`` is older (asynchronous mode).
Up (update reports and task results): ``{"known_version": int, "leaf_sums": [{"leaf", "session",
"base_version", "count", "weight", "total": {name: array}}, ...]}``; a cluster-tier client forwards
its leaves' sums unchanged, so the cluster judges every leaf on its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.fuel.utils.tree_utils import Forest

from app_custom.cluster.leaf_sums import LeafSum
from app_custom.nested.slow_delta import UpdateError

GLOBAL_VERSION, SLOW, KNOWN_VERSION, LEAF_SUMS = "global_version", "slow", "known_version", "leaf_sums"
MODES = ("sync", "async")  # how the cluster and the leaves run rounds: one version per round, or buffered
ACKNOWLEDGED = "acknowledged"  # in a reply: the [leaf, session] pairs the parent took (or refused for good)
MAX_SUMS_PER_REPORT = 10_000


def version_message(version: int, weights: Mapping[str, np.ndarray] | None) -> Shareable:
    message = Shareable()
    message[GLOBAL_VERSION] = int(version)
    if weights is not None:
        message[SLOW] = {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}
    return message


def read_version(message: Shareable) -> tuple[int | None, dict[str, np.ndarray] | None]:
    version = message.get(GLOBAL_VERSION)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        raise UpdateError(f"global_version must be a non-negative integer, got {version!r}")
    weights = message.get(SLOW)
    if weights is not None:
        if not isinstance(weights, dict) or not all(isinstance(v, np.ndarray) for v in weights.values()):
            raise UpdateError("slow must map names to arrays")
        if not all(np.isfinite(v).all() for v in weights.values()):
            raise UpdateError("slow weights are not finite")
    return version, weights


def leaf_sum_entry(session: int, item: LeafSum) -> dict:
    return {
        "leaf": item.leaf,
        "session": int(session),
        "base_version": int(item.base_version),
        "count": int(item.count),
        "weight": float(item.weight),
        "total": {name: np.asarray(value, dtype=np.float32) for name, value in item.total.items()},
    }


def report(known_version: int | None, entries: list[dict]) -> Shareable:
    message = Shareable()
    message[KNOWN_VERSION] = known_version
    message[LEAF_SUMS] = list(entries)
    return message


def read_report(message: Shareable) -> tuple[int | None, list[tuple[int, LeafSum]], list[str]]:
    """(the sender's known version, its well-formed (session, LeafSum) entries, what was wrong with
    the others). Shapes, norms and counts are the ``LeafSumCombiner``'s to judge."""
    known = message.get(KNOWN_VERSION)
    if known is not None and (isinstance(known, bool) or not isinstance(known, int)):
        known = None
    entries = message.get(LEAF_SUMS)
    if entries is None:
        return known, [], []
    if not isinstance(entries, list) or len(entries) > MAX_SUMS_PER_REPORT:
        return known, [], [f"leaf_sums must be a list of at most {MAX_SUMS_PER_REPORT} entries"]
    good, problems = [], []
    for entry in entries:
        try:
            good.append(_entry(entry))
        except UpdateError as err:
            leaf = entry.get("leaf", "?") if isinstance(entry, dict) else "?"
            problems.append(f"leaf {leaf}: {err}")
    return known, good, problems


def _entry(entry: object) -> tuple[int, LeafSum]:
    fields = {"leaf", "session", "base_version", "count", "weight", "total"}
    if not isinstance(entry, dict) or set(entry) != fields:
        raise UpdateError(f"a leaf sum must have exactly the fields {sorted(fields)}")
    if not isinstance(entry["leaf"], str) or not entry["leaf"]:
        raise UpdateError("leaf must be a site name")
    for name in ("session", "base_version", "count"):
        if isinstance(entry[name], bool) or not isinstance(entry[name], int):
            raise UpdateError(f"{name} must be an integer, got {entry[name]!r}")
    weight = entry["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise UpdateError(f"weight must be a finite number, got {weight!r}")
    total = entry["total"]
    if not isinstance(total, dict) or not all(isinstance(v, np.ndarray) for v in total.values()):
        raise UpdateError("total must map names to arrays")
    return entry["session"], LeafSum(entry["leaf"], entry["base_version"], entry["count"], float(weight), total)


def leaves_under(fl_ctx: FLContext, child: str) -> set[str] | None:
    """The leaf sites at or below ``child`` in the client hierarchy (whose sums it may report);
    None when the hierarchy is not known (outside a deployment)."""
    forest = fl_ctx.get_prop(FLContextKey.CLIENT_HIERARCHY)
    if not isinstance(forest, Forest):
        return None
    node = forest.nodes.get(child)
    if node is None:
        return set()
    found, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current.children:
            stack.extend(current.children)
        else:
            found.add(current.obj.name)
    return found


def acknowledged(reply: Shareable) -> set[tuple[str, int]] | None:
    """The (leaf, session) pairs a parent's reply acknowledges; None if it names none (take all)."""
    pairs = reply.get(ACKNOWLEDGED)
    if not isinstance(pairs, list):
        return None
    return {(p[0], p[1]) for p in pairs if isinstance(p, (list, tuple)) and len(p) == 2}
