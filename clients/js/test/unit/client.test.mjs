// The client's state machine against scripted transports: what it sends,
// when it reconnects, on which transport, from which cursor.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { event, fakeClient, tick, waitFor } from './fake.mjs';

test('subscribes made in one tick go out as one frame; refusals fail only their pattern', async () => {
  const { client, last } = fakeClient();
  client.connect();
  await waitFor('attempt', () => last());
  last().open();
  const a = client.subscribe('a.*');
  const b = client.subscribe('b.*');
  const c = client.subscribe('user:bob');
  assert.equal(client.subscribe('a.*'), a);
  await tick();
  const frames = last().sent.filter((m) => m.type === 'subscribe');
  assert.equal(frames.length, 1);
  assert.deepEqual(frames[0].topics, ['a.*', 'b.*', 'user:bob']);
  const rid = frames[0].requestId;
  last().msg('error', { code: 'topic_not_allowed', message: 'pattern "user:bob" is not allowed' }, rid);
  last().msg('subscription.confirmed', { topics: ['a.*', 'b.*'], cursor: 'e-5' }, rid);
  assert.equal(a.state, 'subscribed');
  assert.equal(b.state, 'subscribed');
  assert.equal(c.state, 'failed');
  assert.equal(c.error.code, 'topic_not_allowed');
  assert.equal(client.cursor, 'e-5', 'a client with no cursor takes the confirmation\'s');
  // A single refused pattern with no confirmation fails on its error alone.
  const d = client.subscribe('user:carol');
  await tick();
  const rid2 = last().sent.at(-1).requestId;
  last().msg('error', { code: 'topic_not_allowed', message: 'no' }, rid2);
  assert.equal(d.state, 'failed');
  await assert.rejects(d.ready(), (e) => e.code === 'topic_not_allowed');
  // Revoked by a policy reload.
  last().msg('subscription.revoked', { topics: ['b.*'], reason: 'policy' });
  assert.equal(b.state, 'failed');
  assert.equal(b.error.code, 'revoked');
  client.logout();
});

test('unsubscribe then subscribe in one render: a stale confirmation does not confuse the new subscription', async () => {
  const { client, last } = fakeClient();
  client.connect();
  await waitFor('attempt', () => last());
  last().open();
  const first = client.subscribe('x.*');
  await tick();
  const rid1 = last().sent.at(-1).requestId;
  first.unsubscribe();
  const second = client.subscribe('x.*');
  await tick();
  const sent = last().sent.map((m) => m.type);
  assert.deepEqual(sent, ['subscribe', 'unsubscribe', 'subscribe']);
  last().msg('subscription.confirmed', { topics: ['x.*'] }, rid1);
  assert.equal(first.state, 'unsubscribed');
  assert.equal(second.state, 'subscribing', 'only its own confirmation counts');
  last().msg('subscription.confirmed', { topics: ['x.*'] }, last().sent.at(-1).requestId);
  assert.equal(second.state, 'subscribed');
  // Subscribed and unsubscribed before the frame went out: nothing is sent.
  const before = last().sent.length;
  client.subscribe('y.*').unsubscribe();
  await tick();
  assert.equal(last().sent.length, before);
  client.logout();
});

test('events: delivered once to every matching subscription, cursor follows, repeats dropped, gaps surfaced', async () => {
  const { client, last, attempts } = fakeClient();
  const a = client.subscribe('deal.*');
  const b = client.subscribe('deal.1');
  const seenA = [];
  const seenB = [];
  const all = [];
  const gaps = [];
  a.on('event', (e) => seenA.push(e.event_id));
  b.on('event', (e) => seenB.push(e.event_id));
  client.on('event', (e) => all.push(e.event_id));
  client.on('gap', (g) => gaps.push(g.reason));
  client.connect();
  await waitFor('attempt', () => last());
  last().open();
  const sub = last().sent.find((m) => m.type === 'subscribe');
  assert.equal(sub.cursor, undefined, 'no cursor yet');
  last().msg('event', event('e-1', 'deal.1'));
  last().msg('event', event('e-2', 'deal.2'));
  last().msg('event', event('e-3', 'user:alice'));
  assert.deepEqual(seenA, ['e-1', 'e-2']);
  assert.deepEqual(seenB, ['e-1']);
  assert.deepEqual(all, ['e-1', 'e-2', 'e-3']);
  assert.equal(client.cursor, 'e-3');
  // The connection drops; the next one resumes from the cursor, and a
  // replay that overlaps is delivered once.
  last().end({ code: 1006, reason: 'network' });
  await waitFor('reconnect', () => attempts.length === 2);
  last().open();
  const resub = last().sent.find((m) => m.type === 'subscribe');
  assert.equal(resub.cursor, 'e-3');
  assert.deepEqual(resub.topics, ['deal.*', 'deal.1']);
  last().msg('event', event('e-2', 'deal.2'));
  last().msg('event', event('e-4', 'deal.2'));
  assert.deepEqual(all, ['e-1', 'e-2', 'e-3', 'e-4']);
  assert.equal(client.stats.duplicates, 1);
  last().msg('resume.gap', { reason: 'expired', requested: 'e-0' });
  assert.deepEqual(gaps, ['expired']);
  client.logout();
});

test('close codes: 4003 stops, 4001 asks for a new token, 1012 and reconnect move on at once with the cursor', async () => {
  let tokens = 0;
  const { client, last, attempts } = fakeClient({ token: undefined, getToken: () => `t${++tokens}`, backoff: { min: 200, max: 400 } });
  client.subscribe('a.*');
  client.connect();
  await waitFor('attempt', () => last());
  assert.equal(last().ctx.token(), 't1');
  last().open();
  last().msg('event', event('e-7', 'a.b'));
  // The gateway drains: `reconnect` names the cursor, then 1012.
  const t0 = Date.now();
  last().msg('reconnect', { reason: 'draining', cursor: 'e-9' });
  await waitFor('reconnect at once', () => attempts.length === 2);
  assert.ok(Date.now() - t0 < 150, 'no backoff after a drain');
  assert.equal(last().ctx.cursor, 'e-9');
  last().open();
  assert.equal(last().sent.find((m) => m.type === 'subscribe').cursor, 'e-9');
  // 4001: a new token.
  last().end({ code: 4001, reason: 'token expired' });
  await waitFor('reconnect with a new token', () => attempts.length === 3, 3000);
  assert.equal(last().ctx.token(), 't2');
  last().open();
  // 4003: stop, and say why.
  const errors = [];
  client.on('error', (e) => errors.push(e.code));
  last().end({ code: 4003, reason: 'forbidden', error: { code: 'forbidden', message: 'no policy' } });
  await tick(500);
  assert.equal(attempts.length, 3, 'no retry after 4003');
  assert.equal(client.state, 'disconnected');
  assert.deepEqual(errors, ['forbidden']);
});

test('backoff between failures grows and resets after a stable connection', async () => {
  const { client, attempts, last } = fakeClient({ backoff: { min: 40, max: 1000 }, random: () => 0.99 });
  client.connect();
  await waitFor('attempt', () => last());
  last().open(); // websocket remembered
  const times = [];
  for (let i = 0; i < 4; i++) {
    const n = attempts.length;
    times.push(Date.now());
    last().end({ code: 4029, reason: 'rate limited' });
    await waitFor(`attempt ${n + 1}`, () => attempts.length === n + 1, 3000);
    last().open();
  }
  times.push(Date.now());
  const gaps = times.slice(1).map((t, i) => t - times[i]);
  assert.ok(gaps[0] >= 30 && gaps[3] >= 250, `waits grow: ${gaps}`);
  assert.ok(gaps[3] > gaps[0] * 4, `waits grow: ${gaps}`);
  assert.equal(client.backoff.attempt, 4);
  client.openedAt = Date.now() - 10_000; // it stayed up a while
  last().end({ code: 1006, reason: 'network' });
  await waitFor('quick reconnect', () => client.backoff.attempt === 1);
  client.logout();
});

test('transports: tried in order on failure to open, the one that worked remembered, one can be forced', async () => {
  const { client, attempts, last } = fakeClient({ openTimeout: 50 });
  client.subscribe('a.*');
  client.connect();
  await waitFor('websocket tried', () => attempts.length === 1);
  assert.equal(last().name, 'websocket');
  // It never opens (a proxy eats the upgrade): SSE next, after the open timeout.
  await waitFor('sse tried', () => attempts.length === 2, 1000);
  assert.equal(last().name, 'sse');
  assert.equal(attempts[0].closed.code, 3000);
  last().end({ code: 1006, reason: 'refused' });
  await waitFor('long-poll tried', () => attempts.length === 3);
  assert.equal(last().name, 'longpoll');
  last().open();
  assert.equal(client.subs.get('a.*').state, 'subscribed');
  // The open long-poll fails later: it is tried first again.
  last().end({ code: 1006, reason: 'network' });
  await waitFor('retry', () => attempts.length === 4);
  assert.equal(last().name, 'longpoll');
  // Publishing needs the WebSocket.
  last().open();
  await assert.rejects(client.publish('a.b', {}), (e) => e.code === 'unsupported_transport');
  client.logout();
  const forced = fakeClient({ transports: ['sse'], openTimeout: 30 });
  forced.client.subscribe('a.*');
  forced.client.connect();
  await waitFor('two tries', () => forced.attempts.length >= 2, 2000);
  assert.ok(forced.attempts.every((t) => t.name === 'sse'));
  forced.client.logout();
});

test('writeDelay is asked of the WebSocket only', async () => {
  const { client, attempts, last } = fakeClient({ writeDelay: 100, region: 'eu', openTimeout: 30 });
  client.subscribe('a.*');
  client.connect();
  await waitFor('websocket tried', () => attempts.length === 1);
  assert.deepEqual(last().ctx.query, { region: 'eu', write_delay_ms: '100' });
  await waitFor('sse tried', () => attempts.length === 2, 1000);
  assert.equal(last().name, 'sse');
  assert.deepEqual(last().ctx.query, { region: 'eu' }, 'SSE and long-poll have no write delay');
  client.logout();
  const plain = fakeClient();
  plain.client.connect();
  await waitFor('websocket tried', () => plain.attempts.length === 1);
  assert.deepEqual(plain.last().ctx.query, {});
  plain.client.logout();
});

test('an HTTP stream reopens from the cursor when subscriptions change; a refused pattern is dropped', async () => {
  const { client, attempts, last } = fakeClient({ transports: ['sse'] });
  client.connect();
  await tick(10);
  assert.equal(attempts.length, 0, 'no stream without topics');
  const a = client.subscribe('a.*');
  await waitFor('stream opened', () => attempts.length === 1);
  last().open();
  last().msg('event', event('e-1', 'a.x'));
  const bad = client.subscribe('user:bob');
  await waitFor('reopened', () => attempts.length === 2);
  assert.deepEqual(last().ctx.topics, ['a.*', 'user:bob']);
  assert.equal(last().ctx.cursor, 'e-1');
  last().end({ code: 4400, reason: 'refused', error: { code: 'topic_not_allowed', message: 'pattern "user:bob" is not allowed for you' } });
  await waitFor('reopened without it', () => attempts.length === 3);
  assert.deepEqual(last().ctx.topics, ['a.*']);
  assert.equal(bad.state, 'failed');
  last().open();
  assert.equal(a.state, 'subscribed');
  client.logout();
});

test('publish: acknowledged, resent after a reconnect with the same idempotency key, timed out', async () => {
  const { client, attempts, last } = fakeClient({ publishTimeout: 300 });
  client.connect();
  await waitFor('attempt', () => last());
  const p = client.publish('chat.1', { text: 'hi' }, { messageType: 'chat' });
  last().open();
  const frame = last().sent.find((m) => m.type === 'publish');
  assert.equal(frame.messageType, 'chat');
  assert.ok(frame.idempotencyKey);
  last().end({ code: 1006, reason: 'network' });
  await waitFor('reconnect', () => attempts.length === 2);
  last().open();
  const again = last().sent.find((m) => m.type === 'publish');
  assert.equal(again.idempotencyKey, frame.idempotencyKey);
  last().msg('publish.ack', { event_id: 'e-1', cursor: 'e-1', topic: 'chat.1', duplicate: true }, again.requestId);
  assert.equal((await p).event_id, 'e-1');
  const refused = client.publish('chat.*', {});
  await tick();
  last().msg('error', { code: 'invalid_topic', message: 'wildcard' }, last().sent.at(-1).requestId);
  await assert.rejects(refused, (e) => e.code === 'invalid_topic');
  await assert.rejects(client.publish('chat.2', {}), (e) => e.code === 'timeout');
  client.logout();
});

test('async iteration ends on unsubscribe, throws on failure; logout drops everything', async () => {
  const { client, last } = fakeClient();
  client.connect();
  await waitFor('attempt', () => last());
  last().open();
  const sub = client.subscribe('a.*');
  await tick();
  last().msg('subscription.confirmed', { topics: ['a.*'] }, last().sent.at(-1).requestId);
  const got = [];
  const loop = (async () => {
    for await (const e of sub) got.push(e.event_id);
  })();
  last().msg('event', event('e-1', 'a.1'));
  last().msg('event', event('e-2', 'a.2'));
  await tick();
  sub.unsubscribe();
  await loop;
  assert.deepEqual(got, ['e-1', 'e-2']);
  const doomed = client.subscribe('b.*');
  const failing = (async () => {
    for await (const _ of doomed) { /* nothing */ }
  })();
  await tick();
  last().msg('error', { code: 'topic_not_allowed', message: 'no' }, last().sent.at(-1).requestId);
  await assert.rejects(failing, (e) => e.code === 'topic_not_allowed');
  const kept = client.subscribe('c.*');
  const pending = client.publish('c.1', {});
  client.logout();
  await assert.rejects(pending, (e) => e.code === 'logged_out');
  assert.equal(kept.state, 'unsubscribed');
  assert.equal(client.cursor, null);
  assert.equal(client.subs.size, 0);
  assert.equal(client.state, 'disconnected');
});

test('token refresh on WebSocket: auth.refresh before expiry; a refused refresh reconnects with a new token', async () => {
  const jwt = (exp) => `h.${Buffer.from(JSON.stringify({ exp })).toString('base64url')}.s`;
  let n = 0;
  const { client, attempts, last } = fakeClient({ token: undefined, getToken: () => { n += 1; return jwt(Date.now() / 1000 + 0.6); } });
  client.connect();
  await waitFor('attempt', () => last());
  last().open();
  await waitFor('auth.refresh sent', () => last().sent.some((m) => m.type === 'auth.refresh'), 2000);
  const r = last().sent.find((m) => m.type === 'auth.refresh');
  assert.equal(n, 2);
  last().msg('error', { code: 'auth_refresh_failed', message: 'bad' }, r.requestId);
  await waitFor('reconnect', () => attempts.length === 2);
  assert.equal(n, 3, 'a new token for the new connection');
  client.logout();
});

test('a gateway refusal before open (1013, 4030) backs off on the same transport, it does not fall back', async () => {
  const { client, attempts, last } = fakeClient({ backoff: { min: 100, max: 200 }, random: () => 0.9 });
  client.subscribe('a.*');
  client.connect();
  await waitFor('attempt', () => attempts.length === 1);
  const t0 = Date.now();
  last().end({ code: 1013, reason: 'try again later' });
  await waitFor('retry', () => attempts.length === 2, 2000);
  assert.ok(Date.now() - t0 >= 80, 'after a backoff');
  assert.equal(last().name, 'websocket');
  last().end({ code: 1006, reason: 'refused', error: { code: 'overloaded', message: 'later' }, retryAfter: 300 });
  const t1 = Date.now();
  await waitFor('retry after Retry-After', () => attempts.length === 3, 2000);
  assert.ok(Date.now() - t1 >= 280, `waited ${Date.now() - t1} ms`);
  assert.equal(last().name, 'websocket');
  client.logout();
});
