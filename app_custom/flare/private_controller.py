"""The flat nested workflow with DP and secure aggregation: the server is the aggregator.

One round is four FLARE tasks, one per protocol stage: ``train`` (devices train and answer with
their key adverts), ``secagg_share`` (the roster out, sealed shares back), ``secagg_mask`` (the
routed shares out, masked vectors back), ``secagg_unmask`` (survivors and dropped out, shares
back). The ``SecAggAggregator`` holds only masked vectors and releases only their sum; its mean
goes through the same server optimiser, validation gate and archive as the plain job. A round
whose sum cannot be recovered (too few survivors or shares) is logged as aborted and leaves the
current version in place. The sender of every message is FLARE's authenticated client name,
never a field of the message; a message that fails to decode is rejected and attributed to it.
"""

from __future__ import annotations

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from app_custom.flare.learner_executor import TRAIN_TASK
from app_custom.flare.nested_controller import NestedFedAvg
from app_custom.flare.private_learner_executor import (
    MASK_TASK,
    SECAGG_KEY,
    SHARE_TASK,
    UNMASK_TASK,
    as_message_array,
    message_bytes,
    secagg_params,
)
from app_custom.privacy.dp import ACCOUNTING
from app_custom.privacy.private_update import PrivacySettings, SumPastBound, bounded_cohort_sum
from app_custom.privacy.secagg import (
    ADVERTISE,
    MASK,
    SHARE,
    UNMASK,
    KeyAdvert,
    MaskedInput,
    Rejection,
    SecAggAbort,
    SecAggAggregator,
    ShareBundle,
    UnmaskShares,
)
from app_custom.privacy.wire import WireError, decode_message

COHORT_ID = "flat"


class PrivateNestedFedAvg(NestedFedAvg):
    def __init__(
        self,
        config: dict,
        data: dict,
        privacy: dict,
        num_rounds: int = 5,
        min_clients: int = 2,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        max_acc_drop: float = 0.05,
        max_loss_rise: float = 0.25,
        archive_dir: str = "global_versions",
        final_validation: bool = True,
        task_timeout: int = 0,
        stage_wait: int = 120,
    ) -> None:
        """Args: as ``NestedFedAvg``, plus
        privacy: the same ``PrivacySettings`` mapping the devices use;
        stage_wait: seconds a protocol stage waits for stragglers once enough devices answered
            (those that answer later drop out of the round; their masks are recovered).
        """
        super().__init__(
            config,
            data,
            num_rounds,
            min_clients,
            server_lr,
            server_momentum,
            max_acc_drop,
            max_loss_rise,
            archive_dir,
            final_validation,
            task_timeout,
        )
        if isinstance(stage_wait, bool) or not isinstance(stage_wait, int) or stage_wait < 0:
            raise ValueError(f"stage_wait must be a non-negative integer, got {stage_wait!r}")
        self.privacy = privacy
        self.settings = PrivacySettings.from_dict(privacy)
        self.stage_wait = stage_wait

    def run(self) -> None:
        dp = self.settings.dp
        self.info(
            f"privacy: {self.settings.mechanism}, noise multiplier {dp.noise_multiplier} on the sum of"
            f" {dp.contributors_assumed if dp.mode == 'distributed' else 1} devices' shares, delta {dp.delta};"
            f" {ACCOUNTING}"
        )
        super().run()

    def _collect_round(self, round_: int, current: dict, version: int, expected: dict) -> dict:
        if not self.settings.secure_aggregation:
            return self._collect_local_dp(round_, current, version, expected)
        cohort = sorted(client.name for client in self.engine.get_clients())
        spec = {"job_id": self.fl_ctx.get_job_id(), "round": round_, "cohort_id": COHORT_ID, "cohort": cohort}
        params, _ = secagg_params(self.settings, spec, self.settings.update_length(expected))
        aggregator = SecAggAggregator(params, cohort)
        self._min_survivors = params.min_survivors
        model = self._global_model(current, version, round_)
        model.meta["secagg"] = spec
        results = self.send_model_and_wait(
            task_name=TRAIN_TASK, data=model, min_responses=self.min_clients, timeout=self.task_timeout
        )
        devices, skipped = {}, {}
        for device, result in self._by_device(results):
            devices[device] = dict(result.metrics or {})
            reason = (result.meta or {}).get("dp_skip_reason")
            if reason:
                skipped[device] = reason
                continue
            self._feed(aggregator, device, result, KeyAdvert, ADVERTISE, aggregator.add_advert)
        log = {"devices": devices, "dp_skipped": skipped, "dp": self._mechanism()}
        try:
            roster = aggregator.roster()
            for device, result in self._stage(SHARE_TASK, roster, list(roster.adverts)):
                self._feed(aggregator, device, result, ShareBundle, SHARE, aggregator.add_shares)
            routed = aggregator.route_shares()
            for device, result in self._stage(MASK_TASK, routed, list(routed)):
                devices.setdefault(device, {}).update(result.metrics or {})
                self._feed(aggregator, device, result, MaskedInput, MASK, aggregator.add_masked)
            request = aggregator.unmask_request()
            for device, result in self._stage(UNMASK_TASK, request, list(request.survivors)):
                self._feed(aggregator, device, result, UnmaskShares, UNMASK, aggregator.add_unmask)
            outcome = aggregator.result()
        except SecAggAbort as err:
            self.warning(f"round {round_}: secure aggregation aborted, nothing released: {err}")
            return log | {"secagg": {"aborted": str(err), "rejections": self._rejections(aggregator.rejections)}}
        for rejection in outcome.rejections:
            self.warning(f"round {round_}: {rejection.stage} message from {rejection.sender}: {rejection.reason}")
        survivors = list(outcome.survivors)
        try:
            summed, weight = bounded_cohort_sum(
                outcome.total, len(survivors), expected, self.settings, params.context, len(cohort)
            )
        except SumPastBound as err:
            self.warning(f"round {round_}: {err}")
            return log | {"secagg": {"aborted": str(err), "rejections": self._rejections(outcome.rejections)}}
        mean = {name: value / weight for name, value in summed.items()}
        rejection = self.aggregator.add_cohort_mean(survivors, mean, expected)
        if rejection:
            self.warning(f"round {round_}: secure sum rejected: {rejection.reason}")
        secagg = {
            "survivors": survivors,
            "dropped": list(outcome.dropped),
            "rejections": self._rejections(outcome.rejections),
            "ring_bits": params.ring.bits,
            "values": params.length,
        }
        return log | {"secagg": secagg}

    def _collect_local_dp(self, round_: int, current: dict, version: int, expected: dict) -> dict:
        """Without secure aggregation each device sends its fully noised delta; every device weighs 1."""
        results = self.send_model_and_wait(
            task_name=TRAIN_TASK,
            data=self._global_model(current, version, round_),
            min_responses=self.min_clients,
            timeout=self.task_timeout,
        )
        devices, skipped = {}, {}
        for device, result in self._by_device(results):
            devices[device] = dict(result.metrics or {})
            if (result.meta or {}).get("dp_skip_reason"):
                skipped[device] = result.meta["dp_skip_reason"]
                continue
            if result.params_type != ParamsType.DIFF:
                self.aggregator.reject(device, f"params_type must be DIFF, got {result.params_type}")
                continue
            rejection = self.aggregator.add(device, result.params or {}, 1.0, expected)
            if rejection:
                self.warning(f"round {round_}: rejected update from {device}: {rejection.reason}")
        return {"devices": devices, "dp_skipped": skipped, "dp": self._mechanism()}

    def _mechanism(self) -> dict:
        """What the devices' epsilon stands for, in every round's entry of the log."""
        return {
            "mechanism": self.settings.mechanism,
            "accounting": ACCOUNTING,
            "noise_multiplier": self.settings.dp.noise_multiplier,
            # the flat job's clients have no device certificates: an honest-but-curious server only
            "secure_aggregation": "honest-but-curious aggregator" if self.settings.secure_aggregation else None,
        }

    # ---- plumbing -------------------------------------------------------------------------------
    @staticmethod
    def _by_device(results: list[FLModel]) -> list[tuple[str, FLModel]]:
        return sorted((((r.meta or {}).get("client_name", "?"), r) for r in results), key=lambda pair: pair[0])

    def _stage(self, task: str, message: object, targets: list[str]) -> list[tuple[str, FLModel]]:
        # every target is waited for (up to stage_wait past the minimum); one that fails or is
        # late drops out of the round instead of stopping the job
        results = self.broadcast_model(
            data=FLModel(params_type=ParamsType.FULL, params={SECAGG_KEY: as_message_array(message)}),
            task_name=task,
            targets=targets,
            min_responses=min(self._min_survivors, len(targets)),
            timeout=self.task_timeout,
            wait_time_after_min_received=self.stage_wait,
        )
        return self._by_device(results)

    @staticmethod
    def _feed(aggregator: SecAggAggregator, device: str, result: FLModel, kind: type, stage: str, add) -> None:
        try:
            message = decode_message(message_bytes(result.params), kind)
        except WireError as err:
            aggregator.rejections.append(Rejection(device, stage, str(err)))
            return
        add(device, message)

    @staticmethod
    def _rejections(rejections) -> list[dict]:
        return [{"sender": r.sender, "stage": r.stage, "reason": r.reason} for r in rejections]
