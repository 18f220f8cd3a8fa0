/**
 * The connection side of the WhatsApp channel, driven through a real baileys 7.0.0-rc14
 * socket (connected to a local WebSocket server, test/helpers.ts flakyServer) and its
 * event emitter. A close carries what baileys closes with: an error whose
 * output.statusCode is a DisconnectReason (lib/Types/index.d.ts) or one of
 * UNAUTHORIZED_CODES (lib/Defaults/index.js), as lib/Socket/socket.js raises them (Boom).
 * Time is a FakeClock: reconnect delays are read from its pending timers.
 */
import { type GroupMetadata, WAMessageAddressingMode } from '@whiskeysockets/baileys';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import {
  addGroup,
  discoverLines,
  disconnectKind,
  GROUPS_SYNCED_AT,
  openCodeAt,
  splitForWhatsApp,
  Store,
  toWhatsAppFormat,
  whatsAppChannel,
  setupLogging,
  WHATSAPP_STABLE_MS,
  WHATSAPP_TYPING_REFRESH_MS,
  type ChannelHandlers,
  type WhatsAppOptions,
} from '../nanoclaw.ts';
import {
  FakeClock,
  flakyServer,
  linkedAuthDir,
  openAsWhatsAppWould,
  RecordingWhatsApp,
  tempProject,
  tempStore,
  waitFor,
  socketOf,
} from './helpers.ts';

const ENTRY = fileURLToPath(new URL('../nanoclaw.ts', import.meta.url));
const DAY = 24 * 60 * 60_000;
const stops: (() => unknown)[] = [];
afterEach(async () => {
  for (const stop of stops.splice(0)) await stop();
});

/** How baileys closes a connection: a Boom with the status code (lib/Socket/socket.js end()). */
const boom = (statusCode: number, message = 'Connection Failure') =>
  Object.assign(new Error(message), { output: { statusCode } });

async function linkedChannel(extra: Partial<WhatsAppOptions> = {}) {
  setupLogging(tempProject(), { terminalLevel: 'silent' });
  const server = flakyServer(60_000);
  const clock = new FakeClock();
  const channel = new RecordingWhatsApp({
    authDir: await linkedAuthDir(),
    assistantName: 'Andy',
    hasOwnNumber: false,
    mediaTreeFor: () => null,
    waWebSocketUrl: server.url,
    clock,
    store: tempStore(),
    ...extra,
  });
  stops.push(async () => {
    await channel.disconnect();
    server.stop();
  });
  return { channel, clock };
}

const closeWith = (channel: RecordingWhatsApp, error: Error) =>
  socketOf(channel).ev.emit('connection.update', { connection: 'close', lastDisconnect: { error, date: new Date() } });

/** The reconnect the channel has scheduled (its delay), or null; the daily group sync is not one. */
const reconnectIn = (clock: FakeClock) => clock.pending.find((ms) => ms < DAY) ?? null;

describe('every disconnect reason, as baileys 7 defines it', () => {
  const noHandlers: ChannelHandlers = { onMessage: () => {} };
  const relink = 'Link this machine again: bun nanoclaw.ts auth --relink';
  const table: [number, string, 'stop' | 'now' | 'backoff', string?][] = [
    [401, 'device-refused', 'stop', relink],
    [403, 'device-refused', 'stop', relink],
    [419, 'device-refused', 'stop', relink],
    [411, 'device-refused', 'stop', relink],
    [440, 'replaced', 'stop', 'Another NanoClaw'],
    [515, 'restart', 'now'],
    [405, 'version-refused', 'backoff'],
    [408, 'network', 'backoff'],
    [428, 'network', 'backoff'],
    [500, 'other', 'backoff'],
    [503, 'other', 'backoff'],
  ];

  it.each(table)('%i (%s): %s', async (code, kind, then, says) => {
    const stopped: string[] = [];
    const { channel, clock } = await linkedChannel({ onStopped: (why) => stopped.push(why) });
    await channel.connect(noHandlers);
    openAsWhatsAppWould(socketOf(channel));
    expect(disconnectKind(boom(code)).kind).toBe(kind);
    closeWith(channel, boom(code));
    if (then === 'stop') {
      expect(stopped).toHaveLength(1);
      expect(stopped[0]).toContain(says);
      expect(stopped[0]).toContain(`(${code}`);
      expect(reconnectIn(clock)).toBeNull(); // never again, however long
      await clock.advance(DAY - 1);
      expect(channel.socketsOpened).toBe(1);
      return;
    }
    expect(stopped).toEqual([]);
    const delay = reconnectIn(clock)!;
    if (then === 'now') expect(delay).toBe(0);
    else expect(delay).toBeGreaterThanOrEqual(500); // the first backoff step: 1 s, jittered down to half
    await clock.advance(delay);
    await waitFor(() => channel.socketsOpened === 2, 60_000, 'the next connection');
  });

  it('a 408 from an expired QR code and an OS network error are told apart from the rest; both are waited out', async () => {
    expect(disconnectKind(boom(408, 'QR refs attempts ended')).kind).toBe('qr-expired');
    expect(disconnectKind(Object.assign(new Error('getaddrinfo'), { data: { code: 'ENOTFOUND' } })).kind).toBe(
      'network',
    );
    const { channel, clock } = await linkedChannel();
    await channel.connect(noHandlers);
    openAsWhatsAppWould(socketOf(channel));
    closeWith(channel, boom(408, 'QR refs attempts ended'));
    expect(reconnectIn(clock)).toBeGreaterThanOrEqual(500); // the first backoff step, as for any other drop
  });

  it('backs off exponentially up to the cap; a connection that drops at once never resets it, one that held does', async () => {
    const { channel, clock } = await linkedChannel();
    await channel.connect({ onMessage: () => {} });
    const dropAfter = async (openForMs: number) => {
      const opened = channel.socketsOpened;
      openAsWhatsAppWould(socketOf(channel));
      await clock.advance(openForMs);
      closeWith(channel, boom(428, 'Connection Terminated'));
      const delay = reconnectIn(clock)!;
      await clock.advance(delay);
      await waitFor(() => channel.socketsOpened === opened + 1, 60_000, 'the next connection');
      return delay;
    };
    const quick: number[] = [];
    for (let i = 0; i < 8; i++) quick.push(await dropAfter(1_000));
    const ceilings = [1, 2, 4, 8, 16, 32, 60, 60].map((s) => s * 1000); // base 1 s, doubled, capped at a minute
    quick.forEach((delay, i) => {
      expect(delay).toBeGreaterThanOrEqual(ceilings[i]! / 2);
      expect(delay).toBeLessThanOrEqual(ceilings[i]!);
    });
    expect(await dropAfter(WHATSAPP_STABLE_MS)).toBeLessThanOrEqual(1000); // it held: back to the first step
  });

  it('a restart WhatsApp asks for (515) does not count as a failure', async () => {
    const { channel, clock } = await linkedChannel();
    await channel.connect({ onMessage: () => {} });
    closeWith(channel, boom(428));
    await clock.advance(reconnectIn(clock)!);
    await waitFor(() => channel.socketsOpened === 2, 60_000, 'second connection');
    const before = socketOf(channel);
    before.ev.emit('creds.update', { routingInfo: Buffer.from('moved') }); // written in the background…
    closeWith(channel, boom(515, 'Stream Errored (restart required)'));
    expect(reconnectIn(clock)).toBe(0);
    await clock.advance(0);
    await waitFor(() => channel.socketsOpened === 3, 60_000, 'third connection');
    // …and the next socket has it without reading the file mid-write: the same credentials, in memory.
    expect(socketOf(channel).authState.creds).toBe(before.authState.creds);
    expect(socketOf(channel).authState.creds.routingInfo).toEqual(Buffer.from('moved'));
    closeWith(channel, boom(428));
    expect(reconnectIn(clock)).toBeLessThanOrEqual(2000); // the second step, not the third
    expect(reconnectIn(clock)).toBeGreaterThanOrEqual(1000);
  });
});

describe('typing and presence', () => {
  const GROUP = '120363000000000001@g.us';
  const ALICE = '4915100000002@s.whatsapp.net';

  it('"typing…" is said again every 8 s while a turn runs, and "paused" at the answer; nothing after', async () => {
    const { channel, clock } = await linkedChannel();
    await channel.connect({ onMessage: () => {} });
    const sock = socketOf(channel);
    const said: string[] = [];
    const subscribed: string[] = [];
    sock.sendPresenceUpdate = async (state, jid) => void said.push(`${state} ${jid}`);
    sock.presenceSubscribe = async (jid) => void subscribed.push(jid);
    openAsWhatsAppWould(sock);
    await channel.setTyping(GROUP, true);
    expect(said).toEqual([`composing ${GROUP}`]);
    expect(subscribed).toEqual([GROUP]); // registered after the connection opened: subscribed at its first turn
    await clock.advance(WHATSAPP_TYPING_REFRESH_MS - 1);
    expect(said).toHaveLength(1);
    await clock.advance(1);
    await clock.advance(WHATSAPP_TYPING_REFRESH_MS);
    expect(said).toEqual(Array(3).fill(`composing ${GROUP}`));
    await channel.setTyping(GROUP, false);
    expect(said.at(-1)).toBe(`paused ${GROUP}`);
    await channel.setTyping(GROUP, true);
    await channel.setTyping(GROUP, false);
    said.splice(-2);
    expect(subscribed).toEqual([GROUP]); // once per connection
    await clock.advance(10 * WHATSAPP_TYPING_REFRESH_MS);
    expect(said).toHaveLength(4);
    await channel.setTyping(GROUP, true); // a follow-up's turn; the channel then goes away
    await channel.disconnect();
    await clock.advance(10 * WHATSAPP_TYPING_REFRESH_MS);
    expect(said).toHaveLength(5);
  });

  it('available while connected with its own number (so others’ typing arrives); on a shared number not, so the owner’s phone keeps notifying', async () => {
    for (const hasOwnNumber of [true, false]) {
      const { channel } = await linkedChannel({ hasOwnNumber });
      await channel.connect({ onMessage: () => {} });
      const online: boolean[] = [];
      // baileys says so as it sends the presence (lib/Socket/chats.js sendPresenceUpdate, at open).
      socketOf(channel).ev.on('connection.update', ({ isOnline }) => isOnline !== undefined && online.push(isOnline));
      openAsWhatsAppWould(socketOf(channel));
      await waitFor(() => online.length === 1, 60_000, 'the presence sent at open');
      expect(online).toEqual([hasOwnNumber]);
    }
  });

  it('someone typing reaches the host with who it is, as baileys parses a chatstate; our own typing does not', async () => {
    const activity: [string, string | undefined][] = [];
    const { channel } = await linkedChannel();
    await channel.connect({ onMessage: () => {}, onActivity: (chat, typist) => activity.push([chat, typist]) });
    const sock = socketOf(channel);
    openAsWhatsAppWould(sock);
    const chatstate = (participant: string) =>
      sock.ws.emit('CB:chatstate', {
        tag: 'chatstate',
        attrs: { from: GROUP, participant },
        content: [{ tag: 'composing', attrs: {} }],
      });
    chatstate(sock.user!.id);
    chatstate(ALICE);
    sock.ev.flush();
    expect(activity).toEqual([[GROUP, ALICE]]);
  });
});

describe('sends and group syncs wait on the channel’s clock', () => {
  const ALICE = '4915100000002@s.whatsapp.net';

  it('a send over the rate limit (20 a minute per chat) waits until its window has room, then goes', async () => {
    const { channel, clock } = await linkedChannel();
    await channel.connect({ onMessage: () => {} });
    openAsWhatsAppWould(socketOf(channel));
    for (let i = 1; i <= 20; i++) await channel.deliver(ALICE, `${i}`, `ID${i}`);
    const over = channel.deliver(ALICE, 'over', 'ID21');
    await clock.advance(59_999);
    expect(channel.delivered).toHaveLength(20);
    await clock.advance(1); // no real minute passes
    expect(channel.delivered.map((d) => d.text).at(-1)).toBe('over');
    await over;
  });

  it('group names are synced at connect when never synced, then once a day', async () => {
    const { channel, clock } = await linkedChannel();
    let syncs = 0;
    await channel.connect({ onMessage: () => {} });
    socketOf(channel).groupFetchAllParticipating = async () => {
      syncs++;
      return {};
    };
    openAsWhatsAppWould(socketOf(channel));
    await clock.advance(0);
    expect(syncs).toBe(1);
    await clock.advance(DAY - 1);
    expect(syncs).toBe(1);
    await clock.advance(1);
    expect(syncs).toBe(2);
  });

  it('the last sync is stamped with the channel’s clock, the one the check at connect compares with', async () => {
    const store = new Store(tempProject().dbPath);
    stops.push(() => store.close());
    const { channel, clock } = await linkedChannel({ store });
    await channel.connect({ onMessage: () => {} });
    socketOf(channel).groupFetchAllParticipating = async () => ({});
    await clock.advance(1000);
    openAsWhatsAppWould(socketOf(channel));
    await waitFor(() => store.getState(GROUPS_SYNCED_AT), 60_000, 'the group sync');
    expect(store.getState(GROUPS_SYNCED_AT)).toBe(new Date(clock.now()).toISOString());
  });
});

describe('group metadata, long replies, chat ids, discovering chats', () => {
  const GROUP = '120363000000000001@g.us';
  const full = (members: number): GroupMetadata => ({
    id: GROUP,
    subject: 'Family',
    owner: undefined,
    addressingMode: WAMessageAddressingMode.LID,
    participants: Array.from({ length: members }, (_, i) => ({ id: `${1000 + i}@lid` })),
  });

  it('group metadata for sends (baileys’ cachedGroupMetadata) is fetched again once it expired, and kept for the next sends', async () => {
    const { channel, clock } = await linkedChannel();
    let members = 3;
    let lookups = 0;
    await channel.connect({ onMessage: () => {}, onChatMetadata: () => {} });
    const sock = socketOf(channel);
    sock.groupFetchAllParticipating = async () => ({});
    sock.groupMetadata = async () => {
      lookups++;
      return full(members);
    };
    openAsWhatsAppWould(sock);
    expect((await channel.cachedGroupMetadata(GROUP))!.participants).toHaveLength(3);
    expect((await channel.cachedGroupMetadata(GROUP))!.participants).toHaveLength(3);
    expect(lookups).toBe(1);
    members = 4;
    await clock.advance(5 * 60_000); // baileys' README's five minutes
    expect((await channel.cachedGroupMetadata(GROUP))!.participants).toHaveLength(4);
    expect(await channel.cachedGroupMetadata(GROUP)).toBeDefined();
    expect(lookups).toBe(2);
  });

  it('a code block or inline code cut between two parts is closed in one and opened again in the next', () => {
    const code = Array.from({ length: 30 }, (_, i) => `  step${i} = run(${i});`).join('\n');
    const reply = toWhatsAppFormat(`Here is the script:\n\n\`\`\`js\n${code}\n\`\`\`\n\nThat is all.`);
    const parts = splitForWhatsApp(reply, 200);
    expect(parts.length).toBeGreaterThan(3);
    for (const part of parts) {
      expect(part.length).toBeLessThanOrEqual(200);
      expect(openCodeAt(part)).toBe(''); // every part's code is closed
    }
    expect(parts[1]!.startsWith('```  step')).toBe(true); // opened again, indentation kept
    const joined = parts.join('\n').replace(/```\n```/g, '\n');
    for (let i = 0; i < 30; i++) expect(joined).toContain(`  step${i} = run(${i});`);
    expect(parts.at(-1)).toMatch(/```\n\nThat is all\.$/);

    const inline = `Run \`${'--flag value '.repeat(30).trim()}\` and stop.`;
    const inlineParts = splitForWhatsApp(inline, 150);
    expect(inlineParts.length).toBeGreaterThan(1);
    for (const part of inlineParts) expect(openCodeAt(part)).toBe('');
    expect(inlineParts[1]!.startsWith('`--flag')).toBe(true);
    expect(inlineParts.join(' ').replace(/` `/g, ' ')).toBe(inline);
  });

  it('a LID is refused where a chat is registered (groups register, main’s register_group), saying what to use', async () => {
    const config = tempProject();
    const store = new Store(config.dbPath);
    stops.push(() => store.close());
    expect(() => addGroup(config, store, { jid: '11223344@lid', name: 'Alice', folder: 'alice' })).toThrow(
      /is a LID .* not a chat id: use the person's <phone digits>@s\.whatsapp\.net or a group's <digits>@g\.us \(bun nanoclaw\.ts groups discover/,
    );
    expect(store.listGroups()).toEqual([]);
    const refused = await cli(config.projectRoot, ['groups', 'register', '11223344@lid', 'alice']);
    expect(refused.code).toBe(2);
    expect(refused.stderr.split('\n')[0]).toContain('"11223344@lid" is a LID');
  });

  it('groups discover lists the chats WhatsApp told of, groups first, with ids, names, members and whether registered', async () => {
    const config = tempProject();
    const store = new Store(config.dbPath);
    stops.push(() => store.close());
    expect(discoverLines(store)[0]).toContain('No WhatsApp chats known yet');
    // A sync at connect, as the service does it: names into chats (the host's onChatMetadata), member counts kept.
    const server = flakyServer(60_000);
    const channel = whatsAppChannel(config, store, { authDir: await linkedAuthDir(), waWebSocketUrl: server.url });
    stops.push(async () => {
      await channel.disconnect();
      server.stop();
    });
    await channel.connect({
      onMessage: () => {},
      onChatMetadata: (chat) => store.upsertChat({ ...chat, channel: 'whatsapp' }),
    });
    const sock = socketOf(channel);
    sock.groupFetchAllParticipating = async () => ({
      [GROUP]: { ...full(5), subject: 'Family \u001b[31m🏡' },
      '120363000000000002@g.us': { ...full(0), id: '120363000000000002@g.us', subject: 'Book club' },
    });
    openAsWhatsAppWould(sock);
    await waitFor(() => store.getState(GROUPS_SYNCED_AT), 60_000, 'the group sync');
    store.upsertChat({ jid: '4915100000002@s.whatsapp.net', name: 'Alice', channel: 'whatsapp', isGroup: false });
    store.upsertChat({ jid: 'main@local', name: 'Terminal', channel: 'local', isGroup: false });
    addGroup(config, store, { jid: GROUP, name: 'Family', folder: 'family' });
    const out = await cli(config.projectRoot, ['groups', 'discover']);
    expect(out.code).toBe(0);
    const lines = out.stdout.split('\n');
    expect(lines[0]).toMatch(/^120363000000000002@g\.us\s+0 members\s+not registered\s+Book club$/);
    expect(lines[1]).toMatch(/^120363000000000001@g\.us\s+5 members\s+groups\/family\s+Family \\x1b\[31m🏡$/);
    expect(lines[2]).toMatch(/^4915100000002@s\.whatsapp\.net\s+person\s+not registered\s+Alice$/);
    expect(out.stdout).not.toContain('main@local');
    expect(out.stdout).not.toContain('\u001b');
    expect(out.stdout).toContain('bun nanoclaw.ts groups register <id> <folder>');
  });
});

/** `bun nanoclaw.ts …` in a project, as a user runs it. */
async function cli(root: string, args: string[]) {
  const proc = Bun.spawn([process.execPath, ENTRY, ...args], {
    cwd: root,
    stdin: 'ignore',
    stdout: 'pipe',
    stderr: 'pipe',
    env: { PATH: process.env.PATH!, HOME: process.env.HOME!, NANOCLAW_ROOT: root },
  });
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { stdout, stderr, code };
}
