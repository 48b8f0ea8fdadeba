// The Server-Sent Events transport: `GET /api/realtime/sse/`, read with
// fetch() and a streaming body rather than EventSource, so that the token
// travels in a header, the SDK controls reconnects and cursors, and it runs
// in Node and React Native as in browsers.
import { endpoint, closeForResponse } from './http.js';

/** @typedef {import('./types.js').TransportContext} TransportContext */
/** @typedef {import('./types.js').Transport} Transport */

/**
 * Parses an SSE byte stream into messages (the WHATWG event-stream rules:
 * `event:`, `data:` lines joined by newlines, `id:`, comments, a blank line
 * dispatches).
 */
export class SseParser {
  /** @param {(event: {event: string, data: string, id: string | null}) => void} onEvent */
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = '';
    this.event = '';
    /** @type {string[]} */
    this.data = [];
    /** @type {string | null} */
    this.id = null;
  }

  /** @param {string} chunk */
  push(chunk) {
    this.buffer += chunk;
    let nl;
    while ((nl = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.buffer.slice(0, nl);
      const sep = this.buffer.startsWith('\r\n', nl) ? 2 : 1;
      // A lone '\r' at the very end may be half of '\r\n': wait for more.
      if (sep === 1 && this.buffer[nl] === '\r' && nl === this.buffer.length - 1) break;
      this.buffer = this.buffer.slice(nl + sep);
      this.line(line);
    }
  }

  /** @param {string} line */
  line(line) {
    if (line === '') {
      if (this.data.length > 0) this.onEvent({ event: this.event, data: this.data.join('\n'), id: this.id });
      this.event = '';
      this.data = [];
      this.id = null;
      return;
    }
    if (line.startsWith(':')) return;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
    else if (field === 'id') this.id = value;
  }
}

/**
 * A server message from one SSE message: an event (no name), a presence
 * notice (its whole native message) or a control message (its data).
 * @param {{event: string, data: string}} m
 * @returns {import('./types.js').ServerMessage | null}
 */
export function sseMessage(m) {
  let data;
  try {
    data = JSON.parse(m.data);
  } catch {
    return null;
  }
  if (m.event === '' || m.event === 'message') return { type: 'event', data };
  if (data && typeof data.type === 'string' && 'data' in data) return data;
  return { type: m.event, data };
}

/**
 * @param {TransportContext} ctx
 * @returns {Transport}
 */
export function openSse(ctx) {
  const abort = new AbortController();
  let ended = false;
  let opened = false;
  /** @type {{code: string, message: string} | undefined} */
  let lastError;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let idle;
  /** @param {import('./types.js').CloseInfo} info */
  const end = (info) => {
    if (ended) return;
    ended = true;
    clearTimeout(idle);
    abort.abort();
    ctx.onClose(info);
  };
  const watchdog = () => {
    clearTimeout(idle);
    idle = setTimeout(() => end({ code: 1006, reason: 'no data from the gateway (stalled network)', opened }), ctx.idleTimeout);
  };
  const url = endpoint(ctx.baseUrl, '/api/realtime/sse/', {
    topics: ctx.topics.join(','),
    cursor: ctx.cursor,
    ...ctx.query,
  });
  watchdog();
  (async () => {
    const response = await ctx.fetch(url, {
      headers: { accept: 'text/event-stream', authorization: `Bearer ${ctx.token()}` },
      signal: abort.signal,
      cache: 'no-store',
    });
    if (!response.ok || !response.body) {
      end(await closeForResponse(response));
      return;
    }
    opened = true;
    watchdog();
    ctx.onOpen();
    const parser = new SseParser((m) => {
      const msg = sseMessage(m);
      if (!msg) return;
      // The stream's last word before it ends (token_expired, forbidden).
      if (msg.type === 'error' && msg.data && typeof msg.data.code === 'string') {
        lastError = { code: msg.data.code, message: String(msg.data.message ?? '') };
      }
      ctx.onMessage(msg);
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (done || ended) break;
      watchdog();
      parser.push(decoder.decode(value, { stream: true }));
    }
    if (lastError?.code === 'token_expired') end({ code: 4001, reason: lastError.message, opened, error: lastError });
    else if (lastError?.code === 'forbidden') end({ code: 4003, reason: lastError.message, opened, error: lastError });
    else end({ code: 1006, reason: 'the stream ended', opened });
  })().catch((err) => end({ code: 1006, reason: String(err?.message ?? err), opened }));
  return {
    name: 'sse',
    canSend: false,
    send() {},
    close(code = 1000, reason = '') {
      end({ code, reason, opened });
    },
  };
}
