"""The privacy command-line options that ``fleetnest simulate`` and ``jobs/nested_private/job.py`` share."""

from __future__ import annotations

import argparse

from app_custom.privacy.private_update import DEFAULT_RING_BITS

DEFAULT_CLIP_NORM = 8.0
DEFAULT_DELTA = 1e-5


def add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("privacy (DP-noised, securely aggregated slow deltas)")
    group.add_argument("--secure-agg", action="store_true", help="securely aggregate the slow deltas")
    noise = group.add_mutually_exclusive_group()
    noise.add_argument(
        "--dp-epsilon", type=float, default=None, help="target epsilon per device after all rounds (inf: no noise)"
    )
    noise.add_argument("--noise-multiplier", type=float, default=None, help="noise std on the sum / clip norm")
    group.add_argument("--dp-delta", type=float, default=DEFAULT_DELTA, help="the δ of the (ε, δ) guarantee")
    group.add_argument("--clip-norm", type=float, default=DEFAULT_CLIP_NORM, help="L2 bound of each slow delta")
    group.add_argument("--epsilon-budget", type=float, default=None, help="per device; a device past it sends nothing")
    group.add_argument(
        "--dp-mode",
        choices=["distributed", "local"],
        default=None,
        help="distributed (each device adds its share; needs --secure-agg) or local (the default without it)",
    )
    group.add_argument(
        "--fleet-size",
        type=int,
        default=None,
        help="devices the cohort comes from (reported; epsilon takes no credit for it: cohorts are not sampled)",
    )
    group.add_argument("--ring-bits", type=int, default=DEFAULT_RING_BITS, help="wire bits per masked value")
    group.add_argument("--neighbours", type=int, default=None, help="SecAgg+ graph degree (default: complete graph)")


def privacy_of(
    args: argparse.Namespace, devices: int, rounds: int, always: bool = False, default_noise: float = 0.0
) -> dict | None:
    """``PrivacySettings`` as a mapping from the options; None when no privacy option is set (and
    not ``always``). Without --dp-epsilon or --noise-multiplier the noise is ``default_noise``."""
    if not (always or args.secure_agg or args.dp_epsilon is not None or args.noise_multiplier is not None):
        return None
    secure = args.secure_agg or always
    fleet = args.fleet_size or devices
    if args.dp_epsilon is not None:
        from app_custom.privacy.dp import noise_for_epsilon

        noise = noise_for_epsilon(args.dp_epsilon, args.dp_delta, rounds)  # every device, every round
    else:
        noise = default_noise if args.noise_multiplier is None else args.noise_multiplier
    mode = args.dp_mode or ("distributed" if secure else "local")
    return {
        "dp": {
            "clip_norm": args.clip_norm,
            "noise_multiplier": noise,
            "delta": args.dp_delta,
            "fleet_size": fleet,
            "cohort_size": devices,
            "mode": mode,
            "epsilon_budget": args.epsilon_budget,
        },
        "secure_aggregation": secure,
        "ring_bits": args.ring_bits,
        "neighbours": args.neighbours,
        # the report's accuracies: each device's on its own data, OUTSIDE the DP guarantee (simulation)
        "device_metrics": True,
    }
