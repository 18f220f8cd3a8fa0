/**
 * Shared set-up for the agent-runner's tests: temp folders that are removed after the
 * file's tests, a workspace laid out like the container's, and the runner run as the
 * container runs it, with the real Kimi Code CLI (its npm package, under Bun) as the agent.
 */
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll } from 'vitest';
import { writeIpcFile } from '../src/mcp-server.ts';
import { RESULT_END, RESULT_START } from '../src/runner.ts';

export const RUNNER_DIR = fileURLToPath(new URL('..', import.meta.url));
/** The pinned Kimi Code CLI from the runner's own dependencies: the same package the image installs. */
export const KIMI_MAIN = join(RUNNER_DIR, 'node_modules', '@moonshot-ai', 'kimi-code', 'dist', 'main.mjs');
export const KIMI_COMMAND = `${process.execPath} ${KIMI_MAIN}`;

const made: string[] = [];
afterAll(() => {
  for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** A temp folder, removed when the test file is done. */
export function tempDir(prefix = 'nanoclaw-runner-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  made.push(dir);
  return dir;
}

export type Workspace = { root: string; ws: string; home: string };

/** A workspace; with `inbox` the runner stays for follow-ups (as under the host), else it answers once. */
export function workspace(memories: { global?: string; group?: string } = {}, inbox = false): Workspace {
  const root = tempDir();
  const ws = join(root, 'workspace');
  for (const dir of ['group', 'global', 'ipc/messages', 'ipc/tasks', ...(inbox ? ['ipc/input'] : [])])
    mkdirSync(join(ws, dir), { recursive: true });
  mkdirSync(join(root, 'home'));
  if (memories.global) writeFileSync(join(ws, 'global', 'CLAUDE.md'), memories.global);
  if (memories.group) writeFileSync(join(ws, 'group', 'CLAUDE.md'), memories.group);
  return { root, ws, home: join(root, 'home') };
}

export type Result = {
  status: string;
  result: string | null;
  sessionId?: string;
  error?: string;
  earlier?: string[];
  errorKind?: string;
  upTo?: number;
  task?: boolean;
};

export interface RunResult {
  results: Result[];
  stdout: string;
  stderr: string;
  code: number;
}

export const parseResults = (out: string): Result[] =>
  [...out.matchAll(new RegExp(`${RESULT_START}\\n(.*)\\n${RESULT_END}`, 'g'))].map((m) => JSON.parse(m[1]!) as Result);

/** Waits until check() holds, looking every 10 ms; fails (naming what) after `budgetMs` (sized for a busy machine). */
export async function until(check: () => boolean, what: string, budgetMs = 60_000): Promise<void> {
  for (const started = Date.now(); !check(); await Bun.sleep(10)) {
    if (Date.now() - started > budgetMs) throw new Error(`still waiting for ${what}`);
  }
}

/** The runner while it runs: what it has said so far. */
export interface Live {
  results(): Result[];
  stderr(): string;
}

/** Runs the runner as the container would; `during` can watch it and drop inbox files while it runs. */
export async function runRunner(
  ws: Workspace,
  input: unknown,
  options: { modelUrl: string; during?: (live: Live) => Promise<void>; env?: Record<string, string> },
): Promise<RunResult> {
  const proc = Bun.spawn([process.execPath, join(RUNNER_DIR, 'src', 'runner.ts')], {
    stdin: new Blob([typeof input === 'string' ? input : JSON.stringify(input)]),
    stdout: 'pipe',
    stderr: 'pipe',
    env: {
      PATH: process.env.PATH!,
      HOME: ws.home,
      NANOCLAW_WORKSPACE: ws.ws,
      KIMI_EXECUTABLE: KIMI_COMMAND,
      KIMI_BASE_URL: options.modelUrl,
      TZ: 'Europe/Berlin',
      ...options.env,
    },
  });
  let out = '';
  let err = '';
  const pump = async (stream: ReadableStream<Uint8Array>, add: (text: string) => void) => {
    const decoder = new TextDecoder();
    for await (const chunk of stream) add(decoder.decode(chunk, { stream: true }));
  };
  const reading = Promise.all([pump(proc.stdout, (t) => (out += t)), pump(proc.stderr, (t) => (err += t))]);
  try {
    await options.during?.({ results: () => parseResults(out), stderr: () => err });
  } catch (error) {
    proc.kill();
    throw error;
  }
  const [, code] = await Promise.all([reading, proc.exited]);
  return { results: parseResults(out), stdout: out, stderr: err, code };
}

/** What the host gives a container on stdin, for the family group. */
export const input = (prompt: string, key: string, extra: Record<string, unknown> = {}) => ({
  prompt,
  groupFolder: 'family',
  chatJid: 'family@g.us',
  isMain: false,
  secrets: { KIMI_API_KEY: key },
  ...extra,
});

/** A NanoClaw prompt of messages, as the host formats them. */
export const messages = (...texts: string[]) =>
  `<messages>\n${texts.map((t) => `<message sender="Ann" time="2026-01-01 10:00">${t}</message>`).join('\n')}\n</messages>`;

export const close = (ws: Workspace) => writeFileSync(join(ws.ws, 'ipc', 'input', '_close'), '');

/** A follow-up (or a task) in the run's inbox, written as the host writes it. */
export const followUp = (ws: Workspace, text: string, upTo?: number, type: 'message' | 'task' = 'message') =>
  writeIpcFile(join(ws.ws, 'ipc', 'input'), { type, text, ...(upTo !== undefined ? { upTo } : {}) });

/**
 * Plays the host's side of a request: every new file in tasks/ or messages/ gets the
 * decision `decide` makes, written (temp + rename) as responses/<its name>, as IpcWatcher does.
 */
export function hostAnswering(
  ipcDir: string,
  decide: (request: Record<string, unknown>) => object = () => ({ ok: true }),
) {
  const answered = new Set<string>();
  const timer = setInterval(() => {
    for (const kind of ['tasks', 'messages']) {
      for (const name of readdirSync(join(ipcDir, kind))) {
        if (name.startsWith('.') || answered.has(name)) continue;
        answered.add(name);
        const request = JSON.parse(readFileSync(join(ipcDir, kind, name), 'utf8')) as Record<string, unknown>;
        mkdirSync(join(ipcDir, 'responses'), { recursive: true });
        writeFileSync(join(ipcDir, 'responses', `.${name}`), JSON.stringify(decide(request)));
        renameSync(join(ipcDir, 'responses', `.${name}`), join(ipcDir, 'responses', name));
      }
    }
  }, 10);
  return () => clearInterval(timer);
}
