import asyncio, logging, subprocess
from brioche import server, websocket
from websockets.asyncio.client import connect
logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(name)s: %(message)s")
def on_open(ws): ws.subscribe("room")
def on_text(ws, text): ws.publish("room", text)
def fetch(r, s): return server.upgrade(s, r, [], None, server.bad_request)
cfg = server.handler(fetch).websocket(websocket.init().on_open(on_open).on_text(on_text)).hostname("127.0.0.1").port(0).pubsub_redis("redis://127.0.0.1:42424")
async def main():
  async with asyncio.timeout(30):
    a = await cfg.serve(); b = await cfg.serve()
    await asyncio.sleep(0.5)
    ca = await connect(f"ws://127.0.0.1:{a.port}/"); cb = await connect(f"ws://127.0.0.1:{b.port}/")
    await asyncio.sleep(0.5)
    await ca.send("via redis"); print("b got:", await asyncio.wait_for(cb.recv(), 3))
    s = a.stats(); print({k: s[k] for k in s if k.startswith("redis")})
    await ca.close(); await cb.close()
    await a.stop(True); await b.stop(True)
asyncio.run(main())
