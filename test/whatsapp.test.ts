/**
 * The WhatsApp channel with real baileys objects: messages are built from baileys' own
 * protobuf types, sockets are real baileys sockets talking to a local WebSocket server
 * (WhatsApp's servers cannot be reached here, so the handshake never completes; where a
 * test needs an open connection it emits `connection.update` on the real socket).
 */
import { proto, WAMessageAddressingMode, type GroupMetadata, type WAMessage } from '@whiskeysockets/baileys';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  AgentTree,
  Host,
  backoff,
  parseWhatsAppMessage,
  RateLimiter,
  addGroup,
  safeMediaFileName,
  setupLogging,
  splitForWhatsApp,
  Store,
  OutboxSender,
  newMessageId,
  toWhatsAppFormat,
  WhatsAppChannel,
  whatsAppChannel,
  type Clock,
  makeSelfChatMain,
  LOCAL_MAIN_JID,
  type ChannelHandlers,
  type NewMessage,
  type WhatsAppIdentity,
  type WhatsAppOptions,
} from '../nanoclaw.ts';
import {
  encryptedStream,
  FakeClock,
  fakeDocker,
  fastClock,
  flakyServer,
  groupMetadataOf,
  linkedAuthDir,
  openAsWhatsAppWould,
  pendingPairingAuthDir,
  QUIET_SWEEPS,
  RecordingWhatsApp,
  tempDir,
  tempProject,
  tempStore,
  waitFor,
  watchSockets,
  writeJsonAtomic,
  socketOf,
} from './helpers.ts';

const ME = '4915100000001@s.whatsapp.net';
const ME_LID = '99887766@lid';
const ALICE = '4915100000002@s.whatsapp.net';
const ALICE_LID = '11223344@lid';
const GROUP = '120363000000000001@g.us';

const identity = (overrides: Partial<WhatsAppIdentity> = {}): WhatsAppIdentity => ({
  ownJids: new Set([ME, ME_LID]),
  assistantName: 'Andy',
  hasOwnNumber: false,
  phoneForLid: (lid) => (({ [ALICE_LID]: ALICE, [ME_LID]: ME }) as Record<string, string>)[lid],
  ...overrides,
});

/** A message as baileys delivers it, built with baileys' own protobuf type. */
function waMessage(fields: {
  remoteJid: string;
  id?: string;
  fromMe?: boolean;
  participant?: string;
  message: proto.IMessage;
  pushName?: string;
  key?: Record<string, unknown>;
}): WAMessage {
  const message = proto.WebMessageInfo.fromObject({
    key: {
      remoteJid: fields.remoteJid,
      fromMe: fields.fromMe ?? false,
      id: fields.id ?? `ID${Math.random().toString(16).slice(2, 14).toUpperCase()}`,
      participant: fields.participant,
    },
    message: fields.message,
    messageTimestamp: 1_790_000_000,
    pushName: fields.pushName ?? 'Alice',
  }) as WAMessage;
  // baileys adds the alternate (LID/phone) addressing to the decoded key; it is not in the protobuf.
  Object.assign(message.key, fields.key);
  return message;
}

describe('parseWhatsAppMessage', () => {
  it('reads plain, extended and captioned text with sender and time', () => {
    const plain = parseWhatsAppMessage(
      waMessage({ remoteJid: GROUP, participant: ALICE, message: { conversation: 'hi all' } }),
      identity(),
    )!;
    expect(plain.message).toMatchObject({
      chatJid: GROUP,
      sender: ALICE,
      senderName: 'Alice',
      content: 'hi all',
      isFromMe: false,
      isBotMessage: false,
      timestamp: new Date(1_790_000_000_000).toISOString(),
    });
    expect(plain.isGroup).toBe(true);
    const extended = parseWhatsAppMessage(
      waMessage({ remoteJid: ALICE, message: { extendedTextMessage: { text: 'see https://example.org' } } }),
      identity(),
    )!;
    expect(extended.message.content).toBe('see https://example.org');
    expect(extended.isGroup).toBe(false);
  });

  it('describes every media kind with its caption', () => {
    const cases: [proto.IMessage, string, string][] = [
      [{ imageMessage: { caption: 'our cat', mimetype: 'image/jpeg', fileLength: 1000 } }, 'image', 'our cat'],
      [{ videoMessage: { caption: 'the goal', mimetype: 'video/mp4' } }, 'video', 'the goal'],
      [{ audioMessage: { ptt: true, mimetype: 'audio/ogg; codecs=opus' } }, 'voice note', ''],
      [{ audioMessage: { ptt: false, mimetype: 'audio/mpeg' } }, 'audio', ''],
      [
        { documentMessage: { fileName: 'invoice.pdf', mimetype: 'application/pdf', caption: 'pay this' } },
        'document',
        'pay this',
      ],
      [{ stickerMessage: { mimetype: 'image/webp' } }, 'sticker', ''],
    ];
    for (const [message, kind, caption] of cases) {
      const parsed = parseWhatsAppMessage(waMessage({ remoteJid: GROUP, participant: ALICE, message }), identity());
      expect(parsed?.media?.kind, kind).toBe(kind);
      expect(parsed?.message.content, kind).toBe(caption);
    }
    const doc = parseWhatsAppMessage(
      waMessage({ remoteJid: GROUP, participant: ALICE, message: cases[4]![0] }),
      identity(),
    )!;
    expect(doc.media?.fileName).toBe('invoice.pdf');
  });

  it('carries what a reply quotes', () => {
    const reply = parseWhatsAppMessage(
      waMessage({
        remoteJid: GROUP,
        participant: ALICE,
        message: {
          extendedTextMessage: {
            text: 'yes, that one',
            contextInfo: { quotedMessage: { conversation: 'dinner at 7?' } },
          },
        },
      }),
      identity(),
    )!;
    expect(reply.message.content).toBe('[replying to: "dinner at 7?"]\nyes, that one');
  });

  it('ignores reactions, protocol messages, status broadcasts and empty messages', () => {
    expect(
      parseWhatsAppMessage(
        waMessage({
          remoteJid: GROUP,
          participant: ALICE,
          message: { reactionMessage: { text: '👍', key: { id: 'X' } } },
        }),
        identity(),
      ),
    ).toBeNull();
    expect(
      parseWhatsAppMessage(
        waMessage({
          remoteJid: ALICE,
          message: { protocolMessage: { type: proto.Message.ProtocolMessage.Type.REVOKE } },
        }),
        identity(),
      ),
    ).toBeNull();
    expect(
      parseWhatsAppMessage(
        waMessage({ remoteJid: 'status@broadcast', participant: ALICE, message: { conversation: 'my status' } }),
        identity(),
      ),
    ).toBeNull();
    expect(
      parseWhatsAppMessage(waMessage({ remoteJid: ALICE, message: { conversation: '   ' } }), identity()),
    ).toBeNull();
    expect(parseWhatsAppMessage(waMessage({ remoteJid: ALICE, message: {} }), identity())).toBeNull();
  });

  it('translates LID chats and senders to phone JIDs, so the self-chat is recognised', () => {
    const selfChat = parseWhatsAppMessage(
      waMessage({ remoteJid: ME_LID, fromMe: true, message: { conversation: 'note to self' } }),
      identity(),
    )!;
    expect(selfChat.message.chatJid).toBe(ME);
    const viaAlt = parseWhatsAppMessage(
      waMessage({
        remoteJid: '555@lid',
        message: { conversation: 'hi' },
        key: { remoteJidAlt: '4915100000009@s.whatsapp.net' },
      }),
      identity(),
    )!;
    expect(viaAlt.message.chatJid).toBe('4915100000009@s.whatsapp.net');
    const groupLid = parseWhatsAppMessage(
      waMessage({ remoteJid: GROUP, participant: ALICE_LID, message: { conversation: 'hey' } }),
      identity(),
    )!;
    expect(groupLid.message.sender).toBe(ALICE);
    const device = parseWhatsAppMessage(
      waMessage({ remoteJid: '4915100000002:12@s.whatsapp.net', message: { conversation: 'from a device' } }),
      identity(),
    )!;
    expect(device.message.chatJid).toBe(ALICE);
  });

  it('marks the bot’s own messages by the ids it sent, in both modes, never by their text', () => {
    const sent = new Set(['3EB0SENTBYBOT']);
    for (const hasOwnNumber of [false, true]) {
      const mode = identity({ hasOwnNumber, sentByBot: (id) => sent.has(id) });
      const parse = (fields: Parameters<typeof waMessage>[0]) => parseWhatsAppMessage(waMessage(fields), mode)!.message;
      expect(
        parse({ remoteJid: ME, fromMe: true, id: '3EB0SENTBYBOT', message: { conversation: 'Andy: done' } }),
      ).toMatchObject({ isBotMessage: true });
      expect(
        parse({ remoteJid: ME, fromMe: true, id: 'TYPEDBYOWNER', message: { conversation: 'Andy: remind me at 5' } }),
      ).toMatchObject({ isBotMessage: false, isFromMe: true, sender: ME });
      expect(
        parse({ remoteJid: GROUP, participant: ALICE, message: { conversation: 'Andy: you said what?' } }),
      ).toMatchObject({ isBotMessage: false, isFromMe: false });
      expect(parse({ remoteJid: GROUP, fromMe: true, message: { conversation: 'done' } }).isBotMessage).toBe(false);
    }
  });
});

describe('outbound formatting', () => {
  it('renders Markdown in WhatsApp’s style', () => {
    expect(toWhatsAppFormat('**bold** and *italic* and ~~gone~~')).toBe('*bold* and _italic_ and ~gone~');
    expect(toWhatsAppFormat('## Plan\n- one\n- two\n* three')).toBe('*Plan*\n• one\n• two\n• three');
    expect(toWhatsAppFormat('see [docs](https://example.org/x)')).toBe('see docs (https://example.org/x)');
    expect(toWhatsAppFormat('```ts\nconst **x** = 1;\n```')).toBe('```const **x** = 1;\n```');
    expect(toWhatsAppFormat('`inline` stays')).toBe('`inline` stays');
  });

  it('splits long replies at paragraph, then sentence, then word boundaries, losing nothing', () => {
    const paragraphs = Array.from({ length: 6 }, (_, i) => `Paragraph ${i}. ${'word '.repeat(150).trim()}.`).join(
      '\n\n',
    );
    const parts = splitForWhatsApp(paragraphs, 2000);
    expect(parts.length).toBeGreaterThan(1);
    for (const part of parts) expect(part.length).toBeLessThanOrEqual(2000);
    expect(parts.every((p) => p.startsWith('Paragraph'))).toBe(true);
    expect(parts.join(' ').replace(/\s+/g, ' ')).toBe(paragraphs.replace(/\s+/g, ' '));
    const oneLongWord = 'x'.repeat(5000);
    expect(splitForWhatsApp(oneLongWord, 2000).map((p) => p.length)).toEqual([2000, 2000, 1000]);
    expect(splitForWhatsApp('short')).toEqual(['short']);
  });

  it('keeps media file names safe', () => {
    expect(safeMediaFileName('3EB0ABC', 'document', 'application/pdf', '../../etc/pass wd.pdf')).toBe(
      '3EB0ABC-etc-pass-wd.pdf',
    );
    expect(safeMediaFileName('3EB0ABC', 'voice note', 'audio/ogg; codecs=opus')).toBe('3EB0ABC-voice-note.ogg');
  });
});

describe('reconnect backoff and rate limit', () => {
  it('grows exponentially, is capped, and is jittered', () => {
    const reconnect = { baseMs: 1000, capMs: 30_000, jitter: true };
    const low = [1, 2, 3, 4, 5, 10].map((n) => backoff(n, reconnect, () => 0));
    const high = [1, 2, 3, 4, 5, 10].map((n) => backoff(n, reconnect, () => 1));
    expect(low).toEqual([500, 1000, 2000, 4000, 8000, 15000]);
    expect(high).toEqual([1000, 2000, 4000, 8000, 16000, 30000]);
  });

  it('limits messages per chat and overall within a window', () => {
    const limiter = new RateLimiter({ count: 2, windowMs: 1000 }, { count: 3, windowMs: 1000 });
    const t = 1_000_000;
    expect(limiter.delayFor('a', t)).toBe(0);
    limiter.record('a', t);
    limiter.record('a', t + 100);
    expect(limiter.delayFor('a', t + 200)).toBe(800); // the first of the two leaves the window at t+1000
    expect(limiter.delayFor('b', t + 200)).toBe(0);
    limiter.record('b', t + 200);
    expect(limiter.delayFor('c', t + 300)).toBe(700); // three overall already
    expect(limiter.delayFor('a', t + 1100)).toBe(0);
  });
});

const stops: (() => unknown)[] = [];
afterEach(async () => {
  for (const stop of stops.splice(0)) await stop();
});

/** Time 25 times fast (a reconnect's first second passes in 40 ms), keeping every delay it is asked to wait (the reconnects'; the daily group sync's is a day). */
function recordingClock(waits: number[]): Clock {
  const clock = fastClock(25);
  return {
    ...clock,
    after: (ms, fn) => {
      waits.push(ms);
      return clock.after(ms, fn);
    },
  };
}
const reconnects = (waits: number[]) => waits.filter((ms) => ms < 24 * 60 * 60_000);

function channelOptions(authDir: string, url: string, extra: Partial<WhatsAppOptions> = {}): WhatsAppOptions {
  return {
    authDir,
    assistantName: 'Andy',
    hasOwnNumber: false,
    mediaTreeFor: () => null,
    waWebSocketUrl: url,
    clock: fastClock(25),
    store: tempStore(),
    ...extra,
  };
}

describe('WhatsAppChannel connection', () => {
  const noHandlers: ChannelHandlers = { onMessage: () => {} };

  it('says to run auth when this machine is not linked', async () => {
    const channel = new WhatsAppChannel(channelOptions(tempDir(), 'ws://127.0.0.1:9/none'));
    await expect(channel.connect(noHandlers)).rejects.toThrow('bun nanoclaw.ts auth');
  });

  it('keeps one live socket through repeated drops, with growing backoff', async () => {
    setupLogging(tempProject(), { terminalLevel: 'silent' });
    const server = flakyServer(30);
    stops.push(server.stop);
    const waits: number[] = [];
    const channel = new RecordingWhatsApp(
      channelOptions(await linkedAuthDir(), server.url, { clock: recordingClock(waits) }),
    );
    stops.push(() => channel.disconnect());
    await channel.connect(noHandlers);
    await waitFor(() => server.connectedAt.length >= 6, 60_000, 'six connections');
    expect(server.maxOpen).toBe(1);
    expect(channel.socketsOpened).toBeGreaterThanOrEqual(6);
    const delays = reconnects(waits).slice(0, 5);
    expect(delays).toHaveLength(5);
    const ceilings = delays.map((_, i) => Math.min(60_000, 1000 * 2 ** i));
    delays.forEach((delay, i) => {
      expect(delay).toBeGreaterThanOrEqual(ceilings[i]! / 2);
      expect(delay).toBeLessThanOrEqual(ceilings[i]!);
    });
    const gaps = server.connectedAt.slice(1, 6).map((t, i) => t - server.connectedAt[i]!);
    expect(gaps.at(-1)!).toBeGreaterThan(gaps[0]!); // backoff, not a tight loop
  });

  it('ignores everything a retired socket still emits, and keeps backing off when a connection drops at once', async () => {
    setupLogging(tempProject(), { terminalLevel: 'silent' });
    const server = flakyServer((n) => (n <= 2 ? 30 : 60_000)); // two drops, then a steady connection
    stops.push(server.stop);
    const received: NewMessage[] = [];
    const waits: number[] = [];
    const channel = new RecordingWhatsApp(
      channelOptions(await linkedAuthDir(), server.url, { clock: recordingClock(waits) }),
    );
    stops.push(() => channel.disconnect());
    await channel.connect({ onMessage: (m) => received.push(m) });
    const retired = socketOf(channel);
    await waitFor(() => channel.socketsOpened >= 3, 60_000, 'three sockets');
    retired.ev.emit('messages.upsert', {
      messages: [waMessage({ remoteJid: ALICE, message: { conversation: 'from the past' } })],
      type: 'notify',
    });
    retired.ev.emit('connection.update', { connection: 'open' });
    await Bun.sleep(50);
    expect(received).toEqual([]);
    expect(channel.ready).toBe(false);
    const live = socketOf(channel);
    openAsWhatsAppWould(live);
    expect(channel.ready).toBe(true);
    live.ev.emit('messages.upsert', {
      messages: [waMessage({ remoteJid: ALICE, message: { conversation: 'now' } })],
      type: 'notify',
    });
    await waitFor(() => received.length === 1, 60_000, 'live message');
    expect(received[0]!.content).toBe('now');
    live.ev.emit('connection.update', {
      connection: 'close',
      lastDisconnect: { error: new Error('drop'), date: new Date() },
    });
    expect(reconnects(waits).at(-1)!).toBeGreaterThan(1000); // not attempt 1 again: it did not hold (test/whatsapp-connection.test.ts)
  });

  /** What the host does when the bot speaks: the parts go into the store's outbox, then the sender sends them. */
  const say = (store: Store, channel: WhatsAppChannel, sender: OutboxSender, jid: string, text: string) => {
    for (const part of channel.layout(text)) store.addOutbound('whatsapp', jid, part, newMessageId());
    sender.kick();
  };

  it('queues replies while offline and delivers them in order once, after reconnecting, each under its own id', async () => {
    const config = tempProject();
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    const server = flakyServer(60_000);
    stops.push(server.stop);
    const channel = new RecordingWhatsApp(channelOptions(await linkedAuthDir(), server.url, { store }));
    const sender = new OutboxSender(store, channel, { retryBaseMs: 50 });
    stops.push(async () => {
      sender.stop();
      await channel.disconnect();
      store.close();
    });
    await channel.connect({ ...noHandlers, onReady: () => sender.kick() });
    await waitFor(() => server.connectedAt.length === 1, 60_000, 'connection');
    openAsWhatsAppWould(socketOf(channel));
    say(store, channel, sender, GROUP, 'one');
    await waitFor(() => channel.delivered.length === 1, 60_000, 'first delivery');
    socketOf(channel).ev.emit('connection.update', {
      connection: 'close',
      lastDisconnect: { error: new Error('network down'), date: new Date() },
    });
    say(store, channel, sender, GROUP, 'two');
    say(store, channel, sender, ALICE, 'three');
    await sender.settle();
    expect(store.unsent('whatsapp').length).toBe(2);
    await waitFor(() => channel.socketsOpened === 2, 60_000, 'reconnect');
    openAsWhatsAppWould(socketOf(channel));
    await waitFor(() => channel.delivered.length === 3, 60_000, 'queued deliveries');
    await sender.settle();
    // Each chat in order (chats are lanes of their own, sent side by side).
    const inChat = (jid: string) => channel.delivered.filter((d) => d.jid === jid).map((d) => d.text);
    expect(inChat(GROUP)).toEqual(['one', 'two']);
    expect(inChat(ALICE)).toEqual(['three']);
    expect(new Set(channel.delivered.map((d) => d.messageId)).size).toBe(3);
    expect(store.unsent('whatsapp').length).toBe(0);
  });

  it('replies still waiting when the process stops go out after the next connect; one sent but not marked goes again under the same id', async () => {
    const config = tempProject();
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    const server = flakyServer(60_000);
    stops.push(server.stop);
    const authDir = await linkedAuthDir();
    const first = new RecordingWhatsApp(channelOptions(authDir, server.url, { store }));
    const firstSender = new OutboxSender(store, first, { retryBaseMs: 50 });
    await first.connect(noHandlers);
    say(store, first, firstSender, GROUP, 'written while offline');
    say(store, first, firstSender, ALICE, 'and this too');
    await firstSender.settle();
    firstSender.stop();
    await first.disconnect(); // the process stops before WhatsApp came back
    expect(store.unsent('whatsapp').length).toBe(2);
    // As if a crash came after a part reached WhatsApp but before it was marked sent:
    const unsentId = store.unsentHeads('whatsapp')[0]!.messageId;
    const second = new RecordingWhatsApp(channelOptions(authDir, server.url, { store }));
    const secondSender = new OutboxSender(store, second, { retryBaseMs: 50 });
    stops.push(async () => {
      secondSender.stop();
      await second.disconnect();
      store.close();
    });
    await second.connect({ ...noHandlers, onReady: () => secondSender.kick() });
    openAsWhatsAppWould(socketOf(second));
    await waitFor(() => second.delivered.length === 2, 60_000, 'stored replies');
    expect(second.delivered.map(({ jid, text }) => ({ jid, text }))).toEqual(
      expect.arrayContaining([
        { jid: GROUP, text: 'written while offline' },
        { jid: ALICE, text: 'and this too' },
      ]),
    );
    // a resend is the same WhatsApp message
    expect(second.delivered.find((d) => d.jid === GROUP)!.messageId).toBe(unsentId);
    await secondSender.settle();
    expect(store.unsent('whatsapp').length).toBe(0);
    expect(store.outboundByMessageId(unsentId)).toMatchObject({ chatJid: GROUP, text: 'written while offline' });
  });

  it('stops for good when WhatsApp logs the device out, leaving the credentials in place', async () => {
    setupLogging(tempProject(), { terminalLevel: 'silent' });
    const server = flakyServer(60_000);
    stops.push(server.stop);
    const stopped: string[] = [];
    const authDir = await linkedAuthDir();
    const channel = new RecordingWhatsApp(
      channelOptions(authDir, server.url, { onStopped: (why) => stopped.push(why) }),
    );
    stops.push(() => channel.disconnect());
    await channel.connect(noHandlers);
    const error = Object.assign(new Error('logged out'), { output: { statusCode: 401 } });
    socketOf(channel).ev.emit('connection.update', {
      connection: 'close',
      lastDisconnect: { error, date: new Date() },
    });
    await Bun.sleep(300);
    expect(stopped).toHaveLength(1);
    expect(stopped[0]).toContain('(401'); // the status, and the fix
    expect(stopped[0]).toContain('Link this machine again: bun nanoclaw.ts auth --relink');
    expect(channel.socketsOpened).toBe(1);
    expect(readdirSync(authDir)).toContain('creds.json');
  });
});

describe('WhatsApp through the host (fake docker)', () => {
  it('one inbound message → exactly one reply through the send path, even when replayed after reconnects', async () => {
    const docker = fakeDocker();
    const config = tempProject({ CONTAINER_RUNTIME: docker.path }, 'KIMI_API_KEY=sk-wa-test-12345678\n');
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    addGroup(config, store, { jid: GROUP, name: 'Family', folder: 'family' });
    const server = flakyServer(60_000);
    stops.push(server.stop);
    const channel = new RecordingWhatsApp({
      authDir: await linkedAuthDir(),
      assistantName: 'Andy',
      hasOwnNumber: false,
      waWebSocketUrl: server.url,
      clock: fastClock(25),
      store,
      mediaTreeFor: (jid) => (store.groupByJid(jid) ? new AgentTree(join(config.groupsDir, 'family')) : null),
    });
    const host = new Host(config, store, [channel], QUIET_SWEEPS);
    stops.push(async () => {
      await host.stop();
      store.close();
    });
    await host.start();
    openAsWhatsAppWould(socketOf(channel));
    const inbound = waMessage({
      remoteJid: GROUP,
      participant: ALICE,
      id: 'REPLAYED1',
      message: { conversation: '@Andy what is for dinner?' },
    });
    socketOf(channel).ev.emit('messages.upsert', { messages: [inbound], type: 'notify' });
    await waitFor(() => channel.delivered.length === 1, 60_000, 'reply');
    for (let i = 0; i < 2; i++) {
      socketOf(channel).ev.emit('connection.update', {
        connection: 'close',
        lastDisconnect: { error: new Error('drop'), date: new Date() },
      });
      await waitFor(() => channel.socketsOpened === i + 2, 60_000, 'reconnect');
      openAsWhatsAppWould(socketOf(channel));
      socketOf(channel).ev.emit('messages.upsert', { messages: [inbound], type: 'append' });
    }
    await Bun.sleep(500);
    expect(channel.delivered.map(({ jid, text }) => ({ jid, text }))).toEqual([
      { jid: GROUP, text: 'Andy: echo: what is for dinner?' },
    ]);
    expect(docker.runs()).toHaveLength(1);
  });

  it('downloads media of registered chats into groups/<folder>/media and tells the agent where it is', async () => {
    const docker = fakeDocker();
    const config = tempProject({ CONTAINER_RUNTIME: docker.path }, 'KIMI_API_KEY=sk-wa-test-12345678\n');
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    addGroup(config, store, { jid: GROUP, name: 'Family', folder: 'family' });
    const photo = Buffer.from('pretend this is a JPEG of a cat');
    const encrypted = await encryptedStream(photo, 'image');
    const media = Bun.serve({ port: 0, fetch: () => new Response(Bun.file(encrypted.encFilePath)) });
    stops.push(() => media.stop(true));
    const server = flakyServer(60_000);
    stops.push(server.stop);
    const received: NewMessage[] = [];
    const channel = whatsAppChannel(config, store, { authDir: await linkedAuthDir(), waWebSocketUrl: server.url });
    stops.push(() => channel.disconnect());
    await channel.connect({ onMessage: (m) => received.push(m) });
    const imageMessage = {
      url: `http://127.0.0.1:${media.port}/media/cat.enc`,
      mimetype: 'image/jpeg',
      caption: 'our cat',
      mediaKey: encrypted.mediaKey,
      fileSha256: encrypted.fileSha256,
      fileEncSha256: encrypted.fileEncSha256,
      fileLength: photo.length,
    };
    await channel.onMessage(
      waMessage({ remoteJid: GROUP, participant: ALICE, id: 'PHOTO1', message: { imageMessage } }),
    );
    await channel.onMessage(
      waMessage({
        remoteJid: GROUP,
        participant: ALICE,
        id: 'BIGVIDEO',
        message: {
          videoMessage: {
            url: imageMessage.url,
            mimetype: 'video/mp4',
            fileLength: 80 * 1024 * 1024,
            caption: 'match',
          },
        },
      }),
    );
    await channel.onMessage(
      waMessage({
        remoteJid: 'other@g.us',
        participant: ALICE,
        id: 'NOTOURS',
        message: { imageMessage: { ...imageMessage, caption: 'elsewhere' } },
      }),
    );
    expect(received.map((m) => m.content)).toEqual([
      '[image: /workspace/group/media/PHOTO1-image.jpeg] our cat',
      '[video not downloaded: 80 MB is over the 25 MB limit] match',
      '[image] elsewhere',
    ]);
    expect(readFileSync(join(config.groupsDir, 'family', 'media', 'PHOTO1-image.jpeg'))).toEqual(photo);
    expect(readdirSync(join(config.groupsDir, 'family', 'media'))).toEqual(['PHOTO1-image.jpeg']);
    stops.push(() => store.close()); // after the channel's disconnect
  });

  it('syncs group names at connect when older than a day, not again when fresh, and when main asks', async () => {
    const docker = fakeDocker();
    const config = tempProject({ CONTAINER_RUNTIME: docker.path }, 'KIMI_API_KEY=sk-wa-test-12345678\n');
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    addGroup(config, store, { jid: ME, name: 'Me', folder: 'main', isMain: true });
    const server = flakyServer(60_000);
    stops.push(server.stop);
    const channel = whatsAppChannel(config, store, { authDir: await linkedAuthDir(), waWebSocketUrl: server.url });
    const sockets = watchSockets(channel);
    const host = new Host(config, store, [channel], QUIET_SWEEPS);
    stops.push(async () => {
      await host.stop();
      store.close();
    });
    await host.start();
    let fetches = 0;
    // WhatsApp's answer to the group query, which only its servers can give.
    const serverGroups = () => {
      fetches++;
      return Promise.resolve({ [GROUP]: { id: GROUP, subject: `Family (${fetches})` } } as unknown as Awaited<
        ReturnType<ReturnType<typeof socketOf>['groupFetchAllParticipating']>
      >);
    };
    socketOf(channel).groupFetchAllParticipating = serverGroups;
    openAsWhatsAppWould(socketOf(channel));
    await waitFor(() => store.listChats().some((c) => c.jid === GROUP), 60_000, 'group synced');
    expect(store.listChats().find((c) => c.jid === GROUP)).toMatchObject({ name: 'Family (1)', isGroup: true });
    expect(store.getState('groups_synced_at')).not.toBeNull();
    socketOf(channel).ev.emit('connection.update', {
      connection: 'close',
      lastDisconnect: { error: new Error('drop'), date: new Date() },
    });
    await waitFor(() => sockets.length === 2, 60_000, 'reconnect');
    socketOf(channel).groupFetchAllParticipating = serverGroups;
    openAsWhatsAppWould(socketOf(channel));
    await Bun.sleep(200);
    expect(fetches).toBe(1); // synced less than a day ago: not again
    writeJsonAtomic(join(config.ipcDir, 'main', 'tasks', '1-refresh.json'), { type: 'refresh_groups' });
    await waitFor(() => fetches === 2, 60_000, 'refresh from main');
    await waitFor(
      () =>
        JSON.parse(readFileSync(join(config.ipcDir, 'main', 'available_groups.json'), 'utf8')).groups.some(
          (g: { name_untrusted: string }) => g.name_untrusted === 'Family (2)',
        ),
      60_000,
      'snapshot',
    );
  });

  it('linking makes the self-chat the main group, taking over the terminal’s placeholder', () => {
    const config = tempProject();
    const store = new Store(config.dbPath);
    mkdirSync(join(config.groupsDir, 'main'), { recursive: true });
    addGroup(config, store, {
      jid: LOCAL_MAIN_JID,
      name: 'Main',
      folder: 'main',
      isMain: true,
      requiresTrigger: false,
    });
    store.setSession('main', 'kept-session');
    const main = makeSelfChatMain(config, store, ME);
    expect(main).toMatchObject({ jid: ME, folder: 'main', isMain: true });
    expect(store.groupByJid(LOCAL_MAIN_JID)).toBeNull();
    expect(store.getSession('main')).toBe('kept-session');
    store.close();
  });
});

/**
 * What WhatsApp's real servers need of a client, from baileys 7.0.0-rc14's typings and
 * sources (named per test). The servers' side — a resend request, a QR offer, a 405 —
 * arrives as baileys itself would surface it: as events on the real socket.
 */
describe('what real WhatsApp needs (baileys 7)', () => {
  const options = (authDir: string, url: string, extra: Partial<WhatsAppOptions> = {}) =>
    channelOptions(authDir, url, { clock: fastClock(50), ...extra });
  /** A channel with linked credentials on a local server that keeps the connection; both stopped after the test. */
  async function linkedChannel(extra: Partial<WhatsAppOptions> = {}): Promise<RecordingWhatsApp> {
    const server = flakyServer(60_000);
    const channel = new RecordingWhatsApp(options(await linkedAuthDir(), server.url, extra));
    stops.push(async () => {
      await channel.disconnect();
      server.stop();
    });
    return channel;
  }
  const closeWith = (sock: ReturnType<typeof socketOf>, statusCode: number, message = 'Connection Failure') =>
    sock.ev.emit('connection.update', {
      connection: 'close',
      lastDisconnect: { error: Object.assign(new Error(message), { output: { statusCode } }), date: new Date() },
    });

  it('announces the WhatsApp Web version it looked up, keeps it for when the lookup fails, and looks again after a 405 refusal, logging it once', async () => {
    const config = tempProject();
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    const server = flakyServer(60_000);
    const lookups: string[] = [];
    let answer: { version: [number, number, number]; isLatest: boolean } = {
      version: [2, 3000, 1111111111],
      isLatest: true,
    };
    const lookupVersion = async () => {
      lookups.push(answer.version.join('.'));
      return answer;
    };
    const channel = whatsAppChannel(config, store, {
      authDir: await linkedAuthDir(),
      waWebSocketUrl: server.url,
      lookupVersion,
      clock: fastClock(50),
    });
    const sockets = watchSockets(channel);
    stops.push(async () => {
      await channel.disconnect();
      server.stop();
      store.close();
    });
    await channel.connect({ onMessage: () => {} });
    expect(channel.version).toEqual([2, 3000, 1111111111]);
    expect(store.getState('whatsapp_web_version')).toBe('2.3000.1111111111');
    // The servers refuse the version; the lookup finds a newer one; refused once more, then it fails.
    answer = { version: [2, 3000, 2222222222], isLatest: true };
    closeWith(socketOf(channel), 405);
    await waitFor(() => sockets.length === 2, 60_000, 'reconnect after 405');
    expect(channel.version).toEqual([2, 3000, 2222222222]);
    answer = { version: [2, 3000, 1], isLatest: false }; // baileys' own, as fetchLatestWaWebVersion gives it offline
    closeWith(socketOf(channel), 405);
    await waitFor(() => sockets.length === 3, 60_000, 'second reconnect');
    expect(lookups).toHaveLength(3);
    expect(channel.version).toEqual([2, 3000, 2222222222]); // the last one that was looked up, from the store
    const refusals = readFileSync(join(config.logsDir, 'nanoclaw.log'), 'utf8')
      .split('\n')
      .filter((l) => l.includes('refused this client version (405)'));
    expect(refusals).toHaveLength(1); // one clear line per outage, not one per attempt
    // A channel started while the lookup is impossible uses what the store kept.
    const later = whatsAppChannel(config, store, {
      authDir: await linkedAuthDir(),
      waWebSocketUrl: server.url,
      lookupVersion: async () => ({ version: [2, 3000, 5], isLatest: false }),
    });
    stops.push(() => later.disconnect());
    await later.connect({ onMessage: () => {} });
    expect(later.version).toEqual([2, 3000, 2222222222]);
  });

  it('answers a recipient’s resend request (getMessage) with exactly what was sent, from SQLite, after a restart too; nothing for an unknown id', async () => {
    const config = tempProject();
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    const server = flakyServer(60_000);
    const authDir = await linkedAuthDir();
    const channel = new RecordingWhatsApp({
      ...options(authDir, server.url),
      store,
    });
    const sender = new OutboxSender(store, channel, { retryBaseMs: 50 });
    stops.push(async () => {
      sender.stop();
      await channel.disconnect();
      server.stop();
      store.close();
    });
    await channel.connect({ onMessage: () => {}, onReady: () => sender.kick() });
    openAsWhatsAppWould(socketOf(channel));
    const id = newMessageId();
    store.addOutbound('whatsapp', GROUP, 'Andy: the *plan* for Sunday', id);
    sender.kick();
    await waitFor(() => channel.delivered.length === 1, 60_000, 'sent');
    await sender.settle();
    // baileys builds the key of a retry receipt from the stanza: it may carry the LID form and a device.
    const asked = await channel.getMessage({
      remoteJid: '1234567890@lid',
      id,
      fromMe: true,
      participant: '11223344:3@lid',
    });
    const expected = channel.delivered[0]!.content!; // what baileys built for sendMessage (a random messageSecret included)
    expect(expected.extendedTextMessage?.text).toBe('Andy: the *plan* for Sunday');
    const bytes = (m: proto.IMessage) => Buffer.from(proto.Message.encode(m).finish()).toString('hex');
    expect(bytes(asked!)).toBe(bytes(expected));
    expect(await channel.getMessage({ remoteJid: GROUP, id: '3EB0UNKNOWN', fromMe: true })).toBeUndefined();
    const restarted = whatsAppChannel(config, store, { authDir, waWebSocketUrl: server.url });
    expect(bytes((await restarted.getMessage({ remoteJid: GROUP, id, fromMe: true }))!)).toBe(bytes(expected));
  });

  it('linked means WhatsApp confirmed the device: a pairing left unfinished is not linked, a QR link (registered false) is', async () => {
    expect(WhatsAppChannel.linkState(tempDir())).toBe('none');
    expect(WhatsAppChannel.linkState(pendingPairingAuthDir())).toBe('pending');
    expect(WhatsAppChannel.linkState(await linkedAuthDir())).toBe('linked'); // its creds say registered: false, as a QR link leaves them
    const garbled = tempDir();
    writeFileSync(join(garbled, 'creds.json'), '{"me": {"id": "49151@s.wh');
    expect(WhatsAppChannel.linkState(garbled)).toBe('damaged'); // cut short, no backup: not a pairing to start over
    const channel = new WhatsAppChannel(options(pendingPairingAuthDir(), 'ws://127.0.0.1:9/none'));
    await expect(channel.connect({ onMessage: () => {} })).rejects.toThrow('not linked');
  });

  it('a QR code offered to the running service means these credentials are no device: it stops, saying to run auth', async () => {
    const config = tempProject();
    setupLogging(config, { terminalLevel: 'silent' });
    let notLinked = 0;
    const channel = await linkedChannel({ onStopped: () => notLinked++ });
    await channel.connect({ onMessage: () => {} });
    socketOf(channel).ev.emit('connection.update', { qr: '2@AbCdEf,GhIj,KlMn' });
    await Bun.sleep(200);
    expect(notLinked).toBe(1);
    expect(channel.socketsOpened).toBe(1); // no reconnect loop
    expect(readFileSync(join(config.logsDir, 'nanoclaw.log'), 'utf8')).toContain('Run `bun nanoclaw.ts auth --relink`');
  });

  it('own number: an @mention of the bot (its LID or its phone number) is the chat’s trigger; on a shared number it is the user’s own', () => {
    const mention = (text: string, mentionedJid: string[], extra: Partial<WhatsAppIdentity> = {}) =>
      parseWhatsAppMessage(
        waMessage({
          remoteJid: GROUP,
          participant: ALICE,
          message: { extendedTextMessage: { text, contextInfo: { mentionedJid } } },
        }),
        identity({ hasOwnNumber: true, ...extra }),
      )!.message.content;
    expect(mention('@99887766 what time is it?', [ME_LID])).toBe('@Andy what time is it?');
    expect(mention('@4915100000001 and you?', ['4915100000001@s.whatsapp.net'])).toBe('@Andy and you?');
    expect(mention('@99887766 hi', [`99887766:4@lid`], { triggerFor: () => '@Bot' })).toBe('@Bot hi'); // the group's own trigger
    expect(mention('@11223344 can you check?', [ALICE_LID])).toBe('@11223344 can you check?'); // someone else
    expect(mention('@99887766 hi', [ME_LID], { hasOwnNumber: false })).toBe('@99887766 hi');
    const caption = parseWhatsAppMessage(
      waMessage({
        remoteJid: GROUP,
        participant: ALICE,
        message: {
          imageMessage: {
            caption: '@99887766 what is this?',
            mimetype: 'image/jpeg',
            contextInfo: { mentionedJid: [ME_LID] },
          },
        },
      }),
      identity({ hasOwnNumber: true }),
    )!;
    expect(caption.message.content).toBe('@Andy what is this?');
  });

  it('keeps raw group metadata for sends (cachedGroupMetadata) current with group events, and never names a group with an empty subject', async () => {
    const config = tempProject();
    setupLogging(config, { terminalLevel: 'silent' });
    const names: { jid: string; name: string }[] = [];
    const channel = await linkedChannel();
    await channel.connect({ onMessage: () => {}, onChatMetadata: (c) => names.push(c) });
    const sock = socketOf(channel);
    const full = (subject: string, members: string[]): GroupMetadata => ({
      id: GROUP,
      subject,
      owner: undefined,
      addressingMode: WAMessageAddressingMode.LID,
      participants: members.map((id) => ({ id })),
    });
    let fetched = 0;
    sock.groupFetchAllParticipating = async () => ({ [GROUP]: full('Family', [ALICE_LID]) });
    sock.groupMetadata = async (jid: string) => {
      fetched++;
      return { ...full('Family', [ALICE_LID, '55555@lid']), id: jid };
    };
    openAsWhatsAppWould(sock);
    await waitFor(() => groupMetadataOf(channel).get(GROUP), 60_000, 'metadata at connect');
    expect(groupMetadataOf(channel).get(GROUP)).toMatchObject({
      subject: 'Family',
      addressingMode: 'lid',
      participants: [{ id: ALICE_LID }],
    });
    sock.ev.emit('group-participants.update', {
      id: GROUP,
      author: ALICE,
      participants: [{ id: '55555@lid' }],
      action: 'add',
    });
    await waitFor(() => groupMetadataOf(channel).get(GROUP) === undefined, 60_000, 'dropped once a member joined');
    expect((await channel.cachedGroupMetadata(GROUP))?.participants).toHaveLength(2); // the next send fetches it again
    expect(fetched).toBe(1);
    sock.ev.emit('groups.update', [{ id: GROUP, announce: true }]); // a one-field change: the cached copy is stale
    sock.ev.flush();
    await waitFor(() => groupMetadataOf(channel).get(GROUP) === undefined, 60_000, 'stale entry dropped');
    sock.ev.emit('groups.update', [{ id: GROUP, subject: '' }]);
    sock.ev.emit('groups.update', [{ id: GROUP, subject: 'Family 🏡' }]);
    sock.ev.flush();
    await waitFor(() => names.some((n) => n.name === 'Family 🏡'), 60_000, 'renamed');
    expect(names.map((n) => n.name)).toEqual(['Family', 'Family 🏡']);
    sock.ev.emit('groups.upsert', [full('New group', [ALICE_LID])]);
    sock.ev.flush();
    await waitFor(() => groupMetadataOf(channel).get(GROUP)?.subject === 'New group', 60_000, 'a new group');
  });

  it('group senders by LID get their phone number from lid-mapping.update', async () => {
    setupLogging(tempProject(), { terminalLevel: 'silent' });
    const received: NewMessage[] = [];
    const channel = await linkedChannel();
    await channel.connect({ onMessage: (m) => received.push(m) });
    const stranger = '777000111@lid';
    await channel.onMessage(
      waMessage({ remoteJid: GROUP, participant: stranger, id: 'BEFORE', message: { conversation: 'hi' } }),
    );
    socketOf(channel).ev.emit('lid-mapping.update', { lid: stranger, pn: '4915100000077@s.whatsapp.net' });
    await channel.onMessage(
      waMessage({
        remoteJid: GROUP,
        participant: `777000111:2@lid`,
        id: 'AFTER',
        message: { conversation: 'hi again' },
      }),
    );
    expect(received.map((m) => m.sender)).toEqual([stranger, '4915100000077@s.whatsapp.net']);
  });

  it('someone typing in a watched chat (a chatstate, as baileys parses it) is activity; our own typing is not; watched chats are subscribed at open', async () => {
    setupLogging(tempProject(), { terminalLevel: 'silent' });
    const channel = await linkedChannel();
    const activity: string[] = [];
    await channel.connect({
      onMessage: () => {},
      onActivity: (jid) => activity.push(jid),
      watchedChats: () => [GROUP, ALICE],
    });
    const sock = socketOf(channel);
    const subscribed: string[] = [];
    sock.presenceSubscribe = async (jid: string) => void subscribed.push(jid);
    openAsWhatsAppWould(sock);
    expect(subscribed).toEqual([GROUP, ALICE]);
    const own = sock.user!.id; // as the phone knows us: with its device suffix
    const chatstate = (from: string, participant: string, state: string, attrs: Record<string, string> = {}) =>
      sock.ws.emit('CB:chatstate', {
        tag: 'chatstate',
        attrs: { from, participant },
        content: [{ tag: state, attrs }],
      });
    chatstate(GROUP, ALICE, 'paused');
    chatstate(GROUP, own, 'composing');
    expect(activity).toEqual([]);
    chatstate(GROUP, ALICE, 'composing');
    sock.ev.flush();
    expect(activity).toEqual([GROUP]);
    chatstate(ALICE, ALICE, 'composing', { media: 'audio' }); // recording a voice note
    sock.ev.flush();
    expect(activity).toEqual([GROUP, ALICE]);
  });

  it('media gone from WhatsApp’s servers (410) is asked of the sender’s phone again, then downloaded; a phone that never answers times out', async () => {
    const config = tempProject();
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    addGroup(config, store, { jid: GROUP, name: 'Family', folder: 'family' });
    const photo = Buffer.from('pretend this is an old JPEG');
    const encrypted = await encryptedStream(photo, 'image');
    const media = Bun.serve({
      port: 0,
      fetch: (req) =>
        new URL(req.url).pathname === '/fresh.enc'
          ? new Response(Bun.file(encrypted.encFilePath))
          : new Response('gone', { status: 410 }),
    });
    const server = flakyServer(60_000);
    const clock = new FakeClock();
    const channel = whatsAppChannel(config, store, {
      authDir: await linkedAuthDir(),
      waWebSocketUrl: server.url,
      clock,
    });
    stops.push(async () => {
      await channel.disconnect();
      media.stop(true);
      server.stop();
      store.close();
    });
    const received: NewMessage[] = [];
    await channel.connect({ onMessage: (m) => received.push(m) });
    const imageMessage = () => ({
      url: `http://127.0.0.1:${media.port}/expired.enc`,
      mimetype: 'image/jpeg',
      caption: 'remember this?',
      mediaKey: encrypted.mediaKey,
      fileSha256: encrypted.fileSha256,
      fileEncSha256: encrypted.fileEncSha256,
      fileLength: photo.length,
    });
    const reuploads: string[] = [];
    // The phone's answer to the media-retry request, which only WhatsApp can relay: the message now points at fresh media.
    socketOf(channel).updateMediaMessage = async (message: WAMessage) => {
      reuploads.push(message.key.id!);
      message.message!.imageMessage!.url = `http://127.0.0.1:${media.port}/fresh.enc`;
      return message;
    };
    await channel.onMessage(
      waMessage({ remoteJid: GROUP, participant: ALICE, id: 'OLDPHOTO', message: { imageMessage: imageMessage() } }),
    );
    socketOf(channel).updateMediaMessage = () => new Promise<WAMessage>(() => {}); // a phone that is off
    const lost = channel.onMessage(
      waMessage({ remoteJid: GROUP, participant: ALICE, id: 'LOSTPHOTO', message: { imageMessage: imageMessage() } }),
    );
    await waitFor(() => clock.pending.includes(30_000), 60_000, 'the wait for the phone');
    await clock.advance(29_999);
    expect(received).toHaveLength(1); // still waiting for the phone
    await clock.advance(1);
    await lost;
    expect(reuploads).toEqual(['OLDPHOTO']);
    expect(received.map((m) => m.content)).toEqual([
      '[image: /workspace/group/media/OLDPHOTO-image.jpeg] remember this?',
      '[image could not be downloaded] remember this?',
    ]);
    expect(readFileSync(join(config.groupsDir, 'family', 'media', 'OLDPHOTO-image.jpeg'))).toEqual(photo);
  });
});

describe('WhatsApp mentions and triggers through the host (fake docker)', () => {
  it('a group registered with its own trigger answers to it, and to an @mention of the bot’s own number', async () => {
    const docker = fakeDocker();
    const config = tempProject(
      { CONTAINER_RUNTIME: docker.path, ASSISTANT_HAS_OWN_NUMBER: 'true' },
      'KIMI_API_KEY=sk-wa-test-12345678\n',
    );
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    addGroup(config, store, { jid: GROUP, name: 'Club', folder: 'club', trigger: '@Bot' });
    const server = flakyServer(60_000);
    const channel = new RecordingWhatsApp({
      authDir: await linkedAuthDir(),
      assistantName: 'Andy',
      hasOwnNumber: true,
      waWebSocketUrl: server.url,
      mediaTreeFor: () => null,
      store,
    });
    const host = new Host(config, store, [channel], QUIET_SWEEPS);
    stops.push(async () => {
      await host.stop();
      server.stop();
      store.close();
    });
    await host.start();
    const sock = socketOf(channel);
    Object.defineProperty(sock, 'user', { value: { id: '4915100000001:7@s.whatsapp.net', lid: '99887766:7@lid' } }); // what login tells baileys
    openAsWhatsAppWould(sock);
    // As baileys hands over a message node: emitted, then its event buffer flushed (Socket/messages-recv.js processNodeWithBuffer).
    const say = (id: string, message: proto.IMessage) => {
      sock.ev.emit('messages.upsert', {
        messages: [waMessage({ remoteJid: GROUP, participant: ALICE, id, message })],
        type: 'notify',
      });
      sock.ev.flush();
    };
    say('T1', { conversation: '@Andy are you there?' }); // the assistant's name is not this group's trigger
    await Bun.sleep(300);
    expect(docker.runs()).toHaveLength(0);
    say('T2', { conversation: '@Bot are you there?' });
    await waitFor(() => channel.delivered.length === 1, 60_000, 'reply to the trigger');
    say('T3', { extendedTextMessage: { text: '@99887766 and now?', contextInfo: { mentionedJid: [ME_LID] } } });
    await waitFor(() => channel.delivered.length === 2, 60_000, 'reply to the mention');
    expect(channel.delivered.map((d) => d.text)).toEqual(['echo: are you there?', 'echo: and now?']);
  });
});
