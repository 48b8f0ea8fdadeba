// A scripted transport: the test opens it, feeds it server messages and
// closes it, and reads what the client sent.
import { after } from 'node:test';
import { Client } from '../../src/index.js';

const made = [];
after(() => made.forEach((c) => c.logout()));

export function fakeClient(options = {}) {
  const attempts = [];
  const make = (name) => (ctx) => {
    const t = {
      name,
      ctx,
      sent: [],
      closed: null,
      canSend: name === 'websocket',
      send(m) { this.sent.push(m); },
      close(code = 1000, reason = '') { this.end({ code, reason, opened: this.opened }); },
      opened: false,
      open() {
        this.opened = true;
        if (name === 'websocket') ctx.onMessage({ type: 'connection.established', data: { user_id: 'alice', connection_id: '1', region: 'eu', expires_at: 4102444800 } });
        ctx.onOpen();
      },
      msg(type, data, requestId) { ctx.onMessage(requestId === undefined ? { type, data } : { type, data, requestId }); },
      end(info) {
        if (this.closed) return;
        this.closed = info;
        ctx.onClose({ opened: this.opened, ...info });
      },
    };
    attempts.push(t);
    return t;
  };
  const client = new Client({
    url: 'http://gateway.test',
    token: 'tok',
    backoff: { min: 20, max: 40 },
    transportFactories: { websocket: make('websocket'), sse: make('sse'), longpoll: make('longpoll') },
    ...options,
  });
  made.push(client);
  return { client, attempts, last: () => attempts.at(-1) };
}

export const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

export async function waitFor(what, fn, ms = 2000) {
  const end = Date.now() + ms;
  while (!fn()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await tick(2);
  }
}

export const event = (id, topic = 'deal.1', data = {}) => ({ event_id: id, event_type: topic, timestamp: '2026-12-02T00:00:00Z', data, metadata: { cursor: id } });
