#!/usr/bin/env bash
# Install or upgrade the edgefleet agent as a systemd service on a Raspberry Pi (Raspberry Pi OS /
# Debian 12 or later). Safe to run again: every step checks first and only does what is missing, and
# a re-run upgrades the package and restarts a running agent.
#
#   sudo deploy/install-agent.sh [--dry-run] [--no-start] [--example FILE] [SOURCE]
#
# SOURCE    what to install, never a name looked up on a package index (edgefleet is on none, and a
#           name there could be anyone's): a wheel file built by `make wheel`
#           (./dist/edgefleet-0.1.0-py3-none-any.whl) or an edgefleet source checkout (a folder with
#           pyproject.toml). Default: the checkout this script is in. '[agent]' is added for you; the
#           agent's dependencies (onnxruntime, LiteRT, ...) come from the package index as usual.
# --example the agent.toml to copy to /etc/edgefleet/agent.toml when that file does not exist yet
#           (default: agent.example.toml next to this script). An existing agent.toml is never touched.
# --no-start  enable the service but neither start nor restart it (edit agent.toml, then start it).
# --dry-run print the commands that would change the system, change nothing (no root needed).
#
# Environment: PYTHON (default python3) is the interpreter the venv is made from.
# See docs/install-pi.md for what each step does and how to do it by hand.

set -euo pipefail

readonly SERVICE=edgefleet-agent
readonly SVC_USER=edgefleet
readonly PREFIX=/opt/edgefleet
readonly VENV=$PREFIX/venv
readonly CONFIG_DIR=/etc/edgefleet
readonly CONFIG=$CONFIG_DIR/agent.toml
readonly UNIT_DEST=/etc/systemd/system/$SERVICE.service
# Device groups the agent joins when they exist: cameras (video), Coral PCIe Edge TPU (apex),
# Coral USB Accelerator (plugdev, from libedgetpu's udev rule), GPU render nodes (render, Jetson).
readonly DEVICE_GROUPS=(video apex plugdev render)

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly UNIT_SRC=$SCRIPT_DIR/systemd/$SERVICE.service
PYTHON=${PYTHON:-python3}

DRY_RUN=0
START=1
EXAMPLE=$SCRIPT_DIR/agent.example.toml
PACKAGE=

usage() { sed -n '2,19s/^# \{0,1\}//p' "$0"; }
die() { printf 'install-agent: error: %s\n' "$*" >&2; exit 1; }
warn() { printf 'install-agent: warning: %s\n' "$*" >&2; }
step() { printf '\n==> %s\n' "$*"; }
# Every command that changes the system goes through run: printed, and executed unless --dry-run.
run() {
    local cmd
    cmd=$(printf '%q ' "$@")
    printf '+ %s\n' "${cmd% }"
    if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --no-start) START=0 ;;
        --example) [[ $# -ge 2 ]] || die "--example needs a file"; EXAMPLE=$2; shift ;;
        --example=*) EXAMPLE=${1#--example=} ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $PACKAGE ]] || die "only one SOURCE, got '$PACKAGE' and '$1'"; PACKAGE=$1 ;;
    esac
    shift
done

# The pip requirement: a local wheel or source folder (default: this checkout) with the agent extra.
# A bare name would be resolved on the public index, where edgefleet is not published: refused.
if [[ -z $PACKAGE ]]; then
    [[ -f $SCRIPT_DIR/../pyproject.toml ]] \
        || die "no SOURCE given and $SCRIPT_DIR/.. is not an edgefleet checkout: give a wheel (make wheel) or a checkout"
    PACKAGE=$SCRIPT_DIR/..
fi
extras=agent
if [[ $PACKAGE =~ ^(.*)\[([A-Za-z0-9_,-]+)\]$ ]]; then
    PACKAGE=${BASH_REMATCH[1]}
    extras=${BASH_REMATCH[2]}
fi
if [[ ! -e $PACKAGE ]]; then
    die "SOURCE must be a wheel file or a source checkout; '$PACKAGE' does not exist (edgefleet is not on any" \
        "package index: build a wheel with 'make wheel' and pass dist/edgefleet-VERSION-py3-none-any.whl)"
fi
PACKAGE=$(realpath -- "$PACKAGE")
if [[ -d $PACKAGE ]]; then
    [[ -f $PACKAGE/pyproject.toml ]] || die "$PACKAGE is a folder without pyproject.toml: not an edgefleet checkout"
else
    [[ $(basename -- "$PACKAGE") == edgefleet-*.whl ]] \
        || die "$PACKAGE is not an edgefleet wheel (expected edgefleet-VERSION-py3-none-any.whl from 'make wheel')"
fi
SOURCE=$PACKAGE
PACKAGE="$PACKAGE[$extras]"

# --- Checks before changing anything -----------------------------------------------------------
[[ $DRY_RUN -eq 1 || $EUID -eq 0 ]] || die "run as root (sudo $0 ...), or with --dry-run"
[[ -f $UNIT_SRC ]] || die "unit file not found: $UNIT_SRC (run the script from the edgefleet source tree)"
if [[ ! -e $CONFIG && ! -f $EXAMPLE ]]; then
    die "$CONFIG does not exist and there is no example config to copy: $EXAMPLE (give one with --example FILE)"
fi
[[ -f /etc/debian_version ]] || warn "not a Debian-based system: continuing, but only Raspberry Pi OS/Debian is tested"
if [[ $DRY_RUN -eq 0 ]]; then
    command -v systemctl >/dev/null || die "systemctl not found: this script installs a systemd service"
    [[ -d /run/systemd/system ]] || die "systemd is not running as the init system (/run/systemd/system is missing)"
fi
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (apt-get install python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "edgefleet needs Python 3.11 or later; $PYTHON is $("$PYTHON" -V 2>&1) (Raspberry Pi OS 12 'bookworm' has 3.11;" \
        "on JetPack 6 / Ubuntu 22.04 install python3.11 and run with PYTHON=python3.11: see docs/install-pi.md)"

if [[ $DRY_RUN -eq 1 ]]; then
    echo "install-agent: dry run: printing the commands that would change the system; nothing is changed"
fi

# --- 1. Python venv support (Debian splits it out) ---------------------------------------------
step "Python venv support"
if "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "ok: $PYTHON has venv and ensurepip"
else
    pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    run apt-get update
    run apt-get install -y --no-install-recommends "python$pyver-venv"
fi

# --- 2. System user and group ------------------------------------------------------------------
step "system user '$SVC_USER'"
if getent group "$SVC_USER" >/dev/null; then
    echo "ok: group $SVC_USER exists"
else
    run groupadd --system "$SVC_USER"
fi
if getent passwd "$SVC_USER" >/dev/null; then
    echo "ok: user $SVC_USER exists"
else
    # Home is the state directory systemd creates (StateDirectory=); no login shell.
    run useradd --system --gid "$SVC_USER" --home-dir "/var/lib/$SVC_USER" --no-create-home \
        --shell /usr/sbin/nologin --comment "edgefleet agent" "$SVC_USER"
fi
for group in "${DEVICE_GROUPS[@]}"; do
    if ! getent group "$group" >/dev/null; then
        echo "skip: no group $group on this system"
    elif id -nG "$SVC_USER" 2>/dev/null | tr ' ' '\n' | grep -qx -- "$group"; then
        echo "ok: $SVC_USER is in group $group"
    else
        run usermod --append --groups "$group" "$SVC_USER"
    fi
done

# --- 3. The virtual environment and the package --------------------------------------------------
step "virtual environment $VENV with $PACKAGE"
if [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c '' 2>/dev/null; then
    echo "ok: $VENV exists"
else
    # Missing, or broken (e.g. its Python was removed by an OS upgrade): (re)create it.
    run install -d -m 0755 -o root -g root "$PREFIX"
    run "$PYTHON" -m venv --clear "$VENV"
fi
run "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# --upgrade: a re-run brings the dependencies up to date; pip also compiles the .pyc files the
# service, whose venv is read-only, cannot write.
run "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade "$PACKAGE"
# pip keeps an installed edgefleet of the same version, so a rebuilt wheel or an edited checkout would
# be ignored: reinstall edgefleet itself (only it) from SOURCE.
run "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps --force-reinstall "$SOURCE"
run "$VENV/bin/edgefleet" --version

# --- 4. Configuration ----------------------------------------------------------------------------
step "configuration $CONFIG"
run install -d -m 0755 -o root -g root "$CONFIG_DIR"
if [[ -e $CONFIG ]]; then
    echo "ok: $CONFIG exists, left as it is"
else
    # Readable by the agent, writable by root only: it may hold credentials.
    run install -m 0640 -o root -g "$SVC_USER" "$EXAMPLE" "$CONFIG"
    echo "note: edit $CONFIG (fleet server address, device name) before relying on the agent"
fi

# --- 5. The systemd unit -------------------------------------------------------------------------
step "systemd unit $UNIT_DEST"
if [[ -f $UNIT_DEST ]] && cmp -s "$UNIT_SRC" "$UNIT_DEST"; then
    echo "ok: $UNIT_DEST is up to date"
else
    run install -m 0644 -o root -g root "$UNIT_SRC" "$UNIT_DEST"
fi
if command -v systemd-analyze >/dev/null; then
    run systemd-analyze verify "$UNIT_DEST"
fi
if [[ -r /sys/fs/cgroup/cgroup.controllers ]] && ! grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
    warn "the memory cgroup controller is off, so MemoryMax= is not enforced: add 'cgroup_enable=memory'" \
        "to /boot/firmware/cmdline.txt and reboot (see docs/install-pi.md)"
fi

# --- 6. Enable and start ---------------------------------------------------------------------------
step "service $SERVICE"
was_active=0
if [[ $DRY_RUN -eq 0 ]] && systemctl is-active --quiet "$SERVICE"; then
    was_active=1
fi
run systemctl daemon-reload
if [[ $START -eq 1 ]]; then
    run systemctl enable --now "$SERVICE" \
        || die "$SERVICE did not start; see 'journalctl -u $SERVICE -n 50' (fix $CONFIG, then 'systemctl restart $SERVICE')"
    # enable --now leaves a running agent alone: restart it so an upgrade takes effect.
    if [[ $was_active -eq 1 ]]; then
        run systemctl restart "$SERVICE" || die "$SERVICE did not restart; see 'journalctl -u $SERVICE -n 50'"
    fi
    echo
    echo "done: follow the agent with 'journalctl -u $SERVICE -f'; 'systemctl status $SERVICE' shows its status"
else
    run systemctl enable "$SERVICE"
    echo
    echo "done: enabled, not started; edit $CONFIG, then 'systemctl start $SERVICE'"
fi
[[ $DRY_RUN -eq 0 ]] || echo "(dry run: nothing was changed)"
