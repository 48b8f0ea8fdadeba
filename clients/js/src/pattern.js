// The gateway's subscription patterns, matched on the client so that an
// event reaches every Subscription whose pattern covers its topic (the
// gateway sends an event once per connection, whatever the overlap).
//
// A topic is dot-separated tokens. In a pattern, `*` in the middle matches
// exactly one token; a trailing `*` or `>` matches one or more; `*` alone
// matches every topic (see docs/protocol.md, "Topics and patterns").

import { SwitchboardError } from './errors.js';

/**
 * True when `pattern` matches `topic`.
 * @param {string} pattern
 * @param {string} topic
 * @returns {boolean}
 */
export function matches(pattern, topic) {
  if (pattern === '*' || pattern === '>') return topic.length > 0;
  const p = pattern.split('.');
  const t = topic.split('.');
  for (let i = 0; i < p.length; i++) {
    const last = i === p.length - 1;
    if (last && (p[i] === '*' || p[i] === '>')) return t.length > i;
    if (i >= t.length) return false;
    if (p[i] !== '*' && p[i] !== t[i]) return false;
  }
  return p.length === t.length;
}

/** Characters a topic token may hold (the gateway refuses anything else). */
const TOKEN = /^[A-Za-z0-9_:/-]+$/;

/**
 * Why `pattern` cannot be a subscription, or null when it can. The gateway
 * decides (its policy may refuse more); this catches typos before a round
 * trip.
 * @param {string} pattern
 * @returns {string | null}
 */
export function patternError(pattern) {
  if (typeof pattern !== 'string' || pattern.length === 0) return 'a pattern is a non-empty string';
  if (pattern.length > 255) return 'a pattern is at most 255 bytes';
  const tokens = pattern.split('.');
  if (tokens.length > 16) return 'a pattern has at most 16 tokens';
  for (let i = 0; i < tokens.length; i++) {
    const tok = tokens[i];
    if (tok === '') return "empty token (leading, trailing or doubled '.')";
    if (tok === '>' && i !== tokens.length - 1) return "'>' only ends a pattern";
    if (tok !== '*' && tok !== '>' && !TOKEN.test(tok)) return `token ${JSON.stringify(tok)} has a character outside [A-Za-z0-9_:/-]`;
  }
  return null;
}

/**
 * Throw the SDK's `invalid_pattern` error unless `pattern` can be a
 * subscription (see `patternError`).
 * @param {string} pattern
 * @param {string} [what] how the message names it (default `pattern`)
 */
export function requirePattern(pattern, what = 'pattern') {
  const invalid = patternError(pattern);
  if (invalid) throw new SwitchboardError('invalid_pattern', `invalid ${what} ${JSON.stringify(pattern)}: ${invalid}`);
}
