#!/usr/bin/env bun
/**
 * NanoClaw agent-runner: the container's entrypoint.
 *
 * Reads one JSON object on stdin (container/CONTRACT.md), writes the Kimi CLI's
 * configuration, opens (or resumes) the group's Kimi session through the Kimi Agent SDK,
 * and answers: each finished turn becomes one result between the markers on stdout.
 * Then it waits for follow-ups in /workspace/ipc/input/ — steering them into a running
 * turn, or starting the next turn — until `_close` arrives. A warm start (`"warm": true`)
 * opens the session and starts the CLI with no prompt; the first follow-up is the first
 * prompt. Logs go to stderr.
 */
import { createSession, type QuestionItem, type Session, type Turn } from '@moonshot-ai/kimi-agent-sdk';
import { createHash, randomUUID } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  watch,
  writeFileSync,
  type FSWatcher,
} from 'node:fs';
import { createServer, connect, type AddressInfo } from 'node:net';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { writeIpcFile } from './mcp-server.ts';
import {
  buildAgentFile,
  buildConfigToml,
  buildMcpConfig,
  buildRole,
  keyFromEnvFile,
  MODEL_ALIAS,
  scheduledTaskPrompt,
} from './config.ts';

/** When this module began to load: the `start` timing mark. */
const MODULE_START = Date.now();

export const RESULT_START = '---NANOCLAW_RESULT_START---';
export const RESULT_END = '---NANOCLAW_RESULT_END---';

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
}

interface RunnerResult {
  status: 'success' | 'error';
  result: string | null;
  /** What earlier steps of the turn said (e.g. "Let me check."), each its own message, in order, before `result`. */
  earlier?: string[];
  /** For errors: what kind, so the host can decide (a refused key is not retried). */
  errorKind?: ErrorKind;
  sessionId?: string;
  error?: string;
}

class InputError extends Error {}

type ErrorKind = 'auth' | 'rate-limit' | 'unavailable' | 'context' | 'other';

/**
 * What kind of failure a CLI error is, from the messages kimi-cli 1.49.0 sends: provider
 * errors carry openai-python's "Error code: <status> - …", OAuth 401s are -32004, a full
 * context is a 400 saying so (Moonshot: "exceeded model token limit").
 */
export function errorKind(message: string): ErrorKind {
  if (/exceeded model token limit|context[ _-]length|context window|maximum context|too many tokens/i.test(message))
    return 'context';
  if (
    /Error code: (401|403)\b|Authentication failed|invalid_authentication|Invalid Authentication|NanoClaw has no KIMI_API_KEY/i.test(
      message,
    )
  )
    return 'auth';
  if (/Error code: 429\b/.test(message)) return 'rate-limit';
  if (/Error code: 5\d\d\b|Connection error|Request timed out|could not reach|empty response/i.test(message))
    return 'unavailable';
  return 'other';
}

/** A question from the agent, as one WhatsApp message: numbered options, and how to answer. */
export function questionText(question: QuestionItem, index: number, total: number): string {
  const head = `❓ ${total > 1 ? `(${index + 1}/${total}) ` : ''}${question.header ? `*${question.header}*: ` : ''}${question.question}`;
  const options = question.options.map((o, i) => `${i + 1}. ${o.label}${o.description ? ` — ${o.description}` : ''}`);
  const how = question.multi_select
    ? 'Reply with the numbers (e.g. 1, 3), or in your own words.'
    : 'Reply with a number, or in your own words.';
  return [head, ...options, `_${how}_`].join('\n');
}

/** The answer a chat reply gives to a question: option numbers or a label become labels; anything else is the user's own answer. */
export function answerFor(question: QuestionItem, reply: string): string {
  const text = reply.trim();
  const numbers = /^\d+(\s*[,;\s]\s*\d+)*\.?$/.test(text)
    ? text
        .split(/[^\d]+/)
        .filter(Boolean)
        .map(Number)
    : [];
  const chosen = numbers.map((n) => question.options[n - 1]?.label).filter((label): label is string => Boolean(label));
  if (chosen.length && chosen.length === numbers.length) return question.multi_select ? chosen.join(', ') : chosen[0]!;
  const byLabel = question.options.find((o) => o.label.toLowerCase() === text.toLowerCase());
  return byLabel?.label ?? text;
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

/** The CLI's record of a session's history: <share>/sessions/<md5 of the work dir>/<id>/context.jsonl. */
export function sessionContextFile(kimiHome: string, workDir: string, sessionId: string): string {
  return join(kimiHome, 'sessions', createHash('md5').update(workDir).digest('hex'), sessionId, 'context.jsonl');
}

/**
 * The CLI keeps the system prompt a session began with (context.jsonl's `_system_prompt`)
 * and reuses it on every resume, so memory edited since then would never reach the model.
 * When the stored prompt lacks the current role (which holds the memories), its record is
 * removed: the CLI then treats the session as one without a prompt and writes the fresh
 * one first (soul/context.py write_system_prompt). True when it was refreshed.
 */
export function refreshSystemPrompt(contextFile: string, role: string): boolean {
  if (!existsSync(contextFile)) return false;
  const lines = readFileSync(contextFile, 'utf8').split('\n').filter(Boolean);
  const isPrompt = (line: string) => {
    try {
      return (JSON.parse(line) as { role?: string }).role === '_system_prompt';
    } catch {
      return false;
    }
  };
  const stored = lines.filter(isPrompt).at(-1);
  if (!stored || (JSON.parse(stored) as { content?: string }).content?.includes(role)) return false;
  writeFileSync(
    `${contextFile}.refresh`,
    lines
      .filter((line) => !isPrompt(line))
      .map((line) => `${line}\n`)
      .join(''),
  );
  renameSync(`${contextFile}.refresh`, contextFile);
  return true;
}

/** Validates the stdin JSON; every problem names the field. */
export function parseInput(text: string): RunnerInput {
  if (!text.trim())
    throw new InputError('no input: pipe one JSON object into the container (see container/CONTRACT.md)');
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new InputError(`input is not JSON: ${err instanceof Error ? err.message : err}`);
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
  return input as unknown as RunnerInput;
}

function formatResult(result: RunnerResult): string {
  return `${RESULT_START}\n${JSON.stringify(result)}\n${RESULT_END}\n`;
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
    configToml: join(kimiHome, 'config.toml'),
    mcpJson: join(kimiHome, 'mcp.json'),
  };
}

/**
 * Under the host the model is reached through the host's proxy, a unix socket mounted at
 * NANOCLAW_MODEL_SOCKET (the key never enters the container). The Kimi CLI speaks HTTP to
 * a base URL, so this forwarder listens on the container's loopback — there even with
 * --network none — and passes each connection to the socket byte for byte.
 */
async function startModelForwarder(socketPath: string): Promise<{ url: string; close(): void }> {
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
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}`, close: () => server.close() };
}

/** Where the CLI sends model requests: the host's proxy when there is one, else KIMI_BASE_URL or the default. */
async function modelEndpoint(env: Record<string, string | undefined>): Promise<{ baseUrl?: string; close(): void }> {
  if (env.NANOCLAW_MODEL_SOCKET) {
    if (!existsSync(env.NANOCLAW_MODEL_SOCKET))
      throw new Error(`the model proxy socket ${env.NANOCLAW_MODEL_SOCKET} is missing`);
    const forwarder = await startModelForwarder(env.NANOCLAW_MODEL_SOCKET);
    return { baseUrl: forwarder.url, close: forwarder.close };
  }
  return { baseUrl: env.NANOCLAW_MODEL_URL || env.KIMI_BASE_URL, close: () => {} };
}

function readIfExists(path: string): string | null {
  return existsSync(path) ? readFileSync(path, 'utf8') : null;
}

function log(message: string): void {
  process.stderr.write(`[agent-runner] ${message}\n`);
}

/**
 * The benchmark marks: with NANOCLAW_TIMING=1, `[agent-runner] timing <phase> <epoch-ms>`
 * on stderr, each phase once (the first time it is reached); otherwise nothing.
 */
type TimingPhase = 'start' | 'input' | 'cli-ready' | 'prompt' | 'first-event' | 'result';
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

/** What the wait between turns ends with. */
type NextInput = { kind: 'message'; text: string } | { kind: 'close' } | { kind: 'idle' };

/**
 * Follow-up messages and the close request, read from the IPC input folder. Two ways in,
 * both ending in the same read of the folder: a watch (fs.watch) reads it on every file
 * event, so a message or `_close` is acted on as soon as it lands; and a slow safety poll
 * (1 s) reads it anyway, because file events on bind mounts are not delivered reliably by
 * every Docker setup (Docker Desktop on macOS among them: a file the host writes may raise
 * no event in the container). A missed event thus costs at most one poll period, never a
 * stalled conversation; where the folder cannot be watched at all, the poll alone serves.
 */
export class Inbox {
  private readonly queued: string[] = [];
  private timer: ReturnType<typeof setInterval> | null = null;
  private watcher: FSWatcher | null = null;
  private readonly pollMs: number;
  private readonly watchFolder: boolean;
  closeRequested = false;
  /** Set while a turn runs: follow-ups go straight into it. */
  onMessage: ((text: string) => void) | null = null;
  private answerWaiter: ((text: string | null) => void) | null = null;
  /** Set while nextInput waits: called once a message is queued or _close has come. */
  private wake: (() => void) | null = null;

  constructor(
    private readonly dir: string,
    options: InboxOptions = {},
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
          log(
            `stopped watching ${this.dir} (${err instanceof Error ? err.message : err}); reading it every ${this.pollMs} ms`,
          );
          watcher.close();
          if (this.watcher === watcher) this.watcher = null;
        });
        this.watcher = watcher;
      } catch (err) {
        log(
          `cannot watch ${this.dir} (${err instanceof Error ? err.message : err}); reading it every ${this.pollMs} ms`,
        );
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
      let text: string | null = null;
      let task: string | null = null;
      try {
        const data = JSON.parse(readFileSync(path, 'utf8')) as { type?: string; text?: unknown };
        if (data.type === 'message' && typeof data.text === 'string') text = data.text;
        else if (data.type === 'task' && typeof data.text === 'string') task = data.text;
        else log(`ignoring ${file}: not {"type":"message"|"task","text":…}`);
      } catch (err) {
        log(`ignoring ${file}: ${err instanceof Error ? err.message : err}`);
      }
      rmSync(path, { force: true });
      // A scheduled task is a turn of its own: never steered into a turn, never taken as an answer.
      if (task !== null) this.queued.push(scheduledTaskPrompt(task));
      if (text === null) continue;
      if (this.answerWaiter) this.answerWaiter(text);
      else if (this.onMessage) this.onMessage(text);
      else this.queued.push(text);
    }
    if (this.queued.length || this.closeRequested) this.wake?.();
  }

  /** The next message to arrive, taken as an answer (not steered); null after timeoutMs or on _close. */
  nextAnswer(timeoutMs: number): Promise<string | null> {
    return new Promise((resolve) => {
      const done = (text: string | null) => {
        clearTimeout(timer);
        this.answerWaiter = null;
        resolve(text);
      };
      const timer = setTimeout(() => done(null), timeoutMs);
      this.answerWaiter = done;
    });
  }

  /**
   * The wait between turns, woken by the inbox itself (no sleeping): everything queued,
   * joined as one prompt, as soon as there is something; `close` once `_close` came and
   * nothing is queued; `idle` after timeoutMs with neither.
   */
  async nextInput(timeoutMs: number): Promise<NextInput> {
    this.poll();
    let timedOut = false;
    if (this.queued.length === 0 && !this.closeRequested) {
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(timer);
          this.wake = null;
          resolve();
        };
        const timer = setTimeout(() => {
          timedOut = true;
          done();
        }, timeoutMs);
        this.wake = done;
      });
    }
    const text = this.takeQueued();
    if (text !== null) return { kind: 'message', text };
    return timedOut ? { kind: 'idle' } : { kind: 'close' };
  }

  /** Everything that arrived between turns, as one next prompt. */
  takeQueued(): string | null {
    if (this.queued.length === 0) return null;
    return this.queued.splice(0).join('\n');
  }

  requeue(text: string): void {
    this.queued.push(text);
    this.wake?.();
  }
}

/**
 * Starts the session's CLI now — spawn, then the wire `initialize` — instead of at the
 * first prompt; the CLI then also connects its MCP servers, which kimi-cli does as it
 * starts (in the background; its first turn waits for them). @moonshot-ai/kimi-agent-sdk
 * 0.1.8 has no public way to do this: its SessionImpl starts the ProtocolClient lazily in
 * the internal getClientWithConfigCheck() when a turn first needs it, and every later turn
 * reuses that client while the session's settings stay as they are. Calling the method
 * early does exactly what the first prompt would. Where it is missing (another SDK
 * version) nothing happens and the first prompt starts the CLI, as before. Resolves true
 * once the CLI has answered initialize, false when it was not started here.
 *
 * Await it before the session's first prompt: a turn that begins while it runs finds a
 * client without settings yet, takes that for a change of settings and starts another CLI.
 */
export async function startCli(session: Session): Promise<boolean> {
  // SessionImpl's internal method (not in the SDK's types), looked up at run time.
  const start = (session as Session & { getClientWithConfigCheck?: unknown }).getClientWithConfigCheck;
  if (typeof start !== 'function') return false;
  await (start as (this: Session) => Promise<unknown>).call(session);
  return true;
}

/** How the agent reaches the people in the chat mid-turn: for its questions. */
interface ChatLine {
  /** Sends a message to the chat now (an IPC message the host delivers), or false when there is no chat to send to. */
  say(text: string): boolean;
  /** Whether follow-ups can arrive (not in a scheduled task's container, not run by hand). */
  canHear: boolean;
  questionTimeoutMs: number;
}

/**
 * A question the agent asks (the CLI's AskUserQuestion sends a QuestionRequest and waits
 * for the answer forever): each question goes to the chat with numbered options and the
 * next message is its answer. With nobody to ask, or no answer in time, the agent is told
 * so and decides itself.
 */
async function answerQuestions(
  turn: Turn,
  request: { id: string; questions: QuestionItem[] },
  inbox: Inbox,
  chat: ChatLine,
): Promise<void> {
  const answers: Record<string, string> = {};
  const minutes = Math.round(chat.questionTimeoutMs / 60_000);
  for (const [i, question] of request.questions.entries()) {
    if (!chat.canHear || !chat.say(questionText(question, i, request.questions.length))) {
      answers[question.question] =
        '(Nobody can answer here: this run takes no replies. Decide yourself, and say what you chose.)';
      continue;
    }
    const reply = await inbox.nextAnswer(chat.questionTimeoutMs);
    answers[question.question] =
      reply === null
        ? `(No answer came within ${minutes} minute${minutes === 1 ? '' : 's'}. Decide yourself, and say what you chose.)`
        : answerFor(question, followUpText(reply));
  }
  log(`answered question ${request.id}: ${JSON.stringify(answers)}`);
  await turn.respondQuestion(request.id, request.id, answers);
}

/**
 * One turn: the prompt in, the answer out; steered follow-ups join the same turn. Each
 * step's text is its own message, never glued to the next ("Let me check.Here is…"), and
 * none is dropped (a message steered in mid-turn is answered in a later step): `result`
 * is the last step's, `earlier` the others'. They come together, at the end of the turn,
 * so the host records them in one go with what they answered. What the CLI asks mid-turn
 * is answered: questions through the chat, approvals by policy (the runner is yolo).
 */
async function runTurn(
  session: Session,
  prompt: string,
  inbox: Inbox,
  chat: ChatLine = { say: () => false, canHear: false, questionTimeoutMs: 0 },
  mark: Mark = () => {},
): Promise<RunnerResult> {
  mark('prompt');
  const turn = session.prompt(prompt);
  inbox.onMessage = (text) => {
    turn.steer(text).catch((err) => {
      log(`steering failed (${err instanceof Error ? err.message : err}); the message goes into the next turn`);
      inbox.requeue(text);
    });
  };
  const steps: string[] = [''];
  const answering: Promise<void>[] = [];
  try {
    for await (const event of turn) {
      mark('first-event');
      if (event.type === 'StepBegin') steps.push('');
      else if (event.type === 'ContentPart' && event.payload.type === 'text')
        steps[steps.length - 1] += event.payload.text;
      else if (event.type === 'QuestionRequest') {
        answering.push(
          answerQuestions(turn, event.payload, inbox, chat).catch((err) =>
            log(`could not answer question: ${err instanceof Error ? err.message : err}`),
          ),
        );
      } else if (event.type === 'ApprovalRequest') {
        // Unreachable under --yolo with 1.49.0; a newer CLI or a subagent might still ask.
        log(
          `approved "${event.payload.action}" (${event.payload.description}): NanoClaw runs the agent with every action approved`,
        );
        void turn
          .approve(event.payload.id, 'approve')
          .catch((err) => log(`approval failed: ${err instanceof Error ? err.message : err}`));
      } else if (event.type === 'error') {
        // kimi-cli announces MCP start-up it is still waiting for (MCPLoadingBegin/End): nothing to act on.
        if (!/^Unknown event type: MCPLoading(Begin|End)$/.test(event.message))
          log(`the CLI sent something this SDK does not know (${event.code}): ${event.message}`);
      }
    }
    await Promise.all(answering);
    const outcome = await turn.result;
    if (outcome && outcome.status !== 'finished') log(`turn ended: ${outcome.status}`);
    const said = steps.map((text) => text.trim()).filter(Boolean);
    const result = said.pop() ?? null;
    return { status: 'success', result, ...(said.length ? { earlier: said } : {}), sessionId: session.sessionId };
  } catch (err) {
    const error = err instanceof Error ? err.message : String(err);
    return { status: 'error', result: null, sessionId: session.sessionId, error, errorKind: errorKind(error) };
  } finally {
    inbox.onMessage = null;
  }
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

/** A shell word that stays one word whatever it holds. */
const shellQuote = (word: string) => `'${word.replaceAll("'", `'\\''`)}'`;

/**
 * The CLI this run starts: `kimi --config-file <this run's own config>` (a wrapper in the
 * container's private /tmp, since the SDK takes no extra arguments). ~/.kimi is the group's,
 * shared by every container of the group (a chat's and an isolated task's may run at once):
 * a CLI reading ~/.kimi/config.toml could start with another run's token.
 */
export function cliWithOwnConfig(executable: string, configFile: string, dir = tmpdir()): string {
  const wrapper = join(dir, `nanoclaw-kimi-${process.pid}`);
  writeFileSync(wrapper, `#!/bin/sh\nexec ${shellQuote(executable)} --config-file ${shellQuote(configFile)} "$@"\n`, {
    mode: 0o700,
  });
  return wrapper;
}

/**
 * Writes the Kimi CLI's files. Under the host, config.toml holds the run's proxy token (it
 * dies with the container), never the key; run by hand (the guide's manual test) it holds
 * the key given on stdin, and only until the runner exits. The CLI itself reads this run's
 * own copy (`ownConfig`, in /tmp), never another run's.
 */
function writeKimiFiles(
  input: RunnerInput,
  paths: ReturnType<typeof runnerPaths>,
  env: Record<string, string | undefined>,
  baseUrl?: string,
): { agentFile: string; role: string; ownConfig: string; memories: ReturnType<typeof memories> } {
  mkdirSync(paths.kimiHome, { recursive: true });
  const apiKey = input.secrets?.KIMI_API_KEY ?? keyFromEnvFile(readIfExists(paths.envFile) ?? '');
  const config = buildConfigToml({ apiKey, baseUrl, ...kimiModel(env) });
  writeFileSync(paths.configToml, config, { mode: 0o600 });
  chmodSync(paths.configToml, 0o600);
  const ownConfig = join(tmpdir(), `nanoclaw-config-${process.pid}.toml`);
  writeFileSync(ownConfig, config, { mode: 0o600 });
  const timezone = env.TZ || Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
  const identity = {
    chatJid: input.chatJid,
    groupFolder: input.groupFolder,
    isMain: input.isMain,
    ipcDir: paths.ipc,
    timezone,
  };
  writeFileSync(paths.mcpJson, buildMcpConfig(identity, join(import.meta.dir, 'mcp-server.ts'), process.execPath));
  const memoriesNow = memories(input, paths);
  const role = buildRole({
    assistantName: input.assistantName || env.ASSISTANT_NAME || 'Andy',
    isMain: input.isMain,
    timezone,
    ...memoriesNow,
  });
  const agentFile = join(tmpdir(), `nanoclaw-agent-${process.pid}.yaml`);
  writeFileSync(agentFile, buildAgentFile(role));
  return { agentFile, role, ownConfig, memories: memoriesNow };
}

/** The model settings for config.toml: name, provider type and what the model can take in. */
function kimiModel(env: Record<string, string | undefined>) {
  const modelName = env.KIMI_MODEL_NAME;
  const capabilities =
    env.KIMI_MODEL_CAPABILITIES !== undefined
      ? env.KIMI_MODEL_CAPABILITIES.split(',')
          .map((c) => c.trim())
          .filter(Boolean)
      : undefined;
  return { modelName, providerType: env.KIMI_PROVIDER, capabilities };
}

/** The two memories as they are now: the shared one (not for main, which edits it) and the group's. */
function memories(input: RunnerInput, paths: ReturnType<typeof runnerPaths>) {
  return {
    globalMemory: input.isMain ? null : readIfExists(join(paths.global, 'CLAUDE.md')),
    groupMemory: readIfExists(join(paths.group, 'CLAUDE.md')),
  };
}

/** A turn's prompt with the memories that changed since the container started (its CLI holds the older ones). */
export function withMemoryUpdate(
  prompt: string,
  before: ReturnType<typeof memories>,
  now: ReturnType<typeof memories>,
): string {
  const changed: string[] = [];
  if ((before.globalMemory ?? '') !== (now.globalMemory ?? ''))
    changed.push(`Shared memory (CLAUDE.md of all groups), as it is now:\n${now.globalMemory?.trim() || '(empty)'}`);
  if ((before.groupMemory ?? '') !== (now.groupMemory ?? ''))
    changed.push(`This group's memory (CLAUDE.md), as it is now:\n${now.groupMemory?.trim() || '(empty)'}`);
  return changed.length ? `<memory-update>\n${changed.join('\n\n')}\n</memory-update>\n\n${prompt}` : prompt;
}

/** Leaves no credential behind in the group's .kimi folder (a host bind mount). */
function removeKey(paths: ReturnType<typeof runnerPaths>, env: Record<string, string | undefined>): void {
  if (existsSync(paths.configToml)) {
    writeFileSync(paths.configToml, buildConfigToml(kimiModel(env)), { mode: 0o600 });
  }
}

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
  try {
    input = parseInput(await readStdin(Number(env.NANOCLAW_STDIN_TIMEOUT_MS ?? 60_000)));
    if (input.warm && !takesFollowUps)
      throw new InputError(
        `a warm start ("warm": true) needs the inbox ${paths.input}: its first message is the first prompt`,
      );
    mark('input');
    endpoint = await modelEndpoint(env);
  } catch (err) {
    writeResult({ status: 'error', result: null, error: err instanceof Error ? err.message : String(err) });
    return 1;
  }
  // The CLI inherits this environment; its KIMI_* overrides would bypass config.toml (and the proxy).
  delete process.env.KIMI_API_KEY;
  delete process.env.KIMI_BASE_URL;
  const { agentFile, role, ownConfig, memories: memoriesAtStart } = writeKimiFiles(input, paths, env, endpoint.baseUrl);
  const executable = cliWithOwnConfig(env.KIMI_EXECUTABLE || 'kimi', ownConfig);
  // The CLI starts as soon as its session is opened, while the runner sets up the rest (and,
  // in a warm start, while it waits for the first message): the first prompt finds it running.
  const startNow = (opened: Session) =>
    startCli(opened).then(
      (started) => {
        if (started) mark('cli-ready');
      },
      (err) =>
        log(
          `the CLI did not start ahead of the prompt (${err instanceof Error ? err.message : err}); the prompt starts it`,
        ),
    );
  const openSession = (id: string) => {
    const opened = createSession({
      workDir: paths.group,
      sessionId: id,
      model: MODEL_ALIAS,
      yoloMode: true,
      agentFile,
      executable,
    });
    const started = startNow(opened);
    process.stderr.write(`Session initialized: ${id}\n`);
    return { session: opened, cliStarted: started };
  };
  const sessionId = input.sessionId ?? randomUUID();
  if (input.sessionId && refreshSystemPrompt(sessionContextFile(paths.kimiHome, paths.group, sessionId), role)) {
    log('the memory or role changed since this session began: its system prompt is renewed');
  }
  let { session, cliStarted } = openSession(sessionId);

  const idleLimitMs = Number(env.NANOCLAW_RUNNER_IDLE_MS ?? 30 * 60_000);
  const inbox = new Inbox(paths.input, inboxOptions(env));
  const chat: ChatLine = {
    canHear: takesFollowUps && !input.isScheduledTask,
    questionTimeoutMs: Number(env.NANOCLAW_QUESTION_TIMEOUT_MS) || 10 * 60_000,
    say: (text) => {
      if (!existsSync(paths.ipc)) return false;
      // expectsReply: in a group that needs the trigger, the answer comes without one.
      writeIpcFile(join(paths.ipc, 'messages'), { type: 'message', chatJid: input.chatJid, text, expectsReply: true });
      return true;
    },
  };
  let exitCode = 0;
  const finish = async () => {
    inbox.stop();
    await session.close().catch(() => {});
    endpoint.close();
    removeKey(paths, env);
    for (const file of [agentFile, ownConfig, executable]) rmSync(file, { force: true });
  };
  const onSignal = () => void finish().then(() => process.exit(143));
  process.once('SIGTERM', onSignal);
  process.once('SIGINT', onSignal);

  if (takesFollowUps) inbox.start();
  let prompt: string | null;
  if (input.warm) {
    // A warm start: no prompt yet and no result; the first message is the first turn.
    const first = await inbox.nextInput(idleLimitMs);
    if (first.kind === 'idle') log(`no message for ${Math.round(idleLimitMs / 1000)} s after a warm start; closing`);
    else if (first.kind === 'close') log('closed before the first message of a warm start');
    prompt = first.kind === 'message' ? first.text : null;
  } else {
    prompt = input.isScheduledTask ? scheduledTaskPrompt(input.prompt) : input.prompt;
  }
  // A warm container may have waited a while: its first turn, too, is told of memory changed since it started.
  let firstTurn = !input.warm;
  while (prompt !== null) {
    const turnPrompt: string = firstTurn ? prompt : withMemoryUpdate(prompt, memoriesAtStart, memories(input, paths));
    firstTurn = false;
    await cliStarted;
    let result = await runTurn(session, turnPrompt, inbox, chat, mark);
    if (result.status === 'error' && result.errorKind === 'context') {
      // The conversation outgrew the model: go on in a fresh session, and say so.
      log(`the session's context is full (${result.error}); starting a fresh session`);
      await session.close().catch(() => {});
      ({ session, cliStarted } = openSession(randomUUID()));
      await cliStarted;
      result = await runTurn(session, prompt, inbox, chat, mark);
      if (result.status === 'success') result = { ...result, earlier: [FRESH_SESSION_NOTE, ...(result.earlier ?? [])] };
    }
    writeResult(result);
    if (result.status === 'error') {
      log(`turn failed (${result.errorKind}): ${result.error}`);
      exitCode = 1;
      break;
    }
    if (!takesFollowUps) break;
    // Wait for the next message; a close request (or a host gone quiet for too long) ends
    // the session once nothing is queued.
    const next = await inbox.nextInput(idleLimitMs);
    if (next.kind === 'idle') log(`no follow-up for ${Math.round(idleLimitMs / 1000)} s; closing`);
    prompt = next.kind === 'message' ? next.text : null;
  }
  await finish();
  return exitCode;
}

/** Said in the chat when the runner had to start the conversation over. */
export const FRESH_SESSION_NOTE =
  '(Our conversation here had grown too long for me, so I started a fresh one: I still have my notes, but not what was said before.)';

if (import.meta.main) {
  process.exit(await main());
}
