// A minimal typed event emitter (no dependency, works in browsers, Node and
// React Native). A listener that throws does not stop the others: the error
// is reported on the emitter's `error` event or, without a listener there,
// rethrown asynchronously so it is not swallowed.

/**
 * @template {Record<string, any>} Events
 */
export class Emitter {
  constructor() {
    /** @type {Map<keyof Events, Set<(arg: any) => void>>} */
    this.listeners = new Map();
  }

  /**
   * @template {keyof Events} K
   * @param {K} name
   * @param {(arg: Events[K]) => void} fn
   * @returns {() => void} removes the listener
   */
  on(name, fn) {
    let set = this.listeners.get(name);
    if (!set) {
      set = new Set();
      this.listeners.set(name, set);
    }
    set.add(fn);
    return () => this.off(name, fn);
  }

  /**
   * @template {keyof Events} K
   * @param {K} name
   * @param {(arg: Events[K]) => void} fn
   */
  once(name, fn) {
    /** @param {Events[K]} arg */
    const wrapped = (arg) => {
      this.off(name, wrapped);
      fn(arg);
    };
    return this.on(name, wrapped);
  }

  /**
   * @template {keyof Events} K
   * @param {K} name
   * @param {(arg: Events[K]) => void} fn
   */
  off(name, fn) {
    this.listeners.get(name)?.delete(fn);
  }

  /**
   * @template {keyof Events} K
   * @param {K} name
   * @param {Events[K]} arg
   */
  emit(name, arg) {
    const set = this.listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(arg);
      } catch (err) {
        const errors = this.listeners.get('error');
        if (name !== 'error' && errors && errors.size > 0) {
          for (const e of [...errors]) e(err);
        } else {
          setTimeout(() => {
            throw err;
          }, 0);
        }
      }
    }
  }
}
