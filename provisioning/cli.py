"""``fleetnest provision``: the fleet's FLARE startup kits, device identities, rotation, revocation.

fleetnest provision --fleet fleet.yaml --workspace W                  # kits in W/<project>/prod_NN
fleetnest provision --fleet fleet.yaml --workspace W device --id robot-17 --out DIR [--csr F]
fleetnest provision --fleet fleet.yaml --workspace W rotate --device robot-17 --out DIR [--revoke-previous]
fleetnest provision --fleet fleet.yaml --workspace W rotate --site eu-depot-1
fleetnest provision --fleet fleet.yaml --workspace W rotate --due-within 7 --out DIR
fleetnest provision --fleet fleet.yaml --workspace W revoke --device robot-17
fleetnest provision --fleet fleet.yaml --workspace W crl        # republish the CRL (weekly, e.g. from cron)
fleetnest provision --fleet fleet.yaml --workspace W proxy      # a new TLS certificate for the routing proxy

Leaves refuse a CRL past its next update (7 days): republish at least weekly and copy every leaf's
``local/device_ca/crl.pem`` to it, or every device of the fleet is refused. The routing proxy's
certificate (``scripts/proxy.crt``, valid 90 days, names from ``proxy.host_names``) is issued
under the device CA, which devices verify it with: renew it with ``proxy`` and restart the proxy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app_custom.durable import write_bytes_atomic

from .fleet import FleetSpecError, load_fleet_spec
from .identities import DeviceCA, IdentityError
from .project import (
    Provisioned,
    ProvisionError,
    distribute_device_ca,
    issue_proxy_certificate,
    provision,
    rotate_site,
    site_certificate,
)


def _fail(what: str, err: Exception) -> int:
    print(f"fleetnest provision {what}: {err}", file=sys.stderr)
    return 1


def _existing(args: argparse.Namespace):
    spec = load_fleet_spec(args.fleet)
    return spec, Provisioned.existing(args.workspace, spec.project)


def _write_identity(out: Path, identity) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # key first, each file atomic: a running device sees old pair, new key beside the old
    # certificate (it keeps the old pair until they match), or the new pair; never half a file
    if identity.key_pem is not None:
        write_bytes_atomic(out / "device.key", identity.key_pem, 0o600)
    write_bytes_atomic(out / "device.crt", identity.cert_pem, 0o644)


def _issue(args: argparse.Namespace, device_id: str, revoke_previous: bool) -> int:
    spec, provisioned = _existing(args)
    ca = DeviceCA(provisioned.device_ca)
    csr = Path(args.csr).read_bytes() if getattr(args, "csr", None) else None
    identity = ca.issue(device_id, spec.device_valid_days, csr, revoke_previous=revoke_previous)
    out = Path(args.out)
    _write_identity(out, identity)
    (out / "device_ca.pem").write_bytes((provisioned.device_ca / "ca.pem").read_bytes())
    if revoke_previous:
        distribute_device_ca(spec, provisioned)
    print(f"{device_id}: certificate {identity.serial} valid to {identity.not_after.isoformat()} in {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    action = getattr(args, "provision_verb", None)
    try:
        if action is None:
            spec = load_fleet_spec(args.fleet)
            done = provision(spec, args.workspace)
            print(f"startup kits in {done.kits}; provisioning state (root CA, device CA: keep offline) in {done.state}")
            scripts = done.kits / "scripts"
            print(
                f"routing proxy ({len(spec.leaves)} leaves; TLS for {', '.join(spec.proxy_hosts)}):"
                f" python -m nvflare.edge.web.routing_proxy PORT {scripts / 'lcp_map.json'} {scripts / 'rootCA.pem'}"
                f" --ssl-cert {scripts / 'proxy.crt'} --ssl-key {scripts / 'proxy.key'}"
            )
            return 0
        if action == "device":
            return _issue(args, args.id, revoke_previous=False)
        if action == "rotate":
            if args.site:
                spec = load_fleet_spec(args.fleet)
                done = rotate_site(spec, args.workspace, args.site)
                cert = site_certificate(done, args.site)
                print(
                    f"{args.site}: new certificate {cert.serial_number} in {done.kit(args.site)}; deploy it and restart"
                )
                return 0
            if args.device:
                if not args.out:
                    raise IdentityError("rotate --device needs --out")
                return _issue(args, args.device, revoke_previous=args.revoke_previous)
            if not args.out:
                raise IdentityError("rotate --due-within needs --out (a folder per device is written in it)")
            spec, provisioned = _existing(args)
            ca = DeviceCA(provisioned.device_ca)
            due = ca.due_for_renewal(args.due_within)
            for device in due:  # factory-style: new keys (devices that keep theirs send a CSR with --device)
                _write_identity(Path(args.out) / device, ca.issue(device, spec.device_valid_days))
            print(f"{len(due)} device certificates renewed in {args.out}: {due}")
            return 0
        if action == "crl":
            spec, provisioned = _existing(args)
            path = DeviceCA(provisioned.device_ca).publish_crl()
            distribute_device_ca(spec, provisioned)
            print(f"republished {path} (valid 7 days) into every leaf's local/device_ca/: copy it to running leaves")
            return 0
        if action == "proxy":
            spec, provisioned = _existing(args)
            path = issue_proxy_certificate(spec, provisioned)
            print(f"a new routing-proxy certificate for {', '.join(spec.proxy_hosts)} in {path}: restart the proxy")
            return 0
        if action == "revoke":
            spec, provisioned = _existing(args)
            ca = DeviceCA(provisioned.device_ca)
            serials = ca.revoke(args.device if args.device else args.serial)
            distribute_device_ca(spec, provisioned)
            print(f"revoked {serials}; the CRL in every leaf's local/device_ca/ is updated: copy it to running leaves")
            return 0
    except (FleetSpecError, IdentityError, ProvisionError, OSError) as err:
        return _fail(action or "fleet", err)
    raise AssertionError(action)


def add_provision_parser(verbs) -> None:
    parser = verbs.add_parser(
        "provision",
        help="FLARE startup kits for a fleet, device certificates, rotation and revocation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--fleet", required=True, help="the fleet description (YAML)")
    parser.add_argument("--workspace", required=True, help="provisioning workspace (holds the CA keys: keep it safe)")
    parser.set_defaults(run=_run)
    sub = parser.add_subparsers(dest="provision_verb")
    device = sub.add_parser("device", help="issue a device certificate under the fleet's device CA")
    device.add_argument("--id", required=True, help="the device id (its certificate's common name)")
    device.add_argument("--out", required=True, help="folder for device.crt (and device.key without --csr)")
    device.add_argument("--csr", help="the device's certificate request (PEM): its key never leaves it")
    rotate = sub.add_parser("rotate", help="renew a site's or a device's certificate")
    which = rotate.add_mutually_exclusive_group(required=True)
    which.add_argument("--site", help="a server, relay or client site: new key and certificate, same root")
    which.add_argument("--device", help="a device: a new certificate (the old one stays valid unless revoked)")
    which.add_argument("--due-within", type=int, help="every device whose certificate expires within N days")
    rotate.add_argument("--out", help="where device certificates are written")
    rotate.add_argument("--csr", help="the device's certificate request (PEM)")
    rotate.add_argument("--revoke-previous", action="store_true", help="revoke the device's earlier certificates")
    revoke = sub.add_parser("revoke", help="revoke a device's certificates and republish the CRL")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="every certificate of this device")
    target.add_argument("--serial", type=int, help="one certificate")
    sub.add_parser("crl", help="republish the device CA's revocation list (leaves refuse one older than 7 days)")
    sub.add_parser("proxy", help="a new TLS certificate for the routing proxy under the device CA")


def main(argv: list[str]) -> int:
    """``fleetnest provision ARGV`` (what follows the verb), for callers that provision in-process."""
    parser = argparse.ArgumentParser(prog="fleetnest")
    add_provision_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["provision", *argv])
    return args.run(args)
