// The ids of the most recent events, so that an event seen twice (a
// resume that overlaps what arrived, a transport switch) reaches the app
// once. Bounded: the oldest ids are forgotten first.

export class RecentIds {
  /** @param {number} [capacity] ids remembered (default 2048) */
  constructor(capacity = 2048) {
    this.capacity = Math.max(1, capacity);
    /** @type {Set<string>} insertion-ordered, oldest first */
    this.ids = new Set();
  }

  /**
   * Remember `id`; false when it was already remembered (a duplicate).
   * @param {string} id
   */
  add(id) {
    if (this.ids.has(id)) return false;
    this.ids.add(id);
    if (this.ids.size > this.capacity) {
      const oldest = this.ids.values().next();
      if (!oldest.done) this.ids.delete(oldest.value);
    }
    return true;
  }

  clear() {
    this.ids.clear();
  }

  get size() {
    return this.ids.size;
  }
}
