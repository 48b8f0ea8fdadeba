// Switchboard's JavaScript client: one connection to a Switchboard gateway
// (WebSocket, falling back to Server-Sent Events and long-polling) that
// resumes by cursor and never delivers an event twice.
export { Client } from './client.js';
export { SharedClient } from './shared.js';
export { Subscription } from './subscription.js';
export { Presence } from './presence.js';
export { SwitchboardError } from './errors.js';
export { Backoff } from './backoff.js';
export { matches, patternError } from './pattern.js';

/** The package version (kept equal to package.json by the tests). */
export const VERSION = '0.2.0';
