// A TypeScript app using the package's published types (types/, made by
// `npm run types`): compiled with --noEmit by the tests, so a change that
// breaks users' types fails them.
import { Client, SwitchboardError, type Subscription } from '@switchboard/client';

const client = new Client({
  url: 'https://realtime.example.com',
  getToken: async () => 'jwt',
  transports: ['websocket', 'sse'],
  backoff: { min: 250, max: 10_000 },
});
client.on('state', ({ state }) => {
  const s: 'disconnected' | 'connecting' | 'connected' = state;
  void s;
});
client.on('gap', ({ reason, requested }) => console.log(reason, requested));
const sub: Subscription = client.subscribe('deal.*', {
  onEvent: (e) => {
    const id: string = e.event_id;
    const region: string | undefined = e.metadata.region;
    void id;
    void region;
  },
});
async function consume() {
  for await (const e of sub) console.log(e.event_type);
  const ack = await client.publish('chat.1', { text: 'hi' }, { idempotencyKey: 'k' });
  const dup: boolean = ack.duplicate;
  void dup;
  const room = client.presence('presence:doc-1', { info: { name: 'Ada' } });
  room.on('join', ({ user, count }) => console.log(user.id, count));
  const members: number = room.members.size;
  void members;
}
void consume;
try {
  client.subscribe('a..b');
} catch (e) {
  if (e instanceof SwitchboardError) console.log(e.code);
}
// @ts-expect-error internals are private
client.attempt();
// @ts-expect-error transports are named
new Client({ url: 'x', transports: ['carrier-pigeon'] });
client.connect();

// One connection shared by the tabs of an origin.
import { SharedClient } from '@switchboard/client';
const tab = new SharedClient({ url: 'https://realtime.example.com', getToken: async () => 'jwt' });
tab.on('role', ({ leader }) => {
  const l: boolean = leader;
  void l;
});
const shared: Subscription = tab.subscribe('deal.*', { onEvent: (e) => console.log(e.event_id) });
void shared;
void tab.publish('chat.1', { text: 'hi' }).then((a) => a.event_id);
