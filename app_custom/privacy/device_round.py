"""One device's part in one secure-aggregation session, from its trained slow delta to the four
(five when authenticated) messages it sends. The flat job's executor and the hierarchy's device both run it.

``begin`` checks the session's description (the device is a member; the cohort is large enough
for the noise share the device adds; the session is authenticated exactly when the device has a
certificate and the fleet's device CA, ``trust``, so an aggregator cannot talk a device into a
session where peers' keys go unchecked), clips, noises, rotates and quantizes the delta
(``prepare_update``) and opens the protocol session. ``answer`` handles the later stages:
sealed shares for the roster, the masked vector for the shares routed to this device (the
privacy budget is charged first, through ``charge``, so a crash after sending cannot
under-count), its signature of the survivor set (authenticated sessions), and the unmask
shares. With a ``path`` the round is saved after every step (owner-only: it holds secret
seeds), so a device whose process restarts mid-round carries on; ``load`` returns None for no
saved round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .private_update import PrivacySettings, prepare_update, session_params
from .secagg import (
    ADVERTISE,
    CONSISTENCY,
    MASK,
    SHARE,
    UNMASK,
    KeyAdvert,
    PeerTrust,
    ProtocolError,
    Roster,
    SecAggDevice,
    SecAggParams,
    SharesFor,
    UnmaskRequest,
)
from .session_store import discard_session, load_session, save_session
from .wire import decode_message


class DeviceRound:
    def __init__(self, spec: dict, session: SecAggDevice, levels: np.ndarray | None) -> None:
        self.spec, self.session, self.levels = spec, session, levels

    @classmethod
    def begin(
        cls,
        me: str,
        spec: Mapping,
        delta: Mapping[str, np.ndarray],
        settings: PrivacySettings,
        rng: np.random.Generator,
        samples: int | None = None,
        min_cohort: int = 1,
        trust: PeerTrust | None = None,
    ) -> tuple[DeviceRound, float]:
        """The round, and the delta's norm before clipping (it stays on the device)."""
        shapes = {name: tuple(np.shape(value)) for name, value in delta.items()}
        params = cls.check(me, spec, shapes, settings, min_cohort, trust)
        cohort = spec["cohort"]
        levels, norm = prepare_update(delta, shapes, settings, len(cohort), rng, params.context, samples)
        return cls(dict(spec), _device(me, params, trust), levels), norm

    @staticmethod
    def check(
        me: str,
        spec: Mapping,
        shapes: Mapping[str, tuple[int, ...]],
        settings: PrivacySettings,
        min_cohort: int = 1,
        trust: PeerTrust | None = None,
    ) -> SecAggParams:
        """The session's parameters, or why this device takes no part (before it spends time training)."""
        params = session_params(settings, spec, settings.update_length(shapes))
        if trust is not None and not params.authenticated:
            raise ProtocolError(
                "aggregator", ADVERTISE, "an unauthenticated session: this device joins only sessions where peers sign"
            )
        if trust is None and params.authenticated:
            raise ProtocolError(
                "aggregator", ADVERTISE, "an authenticated session needs a device certificate and the fleet's CA"
            )
        cohort = spec["cohort"]
        if me not in cohort:
            raise ProtocolError("aggregator", ADVERTISE, f"{me} is not in the round's cohort")
        if len(cohort) < min_cohort:
            # this device's noise share is sized for a sum of at least that many devices
            raise ProtocolError(
                "aggregator", ADVERTISE, f"a cohort of {len(cohort)} cannot hide it (needs {min_cohort})"
            )
        return params

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def round(self) -> object:
        return self.spec.get("round")

    def advert(self) -> KeyAdvert:
        return self.session.advertise()

    def answer(self, stage: str, raw: bytes, charge: Callable[[], None]) -> object:
        """The message for ``stage`` (``share``, ``mask``, ``consistency`` or ``unmask``) given the
        aggregator's ``raw`` one."""
        if stage == SHARE:
            return self.session.share_keys(decode_message(raw, Roster))
        if stage == MASK:
            mine = decode_message(raw, dict).get(self.id)
            if not isinstance(mine, SharesFor):
                raise ProtocolError("aggregator", MASK, f"no shares routed to {self.id}")
            charge()
            message = self.session.masked_input(mine, self.levels)
            self.levels = None
            return message
        if stage == CONSISTENCY:
            return self.session.sign_survivors(decode_message(raw, UnmaskRequest))
        if stage == UNMASK:
            return self.session.unmask(decode_message(raw, UnmaskRequest))
        raise ProtocolError("aggregator", stage, f"unknown stage {stage!r}")

    # ---- on disk ------------------------------------------------------------------------------
    def save(self, path: Path | None) -> None:
        if path is not None:
            save_session(path, self.spec, self.session, self.levels)

    @staticmethod
    def discard(path: Path | None) -> None:
        if path is not None:
            discard_session(path)

    @classmethod
    def load(cls, path: Path | None, settings: PrivacySettings, trust: PeerTrust | None = None) -> DeviceRound | None:
        if path is None or not path.exists():
            return None
        spec, session, levels = load_session(
            path,
            lambda spec, length: session_params(settings, spec, length),
            *((trust.signer, trust.authority) if trust else ()),
        )
        return cls(spec, session, levels)


def _device(me: str, params: SecAggParams, trust: PeerTrust | None) -> SecAggDevice:
    return SecAggDevice(me, params, *((trust.signer, trust.authority) if trust else ()))
