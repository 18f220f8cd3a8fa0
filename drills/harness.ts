/**
 * What the drills share: a project on the real engine and image with the scripted model
 * (drill mode: every message answered by name), the real host as a separate process
 * (drills/host.ts) that can be started, fed and killed with -9, and the counting:
 * per item, the distinct message ids it reached the chat under (0 = lost, 2+ = doubled),
 * and what is left undone in the store at the end (stuck).
 */
import { Database } from 'bun:sqlite';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startFakeModel, type FakeModel } from '../scripts/scripted-model.ts';
import { addGroup, Store, type Config, loadConfig } from '../nanoclaw.ts';
import { DRILL_CHAT, DRILL_GROUPS, type Delivery } from './host.ts';

export const IMAGE = process.env.NANOCLAW_TEST_IMAGE ?? 'nanoclaw-agent:test';
const HOST_SCRIPT = fileURLToPath(new URL('./host.ts', import.meta.url));
const KEY = 'sk-drill-key-0123456789abcdef';

/** A small seeded generator, so a drill can be run again exactly (the seed is printed). */
export function random(seed: number): () => number {
  let state = seed >>> 0 || 1;
  return () => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) / 2 ** 32;
  };
}

export interface DrillProject {
  root: string;
  config: Config;
  model: FakeModel;
  env: Record<string, string>;
  stop(): void;
}

export function drillProject(options: { think?: () => number; env?: Record<string, string> } = {}): DrillProject {
  const root = mkdtempSync(join(tmpdir(), 'nanoclaw-drill-'));
  chmodSync(root, 0o755);
  for (const dir of ['groups/global', 'groups/main']) mkdirSync(join(root, dir), { recursive: true });
  writeFileSync(join(root, '.env'), `KIMI_API_KEY=${KEY}\n`);
  const model = startFakeModel({ key: KEY, drill: true, delayMs: options.think });
  const env = {
    PATH: process.env.PATH ?? '',
    HOME: process.env.HOME ?? '',
    NANOCLAW_ROOT: root,
    CONTAINER_IMAGE: IMAGE,
    KIMI_BASE_URL: model.url,
    TZ: 'UTC',
    LOG_LEVEL: 'info',
    IDLE_TIMEOUT: '1500',
    CONTAINER_CLOSE_GRACE: '5000',
    ...options.env,
  };
  const config = loadConfig(root, env);
  const store = new Store(config.dbPath);
  addGroup(config, store, { jid: DRILL_CHAT, name: 'Drill', folder: 'main', isMain: true });
  for (const jid of DRILL_GROUPS)
    addGroup(config, store, { jid, name: jid, folder: jid.split('@')[0]!, requiresTrigger: false });
  store.close();
  return {
    root,
    config,
    model,
    env,
    stop: () => {
      model.stop();
      if (!process.env.DRILL_KEEP) rmSync(root, { recursive: true, force: true });
    },
  };
}

/** One incarnation of the host. */
export class DrillHost {
  readonly proc: ReturnType<typeof Bun.spawn<'pipe', 'pipe', 'pipe'>>;
  readonly exited: Promise<number>;
  /** True once it serves; false when it died first (a crash point hit by what an earlier host left). */
  readonly ready: Promise<boolean>;
  private stderr = '';

  /** The last lines the host wrote to stderr (why it died, when it did). */
  lastWords(lines = Number(process.env.DRILL_LAST_WORDS ?? 5)): string {
    return this.stderr.trim().split('\n').slice(-lines).join(' | ');
  }

  constructor(project: DrillProject, crashAt?: string) {
    const proc = Bun.spawn(['bun', HOST_SCRIPT], {
      stdin: 'pipe',
      stdout: 'pipe',
      stderr: 'pipe',
      env: { ...project.env, ...(crashAt ? { NANOCLAW_CRASH_AT: crashAt } : {}) },
    });
    this.proc = proc;
    this.exited = proc.exited;
    this.ready = (async () => {
      const reader = proc.stdout.getReader();
      const { value } = await reader.read();
      reader.releaseLock();
      if (value && new TextDecoder().decode(value).includes('ready')) return true;
      const code = await proc.exited;
      if (code !== 137 && crashAt === undefined)
        throw new Error(`the drill host did not start (exit ${code}): ${this.stderr}`);
      return false;
    })();
    void (async () => {
      for await (const chunk of proc.stderr) this.stderr += new TextDecoder().decode(chunk);
    })();
  }

  send(id: string, text: string, chat?: string): void {
    try {
      this.proc.stdin.write(`${JSON.stringify({ id, text, ...(chat ? { chat } : {}) })}\n`);
      void this.proc.stdin.flush();
    } catch {
      // it died: the message is sent again to the next one
    }
  }

  kill(): void {
    this.proc.kill('SIGKILL');
  }

  /** A clean stop: end of input, the host finishes and exits. */
  async close(): Promise<number> {
    try {
      await this.proc.stdin.end();
    } catch {
      // already gone
    }
    return this.exited;
  }
}

/** An IPC request as an agent's MCP server writes it (temp file, then rename). */
export function dropIpcMessage(project: DrillProject, name: string, text: string): void {
  const dir = join(project.config.ipcDir, 'main', 'messages');
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, `.${name}.tmp`), JSON.stringify({ type: 'message', chatJid: DRILL_CHAT, text }));
  renameSync(join(dir, `.${name}.tmp`), join(dir, name));
}

/** A one-off task due now, as the agent's schedule_task would leave it. */
export function dueTask(project: DrillProject, id: string, prompt: string): void {
  const db = new Database(project.config.dbPath);
  db.exec('PRAGMA busy_timeout = 5000');
  db.query(
    `INSERT INTO scheduled_tasks (id, group_folder, chat_jid, prompt, schedule_type, schedule_value, context_mode, next_run, status, created_at)
     VALUES (?, 'main', ?, ?, 'once', '2000-01-01 00:00', 'isolated', ?, 'active', ?)`,
  ).run(id, DRILL_CHAT, prompt, new Date().toISOString(), new Date().toISOString());
  db.close();
}

export function deliveries(project: DrillProject): Delivery[] {
  const file = join(project.root, 'deliveries.jsonl');
  if (!existsSync(file)) return [];
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((line) => JSON.parse(line) as Delivery);
}

/** Message ids stored by the host (what it has taken responsibility for). */
export function storedIds(project: DrillProject): Set<string> {
  const db = new Database(project.config.dbPath, { readonly: true });
  try {
    return new Set(
      db
        .query<{ id: string }, []>('SELECT id FROM messages WHERE is_bot_message = 0')
        .all()
        .map((r) => r.id),
    );
  } finally {
    db.close();
  }
}

export interface Tally {
  items: number;
  lost: number;
  doubled: number;
  /** Parts delivered again under the same id after a crash (one message for the recipient). */
  resentSameId: number;
}

/** How often each item reached the chat, counted by distinct message id. `appearsIn` says whether a text carries the item. */
export function tally(
  items: readonly string[],
  delivered: readonly Delivery[],
  appearsIn: (item: string, text: string) => boolean,
): Tally {
  const byId = new Map<string, Delivery>();
  let resentSameId = 0;
  for (const d of delivered) {
    if (byId.has(d.messageId)) resentSameId++;
    else byId.set(d.messageId, d);
  }
  let lost = 0;
  let doubled = 0;
  for (const item of items) {
    const times = [...byId.values()].filter((d) => appearsIn(item, d.text)).length;
    if (times === 0) lost++;
    if (times > 1) doubled++;
  }
  return { items: items.length, lost, doubled, resentSameId };
}

/** A reply names its messages after "[drill]"; this finds a whole word among them. */
export const named = (item: string, text: string) =>
  new RegExp(`(^|\\s)${item}(\\s|$)`).test(text.replace(/^.*?\[drill\]/, ''));

/** What is left undone at the end: unanswered messages, unsent parts, open task claims, unhandled IPC files. */
export function stuck(project: DrillProject): {
  unanswered: number;
  unsent: number;
  claims: number;
  ipcFiles: number;
  dueTasks: number;
} {
  const store = new Store(project.config.dbPath);
  try {
    const unanswered = [DRILL_CHAT, ...DRILL_GROUPS]
      .map((jid) => store.messagesSince(jid, store.getCursor(jid)).length)
      .reduce((a, b) => a + b, 0);
    const unsent = store.unsent('drill').length;
    const claims = store.taskClaims().length;
    const dueTasks = store.listTasks().filter((t) => t.status === 'active' && t.scheduleType === 'once').length;
    const ipcDir = project.config.ipcDir;
    const count = (dir: string) => (existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.json')).length : 0);
    const ipcFiles = count(join(ipcDir, 'main', 'messages')) + count(join(ipcDir, 'claimed'));
    return { unanswered, unsent, claims, ipcFiles, dueTasks };
  } finally {
    store.close();
  }
}

/** Waits until `done` holds, or the time is up (then the caller counts what is missing). */
export async function until(done: () => boolean, timeoutMs: number): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (done()) return true;
    await Bun.sleep(100);
  }
  return done();
}

export interface Row {
  drill: string;
  kills: number;
  items: number;
  lost: number;
  doubled: number;
  stuck: number;
  note?: string;
}

export function printTable(title: string, rows: readonly Row[]): void {
  const header = ['drill', 'kills', 'items', 'lost', 'doubled', 'stuck', 'note'];
  const cells = rows.map((r) => [
    r.drill,
    String(r.kills),
    String(r.items),
    String(r.lost),
    String(r.doubled),
    String(r.stuck),
    r.note ?? '',
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
  const line = (c: string[]) => `| ${c.map((v, i) => v.padEnd(widths[i]!)).join(' | ')} |`;
  console.log(
    `\n${title}\n${line(header)}\n|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|\n${cells.map(line).join('\n')}`,
  );
}
