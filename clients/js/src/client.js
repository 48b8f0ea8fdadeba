// The client: one logical connection to a Switchboard gateway that survives
// transport failures, gateway restarts and token expiry without losing or
// repeating an event.
//
// Every delivered event id is the client's cursor. Whatever ends a
// connection, the next one (on whichever transport works) resubscribes with
// that cursor, so the gateway sends what was missed, then live events; ids
// already delivered are dropped. When the gateway cannot honour the cursor
// (`resume.gap`), the app hears it (`gap`) and refreshes from its source of
// truth.
import { Backoff } from './backoff.js';
import { RecentIds } from './dedup.js';
import { Emitter } from './emitter.js';
import { SwitchboardError, closeAction, REFUSED_PATTERN } from './errors.js';
import { matches, requirePattern } from './pattern.js';
import { Presence } from './presence.js';
import { Subscription } from './subscription.js';
import { refreshDelay, tokenExpiry } from './token.js';
import { openWebSocket } from './transports/websocket.js';
import { openSse } from './transports/sse.js';
import { openLongPoll } from './transports/longpoll.js';

/** @typedef {import('./subscription.js').SwitchboardEvent} SwitchboardEvent */
/** @typedef {import('./transports/types.js').Transport} Transport */
/** @typedef {import('./transports/types.js').TransportContext} TransportContext */
/** @typedef {import('./transports/types.js').ServerMessage} ServerMessage */
/** @typedef {import('./transports/types.js').CloseInfo} CloseInfo */
/** @typedef {'websocket' | 'sse' | 'longpoll'} TransportName */
/** @typedef {'disconnected' | 'connecting' | 'connected'} ClientState */

/**
 * @typedef {object} ClientOptions
 * @property {string} url the gateway's base URL, `https://realtime.example.com`
 * @property {string} [token] a fixed token (without `getToken`, expiry ends the session)
 * @property {() => (string | null | undefined | Promise<string | null | undefined>)} [getToken]
 *   returns a token; called at connect, before expiry and after a 4001; null or undefined means logged out
 * @property {TransportName[]} [transports] tried in this order (default websocket, sse, longpoll); one entry forces it
 * @property {import('./backoff.js').BackoffOptions} [backoff] reconnect windows (default 500 ms to 20 s, full jitter)
 * @property {number} [openTimeout] ms a transport may take to open before the next is tried (default 5000)
 * @property {number} [idleTimeout] ms without any byte from the gateway before the connection counts as dead (default 40000)
 * @property {number} [pingInterval] ms between application pings on WebSocket (default 20000)
 * @property {number} [pollTimeout] seconds a long-poll waits (default 25)
 * @property {number} [refreshBefore] seconds before expiry a token is replaced (default 60)
 * @property {number} [publishTimeout] ms a publish waits for its acknowledgement, across reconnects (default 15000)
 * @property {string} [cursor] resume after this event id (e.g. persisted by the app)
 * @property {string} [companyId] sent as `company_id` (must be the token's tenant)
 * @property {string} [region] only events from this region
 * @property {number} [writeDelay] WebSocket only: ms the gateway may hold events that follow one it wrote, to send them together (0-1000; less CPU on both sides for busy feeds, up to this much latency; default 0, or the gateway's own delay if longer)
 * @property {number} [dedupWindow] event ids remembered to drop repeats (default 2048)
 * @property {typeof globalThis.WebSocket} [WebSocket] a WebSocket implementation (Node < 22: the `ws` package)
 * @property {typeof globalThis.fetch} [fetch] a fetch implementation
 * @property {Partial<Record<TransportName, (ctx: TransportContext) => Transport>>} [transportFactories] replaces transports (tests)
 * @property {() => number} [random] jitter source (tests)
 */

/**
 * @typedef {object} ClientEvents
 * @property {{state: ClientState, previous: ClientState}} state
 * @property {{transport: TransportName, connectionId?: string, userId?: string, region?: string}} connected
 * @property {{code: number, reason: string, error?: SwitchboardError}} disconnected
 * @property {SwitchboardEvent} event every event, also those of no Subscription (the user's channel)
 * @property {{reason: string, requested: string, message?: string}} gap
 * @property {{topic: string, eventIds: string[]}} erased events the app may hold were erased (a data subject's right to be forgotten): drop its copies
 * @property {SwitchboardError} error
 */

/**
 * @typedef {object} PublishAck
 * @property {string} event_id
 * @property {string} cursor
 * @property {string} topic
 * @property {boolean} duplicate
 * @property {string} timestamp
 */

/**
 * @typedef {object} PendingPublish
 * @property {Record<string, unknown>} frame
 * @property {(ack: PublishAck) => void} resolve
 * @property {(err: SwitchboardError) => void} reject
 * @property {ReturnType<typeof setTimeout>} timer
 */

/**
 * @typedef {{kind: 'subscribe', subs: Subscription[], errors: SwitchboardError[]}
 *   | {kind: 'presence', presence: Presence}
 *   | {kind: 'publish', publish: PendingPublish}
 *   | {kind: 'refresh'}} PendingRequest
 */

const DEFAULT_TRANSPORTS = /** @type {TransportName[]} */ (['websocket', 'sse', 'longpoll']);
/** A connection that lived this long resets the backoff. */
const STABLE_MS = 5000;

/** @type {Record<TransportName, (ctx: TransportContext) => Transport>} */
const FACTORIES = { websocket: openWebSocket, sse: openSse, longpoll: openLongPoll };

/** @extends {Emitter<ClientEvents>} */
export class Client extends Emitter {
  /** @param {ClientOptions} options */
  constructor(options) {
    super();
    if (!options || typeof options.url !== 'string') throw new TypeError('options.url is required');
    const transports = options.transports ?? DEFAULT_TRANSPORTS;
    for (const t of transports) if (!(t in FACTORIES)) throw new TypeError(`unknown transport ${JSON.stringify(t)}`);
    if (transports.length === 0) throw new TypeError('options.transports is empty');
    /** @private */
    this.options = options;
    /**
     * @private
     * @type {TransportName[]}
     */
    this.transports = [...transports];
    /** @private */
    this.factories = { ...FACTORIES, ...options.transportFactories };
    /** @private */
    this.backoff = new Backoff(options.backoff, options.random);
    /** @private */
    this.dedup = new RecentIds(options.dedupWindow);
    /** @type {ClientState} */
    this.state = 'disconnected';
    /** the last event id delivered (or a position the gateway gave): where the next connection resumes */
    this.cursor = options.cursor ?? null;
    /**
     * @private
     * @type {string | null}
     */
    this.token = options.token ?? null;
    /** @private */
    this.getToken = options.getToken ?? null;
    /**
     * @private
     * @type {Map<string, Subscription>}
     */
    this.subs = new Map();
    /**
     * @private
     * @type {Map<string, Presence>}
     */
    this.presences = new Map();
    /**
     * @private
     * @type {Set<PendingPublish>}
     */
    this.publishes = new Set();
    /**
     * @private
     * @type {Map<number, PendingRequest>}
     */
    this.pending = new Map();
    this.stats = { events: 0, duplicates: 0, reconnects: 0, gaps: 0 };
    /**
     * @private
     * @type {Transport | null}
     */
    this.transport = null;
    /** the transport that last opened: tried first next time */
    /**
     * @private
     * @type {TransportName | null}
     */
    this.remembered = null;
    /**
     * @private
     * @type {Set<TransportName>} transports tried since the last open or backoff
     */
    this.tried = new Set();
    /** @private */
    this.open = false;
    /** @private */
    this.openedAt = 0;
    /** @private */
    this.generation = 0;
    /** @private */
    this.requestIds = 0;
    /** @private */
    this.stopped = true;
    /** @private */
    this.reconnectNow = false;
    /** @private */
    this.flushQueued = false;
    /**
     * @private
     * an HTTP transport waits for its first topic
     */
    this.awaitingTopics = false;
    /** @type {{userId?: string, connectionId?: string, region?: string, expiresAt?: number}} */
    this.connection = {};
    /**
     * @private
     * @type {Record<string, ReturnType<typeof setTimeout> | undefined>}
     */
    this.timers = {};
  }

  // ---- connection lifecycle ------------------------------------------------

  /** Connect (a no-op when already connecting or connected). */
  connect() {
    if (!this.stopped) return;
    this.stopped = false;
    this.setState('connecting');
    this.tried.clear();
    void this.attempt();
  }

  /**
   * Close the connection but keep subscriptions, cursor and pending
   * publishes: `connect()` resumes where it stopped.
   */
  disconnect() {
    this.stopped = true;
    this.generation += 1;
    this.clearTimers();
    const t = this.transport;
    this.transport = null;
    this.open = false;
    t?.close(1000, 'client disconnect');
    this.afterClose();
    this.setState('disconnected');
  }

  /**
   * Log out: disconnect and drop everything tied to the user (subscriptions,
   * presence, cursor, seen ids, token, pending publishes).
   */
  logout() {
    this.disconnect();
    for (const sub of [...this.subs.values()]) sub.setState('unsubscribed');
    for (const p of [...this.presences.values()]) p.setState('unsubscribed');
    this.subs.clear();
    this.presences.clear();
    for (const p of [...this.publishes]) this.settlePublish(p, new SwitchboardError('logged_out', 'logged out before the publish was acknowledged'));
    this.cursor = null;
    this.dedup.clear();
    this.token = null;
    this.getToken = null;
    this.remembered = null;
    this.connection = {};
  }

  /**
   * Log in (as another user, after `logout()`, or the first time) and connect.
   * @param {{token?: string, getToken?: ClientOptions['getToken']}} credentials
   */
  login(credentials) {
    if (!this.stopped) this.logout();
    this.token = credentials.token ?? null;
    this.getToken = credentials.getToken ?? null;
    this.connect();
  }

  /**
   * @param {ClientState} state
   * @private
   */
  setState(state) {
    const previous = this.state;
    if (previous === state) return;
    this.state = state;
    this.emit('state', { state, previous });
  }

  /** @private */
  clearTimers() {
    for (const [k, t] of Object.entries(this.timers)) {
      clearTimeout(t);
      clearInterval(t);
      delete this.timers[k];
    }
  }

  /**
   * @private
   * The token to connect with, asking `getToken` when there is none or it is about to expire.
   */
  async currentToken() {
    const fresh = this.token && (() => {
      const exp = tokenExpiry(/** @type {string} */ (this.token));
      return exp === null || exp * 1000 > Date.now() + 1000;
    })();
    if (fresh || !this.getToken) return this.token;
    this.token = (await this.getToken()) ?? null;
    return this.token;
  }

  /**
   * @private
   * The transport to try next: the remembered one, else the first untried.
   */
  nextTransport() {
    if (this.remembered && !this.tried.has(this.remembered) && this.transports.includes(this.remembered)) return this.remembered;
    return this.transports.find((t) => !this.tried.has(t)) ?? null;
  }

  /**
   * @private
   * The patterns every new connection holds.
   */
  topics() {
    const topics = [...this.subs.values()].filter((s) => s.state !== 'failed').map((s) => s.pattern);
    for (const p of this.presences.values()) if (!topics.includes(p.topic)) topics.push(p.topic);
    return topics;
  }

  /** @private */
  async attempt() {
    const generation = ++this.generation;
    this.awaitingTopics = false;
    let token;
    try {
      token = await this.currentToken();
    } catch (err) {
      if (generation !== this.generation || this.stopped) return;
      this.emit('error', new SwitchboardError('token_unavailable', `getToken failed: ${String(/** @type {Error} */ (err)?.message ?? err)}`));
      this.schedule(this.backoff.next());
      return;
    }
    if (generation !== this.generation || this.stopped) return;
    if (!token) {
      this.stop(new SwitchboardError('unauthorized', 'no token: log in first (getToken returned none)'));
      return;
    }
    const name = this.nextTransport() ?? this.transports[0];
    this.tried.add(name);
    const topics = this.topics();
    if (name !== 'websocket' && topics.length === 0) {
      // An HTTP stream needs topics: it opens with the first subscription.
      this.transport = null;
      this.open = false;
      this.awaitingTopics = true;
      this.tried.delete(name);
      return;
    }
    const o = this.options;
    /** @type {Record<string, string>} */
    const query = {};
    if (o.companyId) query.company_id = o.companyId;
    if (o.region) query.region = o.region;
    if (name === 'websocket' && o.writeDelay) query.write_delay_ms = String(o.writeDelay);
    const openTimeout = o.openTimeout ?? 5000;
    /** @type {TransportContext} */
    const ctx = {
      baseUrl: o.url,
      token: () => this.token ?? token,
      topics,
      cursor: this.cursor,
      query,
      idleTimeout: o.idleTimeout ?? 40000,
      pollTimeout: o.pollTimeout ?? 25,
      WebSocket: o.WebSocket,
      fetch: o.fetch ?? globalThis.fetch.bind(globalThis),
      onOpen: () => generation === this.generation && this.onOpen(),
      onMessage: (m) => generation === this.generation && this.onMessage(m),
      onClose: (info) => generation === this.generation && this.onClose(info),
    };
    this.transport = this.factories[name](ctx);
    this.timers.open = setTimeout(() => {
      if (generation === this.generation && !this.open) this.transport?.close(3000, 'open timeout');
    }, openTimeout);
  }

  /** @private */
  onOpen() {
    const t = /** @type {Transport} */ (this.transport);
    clearTimeout(this.timers.open);
    this.open = true;
    this.openedAt = Date.now();
    this.remembered = t.name;
    this.tried.clear();
    if (t.canSend) {
      this.resubscribe();
      for (const p of this.publishes) this.sendPublish(p);
      this.watchLiveness();
    } else {
      for (const s of this.subs.values()) if (s.state === 'subscribing') s.setState('subscribed');
      for (const p of this.presences.values()) if (p.state === 'subscribing') p.setState('subscribed');
      for (const p of [...this.publishes]) this.settlePublish(p, unsupported('publish'));
    }
    this.scheduleRefresh();
    this.setState('connected');
    this.emit('connected', { transport: t.name, ...this.connection });
  }

  /**
   * @private
   * WebSocket: an application ping, and a watchdog on silence.
   */
  watchLiveness() {
    const o = this.options;
    this.timers.ping = setInterval(() => this.transport?.send({ type: 'ping' }), o.pingInterval ?? 20000);
    this.kickIdle();
  }

  /** @private */
  kickIdle() {
    if (!this.transport?.canSend) return;
    clearTimeout(this.timers.idle);
    this.timers.idle = setTimeout(() => this.transport?.close(3001, 'no data from the gateway (stalled network)'), this.options.idleTimeout ?? 40000);
  }

  /**
   * @param {CloseInfo} info
   * @private
   */
  onClose(info) {
    const lived = this.open ? Date.now() - this.openedAt : 0;
    this.clearTimers();
    this.transport = null;
    this.open = false;
    this.afterClose();
    const error = info.error ? new SwitchboardError(info.error.code, info.error.message, { status: info.error.status }) : undefined;
    this.emit('disconnected', error ? { code: info.code, reason: info.reason, error } : { code: info.code, reason: info.reason });
    if (this.stopped) return;
    this.stats.reconnects += 1;
    this.setState('connecting');
    if (this.reconnectNow) {
      this.reconnectNow = false;
      this.tried.clear();
      this.schedule(0);
      return;
    }
    if (info.code === REFUSED_PATTERN) {
      this.refusePattern(error);
      this.schedule(0);
      return;
    }
    switch (closeAction(info.code)) {
      case 'stop':
        this.stop(
          error ??
            (info.code === 4013
              ? new SwitchboardError('residency_violation', info.reason || "this tenant's data may not live in this gateway's region")
              : new SwitchboardError('forbidden', info.reason || 'the gateway refused this tenant')),
        );
        return;
      case 'refresh':
        // A new token; without a way to get one the session is over.
        if (!this.getToken) {
          this.stop(error ?? new SwitchboardError('unauthorized', info.reason || 'token refused'));
          return;
        }
        this.token = null;
        this.tried.clear();
        this.schedule(this.backoff.next());
        return;
      case 'now':
        this.tried.clear();
        this.schedule(0);
        return;
      default:
        if (transportFailed(info) && this.nextTransport()) {
          this.schedule(0); // fall back to the next transport at once
          return;
        }
        if (lived >= STABLE_MS) this.backoff.reset();
        this.tried.clear();
        // A gateway that said when to come back (Retry-After) is not asked sooner.
        this.schedule(Math.max(this.backoff.next(), info.retryAfter ?? 0));
    }
  }

  /**
   * @private
   * A connection ended: what was in flight waits for the next one.
   */
  afterClose() {
    for (const req of this.pending.values()) if (req.kind === 'subscribe') for (const s of req.subs) s.requested = false;
    this.pending.clear();
    for (const s of this.subs.values()) {
      s.requested = false;
      if (s.state === 'subscribed') s.setState('subscribing');
    }
    for (const p of this.presences.values()) if (p.state === 'subscribed') p.setState('subscribing');
  }

  /**
   * @param {SwitchboardError} error
   * @private
   */
  stop(error) {
    this.stopped = true;
    this.clearTimers();
    this.setState('disconnected');
    this.emit('error', error);
  }

  /**
   * @private
   * @param {number} delay
   */
  schedule(delay) {
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = setTimeout(() => {
      delete this.timers.reconnect;
      void this.attempt();
    }, delay);
  }

  /**
   * An HTTP stream was refused for one of its patterns: mark it failed (the
   * gateway's message quotes it) and go on with the others.
   * @param {SwitchboardError | undefined} error
   * @private
   */
  refusePattern(error) {
    const quoted = /"([^"]+)"/.exec(error?.message ?? '')?.[1];
    const err = error ?? new SwitchboardError('topic_not_allowed', 'refused');
    const culprits = [...this.subs.values()].filter((s) => s.pattern === quoted);
    const presences = [...this.presences.values()].filter((p) => p.topic === quoted);
    if (culprits.length + presences.length === 0) {
      for (const s of this.subs.values()) s.setState('failed', err);
      for (const p of [...this.presences.values()]) {
        p.setState('failed', err);
        this.presences.delete(p.topic);
      }
      return;
    }
    for (const s of culprits) s.setState('failed', err);
    for (const p of presences) {
      p.setState('failed', err);
      this.presences.delete(p.topic);
    }
  }

  // ---- messages ------------------------------------------------------------

  /**
   * @private
   * @param {ServerMessage} msg
   */
  onMessage(msg) {
    this.kickIdle();
    const data = msg.data ?? {};
    const rid = typeof msg.requestId === 'number' ? msg.requestId : null;
    const req = rid === null ? undefined : this.pending.get(rid);
    switch (msg.type) {
      case 'event':
        this.deliver(data);
        break;
      case 'cursor':
        if (typeof data.cursor === 'string') this.cursor = data.cursor;
        break;
      case 'connection.established':
        this.connection = { userId: data.user_id, connectionId: data.connection_id, region: data.region, expiresAt: data.expires_at };
        break;
      case 'subscription.confirmed':
        if (this.cursor === null && typeof data.cursor === 'string') this.cursor = data.cursor;
        if (req?.kind === 'subscribe') {
          this.pending.delete(/** @type {number} */ (rid));
          const held = new Set(Array.isArray(data.topics) ? data.topics : []);
          for (const s of req.subs) {
            if (this.subs.get(s.pattern) !== s || s.state !== 'subscribing') continue;
            if (held.has(s.pattern)) s.setState('subscribed');
            else s.setState('failed', req.errors[0] ?? new SwitchboardError('topic_not_allowed', `${s.pattern} was refused`));
          }
        } else if (req?.kind === 'presence') {
          this.pending.delete(/** @type {number} */ (rid));
          if (this.presences.get(req.presence.topic) === req.presence) req.presence.setState('subscribed');
        }
        break;
      case 'error':
        this.onError(data, rid, req);
        break;
      case 'publish.ack':
        if (req?.kind === 'publish') {
          this.pending.delete(/** @type {number} */ (rid));
          this.settlePublish(req.publish, null, data);
        }
        break;
      case 'auth.refreshed':
        if (req) this.pending.delete(/** @type {number} */ (rid));
        if (typeof data.expires_at === 'number') this.connection.expiresAt = data.expires_at;
        this.scheduleRefresh();
        break;
      case 'resume.gap':
        this.stats.gaps += 1;
        this.emit('gap', { reason: String(data.reason), requested: String(data.requested), message: data.message });
        break;
      case 'reconnect':
        // The gateway drains (or found us slow): resume elsewhere at once
        // from the position it gave.
        if (typeof data.cursor === 'string') this.cursor = data.cursor;
        this.reconnectNow = true;
        this.transport?.close(1000, 'gateway asked to reconnect');
        break;
      case 'subscription.revoked':
        for (const topic of Array.isArray(data.topics) ? data.topics : []) {
          this.subs.get(topic)?.setState('failed', new SwitchboardError('revoked', String(data.reason ?? 'revoked by policy')));
        }
        break;
      case 'data.erased': {
        const ids = Array.isArray(data.data?.event_ids) ? data.data.event_ids.map(String) : [];
        this.emit('erased', { topic: String(data.topic), eventIds: ids });
        break;
      }
      case 'presence.sync':
      case 'presence.join':
      case 'presence.leave':
        this.presences.get(data.topic)?.apply(msg.type, data.data);
        break;
      default:
        // pong, unsubscription.confirmed, replay.complete, cursor.confirmed, presence.left
        break;
    }
  }

  /**
   * @param {any} data
   * @param {number | null} rid
   * @param {PendingRequest | undefined} req
   * @private
   */
  onError(data, rid, req) {
    const err = new SwitchboardError(String(data.code), String(data.message ?? ''), { requestId: rid ?? undefined });
    if (!req) {
      if (err.code !== 'token_expired') this.emit('error', err);
      return;
    }
    const id = /** @type {number} */ (rid);
    switch (req.kind) {
      case 'subscribe': {
        req.errors.push(err);
        const open = req.subs.filter((s) => s.state === 'subscribing' && this.subs.get(s.pattern) === s);
        // One error per refused pattern (ten at most, then a summary); a
        // frame refused whole gets no confirmation.
        if (req.errors.length >= req.subs.length || err.message.includes('more patterns')) {
          this.pending.delete(id);
          for (const s of open) s.setState('failed', err);
        } else if (req.subs.length === 1) {
          this.pending.delete(id);
          for (const s of open) s.setState('failed', err);
        }
        break;
      }
      case 'presence':
        this.pending.delete(id);
        req.presence.setState('failed', err);
        this.presences.delete(req.presence.topic);
        break;
      case 'publish':
        this.pending.delete(id);
        this.settlePublish(req.publish, err);
        break;
      case 'refresh':
        // The refresh was refused: reconnect with a new token.
        this.pending.delete(id);
        this.token = null;
        this.reconnectNow = true;
        this.transport?.close(1000, 'token refresh refused');
        break;
    }
  }

  /**
   * @private
   * @param {any} event
   */
  deliver(event) {
    if (!event || typeof event.event_id !== 'string') return;
    if (!this.dedup.add(event.event_id)) {
      this.stats.duplicates += 1;
      return;
    }
    this.cursor = event.event_id;
    this.stats.events += 1;
    const topic = String(event.event_type);
    for (const s of this.subs.values()) {
      if (s.state !== 'failed' && matches(s.pattern, topic)) s.deliver(event);
    }
    this.presences.get(topic)?.emit('event', event);
    this.emit('event', event);
  }

  // ---- subscriptions -------------------------------------------------------

  /** The live subscriptions (not the unsubscribed), in the order they were made. */
  get subscriptions() {
    return [...this.subs.values()];
  }

  /**
   * Subscribe to a pattern. Idempotent: the same pattern returns the same
   * Subscription while it lives, so components that subscribe on every
   * render share one.
   * @param {string} pattern
   * @param {{onEvent?: (event: SwitchboardEvent) => void}} [options]
   * @returns {Subscription}
   */
  subscribe(pattern, options = {}) {
    requirePattern(pattern);
    let sub = this.subs.get(pattern);
    if (!sub) {
      sub = new Subscription(pattern, {
        unsubscribe: (s) => this.dropSubscription(s),
        resubscribe: () => this.changed(),
      });
      this.subs.set(pattern, sub);
      this.changed();
    } else if (sub.state === 'failed') {
      sub.subscribe();
    }
    if (options.onEvent) sub.on('event', options.onEvent);
    return sub;
  }

  /**
   * @private
   * @param {Subscription} sub
   */
  dropSubscription(sub) {
    if (this.subs.get(sub.pattern) !== sub) return;
    this.subs.delete(sub.pattern);
    if (this.transport?.canSend) {
      if (sub.requested) this.transport.send({ type: 'unsubscribe', topics: [sub.pattern] });
    } else this.changed();
  }

  /**
   * @private
   * Subscriptions changed: tell the gateway (batched per tick).
   */
  changed() {
    if (this.flushQueued) return;
    this.flushQueued = true;
    queueMicrotask(() => {
      this.flushQueued = false;
      this.flush();
    });
  }

  /** @private */
  flush() {
    if (this.stopped) return;
    const t = this.transport;
    if (t?.canSend) {
      if (!this.open) return; // sent with everything else on open
      const fresh = [...this.subs.values()].filter((s) => s.state === 'subscribing' && !s.requested);
      if (fresh.length > 0) this.sendSubscribe(fresh, null);
      return;
    }
    if (this.awaitingTopics) {
      void this.attempt(); // an HTTP stream waiting for its first topic
      return;
    }
    if (t) {
      // An HTTP stream holds a fixed set of topics: reopen it from the cursor.
      this.reconnectNow = true;
      t.close(1000, 'subscriptions changed');
    }
  }

  /**
   * @private
   * A new WebSocket connection: everything at once, from the cursor.
   */
  resubscribe() {
    const subs = [...this.subs.values()].filter((s) => s.state === 'subscribing' || s.state === 'subscribed');
    const extra = [...this.presences.values()].map((p) => p.topic).filter((t) => !this.subs.has(t));
    if (subs.length > 0 || extra.length > 0) this.sendSubscribe(subs, this.cursor, extra);
    for (const p of this.presences.values()) this.sendPresenceJoin(p);
  }

  /**
   * @param {Subscription[]} subs
   * @param {string | null} cursor
   * @param {string[]} [extra] presence topics, subscribed with the cursor so their events replay too
   * @private
   */
  sendSubscribe(subs, cursor, extra = []) {
    const requestId = ++this.requestIds;
    for (const s of subs) s.requested = true;
    this.pending.set(requestId, { kind: 'subscribe', subs, errors: [] });
    /** @type {Record<string, unknown>} */
    const frame = { type: 'subscribe', topics: [...subs.map((s) => s.pattern), ...extra], requestId };
    if (cursor) frame.cursor = cursor;
    this.transport?.send(frame);
  }

  // ---- presence and rooms --------------------------------------------------

  /**
   * Join a presence topic (a room): become a member with `info`, receive
   * the member list, joins, leaves, and the room's events. Idempotent per
   * topic (joining again replaces `info`).
   * @param {string} topic `presence:<resource>` or a topic the policy marks as presence
   * @param {{info?: Record<string, unknown>}} [options]
   * @returns {Presence}
   */
  presence(topic, options = {}) {
    requirePattern(topic, 'topic');
    let p = this.presences.get(topic);
    if (p && options.info === undefined) return p;
    if (!p) {
      p = new Presence(topic, options.info, { leave: (x) => this.leavePresence(x) });
      this.presences.set(topic, p);
    } else p.info = options.info;
    if (this.transport?.canSend && this.open) this.sendPresenceJoin(p);
    else if (!this.transport?.canSend) this.changed();
    return p;
  }

  /**
   * @private
   * @param {Presence} p
   */
  sendPresenceJoin(p) {
    const requestId = ++this.requestIds;
    this.pending.set(requestId, { kind: 'presence', presence: p });
    /** @type {Record<string, unknown>} */
    const frame = { type: 'presence.join', topic: p.topic, requestId };
    if (p.info !== undefined) frame.info = p.info;
    this.transport?.send(frame);
  }

  /**
   * @private
   * @param {Presence} p
   */
  leavePresence(p) {
    if (this.presences.get(p.topic) !== p) return;
    this.presences.delete(p.topic);
    if (this.transport?.canSend) {
      this.transport.send({ type: 'presence.leave', topic: p.topic });
      if (this.subs.has(p.topic)) this.sendSubscribe([], null, [p.topic]);
    } else this.changed();
  }

  // ---- publishing ----------------------------------------------------------

  /**
   * Publish from the client (the tenant's policy must list the topic under
   * `client_publish`). Resolves with the gateway's acknowledgement once the
   * event is stored. Safe to retry: an idempotency key (generated when not
   * given) makes a resend after a reconnect a duplicate, not a second event.
   * WebSocket only.
   * @param {string} topic
   * @param {unknown} data
   * @param {{idempotencyKey?: string, messageType?: string, timeout?: number}} [options]
   * @returns {Promise<PublishAck>}
   */
  publish(topic, data, options = {}) {
    if (this.open && !this.transport?.canSend) return Promise.reject(unsupported('publish'));
    const idempotencyKey = options.idempotencyKey ?? randomKey();
    return new Promise((resolve, reject) => {
      /** @type {Record<string, unknown>} */
      const frame = { type: 'publish', topic, data, idempotencyKey };
      if (options.messageType) frame.messageType = options.messageType;
      /** @type {PendingPublish} */
      const p = {
        frame,
        resolve,
        reject,
        timer: setTimeout(
          () => this.settlePublish(p, new SwitchboardError('timeout', `no acknowledgement for ${topic} within ${options.timeout ?? this.options.publishTimeout ?? 15000} ms`)),
          options.timeout ?? this.options.publishTimeout ?? 15000,
        ),
      };
      this.publishes.add(p);
      if (this.open && this.transport?.canSend) this.sendPublish(p);
    });
  }

  /**
   * @private
   * @param {PendingPublish} p
   */
  sendPublish(p) {
    const requestId = ++this.requestIds;
    this.pending.set(requestId, { kind: 'publish', publish: p });
    this.transport?.send({ ...p.frame, requestId });
  }

  /**
   * @param {PendingPublish} p
   * @param {SwitchboardError | null} err
   * @param {PublishAck} [ack]
   * @private
   */
  settlePublish(p, err, ack) {
    if (!this.publishes.delete(p)) return;
    clearTimeout(p.timer);
    for (const [id, req] of this.pending) if (req.kind === 'publish' && req.publish === p) this.pending.delete(id);
    if (err) p.reject(err);
    else p.resolve(/** @type {PublishAck} */ (ack));
  }

  // ---- tokens --------------------------------------------------------------

  /**
   * @private
   * Replace the token ahead of its expiry (when `getToken` can).
   */
  scheduleRefresh() {
    clearTimeout(this.timers.refresh);
    if (!this.getToken || !this.token) return;
    const exp = tokenExpiry(this.token) ?? this.connection.expiresAt;
    if (!exp) return;
    this.timers.refresh = setTimeout(() => void this.refresh(), refreshDelay(exp, this.options.refreshBefore ?? 60));
  }

  /** @private */
  async refresh() {
    if (!this.getToken || this.stopped) return;
    const generation = this.generation;
    let token;
    try {
      token = await this.getToken();
    } catch (err) {
      this.emit('error', new SwitchboardError('token_unavailable', `getToken failed: ${String(/** @type {Error} */ (err)?.message ?? err)}`));
      this.timers.refresh = setTimeout(() => void this.refresh(), 5000);
      return;
    }
    if (generation !== this.generation || this.stopped) return;
    if (!token) {
      this.logout();
      return;
    }
    this.token = token;
    const t = this.transport;
    if (t?.canSend && this.open) {
      const requestId = ++this.requestIds;
      this.pending.set(requestId, { kind: 'refresh' });
      t.send({ type: 'auth.refresh', token, requestId });
    } else if (t?.name === 'sse') {
      // A stream carries its token from the start: reopen it from the cursor.
      this.reconnectNow = true;
      t.close(1000, 'token refresh');
    } else {
      this.scheduleRefresh(); // long-poll reads the token at every request
    }
  }
}

/**
 * Whether a connection failed because the transport did not work (it never
 * opened and the gateway said nothing: a proxy ate it, a timeout), as
 * opposed to the gateway refusing it (1013, 4030, ...), which another
 * transport would not change.
 * @param {CloseInfo} info
 */
function transportFailed(info) {
  return !info.opened && !info.error && [1002, 1006, 1015, 3000].includes(info.code);
}

/** @param {string} what */
function unsupported(what) {
  return new SwitchboardError('unsupported_transport', `${what} needs the WebSocket transport (this connection uses an HTTP fallback)`);
}

function randomKey() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  return `k-${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}
