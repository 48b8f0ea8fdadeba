// What the HTTP transports (SSE, long-poll) share: URLs and error answers.
import { closeCodeForHttp } from '../errors.js';

/**
 * The URL of `path` under the base URL with `params` (unset ones left out).
 * @param {string} baseUrl
 * @param {string} path
 * @param {Record<string, string | number | null | undefined>} params
 */
export function endpoint(baseUrl, path, params) {
  const url = new URL(baseUrl.replace(/\/+$/, '') + path);
  for (const [k, v] of Object.entries(params)) {
    if (v !== null && v !== undefined && v !== '') url.searchParams.set(k, String(v));
  }
  return url.toString();
}

/**
 * The close an HTTP error answer stands for, with the gateway's error.
 * @param {Response} response
 * @returns {Promise<import('./types.js').CloseInfo>}
 */
export async function closeForResponse(response) {
  let error = { code: 'http_' + response.status, message: response.statusText || 'HTTP ' + response.status, status: response.status };
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.code === 'string') {
      error = { code: body.error.code, message: String(body.error.message ?? ''), status: response.status };
    }
  } catch {
    // not JSON: keep the status
  }
  /** @type {import('./types.js').CloseInfo} */
  const info = { code: closeCodeForHttp(response.status, error.code), reason: error.message, opened: false, error };
  const retryAfter = Number(response.headers.get('retry-after'));
  if (Number.isFinite(retryAfter) && retryAfter > 0) info.retryAfter = Math.min(retryAfter, 300) * 1000;
  return info;
}
