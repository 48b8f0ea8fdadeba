// One connection shared by the tabs of an origin.
//
// Every tab makes a `SharedClient`; one of them (the leader: whoever holds
// a Web Lock named after the gateway) runs the real `Client` and its one
// connection, subscribed to every pattern any tab holds. It passes each
// event to all tabs over a BroadcastChannel; each tab hands it to its own
// subscriptions and drops ids it already delivered. When the leader's tab
// closes its lock is released, another tab takes it and connects, resuming
// from the last event id the tabs saw, so every tab still sees every event
// once and in order. Publishes from any tab go through the leader and are
// sent again (same idempotency key) if it changes before acknowledging.
import { Client } from './client.js';
import { RecentIds } from './dedup.js';
import { Emitter } from './emitter.js';
import { SwitchboardError } from './errors.js';
import { matches, patternError, requirePattern } from './pattern.js';
import { Subscription } from './subscription.js';

/** @typedef {import('./subscription.js').SwitchboardEvent} SwitchboardEvent */
/** @typedef {import('./subscription.js').SubscriptionState} SubscriptionState */
/** @typedef {import('./client.js').ClientOptions} ClientOptions */
/** @typedef {import('./client.js').ClientState} ClientState */
/** @typedef {import('./client.js').PublishAck} PublishAck */

/**
 * What the SDK needs of `navigator.locks` (the Web Locks API).
 * @typedef {{request: (name: string, callback: () => Promise<void>) => Promise<unknown>}} LockManager
 */

/**
 * What the SDK needs of a BroadcastChannel.
 * @typedef {object} Channel
 * @property {(message: unknown) => void} postMessage
 * @property {(type: 'message', listener: (e: {data: any}) => void) => void} addEventListener
 * @property {() => void} close
 */

/**
 * @typedef {object} SharedOptionsOnly
 * @property {string} [name] what tabs sharing a connection agree on (default: the gateway URL)
 * @property {LockManager} [locks] default `navigator.locks`
 * @property {(name: string) => Channel} [channel] default `new BroadcastChannel(name)`
 * @property {number} [heartbeat] ms between a tab's announcements of its patterns (default 5000); a tab silent for three is gone
 */

/** @typedef {ClientOptions & SharedOptionsOnly} SharedClientOptions */

/**
 * @typedef {object} SharedClientEvents
 * @property {{state: ClientState, previous: ClientState}} state the shared connection's state
 * @property {SwitchboardEvent} event every event this tab receives
 * @property {{reason: string, requested: string, message?: string}} gap
 * @property {{topic: string, eventIds: string[]}} erased
 * @property {{leader: boolean}} role this tab became the leader, or stopped being it
 * @property {SwitchboardError} error
 */

/** @param {ClientState} s */
const isState = (s) => s === 'disconnected' || s === 'connecting' || s === 'connected';

const randomId = () => Math.random().toString(36).slice(2) + Date.now().toString(36);

/** @extends {Emitter<SharedClientEvents>} */
export class SharedClient extends Emitter {
  /** @param {SharedClientOptions} options */
  constructor(options) {
    super();
    if (!options || typeof options.url !== 'string') throw new TypeError('options.url is required');
    const locks = options.locks ?? /** @type {any} */ (globalThis).navigator?.locks;
    if (!locks) throw new TypeError('sharing a connection needs the Web Locks API (navigator.locks) or options.locks');
    /** @private */
    this.options = options;
    /** @private */
    this.locks = /** @type {LockManager} */ (locks);
    /** @private */
    this.name = `switchboard:${options.name ?? options.url}`;
    /** @private */
    this.makeChannel = options.channel ?? ((/** @type {string} */ n) => /** @type {Channel} */ (new BroadcastChannel(n)));
    /** this tab's id among the tabs sharing the connection */
    this.tabId = randomId();
    /** @type {ClientState} the shared connection's state, as the leader last said */
    this.state = 'disconnected';
    /** whether this tab runs the connection */
    this.isLeader = false;
    /** the last event id this tab saw: where a new leader resumes */
    this.cursor = options.cursor ?? null;
    /** @private */
    this.dedup = new RecentIds(options.dedupWindow);
    /**
     * @private
     * @type {Map<string, Subscription>}
     */
    this.subs = new Map();
    /**
     * @private
     * every tab's patterns and when it last said so (this tab's too)
     * @type {Map<string, {patterns: string[], at: number}>}
     */
    this.tabs = new Map();
    /**
     * @private
     * @type {Map<string, {message: Record<string, unknown>, resolve: (a: PublishAck) => void, reject: (e: Error) => void, timer: ReturnType<typeof setTimeout>}>}
     */
    this.publishes = new Map();
    /**
     * @private
     * the leader's client
     * @type {Client | null}
     */
    this.client = null;
    /**
     * @private
     * @type {Channel | null}
     */
    this.channel = null;
    /**
     * @private
     * @type {(() => void) | null} gives the lock back
     */
    this.release = null;
    /**
     * @private
     * @type {ReturnType<typeof setInterval> | undefined}
     */
    this.beat = undefined;
    /**
     * @private
     * @type {(() => void) | null}
     */
    this.onPageHide = null;
    /** @private */
    this.stopped = true;
  }

  /** Join the tabs sharing the connection (and run it if no tab does). */
  connect() {
    if (!this.stopped) return;
    this.stopped = false;
    const channel = this.makeChannel(this.name);
    this.channel = channel;
    channel.addEventListener('message', (e) => this.onMessage(e.data));
    this.announce();
    this.post({ t: 'hello' });
    this.beat = setInterval(() => {
      this.announce();
      this.prune();
    }, this.options.heartbeat ?? 5000);
    // A closing tab says so, so that the leader drops its patterns at once
    // (not three heartbeats later).
    this.onPageHide = () => this.post({ t: 'bye' });
    globalThis.addEventListener?.('pagehide', this.onPageHide);
    void this.locks.request(this.name, () => this.lead());
  }

  /**
   * Leave: drop this tab's subscriptions and publishes; the connection
   * moves to another tab if this one ran it.
   */
  logout() {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.beat);
    if (this.onPageHide) globalThis.removeEventListener?.('pagehide', this.onPageHide);
    for (const sub of [...this.subs.values()]) sub.setState('unsubscribed');
    this.subs.clear();
    for (const id of [...this.publishes.keys()]) this.settle(id, new SwitchboardError('logged_out', 'logged out before the publish was acknowledged'));
    this.post({ t: 'bye' });
    this.client?.logout();
    this.client = null;
    this.release?.();
    this.release = null;
    this.channel?.close();
    this.channel = null;
    this.tabs.clear();
    this.cursor = null;
    this.dedup.clear();
    this.setRole(false);
    this.setState('disconnected');
  }

  /**
   * Subscribe to a pattern in this tab. Idempotent, as `Client.subscribe`.
   * @param {string} pattern
   * @param {{onEvent?: (event: SwitchboardEvent) => void}} [options]
   * @returns {Subscription}
   */
  subscribe(pattern, options = {}) {
    requirePattern(pattern);
    let sub = this.subs.get(pattern);
    if (!sub) {
      sub = new Subscription(pattern, {
        unsubscribe: (s) => {
          if (this.subs.get(s.pattern) === s) this.subs.delete(s.pattern);
          this.announce();
        },
        resubscribe: () => this.announce(),
      });
      this.subs.set(pattern, sub);
      this.announce();
      // The leader may hold it already (for another tab).
      const held = this.client?.subscriptions.find((s) => s.pattern === pattern);
      if (held) sub.setState(held.state, held.error ?? undefined);
    } else if (sub.state === 'failed') {
      sub.subscribe();
    }
    if (options.onEvent) sub.on('event', options.onEvent);
    return sub;
  }

  /** This tab's live subscriptions. */
  get subscriptions() {
    return [...this.subs.values()];
  }

  /**
   * Publish through the shared connection; acknowledged as `Client.publish`.
   * @param {string} topic
   * @param {unknown} data
   * @param {{idempotencyKey?: string, messageType?: string, timeout?: number}} [options]
   * @returns {Promise<PublishAck>}
   */
  publish(topic, data, options = {}) {
    if (this.stopped) return Promise.reject(new SwitchboardError('disconnected', 'connect() first'));
    const id = randomId();
    const timeout = options.timeout ?? this.options.publishTimeout ?? 15000;
    const message = {
      t: 'publish',
      id,
      topic,
      data,
      options: { idempotencyKey: options.idempotencyKey ?? randomId(), messageType: options.messageType, timeout },
    };
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => this.settle(id, new SwitchboardError('timeout', `no acknowledgement for ${topic} within ${timeout} ms`)), timeout);
      this.publishes.set(id, { message, resolve, reject, timer });
      this.sendPublish(message);
    });
  }

  // ---- internals -----------------------------------------------------------

  /**
   * @private
   * @param {Record<string, unknown>} message
   */
  post(message) {
    this.channel?.postMessage({ ...message, from: this.tabId });
  }

  /** @private Tell every tab (and the leader) which patterns this tab holds. */
  announce() {
    if (this.stopped) return;
    const patterns = [...this.subs.values()].filter((s) => s.state !== 'failed' && s.state !== 'unsubscribed').map((s) => s.pattern);
    this.tabs.set(this.tabId, { patterns, at: Date.now() });
    this.post({ t: 'subs', patterns });
    this.reconcile();
  }

  /** @private Forget tabs silent for three heartbeats (closed without a word). */
  prune() {
    const silent = Date.now() - 3 * (this.options.heartbeat ?? 5000);
    let changed = false;
    for (const [id, tab] of this.tabs) {
      if (id !== this.tabId && tab.at < silent) {
        this.tabs.delete(id);
        changed = true;
      }
    }
    if (changed) this.reconcile();
  }

  /**
   * @private
   * @param {any} m
   */
  onMessage(m) {
    if (this.stopped || !m || typeof m !== 'object' || m.from === this.tabId) return;
    switch (m.t) {
      case 'hello':
        this.announce();
        if (this.isLeader && this.client) this.post({ t: 'state', state: this.client.state, subs: this.subStates(), cursor: this.cursor });
        break;
      case 'subs':
        if (Array.isArray(m.patterns)) {
          this.tabs.set(m.from, { patterns: m.patterns.filter((/** @type {unknown} */ p) => typeof p === 'string'), at: Date.now() });
          this.reconcile();
          // A tab asking for a pattern held already learns its state.
          if (this.isLeader && this.client) this.post({ t: 'state', state: this.client.state, subs: this.subStates(), cursor: this.cursor });
        }
        break;
      case 'bye':
        this.tabs.delete(m.from);
        this.reconcile();
        break;
      case 'leader':
        // A new leader: tell it this tab's patterns, send publishes again.
        this.announce();
        for (const p of this.publishes.values()) this.sendPublish(p.message);
        break;
      case 'state':
        if (isState(m.state)) this.setState(m.state);
        // A tab that joined late resumes from here if it comes to lead.
        if (this.cursor === null && typeof m.cursor === 'string') this.cursor = m.cursor;
        if (m.subs && typeof m.subs === 'object') {
          for (const [pattern, s] of Object.entries(m.subs)) this.subState(pattern, s);
        }
        break;
      case 'sub':
        this.subState(m.pattern, m);
        break;
      case 'event':
        this.receive(m.event);
        break;
      case 'gap':
        this.emit('gap', m.gap);
        break;
      case 'erased':
        this.emit('erased', m.erased);
        break;
      case 'publish':
        if (this.isLeader) this.leaderPublish(m);
        break;
      case 'published':
        if (m.to === this.tabId) {
          this.settle(m.id, m.error ? new SwitchboardError(String(m.error.code), String(m.error.message)) : null, m.ack);
        }
        break;
      default:
    }
  }

  /**
   * @private
   * @param {unknown} pattern
   * @param {any} s
   */
  subState(pattern, s) {
    const sub = typeof pattern === 'string' ? this.subs.get(pattern) : undefined;
    if (!sub || !s || typeof s.state !== 'string') return;
    const error = s.error ? new SwitchboardError(String(s.error.code), String(s.error.message)) : undefined;
    if (s.state === 'subscribed' || s.state === 'subscribing' || s.state === 'failed') sub.setState(s.state, error);
  }

  /**
   * @private
   * An event from the leader (or this tab's own client): once per tab.
   * @param {any} event
   */
  receive(event) {
    if (!event || typeof event.event_id !== 'string') return;
    if (!this.dedup.add(event.event_id)) return;
    this.cursor = event.event_id;
    const topic = String(event.event_type);
    for (const s of this.subs.values()) {
      if (s.state !== 'failed' && matches(s.pattern, topic)) s.deliver(event);
    }
    this.emit('event', event);
  }

  /**
   * @private
   * @param {ClientState} state
   */
  setState(state) {
    const previous = this.state;
    if (previous === state) return;
    this.state = state;
    this.emit('state', { state, previous });
  }

  /**
   * @private
   * @param {boolean} leader
   */
  setRole(leader) {
    if (this.isLeader === leader) return;
    this.isLeader = leader;
    this.emit('role', { leader });
  }

  /**
   * @private
   * @param {Record<string, unknown>} message
   */
  sendPublish(message) {
    if (this.isLeader) this.leaderPublish({ ...message, from: this.tabId });
    else this.post(message);
  }

  /**
   * @private
   * @param {string} id
   * @param {Error | null} error
   * @param {PublishAck} [ack]
   */
  settle(id, error, ack) {
    const p = this.publishes.get(id);
    if (!p) return;
    this.publishes.delete(id);
    clearTimeout(p.timer);
    if (error) p.reject(error);
    else if (ack) p.resolve(ack);
  }

  // ---- the leader ------------------------------------------------------------

  /**
   * @private
   * Holds the lock while this tab runs the connection.
   * @returns {Promise<void>}
   */
  lead() {
    if (this.stopped) return Promise.resolve();
    return new Promise((resolve) => {
      this.release = resolve;
      const client = new Client({ ...this.options, cursor: this.cursor ?? undefined });
      this.client = client;
      client.on('event', (event) => {
        this.post({ t: 'event', event });
        this.receive(event);
      });
      client.on('gap', (gap) => {
        this.post({ t: 'gap', gap });
        this.emit('gap', gap);
      });
      client.on('erased', (erased) => {
        this.post({ t: 'erased', erased });
        this.emit('erased', erased);
      });
      client.on('error', (e) => this.emit('error', e));
      client.on('state', ({ state }) => {
        this.post({ t: 'state', state });
        this.setState(state);
      });
      this.setRole(true);
      this.reconcile();
      client.connect();
      this.post({ t: 'leader' });
    });
  }

  /**
   * @private
   * @returns {Record<string, {state: SubscriptionState, error?: {code: string, message: string}}>}
   */
  subStates() {
    /** @type {Record<string, {state: SubscriptionState, error?: {code: string, message: string}}>} */
    const out = {};
    for (const s of this.client?.subscriptions ?? []) {
      out[s.pattern] = s.error ? { state: s.state, error: { code: s.error.code, message: s.error.message } } : { state: s.state };
    }
    return out;
  }

  /** @private The leader's client holds the union of every tab's patterns. */
  reconcile() {
    const client = this.client;
    if (!client || !this.isLeader) return;
    const wanted = new Set([...this.tabs.values()].flatMap((t) => t.patterns));
    for (const s of client.subscriptions) {
      if (!wanted.has(s.pattern)) s.unsubscribe();
    }
    for (const pattern of wanted) {
      if (client.subscriptions.some((s) => s.pattern === pattern)) continue;
      if (patternError(pattern)) continue;
      const sub = client.subscribe(pattern);
      sub.on('state', ({ state, error }) => {
        const s = error ? { state, error: { code: error.code, message: error.message } } : { state };
        this.post({ t: 'sub', pattern, ...s });
        this.subState(pattern, s);
      });
    }
  }

  /**
   * @private
   * @param {any} m a publish asked by a tab (this one too)
   */
  leaderPublish(m) {
    const client = this.client;
    if (!client || typeof m.topic !== 'string') return;
    const options = m.options && typeof m.options === 'object' ? m.options : {};
    client.publish(m.topic, m.data, options).then(
      (ack) => this.answer(m, { ack }),
      (/** @type {SwitchboardError} */ e) => this.answer(m, { error: { code: e.code ?? 'error', message: e.message } }),
    );
  }

  /**
   * @private
   * @param {any} m
   * @param {Record<string, unknown>} result
   */
  answer(m, result) {
    if (m.from === this.tabId) this.settle(m.id, result.error ? new SwitchboardError(String(/** @type {any} */ (result.error).code), String(/** @type {any} */ (result.error).message)) : null, /** @type {PublishAck} */ (result.ack));
    else this.post({ t: 'published', id: m.id, to: m.from, ...result });
  }
}
