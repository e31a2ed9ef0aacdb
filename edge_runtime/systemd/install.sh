#!/usr/bin/env bash
# Install the fleetnest edge daemon on a Jetson (JetPack 6: Ubuntu 22.04, Python 3.10). Run as root
# from a checkout: edge_runtime/systemd/install.sh [--config FILE] [--allow ADDRESS|CIDR]...
# The virtual environment sees the system's site packages: JetPack's TensorRT bindings come from apt.
# The unit allows no IP address but localhost; the drop-ins in fleetnest-edge.service.d add what
# /etc/fleetnest/edge.yaml names (resolved now) and load the device key as a credential. After
# editing edge.yaml, or when a server's address changes, rerun the edge_runtime.unit line below
# and systemctl daemon-reload && systemctl restart fleetnest-edge.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
prefix=/opt/fleetnest
drop_ins=/etc/systemd/system/fleetnest-edge.service.d
config="$here/edge.yaml.example"
allow=()
while [ $# -gt 0 ]; do
    case "$1" in
        --config) config="$2"; shift 2 ;;
        --allow) allow+=(--allow "$2"); shift 2 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

id fleetnest >/dev/null 2>&1 || useradd --system --home-dir /var/lib/fleetnest --shell /usr/sbin/nologin fleetnest
for group in video render; do getent group "$group" >/dev/null && usermod -aG "$group" fleetnest; done

python3 -m venv --system-site-packages "$prefix/venv"
# the device install (no nvflare); torch and TensorRT come from JetPack (system site packages)
"$prefix/venv/bin/pip" install --quiet "$repo[jetson]"
ln -sf "$prefix/venv/bin/fleetnest" /usr/local/bin/fleetnest

install -d -m 0755 /etc/fleetnest
[ -e /etc/fleetnest/edge.yaml ] || install -m 0644 "$config" /etc/fleetnest/edge.yaml
install -m 0644 "$here/fleetnest-edge.service" /etc/systemd/system/fleetnest-edge.service
"$prefix/venv/bin/python" -m edge_runtime.unit --config /etc/fleetnest/edge.yaml --out "$drop_ins" "${allow[@]}"
# verify exits 0 with a warning for an unknown key: any output fails the install
out="$(systemd-analyze verify /etc/systemd/system/fleetnest-edge.service 2>&1)"
[ -z "$out" ] || { echo "$out" >&2; echo "install.sh: the unit does not verify cleanly" >&2; exit 1; }
systemctl daemon-reload
systemctl enable --now fleetnest-edge.service
systemctl --no-pager status fleetnest-edge.service || true
