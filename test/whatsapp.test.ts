/**
 * The WhatsApp channel with real baileys objects: messages are built from baileys' own
 * protobuf types, sockets are real baileys sockets talking to a local WebSocket server
 * (WhatsApp's servers cannot be reached here, so the handshake never completes; where a
 * test needs an open connection it emits `connection.update` on the real socket).
 */
import { encryptedStream, proto, type WAMessage } from '@whiskeysockets/baileys';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  AgentTree,
  Host, parseWhatsAppMessage, RateLimiter, reconnectDelay, registerGroup, safeMediaFileName, setupLogging, splitForWhatsApp,
  Store, OutboxSender, newMessageId, toWhatsAppFormat, writeJsonAtomic, WhatsAppChannel, whatsAppChannel, makeSelfChatMain, LOCAL_MAIN_JID,
  type ChannelHandlers, type NewMessage, type WhatsAppIdentity, type WhatsAppOptions,
} from '../nanoclaw.ts';
import { fakeDocker, flakyServer, linkedAuthDir, RecordingWhatsApp, tempDir, tempProject, waitFor } from './helpers.ts';

const ME = '4915100000001@s.whatsapp.net';
const ME_LID = '99887766@lid';
const ALICE = '4915100000002@s.whatsapp.net';
const ALICE_LID = '11223344@lid';
const GROUP = '120363000000000001@g.us';

const identity = (overrides: Partial<WhatsAppIdentity> = {}): WhatsAppIdentity => ({
  ownJids: new Set([ME, ME_LID]),
  assistantName: 'Andy',
  hasOwnNumber: false,
  phoneForLid: (lid) => ({ [ALICE_LID]: ALICE, [ME_LID]: ME } as Record<string, string>)[lid],
  ...overrides,
});

/** A message as baileys delivers it, built with baileys' own protobuf type. */
function waMessage(fields: { remoteJid: string; id?: string; fromMe?: boolean; participant?: string; message: proto.IMessage; pushName?: string; key?: Record<string, unknown> }): WAMessage {
  const message = proto.WebMessageInfo.fromObject({
    key: { remoteJid: fields.remoteJid, fromMe: fields.fromMe ?? false, id: fields.id ?? `ID${Math.random().toString(16).slice(2, 14).toUpperCase()}`, participant: fields.participant },
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
    const plain = parseWhatsAppMessage(waMessage({ remoteJid: GROUP, participant: ALICE, message: { conversation: 'hi all' } }), identity())!;
    expect(plain.message).toMatchObject({ chatJid: GROUP, sender: ALICE, senderName: 'Alice', content: 'hi all', isFromMe: false, isBotMessage: false, timestamp: new Date(1_790_000_000_000).toISOString() });
    expect(plain.isGroup).toBe(true);
    const extended = parseWhatsAppMessage(waMessage({ remoteJid: ALICE, message: { extendedTextMessage: { text: 'see https://example.org' } } }), identity())!;
    expect(extended.message.content).toBe('see https://example.org');
    expect(extended.isGroup).toBe(false);
  });

  it('describes every media kind with its caption', () => {
    const cases: [proto.IMessage, string, string][] = [
      [{ imageMessage: { caption: 'our cat', mimetype: 'image/jpeg', fileLength: 1000 } }, 'image', 'our cat'],
      [{ videoMessage: { caption: 'the goal', mimetype: 'video/mp4' } }, 'video', 'the goal'],
      [{ audioMessage: { ptt: true, mimetype: 'audio/ogg; codecs=opus' } }, 'voice note', ''],
      [{ audioMessage: { ptt: false, mimetype: 'audio/mpeg' } }, 'audio', ''],
      [{ documentMessage: { fileName: 'invoice.pdf', mimetype: 'application/pdf', caption: 'pay this' } }, 'document', 'pay this'],
      [{ stickerMessage: { mimetype: 'image/webp' } }, 'sticker', ''],
    ];
    for (const [message, kind, caption] of cases) {
      const parsed = parseWhatsAppMessage(waMessage({ remoteJid: GROUP, participant: ALICE, message }), identity());
      expect(parsed?.media?.kind, kind).toBe(kind);
      expect(parsed?.message.content, kind).toBe(caption);
    }
    const doc = parseWhatsAppMessage(waMessage({ remoteJid: GROUP, participant: ALICE, message: cases[4]![0] }), identity())!;
    expect(doc.media?.fileName).toBe('invoice.pdf');
  });

  it('carries what a reply quotes', () => {
    const reply = parseWhatsAppMessage(
      waMessage({ remoteJid: GROUP, participant: ALICE, message: { extendedTextMessage: { text: 'yes, that one', contextInfo: { quotedMessage: { conversation: 'dinner at 7?' } } } } }),
      identity(),
    )!;
    expect(reply.message.content).toBe('[replying to: "dinner at 7?"]\nyes, that one');
  });

  it('ignores reactions, protocol messages, status broadcasts and empty messages', () => {
    expect(parseWhatsAppMessage(waMessage({ remoteJid: GROUP, participant: ALICE, message: { reactionMessage: { text: '👍', key: { id: 'X' } } } }), identity())).toBeNull();
    expect(parseWhatsAppMessage(waMessage({ remoteJid: ALICE, message: { protocolMessage: { type: proto.Message.ProtocolMessage.Type.REVOKE } } }), identity())).toBeNull();
    expect(parseWhatsAppMessage(waMessage({ remoteJid: 'status@broadcast', participant: ALICE, message: { conversation: 'my status' } }), identity())).toBeNull();
    expect(parseWhatsAppMessage(waMessage({ remoteJid: ALICE, message: { conversation: '   ' } }), identity())).toBeNull();
    expect(parseWhatsAppMessage(waMessage({ remoteJid: ALICE, message: {} }), identity())).toBeNull();
  });

  it('translates LID chats and senders to phone JIDs, so the self-chat is recognised', () => {
    const selfChat = parseWhatsAppMessage(waMessage({ remoteJid: ME_LID, fromMe: true, message: { conversation: 'note to self' } }), identity())!;
    expect(selfChat.message.chatJid).toBe(ME);
    const viaAlt = parseWhatsAppMessage(waMessage({ remoteJid: '555@lid', message: { conversation: 'hi' }, key: { remoteJidAlt: '4915100000009@s.whatsapp.net' } }), identity())!;
    expect(viaAlt.message.chatJid).toBe('4915100000009@s.whatsapp.net');
    const groupLid = parseWhatsAppMessage(waMessage({ remoteJid: GROUP, participant: ALICE_LID, message: { conversation: 'hey' } }), identity())!;
    expect(groupLid.message.sender).toBe(ALICE);
    const device = parseWhatsAppMessage(waMessage({ remoteJid: '4915100000002:12@s.whatsapp.net', message: { conversation: 'from a device' } }), identity())!;
    expect(device.message.chatJid).toBe(ALICE);
  });

  it('marks the bot’s own messages: fromMe with its own number, the name prefix on a shared one', () => {
    const ownNumber = identity({ hasOwnNumber: true });
    expect(parseWhatsAppMessage(waMessage({ remoteJid: GROUP, fromMe: true, message: { conversation: 'done' } }), ownNumber)!.message.isBotMessage).toBe(true);
    const shared = identity();
    expect(parseWhatsAppMessage(waMessage({ remoteJid: ME, fromMe: true, message: { conversation: 'Andy: done' } }), shared)!.message.isBotMessage).toBe(true);
    const mine = parseWhatsAppMessage(waMessage({ remoteJid: ME, fromMe: true, message: { conversation: 'buy milk' } }), shared)!;
    expect(mine.message).toMatchObject({ isBotMessage: false, isFromMe: true, sender: ME });
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
    const paragraphs = Array.from({ length: 6 }, (_, i) => `Paragraph ${i}. ${'word '.repeat(150).trim()}.`).join('\n\n');
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
    expect(safeMediaFileName('3EB0ABC', 'document', 'application/pdf', '../../etc/pass wd.pdf')).toBe('3EB0ABC-etc-pass-wd.pdf');
    expect(safeMediaFileName('3EB0ABC', 'voice note', 'audio/ogg; codecs=opus')).toBe('3EB0ABC-voice-note.ogg');
  });
});

describe('reconnect backoff and rate limit', () => {
  it('grows exponentially, is capped, and is jittered', () => {
    const low = [1, 2, 3, 4, 5, 10].map((n) => reconnectDelay(n, 1000, 30_000, () => 0));
    const high = [1, 2, 3, 4, 5, 10].map((n) => reconnectDelay(n, 1000, 30_000, () => 1));
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

describe('WhatsAppChannel connection', () => {
  function channelOptions(authDir: string, url: string, extra: Partial<WhatsAppOptions> = {}): WhatsAppOptions {
    return { authDir, assistantName: 'Andy', hasOwnNumber: false, mediaTreeFor: () => null, waWebSocketUrl: url, reconnectBaseMs: 40, reconnectCapMs: 400, ...extra };
  }
  const noHandlers: ChannelHandlers = { onMessage: () => {} };

  it('says to run auth when this machine is not linked', async () => {
    const channel = new WhatsAppChannel(channelOptions(tempDir(), 'ws://127.0.0.1:9/none'));
    await expect(channel.connect(noHandlers)).rejects.toThrow('bun nanoclaw.ts auth');
  });

  it('keeps one live socket through repeated drops, with growing backoff', async () => {
    setupLogging(tempProject(), { terminalLevel: 'silent' });
    const server = flakyServer(30);
    stops.push(server.stop);
    const channel = new RecordingWhatsApp(channelOptions(await linkedAuthDir(), server.url));
    stops.push(() => channel.disconnect());
    await channel.connect(noHandlers);
    await waitFor(() => server.connectedAt.length >= 6, 20_000, 'six connections');
    expect(server.maxOpen).toBe(1);
    expect(channel.sockets.length).toBeGreaterThanOrEqual(6);
    const ceilings = channel.reconnectDelays.slice(0, 5).map((_, i) => Math.min(400, 40 * 2 ** i));
    channel.reconnectDelays.slice(0, 5).forEach((delay, i) => {
      expect(delay).toBeGreaterThanOrEqual(ceilings[i]! / 2);
      expect(delay).toBeLessThanOrEqual(ceilings[i]!);
    });
    const gaps = server.connectedAt.slice(1, 6).map((t, i) => t - server.connectedAt[i]!);
    expect(gaps.at(-1)!).toBeGreaterThan(gaps[0]!); // backoff, not a tight loop
  });

  it('ignores everything a retired socket still emits, and resets backoff once connected', async () => {
    setupLogging(tempProject(), { terminalLevel: 'silent' });
    const server = flakyServer((n) => (n <= 2 ? 30 : 60_000)); // two drops, then a steady connection
    stops.push(server.stop);
    const received: NewMessage[] = [];
    const channel = new RecordingWhatsApp(channelOptions(await linkedAuthDir(), server.url));
    stops.push(() => channel.disconnect());
    await channel.connect({ onMessage: (m) => received.push(m) });
    await waitFor(() => channel.sockets.length >= 3, 20_000, 'three sockets');
    const retired = channel.sockets[0]!;
    retired.ev.emit('messages.upsert', { messages: [waMessage({ remoteJid: ALICE, message: { conversation: 'from the past' } })], type: 'notify' });
    retired.ev.emit('connection.update', { connection: 'open' });
    await Bun.sleep(50);
    expect(received).toEqual([]);
    expect(channel.isConnected).toBe(false);
    const live = channel.socket!;
    live.ev.emit('connection.update', { connection: 'open' });
    expect(channel.isConnected).toBe(true);
    live.ev.emit('messages.upsert', { messages: [waMessage({ remoteJid: ALICE, message: { conversation: 'now' } })], type: 'notify' });
    await waitFor(() => received.length === 1, 2000, 'live message');
    expect(received[0]!.content).toBe('now');
    live.ev.emit('connection.update', { connection: 'close', lastDisconnect: { error: new Error('drop'), date: new Date() } });
    expect(channel.reconnectDelays.at(-1)!).toBeLessThanOrEqual(40); // attempt 1 again after a good connection
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
    const channel = new RecordingWhatsApp(channelOptions(await linkedAuthDir(), server.url));
    const sender = new OutboxSender(store, channel, 50);
    stops.push(async () => {
      sender.stop();
      await channel.disconnect();
      store.close();
    });
    await channel.connect({ ...noHandlers, onReady: () => sender.kick() });
    await waitFor(() => server.connectedAt.length === 1, 5000, 'connection');
    channel.socket!.ev.emit('connection.update', { connection: 'open' });
    say(store, channel, sender, GROUP, 'one');
    await waitFor(() => channel.delivered.length === 1, 2000, 'first delivery');
    channel.socket!.ev.emit('connection.update', { connection: 'close', lastDisconnect: { error: new Error('network down'), date: new Date() } });
    say(store, channel, sender, GROUP, 'two');
    say(store, channel, sender, ALICE, 'three');
    await sender.settle();
    expect(store.countUnsent('whatsapp')).toBe(2);
    await waitFor(() => channel.sockets.length === 2, 5000, 'reconnect');
    channel.socket!.ev.emit('connection.update', { connection: 'open' });
    await waitFor(() => channel.delivered.length === 3, 2000, 'queued deliveries');
    await sender.settle();
    expect(channel.delivered.map(({ jid, text }) => ({ jid, text }))).toEqual([{ jid: GROUP, text: 'one' }, { jid: GROUP, text: 'two' }, { jid: ALICE, text: 'three' }]);
    expect(new Set(channel.delivered.map((d) => d.messageId)).size).toBe(3);
    expect(store.countUnsent('whatsapp')).toBe(0);
  });

  it('replies still waiting when the process stops go out after the next connect; one sent but not marked goes again under the same id', async () => {
    const config = tempProject();
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    const server = flakyServer(60_000);
    stops.push(server.stop);
    const authDir = await linkedAuthDir();
    const first = new RecordingWhatsApp(channelOptions(authDir, server.url));
    const firstSender = new OutboxSender(store, first, 50);
    await first.connect(noHandlers);
    say(store, first, firstSender, GROUP, 'written while offline');
    say(store, first, firstSender, ALICE, 'and this too');
    await firstSender.settle();
    firstSender.stop();
    await first.disconnect(); // the process stops before WhatsApp came back
    expect(store.countUnsent('whatsapp')).toBe(2);
    // As if a crash came after a part reached WhatsApp but before it was marked sent:
    const unsentId = store.nextUnsent('whatsapp')!.messageId;
    const second = new RecordingWhatsApp(channelOptions(authDir, server.url));
    const secondSender = new OutboxSender(store, second, 50);
    stops.push(async () => {
      secondSender.stop();
      await second.disconnect();
      store.close();
    });
    await second.connect({ ...noHandlers, onReady: () => secondSender.kick() });
    second.socket!.ev.emit('connection.update', { connection: 'open' });
    await waitFor(() => second.delivered.length === 2, 3000, 'stored replies');
    expect(second.delivered.map(({ jid, text }) => ({ jid, text }))).toEqual([{ jid: GROUP, text: 'written while offline' }, { jid: ALICE, text: 'and this too' }]);
    expect(second.delivered[0]!.messageId).toBe(unsentId); // a resend is the same WhatsApp message
    await secondSender.settle();
    expect(store.countUnsent('whatsapp')).toBe(0);
    expect(store.outboundByMessageId(unsentId)).toEqual({ chatJid: GROUP, text: 'written while offline' });
  });

  it('stops for good when WhatsApp logs the device out, leaving the credentials in place', async () => {
    setupLogging(tempProject(), { terminalLevel: 'silent' });
    const server = flakyServer(60_000);
    stops.push(server.stop);
    let loggedOut = 0;
    const authDir = await linkedAuthDir();
    const channel = new RecordingWhatsApp(channelOptions(authDir, server.url, { onLoggedOut: () => loggedOut++ }));
    stops.push(() => channel.disconnect());
    await channel.connect(noHandlers);
    const error = Object.assign(new Error('logged out'), { output: { statusCode: 401 } });
    channel.socket!.ev.emit('connection.update', { connection: 'close', lastDisconnect: { error, date: new Date() } });
    await Bun.sleep(300);
    expect(loggedOut).toBe(1);
    expect(channel.sockets).toHaveLength(1);
    expect(readdirSync(authDir)).toContain('creds.json');
  });
});

describe('WhatsApp through the host (fake docker)', () => {
  it('one inbound message → exactly one reply through the send path, even when replayed after reconnects', async () => {
    const docker = fakeDocker();
    const config = tempProject({ CONTAINER_RUNTIME: docker.path }, 'KIMI_API_KEY=sk-wa-test-12345678\n');
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    registerGroup(config, store, { jid: GROUP, name: 'Family', folder: 'family' });
    const server = flakyServer(60_000);
    stops.push(server.stop);
    const channel = new RecordingWhatsApp({
      authDir: await linkedAuthDir(), assistantName: 'Andy', hasOwnNumber: false, waWebSocketUrl: server.url, reconnectBaseMs: 30, reconnectCapMs: 100,
      mediaTreeFor: (jid) => (store.groupByJid(jid) ? new AgentTree(join(config.groupsDir, 'family')) : null),
    });
    const host = new Host(config, store, [channel], { sweepIntervalMs: 60_000 });
    stops.push(async () => {
      await host.stop();
      store.close();
    });
    await host.start();
    channel.socket!.ev.emit('connection.update', { connection: 'open' });
    const inbound = waMessage({ remoteJid: GROUP, participant: ALICE, id: 'REPLAYED1', message: { conversation: '@Andy what is for dinner?' } });
    channel.socket!.ev.emit('messages.upsert', { messages: [inbound], type: 'notify' });
    await waitFor(() => channel.delivered.length === 1, 10_000, 'reply');
    for (let i = 0; i < 2; i++) {
      channel.socket!.ev.emit('connection.update', { connection: 'close', lastDisconnect: { error: new Error('drop'), date: new Date() } });
      await waitFor(() => channel.sockets.length === i + 2, 5000, 'reconnect');
      channel.socket!.ev.emit('connection.update', { connection: 'open' });
      channel.socket!.ev.emit('messages.upsert', { messages: [inbound], type: 'append' });
    }
    await Bun.sleep(500);
    expect(channel.delivered.map(({ jid, text }) => ({ jid, text }))).toEqual([{ jid: GROUP, text: 'Andy: echo: what is for dinner?' }]);
    expect(docker.runs()).toHaveLength(1);
  });

  it('downloads media of registered chats into groups/<folder>/media and tells the agent where it is', async () => {
    const docker = fakeDocker();
    const config = tempProject({ CONTAINER_RUNTIME: docker.path }, 'KIMI_API_KEY=sk-wa-test-12345678\n');
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    registerGroup(config, store, { jid: GROUP, name: 'Family', folder: 'family' });
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
      url: `http://127.0.0.1:${media.port}/media/cat.enc`, mimetype: 'image/jpeg', caption: 'our cat',
      mediaKey: encrypted.mediaKey, fileSha256: encrypted.fileSha256, fileEncSha256: encrypted.fileEncSha256, fileLength: photo.length,
    };
    await channel.onMessage(waMessage({ remoteJid: GROUP, participant: ALICE, id: 'PHOTO1', message: { imageMessage } }));
    await channel.onMessage(waMessage({ remoteJid: GROUP, participant: ALICE, id: 'BIGVIDEO', message: { videoMessage: { url: imageMessage.url, mimetype: 'video/mp4', fileLength: 80 * 1024 * 1024, caption: 'match' } } }));
    await channel.onMessage(waMessage({ remoteJid: 'other@g.us', participant: ALICE, id: 'NOTOURS', message: { imageMessage: { ...imageMessage, caption: 'elsewhere' } } }));
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
    registerGroup(config, store, { jid: ME, name: 'Me', folder: 'main', isMain: true });
    const server = flakyServer(60_000);
    stops.push(server.stop);
    const channel = whatsAppChannel(config, store, { authDir: await linkedAuthDir(), waWebSocketUrl: server.url });
    const host = new Host(config, store, [channel], { sweepIntervalMs: 60_000 });
    stops.push(async () => {
      await host.stop();
      store.close();
    });
    await host.start();
    let fetches = 0;
    // WhatsApp's answer to the group query, which only its servers can give.
    const serverGroups = () => {
      fetches++;
      return Promise.resolve({ [GROUP]: { id: GROUP, subject: `Family (${fetches})` } } as unknown as Awaited<ReturnType<NonNullable<typeof channel.socket>['groupFetchAllParticipating']>>);
    };
    channel.socket!.groupFetchAllParticipating = serverGroups;
    channel.socket!.ev.emit('connection.update', { connection: 'open' });
    await waitFor(() => store.listChats().some((c) => c.jid === GROUP), 3000, 'group synced');
    expect(store.listChats().find((c) => c.jid === GROUP)).toMatchObject({ name: 'Family (1)', isGroup: true });
    expect(store.getState('groups_synced_at')).not.toBeNull();
    channel.socket!.ev.emit('connection.update', { connection: 'close', lastDisconnect: { error: new Error('drop'), date: new Date() } });
    await waitFor(() => channel.sockets.length === 2, 5000, 'reconnect');
    channel.socket!.groupFetchAllParticipating = serverGroups;
    channel.socket!.ev.emit('connection.update', { connection: 'open' });
    await Bun.sleep(200);
    expect(fetches).toBe(1); // synced less than a day ago: not again
    writeJsonAtomic(join(config.ipcDir, 'main', 'tasks', '1-refresh.json'), { type: 'refresh_groups' });
    await waitFor(() => fetches === 2, 3000, 'refresh from main');
    await waitFor(() => JSON.parse(readFileSync(join(config.ipcDir, 'main', 'available_groups.json'), 'utf8')).groups.some((g: { name: string }) => g.name === 'Family (2)'), 3000, 'snapshot');
  });

  it('linking makes the self-chat the main group, taking over the terminal’s placeholder', () => {
    const config = tempProject();
    const store = new Store(config.dbPath);
    mkdirSync(join(config.groupsDir, 'main'), { recursive: true });
    registerGroup(config, store, { jid: LOCAL_MAIN_JID, name: 'Main', folder: 'main', isMain: true, requiresTrigger: false });
    store.setSession('main', 'kept-session');
    const main = makeSelfChatMain(config, store, ME);
    expect(main).toMatchObject({ jid: ME, folder: 'main', isMain: true });
    expect(store.groupByJid(LOCAL_MAIN_JID)).toBeNull();
    expect(store.getSession('main')).toBe('kept-session');
    store.close();
  });
});
