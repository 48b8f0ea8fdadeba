// Presence on one topic (and a room: events published to it reach the
// members). Members are users; several connections of one user are one
// member with a `connections` count.
import { Emitter } from './emitter.js';

/**
 * @typedef {{id: string, connections?: number, lastSeen?: number} & Record<string, unknown>} Member
 */

/**
 * @typedef {object} PresenceEvents
 * @property {{members: Member[], count: number, truncated: boolean}} sync
 * @property {{user: Member, count: number}} join
 * @property {{user: Member, count: number}} leave
 * @property {import('./subscription.js').SwitchboardEvent} event
 * @property {{state: import('./subscription.js').SubscriptionState, previous: import('./subscription.js').SubscriptionState, error?: import('./errors.js').SwitchboardError}} state
 * @property {unknown} error
 */

/** @extends {Emitter<PresenceEvents>} */
export class Presence extends Emitter {
  /**
   * @param {string} topic
   * @param {Record<string, unknown> | undefined} info
   * @param {{leave: (p: Presence) => void}} owner
   */
  constructor(topic, info, owner) {
    super();
    /** @readonly */ this.topic = topic;
    this.info = info;
    /** @internal */
    this.owner = owner;
    /** @type {Map<string, Member>} */
    this.members = new Map();
    /** members in total (also above the gateway's cap, when `members` is empty) */
    this.count = 0;
    this.truncated = false;
    /** @type {import('./subscription.js').SubscriptionState} */
    this.state = 'subscribing';
    /** @type {import('./errors.js').SwitchboardError | null} */
    this.error = null;
  }

  /**
   * @param {import('./subscription.js').SubscriptionState} state
   * @param {import('./errors.js').SwitchboardError} [error]
   * @internal
   */
  setState(state, error) {
    const previous = this.state;
    if (previous === state || previous === 'unsubscribed') return;
    this.state = state;
    this.error = error ?? null;
    this.emit('state', error ? { state, previous, error } : { state, previous });
  }

  /**
   * A presence message from the gateway (`presence.sync`, `.join`, `.leave`).
   * @param {string} type
   * @param {any} data the message's `data.data`
   * @internal
   */
  apply(type, data) {
    if (!data || typeof data !== 'object') return;
    if (type === 'presence.sync') {
      this.members = new Map((Array.isArray(data.users) ? data.users : []).map((/** @type {Member} */ u) => [u.id, u]));
      this.count = Number(data.count ?? this.members.size);
      this.truncated = Boolean(data.truncated);
      this.emit('sync', { members: [...this.members.values()], count: this.count, truncated: this.truncated });
    } else if (type === 'presence.join' && data.user) {
      this.members.set(data.user.id, data.user);
      this.count = Number(data.count ?? this.members.size);
      this.emit('join', { user: data.user, count: this.count });
    } else if (type === 'presence.leave' && data.user) {
      this.members.delete(data.user.id);
      this.count = Number(data.count ?? this.members.size);
      this.emit('leave', { user: data.user, count: this.count });
    }
  }

  /** Stop being a member (and stop receiving the room's events). */
  leave() {
    if (this.state === 'unsubscribed') return;
    this.setState('unsubscribed');
    this.members.clear();
    this.owner.leave(this);
  }
}
