#!/usr/bin/env bash
# Installs or upgrades hamal in /opt/hamal, never leaving the host without a working release.
#
# Each release is a venv of its own under /opt/hamal/releases/<version>-<time>, built in place
# and marked complete only once it is checked (imports, `hamal config check` of the live
# hamal.conf, the state database migrated on a copy). /opt/hamal/hamal-venv is a symlink to the
# current release, switched with one rename; hamal-venv.prev names the one before. The state
# database is backed up before the switch. When a docker-compose file is installed and Docker is
# here, the service is restarted and must report healthy in time, else the previous release and
# the database backup come back and the service is restarted on them.
#
# Killed at any step, the host keeps its working release; the next run removes what was left
# half-built and goes on.
#
# With an image (HAMAL_IMAGE, or the tag in image-tag beside this script), releases are built
# with the image's Python inside a container, so the venv is true inside the service container,
# and docker-compose-hamal.yaml is installed from the layout with the image and paths filled in.
#
# Usage: update_sync_proxy.sh [WHEEL]     install or upgrade (default: the hamal-*.whl of the
#                                         bundle beside this script, else the newest in dist/;
#                                         a wheelhouse/ beside the wheel is used offline, and
#                                         hamal-base.tar is loaded when the image is missing)
#        update_sync_proxy.sh --rollback  return to the previous release
# Paths can be moved for tests: HAMAL_PREFIX, HAMAL_ETC, HAMAL_LOG_DIR, HAMAL_LIB_DIR;
# HAMAL_HEALTH_TIMEOUT (seconds, default 120), HAMAL_COMPOSE_PROJECT (default hamal).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=${HAMAL_PREFIX:-/opt/hamal}
etc=${HAMAL_ETC:-/etc/hamal}
lib=${HAMAL_LIB_DIR:-/var/lib/hamal}
log=${HAMAL_LOG_DIR:-/var/log/hamal}
image=${HAMAL_IMAGE:-}
[ -n "$image" ] || [ ! -f "$here/image-tag" ] || image=$(cat "$here/image-tag")
releases=$prefix/releases
current=$prefix/hamal-venv
compose=$prefix/docker-compose-hamal.yaml

die() { echo "update_sync_proxy.sh: $*" >&2; exit 1; }
say() { echo "update_sync_proxy.sh: $*"; }
# A test hook: stop dead (as a SIGKILL would) at the named step.
step() { [ "${HAMAL_UPDATE_KILL_AT:-}" != "$1" ] || kill -9 $$; }

# Points `link` at `target` (a release folder name) with one rename, so it is never missing.
switch() {
    local link=$1 target=$2
    ln -sfn "releases/$target" "$link.switching"
    mv -T "$link.switching" "$link"
}

# The release a link points at (empty when it does not exist).
release_of() {
    local target
    target=$(readlink "$1" 2>/dev/null) || return 0
    echo "${target#releases/}"
}

repair() {
    mkdir -p "$releases"
    rm -f "$current.switching" "$current.prev.switching"
    for r in "$releases"/*/; do
        r=${r%/}
        [ -d "$r" ] && [ ! -f "$r/.complete" ] && { say "removing the half-built release $(basename "$r")"; rm -rf "$r"; }
    done
    if [ -d "$current" ] && [ ! -L "$current" ]; then
        # A venv from before releases existed: its scripts name this path, so it stays a plain
        # folder until the first switch replaces it.
        return 0
    fi
    if [ ! -e "$current" ]; then
        local newest; newest=$(ls -t "$releases" 2>/dev/null | head -n1 || true)
        [ -n "$newest" ] && { say "hamal-venv was missing: pointing it at $newest"; switch "$current" "$newest"; }
    fi
    return 0
}

# Runs a command with the Python the service will run: inside the image when there is one.
run() {
    if [ -n "$image" ]; then
        docker run --rm --network host -v "$prefix:$prefix" -v "$etc:$etc" -v "$lib:$lib" \
            -v "$wheel_dir:$wheel_dir:ro" -e HAMAL_CONF="$etc/hamal.conf" "$image" "$@"
    else
        "$@"
    fi
}

healthy() {
    [ -f "$compose" ] && command -v docker-compose >/dev/null 2>&1 || return 0  # no service here
    docker-compose -f "$compose" up -d --force-recreate >/dev/null 2>&1
    local deadline=$((SECONDS + ${HAMAL_HEALTH_TIMEOUT:-120}))
    while [ $SECONDS -lt $deadline ]; do
        docker-compose -f "$compose" ps | grep -q "(healthy)" && return 0
        sleep 2
    done
    return 1
}

rollback() {
    local prev; prev=$(release_of "$current.prev")
    [ -n "$prev" ] && [ -f "$releases/$prev/.complete" ] || die "no previous release to return to"
    local now; now=$(release_of "$current")
    switch "$current" "$prev"
    [ -n "$now" ] && switch "$current.prev" "$now"
    healthy || die "returned to $prev, but the service is not healthy: see docker-compose logs"
    say "returned to $(cat "$current/version")"
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    -*) [ "$1" = "--rollback" ] || { usage >&2; die "unknown option '$1': nothing was changed"; } ;;
esac
[ $# -le 1 ] || { usage >&2; die "one wheel or --rollback at most: nothing was changed"; }

repair
if [ "${1:-}" = "--rollback" ]; then
    rollback
    exit 0
fi

wheel=${1:-$(ls -t "$here"/hamal-*.whl "$here"/dist/hamal-*.whl 2>/dev/null | head -n1 || true)}
layout=$here/hamal-venv-layout
[ -d "$layout" ] || layout=$current/.layout   # running the installed copy: reuse the saved layout
[ -n "$wheel" ] && [ -f "$wheel" ] || die "no wheel given and none found in $here/dist (build one with 'maturin build')"
[ -d "$layout" ] || die "layout files not found in $here/hamal-venv-layout"
wheel=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")
wheel_dir=$(dirname "$wheel")
if [ -n "$image" ]; then
    if ! docker image inspect "$image" >/dev/null 2>&1 && [ -f "$here/hamal-base.tar" ]; then
        say "loading the image $image"
        docker load -q -i "$here/hamal-base.tar" >/dev/null
    fi
    docker image inspect "$image" >/dev/null 2>&1 || die "image $image not found (load it with docker load, or build it with tools/build-image)"
else
    python3 -c 'import venv' 2>/dev/null || die "python3 with the venv module is required"
fi
mkdir -p "$etc" "$log" "$lib"

# 1. Build and check the new release beside the current one.
name=$(basename "$wheel" | cut -d- -f2)-$(date +%Y%m%d%H%M%S)-$$
new=$releases/$name
say "building release $name"
run python3 -m venv "$new"
step venv
pip_from=()
[ -d "$wheel_dir/wheelhouse" ] && pip_from=(--no-index --find-links "$wheel_dir/wheelhouse")
run "$new/bin/pip" install -q "${pip_from[@]}" "$wheel"
step pip
cp -r "$layout/project_etc" "$layout/tools" "$layout/hamal3-changelog.txt" "$new/"
cp -r "$layout" "$new/.layout"
run "$new/bin/python" -c 'import hamal; print(hamal.__version__)' > "$new/version"
[ -f "$etc/hamal.conf" ] || cp "$layout/project_etc/hamal.conf" "$etc/hamal.conf"
fail() { rm -rf "$new"; die "$1; the current release is kept"; }
run "$new/bin/hamal" config check "$etc/hamal.conf" >/dev/null || fail "the new release refuses $etc/hamal.conf"
db=$lib/hamal.db
if [ -f "$db" ]; then
    trial=$lib/.migration-trial-$name
    mkdir -p "$trial" && cp "$db" "$trial/hamal.db"
    run "$new/bin/python" -c 'import sys; from hamal.service.state import State; State(sys.argv[1]).close()' \
        "$trial/hamal.db" || { rm -rf "$trial"; fail "the new release cannot migrate the state database"; }
    rm -rf "$trial"
fi
touch "$new/.complete"
step checked
# A test hook: a release that passes its checks but never becomes healthy.
[ -z "${HAMAL_UPDATE_BREAK_SERVICE:-}" ] || rm -f "$new/bin/hamal-period"

# 2. Back up the state, switch, restart and wait for health; undo it all if unhealthy.
[ -f "$db" ] && cp "$db" "$db.before-$name"
step backup
old=$(release_of "$current")
if [ -d "$current" ] && [ ! -L "$current" ]; then
    mv "$current" "$prefix/hamal-venv.legacy"   # a pre-release install, kept aside
    old=""
fi
switch "$current" "$name"
[ -n "$old" ] && switch "$current.prev" "$old"
step switched
if [ -n "$image" ]; then
    sed -e "s|@IMAGE@|$image|g" -e "s|@PREFIX@|$prefix|g" -e "s|@ETC@|$etc|g" -e "s|@LOG@|$log|g" \
        -e "s|@LIB@|$lib|g" "$layout/docker-compose-hamal.yaml" > "$compose.new"
    mv "$compose.new" "$compose"
    echo "COMPOSE_PROJECT_NAME=${HAMAL_COMPOSE_PROJECT:-hamal}" > "$prefix/.env"
fi
if ! healthy; then
    if [ -n "$old" ]; then
        switch "$current" "$old"
        [ -f "$db.before-$name" ] && cp "$db.before-$name" "$db"
        healthy || true
        die "release $name did not become healthy in time: returned to $old and its database"
    fi
    die "release $name did not become healthy in time, and there is no previous release"
fi
for f in update_sync_proxy.sh uninstall_hamal.sh; do
    [ "$here/$f" -ef "$prefix/$f" ] || cp "$here/$f" "$prefix/$f"
done
# Keep the current and the previous release.
keep_prev=$(release_of "$current.prev")
for r in "$releases"/*; do
    b=$(basename "$r")
    [ "$b" = "$name" ] || [ "$b" = "$keep_prev" ] || rm -rf "$r"
done
rm -rf "$prefix/hamal-venv.legacy"
say "hamal $(cat "$current/version") installed in $current -> releases/$name"
