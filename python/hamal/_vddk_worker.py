"""A VDDK worker process: hosts VMware's VixDiskLib for one disk and serves the engine's reads
over stdin/stdout. Started by the engine with ``LD_LIBRARY_PATH=<libdir>/lib64``; never run by
hand and never imported by the service itself."""

import sys

from hamal import _native

if __name__ == "__main__":
    sys.exit(_native._vddk_worker_main())
