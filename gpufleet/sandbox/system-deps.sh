#!/bin/sh
# What `make demo` and `make test` need from the machine itself, checked before anything is
# done: Python 3.11+ with venv, a Docker engine, debootstrap, GnuPG, the OpenSSH client, a
# static busybox, the CA bundle and Prometheus (promtool). On Debian or Ubuntu, as root, what
# is missing is installed with apt-get; otherwise the one line that installs it is printed and
# nothing is changed.
set -u

python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null 2>&1; then
    echo "system-deps: no $python; install Python 3.11 or newer: apt-get install -y python3" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "system-deps: $("$python" --version 2>&1) is older than 3.11, which gpufleet needs" >&2
    exit 1
fi

missing=
need() { # need PACKAGE TEST...: PACKAGE is missing unless the test command succeeds
    package=$1
    shift
    "$@" >/dev/null 2>&1 || missing="$missing $package"
}
need python3-venv "$python" -c 'import ensurepip, venv'
need docker.io sh -c 'command -v docker && command -v dockerd'
need debootstrap command -v debootstrap
# debootstrap checks bookworm's Release signature with it (Ubuntu lacks it by default)
need debian-archive-keyring test -s /usr/share/keyrings/debian-archive-keyring.gpg
need gnupg command -v gpg
need openssh-client sh -c 'command -v ssh && command -v ssh-keygen'
# the probe image is a static busybox: Debian's plain busybox package links against libc
need busybox-static sh -c '[ -x /bin/busybox ] && ! head -c 4096 /bin/busybox | grep -q ld-linux'
need ca-certificates test -s /etc/ssl/certs/ca-certificates.crt
# the monitoring tests run promtool and a real Prometheus on loopback (its service is not
# started: there is no systemd here, and the tests start and stop their own)
need prometheus command -v promtool

[ -n "$missing" ] || exit 0
line="apt-get install -y --no-install-recommends$missing"
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing:$missing. Install them, as root: $line" >&2
    exit 1
fi
echo "system-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; } \
    >/tmp/gpufleet-system-deps.log 2>&1; then
    echo "system-deps: apt-get failed (log: /tmp/gpufleet-system-deps.log); try: $line" >&2
    exit 1
fi
# Debian starts a packaged service where systemd runs: the tests start their own Prometheus
case " $missing " in *" prometheus "*)
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
esac
