import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Backoff } from '../../src/backoff.js';
import { RecentIds } from '../../src/dedup.js';
import { matches, patternError } from '../../src/pattern.js';
import { SseParser, sseMessage } from '../../src/transports/sse.js';
import { refreshDelay, tokenExpiry } from '../../src/token.js';
import { closeAction, closeCodeForHttp } from '../../src/errors.js';
import { VERSION } from '../../src/index.js';
import { readFileSync } from 'node:fs';

test('backoff: full jitter inside a window that doubles up to max, reset', () => {
  const top = new Backoff({ min: 100, max: 1000 }, () => 0.999999);
  assert.deepEqual([1, 2, 3, 4, 5, 6].map(() => top.next()), [99, 199, 399, 799, 999, 999]);
  top.reset();
  assert.equal(top.next(), 99);
  const bottom = new Backoff({ min: 100, max: 1000 }, () => 0);
  assert.deepEqual([1, 2, 3].map(() => bottom.next()), [0, 0, 0], 'full jitter reaches zero');
  const real = new Backoff({ min: 10, max: 80 });
  for (let i = 0; i < 200; i++) {
    const w = real.window();
    const d = real.next();
    assert.ok(d >= 0 && d < w && w <= 80, `${d} in [0, ${w})`);
  }
  const huge = new Backoff({ min: 1, max: 5000 });
  huge.attempt = 10_000;
  assert.equal(huge.window(), 5000, 'no overflow after many attempts');
  assert.throws(() => new Backoff({ min: 0 }), RangeError);
  assert.throws(() => new Backoff({ min: 10, max: 5 }), RangeError);
});

test('patterns match as the gateway does', () => {
  const cases = [
    ['deal.*.updated', 'deal.stage.updated', true],
    ['deal.*.updated', 'deal.stage.x.updated', false],
    ['activity.*', 'activity.task.completed', true],
    ['activity.*', 'activity', false],
    ['activity.>', 'activity.task', true],
    ['*', 'anything.at.all', true],
    ['>', 'x', true],
    ['deal.stage', 'deal.stage', true],
    ['deal.stage', 'deal.stages', false],
    ['deal.stage', 'deal', false],
    ['entity:Task', 'entity:Task', true],
    ['a.*.c', 'a.b', false],
  ];
  for (const [p, t, want] of cases) assert.equal(matches(p, t), want, `${p} vs ${t}`);
  assert.equal(patternError('deal.*'), null);
  for (const bad of ['', 'a..b', '.a', 'a.', 'a.>.b', 'a b', 'x'.repeat(256), Array(17).fill('a').join('.')]) {
    assert.ok(patternError(bad), `refused: ${bad.slice(0, 20)}`);
  }
});

test('recent ids: repeats refused, oldest forgotten first', () => {
  const r = new RecentIds(3);
  assert.ok(r.add('a') && r.add('b') && r.add('c'));
  assert.equal(r.add('b'), false);
  assert.ok(r.add('d'));
  assert.equal(r.size, 3);
  assert.ok(r.add('a'), 'a was forgotten');
  assert.equal(r.add('d'), false);
});

test('SSE parser: any chunking, CRLF, comments, named events, multi-line data', () => {
  const text = 'retry: 3000\r\n\r\nid: 1-1\r\ndata: {"event_id":"1-1"}\r\n\r\n: keep-alive\n\nevent: resume.gap\ndata: {"reason":\ndata: "expired"}\n\nevent: presence.join\ndata: {"type":"presence.join","data":{"topic":"presence:x"}}\n\n';
  for (let size = 1; size <= text.length; size += 7) {
    const got = [];
    const p = new SseParser((m) => got.push(m));
    for (let i = 0; i < text.length; i += size) p.push(text.slice(i, i + size));
    assert.equal(got.length, 3, `chunk size ${size}`);
    assert.deepEqual(sseMessage(got[0]), { type: 'event', data: { event_id: '1-1' } });
    assert.equal(got[0].id, '1-1');
    assert.deepEqual(sseMessage(got[1]), { type: 'resume.gap', data: { reason: 'expired' } });
    assert.deepEqual(sseMessage(got[2]), { type: 'presence.join', data: { topic: 'presence:x' } });
  }
  assert.equal(sseMessage({ event: '', data: 'not json' }), null);
});

test('tokens: expiry read from the JWT, refresh ahead of it', () => {
  const jwt = (claims) => `h.${Buffer.from(JSON.stringify(claims)).toString('base64url')}.s`;
  assert.equal(tokenExpiry(jwt({ exp: 1795000000 })), 1795000000);
  assert.equal(tokenExpiry(jwt({ exp: 1795000000.5 })), 1795000000.5);
  assert.equal(tokenExpiry(jwt({})), null);
  assert.equal(tokenExpiry('opaque'), null);
  assert.equal(tokenExpiry('a.%%%.b'), null);
  const now = 1_000_000_000_000;
  assert.equal(refreshDelay(now / 1000 + 3600, 60, now), 3540_000, 'a minute ahead');
  assert.equal(refreshDelay(now / 1000 + 30, 60, now), 20_000, 'a third of a short life ahead');
  assert.equal(refreshDelay(now / 1000 - 5, 60, now), 0, 'already expired: at once');
});

test('close codes and HTTP errors map onto what the client does', () => {
  assert.equal(closeAction(4001), 'refresh');
  assert.equal(closeAction(4003), 'stop');
  assert.equal(closeAction(4013), 'stop', 'not resident here: another region must be used');
  assert.equal(closeAction(1012), 'now');
  for (const c of [4002, 4008, 4029, 4030, 1013, 1006, 1009, 3000]) assert.equal(closeAction(c), 'backoff');
  assert.equal(closeCodeForHttp(503, 'overloaded'), 1013);
  assert.equal(closeCodeForHttp(429, 'connect_rate_limited'), 1013);
  assert.equal(closeCodeForHttp(401, 'token_expired'), 4001);
  assert.equal(closeCodeForHttp(403, 'forbidden'), 4003);
  assert.equal(closeCodeForHttp(403, 'residency_violation'), 4013);
  assert.equal(closeCodeForHttp(403, 'topic_not_allowed'), 4400);
  assert.equal(closeCodeForHttp(429, 'too_many_connections'), 4030);
  assert.equal(closeCodeForHttp(503, 'draining'), 1012);
  assert.equal(closeCodeForHttp(503, 'bus_unavailable'), 1006);
});

test('VERSION is the package version', () => {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8'));
  assert.equal(VERSION, pkg.version);
});
