/**
 * The harness behind bench/run.ts: a temp root for everything, a `docker` wrapper that
 * notes each `docker run` (and labels its containers, and passes NANOCLAW_TIMING=1 in),
 * the engine's own event stream for container start/die/destroy times, the scripted model
 * behind a front that timestamps every request, `bun nanoclaw.ts chat` as a real
 * subprocess (piped, or under a pseudo-terminal and typed into a key at a time), in-process
 * hosts for the rows that need the queue's state, the machine's load and CPU pressure, a
 * live container's cgroup (CPU used, memory), and the baselines: what docker, the CLI's
 * own start and the model cost alone.
 *
 * Clocks: points measured in different processes (the wrapper's $EPOCHREALTIME, the
 * engine's timeNano, the runner's timing lines, the inbox file names, this process's
 * Date.now()) are all the machine's wall clock; intervals inside this process that are
 * well under a millisecond use performance.now().
 *
 * Nothing here talks to anything but loopback, unix sockets and the containers it starts;
 * cleanup() removes every container carrying this run's label, every child process and
 * the temp root, also after Ctrl-C (run.ts wires the signals).
 */
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
  chmodSync,
  openSync,
  readSync,
  closeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { contentText, startFakeModel, type FakeModel } from '../scripts/scripted-model.ts';
import { addGroup, type Config, Host, hardeningArgs, loadConfig, setupLogging, Store } from '../nanoclaw.ts';
import { RecordingChannel } from '../test/helpers.ts';

export const REPO = fileURLToPath(new URL('..', import.meta.url));
export const ENTRY = join(REPO, 'nanoclaw.ts');
export const KEY = 'sk-bench-0123456789abcdef';

export const wall = () => Date.now();
export const mono = () => performance.now();

/**
 * A sub-millisecond wall clock for one short measurement: the instant Date.now() ticks over
 * is caught with performance.now(), and the epoch is extrapolated from there (off by well
 * under 0.1 ms for a few seconds). For comparing with due times the Scheduler reads from Date.now().
 */
export function fineWallClock(): () => number {
  const first = Date.now();
  let tick = Date.now();
  while (tick === first) tick = Date.now();
  const at = performance.now();
  return () => tick + (performance.now() - at);
}

// ───────────────────────────── statistics ─────────────────────────────

export function median(values: readonly number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
}

export const maxOf = (values: readonly number[]) => Math.max(...values);
export const minOf = (values: readonly number[]) => Math.min(...values);

export function progress(row: string, message: string): void {
  process.stderr.write(`[${row}] ${message}\n`);
}

/** Waits until check() gives a value; re-checked whenever poke() is called and every pollMs. */
export class Signal {
  private readonly waiters = new Set<() => void>();
  poke(): void {
    for (const waiter of [...this.waiters]) waiter();
  }
  until<T>(check: () => T | undefined | null | false, timeoutMs: number, what: string, pollMs = 25): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const done = () => {
        clearInterval(timer);
        clearTimeout(deadline);
        this.waiters.delete(test);
      };
      const test = () => {
        let value: T | undefined | null | false;
        try {
          value = check();
        } catch (err) {
          done();
          reject(err);
          return;
        }
        if (value) {
          done();
          resolve(value);
        }
      };
      const timer = setInterval(test, pollMs);
      const deadline = setTimeout(() => {
        done();
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      this.waiters.add(test);
      test();
    });
  }
}

/** A child's output, line by line, each stamped with when it arrived here. */
export class Lines {
  readonly lines: { at: number; text: string }[] = [];
  readonly changed = new Signal();
  ended = false;

  constructor(
    stream: ReadableStream<Uint8Array>,
    private readonly keep = true,
  ) {
    void this.pump(stream);
  }

  private async pump(stream: ReadableStream<Uint8Array>): Promise<void> {
    const decoder = new TextDecoder();
    let rest = '';
    try {
      for await (const chunk of stream) {
        const at = wall();
        if (!this.keep) continue;
        rest += decoder.decode(chunk, { stream: true });
        const parts = rest.split('\n');
        rest = parts.pop() ?? '';
        for (const text of parts) this.lines.push({ at, text });
        this.changed.poke();
      }
    } catch {
      // the child went away
    }
    if (rest) this.lines.push({ at: wall(), text: rest });
    this.ended = true;
    this.changed.poke();
  }

  /** The first line from index `from` on that contains `text`. */
  find(text: string, from = 0): { at: number; text: string; index: number } | undefined {
    for (let i = from; i < this.lines.length; i++)
      if (this.lines[i]!.text.includes(text)) return { ...this.lines[i]!, index: i };
    return undefined;
  }

  wait(text: string, from: number, timeoutMs: number): Promise<{ at: number; text: string; index: number }> {
    return this.changed.until(
      () => {
        const hit = this.find(text, from);
        if (!hit && this.ended) throw new Error(`the output ended without "${text}"`);
        return hit;
      },
      timeoutMs,
      `"${text}" in the output`,
    );
  }
}

// ───────────────────────────── the bench's world ─────────────────────────────

export interface ModelRequest {
  arrived: number;
  done: number | null;
  lastUser: string;
}

export interface Project {
  root: string;
  /** The environment `bun nanoclaw.ts …` runs with (and loadConfig reads for in-process hosts). */
  env: Record<string, string>;
}

export interface World {
  config: Config;
  store: Store;
  channel: BenchChannel;
  host: Host;
}

/** One container's life as the engine recorded it (epoch ms). */
export interface ContainerEvents {
  create?: number;
  start?: number;
  die?: number;
  destroy?: number;
}

export class Bench {
  readonly root = mkdtempSync(join(tmpdir(), 'nanoclaw-bench-'));
  readonly id = `${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
  readonly label = `nanoclaw.bench=${this.id}`;
  readonly docker = join(this.root, 'docker');
  private readonly runLog = join(this.root, 'docker-runs.log');
  readonly children = new Set<ReturnType<typeof Bun.spawn>>();
  private readonly worlds = new Set<World>();
  readonly events = new Map<string, ContainerEvents>();
  readonly eventsChanged = new Signal();
  private eventsProc: ReturnType<typeof Bun.spawn> | null = null;
  model!: FakeModel;
  readonly requests: ModelRequest[] = [];
  private front: ReturnType<typeof Bun.serve> | null = null;
  modelUrl = '';
  private projects = 0;
  private cleaned = false;

  constructor(readonly image: string) {}

  async start(): Promise<void> {
    // The runtime every host here uses: real docker, with each `run` noted (when, which
    // container), labelled for cleanup, and NANOCLAW_TIMING=1 passed into the container
    // (the host has no setting for it; its -e list is fixed). One bash exec on the path.
    writeFileSync(
      this.docker,
      [
        '#!/bin/bash',
        'if [ "$1" = run ]; then',
        '  name=; prev=',
        '  for a in "$@"; do [ "$prev" = --name ] && name=$a; prev=$a; done',
        `  printf '%s %s\\n' "\${EPOCHREALTIME/,/.}" "$name" >> '${this.runLog}'`,
        '  shift',
        `  exec docker run --label '${this.label}' -e NANOCLAW_TIMING=1 "$@"`,
        'fi',
        'exec docker "$@"',
        '',
      ].join('\n'),
    );
    chmodSync(this.docker, 0o755);
    writeFileSync(this.runLog, '');

    // The engine's own record of each container: create, start, die, destroy, in its clock.
    const since = String(Math.floor(wall() / 1000) - 1);
    const events = Bun.spawn(
      ['docker', 'events', '--since', since, '--filter', `label=${this.label}`, '--format', '{{json .}}'],
      { stdout: 'pipe', stderr: 'ignore' },
    );
    this.eventsProc = events;
    void (async () => {
      const decoder = new TextDecoder();
      let rest = '';
      for await (const chunk of events.stdout) {
        rest += decoder.decode(chunk, { stream: true });
        const parts = rest.split('\n');
        rest = parts.pop() ?? '';
        for (const line of parts) {
          try {
            const event = JSON.parse(line) as {
              Type?: string;
              Action?: string;
              status?: string;
              Actor?: { Attributes?: Record<string, string> };
              timeNano?: number;
            };
            const name = event.Actor?.Attributes?.name;
            const action = event.Action ?? event.status;
            if (event.Type !== 'container' || !name || !action || !event.timeNano) continue;
            if (action !== 'create' && action !== 'start' && action !== 'die' && action !== 'destroy') continue;
            const record = this.events.get(name) ?? {};
            record[action] = event.timeNano / 1e6;
            this.events.set(name, record);
            this.eventsChanged.poke();
          } catch {
            // not an event line
          }
        }
      }
    })();

    // The scripted model, behind a front that stamps each request's arrival and the end of
    // its response (one loopback hop more than the host's proxy → model would have).
    this.model = startFakeModel({ key: KEY });
    const upstream = new URL(this.model.url).origin;
    this.front = Bun.serve({
      hostname: '127.0.0.1',
      port: 0,
      idleTimeout: 0,
      fetch: async (req) => {
        const record: ModelRequest = { arrived: wall(), done: null, lastUser: '' };
        this.requests.push(record);
        const body = req.method === 'GET' || req.method === 'HEAD' ? undefined : await req.text();
        record.lastUser = lastUserText(body);
        const url = new URL(req.url);
        const headers = new Headers(req.headers);
        headers.delete('host');
        headers.delete('content-length');
        const answer = await fetch(`${upstream}${url.pathname}${url.search}`, { method: req.method, headers, body });
        if (!answer.body) {
          record.done = wall();
          return new Response(null, { status: answer.status, headers: answer.headers });
        }
        const stamped = answer.body.pipeThrough(
          new TransformStream<Uint8Array, Uint8Array>({
            flush: () => {
              record.done = wall();
            },
          }),
        );
        const out = new Headers(answer.headers);
        out.delete('content-length');
        out.delete('content-encoding');
        return new Response(stamped, { status: answer.status, headers: out });
      },
    });
    this.modelUrl = `http://127.0.0.1:${this.front.port}/v1`;
    await Bun.sleep(300); // let `docker events` subscribe (--since covers a late start anyway)
  }

  /** Every `docker run` the hosts made so far: when the wrapper started, and the container's name. */
  runs(): { at: number; name: string }[] {
    return readFileSync(this.runLog, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((line) => {
        const [at = '0', name = ''] = line.split(' ');
        return { at: Number(at) * 1000, name };
      });
  }

  waitRun(after: number, prefix: string, timeoutMs: number): Promise<{ at: number; name: string }> {
    return this.eventsChanged.until(
      () => this.runs().find((r) => r.at >= after && r.name.startsWith(prefix)),
      timeoutMs,
      `a docker run after ${after}`,
      5,
    );
  }

  waitEvent(name: string, action: keyof ContainerEvents, timeoutMs = 30_000): Promise<number> {
    return this.eventsChanged.until(() => this.events.get(name)?.[action], timeoutMs, `${action} of ${name}`);
  }

  /** A project directory laid out like the repository, with the key in .env. */
  project(name: string, extraEnv: Record<string, string> = {}): Project {
    const root = join(this.root, `${++this.projects}-${name}`);
    mkdirSync(join(root, 'groups', 'global'), { recursive: true });
    writeFileSync(join(root, 'groups', 'global', 'CLAUDE.md'), '# global memory\n');
    writeFileSync(join(root, '.env'), `KIMI_API_KEY=${KEY}\nTZ=UTC\n`);
    copyFileSync(join(REPO, 'bunfig.toml'), join(root, 'bunfig.toml')); // env = false, as in a checkout
    const env: Record<string, string> = {
      PATH: process.env.PATH ?? '/usr/bin:/bin',
      HOME: process.env.HOME ?? root,
      NANOCLAW_ROOT: root,
      TZ: 'UTC',
      CONTAINER_RUNTIME: this.docker,
      CONTAINER_IMAGE: this.image,
      KIMI_BASE_URL: this.modelUrl,
      NANOCLAW_MOUNT_ALLOWLIST: join(root, 'no-allowlist.json'),
      LOG_LEVEL: 'info',
      ...extraEnv,
    };
    return { root, env };
  }

  spawn(cmd: string[], options: { cwd?: string; env?: Record<string, string>; stdin?: 'pipe' | 'ignore' } = {}) {
    const proc = Bun.spawn(cmd, {
      cwd: options.cwd,
      env: options.env,
      stdin: options.stdin ?? 'ignore',
      stdout: 'pipe',
      stderr: 'pipe',
    });
    this.children.add(proc);
    void proc.exited.then(() => this.children.delete(proc));
    return proc;
  }

  /** A host in this process (real store, queue, proxy, containers) with a recording channel. */
  async world(
    name: string,
    env: Record<string, string>,
    groups: { jid: string; folder: string; isMain?: boolean; requiresTrigger?: boolean }[],
  ): Promise<World> {
    const project = this.project(name, env);
    const config = loadConfig(project.root, project.env);
    setupLogging(config, { terminalLevel: 'silent', secrets: [KEY] });
    const store = new Store(config.dbPath);
    for (const group of groups) addGroup(config, store, { name: group.folder, ...group });
    const channel = new BenchChannel(groups.map((g) => g.jid));
    const host = new Host(config, store, [channel], {
      recoverySweepMs: 3_600_000,
      ipcSweepMs: 60_000,
      shutdownGraceMs: 15_000,
    });
    await host.start();
    const world = { config, store, channel, host };
    this.worlds.add(world);
    return world;
  }

  async closeWorld(world: World): Promise<void> {
    if (!this.worlds.delete(world)) return;
    await world.host.stop();
    world.store.close();
  }

  /** Everything this run started goes: hosts (gracefully unless interrupted), children, labelled containers, the temp root. */
  async cleanup(graceful: boolean, keepFiles = false): Promise<void> {
    if (this.cleaned) return;
    this.cleaned = true;
    if (graceful) {
      for (const world of [...this.worlds])
        await Promise.race([this.closeWorld(world).catch(() => {}), Bun.sleep(20_000)]);
    }
    for (const child of [...this.children]) child.kill('SIGKILL');
    const listed = Bun.spawnSync(['docker', 'ps', '-aq', '--filter', `label=${this.label}`]);
    const ids = listed.stdout
      .toString()
      .split('\n')
      .map((s) => s.trim())
      .filter(Boolean);
    if (ids.length) Bun.spawnSync(['docker', 'rm', '-f', ...ids], { stdout: 'ignore', stderr: 'ignore' });
    this.eventsProc?.kill();
    this.front?.stop(true);
    this.model?.stop();
    if (keepFiles) process.stderr.write(`[bench] kept ${this.root}\n`);
    else rmSync(this.root, { recursive: true, force: true });
  }
}

/** The newest user message of a chat-completions body, as text ('' when none). */
function lastUserText(body: string | undefined): string {
  if (!body) return '';
  try {
    const request = JSON.parse(body) as { messages?: { role: string; content?: unknown }[] };
    return contentText((request.messages ?? []).filter((m) => m.role === 'user').at(-1)?.content);
  } catch {
    return ''; // not JSON
  }
}

/** The tests' recording channel, with each delivery stamped with when it came (and a signal for waiting on it). */
export class BenchChannel extends RecordingChannel {
  readonly delivered: { jid: string; text: string; at: number }[] = [];
  readonly changed = new Signal();

  override async deliver(jid: string, text: string, messageId: string): Promise<void> {
    await super.deliver(jid, text, messageId);
    this.delivered.push({ jid, text, at: wall() });
    this.changed.poke();
  }

  waitReply(jid: string, text: string, timeoutMs: number): Promise<{ jid: string; text: string; at: number }> {
    return this.changed.until(
      () => this.delivered.find((s) => s.jid === jid && s.text.includes(text)),
      timeoutMs,
      `a reply in ${jid} with "${text}"`,
    );
  }
}

// ───────────────────────────── `bun nanoclaw.ts chat` as a subprocess ─────────────────────────────

const READY_LINE = 'NanoClaw is running';

/** Reads what was appended to a file since `offset`. */
function readFrom(path: string, offset: number): string {
  if (!existsSync(path)) return '';
  const size = statSync(path).size;
  if (size <= offset) return '';
  const fd = openSync(path, 'r');
  try {
    const buffer = Buffer.alloc(size - offset);
    readSync(fd, buffer, 0, buffer.length, offset);
    return buffer.toString('utf8');
  } finally {
    closeSync(fd);
  }
}

export class ChatProcess {
  private constructor(
    readonly proc: ReturnType<typeof Bun.spawn<'pipe', 'pipe', 'pipe'>>,
    readonly out: Lines,
    readonly err: Lines,
    /** spawn → the host logged that it is running (it then reads stdin) */
    readonly readyMs: number,
    readonly pty: boolean,
  ) {}

  get pid(): number {
    return this.proc.pid;
  }

  /**
   * Spawns `bun nanoclaw.ts chat` and waits until its host is running. Piped stdin by default;
   * with `pty`, under a real pseudo-terminal (util-linux `script`), as a person at a terminal
   * runs it: readline in raw mode, keystrokes seen one by one (the pty's output, with the
   * prompt, echo and spinner, then comes on `out`).
   */
  static async start(
    bench: Bench,
    project: Project,
    env: Record<string, string> = {},
    options: { pty?: boolean } = {},
  ): Promise<ChatProcess> {
    const logFile = join(project.root, 'logs', 'nanoclaw.log');
    const offset = existsSync(logFile) ? statSync(logFile).size : 0;
    const spawned = wall();
    const quote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
    const cmd = options.pty
      ? ['script', '-qfec', `stty cols 200 rows 50; exec ${quote(process.execPath)} ${quote(ENTRY)} chat`, '/dev/null']
      : [process.execPath, ENTRY, 'chat'];
    const proc = Bun.spawn(cmd, {
      cwd: project.root,
      env: { ...project.env, ...(options.pty ? { SHELL: '/bin/sh', TERM: 'xterm-256color' } : {}), ...env },
      stdin: 'pipe',
      stdout: 'pipe',
      stderr: 'pipe',
    });
    bench.children.add(proc);
    void proc.exited.then(() => bench.children.delete(proc));
    const out = new Lines(proc.stdout);
    const err = new Lines(proc.stderr);
    const signal = new Signal();
    let exited = false;
    void proc.exited.then(() => {
      exited = true;
      signal.poke();
    });
    const readyAt = await signal.until(
      () => {
        if (readFrom(logFile, offset).includes(READY_LINE)) return wall();
        if (exited)
          throw new Error(
            `chat exited before it was ready: ${err.lines
              .map((l) => l.text)
              .join('\n')
              .slice(-2000)}`,
          );
        return undefined;
      },
      60_000,
      'chat to be ready',
      5,
    );
    return new ChatProcess(proc, out, err, readyAt - spawned, options.pty ?? false);
  }

  /**
   * Types `text` one key at a time, `keyMs` apart (a person typing), then Enter; when the
   * first key and Enter were written. Only on a pty: piped input has no keystrokes.
   */
  async typeKeys(text: string, keyMs: number): Promise<{ firstKey: number; enter: number }> {
    if (!this.pty) throw new Error('typeKeys needs a chat under a pty');
    let firstKey = 0;
    for (const key of text) {
      const at = wall();
      this.proc.stdin.write(key);
      await this.proc.stdin.flush();
      firstKey ||= at;
      await Bun.sleep(keyMs);
    }
    const enter = wall();
    this.proc.stdin.write('\r');
    await this.proc.stdin.flush();
    return { firstKey, enter };
  }

  /** Types one line; returns when it was written. */
  async type(text: string): Promise<number> {
    const at = wall();
    this.proc.stdin.write(`${text}\n`);
    await this.proc.stdin.flush();
    return at;
  }

  /** Types `marker` and waits for the stub's reply to it: typed → printed. */
  async say(marker: string, timeoutMs = 180_000): Promise<{ typed: number; printed: number; ms: number }> {
    const from = this.out.lines.length;
    const typed = await this.type(marker);
    const line = await this.out.wait(`[stub] ${marker}`, from, timeoutMs);
    return { typed, printed: line.at, ms: line.at - typed };
  }

  /** Ends the input (Ctrl-D on a pty, the end of a pipe otherwise) and waits for the exit. */
  async close(timeoutMs = 90_000): Promise<number | null> {
    try {
      if (this.pty) {
        this.proc.stdin.write('\x04'); // Ctrl-D on an empty line: readline closes
        await this.proc.stdin.flush();
      }
      await this.proc.stdin.end();
    } catch {
      // already closed
    }
    const code = await Promise.race([this.proc.exited, Bun.sleep(timeoutMs).then(() => null)]);
    if (code === null) this.proc.kill('SIGKILL');
    return code;
  }
}

/** VmRSS of a live process, in MB. */
export function rssMb(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = Number(/^VmRSS:\s+(\d+)\s+kB/m.exec(status)?.[1]);
  if (!Number.isFinite(kb)) throw new Error(`no VmRSS for pid ${pid}`);
  return kb / 1024;
}

/** The run log of a container (groups/<folder>/logs/container-*.log naming it), or null. */
export function runLogOf(project: Project, folder: string, containerName: string): string | null {
  const dir = join(project.root, 'groups', folder, 'logs');
  if (!existsSync(dir)) return null;
  for (const file of readdirSync(dir)) {
    if (!file.startsWith('container-')) continue;
    const text = readFileSync(join(dir, file), 'utf8');
    if (text.includes(`Container:  ${containerName}\n`)) return text;
  }
  return null;
}

/** The runner's `[agent-runner] timing <phase> <epoch-ms>` lines: the first time of each phase. */
export function timingPhases(stderr: string | null): Map<string, number> {
  const phases = new Map<string, number>();
  for (const match of (stderr ?? '').matchAll(/\[agent-runner\] timing (\S+) (\d+(?:\.\d+)?)/g)) {
    if (!phases.has(match[1]!)) phases.set(match[1]!, Number(match[2]));
  }
  return phases;
}

/** A fresh temp dir under the bench root. */
export function subdir(bench: Bench, name: string): string {
  const dir = join(bench.root, `${name}-${Math.random().toString(36).slice(2, 8)}`);
  mkdirSync(dir, { recursive: true });
  return dir;
}

// ───────────────────────────── the machine's load and a container's cgroup ─────────────────────────────

/** How busy the machine is at one instant: the 1-minute load average and the kernel's CPU pressure (PSI). */
export interface Conditions {
  at: number;
  load1: number;
  /** `some avg10` of /proc/pressure/cpu: the share of the last 10 s some task waited for a CPU (%). */
  cpuSome10: number | null;
  /** `some total`: all the time, in µs, some task has waited for a CPU since boot. */
  cpuSomeTotalUs: number | null;
}

export function conditions(): Conditions {
  const load1 = Number(readFileSync('/proc/loadavg', 'utf8').split(' ')[0]);
  let cpuSome10: number | null = null;
  let cpuSomeTotalUs: number | null = null;
  try {
    const some = readFileSync('/proc/pressure/cpu', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('some '));
    cpuSome10 = Number(/avg10=([\d.]+)/.exec(some ?? '')?.[1] ?? Number.NaN);
    cpuSomeTotalUs = Number(/total=(\d+)/.exec(some ?? '')?.[1] ?? Number.NaN);
    if (!Number.isFinite(cpuSome10)) cpuSome10 = null;
    if (!Number.isFinite(cpuSomeTotalUs)) cpuSomeTotalUs = null;
  } catch {
    // no PSI in this kernel
  }
  return { at: wall(), load1, cpuSome10, cpuSomeTotalUs };
}

/** `docker inspect` of one container: its id, init pid, and whether it runs or is paused (null when it is gone). */
export function inspect(name: string): { id: string; pid: number; running: boolean; paused: boolean } | null {
  const out = Bun.spawnSync(
    ['docker', 'inspect', '-f', '{{.Id}} {{.State.Pid}} {{.State.Running}} {{.State.Paused}}', name],
    {
      stderr: 'ignore',
    },
  );
  if (out.exitCode !== 0) return null;
  const [id = '', pid = '0', running, paused] = out.stdout.toString().trim().split(' ');
  return { id, pid: Number(pid), running: running === 'true', paused: paused === 'true' };
}

/**
 * A live container's cgroup, read from this machine's /sys/fs/cgroup: CPU used since it
 * started, memory charged to it. cgroup v2 (one tree: cpu.stat usage_usec, memory.current,
 * memory.stat anon) or v1 (cpuacct.usage in ns, memory.usage_in_bytes, memory.stat rss);
 * the path comes from /proc/<pid>/cgroup of its init process, else docker's usual places.
 */
export class ContainerCgroup {
  private constructor(
    readonly name: string,
    private readonly cpuFile: string,
    private readonly v2: boolean,
    private readonly memoryDir: string,
  ) {}

  static of(name: string): ContainerCgroup {
    const info = inspect(name);
    if (!info?.running) throw new Error(`container ${name} is not running: no cgroup to read`);
    const paths = new Map<string, string>();
    try {
      for (const line of readFileSync(`/proc/${info.pid}/cgroup`, 'utf8').split('\n')) {
        const [, controllers, path] = line.split(':');
        if (controllers === undefined || path === undefined) continue;
        for (const c of controllers === '' ? ['unified'] : controllers.split(',')) paths.set(c, path);
      }
    } catch {
      // another pid namespace: fall back to docker's usual paths
    }
    const fs = '/sys/fs/cgroup';
    const v1Cpu = [paths.get('cpuacct'), `/docker/${info.id}`, `/system.slice/docker-${info.id}.scope`]
      .filter((p): p is string => p !== undefined)
      .flatMap((p) => [`${fs}/cpuacct${p}/cpuacct.usage`, `${fs}/cpu,cpuacct${p}/cpuacct.usage`]);
    const v2Dirs = [paths.get('unified'), `/system.slice/docker-${info.id}.scope`, `/docker/${info.id}`]
      .filter((p): p is string => p !== undefined && p !== '/')
      .map((p) => `${fs}${p}`);
    const cpuV1 = v1Cpu.find((f) => existsSync(f));
    if (cpuV1) {
      const memory = [paths.get('memory'), `/docker/${info.id}`, `/system.slice/docker-${info.id}.scope`]
        .filter((p): p is string => p !== undefined)
        .map((p) => `${fs}/memory${p}`)
        .find((d) => existsSync(join(d, 'memory.usage_in_bytes')));
      if (!memory) throw new Error(`no memory cgroup found for ${name}`);
      return new ContainerCgroup(name, cpuV1, false, memory);
    }
    const dir = v2Dirs.find((d) => existsSync(join(d, 'cpu.stat')));
    if (dir) return new ContainerCgroup(name, join(dir, 'cpu.stat'), true, dir);
    throw new Error(
      `no cgroup found for ${name} (id ${info.id.slice(0, 12)}, tried ${[...v1Cpu, ...v2Dirs].join(', ')})`,
    );
  }

  /** CPU time used by everything in the container since it started, in ms. */
  cpuMs(): number {
    const text = readFileSync(this.cpuFile, 'utf8');
    if (!this.v2) return Number(text.trim()) / 1e6;
    return Number(/^usage_usec (\d+)/m.exec(text)?.[1]) / 1000;
  }

  /** Memory charged to the container (page cache included), in MB. */
  memoryMb(): number {
    const file = join(this.memoryDir, this.v2 ? 'memory.current' : 'memory.usage_in_bytes');
    return Number(readFileSync(file, 'utf8').trim()) / 1024 / 1024;
  }

  /** Its anonymous memory (what its processes hold; no page cache), in MB. */
  rssMb(): number {
    const stat = readFileSync(join(this.memoryDir, 'memory.stat'), 'utf8');
    const bytes = Number(new RegExp(`^${this.v2 ? 'anon' : 'rss'} (\\d+)`, 'm').exec(stat)?.[1]);
    return bytes / 1024 / 1024;
  }
}

// ───────────────────────────── baselines: what the machine itself does ─────────────────────────────

/** The floors rows compare against, as the table names them. */
export const DOCKER_FLOOR = '`docker run -i --rm IMAGE`, echo entrypoint → first byte';
export const CLI_FLOOR = '`docker run` of the image’s `kimi --version` → first byte (docker + CLI start)';

/**
 * The limits every agent container runs under (CPU, memory, pids, read-only image…), without
 * its mounts: floors run under them too, so a floor and a figure pay the same CPU limit.
 */
export function hardening(b: Bench): string[] {
  const config = loadConfig(b.root, { TZ: 'UTC' });
  const group = {
    jid: 'floor@g.us',
    name: 'floor',
    folder: 'floor',
    trigger: '@Andy',
    requiresTrigger: true,
    isMain: false,
    allow: [],
    addedAt: '',
  };
  // The bench's own label marks its containers; the network is each caller's; the user is the image's.
  const paired = new Set(['--label', '--network', '--user', '-e']);
  return hardeningArgs(config, group).filter((arg, i, all) => !paired.has(arg) && !paired.has(all[i - 1]!));
}

/** `docker run --rm` of the bench's image under the agents' limits, with another entrypoint. */
function imageRun(b: Bench, options: string[], entrypoint: string, ...args: string[]) {
  return b.spawn([
    'docker',
    'run',
    '--rm',
    '--label',
    b.label,
    ...hardening(b),
    ...options,
    '--entrypoint',
    entrypoint,
    b.image,
    ...args,
  ]);
}

/**
 * The docker floor: the same image with an entrypoint that prints one line at once.
 * firstByte stops at its output (as the agent's figures do); exit when `docker run --rm`
 * returns, so teardown = exit − firstByte is docker's own stop-and-remove.
 */
export async function floorRun(
  b: Bench,
  extra: string[] = [],
): Promise<{ firstByte: number; exit: number; teardown: number }> {
  const started = wall();
  const proc = imageRun(b, ['-i', ...extra], 'echo', 'ready');
  const out = new Lines(proc.stdout);
  void new Lines(proc.stderr, false);
  const first = await out.wait('ready', 0, 60_000);
  const code = await proc.exited;
  const exited = wall();
  if (code !== 0) throw new Error(`the docker floor run exited with ${code}`);
  return { firstByte: first.at - started, exit: exited - started, teardown: exited - first.at };
}

/** The CLI's own floor: `docker run` of the image's `kimi --version` → its first byte (docker + the CLI's start). */
export async function cliFloorRun(b: Bench): Promise<number> {
  const started = wall();
  const proc = imageRun(b, ['-i'], 'kimi', '--version');
  const out = new Lines(proc.stdout);
  void new Lines(proc.stderr, false);
  const first = await out.wait('.', 0, 120_000);
  if ((await proc.exited) !== 0) throw new Error('`kimi --version` failed in the image');
  return first.at - started;
}

/**
 * The CLI's own start in CPU: `kimi --version` in a container under the same limits, which
 * then prints what its cgroup used (cgroup v1 cpuacct.usage in ns, or v2 usage_usec).
 */
export async function cliFloorCpu(b: Bench): Promise<number> {
  const script =
    'kimi --version >/dev/null || exit 3; ' +
    'if [ -r /sys/fs/cgroup/cpuacct/cpuacct.usage ]; then echo ns $(cat /sys/fs/cgroup/cpuacct/cpuacct.usage); ' +
    'else echo us $(sed -n "s/^usage_usec //p" /sys/fs/cgroup/cpu.stat); fi';
  const proc = imageRun(b, [], 'sh', '-c', script);
  const [code, out] = await Promise.all([proc.exited, new Response(proc.stdout).text()]);
  const [unit, value] = out.trim().split(' ');
  const ms = Number(value) / (unit === 'ns' ? 1e6 : 1e3);
  if (code !== 0 || !Number.isFinite(ms))
    throw new Error(`the CLI's CPU floor failed (exit ${code}): ${out.slice(-200)}`);
  return ms;
}

/** An idle container under the same limits (`sleep`): what a container costs doing nothing. */
export function sleeper(b: Bench): string {
  const out = Bun.spawnSync([
    'docker',
    'run',
    '-d',
    '--rm',
    '--label',
    b.label,
    ...hardening(b),
    '--network',
    'none',
    '--entrypoint',
    'sleep',
    b.image,
    '3600',
  ]);
  if (out.exitCode !== 0) throw new Error(`the idle baseline container failed: ${out.stderr.toString().slice(-300)}`);
  return out.stdout.toString().trim();
}

/** CPU used by each cgroup over the same window, in ms. */
export async function cpuOver(ms: number, ...groups: ContainerCgroup[]): Promise<number[]> {
  const before = groups.map((g) => g.cpuMs());
  await Bun.sleep(ms);
  return groups.map((g, k) => g.cpuMs() - before[k]!);
}

/** The model alone: one streamed completion straight from this process (through the timestamping front). */
export async function modelAlone(b: Bench): Promise<number> {
  const started = mono();
  const res = await fetch(`${b.modelUrl}/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      model: 'kimi-k2.5',
      stream: true,
      messages: [
        { role: 'system', content: 'You are Andy.' },
        { role: 'user', content: '<messages>\n<message sender="You" time="now">bench</message>\n</messages>' },
      ],
    }),
  });
  await res.text();
  if (!res.ok) throw new Error(`the model answered ${res.status}`);
  return mono() - started;
}
