"""What a type checker makes of user code: ``mypy --strict`` over snippets written as users write
them, against the installed package's annotations and stubs.

The whole tree passes ``mypy --strict`` in ``make test``; these pin what that cannot: code the
annotations must refuse, and forms users write that the project's own code does not.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from mypy import api

# The annotations are the same on every CPython: one interpreter checks them.
pytestmark = pytest.mark.once

ACCEPTED = '''
from dataclasses import dataclass
from typing import Any

from typing_extensions import assert_type  # typing's from 3.11; the checker's stubs have it

import brioche
from brioche import MessageBackpressured, MessageDropped, MessageSent, server, websocket


@dataclass
class Session:
    user: str


def sent(ws: brioche.WebSocket[Session]) -> int:
    # The positional form of the pattern binds the count, typed.
    match ws.send("x"):
        case MessageSent(n):
            return n
        case MessageBackpressured() | MessageDropped():
            return 0


async def handler(request: server.Request, srv: brioche.Server[Session]) -> server.Response | None:
    if srv.upgrade(request, data=Session("ann")):
        return None
    if srv.upgrade(request, {"x-retry": 3}, Session("bob")):
        return None
    return server.Response(200, [("x-count", 3)]).with_header("x-more", 4)


async def anonymous(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    return None if srv.upgrade(request) else server.not_found()


# A handler with no annotations leaves the data type open: Any, not a type to be inferred.
config = server.handler(lambda request, srv: server.text("hi")).port(0)
assert_type(config, server.Config[Any])
assert_type(server.handler(handler).websocket(websocket.init()), server.Config[Session])
'''

REFUSED = '''
import brioche
from brioche import server


async def handler(request: server.Request, srv: brioche.Server[str]) -> server.Response | None:
    if srv.upgrade(request):  # line 7: ws.data would be None, not a str
        return None
    if srv.upgrade(request, [("x", "y")]):  # line 9
        return None
    return None
'''


def check(tmp_path: Path, source: str) -> list[str]:
    """mypy --strict's error lines for ``source``, as ``line: message``."""
    path = tmp_path / "snippet.py"
    path.write_text(textwrap.dedent(source))
    out, err, _ = api.run(["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
                           "--hide-error-context", "--no-pretty", str(path)])
    assert not err, err
    return [f"{m[1]}: {m[2]}" for m in re.finditer(r"^.*?snippet\.py:(\d+): error: (.*)$", out, re.M)]


def test_what_users_write_type_checks(tmp_path: Path) -> None:
    """Before: ``case MessageSent(n)`` bound ``n`` as Any (``__match_args__`` typed as a plain
    tuple of str), an int header value was refused although the runtime writes it in decimal,
    and a lambda handler's config needed an annotation under ``--strict``."""
    assert check(tmp_path, ACCEPTED) == []


def test_upgrade_without_data_is_refused_where_sockets_carry_data(tmp_path: Path) -> None:
    """``srv.upgrade(request)`` on a ``Server[str]`` leaves ``ws.data`` None: a type error, as
    in the module form, whose ``data`` has no default. Before, both calls passed."""
    errors = check(tmp_path, REFUSED)
    assert [error.split(":")[0] for error in errors] == ["7", "9"], errors
    assert all('No overload variant of "upgrade" of "Server" matches' in error for error in errors), errors
