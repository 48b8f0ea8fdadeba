// Errors the SDK reports: the gateway's error codes (docs/protocol.md) plus
// the SDK's own (`timeout`, `disconnected`, `unsupported_transport`,
// `logged_out`, `invalid_pattern`).

export class SwitchboardError extends Error {
  /**
   * @param {string} code machine-readable, e.g. `topic_not_allowed`
   * @param {string} message for people
   * @param {{status?: number, requestId?: unknown}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'SwitchboardError';
    /** @readonly */ this.code = code;
    /** HTTP status, for errors answered over HTTP */
    this.status = extra.status;
    this.requestId = extra.requestId;
  }
}

/**
 * What the SDK does after a connection ends, by WebSocket close code (the
 * HTTP transports map their errors onto the same codes).
 * @param {number} code
 * @returns {'refresh' | 'stop' | 'backoff' | 'now'}
 */
export function closeAction(code) {
  switch (code) {
    case 4001:
      return 'refresh'; // unauthorized: a new token, then reconnect
    case 4003:
    case 4013:
      return 'stop'; // forbidden, or not resident in this region: retrying cannot help
    case 1012:
      return 'now'; // the gateway drains: move to another at once
    default:
      return 'backoff'; // 4002, 4008, 4029, 4030, 1013, 1006, ...
  }
}

/**
 * The close code an HTTP error answer stands for.
 * @param {number} status
 * @param {string | undefined} code the body's error code
 * @returns {number}
 */
export function closeCodeForHttp(status, code) {
  if (status === 401) return 4001;
  if (code === 'forbidden') return 4003;
  if (code === 'residency_violation') return 4013;
  if (code === 'draining') return 1012;
  if (code === 'overloaded' || code === 'connect_rate_limited') return 1013;
  if (status === 429) return 4030;
  if (code === 'topic_not_allowed' || code === 'invalid_topic' || code === 'too_many_subscriptions') return 4400;
  return 1006;
}

/** The SDK's code for "the gateway refused a pattern of an HTTP stream". */
export const REFUSED_PATTERN = 4400;
