/**
 * send_file through the host: the agent's request file in its IPC folder, the file read
 * from its group folder through AgentTree (real files, links, a FIFO, a sparse file over
 * the limit), the outbox, and the channel. The WhatsApp test drives baileys' own message
 * generation (generateWAMessageContent, prepareWAMessageMedia in lib/Utils/messages.js:
 * encryption, upload, the image/document protobufs) through RecordingWhatsApp, and a real
 * baileys socket (lib/Socket) opened as WhatsApp would.
 */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  MAX_MEDIA_BYTES,
  OutboxSender,
  Store,
  fileKind,
  groupFilePath,
  newMessageId,
  setupLogging,
  type Config,
  type HostOptions,
} from '../nanoclaw.ts';
import {
  RecordingChannel,
  RecordingWhatsApp,
  fakeDocker,
  flakyServer,
  linkedAuthDir,
  openAsWhatsAppWould,
  shutDown,
  shutDownAll,
  startWorld,
  tempProject,
  waitFor,
  writeJsonAtomic,
  type World,
  MAIN,
  FAMILY,
  WORK,
  THREE_GROUPS,
  socketOf,
} from './helpers.ts';

const SECRET = 'sk-send-file-test-abcdefghijkl';

/** The first bytes of a real PNG (signature and IHDR of a 1×1 image), then padding. */
const PNG = Buffer.concat([
  Buffer.from('89504e470d0a1a0a0000000d4948445200000001000000010806000000', 'hex'),
  Buffer.alloc(64, 7),
]);
const PDF = Buffer.from('%PDF-1.4\n% a tiny document\n');

const stops: (() => Promise<void> | void)[] = [];

async function world(reuse?: Config, options: HostOptions = {}, ready = true): Promise<World> {
  const channel = new RecordingChannel([MAIN, FAMILY, WORK]);
  channel.ready = ready;
  return startWorld({
    config: reuse ?? tempProject({ CONTAINER_RUNTIME: fakeDocker().path }, `KIMI_API_KEY=${SECRET}\n`),
    channel,
    groups: reuse ? [] : THREE_GROUPS,
    secrets: [SECRET],
    options,
  });
}

afterEach(async () => {
  await shutDownAll(); // before what the hosts talk to
  for (const stop of stops.splice(0)) await stop();
});

const groupDir = (w: World, folder: string) => join(w.config.groupsDir, folder);

type Decision = { ok: boolean; detail?: string; reason?: string };
/** Drops a send_file request as the MCP tool writes it, and waits for the host's decision. */
async function sendFile(w: World, folder: string, request: { chatJid: string; path: string; caption?: string }) {
  const name = `${Date.now()}-${Math.random().toString(36).slice(2)}.json`;
  writeJsonAtomic(join(w.config.ipcDir, folder, 'messages', name), { type: 'send_file', ...request });
  const response = join(w.config.ipcDir, folder, 'responses', name);
  await waitFor(() => existsSync(response), 60_000, `the decision on ${request.path}`);
  return JSON.parse(readFileSync(response, 'utf8')) as Decision;
}

describe('what a file goes out as', () => {
  it('JPEG, PNG and WebP content as an image, whatever the name; anything else a document typed by its extension', () => {
    expect(fileKind(PNG, 'chart.bin')).toEqual({ kind: 'image', mimetype: 'image/png' });
    expect(fileKind(Buffer.from([0xff, 0xd8, 0xff, 0xe0, 0, 0]), 'photo')).toEqual({
      kind: 'image',
      mimetype: 'image/jpeg',
    });
    expect(fileKind(Buffer.from('RIFF\x10\x00\x00\x00WEBPVP8 ', 'latin1'), 'x.webp')).toEqual({
      kind: 'image',
      mimetype: 'image/webp',
    });
    expect(fileKind(PDF, 'report.pdf')).toEqual({ kind: 'document', mimetype: 'application/pdf' });
    expect(fileKind(Buffer.from('a,b\n'), 'data.csv')).toEqual({ kind: 'document', mimetype: 'text/csv' });
    // A name that claims an image does not make one: the bytes decide.
    expect(fileKind(Buffer.from('not a png'), 'fake.png')).toEqual({
      kind: 'document',
      mimetype: 'application/octet-stream',
    });
  });

  it('takes paths under /workspace/group (or relative to it), nothing outside', () => {
    expect(groupFilePath('/workspace/group/out/chart.png')).toBe('out/chart.png');
    expect(groupFilePath('notes.txt')).toBe('notes.txt');
    for (const outside of ['/etc/passwd', '/workspace/global/CLAUDE.md', '/workspace/group/../ipc/x', '../main/x'])
      expect(() => groupFilePath(outside)).toThrow(/outside \/workspace\/group/);
  });
});

describe('send_file through the host', () => {
  it('an image from the group folder goes to its chat with its caption; a document with its name and type', async () => {
    const w = await world();
    mkdirSync(join(groupDir(w, 'family'), 'out'));
    writeFileSync(join(groupDir(w, 'family'), 'out', 'chart.png'), PNG);
    writeFileSync(join(groupDir(w, 'family'), 'report.pdf'), PDF);
    expect(
      await sendFile(w, 'family', { chatJid: FAMILY, path: '/workspace/group/out/chart.png', caption: 'the chart' }),
    ).toEqual({ ok: true, detail: 'an image, 93 B' });
    expect(await sendFile(w, 'family', { chatJid: FAMILY, path: 'report.pdf' })).toEqual({
      ok: true,
      detail: 'a document (application/pdf), 27 B',
    });
    await w.host.settleOutbox();
    const [image, document] = w.channel.files;
    expect(image).toMatchObject({
      jid: FAMILY,
      file: { kind: 'image', mimetype: 'image/png', fileName: 'chart.png', caption: 'Andy: the chart' },
    });
    expect(Buffer.from(image!.file.data).equals(PNG)).toBe(true);
    expect(document).toMatchObject({
      jid: FAMILY,
      file: { kind: 'document', mimetype: 'application/pdf', fileName: 'report.pdf' },
    });
    expect(document!.file.caption).toBeUndefined();
    // The chat's history notes what the bot sent, under the id it was sent with; the bytes leave the outbox once sent.
    const history = w.store.db
      .query<{ id: string; content: string }, [string]>(
        'SELECT id, content FROM messages WHERE chat_jid = ? AND is_bot_message = 1 ORDER BY seq',
      )
      .all(FAMILY);
    expect(history).toEqual([
      { id: image!.messageId, content: '[image: chart.png] Andy: the chart' },
      { id: document!.messageId, content: '[document: report.pdf]' },
    ]);
    expect(
      w.store.db.query('SELECT COUNT(*) AS n FROM outbox WHERE file IS NOT NULL OR sent_at IS NULL').get(),
    ).toEqual({ n: 0 });
    expect(w.channel.sent).toEqual([]); // no text besides
  });

  it('refuses, telling the agent why (and never the host’s paths): a link, a linked folder, a FIFO, a file over the limit, a missing file, a path outside', async () => {
    const w = await world();
    const family = groupDir(w, 'family');
    writeFileSync(join(groupDir(w, 'main'), 'secret.txt'), 'main only');
    symlinkSync(join(groupDir(w, 'main'), 'secret.txt'), join(family, 'link.txt'));
    symlinkSync(groupDir(w, 'main'), join(family, 'linked-dir'));
    Bun.spawnSync(['mkfifo', join(family, 'pipe')]);
    writeFileSync(join(family, 'huge.bin'), '');
    truncateSync(join(family, 'huge.bin'), MAX_MEDIA_BYTES + 1); // sparse: no disk used
    const refusals: [string, RegExp][] = [
      ['link.txt', /^\/workspace\/group\/link\.txt is a link: refused$/],
      ['/workspace/group/linked-dir/secret.txt', /^\/workspace\/group\/linked-dir is not a plain folder/],
      ['pipe', /^\/workspace\/group\/pipe is not a regular file: refused without reading it$/],
      [
        'huge.bin',
        /^\/workspace\/group\/huge\.bin is 26214401 bytes, over the 25 MB limit: refused without reading it$/,
      ],
      ['nothing-here.png', /^there is no file nothing-here\.png$/],
      ['/etc/passwd', /^\/etc\/passwd is outside \/workspace\/group/],
      ['../main/secret.txt', /outside \/workspace\/group/],
    ];
    for (const [path, reason] of refusals) {
      const decision = await sendFile(w, 'family', { chatJid: FAMILY, path });
      expect(decision.ok, path).toBe(false);
      expect(decision.reason, path).toMatch(reason);
      expect(decision.reason).not.toContain(w.config.projectRoot);
    }
    await w.host.settleOutbox();
    expect(w.channel.files).toEqual([]);
    expect(w.store.db.query('SELECT COUNT(*) AS n FROM outbox').get()).toEqual({ n: 0 });
  });

  it('a group sends only to its own chat; main to any registered chat; the send caps count files too', async () => {
    const w = await world();
    writeFileSync(join(groupDir(w, 'family'), 'chart.png'), PNG);
    writeFileSync(join(groupDir(w, 'main'), 'chart.png'), PNG);
    expect(await sendFile(w, 'family', { chatJid: WORK, path: 'chart.png' })).toEqual({
      ok: false,
      reason: 'group "family" may only send files to its own chat',
    });
    expect(await sendFile(w, 'main', { chatJid: 'stranger@g.us', path: 'chart.png' })).toEqual({
      ok: false,
      reason: 'stranger@g.us is not a registered chat',
    });
    expect((await sendFile(w, 'main', { chatJid: WORK, path: 'chart.png' })).ok).toBe(true);
    await w.host.settleOutbox();
    expect(w.channel.files.map((f) => f.jid)).toEqual([WORK]);
    const limit = w.config.send.maxPerMinute;
    for (let i = 0; i < limit; i++)
      expect((await sendFile(w, 'family', { chatJid: FAMILY, path: 'chart.png' })).ok).toBe(true);
    const over = await sendFile(w, 'family', { chatJid: FAMILY, path: 'chart.png' });
    expect(over.reason).toMatch(
      new RegExp(`already sent ${limit} messages in the last minute \\(SEND_MAX_PER_MINUTE=${limit}\\)`),
    );
  });

  it('exactly once: a file waiting in the outbox when the host stops goes out after the restart, once, under its id', async () => {
    const first = await world(undefined, {}, false); // the channel is down: the file waits
    writeFileSync(join(groupDir(first, 'family'), 'chart.png'), PNG);
    expect((await sendFile(first, 'family', { chatJid: FAMILY, path: 'chart.png', caption: 'later' })).ok).toBe(true);
    const waiting = first.store.unsent('recording');
    expect(waiting).toHaveLength(1);
    expect(waiting[0]!.file).toMatchObject({ kind: 'image', fileName: 'chart.png', caption: 'Andy: later' });
    expect(first.channel.files).toEqual([]);
    const config = first.config;
    await shutDown(first);
    // The agent's copy changes meanwhile: what goes out is what was asked for.
    writeFileSync(join(config.groupsDir, 'family', 'chart.png'), 'changed');
    const second = await world(config);
    await waitFor(() => second.channel.files.length === 1, 60_000, 'the file sent after the restart');
    await second.host.settleOutbox();
    expect(second.channel.files).toHaveLength(1);
    expect(second.channel.files[0]!.messageId).toBe(waiting[0]!.messageId);
    expect(Buffer.from(second.channel.files[0]!.file.data).equals(PNG)).toBe(true);
    expect(readdirSync(join(config.ipcDir, 'family', 'messages'))).toEqual([]);
  });
});

describe('send_file on WhatsApp (baileys 7)', () => {
  it('an image goes as baileys’ imageMessage (encrypted upload, caption, sha256 of the bytes), a document with its name and type; a resend request gets exactly that', async () => {
    const config = tempProject();
    setupLogging(config, { terminalLevel: 'silent' });
    const store = new Store(config.dbPath);
    const server = flakyServer(60_000);
    const channel = new RecordingWhatsApp({
      authDir: await linkedAuthDir(),
      assistantName: 'Andy',
      hasOwnNumber: false,
      mediaTreeFor: () => null,
      waWebSocketUrl: server.url,
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
    const GROUP = '120363000000000001@g.us';
    const imageId = newMessageId();
    const docId = newMessageId();
    const chart = {
      kind: 'image',
      mimetype: 'image/png',
      fileName: 'chart.png',
      caption: 'Andy: the chart',
      data: PNG,
    } as const;
    store.addOutbound('whatsapp', GROUP, '[image: chart.png] Andy: the chart', imageId, chart);
    const pdf = { kind: 'document', mimetype: 'application/pdf', fileName: 'report.pdf', data: PDF } as const;
    store.addOutbound('whatsapp', GROUP, '[document: report.pdf]', docId, pdf);
    sender.kick();
    await waitFor(() => channel.delivered.length === 2, 60_000, 'both sent');
    await sender.settle();
    const [image, document] = channel.delivered;
    expect(image!.messageId).toBe(imageId);
    const sha256 = (data: Buffer) => createHash('sha256').update(data).digest();
    expect(image!.content!.imageMessage).toMatchObject({
      caption: 'Andy: the chart',
      mimetype: 'image/png',
      directPath: '/test/image',
    });
    expect(Buffer.from(image!.content!.imageMessage!.fileSha256!).equals(sha256(PNG))).toBe(true);
    expect(Number(image!.content!.imageMessage!.fileLength)).toBe(PNG.length);
    expect(image!.content!.imageMessage!.mediaKey).toHaveLength(32);
    expect(image!.uploaded!.includes(PNG)).toBe(false); // what was uploaded is encrypted
    expect(document!.content!.documentMessage).toMatchObject({
      fileName: 'report.pdf',
      mimetype: 'application/pdf',
    });
    expect(Buffer.from(document!.content!.documentMessage!.fileSha256!).equals(sha256(PDF))).toBe(true);
    const asked = await channel.getMessage({ remoteJid: GROUP, id: imageId, fromMe: true });
    expect(asked?.imageMessage?.url).toBe(image!.content!.imageMessage!.url);
    expect(store.db.query('SELECT COUNT(*) AS n FROM outbox WHERE file IS NOT NULL').get()).toEqual({ n: 0 });
  });
});
