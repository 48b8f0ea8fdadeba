// The live console (/console/) in headless Chromium: built on the
// JavaScript SDK, so this is also the SDK's browser test (WebSocket with
// publish and presence, SSE and long-polling over fetch, a stalling network
// forcing the fallbacks while tokens expire and are refreshed, gateways
// killed and drained in cluster mode, tabs sharing one connection). Run by
// ./tests/run.sh with `node --test`. UPDATE_SCREENSHOT=1 writes the
// screenshot docs/console.png.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, writeFileSync, copyFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';
import { test, after, before } from 'node:test';
import { chromium } from 'playwright-core';
import WebSocket from 'ws';
import { freePort, until } from './lib.mjs';
import { Client } from '../../clients/js/src/index.js';

const here = dirname(fileURLToPath(import.meta.url));
const bin = process.env.SWITCHBOARD_BIN || join(here, '../../target/debug/switchboard');
const children = [];
let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-sync'],
  });
});
after(async () => {
  await browser?.close();
  for (const c of children) c.kill('SIGKILL');
});

async function gateway(config = '') {
  const port = await freePort();
  const admin = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'sb-console-'));
  const file = join(dir, 'gateway.yaml');
  writeFileSync(file, `listen: 127.0.0.1:${port}\nadmin_listen: 127.0.0.1:${admin}\nregion: eu-west\n${config}`);
  const env = { ...process.env, RUST_LOG: 'warn' };
  delete env.SWITCHBOARD_HS256_SECRET;
  const child = spawn(bin, ['--config', file], { env, stdio: ['ignore', 'inherit', 'inherit'] });
  children.push(child);
  await until('gateway ready', async () => (await fetch(`http://127.0.0.1:${admin}/readyz`).catch(() => null))?.ok);
  return `http://127.0.0.1:${port}`;
}

// The development secret: the gateway accepts it only with no keys configured.
const devEnv = { ...process.env };
delete devEnv.SWITCHBOARD_HS256_SECRET;
const devToken = (user, scope = 'subscribe,publish') =>
  execFileSync(bin, ['token', '--tenant', 'demo', '--user', user, '--scope', scope], { env: devEnv }).toString().trim();

async function publish(url, topic, data) {
  const r = await fetch(`${url}/api/realtime/publish/`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${devToken('backend', 'publish')}` },
    body: JSON.stringify({ event_type: topic, data }),
  });
  assert.equal(r.status, 201, await r.text());
}

async function openConsole(url, { transport = '' } = {}) {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => m.type() === 'error' && errors.push(m.text()));
  await page.goto(`${url}/console/`);
  await page.waitForSelector('#dev:not([hidden])');
  await page.fill('#dev-user', 'ada');
  await page.click('#dev-mint');
  await until('token minted', async () => (await page.inputValue('#token')).split('.').length === 3);
  await page.selectOption('#transport-choice', transport);
  await page.click('#connect');
  // An HTTP stream opens with the first subscription.
  if (!transport) await page.waitForSelector('#status.connected', { timeout: 15000 });
  return { page, errors };
}

async function subscribeIn(page, pattern) {
  await page.fill('#pattern', pattern);
  await page.click('#subscribe-form button');
  await page.waitForSelector(`li[data-pattern="${pattern}"] .state.subscribed`, { timeout: 15000 });
}

const rows = (page) => page.$$eval('#events tr', (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)));

test('the console: development token, subscribe, live events with metadata, publish, presence', async () => {
  const url = await gateway();
  const { page, errors } = await openConsole(url);
  assert.equal(await page.textContent('#transport'), 'websocket');
  assert.equal(await page.textContent('#user'), 'ada');
  assert.equal(await page.textContent('#region'), 'eu-west');
  await subscribeIn(page, 'deal.*');
  await page.fill('#pattern', 'user:someone-else');
  await page.click('#subscribe-form button');
  await page.waitForSelector('li[data-pattern="user:someone-else"] .state.failed');
  for (let i = 0; i < 3; i++) await publish(url, `deal.${i}`, { deal_id: i, stage: 'won' });
  await publish(url, 'contact.1', { not: 'subscribed' });
  await until('three rows', async () => (await rows(page)).length === 3);
  const shown = await rows(page);
  assert.deepEqual(shown.map((r) => r[2]), ['deal.2', 'deal.1', 'deal.0'], 'newest first, only what matches');
  assert.equal(shown[0][3], 'eu-west');
  assert.equal(shown[0][5], '{"deal_id":2,"stage":"won"}');
  // Publishing from the page: acknowledged, and seen coming back.
  await page.fill('#pub-topic', 'deal.chat');
  await page.fill('#pub-type', 'note');
  await page.click('#publish-form button');
  await page.waitForSelector('#pub-result:has-text("stored:")');
  await until('own event shown', async () => (await rows(page)).some((r) => r[2] === 'deal.chat' && r[4] === 'ada'));
  // A refused publish says why.
  await page.fill('#pub-topic', 'deal.*');
  await page.click('#publish-form button');
  await page.waitForSelector('#pub-result:has-text("invalid_topic")');
  // Presence: the page joins, another client (the SDK in Node) joins too.
  await page.fill('#presence-topic', 'presence:board');
  await page.click('#presence-form button');
  await page.waitForSelector('#presence .member:has-text("ada")');
  const grace = new Client({ url, token: devToken('grace'), WebSocket });
  grace.presence('presence:board', { info: { name: 'Grace' } });
  grace.connect();
  await page.waitForSelector('#presence .member:has-text("Grace")');
  await page.fill('#filter', 'deal.1');
  await until('filtered', async () => (await page.$$eval('#events tr:not([hidden])', (t) => t.length)) === 1);
  await page.fill('#filter', '');
  const shot = join(here, '../.work/console.png');
  mkdirSync(dirname(shot), { recursive: true });
  await page.screenshot({ path: shot });
  if (process.env.UPDATE_SCREENSHOT) copyFileSync(shot, join(here, '../../docs/console.png'));
  grace.logout();
  await page.waitForSelector('#presence .member:has-text("Grace")', { state: 'detached' });
  assert.deepEqual(errors, [], 'no error in the page');
  await page.close();
});

test('the SDK in Chromium over SSE and long-polling (fetch streaming)', async () => {
  const url = await gateway();
  for (const transport of ['sse', 'longpoll']) {
    const { page, errors } = await openConsole(url, { transport });
    await subscribeIn(page, `${transport}.*`);
    await page.waitForSelector('#status.connected');
    assert.equal(await page.textContent('#transport'), transport);
    for (let i = 0; i < 5; i++) await publish(url, `${transport}.x`, { i });
    await until(`${transport}: five rows`, async () => (await rows(page)).length === 5);
    assert.deepEqual((await rows(page)).map((r) => JSON.parse(r[5]).i), [4, 3, 2, 1, 0], 'in order, once');
    // Publishing needs the WebSocket: the page says so.
    await page.fill('#pub-topic', `${transport}.y`);
    await page.click('#publish-form button');
    await page.waitForSelector('#pub-result:has-text("unsupported_transport")');
    assert.deepEqual(errors, []);
    await page.close();
  }
});

test('the console is off when keys are configured, unless enabled; then it mints nothing', async () => {
  const keyed = await gateway('auth:\n  hs256_secret: a-real-secret\n');
  assert.equal((await fetch(`${keyed}/console/`)).status, 404);
  assert.equal((await fetch(`${keyed}/console/token`, { method: 'POST', body: '{}' })).status, 404);
  const on = await gateway('auth:\n  hs256_secret: a-real-secret\nconsole:\n  enabled: on\n');
  const page = await fetch(`${on}/console/`);
  assert.equal(page.status, 200);
  assert.match(page.headers.get('content-security-policy'), /script-src 'self'/);
  assert.match(await page.text(), /Switchboard console/);
  assert.equal((await fetch(`${on}/console/sdk/client.js`)).headers.get('content-type'), 'text/javascript; charset=utf-8');
  assert.equal((await fetch(`${on}/console/token`, { method: 'POST', body: '{"tenant":"x","user":"y"}' })).status, 404, 'no development tokens with real keys');
  assert.equal((await fetch(`${on}/console/../etc/passwd`)).status, 404);
  const off = await gateway('console:\n  enabled: off\n');
  assert.equal((await fetch(`${off}/console/`)).status, 404);
  const dev = await gateway();
  const bad = await fetch(`${dev}/console/token`, { method: 'POST', body: 'nope' });
  assert.equal(bad.status, 400);
  assert.equal((await bad.json()).error.code, 'malformed_body');
});

test('the SDK in Chromium, cluster mode: a gateway killed (SIGKILL) and another drained (SIGTERM) while events flow', async () => {
  const h = await import('../../clients/js/test/e2e/harness.mjs');
  try {
    const nats = await h.natsServer();
    const config = 'console:\n  enabled: on\n';
    const a = await h.gateway({ nats, config });
    const b = await h.gateway({ nats, config });
    const lb = await h.proxy([a.port, b.port]);
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.goto(`${lb.url}/console/`);
    // Six clients in the page, WebSocket and SSE, behind the balancer.
    await page.evaluate(async ([tokens]) => {
      const { Client } = await import('/console/sdk/index.js');
      window.clients = tokens.map((token, i) => {
        const c = new Client({ url: location.origin, token, backoff: { min: 100, max: 1000 }, transports: i % 3 === 2 ? ['sse'] : undefined });
        c.seen = [];
        c.gaps = 0;
        c.on('event', (e) => c.seen.push(e.data.i));
        c.on('gap', () => { c.gaps += 1; });
        c.subscribe('orders.*');
        c.connect();
        return c;
      });
    }, [[0, 1, 2, 3, 4, 5].map((i) => h.mint({ user: `browser-${i}` }))]);
    const state = () => page.evaluate(() => window.clients.map((c) => ({ seen: c.seen, gaps: c.gaps, reconnects: c.stats.reconnects, ok: c.state === 'connected' && c.subscriptions.every((s) => s.state === 'subscribed') })));
    await until('all subscribed', async () => (await state()).every((c) => c.ok));
    // The publisher retries through the balancer with idempotency keys.
    let n = 0;
    let stop = false;
    const publishing = (async () => {
      while (!stop) {
        for (;;) {
          const r = await fetch(`${lb.url}/api/realtime/publish/`, {
            method: 'POST',
            headers: { 'content-type': 'application/json', authorization: `Bearer ${h.mint({ user: 'backend', scope: 'publish' })}` },
            body: JSON.stringify({ event_type: 'orders.eu', data: { i: n }, idempotency_key: `browser-${n}` }),
            signal: AbortSignal.timeout(3000),
          }).catch(() => null);
          if (r && (r.status === 201 || r.status === 200)) break;
          await new Promise((res) => setTimeout(res, 50));
        }
        n += 1;
        await new Promise((res) => setTimeout(res, 10));
      }
    })();
    await until('events flowing', async () => (await state()).every((c) => c.seen.length > 10));
    a.child.kill('SIGKILL');
    await a.exited;
    const c = await h.gateway({ nats, config });
    lb.setBackends([b.port, c.port]);
    const afterKill = n;
    await until('events after the kill', async () => n > afterKill + 50 && (await state()).every((s) => s.seen.length > afterKill));
    b.child.kill('SIGTERM');
    await b.exited;
    const afterDrain = n;
    await until('events after the drain', () => n > afterDrain + 50);
    stop = true;
    await publishing;
    await until('every client has every event', async () => (await state()).every((s) => s.seen.length >= n), 30000);
    const final = await state();
    for (const [i, s] of final.entries()) {
      assert.deepEqual(s.seen, [...Array(n).keys()], `browser client ${i}: exactly once, in order`);
      assert.equal(s.gaps, 0);
    }
    assert.ok(final.every((s) => s.reconnects > 0), 'every client moved at least once (drain or kill)');
    assert.deepEqual(errors, []);
    await page.close();
    lb.close();
  } finally {
    h.cleanup();
  }
});

test('the SDK in Chromium: a stalling network forces SSE, then long-poll, while tokens expire and are refreshed; nothing lost or repeated', async () => {
  const h = await import('../../clients/js/test/e2e/harness.mjs');
  let lb;
  let stop = false;
  try {
    const gw = await h.gateway({ config: 'console:\n  enabled: on\nheartbeat:\n  sse_keepalive_seconds: 1\n' });
    lb = await h.proxy([gw.port]);
    const page = await browser.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    // Tokens live 4 s: the run lasts several lifetimes, on every transport.
    let issued = 0;
    await page.exposeFunction('mintToken', () => {
      issued += 1;
      return h.mint({ user: 'alice', ttl: 4 });
    });
    await page.goto(`${lb.url}/console/`);
    await page.evaluate(async () => {
      const { Client } = await import('/console/sdk/index.js');
      const c = new Client({
        url: location.origin,
        getToken: () => window.mintToken(),
        backoff: { min: 100, max: 1000 },
        openTimeout: 1000,
        idleTimeout: 2500,
        pingInterval: 500,
        pollTimeout: 2,
      });
      window.probe = { seen: [], gaps: 0, transports: [], closes: [] };
      c.on('event', (e) => window.probe.seen.push(e.data.i));
      c.on('gap', () => { window.probe.gaps += 1; });
      c.on('connected', ({ transport }) => window.probe.transports.push(transport));
      c.on('disconnected', ({ code }) => window.probe.closes.push(code));
      c.subscribe('stream.*');
      c.connect();
      window.client = c;
    });
    const probe = () => page.evaluate(() => window.probe);
    await until('subscribed over WebSocket', async () => (await probe()).transports[0] === 'websocket');
    let n = 0;
    const publishing = (async () => {
      while (!stop) {
        await h.publish(gw.url, 'stream.a', { i: n });
        n += 1;
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    const seenCount = async () => (await probe()).seen.length;
    await until('events over WebSocket', async () => (await seenCount()) > 20);
    // WebSocket upgrades are swallowed from now on and the live one
    // freezes (no close: only the client's watchdog can tell).
    lb.stall(/^GET \/ws/);
    lb.freeze();
    await until('moved to SSE', async () => (await probe()).transports.at(-1) === 'sse', 20000);
    const atSse = await seenCount();
    await until('events over SSE across a token lifetime', async () => (await seenCount()) > atSse + 200, 30000);
    lb.stall(/^GET \/(ws|api\/realtime\/sse)/);
    lb.freeze();
    await until('moved to long-poll', async () => (await probe()).transports.at(-1) === 'longpoll', 20000);
    const atPoll = await seenCount();
    await until('events over long-poll across a token lifetime', async () => (await seenCount()) > atPoll + 200, 30000);
    stop = true;
    await publishing;
    await until('every event', async () => (await seenCount()) >= n, 20000);
    const final = await probe();
    assert.deepEqual(final.seen, [...Array(n).keys()], 'exactly once, in order, across three transports');
    assert.equal(final.gaps, 0);
    assert.deepEqual(final.transports.slice(0, 1), ['websocket']);
    assert.ok(final.transports.includes('sse') && final.transports.at(-1) === 'longpoll', `transports: ${final.transports}`);
    assert.ok(!final.closes.includes(4001), `a token expired instead of being refreshed: closes ${final.closes}`);
    assert.ok(issued >= 4, `getToken called ${issued} times over the run`);
    await page.evaluate(() => window.client.logout());
    assert.deepEqual(errors, []);
    await page.close();
  } finally {
    stop = true;
    lb?.close();
    h.cleanup();
  }
});

test('the SDK in Chromium: tabs of an origin share one connection; the leading tab closes, another takes over; nothing lost or repeated', async () => {
  const h = await import('../../clients/js/test/e2e/harness.mjs');
  let stop = false;
  const context = await browser.newContext();
  try {
    const gw = await h.gateway({ config: 'console:\n  enabled: on\n' });
    await context.exposeFunction('mintToken', () => h.mint({ user: 'alice', scope: 'subscribe,publish' }));
    const open = async () => {
      const page = await context.newPage();
      const errors = [];
      page.on('pageerror', (e) => errors.push(String(e)));
      await page.goto(`${gw.url}/console/`);
      await page.evaluate(async () => {
        const { SharedClient } = await import('/console/sdk/index.js');
        const tab = new SharedClient({ url: location.origin, getToken: () => window.mintToken(), backoff: { min: 100, max: 1000 }, heartbeat: 500 });
        window.tab = tab;
        window.seen = [];
        tab.subscribe('orders.*', { onEvent: (e) => window.seen.push(e.data.i) });
        tab.connect();
      });
      return { page, errors };
    };
    const tabs = [await open(), await open(), await open()];
    const view = (t) => t.page.evaluate(() => ({ leader: window.tab.isLeader, subscribed: window.tab.subscriptions.every((s) => s.state === 'subscribed'), seen: window.seen }));
    await until('every tab subscribed', async () => (await Promise.all(tabs.map(view))).every((v) => v.subscribed), 20000);
    const leaders = (await Promise.all(tabs.map(view))).map((v) => v.leader);
    assert.deepEqual(leaders, [true, false, false], 'the first tab leads');
    assert.equal(await h.metric(gw.admin, 'switchboard_websocket_connected_total'), 1, 'three tabs, one WebSocket');
    // A follower publishes through the leader's connection.
    const ack = await tabs[2].page.evaluate(() => window.tab.publish('orders.eu', { i: -1 }));
    assert.equal(ack.duplicate, false);
    let n = 0;
    const publishing = (async () => {
      while (!stop) {
        await h.publish(gw.url, 'orders.eu', { i: n });
        n += 1;
        await new Promise((r) => setTimeout(r, 10));
      }
    })();
    await until('events flowing', async () => (await view(tabs[1])).seen.length > 20);
    // The leading tab closes (its lock is released by the browser).
    await tabs[0].page.close();
    const rest = tabs.slice(1);
    await until('another tab leads', async () => (await Promise.all(rest.map(view))).some((v) => v.leader), 20000);
    const atHandover = n;
    await until('events after the handover', () => n > atHandover + 30);
    stop = true;
    await publishing;
    await until('every event in the remaining tabs', async () => (await Promise.all(rest.map(view))).every((v) => v.seen.length === n + 1), 20000);
    for (const t of rest) {
      assert.deepEqual((await view(t)).seen, [-1, ...Array(n).keys()], 'exactly once, in order, across the handover');
      assert.deepEqual(t.errors, []);
    }
    assert.equal(await h.metric(gw.admin, 'switchboard_websocket_connected_total'), 2, 'one WebSocket per leader');
  } finally {
    stop = true;
    await context.close();
    h.cleanup();
  }
});
