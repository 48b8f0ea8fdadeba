// Browser test: a page served from one origin uses a gateway on another
// origin through WebSocket and long-polling, in real headless Chromium
// (Debian's chromium driven by playwright-core). A page on an origin the
// gateway does not allow is refused.
import { spawn, execFileSync } from 'node:child_process';
import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, until } from './lib.mjs';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const bin = process.env.SWITCHBOARD_BIN || join(here, '../../target/debug/switchboard');
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const SECRET = 'browser-test-secret';


function serve(port) {
  const html = readFileSync(join(here, 'page.html'));
  const seed004 = readFileSync(join(here, 'seed004.html'));
  const seed002 = readFileSync(join(here, 'seed002.html'));
  const sioClient = readFileSync(join(here, 'node_modules/socket.io-client/dist/socket.io.min.js'));
  const server = createServer((req, res) => {
    if (req.url.startsWith('/socket.io.min.js')) {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      return res.end(sioClient);
    }
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end(req.url.startsWith('/seed004') ? seed004 : req.url.startsWith('/seed002') ? seed002 : html);
  });
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => resolve(server)));
}

const gwPort = await freePort();
const pagePort = await freePort();
const otherPort = await freePort();
const adminPort = await freePort();
const gateway = `http://127.0.0.1:${gwPort}`;
const admin = `http://127.0.0.1:${adminPort}`;
const pageOrigin = `http://127.0.0.1:${pagePort}`;

const gw = spawn(bin, ['--listen', `127.0.0.1:${gwPort}`, '--admin-listen', `127.0.0.1:${adminPort}`, '--allowed-origins', pageOrigin], {
  env: { ...process.env, SWITCHBOARD_HS256_SECRET: SECRET, RUST_LOG: 'warn' },
  stdio: ['ignore', 'inherit', 'inherit'],
});
const mint = (tenant, scope, user = 'dev-user') =>
  execFileSync(bin, ['token', '--tenant', tenant, '--scope', scope, '--user', user, '--secret', SECRET]).toString().trim();
const subToken = mint('123', 'subscribe');
const pubToken = mint('123', 'publish');

async function publish(eventType, data) {
  const r = await fetch(`${gateway}/api/realtime/publish/`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${pubToken}` },
    body: JSON.stringify({ event_type: eventType, data, company_id: '123' }),
  });
  const text = await r.text();
  assert.equal(r.status, 201, text);
  return JSON.parse(text).event_id;
}

let browser;
const servers = [];
try {
  await until('gateway ready', async () => (await fetch(`${admin}/readyz`).catch(() => null))?.ok);
  servers.push(await serve(pagePort), await serve(otherPort));
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    // playwright gives every launch a fresh, empty profile directory.
  });
  const query = `gateway=${encodeURIComponent(gateway)}&token=${subToken}&company_id=123&topics=deal.stage.*,timeline.object.*`;

  // 1. The allowed origin: WebSocket and long-polling both receive events.
  const page = await browser.newPage();
  await page.goto(`${pageOrigin}/?${query}`);
  await until('subscription confirmed', () => page.evaluate(() => window.results.confirmed));
  // The seed's long-poll client starts without a cursor ("from now"): wait
  // until its first request is parked at the gateway (WebSocket + poll = 2).
  await until('long-poll in flight', async () =>
    (await (await fetch(`${gateway}/api/realtime/health/`)).json()).connections >= 2);
  const sent = [];
  sent.push(await publish('deal.stage.updated', { deal_id: 1 }));
  sent.push(await publish('timeline.object.created', { id: 2 }));
  await publish('contact.email.sent', { ignored: true });
  sent.push(await publish('deal.stage.created', { deal_id: 3 }));
  const ws = await until('websocket events', () =>
    page.evaluate((n) => window.results.wsEvents.length >= n && window.results.wsEvents, sent.length));
  assert.deepEqual(ws.map((e) => e.event_id), sent, 'WebSocket: every event once, in order');
  assert.equal(ws[0].metadata.region, 'local');
  assert.equal(await page.evaluate(() => localStorage.getItem('event_cursor')), sent[2]);
  const polled = await until('long-poll events', () =>
    page.evaluate((n) => window.results.polled.length >= n && window.results.polled, sent.length));
  assert.deepEqual(polled.map((e) => e.event_id), sent, 'long-poll: every event once, in order');
  const results = await page.evaluate(() => window.results);
  assert.deepEqual(results.pollErrors, [], 'no CORS or network errors');
  assert.deepEqual(results.wsErrors, []);
  assert.equal(results.pollCursors.at(-1), sent.at(-1), 'cursor is the last event id');

  // 2. A page on an origin the gateway does not allow.
  const other = await browser.newPage();
  await other.goto(`http://127.0.0.1:${otherPort}/?${query}`);
  const refused = await until('refusal', () =>
    other.evaluate(() => window.results.wsClose !== null && window.results.pollErrors.length > 0 && window.results));
  assert.equal(refused.wsOpen, false, 'WebSocket from a foreign origin must not open');
  assert.equal(refused.confirmed, null);

  // 3. Seed 004's own RealtimeClient, unchanged: entity events in its form,
  // presence between two users, a message on a user's private channel.
  const seedPage = async (user, name) => {
    const p = await browser.newPage();
    const q = `ws=${encodeURIComponent(gateway.replace('http', 'ws'))}&token=${mint('acme', 'subscribe', user)}&user=${user}&name=${name}`;
    await p.goto(`${pageOrigin}/seed004?${q}`);
    await p.evaluate(() => window.ready);
    return p;
  };
  const alice = await seedPage('alice', 'Alice');
  const firstSync = await until('alice presence:sync', () =>
    alice.evaluate(() => window.results.presence.find((m) => m.type === 'presence:sync')));
  assert.equal(firstSync.channel, 'presence:workspace/tasks');
  assert.deepEqual(firstSync.payload.users.map((u) => [u.id, u.name]), [['alice', 'Alice']]);
  assert.ok(firstSync.payload.users[0].lastSeen > 1_700_000_000_000);
  const bob = await seedPage('bob', 'Bob');
  const bobSync = await until('bob presence:sync', () =>
    bob.evaluate(() => window.results.presence.find((m) => m.type === 'presence:sync')));
  assert.deepEqual(bobSync.payload.users.map((u) => u.id).sort(), ['alice', 'bob']);
  const joined = await until('alice sees bob join', () =>
    alice.evaluate(() => window.results.presence.find((m) => m.type === 'presence:join')));
  assert.equal(joined.payload.user.name, 'Bob');
  // Each page subscribed to its channels before joining presence, on one
  // connection, in order: its presence:sync proves those are in place.
  const acmePub = mint('acme', 'publish');
  const seedPublish = async (body) => {
    const r = await fetch(`${gateway}/api/realtime/publish/`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${acmePub}` },
      body: JSON.stringify(body),
    });
    assert.equal(r.status, 201, await r.text());
  };
  await seedPublish({ channel: 'entity:Task', type: 'entity:created', payload: { id: 't1', title: 'New task' } });
  await seedPublish({ channel: 'user:alice', type: 'entity:updated', payload: { id: 't1', assignee: 'alice' } });
  const aliceEntity = await until('alice entity events', () =>
    alice.evaluate(() => window.results.entity.length >= 2 && window.results.entity));
  assert.deepEqual(aliceEntity.map((m) => [m.type, m.channel]), [['entity:created', 'entity:Task'], ['entity:updated', 'user:alice']]);
  assert.deepEqual(await alice.evaluate(() => window.seen), [{ id: 't1', title: 'New task' }], 'the subscription callback ran');
  const bobEntity = await until('bob entity event', () =>
    bob.evaluate(() => window.results.entity.length >= 1 && window.results.entity));
  await seedPublish({ channel: 'entity:Task', type: 'entity:deleted', payload: { id: 't1' } });
  await until('bob sees the delete', () => bob.evaluate(() => window.results.entity.length >= 2));
  assert.deepEqual((await bob.evaluate(() => window.results.entity)).map((m) => m.channel), ['entity:Task', 'entity:Task'],
    "alice's private channel never reached bob");
  assert.equal(bobEntity[0].type, 'entity:created');
  await bob.close();
  const left = await until('alice sees bob leave', () =>
    alice.evaluate(() => window.results.presence.find((m) => m.type === 'presence:leave')));
  assert.equal(left.payload.user.id, 'bob');
  assert.deepEqual(await alice.evaluate(() => window.results.errors), []);

  // 4. Seed 002's Socket.IO snippet with the real socket.io-client (its
  // browser bundle), from another origin: polling, then the upgrade to
  // WebSocket; events from the HTTP API; message and message_ack.
  const sio = await browser.newPage();
  const sioQuery = `gateway=${encodeURIComponent(gateway)}&token=${mint('acme', 'subscribe', 'carol')}&room=deal.77`;
  await sio.goto(`${pageOrigin}/seed002?${sioQuery}`);
  const hello = await until('seed 002 connected', () => sio.evaluate(() => window.results.joined.length > 0 && window.results.connected));
  assert.ok(hello.connectionId && hello.serverTime && Array.isArray(hello.interactionClasses), JSON.stringify(hello));
  const sioIds = [];
  for (let i = 0; i < 3; i++) {
    const r = await fetch(`${gateway}/api/realtime/publish/`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${acmePub}` },
      body: JSON.stringify({ event_type: 'deal.77', data: { i } }),
    });
    sioIds.push((await r.json()).event_id);
  }
  const sioGot = await until('seed 002 messages', () => sio.evaluate((n) => window.results.messages.length >= n && window.results.messages, 3));
  assert.deepEqual(sioGot.map((m) => m.id), sioIds, 'Socket.IO in the browser: every event once, in order');
  await sio.evaluate(() => window.send());
  const sioAck = await until('message_ack', () => sio.evaluate(() => window.results.acks[0]));
  assert.ok(sioAck.messageId);
  await until('own message back through the room', () => sio.evaluate(() => window.results.messages.some((m) => m.senderId === 'carol')));
  const sioTransports = await until('upgraded to WebSocket', () =>
    sio.evaluate(() => window.results.transports.includes('websocket') && window.results.transports));
  assert.equal(sioTransports[0], 'polling', 'socket.io-client starts with polling');
  assert.deepEqual(await sio.evaluate(() => window.results.errors), []);

  console.log(`browser test passed: ${ws.length} WebSocket and ${polled.length} long-poll events from ${pageOrigin} to ${gateway}; foreign origin refused; seed 004's RealtimeClient: entity events, presence sync/join/leave, private channel; seed 002's socket.io-client: ${sioTransports.join(' -> ')}, ${sioGot.length} events, message_ack`);
} finally {
  if (browser) await browser.close();
  for (const s of servers) s.close();
  gw.kill('SIGKILL');
}
