"""Builds the flat nested FLARE job (FedJob API) from JSON-serialisable settings.

``jobs/nested_fedavg/job.py`` and ``fleetnest simulate`` both build their jobs here, so the
exported job folder, the simulator runs and the baselines all share one definition.
"""

from __future__ import annotations

from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType

from app_custom.flare.fast_layer_guard import FastLayerGuard
from app_custom.flare.learner_executor import TRAIN_TASK, VALIDATE_TASK, NestedLearnerExecutor
from app_custom.flare.nested_controller import NestedFedAvg
from app_custom.flare.outbound_audit import OutboundAudit
from app_custom.flare.private_controller import PrivateNestedFedAvg
from app_custom.flare.private_learner_executor import SECAGG_TASKS, PrivateLearnerExecutor


def sorted_task_lists(node):
    """FLARE writes filter chains' task lists from a set; sorted, exported configs are stable."""
    if isinstance(node, dict):
        return {k: sorted(v) if k == "tasks" else sorted_task_lists(v) for k, v in node.items()}
    if isinstance(node, list):
        return [sorted_task_lists(v) for v in node]
    return node


def build_nested_job(
    name: str,
    config: dict,
    data: dict,
    num_rounds: int,
    min_clients: int,
    server: dict | None = None,
    guard: bool = True,
    executor: NestedLearnerExecutor | None = None,
    privacy: dict | None = None,
) -> FedJob:
    """A flat job: ``NestedFedAvg`` on the server; on every client the learner, then the outbound
    chain ``FastLayerGuard`` -> ``OutboundAudit`` on every task result. With ``privacy``
    (``PrivacySettings`` as a mapping) the server is ``PrivateNestedFedAvg`` and the devices
    ``PrivateLearnerExecutor``: DP-noised deltas, securely aggregated.

    ``guard=False`` and a custom ``executor`` exist for the privacy tests, which must see a leak
    get through when the guard is missing.
    """
    job = FedJob(name=name, min_clients=min_clients)
    common = dict(config=config, data=data, num_rounds=num_rounds, min_clients=min_clients, **(server or {}))
    controller = PrivateNestedFedAvg(privacy=privacy, **common) if privacy else NestedFedAvg(**common)
    job.to_server(controller, id="nested_controller")
    tasks = [TRAIN_TASK, VALIDATE_TASK] + (list(SECAGG_TASKS) if privacy else [])
    if executor is None:
        executor = (
            PrivateLearnerExecutor(config=config, data=data, privacy=privacy)
            if privacy
            else NestedLearnerExecutor(config=config, data=data)
        )
    learner = executor
    job.to_clients(learner, id="learner", tasks=tasks)
    # Name the tasks: FLARE 2.9 keys job filter chains by literal task name, so the Job API's
    # default tasks=["*"] matches no task and the filters would silently never run.
    if guard:
        job.to_clients(FastLayerGuard(config=config), filter_type=FilterType.TASK_RESULT, tasks=tasks)
    job.to_clients(OutboundAudit(), filter_type=FilterType.TASK_RESULT, tasks=tasks)
    return job


def build_fleet_job(
    name: str,
    config: dict,
    data: dict,
    privacy: dict,
    assessor: dict | None = None,
    leaf: dict | None = None,
    num_rounds: int = 10,
    update_interval: float = 1.0,
) -> FedJob:
    """The hierarchical job: ``ScatterAndGatherForEdge`` with ``NestedFleetAssessor`` on the server;
    on every client (cluster tier and leaves alike) ``EdgeTaskReceiver`` and ``NestedFleetExecutor``.
    ``assessor`` and ``leaf`` are extra keyword arguments of those two; ``mode`` goes to both.
    A leaf is found by devices through the job's name (``edge_method`` marks it as an edge job)."""
    from nvflare.apis.app_validation import AppValidationKey
    from nvflare.edge.controllers.sage import ScatterAndGatherForEdge
    from nvflare.edge.widgets.etr import EdgeTaskReceiver

    from app_custom.flare.fleet_assessor import NestedFleetAssessor
    from app_custom.flare.fleet_executor import NestedFleetExecutor

    assessor, leaf = dict(assessor or {}), dict(leaf or {})
    mode = assessor.get("mode", leaf.get("mode", "async"))
    assessor["mode"] = leaf["mode"] = mode
    # SAGE sends one task per round: sync mode one per version, async mode one per few versions
    # (the assessor ends the workflow itself; this only has to be large enough)
    assessor.setdefault("max_rounds", num_rounds)
    if "cohort_size" in leaf:
        # the leaves' registered cohort size: a leaf sum that counts more devices is refused
        assessor.setdefault("max_cohort", leaf["cohort_size"])
    rounds = assessor["max_rounds"]
    job = FedJob(name=name, min_clients=1, meta_props={"edge_method": "fleetnest", AppValidationKey.BYOC: True})
    job.to_server(NestedFleetAssessor(config=config, data=data, privacy=privacy, **assessor), id="wf_assessor")
    job.to_server(
        ScatterAndGatherForEdge(
            num_rounds=rounds, assessor_id="wf_assessor", update_interval=update_interval, assess_interval=0.5
        ),
        id="sage",
    )
    job.to_clients(EdgeTaskReceiver(), id="edge_task_receiver")
    job.to_clients(NestedFleetExecutor(privacy=privacy, **leaf), id="executor", tasks=["train"])
    return job
