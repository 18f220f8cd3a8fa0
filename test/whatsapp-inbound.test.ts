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
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { addGroup, setupLogging, Store, whatsAppChannel, type NewMessage, type WhatsAppOptions } from '../nanoclaw.ts';
import { flakyServer, linkedAuthDir, openAsWhatsAppWould, tempProject, waitFor } from './helpers.ts';

const ME = '4915100000001@s.whatsapp.net';
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
