// The contract between the client and a transport. A transport is one
// connection attempt: it opens, reports server messages in the native
// protocol's shape (`{type, data, requestId}`), and ends once.

/**
 * @typedef {{type: string, data?: any, requestId?: unknown}} ServerMessage
 */

/**
 * @typedef {object} CloseInfo
 * @property {number} code a WebSocket close code (HTTP errors mapped onto them)
 * @property {string} reason
 * @property {boolean} opened whether the transport had opened
 * @property {{code: string, message: string, status?: number}} [error] the gateway's error, when it sent one
 * @property {number} [retryAfter] ms the gateway asked to wait (`Retry-After`)
 */

/**
 * @typedef {object} TransportContext
 * @property {string} baseUrl `http(s)://host[:port][/prefix]`
 * @property {() => string} token the current token (read at every request)
 * @property {string[]} topics patterns to hold (HTTP transports: fixed for the attempt)
 * @property {string | null} cursor resume after this event id
 * @property {Record<string, string>} query extra query parameters (`company_id`, `region`)
 * @property {number} idleTimeout ms without any byte from the server before the connection counts as dead
 * @property {number} pollTimeout seconds a long-poll waits
 * @property {typeof globalThis.WebSocket | undefined} WebSocket
 * @property {typeof globalThis.fetch} fetch
 * @property {() => void} onOpen
 * @property {(message: ServerMessage) => void} onMessage
 * @property {(info: CloseInfo) => void} onClose called once, last
 */

/**
 * @typedef {object} Transport
 * @property {'websocket' | 'sse' | 'longpoll'} name
 * @property {boolean} canSend whether `send` reaches the gateway (WebSocket only)
 * @property {(message: object) => void} send
 * @property {(code?: number, reason?: string) => void} close ends the attempt; `onClose` follows
 */

export {};
