// A subscription to one pattern: its state, its listeners, and an async
// iterator over its events.
import { Emitter } from './emitter.js';
import { SwitchboardError } from './errors.js';

/**
 * The seed 001 envelope of an event, as the gateway sends it.
 * @typedef {object} SwitchboardEvent
 * @property {string} event_id also the cursor
 * @property {string} event_type the topic
 * @property {string} timestamp RFC 3339
 * @property {unknown} data
 * @property {{region?: string, idempotency_key?: string, gdpr_context?: unknown, cursor?: string, message_type?: string, publisher?: string} & Record<string, unknown>} metadata
 */

/**
 * `subscribing`: asked, not yet confirmed (also while reconnecting);
 * `subscribed`: the gateway holds it; `failed`: refused (see `error`);
 * `unsubscribed`: ended by the app (final).
 * @typedef {'subscribing' | 'subscribed' | 'failed' | 'unsubscribed'} SubscriptionState
 */

/**
 * @typedef {object} SubscriptionEvents
 * @property {SwitchboardEvent} event
 * @property {{state: SubscriptionState, previous: SubscriptionState, error?: SwitchboardError}} state
 * @property {unknown} error
 */

/** @extends {Emitter<SubscriptionEvents>} */
export class Subscription extends Emitter {
  /**
   * @param {string} pattern
   * @param {{unsubscribe: (sub: Subscription) => void, resubscribe: (sub: Subscription) => void}} owner
   */
  constructor(pattern, owner) {
    super();
    /** @readonly */ this.pattern = pattern;
    /** @type {SubscriptionState} */
    this.state = 'subscribing';
    /** @type {SwitchboardError | null} why it failed */
    this.error = null;
    /** @internal */
    this.owner = owner;
    /**
     * @internal
     * @type {Set<{push: (e: SwitchboardEvent) => void, end: (err?: Error) => void}>}
     */
    this.iterators = new Set();
    /**
     * @internal
     * whether the current connection was asked for it (internal)
     */
    this.requested = false;
  }

  /**
   * @param {SubscriptionState} state
   * @param {SwitchboardError} [error]
   * @internal
   */
  setState(state, error) {
    const previous = this.state;
    if (previous === state || previous === 'unsubscribed') return;
    this.state = state;
    this.error = state === 'failed' ? error ?? null : null;
    this.emit('state', error ? { state, previous, error } : { state, previous });
    if (state === 'unsubscribed' || state === 'failed') {
      for (const it of [...this.iterators]) it.end(state === 'failed' ? this.error ?? undefined : undefined);
    }
  }

  /**
   * @param {SwitchboardEvent} event
   * @internal
   */
  deliver(event) {
    this.emit('event', event);
    for (const it of this.iterators) it.push(event);
  }

  /**
   * Resolves once the gateway holds the subscription; rejects when it is
   * refused or ended first.
   * @returns {Promise<void>}
   */
  ready() {
    if (this.state === 'subscribed') return Promise.resolve();
    if (this.state === 'failed') return Promise.reject(this.error);
    if (this.state === 'unsubscribed') return Promise.reject(new SwitchboardError('unsubscribed', `${this.pattern} was unsubscribed`));
    return new Promise((resolve, reject) => {
      const off = this.on('state', ({ state, error }) => {
        if (state === 'subscribed') resolve();
        else if (state === 'failed') reject(error);
        else if (state === 'unsubscribed') reject(new SwitchboardError('unsubscribed', `${this.pattern} was unsubscribed`));
        else return;
        off();
      });
    });
  }

  /** Ask again after a failure (a no-op in any other state). */
  subscribe() {
    if (this.state === 'failed') {
      this.setState('subscribing');
      this.owner.resubscribe(this);
    }
  }

  /** End the subscription: no more events, iterators finish. */
  unsubscribe() {
    if (this.state === 'unsubscribed') return;
    this.setState('unsubscribed');
    this.owner.unsubscribe(this);
  }

  /**
   * Events as an async iterator; it ends when the subscription does (and
   * throws the refusal when it fails). Events wait in memory until read.
   * @returns {AsyncIterableIterator<SwitchboardEvent>}
   */
  [Symbol.asyncIterator]() {
    /** @type {SwitchboardEvent[]} */
    const queue = [];
    /** @type {((r: IteratorResult<SwitchboardEvent>) => void) | null} */
    let waiting = null;
    /** @type {((e: Error) => void) | null} */
    let failing = null;
    let done = false;
    /** @type {Error | undefined} */
    let failure;
    const it = {
      /** @param {SwitchboardEvent} e */
      push: (e) => {
        if (waiting) {
          const w = waiting;
          waiting = failing = null;
          w({ value: e, done: false });
        } else queue.push(e);
      },
      /** @param {Error} [err] */
      end: (err) => {
        done = true;
        failure = err;
        this.iterators.delete(it);
        if (waiting) {
          const w = waiting;
          const f = failing;
          waiting = failing = null;
          if (err && f) f(err);
          else w({ value: undefined, done: true });
        }
      },
    };
    if (this.state === 'unsubscribed' || this.state === 'failed') {
      done = true;
      failure = this.state === 'failed' ? this.error ?? undefined : undefined;
    } else this.iterators.add(it);
    return {
      next: () => {
        const value = queue.shift();
        if (value !== undefined) return Promise.resolve({ value, done: false });
        if (done) return failure ? Promise.reject(failure) : Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => {
          waiting = resolve;
          failing = reject;
        });
      },
      return: () => {
        it.end();
        queue.length = 0;
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }
}
