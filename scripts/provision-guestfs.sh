#!/usr/bin/env bash
# Install rescue with its libguestfs backend (XFS, btrfs, ...) on Debian/Ubuntu.
#
# The Vagrant VM runs this as its provisioner; on your own Linux machine run it
# as root from a clone:   sudo scripts/provision-guestfs.sh
# Idempotent: running it again only updates rescue.
#
#   --repo DIR             the rescue checkout to install (default: this script's repo)
#   --venv DIR             where the venv goes (default /opt/rescue)
#   --editable             pip install -e (the VM does this so host edits show up)
#   --no-appliance-check   skip libguestfs-test-tool (slow without KVM: ~20 s-2 min)
#   --no-link              do not put `rescue` on the PATH (/usr/local/bin/rescue)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV=/opt/rescue
EDITABLE=""
APPLIANCE_CHECK=1
LINK=1
while [ $# -gt 0 ]; do
  case "$1" in
    --repo) REPO="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --editable) EDITABLE="-e"; shift ;;
    --no-appliance-check) APPLIANCE_CHECK=0; shift ;;
    --no-link) LINK=0; shift ;;
    *) echo "provision-guestfs.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "provision-guestfs.sh: run as root (it installs packages)" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive

step() { echo "==> $*"; }

step "installing libguestfs and its Python bindings"
apt-get update -qq
# libguestfs-tools pulls the appliance (supermin, qemu); python3-guestfs is the
# binding rescue imports; python3-venv for the venv below.
apt-get install -y -qq --no-install-recommends \
  libguestfs-tools python3-guestfs python3-venv python3-pip >/dev/null

# supermin builds the appliance from the host's kernel: there must be one in
# /boot (containers and minimal clouds have none), readable by the user who
# runs rescue (Ubuntu makes it 0600).
if ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
  step "installing a kernel for the libguestfs appliance"
  apt-get install -y -qq --no-install-recommends "linux-image-$(dpkg --print-architecture)" >/dev/null
fi
chmod 0644 /boot/vmlinuz-* || true

step "installing rescue from $REPO into $VENV"
# The system python3: python3-guestfs is compiled for it. --system-site-packages
# lets the venv see /usr/lib/python3/dist-packages/guestfs.py.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip >/dev/null
"$VENV/bin/pip" install -q $EDITABLE "$REPO"
if [ "$LINK" = 1 ]; then
  ln -sf "$VENV/bin/rescue" /usr/local/bin/rescue
fi

step "checking"
"$VENV/bin/python" -c 'import guestfs; print("libguestfs Python bindings:", guestfs.__file__)'
"$VENV/bin/python" -c 'from rescue.fs.guestfs import import_guestfs; import_guestfs()'
"$VENV/bin/rescue" --help >/dev/null
echo "rescue: $VENV/bin/rescue"

if [ "$APPLIANCE_CHECK" = 1 ]; then
  step "starting the libguestfs appliance once (builds its cache)"
  if [ -z "${LIBGUESTFS_BACKEND_SETTINGS:-}" ] && ! [ -w /dev/kvm ]; then
    export LIBGUESTFS_BACKEND_SETTINGS=force_tcg   # no KVM in this VM: emulate
  fi
  export LIBGUESTFS_BACKEND="${LIBGUESTFS_BACKEND:-direct}"
  LOG=/tmp/libguestfs-test-tool.log
  if ! libguestfs-test-tool >"$LOG" 2>&1; then
    # KVM present but broken (nested virtualisation): rescue falls back to TCG itself
    echo "(with KVM it failed; trying TCG)"
    if ! LIBGUESTFS_BACKEND_SETTINGS=force_tcg libguestfs-test-tool >"$LOG" 2>&1; then
      echo "libguestfs-test-tool failed; see $LOG" >&2
      exit 1
    fi
  fi
  echo "libguestfs appliance: OK"
fi

FIXTURE="$REPO/fixtures/sample-vps.disk"
if [ -f "$FIXTURE" ]; then
  step "rescue inspect of the sample snapshot"
  "$VENV/bin/rescue" inspect "$FIXTURE" >/dev/null && echo "rescue inspect: OK"
fi
step "done: rescue --help"
