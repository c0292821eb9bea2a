"""Counters and logs: /metrics serves `srv.stats(all_workers=True)` to Prometheus (with
`prometheus_client`), and the core's log lines go to stderr at INFO.

Under `run(config, workers=n)` each worker counts its own clients and a scrape of the shared
port reaches one worker: `all_workers=True` has it answer every worker's sum (each as of its
last second), the same whichever it is. In one process it is `srv.stats()`."""

import logging
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

import brioche
from brioche import server, websocket

GAUGES = {"open_connections", "incoming_bytes", "redis_connected"}


class BriocheCollector:
    """Reads the server's counters at each scrape: the core keeps them, Python copies nothing."""

    def __init__(self, srv: brioche.Server[None]) -> None:
        self.srv = srv

    def collect(self) -> Iterator[Metric]:
        stats = self.srv.stats(all_workers=True)
        closes = CounterMetricFamily("brioche_closes", "Connections closed", labels=["code"])
        for code, count in sorted(stats["closes_by_code"].items()):
            closes.add_metric([str(code)], count)
        yield closes
        for name, value in stats.items():
            if not isinstance(value, int):  # closes_by_code, above
                continue
            family = GaugeMetricFamily if name in GAUGES else CounterMetricFamily
            yield family(f"brioche_{name}", name.replace("_", " "), value=value)


def on_text(ws: brioche.WebSocket[None], text: str) -> None:
    ws.send(text)


def fetch(request: server.Request, srv: brioche.Server[None]) -> server.Response | None:
    if request.path == "/metrics":
        registry = CollectorRegistry()
        registry.register(BriocheCollector(srv))
        return server.Response(200, (("content-type", CONTENT_TYPE_LATEST),), generate_latest(registry))
    if request.path == "/ws" and srv.upgrade(request):
        return None
    return server.not_found()


app = server.handler(fetch).websocket(websocket.init().on_text(on_text))

if __name__ == "__main__":
    # INFO shows refused handshakes, protocol-error closes and idle timeouts (at most ten lines
    # of each kind a second); WARNING and up shows backpressure drops, reads paused for
    # max_incoming_bytes and handler errors.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app.run()
