/**
 * The inbound side of the WhatsApp channel with real baileys objects: messages are baileys'
 * own protobufs (WAProto: proto.WebMessageInfo, proto.Message and its Location, Contact,
 * PollCreation, Event and Protocol messages), emitted on a real baileys socket's event
 * emitter (lib/Socket: sock.ev, messages.upsert as Socket/messages-recv.js emits it) and
 * media encrypted with baileys' own encryptedStream (lib/Utils/messages-media.js), served
 * from a loopback server the test can hold, since downloadMediaMessage fetches the
 * message's url (lib/Utils/messages.js).
 */
import { encryptedStream, proto, type WAMessage } from '@whiskeysockets/baileys';
import { afterEach, describe, expect, it } from 'vitest';
import {
  addGroup,
  Host,
  setupLogging,
  Store,
  whatsAppChannel,
  type NewMessage,
  type WhatsAppOptions,
} from '../nanoclaw.ts';
import {
  fakeDocker,
  flakyServer,
  linkedAuthDir,
  openAsWhatsAppWould,
  QUIET_SWEEPS,
  RecordingWhatsApp,
  tempProject,
  waitFor,
} from './helpers.ts';

const ME = '4915100000001@s.whatsapp.net';
const ME_LID = '99887766@lid';
const ALICE = '4915100000002@s.whatsapp.net';
const GROUP = '120363000000000001@g.us';

const stops: (() => unknown)[] = [];
afterEach(async () => {
  for (const stop of stops.splice(0).reverse()) await stop();
});

/** A message as baileys delivers it, built with baileys' own protobuf type. */
function waMessage(fields: {
  remoteJid: string;
  id: string;
  fromMe?: boolean;
  participant?: string;
  message: proto.IMessage;
  pushName?: string;
}): WAMessage {
  return proto.WebMessageInfo.fromObject({
    key: {
      remoteJid: fields.remoteJid,
      fromMe: fields.fromMe ?? false,
      id: fields.id,
      participant: fields.participant,
    },
    message: fields.message,
    messageTimestamp: 1_790_000_000,
    pushName: fields.pushName ?? 'Alice',
  }) as WAMessage;
}

/** A project with a store, a registered group, and a WhatsApp channel on a local server (not yet connected). */
async function inboundSetup(extra: Partial<WhatsAppOptions> = {}) {
  const config = tempProject();
  setupLogging(config, { terminalLevel: 'silent' });
  const store = new Store(config.dbPath);
  addGroup(config, store, { jid: GROUP, name: 'Family', folder: 'family' });
  const server = flakyServer(60_000);
  const channel = whatsAppChannel(config, store, {
    authDir: await linkedAuthDir(),
    waWebSocketUrl: server.url,
    ...extra,
  });
  stops.push(() => store.close());
  stops.push(() => server.stop());
  stops.push(() => channel.disconnect());
  return { config, store, channel };
}

describe('WhatsApp inbound order', () => {
  it('a chat’s messages arrive in the order WhatsApp sent them, a slow photo download included; other chats do not wait', async () => {
    const photo = Buffer.from('pretend this is a JPEG of a receipt');
    const encrypted = await encryptedStream(photo, 'image');
    let release: () => void = () => {};
    const held = new Promise<void>((resolve) => (release = resolve));
    let requested = 0;
    // WhatsApp's media server, answering only when the test lets it.
    const media = Bun.serve({
      port: 0,
      fetch: async () => {
        requested++;
        await held;
        return new Response(Bun.file(encrypted.encFilePath));
      },
    });
    stops.push(() => media.stop(true));
    const { channel } = await inboundSetup();
    const received: NewMessage[] = [];
    await channel.connect({ onMessage: (m) => received.push(m) });
    const sock = channel.socket!;
    openAsWhatsAppWould(sock);
    const upsert = (message: WAMessage) => {
      sock.ev.emit('messages.upsert', { messages: [message], type: 'notify' });
      sock.ev.flush();
    };
    upsert(
      waMessage({
        remoteJid: GROUP,
        participant: ALICE,
        id: 'PHOTO',
        message: {
          imageMessage: {
            url: `http://127.0.0.1:${media.port}/receipt.enc`,
            mimetype: 'image/jpeg',
            mediaKey: encrypted.mediaKey,
            fileSha256: encrypted.fileSha256,
            fileEncSha256: encrypted.fileEncSha256,
            fileLength: photo.length,
          },
        },
      }),
    );
    upsert(
      waMessage({
        remoteJid: GROUP,
        participant: ALICE,
        id: 'QUESTION',
        message: { conversation: '@Andy what is in this photo?' },
      }),
    );
    upsert(waMessage({ remoteJid: ALICE, id: 'ELSEWHERE', message: { conversation: 'unrelated' } }));
    await waitFor(() => received.some((m) => m.id === 'ELSEWHERE'), 5000, 'the other chat, while the photo is held');
    await waitFor(() => requested === 1, 5000, 'the photo requested');
    expect(received.map((m) => m.id)).toEqual(['ELSEWHERE']);
    release();
    await waitFor(() => received.length === 3, 5000, 'the photo and the question');
    expect(received.map((m) => m.id)).toEqual(['ELSEWHERE', 'PHOTO', 'QUESTION']);
    expect(received[1]!.content).toBe('[image: /workspace/group/media/PHOTO-image.jpeg]');
  });
});

/**
 * The host with WhatsApp (RecordingWhatsApp keeps what it sends instead of sending), main
 * in the self-chat, a trigger group, and the fake docker as the agent. Own-number mode or
 * not. What WhatsApp sends back of the bot's own messages is emitted as baileys does
 * (emitOwnEvents: Socket/messages-send.js upserts every sent message, fromMe, type append).
 */
async function hostSetup(hasOwnNumber: boolean) {
  const docker = fakeDocker();
  const config = tempProject(
    { CONTAINER_RUNTIME: docker.path, ASSISTANT_HAS_OWN_NUMBER: String(hasOwnNumber) },
    'KIMI_API_KEY=sk-wa-test-12345678\n',
  );
  setupLogging(config, { terminalLevel: 'silent' });
  const store = new Store(config.dbPath);
  addGroup(config, store, { jid: ME, name: 'Main', folder: 'main', isMain: true, requiresTrigger: false });
  addGroup(config, store, { jid: GROUP, name: 'Family', folder: 'family' });
  const server = flakyServer(60_000);
  const channel = new RecordingWhatsApp({
    authDir: await linkedAuthDir(),
    assistantName: 'Andy',
    hasOwnNumber,
    waWebSocketUrl: server.url,
    mediaTreeFor: () => null,
    triggerFor: (jid) => store.groupByJid(jid)?.trigger,
    sentByBot: (id) => store.outboundByMessageId(id) !== null, // as whatsAppChannel wires it
  });
  const host = new Host(config, store, [channel], QUIET_SWEEPS);
  stops.push(async () => {
    await host.stop();
    server.stop();
    store.close();
  });
  await host.start();
  const sock = channel.socket!;
  Object.defineProperty(sock, 'user', { value: { id: '4915100000001:7@s.whatsapp.net', lid: '99887766:7@lid' } });
  openAsWhatsAppWould(sock);
  const upsert = (message: WAMessage, type: 'notify' | 'append' = 'notify') => {
    sock.ev.emit('messages.upsert', { messages: [message], type });
    sock.ev.flush();
  };
  /** WhatsApp's copy of what the bot sent, as baileys emits it. */
  const echo = (sent: { jid: string; text: string; messageId: string }) =>
    upsert(
      waMessage({ remoteJid: sent.jid, fromMe: true, id: sent.messageId, message: { conversation: sent.text } }),
      'append',
    );
  const replied = (count: number) => waitFor(() => channel.delivered.length === count, 10_000, `reply ${count}`);
  return { docker, store, channel, upsert, echo, replied };
}

describe('the bot’s own messages, known by the ids it sent', () => {
  it('shared number: the owner’s “Andy: …” in the self-chat is answered, the bot’s echo is not, a member’s “Andy: …” reaches the agent', async () => {
    const { docker, store, channel, upsert, echo, replied } = await hostSetup(false);
    upsert(
      waMessage({
        remoteJid: ME,
        fromMe: true,
        id: 'OWNER1',
        pushName: 'Me',
        message: { conversation: 'Andy: remind me at 5' },
      }),
    );
    await replied(1);
    expect(channel.delivered[0]).toMatchObject({ jid: ME, text: 'Andy: echo: Andy: remind me at 5' });
    echo(channel.delivered[0]!);
    upsert(
      waMessage({ remoteJid: ME, fromMe: true, id: 'OWNER2', pushName: 'Me', message: { conversation: 'and at 6?' } }),
    );
    await replied(2);
    expect(channel.delivered[1]!.text).toBe('Andy: echo: and at 6?');
    // What the agent is shown of the self-chat: the owner's two messages, never the bot's own words again.
    expect(store.messagesSince(ME, 0).map((m) => m.content)).toEqual(['Andy: remind me at 5', 'and at 6?']);

    upsert(
      waMessage({
        remoteJid: GROUP,
        participant: ALICE,
        id: 'ALICE1',
        message: { conversation: 'Andy: said dinner is at 7' },
      }),
    );
    upsert(
      waMessage({
        remoteJid: GROUP,
        participant: ALICE,
        id: 'ALICE2',
        message: { conversation: '@Andy is that right?' },
      }),
    );
    await replied(3);
    const groupRun = docker.runs().find((run) => run.stdin?.includes('is that right'));
    expect(groupRun?.stdin).toContain('Andy: said dinner is at 7');
  });

  it('own number: the owner’s messages in the self-chat wake main, the bot’s replies never do; a mention mid-sentence and a reply to the bot wake a group', async () => {
    const { store, channel, upsert, echo, replied } = await hostSetup(true);
    upsert(
      waMessage({
        remoteJid: ME,
        fromMe: true,
        id: 'OWNER1',
        pushName: 'Me',
        message: { conversation: 'what is on today?' },
      }),
    );
    await replied(1);
    expect(channel.delivered[0]).toMatchObject({ jid: ME, text: 'echo: what is on today?' });
    echo(channel.delivered[0]!);
    upsert(
      waMessage({ remoteJid: ME, fromMe: true, id: 'OWNER2', pushName: 'Me', message: { conversation: 'thanks' } }),
    );
    await replied(2);
    expect(store.messagesSince(ME, 0).map((m) => m.content)).toEqual(['what is on today?', 'thanks']);

    upsert(
      waMessage({
        remoteJid: GROUP,
        participant: ALICE,
        id: 'MENTION',
        message: {
          extendedTextMessage: { text: 'thanks @99887766, and the time?', contextInfo: { mentionedJid: [ME_LID] } },
        },
      }),
    );
    await replied(3);
    expect(channel.delivered[2]!.text).toBe('echo: thanks @Andy, and the time?');
    const botSaid = channel.delivered[2]!;
    echo(botSaid);
    upsert(
      waMessage({
        remoteJid: GROUP,
        participant: ALICE,
        id: 'REPLY',
        message: {
          extendedTextMessage: {
            text: 'and tomorrow?',
            contextInfo: {
              stanzaId: botSaid.messageId,
              participant: ME,
              quotedMessage: { conversation: botSaid.text },
            },
          },
        },
      }),
    );
    await replied(4);
    expect(channel.delivered[3]!.text).toBe(`echo: [replying to you: "${botSaid.text}"]\nand tomorrow?`);
  });

  it('whatsAppChannel knows the bot’s messages from the store’s outbox', async () => {
    const { store, channel } = await inboundSetup();
    const received: NewMessage[] = [];
    await channel.connect({ onMessage: (m) => received.push(m) });
    store.addOutbound('whatsapp', GROUP, 'Andy: noted', '3EB0FROMTHEOUTBOX');
    for (const id of ['3EB0FROMTHEOUTBOX', '3EB0TYPEDONPHONE'])
      await channel.onMessage(
        waMessage({ remoteJid: GROUP, fromMe: true, id, message: { conversation: 'Andy: noted' } }),
      );
    expect(received.map((m) => m.isBotMessage)).toEqual([true, false]);
  });
});
