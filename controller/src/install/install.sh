#!/bin/sh
# modi: install and enrol this host's agent. Served by the modi controller
# at @CONTROLLER@ (version @VERSION@) for one join token; run it as root:
#
#   curl -fsS --pinnedpubkey '@PIN@' -k @CONTROLLER@/install/TOKEN | sh
#   ... | sh -s -- --name NAME --label key=value     (join options)
#
# It checks everything it needs first, then downloads modi-agent from the
# controller, verifies its SHA-256, joins (once), installs a systemd unit
# (or, without systemd, runs the agent under a plain supervisor loop),
# starts it and prints what it did. Every step is safe to run again: a
# second run changes nothing, and a run that stopped halfway (even after
# the join) is finished by running the same line again.
set -eu

CONTROLLER=@CONTROLLER_Q@
TOKEN=@TOKEN_Q@
CA_SHA256=@CA_SHA256_Q@
PIN=@PIN_Q@
AGENT_SHA256=@AGENT_SHA256_Q@
VERSION=@VERSION_Q@

# MODI_INSTALL_ROOT installs under another root (an image being built, a
# test); empty means this host.
ROOT=${MODI_INSTALL_ROOT:-}
BIN_DIR=$ROOT/usr/local/bin
BIN=$BIN_DIR/modi-agent
DATA=$ROOT/var/lib/modi-agent
UNIT_DIR=$ROOT/etc/systemd/system
UNIT=$UNIT_DIR/modi-agent.service
SUPERVISE=$DATA/supervise.sh
SUPERVISE_PID=$DATA/supervise.pid
LOG=$DATA/agent.log

did=""
say() { printf 'modi install: %s\n' "$*"; }
done_() { say "$*"; did="$did
  - $*"; }
fail() {
    printf 'modi install: error: %s\n' "$*" >&2
    exit 1
}

# ---- prerequisites: nothing is changed until all of them hold --------------

if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    fail "run as root (the agent manages this host): ... | sudo sh"
fi
[ "$(uname -s)" = Linux ] || fail "modi-agent runs on Linux; this is $(uname -s)"
case "$(uname -m)" in
    x86_64 | amd64) ;;
    *) fail "this controller serves modi-agent for x86_64; this host is $(uname -m)" ;;
esac
command -v curl >/dev/null 2>&1 || fail "curl is needed"
if command -v sha256sum >/dev/null 2>&1; then
    sha256() { sha256sum "$1" | cut -d' ' -f1; }
elif command -v shasum >/dev/null 2>&1; then
    sha256() { shasum -a 256 "$1" | cut -d' ' -f1; }
elif command -v openssl >/dev/null 2>&1; then
    sha256() { openssl dgst -sha256 -r "$1" | cut -d' ' -f1; }
else
    fail "one of sha256sum, shasum or openssl is needed to verify the download"
fi
if [ -d "$ROOT/run/systemd/system" ]; then
    INIT=systemd
    command -v systemctl >/dev/null 2>&1 || fail "systemd runs here but systemctl is not on PATH"
else
    INIT=supervisor
fi
dirs="$BIN_DIR $DATA"
[ "$INIT" = systemd ] && dirs="$dirs $UNIT_DIR"
for dir in $dirs; do
    mkdir -p "$dir" 2>/dev/null || fail "cannot create $dir"
    probe="$dir/.modi-install-probe.$$"
    (: >"$probe") 2>/dev/null || fail "cannot write to $dir"
    rm -f "$probe"
done
chmod 0700 "$DATA"
say "prerequisites hold: $( [ -z "$ROOT" ] && echo root || echo "root dir $ROOT"), $(uname -m), $INIT, $BIN_DIR and $DATA writable"

# ---- the binary -------------------------------------------------------------

bin_changed=no
if [ -x "$BIN" ] && [ "$(sha256 "$BIN")" = "$AGENT_SHA256" ]; then
    say "modi-agent $VERSION is already at $BIN (SHA-256 matches)"
else
    tmp="$BIN_DIR/.modi-agent.download.$$"
    trap 'rm -f "$tmp"' EXIT
    curl -fsS --retry 3 --pinnedpubkey "$PIN" -k -o "$tmp" "$CONTROLLER/install/modi-agent" ||
        fail "cannot download modi-agent from $CONTROLLER"
    got=$(sha256 "$tmp")
    [ "$got" = "$AGENT_SHA256" ] ||
        fail "the download's SHA-256 is $got, expected $AGENT_SHA256: nothing installed"
    chmod 0755 "$tmp"
    mv -f "$tmp" "$BIN"
    trap - EXIT
    bin_changed=yes
    done_ "installed modi-agent $VERSION at $BIN (SHA-256 $AGENT_SHA256 verified)"
fi

# ---- enrolment --------------------------------------------------------------

if [ -f "$DATA/agent.toml" ]; then
    say "already enrolled ($DATA/agent.toml): not joining again"
else
    "$BIN" join --controller "$CONTROLLER" --token "$TOKEN" --ca-sha256 "$CA_SHA256" \
        --data "$DATA" "$@" ||
        fail "the join failed (see above); fix that and run the same line again: it finishes the job"
    done_ "enrolled with $CONTROLLER (CA SHA-256 $CA_SHA256)"
fi
NAME=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$DATA/agent.toml")

# ---- the service ------------------------------------------------------------

if [ "$INIT" = systemd ]; then
    unit_new="$UNIT.modi-new.$$"
    cat >"$unit_new" <<UNIT
@UNIT@
UNIT
    if [ -f "$UNIT" ] && cmp -s "$unit_new" "$UNIT"; then
        rm -f "$unit_new"
        unit_changed=no
    else
        mv -f "$unit_new" "$UNIT"
        systemctl daemon-reload || fail "systemctl daemon-reload failed; run this line again once systemd works"
        unit_changed=yes
        done_ "wrote the systemd unit $UNIT"
    fi
    systemctl enable --quiet modi-agent || fail "systemctl enable modi-agent failed; run this line again"
    if systemctl is-active --quiet modi-agent; then
        if [ "$bin_changed" = yes ] || [ "$unit_changed" = yes ]; then
            systemctl restart modi-agent || fail "systemctl restart modi-agent failed; run this line again"
            done_ "restarted modi-agent (systemd)"
        else
            say "modi-agent is running (systemd)"
        fi
    else
        systemctl start modi-agent || fail "systemctl start modi-agent failed; run this line again"
        done_ "started modi-agent with systemd (enabled at boot)"
    fi
    how="systemd: systemctl status modi-agent; journalctl -u modi-agent"
else
    sup_new="$SUPERVISE.modi-new.$$"
    cat >"$sup_new" <<SUPERVISE
#!/bin/sh
# Keeps modi-agent running on a host without systemd; written by the modi
# install script. Exit 77 (refused) and 78 (not enrolled) are not restarted.
trap 'kill -TERM "\$child" 2>/dev/null; wait "\$child"; exit 0' TERM INT
while :; do
    "$BIN" run --config "$DATA/agent.toml" &
    child=\$!
    wait "\$child" && code=0 || code=\$?
    case \$code in
        77 | 78) echo "modi-agent exited \$code: not restarting"; exit "\$code" ;;
    esac
    sleep 2
done
SUPERVISE
    chmod 0755 "$sup_new"
    sup_changed=yes
    if [ -f "$SUPERVISE" ] && cmp -s "$sup_new" "$SUPERVISE"; then
        rm -f "$sup_new"
        sup_changed=no
    else
        mv -f "$sup_new" "$SUPERVISE"
    fi
    running=no
    if [ -f "$SUPERVISE_PID" ] && kill -0 "$(cat "$SUPERVISE_PID")" 2>/dev/null; then
        running=yes
        if [ "$bin_changed" = yes ] || [ "$sup_changed" = yes ]; then
            kill -TERM "$(cat "$SUPERVISE_PID")" 2>/dev/null || true
            sleep 1
            running=no
        fi
    fi
    if [ "$running" = yes ]; then
        say "modi-agent is running under its supervisor loop (PID $(cat "$SUPERVISE_PID"))"
    else
        if command -v setsid >/dev/null 2>&1; then
            nohup setsid "$SUPERVISE" >>"$LOG" 2>&1 </dev/null &
        else
            nohup "$SUPERVISE" >>"$LOG" 2>&1 </dev/null &
        fi
        echo $! >"$SUPERVISE_PID"
        done_ "no systemd on this host: started modi-agent under a plain supervisor loop ($SUPERVISE, PID $!, log $LOG); it is NOT started at boot: have your init run $SUPERVISE"
    fi
    how="supervisor loop: $SUPERVISE (PID file $SUPERVISE_PID, log $LOG)"
fi

if [ -z "$did" ]; then
    say "nothing to do: modi-agent $VERSION is installed, enrolled as $NAME and running ($how)"
else
    say "done: modi-agent $VERSION enrolled as $NAME with $CONTROLLER, running under $how. What changed:$did"
fi
