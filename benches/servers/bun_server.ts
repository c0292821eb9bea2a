// Bun bench server: Bun.serve with websocket handlers and server.publish.
//
// usage: bun run bun_server.ts PORT [deflate]
//   any path: echo;  /sub: subscribed to "bench";  /pub: messages are published to "bench"
//   ("#x ..." to the topic x: S8);  /t/a,b,c: subscribed to a, b and c, "+x"/"-x" (un)subscribe,
//   answered with the same text (S8; as servers/common.py says).
//   deflate: perMessageDeflate: true, and every echo and publish asks to be compressed.
type Role = { role: "echo" | "sub" | "pub" | "topics"; topics?: string[] };

const port = Number(process.argv[2]);
const deflate = process.argv[3] === "deflate";
if (!port) {
  console.error("usage: bun run bun_server.ts PORT");
  process.exit(2);
}

// Bytes queued for one socket before sends to it are dropped (it stays open): 16 MiB unless
// benches/run.py sets a smaller one (S10), as for the Python servers (servers/common.py).
const backpressureLimit = Number(process.env.BENCH_BACKPRESSURE_LIMIT ?? 16 * 1024 * 1024);

// benches/run.py's TLS scenarios (S1T, S3T) set these: the same certificate brioche gets.
const certFile = process.env.BENCH_TLS_CERT;
const keyFile = process.env.BENCH_TLS_KEY;

const server = Bun.serve<Role, {}>({
  hostname: "127.0.0.1",
  port,
  ...(certFile && keyFile ? { tls: { cert: Bun.file(certFile), key: Bun.file(keyFile) } } : {}),
  fetch(req, server) {
    const path = new URL(req.url).pathname;
    if (path.startsWith("/t/")) {
      const topics = path.slice(3).split(",");
      if (server.upgrade(req, { data: { role: "topics", topics } })) return;
    }
    const role = path === "/sub" ? "sub" : path === "/pub" ? "pub" : "echo";
    if (server.upgrade(req, { data: { role } })) return;
    return new Response("bun bench server");
  },
  websocket: {
    perMessageDeflate: deflate,
    idleTimeout: 120,
    maxPayloadLength: 16 * 1024 * 1024,
    backpressureLimit,
    closeOnBackpressureLimit: false,
    open(ws) {
      if (ws.data.role === "sub") ws.subscribe("bench");
      else if (ws.data.topics) for (const t of ws.data.topics) ws.subscribe(t);
    },
    message(ws, message) {
      const role = ws.data.role;
      if (role === "echo" || role === "sub") ws.send(message, deflate);
      else if (role === "pub") {
        const topic = typeof message === "string" && message[0] === "#"
          ? message.slice(1, message.indexOf(" ")) : "bench";
        server.publish(topic, message, deflate);
      } else {
        const text = String(message);
        if (text[0] === "+") ws.subscribe(text.slice(1));
        else if (text[0] === "-") ws.unsubscribe(text.slice(1));
        ws.send(text);
      }
    },
  },
});
console.log(`bun listening on 127.0.0.1:${server.port}`);
