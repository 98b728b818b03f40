#!/usr/bin/env bash
# Installs or upgrades hamal in /opt/hamal: a venv at /opt/hamal/hamal-venv with the wheel, the
# layout files, this script and uninstall_hamal.sh. Keeps /etc/hamal/hamal.conf (installs the
# reference one only when missing) and rolls back to the previous venv if the new one fails its
# check.
#
# Usage: update_sync_proxy.sh [WHEEL]      (default: the newest dist/hamal-*.whl beside this script)
# Paths can be moved for tests: HAMAL_PREFIX, HAMAL_ETC, HAMAL_LOG_DIR, HAMAL_LIB_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
prefix=${HAMAL_PREFIX:-/opt/hamal}
etc=${HAMAL_ETC:-/etc/hamal}
venv=$prefix/hamal-venv
wheel=${1:-$(ls -t "$here"/dist/hamal-*.whl 2>/dev/null | head -n1 || true)}
layout=$here/hamal-venv-layout
[ -d "$layout" ] || layout=$venv/.layout  # running the installed copy: reuse the saved layout

die() { echo "update_sync_proxy.sh: $*" >&2; exit 1; }
[ -n "$wheel" ] && [ -f "$wheel" ] || die "no wheel given and none found in $here/dist (build one with 'maturin build')"
[ -d "$layout" ] || die "layout files not found in $here/hamal-venv-layout"
python3 -c 'import venv' 2>/dev/null || die "python3 with the venv module is required"
# Work from a copy of the layout: it may live inside the venv that is about to be replaced.
staged_layout=$(mktemp -d)
trap 'rm -rf "$staged_layout"' EXIT
cp -r "$layout/." "$staged_layout/"
layout=$staged_layout

mkdir -p "$prefix" "$etc" "${HAMAL_LOG_DIR:-/var/log/hamal}" "${HAMAL_LIB_DIR:-/var/lib/hamal}"
# A venv's scripts name its own path, so the new one is built in place; the old one waits aside
# and comes back if anything below fails.
rm -rf "$venv.prev"
[ -d "$venv" ] && mv "$venv" "$venv.prev"
restore() {
    rm -rf "$venv"
    [ -d "$venv.prev" ] && mv "$venv.prev" "$venv"
    echo "update_sync_proxy.sh: failed; the previous installation is kept" >&2
}
trap restore ERR
echo "installing $(basename "$wheel") into $venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "$wheel"
cp -r "$layout/project_etc" "$layout/tools" "$layout/hamal3-changelog.txt" "$venv/"
rm -rf "$venv/.layout" && cp -r "$layout" "$venv/.layout"
"$venv/bin/python" -c 'import hamal; print(hamal.__version__)' > "$venv/version"
[ -f "$etc/hamal.conf" ] || cp "$layout/project_etc/hamal.conf" "$etc/hamal.conf"
"$venv/bin/hamal" config check "$etc/hamal.conf" >/dev/null   # the new version must accept the config
trap - ERR
for f in update_sync_proxy.sh uninstall_hamal.sh; do
    [ "$here/$f" -ef "$prefix/$f" ] || cp "$here/$f" "$prefix/$f"
done
rm -rf "$venv.prev"
echo "hamal $(cat "$venv/version") installed in $venv"
