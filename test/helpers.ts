/** Shared set-up for host tests: temp projects, the fake docker, a recording channel. */
import { randomUUID } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach } from 'vitest';
import {
  type AnyMessageContent,
  BufferJSON,
  encryptedStream as baileysEncryptedStream,
  generateWAMessageContent,
  initAuthCreds,
  proto,
  type WASocket,
} from '@whiskeysockets/baileys';
import {
  addGroup,
  Host,
  loadConfig,
  setupLogging,
  Store,
  systemClock,
  WhatsAppChannel,
  type Channel,
  type ChannelHandlers,
  type Clock,
  type Config,
  type HostOptions,
  type NewMessage,
  type OutboundFile,
  type RegisteredGroup,
  type ScheduledTask,
} from '../nanoclaw.ts';

const made: string[] = [];
const stores: Store[] = [];
const removeMade = () => {
  for (const store of stores.splice(0)) store.close();
  for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
};
// No temp folder is left behind: a test file removes its own when it is done (its children
// are gone by then); the drills and the bench, which use these helpers outside vitest, at exit.
if (process.env.VITEST) afterAll(removeMade);
else process.once('exit', removeMade);

/** A temp folder, removed when the test file is done. */
export function tempDir(prefix = 'nanoclaw-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  made.push(dir);
  return dir;
}

/** An empty database in a temp folder, closed when the test file is done. */
export function tempStore(): Store {
  const store = new Store(join(tempDir(), 'messages.db'));
  stores.push(store);
  return store;
}

/** Media encrypted as WhatsApp's servers hold it (baileys' own code); its temp file is removed with the test file's folders. */
export async function encryptedStream(
  ...args: Parameters<typeof baileysEncryptedStream>
): ReturnType<typeof baileysEncryptedStream> {
  const encrypted = await baileysEncryptedStream(...args);
  made.push(encrypted.encFilePath);
  if (encrypted.originalFilePath) made.push(encrypted.originalFilePath);
  return encrypted;
}

export interface FakeDockerCall {
  argv: string[];
  env: Record<string, string>;
  pid: number;
  command: string;
  stdin?: string;
  name?: string;
  names?: string[];
  text?: string;
}

export interface FakeDocker {
  dir: string;
  /** Absolute path of the `docker` executable. */
  path: string;
  calls(): FakeDockerCall[];
  runs(): FakeDockerCall[];
  /** The runs that carried messages to answer (not a warm start, which waits for its first message). */
  answering(): FakeDockerCall[];
  set(flag: 'engine-down' | 'no-image' | 'no-kimi' | 'hold-ready', on?: boolean): void;
  setRunning(names: string[]): void;
}

/** Installs test/fake-docker.ts as an executable named `docker` in a fresh directory. */
export function fakeDocker(): FakeDocker {
  const dir = tempDir('nanoclaw-fake-docker-');
  const path = join(dir, 'docker');
  const script = fileURLToPath(new URL('./fake-docker.ts', import.meta.url));
  writeFileSync(path, `#!/bin/sh\nexec "${process.execPath}" --no-env-file "${script}" "$0" "$@"\n`);
  chmodSync(path, 0o755);
  const calls = () => {
    const file = join(dir, 'calls.jsonl');
    if (!existsSync(file)) return [];
    return readFileSync(file, 'utf8')
      .trim()
      .split('\n')
      .filter(Boolean)
      .map((line) => JSON.parse(line) as FakeDockerCall);
  };
  return {
    dir,
    path,
    calls,
    runs: () => calls().filter((call) => call.command === 'run'),
    answering: () => calls().filter((call) => call.command === 'run' && !JSON.parse(call.stdin!).warm),
    set: (flag, on = true) => {
      const file = join(dir, flag);
      if (on) writeFileSync(file, '');
      else if (existsSync(file)) Bun.spawnSync(['rm', '-f', file]);
    },
    setRunning: (names) => writeFileSync(join(dir, 'running'), names.map((n) => `${n}\n`).join('')),
  };
}

/**
 * Where model requests go unless a test starts a model of its own: a loopback port nothing
 * listens on (9, discard), so no test can ever reach the real Moonshot endpoint by mistake.
 */
export const NO_MODEL_URL = 'http://127.0.0.1:9/v1';

/** A temp project root laid out like the repository, with its config. */
export function tempProject(env: Record<string, string> = {}, dotEnv = ''): Config {
  const root = tempDir();
  mkdirSync(join(root, 'groups', 'global'), { recursive: true });
  mkdirSync(join(root, 'groups', 'main'), { recursive: true });
  writeFileSync(join(root, 'groups', 'global', 'CLAUDE.md'), '# global memory\n');
  if (dotEnv) writeFileSync(join(root, '.env'), dotEnv);
  return loadConfig(root, {
    TZ: 'UTC',
    LOG_LEVEL: 'info',
    NANOCLAW_MOUNT_ALLOWLIST: join(root, 'no-allowlist.json'),
    KIMI_BASE_URL: NO_MODEL_URL,
    DISK_RESERVE: '1m', // real, but small: hundreds of test projects each make one
    ...env,
  });
}

/** Host sweeps a minute apart: they do not come round within a test, so what a test sees was started by events. */
export const QUIET_SWEEPS = { recoverySweepMs: 60_000, ipcSweepMs: 60_000 } satisfies HostOptions;

/** A started host on a temp project, with the channel that records what it sends. */
export interface World<C extends RecordingChannel = RecordingChannel> {
  config: Config;
  store: Store;
  channel: C;
  host: Host;
  /** The groups registered for this world, in the order given. */
  registered: RegisteredGroup[];
}

export interface WorldSpec<C extends RecordingChannel> {
  config: Config;
  channel: C;
  /** Registered before the host starts; none when a test starts a host again on a project that has them. */
  groups?: Parameters<typeof addGroup>[2][];
  /** Masked in the logs. */
  secrets?: string[];
  /** Over the tests' defaults: retries after 50 ms, quiet sweeps, two seconds to shut down. */
  options?: HostOptions;
}

/** The chats most host tests start with: the owner's self-chat (main), and two groups. */
export const MAIN = 'me@s.whatsapp.net';
export const FAMILY = 'family@g.us';
export const WORK = 'work@g.us';
export const THREE_GROUPS = [
  { jid: MAIN, name: 'Me', folder: 'main', isMain: true },
  { jid: FAMILY, name: 'Family', folder: 'family' },
  { jid: WORK, name: 'Work', folder: 'work' },
];

const running = new Map<Host, Store>();

/** Starts a host on `spec.config`; it is stopped and its store closed after the test, unless the test shuts it down first. */
export async function startWorld<C extends RecordingChannel>(spec: WorldSpec<C>): Promise<World<C>> {
  setupLogging(spec.config, { terminalLevel: 'silent', secrets: spec.secrets ?? [] });
  const store = new Store(spec.config.dbPath);
  const registered = (spec.groups ?? []).map((group) => addGroup(spec.config, store, group));
  const host = new Host(spec.config, store, [spec.channel], {
    retryBaseMs: 50,
    ...QUIET_SWEEPS,
    shutdownGraceMs: 2000,
    ...spec.options,
  });
  await host.start();
  running.set(host, store);
  return { config: spec.config, store, channel: spec.channel, host, registered };
}

/** Stops a world's host and closes its store (as a restart or a test of shutting down needs). */
export async function shutDown(w: Pick<World, 'host' | 'store'>): Promise<void> {
  running.delete(w.host);
  await w.host.stop();
  w.store.close();
}

/** Every world still running; after each test, and before a test file stops what those hosts talk to. */
export async function shutDownAll(): Promise<void> {
  for (const [host, store] of [...running]) await shutDown({ host, store });
}
if (process.env.VITEST) afterEach(shutDownAll);

/** A scheduled task row: an active isolated task every minute, with only what a test names changed. */
export function taskRow(
  fields: Pick<ScheduledTask, 'id' | 'groupFolder' | 'chatJid'> & Partial<ScheduledTask>,
): ScheduledTask {
  return {
    prompt: 'p',
    scheduleType: 'interval',
    scheduleValue: '60000',
    contextMode: 'isolated',
    nextRun: null,
    lastRun: null,
    lastResult: null,
    status: 'active',
    createdAt: 'x',
    ...fields,
  };
}

/** A real Channel implementation that keeps what it was asked to send. */
export class RecordingChannel implements Channel {
  readonly name = 'recording';
  /** Whether it can deliver; a test may take it down. */
  ready = true;
  readonly sent: { jid: string; text: string; messageId: string }[] = [];
  handlers: ChannelHandlers | null = null;
  private counter = 0;

  constructor(private readonly jids: string[]) {}

  ownsJid(jid: string): boolean {
    return this.jids.includes(jid);
  }

  async connect(handlers: ChannelHandlers): Promise<void> {
    this.handlers = handlers;
  }

  layout(text: string): string[] {
    return [text];
  }

  async deliver(jid: string, text: string, messageId: string): Promise<void> {
    this.sent.push({ jid, text, messageId });
  }

  /** The files it was asked to send (send_file), in order. */
  readonly files: { jid: string; file: OutboundFile; messageId: string }[] = [];

  async sendFile(jid: string, file: OutboundFile, messageId: string): Promise<void> {
    this.files.push({ jid, file, messageId });
  }

  async disconnect(): Promise<void> {
    this.handlers = null;
  }

  /** Someone starts typing in a chat (WhatsApp's "composing", the terminal's first keystroke). */
  typing(chatJid: string, typist?: string): void {
    this.handlers?.onActivity?.(chatJid, typist);
  }

  /** Delivers an inbound message as a platform would. */
  receive(chatJid: string, content: string, extra: Partial<NewMessage> = {}): NewMessage {
    const message: NewMessage = {
      id: `m${++this.counter}-${Date.now()}`,
      chatJid,
      sender: 'alice@s.whatsapp.net',
      senderName: 'Alice',
      content,
      timestamp: new Date().toISOString(),
      // A chat that is no group is the user's self-chat (main) in these tests: its messages are the owner's.
      isFromMe: !chatJid.endsWith('@g.us'),
      isBotMessage: false,
      ...extra,
    };
    this.handlers!.onMessage(message, { name: `chat ${chatJid}`, isGroup: chatJid.endsWith('@g.us') });
    return message;
  }
}

/** The texts a world's channel sent, in order; only those to `jid` if given. */
export const texts = (w: { channel: RecordingChannel }, jid?: string): string[] =>
  w.channel.sent.filter((s) => !jid || s.jid === jid).map((s) => s.text);

/** Polls until `check` returns a truthy value (or fails after timeoutMs). */
export async function waitFor<T>(
  check: () => T | undefined | null | false,
  timeoutMs = 60_000, // only a failure guard: nothing waits this long when the code works
  what = 'condition',
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(20);
  }
}

/**
 * A WhatsApp channel whose last step (the send to WhatsApp's servers) is recorded instead;
 * it returns the message content baileys' own generateWAMessageContent builds (for a file:
 * encrypted and "uploaded", the upload keeping the encrypted bytes), as sendMessage would.
 * Modelled on baileys' lib/Socket/messages-send.js (sendMessage) and lib/Utils/messages.js
 * (generateWAMessageContent, prepareWAMessageMedia).
 */
export class RecordingWhatsApp extends WhatsAppChannel {
  /** Every socket it opened, in order. */
  readonly sockets = watchSockets(this);
  get socketsOpened(): number {
    return this.sockets.length;
  }
  readonly delivered: {
    jid: string;
    text: string;
    messageId: string;
    content?: proto.IMessage;
    given?: AnyMessageContent;
    uploaded?: Buffer;
  }[] = [];
  protected override async send(
    jid: string,
    given: AnyMessageContent,
    messageId: string,
  ): Promise<proto.IMessage | undefined> {
    if (!this.ready) throw new Error('offline');
    let uploaded: Buffer | undefined;
    const content = await generateWAMessageContent(given, {
      upload: async (encrypted, { mediaType }) => {
        uploaded = readFileSync(encrypted as string);
        return { mediaUrl: `https://mmg.whatsapp.net/test/${mediaType}`, directPath: `/test/${mediaType}` };
      },
    });
    const text = 'text' in given ? given.text : 'caption' in given ? (given.caption ?? '') : '';
    this.delivered.push({ jid, text, messageId, content, given, ...(uploaded ? { uploaded } : {}) });
    return content;
  }
}

/** The channel's live socket (what WhatsApp's servers would talk to), for a test to drive its events. */
// biome-ignore lint/complexity/useLiteralKeys: sock is private; element access is TypeScript's type-checked way in
export const socketOf = (channel: WhatsAppChannel): WASocket => channel['sock']!;

/** The channel's group metadata cache (what its sends read), for a test to look into. */
// biome-ignore lint/complexity/useLiteralKeys: groupMetadata is private; element access is TypeScript's type-checked way in
export const groupMetadataOf = (channel: WhatsAppChannel) => channel['groupMetadata'];

/** Every socket the channel opens from now on, in order: its private `sock`, watched as it is set. */
export function watchSockets(channel: WhatsAppChannel): WASocket[] {
  const sockets: WASocket[] = [];
  // biome-ignore lint/complexity/useLiteralKeys: sock is private; element access is TypeScript's type-checked way in
  let current = channel['sock'];
  Object.defineProperty(channel, 'sock', {
    get: () => current,
    set: (sock: WASocket | null) => {
      current = sock;
      if (sock) sockets.push(sock);
    },
  });
  return sockets;
}

/** A local WebSocket server that accepts connections and drops each after `holdMs`. */
export function flakyServer(holdMs: number | ((connection: number) => number)) {
  let open = 0;
  let maxOpen = 0;
  const connectedAt: number[] = [];
  const server = Bun.serve({
    port: 0,
    fetch: (req, srv) => (srv.upgrade(req) ? undefined : new Response('websocket only', { status: 400 })),
    websocket: {
      open(ws) {
        open++;
        maxOpen = Math.max(maxOpen, open);
        connectedAt.push(Date.now());
        setTimeout(() => ws.close(), typeof holdMs === 'number' ? holdMs : holdMs(connectedAt.length));
      },
      close() {
        open--;
      },
      message() {},
    },
  });
  return {
    url: `ws://127.0.0.1:${server.port}/ws/chat`,
    connectedAt,
    get maxOpen() {
      return maxOpen;
    },
    stop: () => server.stop(true),
  };
}

/** creds.json as baileys' useMultiFileAuthState writes it (BufferJSON). */
export function writeCreds(dir: string, creds: object): void {
  writeFileSync(join(dir, 'creds.json'), JSON.stringify(creds, BufferJSON.replacer));
}

/**
 * Credentials of a linked device: what a finished pairing leaves (baileys 7
 * configureSuccessfulPairing adds `me` with its device suffix and the signed `account`).
 */
export async function linkedAuthDir(): Promise<string> {
  const dir = tempDir('nanoclaw-wa-auth-');
  const account = proto.ADVSignedDeviceIdentity.fromObject({
    details: Buffer.alloc(32, 1),
    accountSignatureKey: Buffer.alloc(32, 2),
    accountSignature: Buffer.alloc(64, 3),
    deviceSignature: Buffer.alloc(64, 4),
  });
  writeCreds(dir, {
    ...initAuthCreds(),
    me: { id: '4915100000001:7@s.whatsapp.net', lid: '99887766:7@lid', name: 'Me' },
    account,
    platform: 'android',
    registered: false,
  });
  return dir;
}

/** What baileys leaves after `requestPairingCode` when the phone never confirmed: `me` without `account`. */
export function pendingPairingAuthDir(): string {
  const dir = tempDir('nanoclaw-wa-auth-');
  writeCreds(dir, {
    ...initAuthCreds(),
    me: { id: '4915100000001@s.whatsapp.net', name: '~' },
    pairingCode: 'RDXVVHVB',
    registered: false,
  });
  return dir;
}

/**
 * What WhatsApp's servers do once a linked device logs in, which the local server cannot:
 * the connection opens, then the offline backlog is done ("ib offline"), and baileys
 * releases the events it held back until then (baileys 7 Socket/socket.js buffers them
 * from the start for a linked device).
 */
export function openAsWhatsAppWould(sock: WASocket): void {
  sock.ev.emit('connection.update', { connection: 'open' });
  sock.ev.flush();
}

/**
 * A clock the test moves by hand: timers fire only when advance() passes their time, in
 * time order, and whatever they start (promises, callbacks) settles before the next one.
 */
export class FakeClock implements Clock {
  private time: number;
  /** How far the wall clock was set away from the monotonic one (jump()). */
  private offset = 0;
  private timers: { at: number; order: number; fn: () => void }[] = [];
  private created = 0;

  constructor(start = Date.parse('2026-12-01T09:00:00.000Z')) {
    this.time = start;
  }

  now(): number {
    return this.time + this.offset;
  }

  monotonic(): number {
    return this.time;
  }

  /** Sets the wall clock forward (or back, with a negative ms) without time passing: timers are not moved. */
  jump(ms: number): void {
    this.offset += ms;
  }

  after(ms: number, fn: () => void): () => void {
    const timer = { at: this.time + Math.max(0, ms), order: ++this.created, fn };
    this.timers.push(timer);
    return () => {
      this.timers = this.timers.filter((t) => t !== timer);
    };
  }

  /** Milliseconds from now of every pending timer, soonest first. */
  get pending(): number[] {
    return this.timers.map((t) => t.at - this.time).sort((a, b) => a - b);
  }

  async advance(ms: number): Promise<void> {
    const end = this.time + ms;
    await settle();
    for (;;) {
      this.timers.sort((a, b) => a.at - b.at || a.order - b.order);
      const next = this.timers[0];
      if (!next || next.at > end) break;
      this.timers.shift();
      this.time = next.at;
      next.fn();
      await settle();
    }
    this.time = end;
    await settle();
  }
}

/**
 * The system clock run `factor` times fast: a wait of `ms` fires after ms / factor, and now() and monotonic() move
 * as fast, so what the code measures agrees with what it waited. For production delays (WhatsApp's reconnect
 * backoff) against real sockets, where a FakeClock would hold everything else up.
 */
export function fastClock(factor: number): Clock {
  const wall = Date.now();
  const mono = performance.now();
  return {
    now: () => wall + (Date.now() - wall) * factor,
    monotonic: () => mono + (performance.now() - mono) * factor,
    after: (ms, fn) => systemClock.after(ms / factor, fn),
  };
}

/** Lets every promise and callback already started run to its next real wait. */
export async function settle(): Promise<void> {
  for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** Writes JSON as an agent's IPC file appears: whole at once (a dot-prefixed temp name, then renamed). */
export function writeJsonAtomic(path: string, data: unknown): void {
  mkdirSync(dirname(path), { recursive: true });
  const temp = join(dirname(path), `.${basename(path)}.${randomUUID()}.tmp`);
  writeFileSync(temp, JSON.stringify(data, null, 2));
  renameSync(temp, path);
}
