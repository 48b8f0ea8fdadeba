// Full-jitter exponential backoff (AWS architecture blog, "Exponential
// Backoff and Jitter"): the n-th retry waits a uniformly random time in
// [0, min(max, min * 2^n)], so a fleet of clients cut at the same moment
// spreads its reconnects over the whole window instead of stampeding.

/**
 * @typedef {object} BackoffOptions
 * @property {number} [min] first window in milliseconds (default 500)
 * @property {number} [max] largest window in milliseconds (default 20000)
 */

export class Backoff {
  /**
   * @param {BackoffOptions} [options]
   * @param {() => number} [random] a source of [0, 1) numbers (tests)
   */
  constructor(options = {}, random = Math.random) {
    const min = options.min ?? 500;
    const max = options.max ?? 20000;
    if (!(min > 0) || !(max >= min)) {
      throw new RangeError(`backoff bounds must satisfy 0 < min <= max (got min=${min}, max=${max})`);
    }
    /** @readonly */ this.min = min;
    /** @readonly */ this.max = max;
    /** how many retries since the last success */
    this.attempt = 0;
    this.random = random;
  }

  /** The upper bound of the next wait, without consuming it. */
  window() {
    // 2^attempt overflows to Infinity long after it passed max: clamp first.
    return Math.min(this.max, this.min * 2 ** Math.min(this.attempt, 30));
  }

  /** The next wait in milliseconds; each call widens the window. */
  next() {
    const delay = Math.floor(this.random() * this.window());
    this.attempt += 1;
    return delay;
  }

  /** A connection held: the next failure starts from the smallest window. */
  reset() {
    this.attempt = 0;
  }
}
