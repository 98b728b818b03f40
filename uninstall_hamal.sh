#!/usr/bin/env bash
# Removes hamal from /opt/hamal: its releases, scripts, compose file, and the service's container
# and image. Keeps /etc/hamal (config), /var/lib/hamal (state) and /var/log/hamal.
#
# Usage: uninstall_hamal.sh            remove the program, keep config, state and logs
#        uninstall_hamal.sh --purge    also remove hamal.conf, the logs and what hamal keeps in
#                                      /var/lib/hamal (its database and their backups, journals,
#                                      locks, local version records, KVM state); chunk stores,
#                                      images, key files and anything else hamal did not create
#                                      are kept, and named
#        uninstall_hamal.sh --help     this text
# Paths can be moved for tests: HAMAL_PREFIX, HAMAL_ETC, HAMAL_LOG_DIR, HAMAL_LIB_DIR.
set -euo pipefail
prefix=${HAMAL_PREFIX:-/opt/hamal}
etc=${HAMAL_ETC:-/etc/hamal}
lib=${HAMAL_LIB_DIR:-/var/lib/hamal}
log=${HAMAL_LOG_DIR:-/var/log/hamal}
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
case "$#:${1:-}" in
    0:) purge=no ;;
    1:--purge) purge=yes ;;
    1:-h | 1:--help) usage; exit 0 ;;
    *) usage >&2; echo "uninstall_hamal.sh: unexpected arguments '$*': nothing was removed" >&2; exit 2 ;;
esac

# Removes hamal's own `names` from `folder`, then the folder if nothing else is left in it;
# says what was kept.
remove_own() {
    local folder=$1; shift
    [ -d "$folder" ] || return 0
    (cd "$folder" && rm -rf -- "$@")
    rmdir "$folder" 2>/dev/null && return 0
    echo "uninstall_hamal.sh: kept $folder: it holds what hamal did not create (or your backups):" \
        "$(cd "$folder" && ls -A | head -n 10 | tr '\n' ' ')- remove it yourself if you mean to" >&2
}

if [ -f "$prefix/docker-compose-hamal.yaml" ] && command -v docker-compose >/dev/null 2>&1; then
    docker-compose -f "$prefix/docker-compose-hamal.yaml" down --rmi all >/dev/null 2>&1 || true
fi
rm -rf "$prefix/hamal-venv" "$prefix/hamal-venv.prev" "$prefix/hamal-venv.switching" \
       "$prefix/hamal-venv.legacy" "$prefix/releases" \
       "$prefix/update_sync_proxy.sh" "$prefix/docker-compose-hamal.yaml" "$prefix/.env"
if [ "$purge" = yes ]; then
    remove_own "$etc" hamal.conf
    rm -rf "$log"
    shopt -s nullglob
    backups=()
    [ -d "$lib" ] && backups=("$lib"/hamal.db.before-*)
    remove_own "$lib" hamal.db hamal.db-wal hamal.db-shm hamal_info journal locks kvm \
        snapshot_metadata "${backups[@]##*/}"
fi
rm -f "$prefix/uninstall_hamal.sh"
rmdir "$prefix" 2>/dev/null || true
echo "hamal removed from $prefix$([ "$purge" = yes ] && echo ', with its config, state and logs')"
