"""Where glibc's malloc puts large blocks in this process, with or without a brioche server
started first: ``malloc_probe.py serve|none``. Prints one JSON object: for each size, whether a
block of it is a mapping of its own (``mallinfo2().hblks``), and what a burst of 24 blocks of
1 MiB, once freed, leaves at the top of the heap (``keepcost``, bytes). glibc only."""

import asyncio
import ctypes
import json
import sys

from brioche import server

MIB = 1 << 20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]


def mapped(size: int) -> bool:
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    assert block
    after = libc.mallinfo2().hblks
    libc.free(block)
    return bool(after > before)


def kept_after_burst() -> int:
    blocks = [libc.malloc(MIB) for _ in range(24)]
    assert all(blocks)
    for block in reversed(blocks):
        libc.free(block)
    return int(libc.mallinfo2().keepcost)


def probe() -> dict[str, object]:
    # Smaller first: where glibc still adapts, freeing a mapped block raises its threshold to
    # that block's size (and the trim threshold to twice that).
    return {"2MiB_mapped": mapped(2 * MIB), "8MiB_mapped": mapped(8 * MIB),
            "kept_after_burst": kept_after_burst()}


async def main() -> None:
    if sys.argv[1] == "serve":
        config: server.Config[None] = (
            server.handler(lambda request, srv: server.not_found()).hostname("127.0.0.1").port(0)
        )
        async with config.serve():
            print(json.dumps(probe()))
    else:
        print(json.dumps(probe()))


asyncio.run(main())
