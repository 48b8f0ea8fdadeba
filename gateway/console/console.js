// The console's page logic, on the JavaScript SDK served beside it.
import { Client } from './sdk/index.js';

const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const MAX_ROWS = 500;
let client = null;
const presences = new Map();

function log(text) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toISOString().slice(11, 23)} ${text}`;
  $('log').prepend(li);
  while ($('log').children.length > 200) $('log').lastChild.remove();
}

function facts() {
  if (!client) return;
  $('status').textContent = client.state;
  $('status').className = `badge ${client.state}`;
  $('cursor').textContent = client.cursor ?? '–';
  $('count').textContent = String(client.stats.events);
  $('reconnects').textContent = String(client.stats.reconnects);
  $('gaps').textContent = String(client.stats.gaps);
}

function renderSubscriptions() {
  const ul = $('subscriptions');
  ul.replaceChildren();
  if (!client) return;
  for (const sub of client.subscriptions) {
    const li = document.createElement('li');
    li.dataset.pattern = sub.pattern;
    const name = document.createElement('span');
    name.textContent = sub.pattern;
    const state = document.createElement('span');
    state.className = `state ${sub.state}`;
    state.textContent = sub.error ? `${sub.state}: ${sub.error.code}` : sub.state;
    const drop = document.createElement('button');
    drop.textContent = '×';
    drop.title = 'unsubscribe';
    drop.onclick = () => { sub.unsubscribe(); renderSubscriptions(); };
    li.append(name, state, drop);
    ul.append(li);
  }
}

function renderPresence() {
  const box = $('presence');
  box.replaceChildren();
  for (const p of presences.values()) {
    const h = document.createElement('div');
    h.textContent = `${p.topic} (${p.count}${p.truncated ? ', truncated' : ''}) `;
    const leave = document.createElement('button');
    leave.textContent = 'leave';
    leave.onclick = () => { p.leave(); presences.delete(p.topic); renderPresence(); };
    h.append(leave);
    const members = document.createElement('div');
    for (const m of p.members.values()) {
      const span = document.createElement('span');
      span.className = 'member';
      span.textContent = `${m.name ?? m.id}${m.connections > 1 ? ` ×${m.connections}` : ''}`;
      members.append(span);
    }
    box.append(h, members);
  }
}

function matchesFilter(row) {
  const f = /** @type {HTMLInputElement} */ ($('filter')).value.trim();
  return !f || row.textContent.includes(f);
}

function showEvent(e) {
  if (/** @type {HTMLInputElement} */ ($('pause')).checked) return;
  const tr = document.createElement('tr');
  tr.className = 'new';
  tr.dataset.eventId = e.event_id;
  const cells = [
    (e.timestamp ?? '').slice(11, 23),
    e.event_id,
    e.event_type,
    e.metadata?.region ?? '',
    e.metadata?.publisher ?? '',
    JSON.stringify(e.data),
  ];
  for (const [i, text] of cells.entries()) {
    const td = document.createElement('td');
    td.textContent = text;
    if (i === 5) {
      td.className = 'data';
      td.title = JSON.stringify(e, null, 2);
    }
    tr.append(td);
  }
  tr.hidden = !matchesFilter(tr);
  $('events').prepend(tr);
  while ($('events').children.length > MAX_ROWS) $('events').lastChild.remove();
}

function connect() {
  client?.logout();
  const token = /** @type {HTMLTextAreaElement} */ ($('token')).value.trim();
  const choice = /** @type {HTMLSelectElement} */ ($('transport-choice')).value;
  const keep = client ? client.subscriptions.map((s) => s.pattern) : [];
  client = new Client({ url: location.origin, token, transports: choice ? [choice] : undefined });
  client.on('state', ({ state }) => { facts(); log(`state: ${state}`); renderSubscriptions(); });
  client.on('connected', (c) => {
    $('transport').textContent = c.transport;
    $('connection').textContent = c.connectionId ?? '–';
    $('user').textContent = c.userId ?? '–';
    $('region').textContent = c.region ?? '–';
    log(`connected over ${c.transport}`);
  });
  client.on('disconnected', (d) => log(`disconnected: ${d.code} ${d.reason}`));
  client.on('error', (e) => log(`error ${e.code}: ${e.message}`));
  client.on('gap', (g) => log(`resume.gap (${g.reason}) after ${g.requested}: refresh from your source of truth`));
  client.on('event', (e) => { showEvent(e); facts(); });
  for (const p of keep) subscribe(p);
  client.connect();
  facts();
}

function subscribe(pattern) {
  if (!client) return;
  try {
    const sub = client.subscribe(pattern);
    sub.on('state', renderSubscriptions);
    renderSubscriptions();
  } catch (e) {
    log(`${e.code ?? 'error'}: ${e.message}`);
  }
}

$('connect-form').addEventListener('submit', (ev) => { ev.preventDefault(); connect(); });
$('disconnect').addEventListener('click', () => { client?.disconnect(); facts(); });
$('subscribe-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($('pattern'));
  if (input.value.trim()) subscribe(input.value.trim());
  input.value = '';
});
$('publish-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const out = $('pub-result');
  if (!client) { out.textContent = 'connect first'; return; }
  let data;
  try {
    data = JSON.parse(/** @type {HTMLTextAreaElement} */ ($('pub-data')).value || 'null');
  } catch (e) {
    out.textContent = `data is not JSON: ${e.message}`;
    return;
  }
  const topic = /** @type {HTMLInputElement} */ ($('pub-topic')).value.trim();
  const messageType = /** @type {HTMLInputElement} */ ($('pub-type')).value.trim() || undefined;
  try {
    const ack = await client.publish(topic, data, { messageType });
    out.textContent = `stored: ${ack.event_id}${ack.duplicate ? ' (duplicate)' : ''}`;
  } catch (e) {
    out.textContent = `refused: ${e.code}: ${e.message}`;
  }
});
$('presence-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const topic = /** @type {HTMLInputElement} */ ($('presence-topic')).value.trim();
  if (!client || !topic) return;
  try {
    const p = client.presence(topic, { info: { name: $('user').textContent } });
    presences.set(topic, p);
    for (const name of ['sync', 'join', 'leave', 'state']) p.on(name, renderPresence);
    renderPresence();
  } catch (e) {
    log(`${e.code ?? 'error'}: ${e.message}`);
  }
});
$('filter').addEventListener('input', () => {
  for (const tr of $('events').children) /** @type {HTMLElement} */ (tr).hidden = !matchesFilter(tr);
});
$('clear').addEventListener('click', () => $('events').replaceChildren());

// Development mode: the gateway mints tokens for the console.
const probe = await fetch('token').catch(() => null);
if (probe?.status === 204) {
  $('dev').hidden = false;
  $('dev-mint').addEventListener('click', async () => {
    const body = {
      tenant: /** @type {HTMLInputElement} */ ($('dev-tenant')).value,
      user: /** @type {HTMLInputElement} */ ($('dev-user')).value,
      scopes: ['subscribe', 'publish'],
    };
    const r = await fetch('token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const answer = await r.json();
    if (r.ok) {
      /** @type {HTMLTextAreaElement} */ ($('token')).value = answer.token;
      log(`development token for ${body.user} of ${body.tenant}`);
    } else log(`token refused: ${answer.error?.message}`);
  });
}
setInterval(facts, 1000);
