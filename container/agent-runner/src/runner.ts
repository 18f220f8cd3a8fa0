#!/usr/bin/env bun
/**
 * NanoClaw agent-runner: the container's entrypoint.
 *
 * Reads one JSON object on stdin (container/CONTRACT.md), writes the Kimi CLI's
 * configuration, opens (or resumes) the group's Kimi session through the Kimi Agent SDK,
 * and answers: each finished turn becomes one result between the markers on stdout.
 * Then it waits for follow-ups in /workspace/ipc/input/ — steering them into a running
 * turn, or starting the next turn — until `_close` arrives. Logs go to stderr.
 */
import { createSession, type Session } from '@moonshot-ai/kimi-agent-sdk';
import { randomUUID } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, connect, type AddressInfo } from 'node:net';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  buildAgentFile, buildConfigToml, buildMcpConfig, buildRole, keyFromEnvFile, MODEL_ALIAS, scheduledTaskPrompt,
} from './config.ts';

export const RESULT_START = '---NANOCLAW_RESULT_START---';
export const RESULT_END = '---NANOCLAW_RESULT_END---';

export interface RunnerInput {
  prompt: string;
  groupFolder: string;
  chatJid: string;
  isMain: boolean;
  sessionId?: string;
  isScheduledTask?: boolean;
  assistantName?: string;
  secrets?: { KIMI_API_KEY?: string };
}

export interface RunnerResult {
  status: 'success' | 'error';
  result: string | null;
  /** What earlier steps of the turn said (e.g. "Let me check."), each its own message, in order, before `result`. */
  earlier?: string[];
  sessionId?: string;
  error?: string;
}

export class InputError extends Error {}

/** Validates the stdin JSON; every problem names the field. */
export function parseInput(text: string): RunnerInput {
  if (!text.trim()) throw new InputError('no input: pipe one JSON object into the container (see container/CONTRACT.md)');
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new InputError(`input is not JSON: ${err instanceof Error ? err.message : err}`);
  }
  if (typeof data !== 'object' || data === null || Array.isArray(data)) throw new InputError('input must be a JSON object');
  const input = data as Record<string, unknown>;
  for (const key of ['prompt', 'groupFolder', 'chatJid'] as const) {
    if (typeof input[key] !== 'string' || !(input[key] as string).trim()) throw new InputError(`input field "${key}" must be a non-empty string`);
  }
  if (typeof input.isMain !== 'boolean') throw new InputError('input field "isMain" must be true or false');
  if (input.sessionId !== undefined && (typeof input.sessionId !== 'string' || !/^[A-Za-z0-9_-]{1,128}$/.test(input.sessionId))) {
    throw new InputError('input field "sessionId" must be letters, digits, - or _');
  }
  return input as unknown as RunnerInput;
}

export function formatResult(result: RunnerResult): string {
  return `${RESULT_START}\n${JSON.stringify(result)}\n${RESULT_END}\n`;
}

/** Where things are; every path can be moved by the environment so tests run outside Docker. */
export function runnerPaths(env: Record<string, string | undefined> = process.env) {
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
export async function startModelForwarder(socketPath: string): Promise<{ url: string; close(): void }> {
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
export async function modelEndpoint(env: Record<string, string | undefined>): Promise<{ baseUrl?: string; close(): void }> {
  if (env.NANOCLAW_MODEL_SOCKET) {
    if (!existsSync(env.NANOCLAW_MODEL_SOCKET)) throw new Error(`the model proxy socket ${env.NANOCLAW_MODEL_SOCKET} is missing`);
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
 * Follow-up messages and the close request, read from the IPC input folder. It polls
 * (150 ms) rather than watching: file events on bind mounts are not delivered reliably by
 * every Docker setup (Docker Desktop on macOS among them), and a missed event would stall
 * the conversation.
 */
export class Inbox {
  private readonly queued: string[] = [];
  private timer: ReturnType<typeof setInterval> | null = null;
  closeRequested = false;
  /** Set while a turn runs: follow-ups go straight into it. */
  onMessage: ((text: string) => void) | null = null;

  constructor(private readonly dir: string, private readonly pollMs = 150) {}

  start(): void {
    this.timer = setInterval(() => this.poll(), this.pollMs);
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  /** Picks up new files in name order; each is deleted once read. */
  poll(): void {
    let files: string[];
    try {
      files = readdirSync(this.dir).filter((f) => !f.startsWith('.')).sort();
    } catch {
      return;
    }
    for (const file of files) {
      const path = join(this.dir, file);
      if (file === '_close') {
        rmSync(path, { force: true });
        this.closeRequested = true;
        continue;
      }
      let text: string | null = null;
      try {
        const data = JSON.parse(readFileSync(path, 'utf8')) as { type?: string; text?: unknown };
        if (data.type === 'message' && typeof data.text === 'string') text = data.text;
        else log(`ignoring ${file}: not {"type":"message","text":…}`);
      } catch (err) {
        log(`ignoring ${file}: ${err instanceof Error ? err.message : err}`);
      }
      rmSync(path, { force: true });
      if (text === null) continue;
      if (this.onMessage) this.onMessage(text);
      else this.queued.push(text);
    }
  }

  /** Everything that arrived between turns, as one next prompt. */
  takeQueued(): string | null {
    if (this.queued.length === 0) return null;
    return this.queued.splice(0).join('\n');
  }

  requeue(text: string): void {
    this.queued.push(text);
  }
}

/**
 * One turn: the prompt in, the answer out; steered follow-ups join the same turn. Each
 * step's text is its own message, never glued to the next ("Let me check.Here is…"), and
 * none is dropped (a message steered in mid-turn is answered in a later step): `result`
 * is the last step's, `earlier` the others'. They come together, at the end of the turn,
 * so the host records them in one go with what they answered.
 */
export async function runTurn(session: Session, prompt: string, inbox: Inbox): Promise<RunnerResult> {
  const turn = session.prompt(prompt);
  inbox.onMessage = (text) => {
    turn.steer(text).catch((err) => {
      log(`steering failed (${err instanceof Error ? err.message : err}); the message goes into the next turn`);
      inbox.requeue(text);
    });
  };
  const steps: string[] = [''];
  try {
    for await (const event of turn) {
      if (event.type === 'StepBegin') steps.push('');
      else if (event.type === 'ContentPart' && event.payload.type === 'text') steps[steps.length - 1] += event.payload.text;
    }
    const outcome = await turn.result;
    if (outcome && outcome.status !== 'finished') log(`turn ended: ${outcome.status}`);
    const said = steps.map((text) => text.trim()).filter(Boolean);
    const result = said.pop() ?? null;
    return { status: 'success', result, ...(said.length ? { earlier: said } : {}), sessionId: session.sessionId };
  } catch (err) {
    return { status: 'error', result: null, sessionId: session.sessionId, error: err instanceof Error ? err.message : String(err) };
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

/**
 * Writes the Kimi CLI's files. Under the host, config.toml holds the run's proxy token (it
 * dies with the container), never the key; run by hand (the guide's manual test) it holds
 * the key given on stdin, and only until the runner exits.
 */
export function writeKimiFiles(input: RunnerInput, paths: ReturnType<typeof runnerPaths>, env: Record<string, string | undefined>, baseUrl?: string): string {
  mkdirSync(paths.kimiHome, { recursive: true });
  const apiKey = input.secrets?.KIMI_API_KEY ?? keyFromEnvFile(readIfExists(paths.envFile) ?? '');
  writeFileSync(paths.configToml, buildConfigToml({ apiKey, baseUrl, modelName: env.KIMI_MODEL_NAME, providerType: env.KIMI_PROVIDER }), { mode: 0o600 });
  chmodSync(paths.configToml, 0o600);
  const timezone = env.TZ || Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
  const identity = { chatJid: input.chatJid, groupFolder: input.groupFolder, isMain: input.isMain, ipcDir: paths.ipc, timezone };
  writeFileSync(paths.mcpJson, buildMcpConfig(identity, join(import.meta.dir, 'mcp-server.ts'), process.execPath));
  const role = buildRole({
    assistantName: input.assistantName || env.ASSISTANT_NAME || 'Andy',
    isMain: input.isMain,
    timezone,
    globalMemory: input.isMain ? null : readIfExists(join(paths.global, 'CLAUDE.md')),
    groupMemory: readIfExists(join(paths.group, 'CLAUDE.md')),
  });
  const agentFile = join(tmpdir(), `nanoclaw-agent-${process.pid}.yaml`);
  writeFileSync(agentFile, buildAgentFile(role));
  return agentFile;
}

/** Leaves no credential behind in the group's .kimi folder (a host bind mount). */
export function removeKey(paths: ReturnType<typeof runnerPaths>, env: Record<string, string | undefined>): void {
  if (existsSync(paths.configToml)) {
    writeFileSync(paths.configToml, buildConfigToml({ modelName: env.KIMI_MODEL_NAME, providerType: env.KIMI_PROVIDER }), { mode: 0o600 });
  }
}

export async function main(env: Record<string, string | undefined> = process.env): Promise<number> {
  const paths = runnerPaths(env);
  let input: RunnerInput;
  try {
    input = parseInput(await readStdin(Number(env.NANOCLAW_STDIN_TIMEOUT_MS ?? 60_000)));
  } catch (err) {
    process.stdout.write(formatResult({ status: 'error', result: null, error: err instanceof Error ? err.message : String(err) }));
    return 1;
  }

  let endpoint: Awaited<ReturnType<typeof modelEndpoint>>;
  try {
    endpoint = await modelEndpoint(env);
  } catch (err) {
    process.stdout.write(formatResult({ status: 'error', result: null, error: err instanceof Error ? err.message : String(err) }));
    return 1;
  }
  // The CLI inherits this environment; its KIMI_* overrides would bypass config.toml (and the proxy).
  delete process.env.KIMI_API_KEY;
  delete process.env.KIMI_BASE_URL;
  const agentFile = writeKimiFiles(input, paths, env, endpoint.baseUrl);
  const sessionId = input.sessionId ?? randomUUID();
  const session = createSession({
    workDir: paths.group,
    sessionId,
    model: MODEL_ALIAS,
    yoloMode: true,
    agentFile,
    executable: env.KIMI_EXECUTABLE || 'kimi',
  });
  process.stderr.write(`Session initialized: ${sessionId}\n`);

  // The host creates ipc/input/ before it starts a container it will talk to; without it
  // (e.g. the guide's manual test) the runner answers once and exits.
  const takesFollowUps = existsSync(paths.input);
  const idleLimitMs = Number(env.NANOCLAW_RUNNER_IDLE_MS ?? 30 * 60_000);
  const inbox = new Inbox(paths.input);
  let exitCode = 0;
  const finish = async () => {
    inbox.stop();
    await session.close().catch(() => {});
    endpoint.close();
    removeKey(paths, env);
    rmSync(agentFile, { force: true });
  };
  const onSignal = () => void finish().then(() => process.exit(143));
  process.once('SIGTERM', onSignal);
  process.once('SIGINT', onSignal);

  inbox.start();
  let prompt: string | null = input.isScheduledTask ? scheduledTaskPrompt(input.prompt) : input.prompt;
  while (prompt !== null) {
    const result = await runTurn(session, prompt, inbox);
    process.stdout.write(formatResult(result));
    if (result.status === 'error') {
      log(`turn failed: ${result.error}`);
      exitCode = 1;
      break;
    }
    if (!takesFollowUps) break;
    // Wait for the next message; a close request (or a host gone quiet for too long) ends
    // the session once nothing is queued.
    const idleSince = Date.now();
    for (;;) {
      inbox.poll();
      prompt = inbox.takeQueued();
      if (prompt !== null || inbox.closeRequested) break;
      if (Date.now() - idleSince > idleLimitMs) {
        log(`no follow-up for ${Math.round(idleLimitMs / 1000)} s; closing`);
        break;
      }
      await Bun.sleep(100);
    }
  }
  await finish();
  return exitCode;
}

if (import.meta.main) {
  process.exit(await main());
}
