#!/bin/sh
# Installs modi-agent on this host and enrols it.
#
#   sudo ./install-agent.sh /path/to/modi-agent -- \
#       --controller https://modi.example.com:7443 --token mt_... --ca-sha256 ...
#
# Everything after `--` is passed to `modi-agent join` (add --name and
# --label k=v as you like). Re-running on an enrolled host does nothing.
set -eu

if [ "$#" -lt 2 ] || [ "$2" != "--" ]; then
    echo "usage: $0 PATH/TO/modi-agent -- JOIN-ARGUMENTS..." >&2
    exit 2
fi
binary=$1
shift 2
here=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" -ne 0 ]; then
    echo "$0: run as root (the agent manages this host)" >&2
    exit 2
fi

install -m 0755 "$binary" /usr/local/bin/modi-agent
if [ -e /var/lib/modi-agent/agent.toml ]; then
    echo "already enrolled (/var/lib/modi-agent/agent.toml exists); not joining again"
else
    /usr/local/bin/modi-agent join --data /var/lib/modi-agent "$@"
fi
install -m 0644 "$here/systemd/modi-agent.service" /etc/systemd/system/modi-agent.service
systemctl daemon-reload
systemctl enable --now modi-agent
systemctl --no-pager status modi-agent || true
