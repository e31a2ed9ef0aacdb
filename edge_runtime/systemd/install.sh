#!/usr/bin/env bash
# Install the fleetnest edge daemon on a Jetson (JetPack 6: Ubuntu 22.04, Python 3.10). Run as root
# from a checkout: edge_runtime/systemd/install.sh [--config FILE]
# The virtual environment sees the system's site packages: JetPack's TensorRT bindings come from apt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
prefix=/opt/fleetnest
config="${2:-$here/edge.yaml.example}"
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

id fleetnest >/dev/null 2>&1 || useradd --system --home-dir /var/lib/fleetnest --shell /usr/sbin/nologin fleetnest
for group in video render; do getent group "$group" >/dev/null && usermod -aG "$group" fleetnest; done

python3 -m venv --system-site-packages "$prefix/venv"
"$prefix/venv/bin/pip" install --quiet "$repo"
ln -sf "$prefix/venv/bin/fleetnest" /usr/local/bin/fleetnest

install -d -m 0755 /etc/fleetnest
[ -e /etc/fleetnest/edge.yaml ] || install -m 0644 "$config" /etc/fleetnest/edge.yaml
install -m 0644 "$here/fleetnest-edge.service" /etc/systemd/system/fleetnest-edge.service
systemd-analyze verify /etc/systemd/system/fleetnest-edge.service
systemctl daemon-reload
systemctl enable --now fleetnest-edge.service
systemctl --no-pager status fleetnest-edge.service || true
