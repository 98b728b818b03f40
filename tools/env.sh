# Shared by tools/*: a project venv with the build tools, and installs only what is missing.
# Sourced, not run.

HAMAL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HAMAL_VENV:-$HAMAL_ROOT/.venv}
PY=$VENV/bin/python

say() { printf '\n== %s\n' "$*" >&2; }

# apt_need CMD PACKAGE...: installs the packages when CMD is not on PATH.
apt_need() {
    local cmd=$1; shift
    command -v "$cmd" >/dev/null 2>&1 && return 0
    say "installing $* (for $cmd)"
    apt_install "$@"
}

apt_install() {
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    [ -n "${HAMAL_APT_UPDATED:-}" ] || { $sudo apt-get update -qq; HAMAL_APT_UPDATED=1; }
    $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The Rust toolchain and a C compiler must exist; Python gets a venv with maturin.
need_build_tools() {
    command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
    apt_need cc gcc libc6-dev
    if [ ! -x "$PY" ]; then
        say "creating $VENV"
        python3 -m venv "$VENV" 2>/dev/null || { apt_need false python3-venv; python3 -m venv "$VENV"; }
    fi
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "maturin>=1.7,<2" "ziglang>=0.11" "$@"   # zig links the wheel for old glibc
}

# Builds the release wheel into dist/: linked by zig against glibc 2.28 (manylinux_2_28), so it
# installs on Ubuntu 20.04 and Debian bullseye hosts as well as in the bookworm image; stripped.
# Always built this way, so a second build (tools/release after tools/test) reuses the first.
build_wheel() {
    rm -rf "$HAMAL_ROOT/dist"
    (cd "$HAMAL_ROOT" && PATH="$VENV/bin:$PATH" "$VENV/bin/maturin" build --release --zig \
        --compatibility manylinux_2_28 --strip -q -o "$HAMAL_ROOT/dist")
}

# Builds the wheel and installs it, as an operator would.
install_wheel() {
    say "building and installing the wheel"
    build_wheel
    "$PY" -m pip install -q --force-reinstall "$HAMAL_ROOT"/dist/hamal-*.whl
}

# QEMU's system emulator for the QMP tests, unpacked under .cache/: installing Debian's package
# would replace the newer qemu-utils this machine has. Its libraries come from apt as usual.
need_qemu_system() {
    local dir="$HAMAL_ROOT/.cache/qemu-system"
    export HAMAL_QEMU_SYSTEM="$dir"
    [ -x "$dir/usr/bin/qemu-system-x86_64" ] && return 0
    say "unpacking qemu-system-x86 into $dir"
    apt_install libbrlapi0.8 libcacard0 libcapstone4 libepoxy0 \
        libfdt1 liborc-0.4-0 libgstreamer-plugins-base1.0-0 libopus0 libslirp0 libsndio7.0 \
        libspice-server1 libusb-1.0-0 libusbredirparser1 libvdeplug2
    local tmp; tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq qemu-system-x86 qemu-system-common 2>/dev/null)
    mkdir -p "$dir"
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$dir"; done
    rm -rf "$tmp"
}

# Keystone, Cinder (api, scheduler, volume) and RabbitMQ from Debian, for the OpenStack tests,
# which run their own instances. Their packages would start system services: a policy-rc.d that
# refuses keeps them stopped while they install (and is removed after, if it was ours).
need_openstack() {
    command -v cinder-volume >/dev/null && command -v keystone-manage >/dev/null \
        && command -v rabbitmq-server >/dev/null && return 0
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    local ours=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
        $sudo chmod 755 /usr/sbin/policy-rc.d
        ours=1
    fi
    say "installing keystone, cinder and rabbitmq-server (for the OpenStack tests)"
    apt_install keystone cinder-api cinder-scheduler cinder-volume rabbitmq-server
    [ -z "$ours" ] || $sudo rm -f /usr/sbin/policy-rc.d
}
