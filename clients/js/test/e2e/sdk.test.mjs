// The SDK against real gateway processes, in Node: subscriptions and their
// states, publish and presence, token expiry and refresh, a stalling
// network forcing the SSE and long-poll fallbacks, and gateways killed
// (SIGKILL) and drained (SIGTERM) in cluster mode while events flow — the
// app must see every event exactly once and in order.
import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import WebSocket from 'ws';
import { Client, SharedClient } from '../../src/index.js';
import { cleanup, gateway, lockManager, metric, mint, natsServer, proxy, publish, until } from './harness.mjs';

after(cleanup);
const clients = [];
after(() => clients.forEach((c) => c.logout()));

/** A client that records what the app sees. */
function client(url, options = {}) {
  const c = new Client({ url, WebSocket, backoff: { min: 100, max: 1000 }, ...options });
  clients.push(c);
  c.seen = [];
  c.gaps = [];
  c.errors = [];
  c.transportsUsed = [];
  c.on('event', (e) => c.seen.push(e));
  c.on('gap', (g) => c.gaps.push(g));
  c.on('error', (e) => c.errors.push(e));
  c.on('connected', ({ transport }) => c.transportsUsed.push(transport));
  return c;
}

/** Publishes `n` events one after another, retrying each until stored. */
function publisher(url, topic, { every = 10 } = {}) {
  const ids = [];
  let stop = false;
  const done = (async () => {
    for (let i = 0; !stop; i++) {
      for (;;) {
        try {
          const r = await fetch(`${url}/api/realtime/publish/`, {
            method: 'POST',
            headers: { 'content-type': 'application/json', authorization: `Bearer ${mint({ user: 'backend', scope: 'publish' })}` },
            body: JSON.stringify({ event_type: topic, data: { i }, idempotency_key: `${topic}-${i}` }),
            signal: AbortSignal.timeout(3000),
          });
          if (r.status === 201 || r.status === 200) {
            const body = await r.json();
            if (!ids.includes(body.event_id)) ids.push(body.event_id);
            break;
          }
        } catch {
          // the gateway behind the balancer died: retry (the key dedups)
        }
        await new Promise((r) => setTimeout(r, 50));
      }
      await new Promise((r) => setTimeout(r, every));
    }
  })();
  return { ids, stop: async () => { stop = true; await done; } };
}

const seq = (c, topic) => c.seen.filter((e) => e.event_type === topic).map((e) => e.data.i);
const range = (n) => [...Array(n).keys()];

test('subscriptions: states, idempotent subscribe, refusal, async iteration, unsubscribe', async () => {
  const gw = await gateway();
  const c = client(gw.url, { token: mint({ user: 'alice' }) });
  const states = [];
  const sub = c.subscribe('deal.*');
  sub.on('state', ({ state }) => states.push(state));
  assert.equal(c.subscribe('deal.*'), sub, 'the same pattern is the same subscription');
  const refused = c.subscribe('user:bob');
  c.connect();
  await sub.ready();
  await assert.rejects(refused.ready(), (e) => e.code === 'topic_not_allowed');
  assert.equal(refused.state, 'failed');
  assert.deepEqual(states, ['subscribed']);
  // Unsubscribe and subscribe again within one tick (a React re-render):
  // the new subscription ends subscribed, nothing is "already subscribed".
  sub.unsubscribe();
  const again = c.subscribe('deal.*');
  assert.notEqual(again, sub);
  await again.ready();
  const it = again[Symbol.asyncIterator]();
  const ids = [await publish(gw.url, 'deal.1', { i: 0 }), await publish(gw.url, 'deal.2', { i: 1 })];
  await publish(gw.url, 'contact.1', { not: 'subscribed' });
  assert.equal((await it.next()).value.event_id, ids[0]);
  assert.equal((await it.next()).value.event_id, ids[1]);
  again.unsubscribe();
  assert.equal((await it.next()).done, true, 'the iterator ends with the subscription');
  await until('three events seen', () => c.seen.length === 2);
  assert.equal(sub.state, 'unsubscribed');
  assert.throws(() => c.subscribe('a..b'), (e) => e.code === 'invalid_pattern');
});

test('data protection: erased events are announced, a tenant pinned elsewhere stops the client', async () => {
  const dir = (await import('node:fs')).mkdtempSync((await import('node:path')).join((await import('node:os')).tmpdir(), 'sb-sdk-dp-'));
  const policy = `${dir}/policy.yaml`;
  (await import('node:fs')).writeFileSync(
    policy,
    'tenants:\n  acme:\n    subscribe: [{pattern: ">"}]\n    publish: [{pattern: ">"}]\n  usco:\n    subscribe: [{pattern: ">"}]\n    residency: [us]\n',
  );
  const gw = await gateway({ config: `policy_file: ${policy}\n` });
  for (const transport of ['websocket', 'sse']) {
    const c = client(gw.url, { token: mint({ user: 'alice' }), transports: [transport] });
    const erased = [];
    c.on('erased', (e) => erased.push(e));
    const sub = c.subscribe('orders.*');
    c.connect();
    await sub.ready();
    const r = await fetch(`${gw.url}/api/realtime/publish/`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${mint({ user: 'backend', scope: 'publish' })}` },
      body: JSON.stringify({ event_type: 'orders.created', data: { i: 0 }, gdpr_context: { data_subject_id: `subject-${transport}` } }),
    });
    const id = (await r.json()).event_id;
    await until('the event', () => c.seen.some((e) => e.event_id === id));
    const erase = await fetch(`${gw.url}/api/realtime/erase/`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${mint({ user: 'dpo', scope: 'erase' })}` },
      body: JSON.stringify({ data_subject_id: `subject-${transport}` }),
    });
    assert.equal(erase.status, 200, await erase.text());
    await until(`the erased notice over ${transport}`, () => erased.length === 1);
    assert.deepEqual(erased[0], { topic: 'orders.created', eventIds: [id] });
    c.logout();
  }
  for (const transport of ['websocket', 'sse', 'longpoll']) {
    const c = client(gw.url, { token: mint({ tenant: 'usco', user: 'u' }), transports: [transport] });
    c.subscribe('orders.*');
    c.connect();
    await until(`${transport} stops`, () => c.state === 'disconnected' && c.errors.length > 0);
    assert.equal(c.errors[0].code, 'residency_violation', `${transport}: ${c.errors[0].message}`);
  }
});

test('publish with acknowledgement, presence, rooms and a direct message', async () => {
  const gw = await gateway();
  const alice = client(gw.url, { token: mint({ user: 'alice' }) });
  const bob = client(gw.url, { token: mint({ user: 'bob' }) });
  alice.connect();
  bob.connect();
  const roomA = alice.presence('presence:doc-1', { info: { name: 'Alice' } });
  await until('alice in the room', () => roomA.state === 'subscribed');
  const joins = [];
  roomA.on('join', (j) => joins.push(j.user.id));
  const roomB = bob.presence('presence:doc-1', { info: { name: 'Bob' } });
  await until('bob sees both members', () => roomB.members.size === 2);
  assert.equal(roomB.members.get('alice').name, 'Alice');
  await until('alice sees bob join', () => joins.includes('bob'));
  // A message to the room reaches both members; the ack carries its id.
  const roomEvents = [];
  roomB.on('event', (e) => roomEvents.push(e));
  const ack = await alice.publish('presence:doc-1', { text: 'hi' }, { messageType: 'chat' });
  assert.equal(ack.duplicate, false);
  await until('bob gets the room message', () => roomEvents.some((e) => e.event_id === ack.event_id));
  assert.equal(roomEvents[0].metadata.publisher, 'alice');
  // The same idempotency key again is a duplicate, not a second event.
  const a1 = await alice.publish('chat.x', { n: 1 }, { idempotencyKey: 'k-1' });
  const a2 = await alice.publish('chat.x', { n: 1 }, { idempotencyKey: 'k-1' });
  assert.equal(a2.duplicate, true);
  assert.equal(a2.event_id, a1.event_id);
  // A direct message: bob's user channel, held without subscribing.
  const dm = await alice.publish('user:bob', { text: 'psst' });
  await until('bob gets the direct message', () => bob.seen.some((e) => e.event_id === dm.event_id));
  assert.ok(!alice.seen.some((e) => e.event_id === dm.event_id));
  // A refused publish rejects with the gateway's code.
  await assert.rejects(alice.publish('chat.*', {}), (e) => e.code === 'invalid_topic');
  roomA.leave();
  await until('bob sees alice leave', () => roomB.members.size === 1 && !roomB.members.has('alice'));
});

test('tokens: refreshed before expiry on every transport, a rejected token asks for a new one', async () => {
  const gw = await gateway();
  for (const transport of ['websocket', 'sse', 'longpoll']) {
    let issued = 0;
    const c = client(gw.url, {
      transports: [transport],
      getToken: () => { issued += 1; return mint({ user: 'alice', ttl: 3 }); },
      pollTimeout: 1,
    });
    const disconnects = [];
    c.on('disconnected', (d) => disconnects.push(d));
    const sub = c.subscribe('tick.*');
    c.connect();
    await sub.ready();
    const pub = publisher(gw.url, `tick.${transport}`, { every: 50 });
    await new Promise((r) => setTimeout(r, 7000)); // over two token lifetimes
    await pub.stop();
    await until(`${transport}: every event`, () => seq(c, `tick.${transport}`).length === pub.ids.length);
    assert.deepEqual(seq(c, `tick.${transport}`), range(pub.ids.length), `${transport}: exactly once, in order`);
    assert.ok(issued >= 3, `${transport}: getToken called ${issued} times`);
    if (transport === 'websocket') assert.equal(disconnects.length, 0, 'auth.refresh keeps the WebSocket open');
    assert.ok(!disconnects.some((d) => d.code === 4001), `${transport}: never expired: ${JSON.stringify(disconnects)}`);
    c.logout();
  }
  // An expired token at connect: 4001, then getToken is asked again.
  const tokens = [mint({ user: 'alice', ttl: -10 }), mint({ user: 'alice' })];
  const c = client(gw.url, { getToken: () => tokens.shift() ?? mint({ user: 'alice' }) });
  const closes = [];
  c.on('disconnected', (d) => closes.push(d.code));
  c.connect();
  await until('connected with the second token', () => c.state === 'connected');
  assert.deepEqual(closes, [4001]);
  // SSE with a fixed token: at expiry the stream says token_expired and
  // ends; the client reads that as a 4001 (not a network loss to retry).
  const fixed = client(gw.url, { token: mint({ user: 'alice', ttl: 2 }), transports: ['sse'] });
  const fixedCloses = [];
  fixed.on('disconnected', (d) => fixedCloses.push(d.code));
  fixed.subscribe('tick.*');
  fixed.connect();
  await until('expired and stopped', () => fixed.state === 'disconnected' && fixed.errors.length > 0, 10000);
  assert.equal(fixedCloses[0], 4001, `closes: ${fixedCloses}`);
  assert.equal(fixed.errors[0].code, 'token_expired');
  // A fixed token that is refused ends the session with an error.
  const bad = client(gw.url, { token: mint({ user: 'alice', secret: 'wrong' }) });
  bad.connect();
  await until('stopped', () => bad.errors.length > 0);
  assert.equal(bad.errors[0].code, 'unauthorized');
  assert.equal(bad.state, 'disconnected');
});

test('a stalling network forces SSE, then long-poll; nothing lost or repeated', async () => {
  const gw = await gateway({ config: 'heartbeat:\n  sse_keepalive_seconds: 1\n' });
  const lb = await proxy([gw.port]);
  const c = client(lb.url, { token: mint({ user: 'alice' }), openTimeout: 1000, idleTimeout: 2500, pingInterval: 500, pollTimeout: 2 });
  const sub = c.subscribe('stream.*');
  c.connect();
  await sub.ready();
  const pub = publisher(gw.url, 'stream.a', { every: 20 });
  await until('events over WebSocket', () => seq(c, 'stream.a').length > 20);
  // WebSocket upgrades are swallowed from now on and the live one freezes
  // (no close: only the client's watchdog can tell).
  lb.stall(/^GET \/ws/);
  lb.freeze();
  await until('moved to SSE', () => c.transportsUsed.at(-1) === 'sse', 20000);
  const atSse = seq(c, 'stream.a').length;
  await until('events over SSE', () => seq(c, 'stream.a').length > atSse + 20);
  lb.stall(/^GET \/(ws|api\/realtime\/sse)/);
  lb.freeze();
  await until('moved to long-poll', () => c.transportsUsed.at(-1) === 'longpoll', 20000);
  const atPoll = seq(c, 'stream.a').length;
  await until('events over long-poll', () => seq(c, 'stream.a').length > atPoll + 20);
  await pub.stop();
  await until('every event', () => seq(c, 'stream.a').length === pub.ids.length);
  assert.deepEqual(seq(c, 'stream.a'), range(pub.ids.length), 'exactly once, in order, across three transports');
  assert.deepEqual(c.transportsUsed.slice(0, 1), ['websocket']);
  assert.equal(c.gaps.length, 0);
  lb.close();
});

test('cluster: a gateway killed (SIGKILL) and another drained (SIGTERM) while events flow', async () => {
  const nats = await natsServer();
  const a = await gateway({ nats });
  const b = await gateway({ nats });
  const lb = await proxy([a.port, b.port]);
  const many = [];
  for (let i = 0; i < 12; i++) {
    const transports = i % 4 === 3 ? ['sse'] : undefined; // some on SSE
    const c = client(lb.url, { token: mint({ user: `u${i}` }), transports });
    many.push(c);
    c.subscribe('orders.*');
    c.connect();
  }
  // Quiet clients have received nothing when their gateway dies, and wait
  // 1.35 s before reconnecting: what is published meanwhile reaches them
  // only because the first confirmation gave them a cursor.
  const quiet = [];
  for (let i = 0; i < 4; i++) {
    const c = client(lb.url, { token: mint({ user: `q${i}` }), backoff: { min: 1500, max: 2000 }, random: () => 0.9 });
    quiet.push(c);
    c.subscribe('quiet.*');
    c.connect();
  }
  const everyone = [...many, ...quiet];
  await until('all subscribed', () => everyone.every((c) => c.state === 'connected' && c.subscriptions.every((s) => s.state === 'subscribed')));
  const pub = publisher(lb.url, 'orders.eu', { every: 10 });
  await until('events flowing', () => many.every((c) => seq(c, 'orders.eu').length > 10));
  a.child.kill('SIGKILL');
  await a.exited;
  const quietIds = [];
  for (let i = 0; i < 5; i++) quietIds.push(await publish(b.url, 'quiet.x', { i }));
  await until('quiet clients resumed', () => quiet.every((c) => c.seen.length === 5), 15000);
  for (const c of quiet) assert.deepEqual(c.seen.map((e) => e.event_id), quietIds);
  assert.ok(quiet.some((c) => c.stats.reconnects > 0), 'some quiet clients were on the killed gateway');
  const c2 = await gateway({ nats });
  lb.setBackends([b.port, c2.port]);
  await until('events after the kill', () => many.every((c) => seq(c, 'orders.eu').length > pub.ids.length - 5 && pub.ids.length > 150));
  b.child.kill('SIGTERM');
  await b.exited;
  await until('events after the drain', () => pub.ids.length > 300);
  await pub.stop();
  await until('every client has every event', () => many.every((c) => seq(c, 'orders.eu').length >= pub.ids.length), 30000);
  for (const [i, c] of many.entries()) {
    assert.deepEqual(seq(c, 'orders.eu'), range(pub.ids.length), `client ${i}: exactly once, in order`);
    assert.equal(c.gaps.length, 0, `client ${i}: no gap`);
  }
  const moved = many.filter((c) => c.stats.reconnects > 0).length;
  assert.ok(moved >= many.length / 2, `clients reconnected: ${moved}`);
  lb.close();
});

test('tabs: one connection shared by the tabs of an origin; the leader leaves, another takes over; nothing lost or repeated', async () => {
  const gw = await gateway();
  const locks = lockManager();
  const tabs = [];
  const tab = (patterns) => {
    const t = new SharedClient({ url: gw.url, WebSocket, backoff: { min: 100, max: 1000 }, getToken: () => mint({ user: 'alice', scope: 'subscribe,publish' }), locks, heartbeat: 500 });
    t.seen = new Map();
    for (const p of patterns) {
      t.subscribe(p, { onEvent: (e) => t.seen.set(p, [...(t.seen.get(p) ?? []), e.data.i]) });
    }
    t.connect();
    tabs.push(t);
    return t;
  };
  const a = tab(['orders.*']);
  await until('the first tab leads and is subscribed', () => a.isLeader && a.subscriptions.every((s) => s.state === 'subscribed'));
  const b = tab(['orders.*', 'invoices.*']);
  const c = tab(['invoices.*']);
  await until('every tab subscribed', () => tabs.every((t) => t.subscriptions.every((s) => s.state === 'subscribed')));
  assert.deepEqual(tabs.map((t) => t.isLeader), [true, false, false]);
  assert.equal(await metric(gw.admin, 'switchboard_websocket_connected_total'), 1, 'three tabs, one connection');
  // A tab holding a pattern no other tab holds leaves: the leader drops it.
  const d = tab(['shipments.*']);
  await until('the fourth tab subscribed', () => d.subscriptions.every((s) => s.state === 'subscribed'));
  assert.equal(await metric(gw.admin, 'switchboard_subscriptions_active'), 3, 'the union of the tabs\' patterns');
  d.logout();
  await until('its pattern dropped', async () => (await metric(gw.admin, 'switchboard_subscriptions_active')) === 2);
  tabs.pop();
  // A follower publishes through the leader.
  const ack = await c.publish('invoices.eu', { i: -1 });
  assert.equal(ack.duplicate, false);
  let n = 0;
  let stop = false;
  after(() => {
    stop = true;
    for (const t of tabs) t.logout();
  });
  const publishing = (async () => {
    while (!stop) {
      await publish(gw.url, 'orders.eu', { i: n });
      await publish(gw.url, 'invoices.eu', { i: n });
      n += 1;
      await new Promise((r) => setTimeout(r, 10));
    }
  })();
  await until('events flowing', () => (b.seen.get('orders.*') ?? []).length > 20);
  // The leader's tab closes: another takes the lock and connects, resuming
  // from the last event the tabs saw.
  a.logout();
  await until('a new leader', () => b.isLeader || c.isLeader);
  const atHandover = n;
  await until('events after the handover', () => n > atHandover + 30);
  stop = true;
  await publishing;
  await until('every event in the remaining tabs', () => (b.seen.get('orders.*') ?? []).length === n && (b.seen.get('invoices.*') ?? []).length === n + 1 && (c.seen.get('invoices.*') ?? []).length === n + 1);
  const all = [...Array(n).keys()];
  assert.deepEqual(b.seen.get('orders.*'), all, 'tab b, orders: exactly once, in order');
  assert.deepEqual(b.seen.get('invoices.*'), [-1, ...all], 'tab b, invoices');
  assert.deepEqual(c.seen.get('invoices.*'), [-1, ...all], 'tab c, invoices');
  assert.equal(c.seen.get('orders.*'), undefined, 'a tab gets only what it subscribed to');
  assert.equal(await metric(gw.admin, 'switchboard_websocket_connected_total'), 2, 'one connection per leader');
  for (const t of tabs) t.logout();
});
