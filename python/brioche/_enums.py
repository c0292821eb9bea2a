"""Close codes and ready states as ``IntEnum``s: each member still equals its int."""

from __future__ import annotations

import enum

__all__ = ["CloseCode", "ReadyState"]


class CloseCode(enum.IntEnum):
    """The close codes of RFC 6455 (section 7.4.1), named as in ``websockets.frames.CloseCode``.

    ``on_close`` gets every code as a plain ``int``, which compares equal to its member here;
    application codes (3000-4999) have none.

    ```pycon
    >>> brioche.CloseCode.MESSAGE_TOO_BIG == 1009
    True
    ```
    """

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005
    ABNORMAL_CLOSURE = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015


class ReadyState(enum.IntEnum):
    """What ``ws.ready_state`` returns, the values of the browser's ``WebSocket.readyState``.

    ```pycon
    >>> brioche.ReadyState.OPEN == 1
    True
    ```
    """

    CONNECTING = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3
