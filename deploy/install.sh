#!/usr/bin/env bash
# Installs Cohort on this host: binaries in /usr/bin, systemd units, a default
# config in /etc/cohort (kept if present), the system users `cohort` (the
# controller runs as it) and `cohort-rank` (the agent's default rank-user).
#   deploy/install.sh [BIN_DIR]     (default: target/release)
# It prints the next steps (cluster CA, join token, enabling the units).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-$here/../target/release}"
for b in cohort-controller cohort-agent cohort; do
    [ -x "$bin/$b" ] || { echo "install: $bin/$b missing; run cargo build --release" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "install: run as root" >&2; exit 1; }
id cohort >/dev/null 2>&1 || useradd --system --home-dir /var/lib/cohort --shell /usr/sbin/nologin cohort
# Ranks get a user of their own, not the controller's: a rank must not read the cluster CA key.
id cohort-rank >/dev/null 2>&1 ||
    useradd --system --create-home --home-dir /var/lib/cohort-rank --shell /usr/sbin/nologin cohort-rank
install -m 0755 "$bin/cohort-controller" "$bin/cohort-agent" "$bin/cohort" /usr/bin/
install -m 0644 "$here/systemd/cohort-controller.service" "$here/systemd/cohort-agent.service" /etc/systemd/system/
install -d -m 0755 /etc/cohort
# agent.toml may hold a join token: root only (the agent runs as root).
[ -e /etc/cohort/controller.toml ] || install -m 0644 "$here/config/controller.toml" /etc/cohort/controller.toml
[ -e /etc/cohort/agent.toml ] || install -m 0600 "$here/config/agent.toml" /etc/cohort/agent.toml
systemctl daemon-reload 2>/dev/null || true
cat <<'NEXT'
installed. Next:
  controller hosts: install -d -o cohort -g cohort -m 0750 /var/lib/cohort
                    sudo -u cohort cohort-controller init --data-dir /var/lib/cohort --san <this host's names>
                    systemctl enable --now cohort-controller
  GPU nodes:        copy the controller's /var/lib/cohort/tls/ca.crt to /etc/cohort/ca.crt; set
                    controller, ca-cert, join-token and advertise-addr in /etc/cohort/agent.toml
                    systemctl enable --now cohort-agent
NEXT
