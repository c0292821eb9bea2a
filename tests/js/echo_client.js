// Echo check with node's `ws` client: node echo_client.js ws://127.0.0.1:PORT/ws
// Sends text and binary messages, checks each echo byte-exact and in order, closes with
// 4002 "node bye", and prints one JSON line: {"ok": ..., "results": [...], "close": {...}}.
"use strict";
const WebSocket = require("ws");

const url = process.argv[2];
const messages = [
  { binary: false, data: Buffer.from("hello", "utf8") },
  { binary: false, data: Buffer.from("héllo wörld ✓ 🥐", "utf8") },
  { binary: false, data: Buffer.alloc(0) },
  { binary: false, data: Buffer.from("x".repeat(70000), "utf8") },
  { binary: true, data: Buffer.from([0, 1, 2, 127, 128, 254, 255]) },
  { binary: true, data: Buffer.alloc(0) },
  { binary: true, data: Buffer.from(Array.from({ length: 256 }, (_, i) => i)) },
  { binary: true, data: Buffer.alloc(200000, 0xab) },
];

const results = [];
let finished = false;
function finish(out) {
  if (finished) return;
  finished = true;
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(out.ok ? 0 : 1);
}
const timer = setTimeout(() => finish({ ok: false, error: "timeout", results }), 10000);

const ws = new WebSocket(url);
ws.on("error", (err) => finish({ ok: false, error: String(err), results }));
ws.on("open", () => {
  for (const m of messages) ws.send(m.data, { binary: m.binary });
});
ws.on("message", (data, isBinary) => {
  const i = results.length;
  const want = messages[i];
  const got = Buffer.isBuffer(data) ? data : Buffer.concat(data);
  results.push({
    index: i,
    binary_ok: want !== undefined && isBinary === want.binary,
    bytes_ok: want !== undefined && got.equals(want.data),
    length: got.length,
  });
  if (results.length === messages.length) ws.close(4002, "node bye");
});
ws.on("close", (code, reason) => {
  clearTimeout(timer);
  const ok = results.length === messages.length && results.every((r) => r.binary_ok && r.bytes_ok);
  finish({ ok, results, close: { code, reason: reason.toString("utf8") } });
});
