"""A small NBD server that serves an image honestly except for one chosen lie.

Fixed newstyle handshake, structured replies, ``base:allocation`` (everything reported as data),
read-only. ``LIES`` names what it can do wrong; ``HostileNbd(image, socket, lie).start()`` serves
on a unix socket from a thread until ``stop()``. Written for hamal's tests: each lie is one that
a trusting client turns into wrong data, a hang or a blown memory budget.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

NBDMAGIC, IHAVEOPT, OPT_REPLY = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST, SIMPLE, STRUCTURED = 0x25609513, 0x67446698, 0x668E33EF
OPT_ABORT, OPT_GO, OPT_STRUCTURED, OPT_META = 2, 7, 8, 10
REP_ACK, REP_INFO, REP_META, REP_ERR_UNSUP = 1, 3, 4, (1 << 31) | 1
CMD_READ, CMD_DISC, CMD_BLOCK_STATUS = 0, 2, 7
DONE = 1
T_NONE, T_DATA, T_HOLE, T_STATUS, T_ERROR = 0, 1, 2, 5, (1 << 15) | 1
TFLAGS = 1 | 2  # has flags, read-only

# Each lie, and what the client must do: "fail" = the sync fails (no version); "serve" = the
# sync succeeds with the right bytes (the server is odd but honest).
LIES = {
    # Reads not fully answered (the uncovered bytes would keep a reused buffer's old content).
    "done-only": "fail",  # NONE + DONE, no data
    "half-data": "fail",  # the first half of the data, then DONE
    "short-data-chunk": "fail",  # an OFFSET_DATA chunk of 4 bytes
    "hole-wrong-length": "fail",  # a HOLE chunk of 16 bytes instead of 12
    "unknown-error-type": "fail",  # a chunk of unknown type with the error bit set, then DONE
    "overlap": "fail",  # the whole data, then its first 4 KiB again
    "outside": "fail",  # data at an offset past the request
    "chunk-after-done": "fail",  # the whole answer with DONE, then another data chunk
    "simple-data": "fail",  # a simple reply with data after structured replies were agreed
    "wrong-cookie": "fail",  # the answer under a cookie no request has
    # The export's size.
    "no-export-info": "fail",  # GO answered without NBD_INFO_EXPORT
    "short-export-info": "fail",  # NBD_INFO_EXPORT of 10 bytes
    "huge-size": "fail",  # a size of 2^62
    # Lengths that a trusting client allocates before checking.
    "huge-error-chunk": "fail",  # an error chunk that says it holds 2 GiB
    "huge-data-chunk": "fail",  # a data chunk that says it holds 2 GiB
    # Honest but awkward.
    "small-max-block": "serve",  # maximum block 4 KiB: pieces, in a window (no deadlock)
    "split-chunks": "serve",  # each read answered by many small data and hole chunks, out of order
    "byte-extents": "serve",  # block status in extents of one byte, alternating data and zero
    # Stalls.
    "silent": "hang",  # never answers a read
}


class HostileNbd:
    def __init__(self, image: Path, sock: Path, lie: str = "none") -> None:
        assert lie == "none" or lie in LIES, lie
        self.data = image.read_bytes()
        self.sock, self.lie = sock, lie
        self.max_block = 4096 if lie == "small-max-block" else 32 << 20
        self.reads = 0
        self.largest_read = 0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> HostileNbd:
        if self.sock.exists():
            os.unlink(self.sock)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.sock))
        self._listener.listen(8)
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._listener:
            self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        try:
            if self._handshake(conn):
                self._transmit(conn)
        except (ConnectionError, OSError, struct.error):
            pass
        finally:
            conn.close()

    # -- handshake ---------------------------------------------------------------------------

    def _opt_reply(self, c: socket.socket, opt: int, kind: int, data: bytes = b"") -> None:
        c.sendall(struct.pack(">QIII", OPT_REPLY, opt, kind, len(data)) + data)

    def _handshake(self, c: socket.socket) -> bool:
        c.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))
        recv_exact(c, 4)
        while True:
            _, opt, n = struct.unpack(">QII", recv_exact(c, 16))
            data = recv_exact(c, n)
            if opt == OPT_STRUCTURED:
                self._opt_reply(c, opt, REP_ACK)
            elif opt == OPT_META:
                (name_len,) = struct.unpack(">I", data[:4])
                (count,) = struct.unpack(">I", data[4 + name_len : 8 + name_len])
                pos = 8 + name_len
                for _ in range(count):
                    (qlen,) = struct.unpack(">I", data[pos : pos + 4])
                    query = data[pos + 4 : pos + 4 + qlen]
                    pos += 4 + qlen
                    if query == b"base:allocation":
                        self._opt_reply(c, opt, REP_META, struct.pack(">I", 1) + query)
                self._opt_reply(c, opt, REP_ACK)
            elif opt == OPT_GO:
                size = 1 << 62 if self.lie == "huge-size" else len(self.data)
                export = struct.pack(">HQH", 0, size, TFLAGS)
                if self.lie == "short-export-info":
                    export = export[:10]
                if self.lie != "no-export-info":
                    self._opt_reply(c, opt, REP_INFO, export)
                blocks = struct.pack(">HIII", 3, 512, 4096, self.max_block)
                self._opt_reply(c, opt, REP_INFO, blocks)
                self._opt_reply(c, opt, REP_ACK)
                return True
            elif opt == OPT_ABORT:
                self._opt_reply(c, opt, REP_ACK)
                return False
            else:
                self._opt_reply(c, opt, REP_ERR_UNSUP)

    # -- transmission ------------------------------------------------------------------------

    def _chunk(self, c: socket.socket, flags: int, kind: int, cookie: int, payload: bytes, length=None):
        """A structured reply chunk; ``length`` claims another length than the payload's."""
        n = len(payload) if length is None else length
        c.sendall(struct.pack(">IHHQI", STRUCTURED, flags, kind, cookie, n) + payload)

    def _transmit(self, c: socket.socket) -> None:
        while True:
            magic, _, cmd, cookie, offset, length = struct.unpack(">IHHQQI", recv_exact(c, 28))
            if magic != REQUEST or cmd == CMD_DISC:
                return
            if cmd == CMD_BLOCK_STATUS:
                self._block_status(c, cookie, offset, length)
            elif cmd == CMD_READ:
                if length > self.max_block:
                    err = struct.pack(">IH", 22, 0)  # EINVAL: over the agreed maximum
                    self._chunk(c, DONE, T_ERROR, cookie, err)
                    continue
                self.reads += 1
                self.largest_read = max(self.largest_read, length)
                self._read(c, cookie, offset, length)
            else:
                c.sendall(struct.pack(">IIQ", SIMPLE, 22, cookie))

    def _block_status(self, c: socket.socket, cookie: int, offset: int, length: int) -> None:
        if self.lie == "byte-extents":
            n = min(length, 1 << 16)  # 64 Ki one-byte extents per reply
            descriptors = b"".join(struct.pack(">II", 1, 0 if (offset + i) % 2 else 2) for i in range(n))
        else:
            descriptors = struct.pack(">II", min(length, 1 << 31), 0)
        self._chunk(c, DONE, T_STATUS, cookie, struct.pack(">I", 1) + descriptors)

    def _read(self, c: socket.socket, cookie: int, offset: int, length: int) -> None:
        data = self.data[offset : offset + length]
        lie = self.lie
        if lie == "silent":
            self._stop.wait(3600)
        elif lie == "done-only":
            self._chunk(c, DONE, T_NONE, cookie, b"")
        elif lie == "half-data":
            half = length // 2
            self._chunk(c, 0, T_DATA, cookie, struct.pack(">Q", offset) + data[:half])
            self._chunk(c, DONE, T_NONE, cookie, b"")
        elif lie == "short-data-chunk":
            self._chunk(c, DONE, T_DATA, cookie, b"\0\0\0\0")
        elif lie == "hole-wrong-length":
            self._chunk(c, DONE, T_HOLE, cookie, struct.pack(">QIi", offset, length, 0))
        elif lie == "unknown-error-type":
            self._chunk(c, 0, (1 << 15) | 9, cookie, b"x" * 8)
            self._chunk(c, DONE, T_NONE, cookie, b"")
        elif lie == "overlap":
            self._chunk(c, 0, T_DATA, cookie, struct.pack(">Q", offset) + data)
            self._chunk(c, DONE, T_DATA, cookie, struct.pack(">Q", offset) + data[:4096])
        elif lie == "outside":
            self._chunk(c, DONE, T_DATA, cookie, struct.pack(">Q", offset + length) + data)
        elif lie == "chunk-after-done":
            self._chunk(c, DONE, T_DATA, cookie, struct.pack(">Q", offset) + data)
            self._chunk(c, DONE, T_DATA, cookie, struct.pack(">Q", offset) + data[:512])
        elif lie == "simple-data":
            c.sendall(struct.pack(">IIQ", SIMPLE, 0, cookie) + data)
        elif lie == "wrong-cookie":
            self._chunk(c, DONE, T_DATA, cookie + 1000, struct.pack(">Q", offset) + data)
        elif lie == "huge-error-chunk":
            self._chunk(c, DONE, T_ERROR, cookie, struct.pack(">IH", 5, 0), length=1 << 31)
        elif lie == "huge-data-chunk":
            self._chunk(c, DONE, T_DATA, cookie, struct.pack(">Q", offset), length=1 << 31)
            time.sleep(0.5)
        elif lie == "split-chunks":
            self._split(c, cookie, offset, data)
        else:
            self._chunk(c, DONE, T_DATA, cookie, struct.pack(">Q", offset) + data)

    def _split(self, c: socket.socket, cookie: int, offset: int, data: bytes) -> None:
        """Pieces of 4 KiB, last first; zero pieces as holes."""
        pieces = [(at, data[at : at + 4096]) for at in range(0, len(data), 4096)]
        for at, piece in reversed(pieces):
            if piece.count(0) == len(piece):
                self._chunk(c, 0, T_HOLE, cookie, struct.pack(">QI", offset + at, len(piece)))
            else:
                self._chunk(c, 0, T_DATA, cookie, struct.pack(">Q", offset + at) + piece)
        self._chunk(c, DONE, T_NONE, cookie, b"")


def recv_exact(c: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = c.recv(n - len(buf))
        if not got:
            raise ConnectionError("client closed")
        buf += got
    return bytes(buf)
