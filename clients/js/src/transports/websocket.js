// The WebSocket transport: `GET /ws`, the native protocol both ways.
/** @typedef {import('./types.js').TransportContext} TransportContext */
/** @typedef {import('./types.js').Transport} Transport */

/**
 * @param {TransportContext} ctx
 * @returns {Transport}
 */
export function openWebSocket(ctx) {
  const Ctor = ctx.WebSocket ?? globalThis.WebSocket;
  const url = new URL(ctx.baseUrl.replace(/\/+$/, '') + '/ws');
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.searchParams.set('token', ctx.token());
  for (const [k, v] of Object.entries(ctx.query)) url.searchParams.set(k, v);
  let ended = false;
  let opened = false;
  /** @type {{code: string, message: string} | undefined} */
  let lastError;
  /** @param {import('./types.js').CloseInfo} info */
  const end = (info) => {
    if (ended) return;
    ended = true;
    ctx.onClose(info);
  };
  if (!Ctor) {
    queueMicrotask(() => end({ code: 1006, reason: 'no WebSocket implementation (pass options.WebSocket)', opened: false }));
    return { name: 'websocket', canSend: false, send() {}, close() {} };
  }
  /** @type {WebSocket} */
  let ws;
  try {
    ws = new Ctor(url.toString());
  } catch (err) {
    queueMicrotask(() => end({ code: 1006, reason: String(err), opened: false }));
    return { name: 'websocket', canSend: false, send() {}, close() {} };
  }
  ws.onmessage = (ev) => {
    if (typeof ev.data !== 'string') return;
    /** @type {import('./types.js').ServerMessage} */
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return; // the gateway only sends JSON; ignore anything else
    }
    if (!msg || typeof msg.type !== 'string') return;
    if (msg.type === 'error' && msg.data) lastError = { code: String(msg.data.code), message: String(msg.data.message) };
    ctx.onMessage(msg);
    if (msg.type === 'connection.established' && !opened) {
      opened = true;
      ctx.onOpen();
    }
  };
  ws.onclose = (ev) => {
    end({ code: ev.code || 1006, reason: ev.reason || lastError?.message || '', opened, error: lastError });
  };
  ws.onerror = () => {
    // A close event follows an error; nothing to do here.
  };
  return {
    name: 'websocket',
    canSend: true,
    send(message) {
      if (ws.readyState === 1) ws.send(JSON.stringify(message));
    },
    close(code = 1000, reason = '') {
      try {
        ws.close(code, reason);
      } catch {
        // already closing
      }
      // Do not wait for the closing handshake of a stalled network.
      end({ code: code === 1000 ? 1000 : code, reason, opened });
    },
  };
}
