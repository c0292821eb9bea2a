"""``Buffer``, the type of a payload the send functions take: any object with the buffer protocol.

Bound at run time too, not only for type checkers: ``typing.get_type_hints`` (used by pydantic,
dependency injectors and documentation tools) resolves the annotations that name it in the
namespace of the module that uses it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

__all__ = ["Buffer"]

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
elif TYPE_CHECKING:
    from typing_extensions import Buffer
else:
    try:
        from typing_extensions import Buffer
    except ImportError:  # not a dependency: a stand-in that names the same types
        import abc

        class Buffer(abc.ABC):
            """An object with the buffer protocol (``collections.abc.Buffer`` from 3.12)."""

        for _type in (bytes, bytearray, memoryview):
            Buffer.register(_type)
