#!/usr/bin/env bun
/**
 * NanoClaw agent-runner: the container's entrypoint.
 *
 * Reads one JSON object on stdin (container/CONTRACT.md), writes Kimi Code CLI's files into
 * the group's ~/.kimi (its KIMI_CODE_HOME), starts `kimi acp`, resumes the group's session
 * (or starts one) and answers: each finished turn becomes one result between the markers
 * on stdout, saying which of the host's messages it answered. Then it waits for follow-ups
 * in /workspace/ipc/input/ — each the next turn, in order — until `_close` arrives. A warm
 * start (`"warm": true`) starts the CLI and its session with no prompt; the first follow-up
 * is the first prompt. Logs go to stderr.
 */
import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  watch,
  writeFileSync,
  type FSWatcher,
} from 'node:fs';
import { connect, createServer } from 'node:net';
import { homedir } from 'node:os';
import { join } from 'node:path';
import {
  buildConfigToml,
  buildMcpConfig,
  buildRole,
  buildSystemPrompt,
  KEY_ENV,
  keyFromEnvFile,
  type Memories,
  scheduledTaskPrompt,
  withMemoryUpdate,
} from './config.ts';
import { type Answers, type ErrorKind, errorText, KimiCli, PAUSE_GAP_MS, type Question } from './kimi.ts';
import type { HttpMcp } from './mcp-server.ts';

/** When this module began to load: the `start` timing mark. */
const MODULE_START = Date.now();

export const RESULT_START = '---NANOCLAW_RESULT_START---';
export const RESULT_END = '---NANOCLAW_RESULT_END---';

/** How long a start waits for the CLI to connect to the nanoclaw tools before it goes on without knowing. */
const MCP_CONNECT_WAIT_MS = 30_000;

/** Where the CLI finds the host's model proxy inside a container: the same port in every container (config.toml is shared). */
export const FORWARDER_PORT = 18_181;

interface RunnerInput {
  prompt: string;
  groupFolder: string;
  chatJid: string;
  isMain: boolean;
  sessionId?: string;
  isScheduledTask?: boolean;
  assistantName?: string;
  secrets?: { KIMI_API_KEY?: string };
  /** Start the session and the CLI now, with no prompt (`prompt` is ""): the first follow-up in the inbox is the first prompt. */
  warm?: boolean;
  /** The host's position of the newest message in `prompt`; the result that answers it says so. */
  upTo?: number;
}

interface RunnerResult {
  status: 'success' | 'error';
  result: string | null;
  /** What earlier steps of the turn said (e.g. "Let me check."), each its own message, in order, before `result`. */
  earlier?: string[];
  /** For errors: what kind, so the host can decide (a refused key and a bad request are not retried). */
  errorKind?: ErrorKind;
  sessionId?: string;
  error?: string;
  /** The newest message (the host's position) this turn answered: the prompt's and every follow-up's in it. */
  upTo?: number;
  /** This turn was a scheduled task handed to the container. */
  task?: true;
}

class InputError extends Error {}

/** Validates the stdin JSON; every problem names the field. */
export function parseInput(text: string): RunnerInput {
  if (!text.trim())
    throw new InputError('no input: pipe one JSON object into the container (see container/CONTRACT.md)');
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new InputError(`input is not JSON: ${errorText(err)}`);
  }
  if (typeof data !== 'object' || data === null || Array.isArray(data))
    throw new InputError('input must be a JSON object');
  const input = data as Record<string, unknown>;
  if (input.warm !== undefined && typeof input.warm !== 'boolean')
    throw new InputError('input field "warm" must be true or false');
  if (input.warm === true && input.prompt !== '') {
    throw new InputError(
      'input field "prompt" must be "" when "warm" is true: the first prompt of a warm start comes from the inbox',
    );
  }
  const required =
    input.warm === true ? (['groupFolder', 'chatJid'] as const) : (['prompt', 'groupFolder', 'chatJid'] as const);
  for (const key of required) {
    if (typeof input[key] !== 'string' || !(input[key] as string).trim())
      throw new InputError(`input field "${key}" must be a non-empty string`);
  }
  if (typeof input.isMain !== 'boolean') throw new InputError('input field "isMain" must be true or false');
  if (
    input.sessionId !== undefined &&
    (typeof input.sessionId !== 'string' || !/^[A-Za-z0-9_-]{1,128}$/.test(input.sessionId))
  ) {
    throw new InputError('input field "sessionId" must be letters, digits, - or _');
  }
  if (input.upTo !== undefined && !(Number.isInteger(input.upTo) && (input.upTo as number) >= 0))
    throw new InputError('input field "upTo" must be a whole number');
  return input as unknown as RunnerInput;
}

function formatResult(result: RunnerResult): string {
  return `${RESULT_START}\n${JSON.stringify(result)}\n${RESULT_END}\n`;
}

// ─── Questions: the agent asks the chat ─────────────────────────────────────────────

/** A question from the agent, as one WhatsApp message: numbered options, and how to answer. */
export function questionText(question: Question, index: number, total: number): string {
  const head = `❓ ${total > 1 ? `(${index + 1}/${total}) ` : ''}${question.header ? `*${question.header}*: ` : ''}${question.text}`;
  const options = question.options.map((label, i) => `${i + 1}. ${label}`);
  const how = question.multiSelect ? 'Reply with the numbers, e.g. 1, 3' : 'Reply with a number';
  return [head, ...options, `_${how}; anything else is read as a new message._`].join('\n');
}

/** The options a reply picks (by number or by label), or null when it is words of the person's own. */
export function answerFor(question: Question, reply: string): string[] | null {
  const text = reply.trim().replace(/\.$/, '');
  if (/^\d+(\s*[,;\s]\s*\d+)*$/.test(text)) {
    const picked = text
      .split(/[^\d]+/)
      .filter(Boolean)
      .map((n) => question.options[Number(n) - 1]);
    if (picked.length && picked.every((label) => label !== undefined))
      return question.multiSelect ? [...new Set(picked as string[])] : [picked[0]!];
    return null;
  }
  const byLabel = question.options.find((label) => label.toLowerCase() === text.toLowerCase());
  return byLabel ? [byLabel] : null;
}

const unescapeXml = (t: string) =>
  t
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&quot;/g, '"')
    .replace(/&amp;/g, '&');

/** The text of a follow-up as the host formats it (<messages><message …>text</message>…), or the follow-up itself. */
function followUpText(prompt: string): string {
  const messages = [...prompt.matchAll(/<message\b[^>]*>([\s\S]*?)<\/message>/g)].map((m) => unescapeXml(m[1]!).trim());
  return messages.length ? messages.join('\n') : prompt.trim();
}

// ─── The inbox: follow-ups, tasks and _close from the host ──────────────────────────

/**
 * setTimeout for the runner's waits, across `docker pause`: a paused process runs no timer,
 * and on unpause every timer that fell due meanwhile fires at once — before the inbox event
 * that the host's unpausing message raised. A timer that fires over PAUSE_GAP_MS late was
 * paused, so the wait starts over instead (the host that unpaused is alive). Returns the cancel.
 */
export function pauseAwareTimeout(ms: number, fire: () => void, now: () => number = Date.now): () => void {
  let timer: ReturnType<typeof setTimeout>;
  const arm = () => {
    const due = now() + ms;
    timer = setTimeout(() => (now() - due > PAUSE_GAP_MS ? arm() : fire()), ms);
  };
  arm();
  return () => clearTimeout(timer);
}

/** One input the host left in the inbox. */
export interface InboxItem {
  kind: 'message' | 'task';
  text: string;
  upTo?: number;
}

/** What the wait between turns ends with: the next turn's input, or the end. */
export type NextInput = { kind: 'turn'; item: InboxItem } | { kind: 'close' } | { kind: 'idle' };

interface InboxOptions {
  /** The safety poll's period, ms (NANOCLAW_INBOX_POLL_MS; default 1000). */
  pollMs?: number;
  /** Watch the folder for file events (default true; NANOCLAW_INBOX_WATCH=0 turns it off, leaving the poll alone). */
  watch?: boolean;
}

/** The inbox settings from the environment (for tests; the host sets neither). */
function inboxOptions(env: Record<string, string | undefined>): InboxOptions {
  const pollMs = Number(env.NANOCLAW_INBOX_POLL_MS);
  return { pollMs: pollMs > 0 ? pollMs : undefined, watch: env.NANOCLAW_INBOX_WATCH !== '0' };
}

/** Parses one inbox file's JSON, or says why it is not an input. */
export function parseInboxFile(json: string): InboxItem | string {
  let data: { type?: unknown; text?: unknown; upTo?: unknown };
  try {
    data = JSON.parse(json) as typeof data;
  } catch (err) {
    return errorText(err);
  }
  if ((data.type !== 'message' && data.type !== 'task') || typeof data.text !== 'string')
    return 'not {"type":"message"|"task","text":…}';
  const upTo = Number.isInteger(data.upTo) ? (data.upTo as number) : undefined;
  return { kind: data.type, text: data.text, ...(upTo !== undefined ? { upTo } : {}) };
}

/**
 * Joins what queued up into the next turn: the messages up to the next task (one prompt,
 * answered together), or that task alone. Tasks are never merged with messages.
 */
export function nextTurn(queue: InboxItem[]): InboxItem | null {
  const first = queue[0];
  if (!first) return null;
  if (first.kind === 'task') return queue.shift()!;
  const end = queue.findIndex((item) => item.kind === 'task');
  const messages = queue.splice(0, end < 0 ? queue.length : end);
  const upTos = messages.map((m) => m.upTo).filter((n): n is number => n !== undefined);
  return {
    kind: 'message',
    text: messages.map((m) => m.text).join('\n'),
    ...(upTos.length ? { upTo: Math.max(...upTos) } : {}),
  };
}

/**
 * Follow-ups, tasks and the close request, read from the run's inbox folder. Two ways in,
 * both ending in the same read of the folder: a watch reads it on every file event, so an
 * input is acted on as soon as it lands; and a slow safety poll (1 s) reads it anyway,
 * because file events on bind mounts are not delivered reliably by every Docker setup
 * (Docker Desktop among them). A missed event costs at most one poll period.
 */
export class Inbox {
  private readonly queued: InboxItem[] = [];
  private timer: ReturnType<typeof setInterval> | null = null;
  private watcher: FSWatcher | null = null;
  private readonly pollMs: number;
  private readonly watchFolder: boolean;
  closeRequested = false;
  private answerWaiter: ((item: InboxItem | null) => void) | null = null;
  /** Set while nextInput waits: called once something is queued or _close has come. */
  private wake: (() => void) | null = null;

  constructor(
    private readonly dir: string,
    options: InboxOptions = {},
    private readonly log: (message: string) => void = () => {},
  ) {
    this.pollMs = options.pollMs ?? 1000;
    this.watchFolder = options.watch ?? true;
  }

  /** Whether file events are being watched (else only the safety poll reads the folder). */
  get watching(): boolean {
    return this.watcher !== null;
  }

  start(): void {
    if (this.watchFolder) {
      try {
        const watcher = watch(this.dir, () => this.poll());
        watcher.on('error', (err) => {
          this.log(`stopped watching ${this.dir} (${errorText(err)}); reading it every ${this.pollMs} ms`);
          watcher.close();
          if (this.watcher === watcher) this.watcher = null;
        });
        this.watcher = watcher;
      } catch (err) {
        this.log(`cannot watch ${this.dir} (${errorText(err)}); reading it every ${this.pollMs} ms`);
      }
    }
    this.timer = setInterval(() => this.poll(), this.pollMs);
    this.poll(); // what came before the watch began
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.watcher?.close();
    this.watcher = null;
  }

  /** Picks up new files in name order; each is deleted once read. Called by the watch, the poll and the waits. */
  poll(): void {
    let files: string[];
    try {
      files = readdirSync(this.dir)
        .filter((f) => !f.startsWith('.'))
        .sort();
    } catch {
      return;
    }
    for (const file of files) {
      const path = join(this.dir, file);
      if (file === '_close') {
        rmSync(path, { force: true });
        this.closeRequested = true;
        this.answerWaiter?.(null);
        continue;
      }
      let parsed: InboxItem | string;
      try {
        parsed = parseInboxFile(readFileSync(path, 'utf8'));
      } catch (err) {
        parsed = errorText(err);
      }
      rmSync(path, { force: true });
      if (typeof parsed === 'string') {
        this.log(`ignoring ${file}: ${parsed}`);
        continue;
      }
      // A scheduled task is a turn of its own: never taken as an answer.
      if (parsed.kind === 'message' && this.answerWaiter) this.answerWaiter(parsed);
      else this.queued.push(parsed);
    }
    if (this.queued.length || this.closeRequested) this.wake?.();
  }

  /** The next message to arrive, taken as an answer; null after timeoutMs or on _close. */
  nextAnswer(timeoutMs: number): Promise<InboxItem | null> {
    this.poll();
    const waiting = this.queued.findIndex((item) => item.kind === 'message');
    if (waiting >= 0) return Promise.resolve(this.queued.splice(waiting, 1)[0]!);
    if (this.closeRequested) return Promise.resolve(null);
    return new Promise((resolve) => {
      const done = (item: InboxItem | null) => {
        cancel();
        this.answerWaiter = null;
        resolve(item);
      };
      const cancel = pauseAwareTimeout(timeoutMs, () => {
        this.poll(); // an answer that came just now is still an answer
        if (this.answerWaiter === done) done(null);
      });
      this.answerWaiter = done;
    });
  }

  /** Puts an input back at the front (a reply that answered no question is the next turn's). */
  requeue(item: InboxItem): void {
    this.queued.unshift(item);
    this.wake?.();
  }

  /**
   * The wait between turns, woken by the inbox itself (no sleeping): the next turn as soon
   * as there is one; `close` once `_close` came and nothing is queued; `idle` after timeoutMs.
   */
  async nextInput(timeoutMs: number): Promise<NextInput> {
    this.poll();
    let timedOut = false;
    if (this.queued.length === 0 && !this.closeRequested) {
      await new Promise<void>((resolve) => {
        const done = () => {
          cancel();
          this.wake = null;
          resolve();
        };
        const cancel = pauseAwareTimeout(timeoutMs, () => {
          timedOut = true;
          done();
        });
        this.wake = done;
      });
      this.poll(); // what landed as the wait ended is not missed
    }
    const item = nextTurn(this.queued);
    if (item) return { kind: 'turn', item };
    return timedOut ? { kind: 'idle' } : { kind: 'close' };
  }
}

// ─── Side effects: paths, the model's way out, the CLI's files ──────────────────────

function log(message: string): void {
  process.stderr.write(`[agent-runner] ${message}\n`);
}

/** Where things are; every path can be moved by the environment so tests run outside Docker. */
function runnerPaths(env: Record<string, string | undefined> = process.env) {
  const workspace = env.NANOCLAW_WORKSPACE ?? '/workspace';
  const kimiHome = join(env.HOME ?? homedir(), '.kimi');
  return {
    workspace,
    group: join(workspace, 'group'),
    global: join(workspace, 'global'),
    ipc: join(workspace, 'ipc'),
    input: join(workspace, 'ipc', 'input'),
    envFile: join(workspace, 'env-dir', 'env'),
    kimiHome,
    told: join(kimiHome, 'nanoclaw', 'memory-told'),
  };
}
type Paths = ReturnType<typeof runnerPaths>;

/**
 * Under the host the model, and the internet, are reached through the host's proxies: unix
 * sockets mounted into the container (the key never enters it; the host decides where the
 * agent may go). The CLI and the agent's tools speak HTTP to a URL, so a forwarder listens
 * on the container's loopback — there even with --network none — and passes each
 * connection to its socket byte for byte.
 */
async function startForwarder(socketPath: string, port: number): Promise<{ url: string; close(): void }> {
  const server = createServer((client) => {
    const upstream = connect(socketPath);
    const end = () => {
      client.destroy();
      upstream.destroy();
    };
    client.pipe(upstream);
    upstream.pipe(client);
    for (const side of [client, upstream]) {
      side.on('error', end);
      side.on('close', end);
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve());
  });
  const address = server.address();
  const bound = typeof address === 'object' && address ? address.port : port;
  // No path: the host's proxy puts the upstream's own (KIMI_BASE_URL, e.g. …/v1) in front of the CLI's.
  return { url: `http://127.0.0.1:${bound}`, close: () => server.close() };
}

/** Where the CLI sends model requests: the host's proxy when there is one, else KIMI_BASE_URL or the default. */
async function modelEndpoint(env: Record<string, string | undefined>): Promise<{ baseUrl?: string; close(): void }> {
  if (env.NANOCLAW_MODEL_SOCKET) {
    if (!existsSync(env.NANOCLAW_MODEL_SOCKET))
      throw new Error(`the model proxy socket ${env.NANOCLAW_MODEL_SOCKET} is missing`);
    const port = env.NANOCLAW_FORWARDER_PORT === undefined ? FORWARDER_PORT : Number(env.NANOCLAW_FORWARDER_PORT);
    const forwarder = await startForwarder(env.NANOCLAW_MODEL_SOCKET, port);
    return { baseUrl: forwarder.url, close: forwarder.close };
  }
  return { baseUrl: env.NANOCLAW_MODEL_URL || env.KIMI_BASE_URL, close: () => {} };
}

/** Where the agent's web requests go (the host's egress proxy refuses private and local addresses). */
export const EGRESS_PORT = 18_182;

/**
 * The agent's way to the internet when the container has no network of its own: an HTTP
 * proxy (CONNECT for https) on the container's loopback, forwarded to the host's egress
 * socket. Returns the environment that points the agent's tools at it (its shell's curl,
 * git and Bun, and Chromium through agent-browser), or none without a socket.
 */
async function egressProxy(
  env: Record<string, string | undefined>,
): Promise<{ env: Record<string, string>; close(): void }> {
  if (!env.NANOCLAW_EGRESS_SOCKET || !existsSync(env.NANOCLAW_EGRESS_SOCKET)) return { env: {}, close: () => {} };
  const port = env.NANOCLAW_FORWARDER_PORT === undefined ? EGRESS_PORT : 0;
  const forwarder = await startForwarder(env.NANOCLAW_EGRESS_SOCKET, port);
  const url = forwarder.url;
  return {
    env: {
      HTTP_PROXY: url,
      HTTPS_PROXY: url,
      http_proxy: url,
      https_proxy: url,
      // The model's forwarder is on loopback: never through the egress proxy.
      NO_PROXY: '127.0.0.1,localhost',
      no_proxy: '127.0.0.1,localhost',
      AGENT_BROWSER_ARGS: `${env.AGENT_BROWSER_ARGS ?? '--no-sandbox'} --proxy-server=${url}`,
    },
    close: forwarder.close,
  };
}

function readIfExists(path: string): string | null {
  return existsSync(path) ? readFileSync(path, 'utf8') : null;
}

/** The two memories as they are now: the shared one (not for main, which edits it) and the group's. */
function memories(input: RunnerInput, paths: Paths): Memories {
  return {
    globalMemory: input.isMain ? null : readIfExists(join(paths.global, 'CLAUDE.md')),
    groupMemory: readIfExists(join(paths.group, 'CLAUDE.md')),
  };
}

/** The model settings for config.toml: name, provider type and what the model can take in. */
function kimiModel(env: Record<string, string | undefined>) {
  const capabilities = env.KIMI_MODEL_CAPABILITIES?.split(',')
    .map((c) => c.trim())
    .filter(Boolean);
  return { modelName: env.KIMI_MODEL_NAME, providerType: env.KIMI_PROVIDER, capabilities };
}

/**
 * Writes the CLI's files into its home. None holds a credential: config.toml names the
 * variable the key is in (set on the CLI's process only), so a CLI of the group that
 * starts meanwhile in another container never reads this run's token.
 */
function writeKimiFiles(input: RunnerInput, paths: Paths, env: Record<string, string | undefined>, baseUrl?: string) {
  mkdirSync(paths.kimiHome, { recursive: true });
  writeFileSync(join(paths.kimiHome, 'config.toml'), buildConfigToml({ baseUrl, ...kimiModel(env) }), { mode: 0o600 });
  const timezone = env.TZ || Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
  const identity = {
    chatJid: input.chatJid,
    groupFolder: input.groupFolder,
    isMain: input.isMain,
    ipcDir: paths.ipc,
    timezone,
  };
  // The server as a process of its own (stdio), disabled: enabled, the CLI would start it
  // at its own start besides the one the runner serves its sessions over HTTP (main), and
  // wait for both. For `kimi` run by hand in a container to switch on.
  writeFileSync(
    join(paths.kimiHome, 'mcp.json'),
    buildMcpConfig(identity, join(import.meta.dir, 'mcp-server.ts'), process.execPath, false),
  );
  const role = buildRole({
    assistantName: input.assistantName || env.ASSISTANT_NAME || 'Andy',
    isMain: input.isMain,
    timezone,
  });
  const now = memories(input, paths);
  writeFileSync(join(paths.kimiHome, 'SYSTEM.md'), buildSystemPrompt(role, now));
  return { identity, memoriesNow: now };
}

/** The memories a session's model last read (its system prompt, or a later <memory-update>); null when unknown. */
function toldMemories(paths: Paths, sessionId: string): Memories | null {
  try {
    return JSON.parse(readFileSync(join(paths.told, `${sessionId}.json`), 'utf8')) as Memories;
  } catch {
    return null;
  }
}

function rememberTold(paths: Paths, sessionId: string, told: Memories): void {
  try {
    mkdirSync(paths.told, { recursive: true });
    writeFileSync(join(paths.told, `${sessionId}.json`), JSON.stringify(told));
  } catch (err) {
    log(`could not note which memory the session has read (${errorText(err)})`);
  }
}

/** The CLI's environment: the runner's, minus every KIMI_* override (config.toml is the one source), plus the key. */
function cliEnvironment(
  env: Record<string, string | undefined>,
  key: string | undefined,
  egress: Record<string, string>,
): Record<string, string> {
  const clean: Record<string, string> = {};
  for (const [name, value] of Object.entries(env))
    if (value !== undefined && !name.startsWith('KIMI_') && !name.startsWith('NANOCLAW_')) clean[name] = value;
  return { ...clean, ...egress, KIMI_CODE_NO_AUTO_UPDATE: '1', ...(key ? { [KEY_ENV]: key } : {}) };
}

/**
 * The benchmark marks: with NANOCLAW_TIMING=1, `[agent-runner] timing <phase> <epoch-ms>`
 * on stderr, each phase once (the first time it is reached); otherwise nothing.
 */
type TimingPhase = 'start' | 'input' | 'cli-up' | 'session' | 'mcp' | 'cli-ready' | 'prompt' | 'result';
type Mark = (phase: TimingPhase, at?: number) => void;

export function timingMarks(
  env: Record<string, string | undefined>,
  write: (line: string) => void = (line) => process.stderr.write(line),
): Mark {
  if (env.NANOCLAW_TIMING !== '1') return () => {};
  const seen = new Set<TimingPhase>();
  return (phase, at = Date.now()) => {
    if (seen.has(phase)) return;
    seen.add(phase);
    write(`[agent-runner] timing ${phase} ${at}\n`);
  };
}

async function readStdin(timeoutMs: number): Promise<string> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new InputError(`no input on stdin after ${timeoutMs / 1000} s`)), timeoutMs);
  });
  try {
    return await Promise.race([Bun.stdin.text(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Said in the chat when the runner had to start the conversation over. */
export const FRESH_SESSION_NOTE =
  '(Our conversation here had grown too long for me, so I started a fresh one: I still have my notes, but not what was said before.)';

// ─── main: one container run ────────────────────────────────────────────────────────

async function main(env: Record<string, string | undefined> = process.env): Promise<number> {
  const paths = runnerPaths(env);
  const mark = timingMarks(env);
  mark('start', MODULE_START);
  const writeResult = (result: RunnerResult) => {
    process.stdout.write(formatResult(result));
    mark('result');
  };
  // The host creates ipc/input/ before it starts a container it will talk to; without it
  // (e.g. the guide's manual test) the runner answers once and exits.
  const takesFollowUps = existsSync(paths.input);
  let input: RunnerInput;
  let endpoint: Awaited<ReturnType<typeof modelEndpoint>>;
  let egress: Awaited<ReturnType<typeof egressProxy>>;
  try {
    input = parseInput(await readStdin(Number(env.NANOCLAW_STDIN_TIMEOUT_MS ?? 60_000)));
    if (input.warm && !takesFollowUps)
      throw new InputError(
        `a warm start ("warm": true) needs the inbox ${paths.input}: its first message is the first prompt`,
      );
    mark('input');
    endpoint = await modelEndpoint(env);
    egress = await egressProxy(env);
  } catch (err) {
    writeResult({ status: 'error', result: null, error: errorText(err), errorKind: 'other' });
    return 1;
  }
  const key = input.secrets?.KIMI_API_KEY ?? env.KIMI_API_KEY ?? keyFromEnvFile(readIfExists(paths.envFile) ?? '');
  const { identity, memoriesNow } = writeKimiFiles(input, paths, env, endpoint.baseUrl);
  /** The nanoclaw tools' module: loaded while the CLI starts (below), not before it. */
  let tools: typeof import('./mcp-server.ts');

  const inbox = new Inbox(paths.input, inboxOptions(env), log);
  const canAsk = takesFollowUps && !input.isScheduledTask;
  const questionTimeoutMs = Number(env.NANOCLAW_QUESTION_TIMEOUT_MS) || 10 * 60_000;
  /** Follow-ups taken as answers during the current turn: it answered them too. */
  let answeredUpTo: number | undefined;
  const ask = async (questions: Question[]): Promise<Answers> => {
    const answers: Answers = [];
    for (const [i, question] of questions.entries()) {
      if (!canAsk || !existsSync(paths.ipc)) {
        answers.push(null);
        continue;
      }
      // expectsReply: in a group that needs the trigger, the answer comes without one.
      const asked = tools.writeIpcFile(join(paths.ipc, 'messages'), {
        type: 'message',
        chatJid: input.chatJid,
        text: questionText(question, i, questions.length),
        expectsReply: true,
      });
      void tools.awaitDecision(paths.ipc, asked, 60_000); // the host's receipt is of no use here: picked up so it does not linger
      const reply = await inbox.nextAnswer(questionTimeoutMs);
      const picked = reply ? answerFor(question, followUpText(reply.text)) : null;
      if (reply && !picked) {
        // Words of the person's own: the question goes unanswered and the words are the next turn.
        inbox.requeue(reply);
        answers.push(null);
        for (let rest = i + 1; rest < questions.length; rest++) answers.push(null);
        break;
      }
      if (reply?.upTo !== undefined) answeredUpTo = Math.max(answeredUpTo ?? 0, reply.upTo);
      answers.push(picked);
    }
    log(`questions answered: ${JSON.stringify(answers)}`);
    return answers;
  };

  let cli: KimiCli;
  let mcp: HttpMcp | undefined;
  try {
    // The CLI is spawned first: its start is the longest step, and what the runner still
    // has to load (the ACP and MCP SDKs) loads meanwhile, on the other core.
    const starting = KimiCli.start({
      command: (env.KIMI_EXECUTABLE || 'kimi').split(' '),
      home: paths.kimiHome,
      workDir: paths.group,
      env: cliEnvironment(env, key, egress.env),
      // The nanoclaw tools, served from this process: the CLI connects over loopback HTTP
      // instead of starting a Bun process of its own for them (known by the time the
      // session opens, which is when the CLI gets this list).
      mcpServers: () => [{ name: 'nanoclaw', type: 'http', url: mcp!.url, headers: mcp!.headers }],
      ask,
      log,
      onStderr: (line) => {
        if (line.trim()) process.stderr.write(`[kimi] ${line}\n`);
      },
      silenceLimitMs: Number(env.NANOCLAW_TURN_SILENCE_MS) || undefined,
    });
    // Caught by starting's own failure below if the CLI cannot start.
    starting.catch(() => {});
    tools = await import('./mcp-server.ts');
    mcp = tools.serveHttp(identity);
    cli = await starting;
  } catch (err) {
    writeResult({ status: 'error', result: null, error: errorText(err), errorKind: 'other' });
    mcp?.close();
    endpoint.close();
    egress.close();
    return 1;
  }
  mark('cli-up');
  const openSession = async (sessionId?: string) => {
    const resumed = await cli.openSession(sessionId);
    process.stderr.write(`Session initialized: ${cli.sessionId}\n`);
    // A session begun now read today's memory in its system prompt.
    if (!resumed) rememberTold(paths, cli.sessionId, memoriesNow);
  };
  try {
    await openSession(input.sessionId);
  } catch (err) {
    // -32000: no key the CLI could use (run by hand without one): the guide's "LLM is not set".
    const noKey = (err as { code?: unknown }).code === -32000;
    writeResult({
      status: 'error',
      result: null,
      error: `could not open the session: ${errorText(err)}${noKey ? ' (no KIMI_API_KEY reached the CLI)' : ''}`,
      errorKind: noKey ? 'auth' : 'other',
    });
    await cli.close();
    mcp.close();
    endpoint.close();
    egress.close();
    return 1;
  }
  mark('session');
  // Ready means ready: the CLI connects its MCP servers after the session opened, and a
  // prompt waits for them; so the first prompt is not accepted before the tools are listed.
  const connected = await Promise.race([mcp.listed.then(() => true), Bun.sleep(MCP_CONNECT_WAIT_MS).then(() => false)]);
  if (connected) mark('mcp');
  else log(`the CLI has not connected to the nanoclaw tools after ${MCP_CONNECT_WAIT_MS / 1000} s; going on`);
  mark('cli-ready');
  log(
    `ready: CLI up, session ${cli.sessionId} open${connected ? ', tools connected' : ''}, ${Date.now() - MODULE_START} ms after start`,
  );

  let exitCode = 0;
  const finish = async () => {
    inbox.stop();
    await cli.close();
    mcp.close();
    endpoint.close();
    egress.close();
  };
  const onSignal = () => void finish().then(() => process.exit(143));
  process.once('SIGTERM', onSignal);
  process.once('SIGINT', onSignal);

  if (takesFollowUps) inbox.start();
  const idleLimitMs = Number(env.NANOCLAW_RUNNER_IDLE_MS ?? 30 * 60_000);
  let next: InboxItem | null;
  if (input.warm) {
    // A warm start: no prompt yet and no result; the first message is the first turn.
    const first = await inbox.nextInput(idleLimitMs);
    if (first.kind === 'idle') log(`no message for ${Math.round(idleLimitMs / 1000)} s after a warm start; closing`);
    else if (first.kind === 'close') log('closed before the first message of a warm start');
    next = first.kind === 'turn' ? first.item : null;
  } else {
    next = {
      kind: input.isScheduledTask ? 'task' : 'message',
      text: input.prompt,
      ...(input.upTo !== undefined ? { upTo: input.upTo } : {}),
    };
  }
  while (next) {
    mark('prompt');
    answeredUpTo = undefined;
    const result = await runTurn(cli, next, { paths, input, openSession });
    const upTos = [next.upTo, answeredUpTo].filter((n): n is number => n !== undefined);
    writeResult({
      ...result,
      ...(upTos.length ? { upTo: Math.max(...upTos) } : {}),
      ...(next.kind === 'task' && takesFollowUps ? { task: true as const } : {}),
    });
    if (result.status === 'error') {
      log(`turn failed (${result.errorKind}): ${result.error}`);
      exitCode = 1;
      break;
    }
    if (!takesFollowUps) break;
    // Wait for the next input; a close request (or a host gone quiet for too long) ends
    // the session once nothing is queued.
    const waited = await inbox.nextInput(idleLimitMs);
    if (waited.kind === 'idle') log(`no follow-up for ${Math.round(idleLimitMs / 1000)} s; closing`);
    next = waited.kind === 'turn' ? waited.item : null;
  }
  await finish();
  return exitCode;
}

/**
 * One turn: the input in (a task with its note, the memory that changed since the model
 * last read it), the answer out. A conversation that outgrew the model goes on in a fresh
 * session, once, and says so.
 */
async function runTurn(
  cli: KimiCli,
  item: InboxItem,
  run: { paths: Paths; input: RunnerInput; openSession(sessionId?: string): Promise<void> },
): Promise<RunnerResult> {
  const { paths, input } = run;
  const base = item.kind === 'task' ? scheduledTaskPrompt(item.text) : item.text;
  const now = memories(input, paths);
  const told = toldMemories(paths, cli.sessionId) ?? {};
  const prompt = withMemoryUpdate(base, told, now);
  if (prompt !== base) rememberTold(paths, cli.sessionId, now);
  let outcome = await cli.prompt(prompt);
  let earlierNote: string[] = [];
  if (outcome.error?.kind === 'context') {
    log(`the session's context is full (${outcome.error.message}); starting a fresh session`);
    await run.openSession();
    outcome = await cli.prompt(base);
    earlierNote = [FRESH_SESSION_NOTE];
  }
  if (outcome.error)
    return {
      status: 'error',
      result: null,
      error: outcome.error.message,
      errorKind: outcome.error.kind,
      sessionId: cli.sessionId,
    };
  const said = [...earlierNote, ...outcome.said];
  const result = said.pop() ?? null;
  return { status: 'success', result, ...(said.length ? { earlier: said } : {}), sessionId: cli.sessionId };
}

if (import.meta.main) {
  process.exit(await main());
}
