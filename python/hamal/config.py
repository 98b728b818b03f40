"""Loading ``hamal.conf`` (parsed and checked in Rust) and saying what was noticed, once."""

from __future__ import annotations

from hamal import _native, log


def load_config(path: str | None = None) -> _native.Config:
    """Loads ``path``, else ``$HAMAL_CONF``, else ``/etc/hamal/hamal.conf``.

    A missing file means the defaults (said once, as a warning); unknown keys are warnings;
    a bad value raises ``ConfigError`` naming file, section, key, value and what was expected.
    """
    cfg = _native.load_config(path)
    if cfg.found and not cfg.warnings:
        return cfg  # nothing to say: `logging` stays unimported
    logger = log.get("hamal.config")
    if not cfg.found:
        logger.warning("%s not found; using the default configuration", cfg.path)
    for w in cfg.warnings:
        logger.warning("%s", w)
    return cfg
