/** Shared set-up for host tests: temp projects, the fake docker, a recording channel. */
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { initAuthCreds } from '@whiskeysockets/baileys';
import { loadConfig, WhatsAppChannel, type Channel, type ChannelHandlers, type Config, type NewMessage } from '../nanoclaw.ts';

export function tempDir(prefix = 'nanoclaw-test-'): string {
  return mkdtempSync(join(tmpdir(), prefix));
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
  set(flag: 'engine-down' | 'no-image' | 'no-kimi', on?: boolean): void;
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
    return readFileSync(file, 'utf8').trim().split('\n').filter(Boolean).map((line) => JSON.parse(line) as FakeDockerCall);
  };
  return {
    dir,
    path,
    calls,
    runs: () => calls().filter((call) => call.command === 'run'),
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
  return loadConfig(root, { TZ: 'UTC', LOG_LEVEL: 'info', NANOCLAW_MOUNT_ALLOWLIST: join(root, 'no-allowlist.json'), KIMI_BASE_URL: NO_MODEL_URL, ...env });
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

  async disconnect(): Promise<void> {
    this.handlers = null;
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
      isFromMe: false,
      isBotMessage: false,
      ...extra,
    };
    this.handlers!.onMessage(message, { name: `chat ${chatJid}`, isGroup: chatJid.endsWith('@g.us') });
    return message;
  }
}

/** Polls until `check` returns a truthy value (or fails after timeoutMs). */
export async function waitFor<T>(check: () => T | undefined | null | false, timeoutMs = 10_000, what = 'condition'): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(20);
  }
}

/** A WhatsApp channel whose last step (the send to WhatsApp's servers) is recorded instead. */
export class RecordingWhatsApp extends WhatsAppChannel {
  readonly delivered: { jid: string; text: string; messageId: string }[] = [];
  protected override async send(jid: string, text: string, messageId: string): Promise<void> {
    if (!this.isConnected) throw new Error('offline');
    this.delivered.push({ jid, text, messageId });
  }
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
  return { url: `ws://127.0.0.1:${server.port}/ws/chat`, connectedAt, get maxOpen() { return maxOpen; }, stop: () => server.stop(true) };
}

export async function linkedAuthDir(): Promise<string> {
  const dir = tempDir('nanoclaw-wa-auth-');
  writeFileSync(join(dir, 'creds.json'), JSON.stringify(initAuthCreds(), (_, value) => (value?.type === 'Buffer' ? { type: 'Buffer', data: Buffer.from(value.data).toString('base64') } : value)));
  return dir;
}

