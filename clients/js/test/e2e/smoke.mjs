import WebSocket from 'ws';
import { Client } from '../../src/index.js';
import { gateway, mint, publish, until, cleanup } from './harness.mjs';
const gw = await gateway();
for (const t of ['websocket', 'sse', 'longpoll']) {
  const c = new Client({ url: gw.url, token: mint(), WebSocket, transports: [t] });
  const got = [];
  c.on('error', (e) => console.log('error', e));
  const sub = c.subscribe('deal.*', { onEvent: (e) => got.push(e.event_id) });
  c.connect();
  await sub.ready();
  const ids = [];
  for (let i = 0; i < 3; i++) ids.push(await publish(gw.url, 'deal.x', { i }));
  await until('events', () => got.length >= 3, 5000);
  console.log(t, c.state, got.length, JSON.stringify(got) === JSON.stringify(ids), c.cursor);
  c.logout();
}
cleanup();
