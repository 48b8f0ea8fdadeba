// Reading a token's expiry on the client (no verification: the gateway
// verifies; the client only needs to know when to ask for a new one).

/**
 * The `exp` claim of a JWT in unix seconds, or null when it has none or is
 * not a JWT.
 * @param {string} token
 * @returns {number | null}
 */
export function tokenExpiry(token) {
  const part = token.split('.')[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '=');
    const json = typeof atob === 'function' ? atob(b64) : '';
    const exp = JSON.parse(json).exp;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/**
 * Milliseconds from `now` until a token expiring at `exp` (unix seconds)
 * should be replaced: `before` seconds ahead of expiry, or a third of its
 * remaining life when that is shorter, never negative.
 * @param {number} exp
 * @param {number} before seconds
 * @param {number} [now] ms since the epoch
 */
export function refreshDelay(exp, before, now = Date.now()) {
  const left = exp * 1000 - now;
  const lead = Math.min(before * 1000, left / 3);
  return Math.max(0, Math.floor(left - lead));
}
