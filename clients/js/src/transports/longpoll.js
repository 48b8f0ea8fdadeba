// The long-polling transport: `GET /api/realtime/poll/` in a loop, each
// request resuming from the cursor the previous answer gave.
import { endpoint, closeForResponse } from './http.js';

/** @typedef {import('./types.js').TransportContext} TransportContext */
/** @typedef {import('./types.js').Transport} Transport */

/**
 * @param {TransportContext} ctx
 * @returns {Transport}
 */
export function openLongPoll(ctx) {
  let ended = false;
  let opened = false;
  /** @type {AbortController | null} */
  let inflight = null;
  let cursor = ctx.cursor;
  /** @param {import('./types.js').CloseInfo} info */
  const end = (info) => {
    if (ended) return;
    ended = true;
    inflight?.abort();
    ctx.onClose(info);
  };
  (async () => {
    while (!ended) {
      // The first request returns at once (it only learns the position);
      // later ones wait for events.
      const wait = opened ? ctx.pollTimeout : 0;
      const url = endpoint(ctx.baseUrl, '/api/realtime/poll/', {
        topics: ctx.topics.join(','),
        cursor,
        timeout: wait,
        ...ctx.query,
      });
      const abort = new AbortController();
      inflight = abort;
      const timer = setTimeout(() => abort.abort(), wait * 1000 + ctx.idleTimeout);
      let response;
      let body;
      try {
        response = await ctx.fetch(url, {
          headers: { authorization: `Bearer ${ctx.token()}` },
          signal: abort.signal,
          cache: 'no-store',
        });
        if (!response.ok) {
          end(await closeForResponse(response));
          return;
        }
        body = await response.json();
      } catch (err) {
        const stalled = abort.signal.aborted && !ended;
        end({ code: 1006, reason: stalled ? 'no answer from the gateway (stalled network)' : String(/** @type {Error} */ (err)?.message ?? err), opened });
        return;
      } finally {
        clearTimeout(timer);
      }
      if (ended) return;
      if (!opened) {
        opened = true;
        ctx.onOpen();
      }
      if (body.resume_gap) ctx.onMessage({ type: 'resume.gap', data: body.resume_gap });
      for (const event of body.events ?? []) ctx.onMessage({ type: 'event', data: event });
      if (typeof body.cursor === 'string') {
        cursor = body.cursor;
        ctx.onMessage({ type: 'cursor', data: { cursor } });
      }
    }
  })().catch((err) => end({ code: 1006, reason: String(err?.message ?? err), opened }));
  return {
    name: 'longpoll',
    canSend: false,
    send() {},
    close(code = 1000, reason = '') {
      end({ code, reason, opened });
    },
  };
}
