#!/usr/bin/env bash
# Removes hamal from /opt/hamal. Keeps /etc/hamal (config), /var/lib/hamal (state) and
# /var/log/hamal unless --purge is given.
# Paths can be moved for tests: HAMAL_PREFIX, HAMAL_ETC, HAMAL_LOG_DIR, HAMAL_LIB_DIR.
set -euo pipefail
prefix=${HAMAL_PREFIX:-/opt/hamal}
purge=no
[ "${1:-}" = "--purge" ] && purge=yes
if [ -f "$prefix/docker-compose-hamal.yaml" ] && command -v docker-compose >/dev/null 2>&1; then
    docker-compose -f "$prefix/docker-compose-hamal.yaml" down --rmi all >/dev/null 2>&1 || true
fi
rm -rf "$prefix/hamal-venv" "$prefix/hamal-venv.prev" "$prefix/hamal-venv.switching" \
       "$prefix/hamal-venv.legacy" "$prefix/releases" \
       "$prefix/update_sync_proxy.sh" "$prefix/docker-compose-hamal.yaml" "$prefix/.env"
if [ "$purge" = yes ]; then
    rm -rf "${HAMAL_ETC:-/etc/hamal}" "${HAMAL_LIB_DIR:-/var/lib/hamal}" "${HAMAL_LOG_DIR:-/var/log/hamal}"
fi
rm -f "$prefix/uninstall_hamal.sh"
rmdir "$prefix" 2>/dev/null || true
echo "hamal removed from $prefix$([ "$purge" = yes ] && echo ', with its config, state and logs')"
