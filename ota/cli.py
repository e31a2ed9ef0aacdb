"""``fleetnest ota``: build, sign, import and serve signed releases, roll them out ring by ring,
and on a device, check for and install one (``ota update``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _ota_build(args: argparse.Namespace) -> int:
    from app_custom.cluster.archive import ArchiveError
    from ota.release import build_release

    try:
        manifest = build_release(args.archive, args.out, args.device_class, args.version, args.max_validation_ms)
    except (ArchiveError, ValueError, OSError) as e:
        print(f"fleetnest ota build: {e}", file=sys.stderr)
        return 1
    validation = manifest["validation"]
    print(
        f"built {manifest['release']} in {args.out}: global version {manifest['global_version']}, "
        f"opset {manifest['compatibility']['opset']}, {validation['engine']} p50 {validation['p50_ms']:.2f} ms"
    )
    return 0


def _ota_fail(verb: str, error: Exception) -> int:
    print(f"fleetnest ota {verb}: {error}", file=sys.stderr)
    return 1


def _ota_keygen(args: argparse.Namespace) -> int:
    from ota.keys import KeyFileError, generate

    try:
        keys = generate(args.keys)
    except (KeyFileError, OSError) as e:
        return _ota_fail("keygen", e)
    print(f"keys in {keys.path}: move offline/ to offline storage once the repository is initialised")
    return 0


def _ota_init(args: argparse.Namespace) -> int:
    from ota.keys import KeyDir, KeyFileError
    from ota.repository import Repository, RepositoryError

    try:
        repository = Repository.create(args.repo, KeyDir(Path(args.keys)))
    except (KeyFileError, RepositoryError, OSError) as e:
        return _ota_fail("init", e)
    print(f"repository in {repository.path}; devices ship with {repository.metadata_dir / '1.root.json'}")
    return 0


def _ota_rotate(args: argparse.Namespace) -> int:
    from ota.keys import KeyDir, KeyFileError, replace_key
    from ota.repository import Repository, RepositoryError

    keys = KeyDir(Path(args.keys))
    try:
        repository = Repository(args.repo, keys)
        replace_key(keys, args.role)
        repository.rotate_key(args.role, keys.root_signers())
    except (KeyFileError, RepositoryError, OSError) as e:
        return _ota_fail("rotate", e)
    print(f"{args.role} key rotated: devices trust the new key from their next check")
    return 0


def _ota_publish(args: argparse.Namespace) -> int:
    from ota.bundle import BundleError
    from ota.keys import KeyDir, KeyFileError
    from ota.repository import Repository, RepositoryError

    try:
        release = Repository(args.repo, KeyDir(Path(args.keys))).add_release(args.bundle)
    except (BundleError, KeyFileError, RepositoryError, OSError) as e:
        return _ota_fail("publish", e)
    print(f"published {release}")
    return 0


def _tls_files(ca: str | None, cert: str | None, key: str | None, what: str):
    """``TlsFiles`` from command-line paths (None when no CA is given: plain, for development only)."""
    if ca is None:
        if cert or key:
            raise ValueError(f"{what}: a client certificate needs the CA file that checks the other side")
        return None
    from ota.tls import TlsFiles

    return TlsFiles(Path(ca), Path(cert) if cert else None, Path(key) if key else None)


def _ota_sign(args: argparse.Namespace) -> int:
    from ota.bundle import BundleError
    from ota.keys import KeyDir, KeyFileError
    from ota.rings import DEFAULT_RINGS, RingError, make_layout
    from ota.signing import SigningError, sign_targets

    try:
        layout = None
        if args.salt:
            rings = _ring_shares(args.rings) if args.rings else DEFAULT_RINGS
            layout = make_layout(args.salt, rings)
        signed = sign_targets(KeyDir(Path(args.keys)), args.targets, args.out, bundle=args.bundle, layout=layout)
    except (BundleError, KeyFileError, RingError, SigningError, ValueError, OSError) as e:
        return _ota_fail("sign", e)
    print(f"signed {signed.name} into {args.out}: carry the folder to the OTA server and run `fleetnest ota import`")
    return 0


def _ota_import(args: argparse.Namespace) -> int:
    from ota.keys import KeyDir, KeyFileError
    from ota.repository import Repository, RepositoryError

    try:
        added = Repository(args.repo, KeyDir(Path(args.keys))).import_targets(args.signed)
    except (KeyFileError, RepositoryError, OSError) as e:
        return _ota_fail("import", e)
    print(f"imported {len(added)} signed files: {', '.join(added)}")
    return 0


def _ota_broker_config(args: argparse.Namespace) -> int:
    from ota.broker_config import BrokerConfig, BrokerConfigError, BrokerFiles
    from ota.tls import ServiceCA, TlsError

    try:
        device_ca = Path(args.device_ca).resolve()
        for name in ("ca.pem", "crl.pem"):
            if not (device_ca / name).is_file():
                raise BrokerConfigError(f"{device_ca / name}: missing (the provisioning state's device_ca folder?)")
        service_ca = ServiceCA.create(args.service_ca, args.project)
        out = Path(args.out).resolve()
        server = service_ca.issue_server("broker", args.hosts.split(","), out / "tls")
        files = BrokerFiles(
            device_ca / "ca.pem", device_ca / "crl.pem", service_ca.cert_file, server.cert_file, server.key_file
        )
        config = BrokerConfig(files, args.host, args.port, args.service_host, args.service_port, args.prefix)
        conf = config.write(out)
        services = [service_ca.issue_client(name, out / "services") for name in config.default_services()]
    except (BrokerConfigError, TlsError, ValueError, OSError) as e:
        return _ota_fail("broker-config", e)
    listeners = f"devices on {args.host}:{args.port}, services on {args.service_host}:{args.service_port}"
    print(f"mosquitto -c {conf}  ({listeners})")
    for identity in services:
        print(f"service identity: {identity.cert_file} (key {identity.key_file})")
    print(f"devices check the broker with {service_ca.cert_file}")
    return 0


def _ota_service_cert(args: argparse.Namespace) -> int:
    from ota.tls import ServiceCA, TlsError

    try:
        ca = ServiceCA.create(args.service_ca, args.project)
        if args.client:
            identity = ca.issue_client(args.name, args.out)
        else:
            identity = ca.issue_server(args.name, args.hosts.split(","), args.out)
    except (TlsError, ValueError, OSError) as e:
        return _ota_fail("service-cert", e)
    print(f"{identity.cert_file} (key {identity.key_file}), issued by {ca.cert_file}")
    return 0


def _ring_shares(spec: str) -> list[tuple[str, float]]:
    return [(name, float(share)) for name, share in (item.split(":") for item in spec.split(","))]


def _ota_serve(args: argparse.Namespace) -> int:
    from ota.freshness import TimestampKeeper
    from ota.keys import KeyDir
    from ota.repository import Repository, RepositoryError
    from ota.server import RepositoryServer
    from ota.tls import TlsError

    try:
        https = None
        if args.tls_cert or args.tls_key:
            from ota.tls import TlsFiles

            key = Path(args.tls_key) if args.tls_key else None
            https = TlsFiles(Path(args.tls_ca) if args.tls_ca else None, Path(args.tls_cert or ""), key)
        server = RepositoryServer(
            args.repo,
            args.host,
            args.port,
            idle_timeout_s=args.idle_timeout_s,
            max_connections=args.max_connections,
            tls=https.server_context(require_client_cert=bool(args.tls_ca)) if https else None,
        )
        repository = Repository(args.repo, KeyDir(Path(args.keys))) if args.keys else None
        mqtt_tls = _tls_files(args.mqtt_ca, args.mqtt_cert, args.mqtt_key, "--mqtt")
    except (ValueError, RepositoryError, TlsError, OSError) as e:
        return _ota_fail("serve", e)
    keeper = TimestampKeeper(repository, args.timestamp_every_s).start() if repository is not None else None
    broker = None
    if args.mqtt and args.db and args.keys:  # the rollout server: reports in, targeting hints out
        from ota.mqtt import RolloutBroker

        try:
            controller = _controller(args)
        except (ValueError, RepositoryError, OSError) as e:
            return _ota_fail("serve", e)
        host, _, port = args.mqtt.partition(":")
        broker = RolloutBroker(
            host,
            int(port or (8884 if mqtt_tls else 1883)),
            on_report=controller.report,
            current_targeting=lambda: {r: d for r in controller.rings if (d := controller.repository.desired(r))},
            tls=mqtt_tls,
        ).start()
        controller.notify = broker.publish_desired
    print(f"serving {args.repo} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if keeper is not None:
            keeper.stop()
        if broker is not None:
            broker.stop()
    return 0


EX_TEMPFAIL = 75  # staged, the switch waits for the mission lock


def _controller(args: argparse.Namespace, notify=None):
    from ota.keys import KeyDir
    from ota.reports import Enrolment
    from ota.repository import Repository
    from ota.rollout import RolloutController

    repository = Repository(args.repo, KeyDir(Path(args.keys)))
    if repository.layout() is None:
        raise ValueError("the repository has no ring layout signed by the offline key: `fleetnest ota sign --salt`")
    enrolled = Enrolment(args.device_ca) if getattr(args, "device_ca", None) else None
    return RolloutController(args.db, repository, notify=notify, enrolled=enrolled)


def _mqtt_notify(args: argparse.Namespace):
    """A one-shot publisher of targeting hints (the serve command keeps a connection instead)."""
    if not args.mqtt:
        return None
    import paho.mqtt.client as mqtt

    tls = _tls_files(args.mqtt_ca, args.mqtt_cert, args.mqtt_key, "--mqtt")
    host, _, port = args.mqtt.partition(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    if tls is not None:
        client.tls_set_context(tls.client_context())
    client.connect(host, int(port or (8884 if tls else 1883)))
    client.loop_start()

    def notify(ring: str, desired: dict) -> None:
        import json

        client.publish(f"fleetnest/desired/{ring}", json.dumps(desired), qos=1, retain=True).wait_for_publish(10)

    return notify


def _ota_rings(args: argparse.Namespace) -> int:
    from ota.keys import KeyDir, KeyFileError
    from ota.repository import Repository, RepositoryError
    from ota.rings import DEFAULT_RINGS, RingError, make_layout

    try:
        rings = _ring_shares(args.rings) if args.rings else DEFAULT_RINGS
        Repository(args.repo, KeyDir(Path(args.keys))).set_layout(make_layout(args.salt, rings))
    except (KeyFileError, RepositoryError, RingError, ValueError, OSError) as e:
        return _ota_fail("rings", e)
    print(f"signed ring layout: {', '.join(f'{n} {s:.0%}' for n, s in rings)}")
    return 0


def _ota_rollout(args: argparse.Namespace) -> int:
    from ota.keys import KeyFileError
    from ota.repository import RepositoryError
    from ota.rollout import RolloutError, describe

    try:
        controller = _controller(args, _mqtt_notify(args))
        if args.action == "start":
            if not args.release:
                raise RolloutError("rollout start needs --release")
            print(f"rollout {controller.start(args.release)} of {args.release} started")
        elif args.action == "status":
            print(describe(controller.status()))
        elif args.action == "rollback":
            if not args.release:
                raise RolloutError("rollout rollback needs --release (an earlier release the fleet completed)")
            controller.rollback(args.release)
            print(f"fleet rolled back to {args.release}")
        else:
            getattr(controller, args.action)()
            print(f"rollout {args.action}: {controller.status()['state']}")
    except (RolloutError, RepositoryError, KeyFileError, ValueError, OSError) as e:
        return _ota_fail(f"rollout {args.action}", e)
    return 0


def _ota_update(args: argparse.Namespace) -> int:
    from ota.bundle import DeviceProfile
    from ota.client import ReleaseClient, UpdateRefused
    from ota.layout import RUNTIME_VERSION
    from ota.updater import HealthPolicy, Updater

    state = Path(args.state)
    root_file = Path(args.trusted_root) if args.trusted_root else state / "trusted_root.json"
    if not root_file.exists() and not (state / "tuf" / "root.json").exists():
        return _ota_fail(
            "update", f"no trusted root: give --trusted-root (the fleet's 1.root.json) or put it at {root_file}"
        )
    trusted = root_file.read_bytes() if root_file.exists() else b""
    fast = None
    if args.fast:
        from safetensors.numpy import load_file

        fast = load_file(args.fast)
    validation = None
    if args.validation:
        from app_custom.nested.device_data import DataError, load_labelled

        try:
            samples = load_labelled(args.validation)
        except DataError as e:
            return _ota_fail("update", e)
        validation = (samples.x, samples.y)
    try:
        client = ReleaseClient(args.repo, state, trusted)
        ring = args.ring or client.ring(args.device_id)
        profile = DeviceProfile(args.device_class, RUNTIME_VERSION, args.l4t, args.tensorrt)
        updater = Updater(state, client, profile, ring, fast, validation, HealthPolicy(args.latency_budget_ms))
        outcome = updater.run_once()
    except UpdateRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as e:
        return _ota_fail("update", e)
    line = f"{outcome.status}: {outcome.release or '-'} (ring {ring}): {outcome.reason}"
    print(line, file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if outcome.ok else EX_TEMPFAIL if outcome.status == "staged" else 1


def _mqtt_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mqtt-ca", default=None, help="the service CA that checks the broker (TLS)")
    parser.add_argument("--mqtt-cert", default=None, help="this service's client certificate")
    parser.add_argument("--mqtt-key", default=None, help="this service's client certificate's key")


def add_ota_parser(verbs) -> None:
    """The ``ota`` verb and its sub-verbs, on ``verbs`` (an ``add_subparsers`` of the ``fleetnest`` parser)."""
    ota = verbs.add_parser("ota", help="signed over-the-air releases of global versions").add_subparsers(
        dest="ota_verb", required=True
    )
    build = ota.add_parser(
        "build",
        help="build a device bundle from an archived global version",
        description="Builds a bundle (slow layers, one-file ONNX graph, golden data, manifest) from an "
        "accepted version in the cluster's archive, for one device class.",
    )
    build.add_argument("--archive", required=True, help="the server's global_versions folder")
    build.add_argument("--version", type=int, default=None, help="archived version (default: the current one)")
    build.add_argument("--device-class", required=True, help="target device class, e.g. jetson-orin-jp6")
    build.add_argument("--out", required=True, help="bundle folder to create (must not exist)")
    build.add_argument(
        "--max-validation-ms",
        type=float,
        default=100.0,
        help="refuse a candidate whose median validation inference is slower (ms, on this build host)",
    )
    build.set_defaults(run=_ota_build)
    keygen = ota.add_parser("keygen", help="generate the fleet's signing keys (offline and online roles)")
    keygen.add_argument("--keys", required=True, help="folder to create the keys in (must not hold keys)")
    keygen.set_defaults(run=_ota_keygen)
    init = ota.add_parser("init", help="create the TUF repository (root, targets, rollout, snapshot, timestamp)")
    init.add_argument("--repo", required=True, help="the repository folder to create")
    init.add_argument("--keys", required=True, help="the key folder `ota keygen` wrote")
    init.set_defaults(run=_ota_init)
    sign = ota.add_parser(
        "sign",
        help="offline: sign a release and/or the ring layout into targets metadata (only the offline targets key)",
        description="Runs on the offline machine. Signs a bundle (--bundle) and/or the ring layout (--salt, "
        "--rings) on top of the repository's current targets metadata into a new folder, which "
        "`fleetnest ota import` takes on the OTA server.",
    )
    sign.add_argument("--keys", required=True, help="key folder holding offline/targets.pem and public.json")
    sign.add_argument("--targets", required=True, help="the repository's current metadata/N.targets.json (copied)")
    sign.add_argument("--bundle", default=None, help="a bundle folder to sign as a release")
    sign.add_argument("--salt", default=None, help="sign the ring layout with this salt")
    sign.add_argument("--rings", default="", help="name:cumulative_share,... (default canary:0.05,ring-10:0.1,...)")
    sign.add_argument("--out", required=True, help="the signed folder to create")
    sign.set_defaults(run=_ota_sign)
    imp = ota.add_parser(
        "import",
        help="online: import targets metadata signed offline, then sign snapshot and timestamp (online keys only)",
    )
    imp.add_argument("--repo", required=True, help="the repository folder on the OTA server")
    imp.add_argument("--keys", required=True, help="key folder holding online/snapshot.pem, timestamp.pem")
    imp.add_argument("--signed", required=True, help="the folder `fleetnest ota sign` wrote")
    imp.set_defaults(run=_ota_import)
    broker = ota.add_parser(
        "broker-config",
        help="write the fleet's Mosquitto configuration: TLS, device certificates, topic ACLs",
    )
    broker.add_argument("--device-ca", required=True, help="the device CA folder (ca.pem, crl.pem) from provisioning")
    broker.add_argument("--service-ca", required=True, help="the service CA folder (created if missing)")
    broker.add_argument("--project", default="fleetnest", help="project name in the certificates' subjects")
    broker.add_argument("--out", required=True, help="folder for mosquitto.conf, the ACL files and certificates")
    broker.add_argument("--hosts", default="localhost,127.0.0.1", help="the broker's names for its certificate")
    broker.add_argument("--host", default="0.0.0.0", help="device listener address")
    broker.add_argument("--port", type=int, default=8883, help="device listener port")
    broker.add_argument("--service-host", default="127.0.0.1", help="service listener address")
    broker.add_argument("--service-port", type=int, default=8884, help="service listener port")
    broker.add_argument("--prefix", default="fleetnest", help="topic prefix")
    broker.set_defaults(run=_ota_broker_config)
    cert = ota.add_parser("service-cert", help="issue a TLS certificate from the service CA (OTA server, a service)")
    cert.add_argument("--service-ca", required=True, help="the service CA folder (`ota broker-config` creates it)")
    cert.add_argument("--project", default="fleetnest", help="project name in the certificate's subject")
    cert.add_argument("--name", required=True, help="common name (a service's MQTT user name with --client)")
    cert.add_argument("--hosts", default="localhost,127.0.0.1", help="server certificate: its host names")
    cert.add_argument("--client", action="store_true", help="a client certificate for the broker's service listener")
    cert.add_argument("--out", required=True, help="folder for NAME.pem and NAME.key")
    cert.set_defaults(run=_ota_service_cert)
    publish = ota.add_parser(
        "publish", help="development only: sign a bundle in place (needs the offline and the online keys together)"
    )
    publish.add_argument("--repo", required=True, help="the repository folder")
    publish.add_argument("--keys", required=True, help="the key folder with offline and online keys")
    publish.add_argument("--bundle", required=True, help="the bundle folder `ota build` wrote")
    publish.set_defaults(run=_ota_publish)
    rotate = ota.add_parser(
        "rotate", help="replace a role's key (needs the root keys, and the targets key for rollout)"
    )
    rotate.add_argument("--repo", required=True, help="the repository folder")
    rotate.add_argument("--keys", required=True, help="the key folder with the root keys (and targets for rollout)")
    rotate.add_argument(
        "--role",
        required=True,
        choices=["targets", "snapshot", "timestamp", "rollout"],
        help="the role whose key to replace",
    )
    rotate.set_defaults(run=_ota_rotate)
    serve = ota.add_parser("serve", help="serve the repository over HTTP(S) (Range requests)")
    serve.add_argument("--repo", required=True, help="the repository folder to serve")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8765, help="port to listen on")
    serve.add_argument("--keys", default=None, help="online keys: renew the timestamp while serving")
    serve.add_argument(
        "--timestamp-every-s", type=float, default=6 * 3600, help="with --keys: renew the timestamp this often (s)"
    )
    serve.add_argument("--idle-timeout-s", type=float, default=30.0, help="close a connection idle this long")
    serve.add_argument("--max-connections", type=int, default=256, help="connections served at once")
    serve.add_argument("--tls-cert", default=None, help="HTTPS: the server certificate (`ota service-cert`)")
    serve.add_argument("--tls-key", default=None, help="HTTPS: the server certificate's key")
    serve.add_argument("--tls-ca", default=None, help="HTTPS: also require client certificates from this CA")
    serve.add_argument("--db", default=None, help="rollout state (SQLite): with --mqtt, take device reports")
    serve.add_argument("--mqtt", default=None, help="host:port of the broker's service listener")
    _mqtt_tls_arguments(serve)
    serve.add_argument("--device-ca", default=None, help="count reports only from devices this device CA enrolled")
    serve.set_defaults(run=_ota_serve)
    rings = ota.add_parser(
        "rings", help="development only: sign the ring layout in place (needs the offline targets key)"
    )
    rings.add_argument("--repo", required=True, help="the repository folder")
    rings.add_argument("--keys", required=True, help="the key folder with the offline targets key")
    rings.add_argument("--salt", required=True, help="any fixed string; changing it reshuffles the rings")
    rings.add_argument("--rings", default="", help="name:cumulative_share,... (default canary:0.05,ring-10:0.1,...)")
    rings.set_defaults(run=_ota_rings)
    rollout = ota.add_parser("rollout", help="start, watch, pause, resume, abort or roll back a rollout")
    rollout.add_argument(
        "action",
        choices=["start", "status", "pause", "resume", "abort", "rollback"],
        help="start (needs --release), status, pause, resume, abort, or rollback (to --release)",
    )
    rollout.add_argument("--repo", required=True, help="the repository folder on the OTA server")
    rollout.add_argument("--keys", required=True, help="the online keys (rollout, snapshot, timestamp)")
    rollout.add_argument("--db", required=True, help="the rollout state (SQLite)")
    rollout.add_argument(
        "--release", default=None, help="start: the release to roll out; rollback: the one to return to"
    )
    rollout.add_argument("--mqtt", default=None, help="host:port of the broker to push targeting hints to")
    _mqtt_tls_arguments(rollout)
    rollout.set_defaults(run=_ota_rollout)
    update = ota.add_parser(
        "update",
        help="device side: one check-and-install cycle (exit 0 installed or up to date, 1 refused or rolled "
        "back, 75 staged while a mission runs)",
    )
    update.add_argument("--repo", required=True, help="repository URL (its metadata/ and targets/ below it)")
    update.add_argument("--state", required=True, help="state directory; the active model is STATE/current")
    update.add_argument("--device-id", required=True, help="this device's id (its ring follows from it)")
    update.add_argument("--device-class", required=True, help="this device's class, e.g. jetson-orin-jp6")
    update.add_argument(
        "--trusted-root", default=None, help="the fleet's root metadata (default STATE/trusted_root.json)"
    )
    update.add_argument("--ring", default=None, help="override the ring (default: from the signed ring layout)")
    update.add_argument("--fast", default=None, help="this device's fast layers (safetensors) to install")
    update.add_argument("--validation", default=None, help="local validation data (.npz: x.<modality>, y)")
    update.add_argument("--l4t", type=int, default=None, help="L4T major release of this device")
    update.add_argument("--tensorrt", default=None, help="TensorRT version on this device (none: onnxruntime)")
    update.add_argument(
        "--latency-budget-ms", type=float, default=30.0, help="health check: batch-1 p99 latency must stay under it"
    )
    update.set_defaults(run=_ota_update)
