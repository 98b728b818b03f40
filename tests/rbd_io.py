"""Writes test data into an RBD image through Ceph's own Python binding (python3-rbd), so the
tests change images without going through hamal. Run with the system Python, which has it:

    /usr/bin/python3 tests/rbd_io.py CONF POOL[/NAMESPACE] IMAGE OP...

OP is ``write:OFFSET:LENGTH:SEED`` (pseudo-random bytes from SEED) or ``discard:OFFSET:LENGTH``.
"""

import random
import sys

import rados
import rbd


def main(conf: str, pool: str, image: str, ops: list[str]) -> None:
    pool, _, namespace = pool.partition("/")
    with rados.Rados(conffile=conf) as cluster, cluster.open_ioctx(pool) as ioctx:
        if namespace:
            ioctx.set_namespace(namespace)
        with rbd.Image(ioctx, image) as img:
            apply(img, ops)


def apply(img: "rbd.Image", ops: list[str]) -> None:
    for op in ops:
        kind, *args = op.split(":")
        if kind == "write":
            offset, length, seed = (int(a) for a in args)
            data = random.Random(seed).randbytes(length)
            if img.write(data, offset) != length:
                raise SystemExit(f"short write at {offset}")
        elif kind == "discard":
            offset, length = (int(a) for a in args)
            img.discard(offset, length)
        else:
            raise SystemExit(f"unknown op {op}")
    img.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
