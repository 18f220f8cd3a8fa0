/**
 * How fast NanoClaw feels, next to what the machine itself can do: one table.
 *
 *   npm run bench  (= bun bench/run.ts)  [--runs N] [--only ROW[,ROW…]] [--skip ROW[,ROW…]]
 *                                        [--key-ms MS] [--image IMAGE] [--keep]
 *
 * Every figure is a median and a worst over N runs (default 5), beside a baseline
 * measured in the same run (alternating with the figure's runs, so noise hits both; row e's
 * runs beside its figure's, in the same window), and the ratio figure/baseline of the two
 * medians. No baseline is computed, except row 4/f's ideal, and that one from CPU time
 * measured in this run. Everything runs on the real engine with the real image (default
 * nanoclaw-agent:test, built by `./container/build.sh --test`, with the real Kimi Code CLI);
 * only the model is scripted (scripts/scripted-model.ts, on loopback, behind a front that
 * timestamps each request). Progress goes to stderr, the table to stdout, and after it a
 * second table: the machine during each row (load average and CPU pressure before → after,
 * and the CPU stall time, /proc/pressure/cpu `some total`, during it). A busy machine makes
 * the times slower; rows d and e (CPU-seconds, memory) change little with load.
 *
 * Rows (--only / --skip take the names, or the numbers/letters for all rows of one):
 *   a typing     the user's usual path: `bun nanoclaw.ts chat` under a real pseudo-terminal
 *                (util-linux `script`), the message typed one key at a time (--key-ms apart,
 *                default 170), Enter → the reply printed; notes when the container started
 *                (at host start-up, while typing: the pre-warm, or only after Enter) and
 *                whether the host logged the pre-warm — vs the CLI floor of row 1
 *   b pooled     a pooled group's message: the group answered once, its agent stayed up and
 *                was `docker pause`d (WARM_PAUSE_AFTER) → message → reply — vs the docker floor
 *                (`docker run` of an echo entrypoint → first byte); target ≤ 0.15× + the model
 *   c evicted    WARM_POOL_SIZE=1: group A answers, group B answers (A's agent must be stopped),
 *                then A's message → reply, the cold path — vs the CLI floor; target ≤ 1.3×
 *   d cpu        CPU-seconds of a cold start (container start → first result) and of one more
 *                turn, from the container's own cgroup, read while it lives — vs the CPU of
 *                `kimi --version` in a container under the same limits
 *   e idle       what a pooled group's agent costs while it waits: memory (cgroup, and anonymous
 *                only), CPU over 10 s running idle and over 10 s while the host has paused it
 *                (target 0) — vs a `sleep` container of the same image and limits, same window
 *   1 cold       a line typed in `bun nanoclaw.ts chat` (a subprocess, piped stdin: no
 *                keystrokes, so no pre-warm) → its reply printed, with the host's first
 *                container; `docker run` → the CLI ready (ACP initialized, session open); and
 *                where the time goes (host, docker, runner, CLI, MCP, model; the runner's
 *                NANOCLAW_TIMING lines) — vs the floor of a `docker run` of the CLI's own
 *                `kimi --version` (docker + the CLI's start), which is itself shown against a
 *                bare `docker run` → first byte
 *   1 warm       typing first, in process: Host.prewarm, the message a typing time later →
 *                reply — vs the same floor
 *   1 image      the image alone: stdin JSON → first result, vs the same docker run with an
 *                echo entrypoint → first byte (both clocks stop at output; no teardown in either)
 *   2 followup   a follow-up into the live container → reply (vs the model alone), and its
 *                pickup: the host writes the inbox file → the runner has read it (vs fs.watch)
 *   3 task       a scheduled task in a chat with a warm container: due → reply, and the next
 *                chat message after it (warm or cold?) — vs a warm follow-up in the same chat
 *   3 scheduler  how late the Scheduler fires (due → onDue) vs a bare setTimeout for the same instant
 *   4/f burst    20 groups at once at the default MAX_CONCURRENT_CONTAINERS and at 10: first
 *                reply vs one group alone (measured on the same host just before each burst);
 *                all 20 vs the work: 20 × the CPU-seconds of that one alone's start (its cgroup)
 *                / the CPUs — an ideal the limit cannot move (one alone × waves is in the notes)
 *   5 ingest     messages/s through Host.handleInbound into groups with a live container vs raw
 *                autocommit INSERTs of the same row into the same schema
 *   6 cli        `groups list`, `tasks list`, `chat` until ready — vs `bun -e 1`
 *   7 rss        the `chat` host's VmRSS when idle (fresh, and with a live container) vs a bare
 *                `bun -e "setInterval(()=>{},1000)"`
 *   8 slot       after an answer, with another group waiting (WARM_POOL_SIZE=0: the pool keeps answered agents): result → the waiting group’s docker run,
 *                → the container gone — vs docker's own teardown (first output → `run --rm` exits)
 *
 * Rows b, c and e need the warm pool (settings WARM_POOL_SIZE, WARM_PAUSE_AFTER, IDLE_TIMEOUT);
 * without it they fail with a message saying what did not happen (no pause, no eviction)
 * rather than print a figure. Row d gives each run a group of its own, so each start is cold.
 */
import { chmodSync, existsSync, readdirSync, readFileSync, rmSync, watch, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import {
  type Config,
  defaultConcurrency,
  installId,
  loadConfig,
  LOCAL_MAIN_JID,
  ModelProxy,
  RESULT_END,
  type ScheduledTask,
  Scheduler,
  Store,
} from '../nanoclaw.ts';
import {
  Bench,
  CLI_FLOOR,
  ChatProcess,
  cliFloorCpu,
  cliFloorRun,
  cpuOver,
  DOCKER_FLOOR,
  floorRun,
  modelAlone,
  sleeper,
  type Conditions,
  ContainerCgroup,
  conditions,
  inspect,
  ENTRY,
  fineWallClock,
  KEY,
  Lines,
  maxOf,
  median,
  minOf,
  mono,
  progress,
  rssMb,
  runLogOf,
  Signal,
  subdir,
  timingPhases,
  wall,
  type Project,
  type World,
} from './lib.ts';

// ───────────────────────────── the table ─────────────────────────────

type Unit = 'ms' | 'MB' | 'msg/s' | 'CPU-s' | 'CPU-ms';

interface Row {
  key: string;
  figure: string;
  unit: Unit;
  samples: number[];
  baseline: string;
  /** Measured samples, or an ideal computed from measured ones (row 4), or nothing. */
  base: number[] | { median: number; worst: number } | null;
  note?: string;
  /** Why this figure could not be measured (printed as FAILED; the bench then exits 1). */
  failed?: string;
  /** The machine while this row's measurements ran (filled in by main). */
  during?: { before: Conditions; after: Conditions };
}

/** For a rate the worst is the lowest; for a time or a size, the highest. */
const worst = (unit: Unit, values: number[]) => (unit === 'msg/s' ? minOf(values) : maxOf(values));

function format(unit: Unit, value: number | undefined): string {
  if (value === undefined || !Number.isFinite(value)) return 'n/a';
  if (unit === 'msg/s') return `${Math.round(value).toLocaleString('en-US')}/s`;
  const digits = Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : 2;
  return `${value.toFixed(digits)} ${unit}`;
}

function table(rows: Row[], runs: number, image: string): string {
  const lines = [
    `NanoClaw bench: ${runs} runs per figure, ${image}, ${availableParallelism()} CPUs, ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC`,
    '',
    '| # | figure | median | worst | baseline (measured in this run) | median | worst | ratio | n | notes | load 1 min; CPU some avg10: before → after |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const row of rows) {
    const has = row.samples.length > 0;
    const m = has ? median(row.samples) : undefined;
    const w = has ? worst(row.unit, row.samples) : undefined;
    let bm: number | undefined;
    let bw: number | undefined;
    if (Array.isArray(row.base) && row.base.length) {
      bm = median(row.base);
      bw = worst(row.unit, row.base);
    } else if (row.base && !Array.isArray(row.base)) {
      bm = row.base.median;
      bw = row.base.worst;
    }
    const ratio = m !== undefined && bm !== undefined && bm !== 0 ? m / bm : undefined;
    const ratioText = ratio === undefined ? 'n/a' : `${ratio.toFixed(ratio >= 100 ? 0 : ratio >= 10 ? 1 : 2)}×`;
    const cells = [
      row.key,
      row.figure,
      format(row.unit, m),
      format(row.unit, w),
      row.baseline,
      format(row.unit, bm),
      format(row.unit, bw),
      ratioText,
      String(row.samples.length),
      [row.failed && `FAILED: ${row.failed}`, row.note].filter(Boolean).join('; '),
      row.during ? pressureChange(row.during.before, row.during.after) : '',
    ];
    lines.push(`| ${cells.map((c) => c.replace(/\|/g, '\\|')).join(' | ')} |`);
  }
  return `${lines.join('\n')}\n`;
}

const pressureText = (c: Conditions) =>
  `${c.load1.toFixed(2)}; ${c.cpuSome10 === null ? 'n/a' : `${c.cpuSome10.toFixed(1)}%`}`;
const pressureChange = (before: Conditions, after: Conditions) => `${pressureText(before)} → ${pressureText(after)}`;

/**
 * The machine while each row ran: load and CPU pressure at its start and end, and how long
 * some task waited for a CPU during it (/proc/pressure/cpu `some total`, in µs) beside its
 * wall time. A figure taken while tasks waited for a CPU much of the time is a busy machine's.
 */
function conditionsTable(spans: { name: string; before: Conditions; after: Conditions }[]): string {
  const lines = [
    '| row | wall time | load 1 min before → after | CPU some avg10 before → after | CPU stall during (some total) | stall / wall |',
    '|---|---|---|---|---|---|',
  ];
  for (const { name, before, after } of spans) {
    const wallUs = (after.at - before.at) * 1000;
    const stallUs =
      before.cpuSomeTotalUs === null || after.cpuSomeTotalUs === null
        ? null
        : after.cpuSomeTotalUs - before.cpuSomeTotalUs;
    const pct = (v: number | null) => (v === null ? 'n/a' : `${v.toFixed(1)}%`);
    lines.push(
      `| ${[
        name,
        `${(wallUs / 1e6).toFixed(0)} s`,
        `${before.load1.toFixed(2)} → ${after.load1.toFixed(2)}`,
        `${pct(before.cpuSome10)} → ${pct(after.cpuSome10)}`,
        stallUs === null ? 'n/a' : `${stallUs.toLocaleString('en-US')} µs`,
        stallUs === null ? 'n/a' : pct((stallUs / wallUs) * 100),
      ].join(' | ')} |`,
    );
  }
  return `${lines.join('\n')}\n`;
}

// ───────────────────────────── shared measurements ─────────────────────────────

const marker = (row: string, i: number | string) => `bench-${row}-${i}-${Math.random().toString(36).slice(2, 6)}`;

/** Runs a command to its end; its wall time in ms. */
async function timed(b: Bench, cmd: string[], project?: Project): Promise<number> {
  const started = mono();
  const proc = b.spawn(cmd, { cwd: project?.root, env: project?.env });
  const [code, , err] = await Promise.all([
    proc.exited,
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
  ]);
  const ms = mono() - started;
  if (code !== 0) throw new Error(`${cmd.join(' ')} exited with ${code}: ${err.slice(-500)}`);
  return ms;
}

/** The prefix of the container names a project's host gives (nanoclaw-<install id>-, then <folder>- for one group's). */
function containerPrefix(config: Config, folder?: string): string {
  return `nanoclaw-${installId(config)}-${folder ? `${folder}-` : ''}`;
}

/** An active one-off task due at `at` (ms since the epoch). */
function onceTask(
  task: Pick<ScheduledTask, 'id' | 'groupFolder' | 'chatJid' | 'prompt'>,
  at: number,
  contextMode: ScheduledTask['contextMode'],
): ScheduledTask {
  const due = new Date(at).toISOString();
  return {
    ...task,
    scheduleType: 'once',
    scheduleValue: due,
    contextMode,
    nextRun: due,
    lastRun: null,
    lastResult: null,
    status: 'active',
    createdAt: new Date().toISOString(),
  };
}

async function closeAll(world: World, jids: string[]): Promise<void> {
  for (const jid of jids) world.host.queue.closeContainer(jid);
  await new Signal().until(() => world.host.queue.activeCount === 0, 120_000, 'every container to close', 20);
}

// ───────────────────────────── a. the usual path: typing in `chat` on a terminal ─────────────────────────────

/** Milliseconds between keys when row a types (a person typing; --key-ms). */
let keyMs = 170;

async function rowTyping(b: Bench, runs: number): Promise<Row[]> {
  if (!Bun.which('script'))
    throw new Error(
      'row a needs `script` from util-linux for a pseudo-terminal: apt-get install bsdutils (or util-linux)',
    );
  // LOG_LEVEL=debug: the host's file log then says when typing started a container.
  const project = b.project('typing', { LOG_LEVEL: 'debug' });
  const prefix = containerPrefix(loadConfig(project.root, project.env), 'main');
  const logFile = join(project.root, 'logs', 'nanoclaw.log');
  const ask = async (text: string) => {
    const logFrom = existsSync(logFile) ? readFileSync(logFile, 'utf8').length : 0;
    const spawned = wall();
    const chat = await ChatProcess.start(b, project, {}, { pty: true });
    try {
      await Bun.sleep(300); // the prompt is drawn and readline is in raw mode
      const from = chat.out.lines.length;
      const keys = await chat.typeKeys(text, keyMs);
      const printed = (await chat.out.wait(`[stub] ${text}`, from, 180_000)).at;
      const run = b.runs().find((r) => r.at >= spawned && r.name.startsWith(prefix));
      const logged = readFileSync(logFile, 'utf8').slice(logFrom).includes('readying its agent ahead of the message');
      return { ...keys, printed, run, logged };
    } finally {
      await chat.close();
    }
  };
  progress('typing', 'warm-up (not counted): the engine, the first chat, the first session');
  await cliFloorRun(b);
  await ask(marker('typing', 'warmup'));

  const replies: number[] = [];
  const cliFloors: number[] = [];
  const leads: number[] = [];
  const when = { 'at start-up': 0, 'while typing': 0, 'after Enter': 0, never: 0 };
  let logged = 0;
  for (let i = 1; i <= runs; i++) {
    cliFloors.push(await cliFloorRun(b));
    const r = await ask(marker('typing', i));
    replies.push(r.printed - r.enter);
    if (r.logged) logged++;
    const started = !r.run
      ? 'never'
      : r.run.at < r.firstKey
        ? 'at start-up'
        : r.run.at < r.enter
          ? 'while typing'
          : 'after Enter';
    when[started]++;
    if (r.run && r.run.at >= r.firstKey) leads.push(r.run.at - r.firstKey);
    progress(
      'typing',
      `run ${i}/${runs}: Enter → reply ${r.printed - r.enter} ms (typed ${r.enter - r.firstKey} ms); container started ${started}${r.run ? ` (${Math.round(r.run.at - r.firstKey)} ms after the first key)` : ''}; CLI floor ${cliFloors.at(-1)} ms`,
    );
  }
  const started = Object.entries(when)
    .filter(([, n]) => n > 0)
    .map(([what, n]) => `${what} ${n}/${runs}`)
    .join(', ');
  return [
    {
      key: 'a',
      figure: `your usual path: \`chat\` on a pty, typed at ${keyMs} ms a key, Enter → reply printed`,
      unit: 'ms',
      samples: replies,
      baseline: CLI_FLOOR,
      base: cliFloors,
      note: `container started ${started}${leads.length ? ` (median ${Math.round(median(leads))} ms after the first key)` : ''}; host logged the pre-warm ${logged}/${runs}`,
    },
  ];
}

// ───────────────────────────── b. a pooled group's message ─────────────────────────────

/** The warm pool's settings for rows b, c and e (the contract in the header). */
const POOL = { pauseAfterMs: 2_000, idleTimeoutMs: 600_000 };

function poolEnv(size: number, pauseAfterMs = POOL.pauseAfterMs): Record<string, string> {
  return {
    WARM_POOL_SIZE: String(size),
    WARM_PAUSE_AFTER: String(pauseAfterMs),
    IDLE_TIMEOUT: String(POOL.idleTimeoutMs),
  };
}

/** The group's newest container (by the wrapper's log), or an error naming what is missing. */
function newestContainer(b: Bench, prefix: string, after = 0): string {
  const run = b
    .runs()
    .filter((r) => r.at >= after && r.name.startsWith(prefix))
    .at(-1);
  if (!run) throw new Error(`no container started with the prefix ${prefix}`);
  return run.name;
}

/** Waits until the container is paused; a pool that never pauses fails here, loudly. */
async function waitPaused(name: string, pauseAfterMs: number, row: string): Promise<void> {
  const limit = pauseAfterMs + 20_000;
  await new Signal()
    .until(
      () => {
        const state = inspect(name);
        if (!state?.running)
          throw new Error(
            `${row}: the warm pool is not there: the group's container ${name} stopped instead of waiting paused`,
          );
        return state.paused;
      },
      limit,
      'the pause',
      100,
    )
    .catch((err: Error) => {
      if (err.message.startsWith(row)) throw err;
      throw new Error(
        `${row}: the warm pool is not there: the group's container was not paused ${limit / 1000} s after its reply (WARM_PAUSE_AFTER=${pauseAfterMs})`,
      );
    });
}

async function rowPooled(b: Bench, runs: number): Promise<Row[]> {
  const a = '120363000000033333@g.us';
  const world = await b.world('pooled', poolEnv(2), [{ jid: a, folder: 'pa', requiresTrigger: false }]);
  const prefix = containerPrefix(world.config, 'pa');
  const replies: number[] = [];
  const floors: number[] = [];
  const models: number[] = [];
  try {
    progress('pooled', 'warm-up (not counted): the group answers once, cold');
    const first = marker('pooled', 'warmup');
    world.channel.receive(a, first);
    await world.channel.waitReply(a, `[stub] ${first}`, 180_000);
    await floorRun(b);
    for (let i = 1; i <= runs; i++) {
      floors.push((await floorRun(b)).firstByte);
      models.push(await modelAlone(b));
      const name = newestContainer(b, prefix);
      await waitPaused(name, POOL.pauseAfterMs, 'pooled');
      const text = marker('pooled', i);
      const sent = wall();
      world.channel.receive(a, text);
      const reply = await world.channel.waitReply(a, `[stub] ${text}`, 180_000);
      if (b.runs().some((r) => r.at >= sent && r.name.startsWith(prefix)))
        throw new Error(
          'pooled: the paused group’s message started a new container (the cold path), not its pooled agent',
        );
      replies.push(reply.at - sent);
      progress(
        'pooled',
        `run ${i}/${runs}: paused → reply ${reply.at - sent} ms; docker floor ${floors.at(-1)} ms; model alone ${models.at(-1)!.toFixed(1)} ms`,
      );
    }
  } finally {
    await b.closeWorld(world);
  }
  return [
    {
      key: 'b',
      figure: `a pooled group’s message (its agent paused, WARM_PAUSE_AFTER ${POOL.pauseAfterMs} ms) → reply`,
      unit: 'ms',
      samples: replies,
      baseline: DOCKER_FLOOR,
      base: floors,
      note: `target ≤ 0.15× + the model (model alone: median ${median(models).toFixed(1)} ms, this run)`,
    },
  ];
}

// ───────────────────────────── c. an evicted group's message ─────────────────────────────

async function rowEvicted(b: Bench, runs: number): Promise<Row[]> {
  const a = '120363000000044444@g.us';
  const c = '120363000000055555@g.us';
  const world = await b.world('evicted', poolEnv(1), [
    { jid: a, folder: 'ea', requiresTrigger: false },
    { jid: c, folder: 'eb', requiresTrigger: false },
  ]);
  const prefixA = containerPrefix(world.config, 'ea');
  const prefixB = containerPrefix(world.config, 'eb');
  const { channel } = world;
  const answer = async (jid: string, text: string) => {
    const sent = wall();
    channel.receive(jid, text);
    return (await channel.waitReply(jid, `[stub] ${text}`, 180_000)).at - sent;
  };
  const replies: number[] = [];
  const cliFloors: number[] = [];
  try {
    progress('evicted', 'warm-up (not counted): A and B answer once each, cold');
    await answer(a, marker('ev-a', 'warmup'));
    await answer(c, marker('ev-b', 'warmup'));
    await cliFloorRun(b);
    for (let i = 1; i <= runs; i++) {
      cliFloors.push(await cliFloorRun(b));
      await answer(a, marker('ev-a', `${i}-first`));
      const agentA = newestContainer(b, prefixA);
      await answer(c, marker('ev-b', i));
      const agentB = newestContainer(b, prefixB);
      await b.waitEvent(agentA, 'die', 30_000).catch(() => {
        throw new Error(
          `evicted: the warm pool is not there: with WARM_POOL_SIZE=1, group A’s agent was still up 30 s after group B answered (B: ${inspect(agentB)?.running ? 'up' : 'gone'})`,
        );
      });
      const text = marker('ev-a', i);
      const sent = wall();
      const ms = await answer(a, text);
      if (!b.runs().some((r) => r.at >= sent && r.name.startsWith(prefixA)))
        throw new Error('evicted: group A’s message after its eviction started no container (not the cold path)');
      replies.push(ms);
      progress('evicted', `run ${i}/${runs}: evicted → reply ${ms} ms; CLI floor ${cliFloors.at(-1)} ms`);
    }
  } finally {
    await b.closeWorld(world);
  }
  return [
    {
      key: 'c',
      figure: 'an evicted group’s message (WARM_POOL_SIZE 1, another group answered since) → reply',
      unit: 'ms',
      samples: replies,
      baseline: CLI_FLOOR,
      base: cliFloors,
      note: 'target ≤ 1.3×',
    },
  ];
}

// ───────────────────────────── d. CPU per cold start and per turn ─────────────────────────────

async function rowCpu(b: Bench, runs: number): Promise<Row[]> {
  // A group of its own for each run (and the warm-up): its first message is a cold start
  // whatever the pool keeps of the others, and its second goes to the same container.
  const groups = Array.from({ length: runs + 1 }, (_, k) => ({
    jid: `12036300000006${String(k).padStart(4, '0')}@g.us`,
    folder: `cpu${k}`,
    requiresTrigger: false,
  }));
  const world = await b.world('cpu', { IDLE_TIMEOUT: String(POOL.idleTimeoutMs) }, groups);
  const perStart: number[] = [];
  const perTurn: number[] = [];
  const floors: number[] = [];
  const ask = async (jid: string, text: string) => {
    world.channel.receive(jid, text);
    await world.channel.waitReply(jid, `[stub] ${text}`, 180_000);
  };
  try {
    progress('cpu', 'warm-up (not counted)');
    await cliFloorCpu(b);
    await ask(groups[0]!.jid, marker('cpu', 'warmup'));
    await closeAll(world, [groups[0]!.jid]);
    for (let i = 1; i <= runs; i++) {
      const { jid, folder } = groups[i]!;
      const prefix = containerPrefix(world.config, folder);
      floors.push(await cliFloorCpu(b));
      const sent = wall();
      await ask(jid, marker('cpu', `${i}-start`));
      const name = newestContainer(b, prefix, sent);
      const cgroup = ContainerCgroup.of(name);
      const afterFirst = cgroup.cpuMs();
      const turnSent = wall();
      await ask(jid, marker('cpu', `${i}-turn`));
      const afterSecond = cgroup.cpuMs();
      if (b.runs().some((r) => r.at >= turnSent && r.name.startsWith(prefix)))
        throw new Error('cpu: the second message started a new container; its turn was not measured in the first');
      perStart.push(afterFirst / 1000);
      perTurn.push((afterSecond - afterFirst) / 1000);
      await closeAll(world, [jid]);
      progress(
        'cpu',
        `run ${i}/${runs}: cold start + first turn ${(afterFirst / 1000).toFixed(2)} CPU-s, a second turn ${((afterSecond - afterFirst) / 1000).toFixed(2)} CPU-s; \`kimi --version\` ${(floors.at(-1)! / 1000).toFixed(2)} CPU-s`,
      );
    }
  } finally {
    await b.closeWorld(world);
  }
  const base = floors.map((ms) => ms / 1000);
  const baseline = '`kimi --version` in a container, same limits: its cgroup’s CPU';
  return [
    {
      key: 'd',
      figure: 'CPU of a cold start: container start → first result (its cgroup)',
      unit: 'CPU-s',
      samples: perStart,
      baseline,
      base,
      note: 'includes the first turn; load changes it little',
    },
    {
      key: 'd',
      figure: 'CPU of one more turn in the live container (its cgroup)',
      unit: 'CPU-s',
      samples: perTurn,
      baseline,
      base,
    },
  ];
}

// ───────────────────────────── e. what a pooled group costs while it waits ─────────────────────────────

const IDLE_WINDOW_MS = 10_000;

async function rowIdle(b: Bench, runs: number): Promise<Row[]> {
  const g = '120363000000077777@g.us';
  const pauseAfterMs = IDLE_WINDOW_MS + 5_000; // the running window ends before the pause
  const world = await b.world('idle', poolEnv(2, pauseAfterMs), [{ jid: g, folder: 'idle', requiresTrigger: false }]);
  const prefix = containerPrefix(world.config, 'idle');
  const memory = { agent: [] as number[], base: [] as number[] };
  const anon = { agent: [] as number[], base: [] as number[] };
  const running = { agent: [] as number[], base: [] as number[] };
  const paused = { agent: [] as number[], base: [] as number[] };
  let pauseMissing = '';
  try {
    for (let i = 1; i <= runs; i++) {
      const base = ContainerCgroup.of(sleeper(b));
      const text = marker('idle', i);
      world.channel.receive(g, text);
      await world.channel.waitReply(g, `[stub] ${text}`, 180_000);
      const name = newestContainer(b, prefix);
      const agent = ContainerCgroup.of(name);
      await Bun.sleep(1_000); // the reply's own work settles
      const [agentCpu, baseCpu] = await cpuOver(IDLE_WINDOW_MS, agent, base);
      if (inspect(name)?.paused) throw new Error('idle: the agent was paused before its running window ended');
      running.agent.push(agentCpu!);
      running.base.push(baseCpu!);
      memory.agent.push(agent.memoryMb());
      memory.base.push(base.memoryMb());
      anon.agent.push(agent.rssMb());
      anon.base.push(base.rssMb());
      let pausedNote = '';
      if (!pauseMissing) {
        try {
          await waitPaused(name, pauseAfterMs, 'idle');
          const [agentPaused, basePaused] = await cpuOver(IDLE_WINDOW_MS, agent, base);
          paused.agent.push(agentPaused!);
          paused.base.push(basePaused!);
          pausedNote = `, paused ${agentPaused!.toFixed(1)} CPU-ms`;
        } catch (err) {
          pauseMissing = err instanceof Error ? err.message : String(err);
          progress('idle', pauseMissing);
        }
      }
      Bun.spawnSync(['docker', 'rm', '-f', base.name], { stdout: 'ignore', stderr: 'ignore' });
      progress(
        'idle',
        `run ${i}/${runs}: agent ${memory.agent.at(-1)!.toFixed(1)} MB (anon ${anon.agent.at(-1)!.toFixed(1)}), ${agentCpu!.toFixed(1)} CPU-ms per ${IDLE_WINDOW_MS / 1000} s running idle${pausedNote}; sleep container ${memory.base.at(-1)!.toFixed(1)} MB, ${baseCpu!.toFixed(1)} CPU-ms`,
      );
    }
  } finally {
    await b.closeWorld(world);
  }
  const baseline = 'a `sleep` container of the same image and limits, same window';
  const window = `${IDLE_WINDOW_MS / 1000} s`;
  return [
    {
      key: 'e',
      figure: 'a pooled group’s agent waiting for a message: memory charged to its cgroup',
      unit: 'MB',
      samples: memory.agent,
      baseline,
      base: memory.base,
      note: 'page cache included',
    },
    {
      key: 'e',
      figure: 'the same: its processes’ anonymous memory (RSS, no cache)',
      unit: 'MB',
      samples: anon.agent,
      baseline,
      base: anon.base,
    },
    {
      key: 'e',
      figure: `the same: CPU over ${window} running idle (1 s after its reply)`,
      unit: 'CPU-ms',
      samples: running.agent,
      baseline,
      base: running.base,
    },
    {
      key: 'e',
      figure: `the same: CPU over ${window} while \`docker pause\`d by the host`,
      unit: 'CPU-ms',
      samples: paused.agent,
      baseline,
      base: paused.base,
      note: 'target 0',
      failed: pauseMissing || undefined,
    },
  ];
}

// ───────────────────────────── 1. cold reply (chat subprocess) ─────────────────────────────

/** Points on the cold path, in order; a step is measured when both its ends are. */
const COLD_STEPS: [string, string, string][] = [
  ['host: typed → `docker run` invoked', 'typed', 'docker-run'],
  ['docker: `docker run` → container started (engine event)', 'docker-run', 'container-start'],
  ['docker→runner: container started → runner `start`', 'container-start', 'start'],
  ['runner: `start` → `input` (stdin JSON read)', 'start', 'input'],
  ['runner + CLI start: `input` → `cli-up` (ACP initialize answered)', 'input', 'cli-up'],
  ['CLI: `cli-up` → `session` (new or resumed)', 'cli-up', 'session'],
  ['CLI: `session` → `mcp` (the runner’s tools listed)', 'session', 'mcp'],
  ['runner: `mcp` → `cli-ready`', 'mcp', 'cli-ready'],
  ['runner: `cli-ready` → `prompt`', 'cli-ready', 'prompt'],
  ['CLI + MCP: `prompt` → model request', 'prompt', 'model-request'],
  ['model: request → response done (fake model, loopback)', 'model-request', 'model-done'],
  ['CLI + runner: model done → `result`', 'model-done', 'result'],
  ['host: `result` → reply printed', 'result', 'printed'],
  ['(always measured) container started → model request', 'container-start', 'model-request'],
  ['(always measured) model done → reply printed', 'model-done', 'printed'],
];

async function rowCold(b: Bench, runs: number): Promise<Row[]> {
  // LOG_LEVEL=debug: the run log then keeps the container's stderr (the timing lines).
  const project = b.project('cold', { LOG_LEVEL: 'debug' });
  const prefix = containerPrefix(loadConfig(project.root, project.env), 'main');
  progress('cold', 'warm-up (not counted): the engine, the first chat, the first session');
  await floorRun(b);
  const warm = await ChatProcess.start(b, project);
  await warm.say(marker('cold', 'warmup'));
  await warm.close();

  const replies: number[] = [];
  const floors: number[] = [];
  const cliFloors: number[] = [];
  const cliReady: number[] = [];
  const steps = new Map<string, number[]>(COLD_STEPS.map(([label]) => [label, []]));
  let withTiming = 0;
  for (let i = 1; i <= runs; i++) {
    const floor = await floorRun(b);
    floors.push(floor.firstByte);
    cliFloors.push(await cliFloorRun(b));
    const chat = await ChatProcess.start(b, project);
    const text = marker('cold', i);
    let reply: Awaited<ReturnType<ChatProcess['say']>>;
    try {
      reply = await chat.say(text);
    } finally {
      await chat.close();
    }
    replies.push(reply.ms);

    const run = b.runs().find((r) => r.at >= reply.typed && r.name.startsWith(prefix));
    const points = new Map<string, number>([
      ['typed', reply.typed],
      ['printed', reply.printed],
    ]);
    if (run) {
      points.set('docker-run', run.at);
      const started = await b.waitEvent(run.name, 'start', 10_000).catch(() => undefined);
      if (started) points.set('container-start', started);
      const phases = timingPhases(runLogOf(project, 'main', run.name));
      if (phases.size) withTiming++;
      for (const [phase, at] of phases) points.set(phase, at);
    }
    const asked = b.requests.filter((r) => r.arrived >= reply.typed && r.lastUser.includes(text));
    if (asked.length) {
      points.set('model-request', asked[0]!.arrived);
      const done = asked.at(-1)!.done;
      if (done) points.set('model-done', done);
    }
    for (const [label, from, to] of COLD_STEPS) {
      const a = points.get(from);
      const z = points.get(to);
      if (a !== undefined && z !== undefined) steps.get(label)!.push(z - a);
    }
    const [ran, ready] = [points.get('docker-run'), points.get('cli-ready')];
    if (ran !== undefined && ready !== undefined) cliReady.push(ready - ran);
    progress(
      'cold',
      `run ${i}/${runs}: reply ${reply.ms} ms, docker floor ${floor.firstByte} ms${run ? '' : ' (no docker run seen!)'}`,
    );
  }
  const rows: Row[] = [
    {
      key: '1',
      figure: 'cold reply: line typed in `chat` → reply printed (first container)',
      unit: 'ms',
      samples: replies,
      baseline: CLI_FLOOR,
      base: cliFloors,
      note: `target ≤1.3×; runner timing lines in ${withTiming}/${runs} runs`,
    },
    {
      key: '1a',
      figure: '`docker run` invoked → the CLI ready (ACP initialized, session open)',
      unit: 'ms',
      samples: cliReady,
      baseline: CLI_FLOOR,
      base: cliFloors,
    },
    {
      key: '1f',
      figure: 'the floor itself: `docker run` of `kimi --version` → first byte',
      unit: 'ms',
      samples: cliFloors,
      baseline: DOCKER_FLOOR,
      base: floors,
      note: 'what starting the CLI adds to a bare container',
    },
  ];
  COLD_STEPS.forEach(([label], index) => {
    rows.push({
      key: `1.${index + 1}`,
      figure: label,
      unit: 'ms',
      samples: steps.get(label)!,
      baseline: 'share of the cold reply (row 1)',
      base: replies,
    });
  });
  return rows;
}

// ───────────────────────────── 1. the image alone ─────────────────────────────

async function rowImage(b: Bench, runs: number): Promise<Row[]> {
  const dir = subdir(b, 'image-model');
  chmodSync(dir, 0o755);
  // The host's own model proxy, on a socket, in front of the scripted model: what a run gets.
  const proxy = new ModelProxy({ mode: 'unix', dir, upstream: b.modelUrl, apiKey: () => KEY, record: () => {} });
  const proxyRun = proxy.open('bench', `bench-image-${process.pid}`);
  const flags = [
    '--network',
    'none',
    '-v',
    `${proxyRun.socketPath}:/run/nanoclaw/model.sock`,
    '-e',
    'NANOCLAW_MODEL_SOCKET=/run/nanoclaw/model.sock',
  ];
  const input = JSON.stringify({
    prompt: 'What is 2+2?',
    groupFolder: 'bench',
    chatJid: 'bench@g.us',
    isMain: false,
    secrets: { KIMI_API_KEY: proxyRun.token },
  });
  const agentRun = async () => {
    const started = wall();
    const proc = Bun.spawn(['docker', 'run', '-i', '--rm', '--label', b.label, ...flags, b.image], {
      stdin: new Blob([input]),
      stdout: 'pipe',
      stderr: 'ignore',
    });
    b.children.add(proc);
    const out = new Lines(proc.stdout);
    const end = await out.wait(RESULT_END, 0, 120_000);
    await proc.exited;
    b.children.delete(proc);
    if (!out.lines.some((l) => l.text.includes('"status":"success"')))
      throw new Error(
        `the image gave no successful result: ${out.lines
          .map((l) => l.text)
          .join('\n')
          .slice(-1000)}`,
      );
    return end.at - started;
  };
  try {
    progress('image', 'warm-up (not counted)');
    await floorRun(b, flags);
    await agentRun();
    const agent: number[] = [];
    const floor: number[] = [];
    for (let i = 1; i <= runs; i++) {
      floor.push((await floorRun(b, flags)).firstByte);
      agent.push(await agentRun());
      progress('image', `run ${i}/${runs}: first result ${agent.at(-1)} ms, floor ${floor.at(-1)} ms`);
    }
    return [
      {
        key: '1b',
        figure: 'the image alone: stdin JSON → first result (`docker run -i --rm`, model on a socket)',
        unit: 'ms',
        samples: agent,
        baseline: 'same docker flags, echo entrypoint → first byte',
        base: floor,
        note: 'both clocks stop at output; teardown in neither',
      },
    ];
  } finally {
    proxyRun.close();
    proxy.stop();
  }
}

// ───────────────────────────── 1. typing first: a warm start ─────────────────────────────

/** How long the message takes to type after the first keystroke (a short message at human speed). */
const TYPING_MS = 4_000;

async function rowWarm(b: Bench, runs: number): Promise<Row[]> {
  // A main chat that is not a group chat: there only the owner's messages wake main (mayWake).
  const jid = '4915100000003@s.whatsapp.net';
  const world = await b.world('warm', {}, [{ jid, folder: 'warm', isMain: true }]);
  const replies: number[] = [];
  const cliFloors: number[] = [];
  let prewarmed = 0;
  try {
    for (let i = 0; i <= runs; i++) {
      if (i > 0) cliFloors.push(await cliFloorRun(b));
      const text = marker('warm', i);
      if (world.host.prewarm(jid)) prewarmed += i > 0 ? 1 : 0;
      await Bun.sleep(TYPING_MS);
      const sent = wall();
      world.channel.receive(jid, text);
      const reply = await world.channel.waitReply(jid, text, 180_000);
      if (i > 0) replies.push(reply.at - sent); // run 0 warms the engine and the session up
      await closeAll(world, [jid]);
      progress('warm', `run ${i}/${runs}${i === 0 ? ' (warm-up, not counted)' : ''}: reply ${reply.at - sent} ms`);
    }
  } finally {
    await b.closeWorld(world);
  }
  return [
    {
      key: '1w',
      figure: `typing first: container started at the first keystroke, message sent ${TYPING_MS / 1000} s later → reply`,
      unit: 'ms',
      samples: replies,
      baseline: CLI_FLOOR,
      base: cliFloors,
      note: `started ahead ${prewarmed}/${runs}`,
    },
  ];
}

// ───────────────────────────── 2. follow-up into a live container ─────────────────────────────

/** A bare fs.watch in this process: write a file → its event. */
async function fsWatchLatency(dir: string, count: number): Promise<number[]> {
  const seen = new Map<string, number>();
  const signal = new Signal();
  const watcher = watch(dir, (_event, file) => {
    if (file && !seen.has(file)) {
      seen.set(file, mono());
      signal.poke();
    }
  });
  const samples: number[] = [];
  try {
    for (let k = 0; k < count; k++) {
      const name = `f-${k}-${Math.random().toString(36).slice(2, 8)}`;
      const before = mono();
      writeFileSync(join(dir, name), 'x');
      const at = await signal.until(() => seen.get(name), 5_000, 'the fs.watch event', 1);
      samples.push(at - before);
      await Bun.sleep(5);
    }
  } finally {
    watcher.close();
  }
  return samples;
}

async function rowFollowUp(b: Bench, runs: number): Promise<Row[]> {
  const project = b.project('followup');
  const prefix = containerPrefix(loadConfig(project.root, project.env), 'main');
  const watchDir = subdir(b, 'fswatch');
  const chat = await ChatProcess.start(b, project);
  const replies: number[] = [];
  const pickups: number[] = [];
  const models: number[] = [];
  const watches: number[] = [];
  let warm = 0;
  let watcher: ReturnType<typeof watch> | null = null;
  try {
    progress('followup', 'first message (cold, not counted)');
    await chat.say(marker('fu', 'first'));
    const inboxes = readdirSync(join(project.root, 'data', 'input'));
    if (inboxes.length !== 1) throw new Error(`expected one live inbox, found ${inboxes.length}`);
    const inbox = join(project.root, 'data', 'input', inboxes[0]!);
    // The inbox as the host sees it: a follow-up appears (its name starts with the host's
    // Date.now() at writing) and is deleted by the runner once read.
    const files = new Map<string, { written: number; appeared: number; gone?: number }>();
    const changed = new Signal();
    // Bun may fold the delete into the create's event when both come within a millisecond,
    // so a file seen appear is also checked every millisecond until it is gone.
    watcher = watch(inbox, (_event, file) => {
      if (!file || file.startsWith('.') || file === '_close') return;
      const at = wall();
      let seen = files.get(file);
      if (!seen) {
        seen = { written: Number(file.split('-')[0]), appeared: at };
        files.set(file, seen);
        const record = seen;
        void (async () => {
          while (record.gone === undefined && existsSync(join(inbox, file))) await Bun.sleep(1);
          record.gone ??= wall();
          changed.poke();
        })();
      } else if (seen.gone === undefined && !existsSync(join(inbox, file))) {
        seen.gone = at;
      }
      changed.poke();
    });
    for (let i = 1; i <= runs; i++) {
      watches.push(...(await fsWatchLatency(watchDir, 5)));
      models.push(await modelAlone(b));
      const runsBefore = b.runs().filter((r) => r.name.startsWith(prefix)).length;
      const reply = await chat.say(marker('fu', i));
      replies.push(reply.ms);
      if (b.runs().filter((r) => r.name.startsWith(prefix)).length === runsBefore) warm++;
      const file = await changed
        .until(
          () => [...files.values()].find((f) => f.written >= reply.typed && f.gone !== undefined),
          5_000,
          'the follow-up to be read',
        )
        .catch(() => undefined);
      if (file) pickups.push(file.gone! - file.written);
      progress(
        'followup',
        `run ${i}/${runs}: reply ${reply.ms} ms, pickup ${file ? `${file.gone! - file.written} ms` : 'not seen'}, model alone ${models.at(-1)!.toFixed(1)} ms`,
      );
    }
  } finally {
    watcher?.close();
    await chat.close();
  }
  return [
    {
      key: '2',
      figure: 'follow-up into the live container: typed → reply printed',
      unit: 'ms',
      samples: replies,
      baseline: 'the model alone: one streamed completion from this process',
      base: models,
      note: `target ≤ the model + 50 ms; warm (no new docker run) ${warm}/${runs}`,
    },
    {
      key: '2b',
      figure: 'its pickup: host writes the inbox file → runner has read it (file deleted)',
      unit: 'ms',
      samples: pickups,
      baseline: 'bare fs.watch: write → event, this process (5 per run)',
      base: watches,
      note: 'seen gone by a watch event or a 1 ms poll: ~1 ms resolution',
    },
  ];
}

// ───────────────────────────── 3. scheduled task in a warm chat ─────────────────────────────

async function rowTask(b: Bench, runs: number): Promise<Row[]> {
  const project = b.project('task');
  const prefix = containerPrefix(loadConfig(project.root, project.env), 'main');
  const dbPath = join(project.root, 'store', 'messages.db');
  const chat = await ChatProcess.start(b, project);
  const dueToReply: number[] = [];
  const nextReply: number[] = [];
  const warmBase: number[] = [];
  let evicted = 0;
  let taskInNewContainer = 0;
  let baseWarm = 0;
  const count = () => b.runs().filter((r) => r.name.startsWith(prefix)).length;
  try {
    for (let i = 1; i <= runs; i++) {
      await chat.say(marker('tw', i)); // the chat's container is up (cold after an eviction; not counted)
      const beforeBase = count();
      const base = await chat.say(marker('tb', i));
      if (count() === beforeBase) baseWarm++;
      warmBase.push(base.ms);

      const text = marker('task', i);
      const due = wall() + 2_500;
      const beforeTask = count();
      const store = new Store(dbPath);
      try {
        store.createTask(
          onceTask({ id: text, groupFolder: 'main', chatJid: LOCAL_MAIN_JID, prompt: text }, due, 'group'),
        );
      } finally {
        store.close();
      }
      const from = chat.out.lines.length;
      const reply = await chat.out.wait(`[stub] ${text}`, from, 180_000);
      dueToReply.push(reply.at - due);
      if (count() > beforeTask) taskInNewContainer++;

      const beforeNext = count();
      const next = await chat.say(marker('ta', i));
      nextReply.push(next.ms);
      const cold = count() > beforeNext;
      if (cold) evicted++;
      progress(
        'task',
        `run ${i}/${runs}: due → reply ${reply.at - due} ms, next message ${next.ms} ms (${cold ? 'cold: the chat’s container was evicted' : 'warm'}), warm follow-up ${base.ms} ms`,
      );
    }
  } finally {
    await chat.close();
  }
  const baseline = 'warm follow-up in the same chat, same run';
  const baseNote = baseWarm === runs ? '' : `; baseline warm only ${baseWarm}/${runs}`;
  return [
    {
      key: '3',
      figure: 'scheduled task (group context) in a chat with a warm container: due → reply printed',
      unit: 'ms',
      samples: dueToReply,
      baseline,
      base: warmBase,
      note: `task ran in a new container ${taskInNewContainer}/${runs}${baseNote}`,
    },
    {
      key: '3b',
      figure: 'the next chat message after the task → reply printed',
      unit: 'ms',
      samples: nextReply,
      baseline,
      base: warmBase,
      note: `chat container evicted (cold again) ${evicted}/${runs}`,
    },
  ];
}

// ───────────────────────────── 3. scheduler lateness ─────────────────────────────

async function rowScheduler(b: Bench, runs: number): Promise<Row[]> {
  const perRun = 10;
  const dir = subdir(b, 'scheduler');
  const store = new Store(join(dir, 'messages.db'));
  const late: number[] = [];
  const timerLate: number[] = [];
  try {
    for (let i = 1; i <= runs; i++) {
      const clock = fineWallClock();
      const start = Date.now() + 500;
      const due = new Map<string, number>();
      const signal = new Signal();
      let timersDone = 0;
      for (let k = 0; k < perRun; k++) {
        const at = start + k * 150 + ((k * 37) % 100);
        const id = `sched-${i}-${k}`;
        due.set(id, at);
        store.createTask(onceTask({ id, groupFolder: 'bench', chatJid: 'bench@g.us', prompt: 'tick' }, at, 'isolated'));
        // The baseline: a bare timer for an instant 60 ms later (so the two never share a tick).
        const timerAt = at + 60;
        setTimeout(() => {
          timerLate.push(clock() - timerAt);
          timersDone++;
          signal.poke();
        }, timerAt - Date.now());
      }
      let fired = 0;
      const scheduler = new Scheduler(store, 'UTC', (task) => {
        const at = due.get(task.id);
        if (at === undefined) return;
        late.push(clock() - at);
        fired++;
        signal.poke();
      });
      scheduler.start();
      await signal.until(() => fired === perRun && timersDone === perRun, 30_000, 'every firing');
      scheduler.stop();
      progress(
        'scheduler',
        `run ${i}/${runs}: ${perRun} firings, median ${median(late.slice(-perRun)).toFixed(2)} ms late; bare timer median ${median(timerLate.slice(-perRun)).toFixed(2)} ms`,
      );
    }
  } finally {
    store.close();
  }
  return [
    {
      key: '3c',
      figure: `Scheduler: due → handed to the queue (${perRun} firings per run)`,
      unit: 'ms',
      samples: late,
      baseline: 'bare setTimeout for a due instant, same process, same runs',
      base: timerLate,
      note: 'n = firings; the due times are whole ms, the clock sub-ms',
    },
  ];
}

// ───────────────────────────── 4. 20 groups at once ─────────────────────────────

async function rowBurst(b: Bench, runs: number): Promise<Row[]> {
  const count = 20;
  const groups = Array.from({ length: count }, (_, k) => ({
    jid: `1203630000000${String(k).padStart(5, '0')}@g.us`,
    folder: `g${k}`,
  }));
  const jids = groups.map((g) => g.jid);
  const defaultLimit = defaultConcurrency(); // what MAX_CONCURRENT_CONTAINERS is when unset
  const limits = [...new Set([defaultLimit, 10])];
  const worlds: World[] = [];
  for (const limit of limits)
    worlds.push(await b.world(`burst-${limit}`, { MAX_CONCURRENT_CONTAINERS: String(limit) }, groups));
  const single: number[] = [];
  const startCpu: number[] = [];
  const first = new Map<number, number[]>(limits.map((l) => [l, []]));
  const total = new Map<number, number[]>(limits.map((l) => [l, []]));
  /** Closes every container of a world and waits until the engine has removed each one. */
  const settle = async (world: World) => {
    await closeAll(world, jids);
    const prefix = containerPrefix(world.config);
    for (const run of b.runs().filter((r) => r.name.startsWith(prefix))) await b.waitEvent(run.name, 'destroy', 60_000);
  };
  try {
    for (let i = 1; i <= runs; i++) {
      for (const [index, limit] of limits.entries()) {
        const world = worlds[index]!;
        // One group alone, on the same host just before the burst: the unit of the ideal.
        // Its container's CPU, read at the reply, is the work of one start (and its turn).
        const alone = marker('alone', `${i}-${limit}`);
        const t0 = wall();
        world.channel.receive(jids[0]!, `@Andy ${alone}`);
        single.push((await world.channel.waitReply(jids[0]!, `[stub] ${alone}`, 180_000)).at - t0);
        startCpu.push(
          ContainerCgroup.of(newestContainer(b, containerPrefix(world.config, groups[0]!.folder), t0)).cpuMs(),
        );
        await settle(world);
        const texts = jids.map((_, k) => marker(`burst${limit}`, `${i}-${k}`));
        const started = wall();
        for (const [k, jid] of jids.entries()) world.channel.receive(jid, `@Andy ${texts[k]}`);
        const replies = await Promise.all(
          jids.map((jid, k) => world.channel.waitReply(jid, `[stub] ${texts[k]}`, 900_000)),
        );
        const times = replies.map((r) => r.at - started);
        first.get(limit)!.push(minOf(times));
        total.get(limit)!.push(maxOf(times));
        await settle(world);
        progress(
          'burst',
          `run ${i}/${runs}, limit ${limit}: first reply ${minOf(times)} ms, all ${count} ${maxOf(times)} ms (one alone just before: ${single.at(-1)} ms, ${(startCpu.at(-1)! / 1000).toFixed(2)} CPU-s)`,
        );
      }
    }
  } finally {
    for (const world of worlds) await b.closeWorld(world);
  }
  const rows: Row[] = [];
  // The ideal for all replies is the work: every start's CPU (one alone, measured above), spread
  // over every core. Unlike one-alone × waves it does not move with the limit.
  const cores = availableParallelism();
  const work = (cpuMs: number) => (count * cpuMs) / cores;
  const cpuText = `${(median(startCpu) / 1000).toFixed(2)} CPU-s`;
  for (const limit of limits) {
    const waves = Math.ceil(count / limit);
    const label = limit === defaultLimit ? `limit ${limit} (default)` : `limit ${limit}`;
    rows.push({
      key: `4/f L${limit}`,
      figure: `${count} groups at once, ${label}: first reply`,
      unit: 'ms',
      samples: first.get(limit)!,
      baseline: 'ideal: one group alone (measured before each burst) × 1',
      base: { median: median(single), worst: maxOf(single) },
    });
    rows.push({
      key: `4/f L${limit}`,
      figure: `${count} groups at once, ${label}: all ${count} replies`,
      unit: 'ms',
      samples: total.get(limit)!,
      baseline: `ideal by work: ${count} starts × ${cpuText} (one alone, its cgroup, this run) / ${cores} CPUs`,
      base: { median: work(median(startCpu)), worst: work(maxOf(startCpu)) },
      note: `by waves (one alone × ${waves}) it would be ${format('ms', median(single) * waves)}, ratio ${(median(total.get(limit)!) / (median(single) * waves)).toFixed(2)}×; CONTAINER_CPUS ${worlds[0]!.config.container.cpus} each; baseline n = ${startCpu.length}`,
    });
  }
  return rows;
}

// ───────────────────────────── 5. ingest with a live container ─────────────────────────────

async function rowIngest(b: Bench, runs: number): Promise<Row[]> {
  const perRun = 1000;
  const main = '4915100000001@s.whatsapp.net';
  const chatter = '120363000000099999@g.us';
  const world = await b.world('ingest', {}, [
    { jid: main, folder: 'main', isMain: true },
    { jid: chatter, folder: 'chatter' },
  ]);
  const { channel, host } = world;
  const raw: number[] = [];
  const group: number[] = [];
  const mainRates: number[] = [];
  let live = 0;
  const liveChecks = () => (host.queue.isRunning(main) && host.queue.isRunning(chatter) ? 1 : 0);
  try {
    progress('ingest', 'starting both containers (not counted)');
    const m0 = marker('in-m', 0);
    channel.receive(main, m0);
    const c0 = marker('in-c', 0);
    channel.receive(chatter, `@Andy ${c0}`);
    await channel.waitReply(main, `[stub] ${m0}`, 180_000);
    await channel.waitReply(chatter, `[stub] ${c0}`, 180_000);
    for (let i = 1; i <= runs; i++) {
      // Baseline: the same row, autocommit, into a fresh database with the same schema.
      const dir = subdir(b, `raw-${i}`);
      const store = new Store(join(dir, 'messages.db'));
      const insert = store.db.prepare(
        `INSERT OR IGNORE INTO messages (id, chat_jid, sender, sender_name, content, timestamp, is_from_me, is_bot_message)
         VALUES ($id, $chatJid, $sender, $senderName, $content, $timestamp, $isFromMe, $isBotMessage)`,
      );
      let started = mono();
      for (let k = 0; k < perRun; k++) {
        insert.run({
          id: `r${i}-${k}`,
          chatJid: chatter,
          sender: '4915100000002@s.whatsapp.net',
          senderName: 'Alice',
          content: `chatter ${i} ${k}`,
          timestamp: new Date().toISOString(),
          isFromMe: 0,
          isBotMessage: 0,
        });
      }
      raw.push(perRun / ((mono() - started) / 1000));
      store.close();
      rmSync(dir, { recursive: true, force: true });

      // A group chat going on around a live container (no trigger: stored, not handed over).
      started = mono();
      for (let k = 0; k < perRun; k++) channel.receive(chatter, `chatter ${i} ${k}`);
      group.push(perRun / ((mono() - started) / 1000));
      live += liveChecks();
      const reset = marker('in-c', i); // the agent sees the chatter: the next batch starts after it
      channel.receive(chatter, `@Andy ${reset}`);
      await channel.waitReply(chatter, `[stub] ${reset}`, 180_000);

      // The main chat: every message goes to the live container as a follow-up file.
      const texts = Array.from({ length: perRun }, (_, k) => `bench-in-m-${i}-${k}`);
      started = mono();
      for (const text of texts) channel.receive(main, text);
      mainRates.push(perRun / ((mono() - started) / 1000));
      await channel
        .waitReply(main, texts.at(-1)!, 180_000)
        .catch(() => progress('ingest', 'no reply naming the last message (the agent took them in several turns)'));
      await new Signal()
        .until(() => host.queue.isRunning(main), 60_000, 'the main container')
        .catch(async () => {
          const again = marker('in-m', `restart-${i}`);
          channel.receive(main, again);
          await channel.waitReply(main, `[stub] ${again}`, 180_000);
        });
      progress(
        'ingest',
        `run ${i}/${runs}: group chat ${Math.round(group.at(-1)!)}/s, main ${Math.round(mainRates.at(-1)!)}/s, raw insert ${Math.round(raw.at(-1)!)}/s`,
      );
    }
  } finally {
    await b.closeWorld(world);
  }
  const baseline = 'raw autocommit INSERT of the same row, same schema (bun:sqlite, WAL)';
  return [
    {
      key: '5',
      figure: `ingest, group chat with a live container (no trigger: stored, not handed over), ${perRun}/run`,
      unit: 'msg/s',
      samples: group,
      baseline,
      base: raw,
      note: `container live during ${live}/${runs} runs; ratio < 1 = slower`,
    },
    {
      key: '5b',
      figure: `ingest, main chat with a live container (each message handed to it), ${perRun}/run`,
      unit: 'msg/s',
      samples: mainRates,
      baseline,
      base: raw,
    },
  ];
}

// ───────────────────────────── 6. CLI commands ─────────────────────────────

async function rowCli(b: Bench, runs: number): Promise<Row[]> {
  const project = b.project('cli');
  const bun = process.execPath;
  const commands: [string, string[]][] = [
    ['groups list', [bun, ENTRY, 'groups', 'list']],
    ['tasks list', [bun, ENTRY, 'tasks', 'list']],
  ];
  progress('cli', 'warm-up (not counted)');
  await timed(b, [bun, '-e', '1']);
  for (const [, cmd] of commands) await timed(b, cmd, project);
  const base: number[] = [];
  const samples = new Map<string, number[]>([
    ...commands.map(([name]) => [name, []] as [string, number[]]),
    ['chat', []],
  ]);
  for (let i = 1; i <= runs; i++) {
    base.push(await timed(b, [bun, '-e', '1']));
    for (const [name, cmd] of commands) samples.get(name)!.push(await timed(b, cmd, project));
    const chat = await ChatProcess.start(b, project);
    samples.get('chat')!.push(chat.readyMs);
    await chat.close();
    progress(
      'cli',
      `run ${i}/${runs}: bun -e 1 ${base.at(-1)!.toFixed(0)} ms, ${commands.map(([name]) => `${name} ${samples.get(name)!.at(-1)!.toFixed(0)} ms`).join(', ')}, chat ready ${chat.readyMs} ms`,
    );
  }
  const baseline = '`bun -e 1`';
  return [
    ...commands.map(
      ([name]): Row => ({
        key: '6',
        figure: `\`bun nanoclaw.ts ${name}\`: wall time`,
        unit: 'ms',
        samples: samples.get(name)!,
        baseline,
        base,
      }),
    ),
    {
      key: '6',
      figure: '`bun nanoclaw.ts chat`: start → host running (reads stdin)',
      unit: 'ms',
      samples: samples.get('chat')!,
      baseline,
      base,
      note: 'includes the preflight (`docker info`, `docker image inspect`)',
    },
  ];
}

// ───────────────────────────── 7. host memory ─────────────────────────────

async function rowRss(b: Bench, runs: number): Promise<Row[]> {
  const project = b.project('rss');
  const settleMs = 2_000;
  const idle: number[] = [];
  const afterReply: number[] = [];
  const base: number[] = [];
  for (let i = 1; i <= runs; i++) {
    const bare = b.spawn([process.execPath, '-e', 'setInterval(()=>{},1000)']);
    await Bun.sleep(settleMs);
    base.push(rssMb(bare.pid));
    bare.kill();
    await bare.exited;
    const chat = await ChatProcess.start(b, project);
    try {
      await Bun.sleep(settleMs);
      idle.push(rssMb(chat.pid));
      await chat.say(marker('rss', i));
      await Bun.sleep(settleMs);
      afterReply.push(rssMb(chat.pid));
    } finally {
      await chat.close();
    }
    progress(
      'rss',
      `run ${i}/${runs}: chat idle ${idle.at(-1)!.toFixed(1)} MB, after a reply ${afterReply.at(-1)!.toFixed(1)} MB, bare bun ${base.at(-1)!.toFixed(1)} MB`,
    );
  }
  const baseline = 'bare `bun -e "setInterval(()=>{},1000)"`, same wait';
  return [
    {
      key: '7',
      figure: `host RSS, \`chat\` idle (running, no message yet; read ${settleMs / 1000} s after start)`,
      unit: 'MB',
      samples: idle,
      baseline,
      base,
    },
    {
      key: '7b',
      figure: `host RSS, \`chat\` idle after one reply (container live; ${settleMs / 1000} s after it)`,
      unit: 'MB',
      samples: afterReply,
      baseline,
      base,
    },
  ];
}

// ───────────────────────────── 8. the slot after an answer ─────────────────────────────

async function rowSlot(b: Bench, runs: number): Promise<Row[]> {
  const a = '120363000000011111@g.us';
  const c = '120363000000022222@g.us';
  const world = await b.world('slot', { MAX_CONCURRENT_CONTAINERS: '1', WARM_POOL_SIZE: '0' }, [
    { jid: a, folder: 'ga', requiresTrigger: false },
    { jid: c, folder: 'gc', requiresTrigger: false },
  ]);
  const prefixA = containerPrefix(world.config, 'ga');
  const prefixC = containerPrefix(world.config, 'gc');
  const { channel, host } = world;
  const toFree: number[] = [];
  const toGone: number[] = [];
  const toNext: number[] = [];
  const teardown: number[] = [];
  try {
    progress('slot', 'warm-up (not counted)');
    const w = marker('slot', 'warmup');
    channel.receive(a, w);
    await channel.waitReply(a, `[stub] ${w}`, 180_000);
    await closeAll(world, [a, c]);
    for (let i = 1; i <= runs; i++) {
      teardown.push((await floorRun(b)).teardown);
      let result = 0;
      host.onTurn = (event) => {
        if (event.chatJid === a && event.status === 'success' && !result) result = wall();
      };
      const textA = marker('slot-a', i);
      const textC = marker('slot-c', i);
      const sent = wall();
      channel.receive(a, textA);
      const runA = await b.waitRun(sent, prefixA, 60_000);
      channel.receive(c, textC); // waits: the limit is 1
      await new Signal().until(() => result, 180_000, 'the answer', 1);
      host.onTurn = () => {};
      await host.queue.runEnded(a);
      const free = wall();
      const next = await b.waitRun(result, prefixC, 60_000);
      const gone = await b.waitEvent(runA.name, 'destroy', 60_000);
      toFree.push(free - result);
      toGone.push(gone - result);
      toNext.push(next.at - result);
      await channel.waitReply(c, `[stub] ${textC}`, 180_000);
      await closeAll(world, [a, c]);
      progress(
        'slot',
        `run ${i}/${runs}: result → slot free ${free - result} ms, → container gone ${Math.round(gone - result)} ms, → next group's docker run ${Math.round(next.at - result)} ms; docker teardown ${teardown.at(-1)} ms`,
      );
    }
  } finally {
    await b.closeWorld(world);
  }
  const baseline = 'docker teardown: echo container’s first output → `docker run --rm` exits';
  return [
    {
      key: '8',
      figure: 'slot after the answer (another group waiting, limit 1): final result → the waiting group’s `docker run`',
      unit: 'ms',
      samples: toNext,
      baseline,
      base: teardown,
      note: `the slot frees when the answered container is told to close; its process exits after ${median(toFree).toFixed(0)} ms (median)`,
    },
    {
      key: '8b',
      figure: 'final result → its container gone (engine destroy event)',
      unit: 'ms',
      samples: toGone,
      baseline,
      base: teardown,
      note: 'with nobody waiting the container stays for IDLE_TIMEOUT, by design',
    },
  ];
}

// ───────────────────────────── the command ─────────────────────────────

const ROWS: Record<string, { numbers: string[]; run: (b: Bench, runs: number) => Promise<Row[]> }> = {
  typing: { numbers: ['a'], run: rowTyping },
  pooled: { numbers: ['b'], run: rowPooled },
  evicted: { numbers: ['c'], run: rowEvicted },
  cpu: { numbers: ['d'], run: rowCpu },
  idle: { numbers: ['e'], run: rowIdle },
  cold: { numbers: ['1'], run: rowCold },
  image: { numbers: ['1'], run: rowImage },
  warm: { numbers: ['1'], run: rowWarm },
  followup: { numbers: ['2'], run: rowFollowUp },
  task: { numbers: ['3'], run: rowTask },
  scheduler: { numbers: ['3'], run: rowScheduler },
  burst: { numbers: ['4', 'f'], run: rowBurst },
  ingest: { numbers: ['5'], run: rowIngest },
  cli: { numbers: ['6'], run: rowCli },
  rss: { numbers: ['7'], run: rowRss },
  slot: { numbers: ['8'], run: rowSlot },
};

const USAGE = `Usage: bun bench/run.ts [--runs N] [--only ROW[,ROW…]] [--skip ROW[,ROW…]] [--key-ms MS] [--image IMAGE] [--keep]
  --runs N      runs per figure (default 5)
  --only ROW    only these rows, by name or number (repeatable, or comma-separated):
                ${Object.entries(ROWS)
                  .map(([name, row]) => `${row.numbers.join('/')} ${name}`)
                  .join(', ')}
  --skip ROW    all rows but these (e.g. --skip b,c until the warm pool is there)
  --key-ms MS   the time between keys when row a types (default ${keyMs})
  --image IMG   the agent image (default nanoclaw-agent:test; build it with ./container/build.sh --test)
  --keep        leave the temp dir (projects, logs, run logs) for a look; containers still go
Progress goes to stderr; the table (markdown) to stdout.`;

function usageError(message: string): never {
  console.error(`bench: ${message}`);
  console.error(USAGE);
  process.exit(2);
}

/** Row names from --only/--skip items (names, or numbers for every row of that number). */
function rowNames(items: string[] | undefined): string[] {
  const names: string[] = [];
  for (const item of (items ?? [])
    .flatMap((v) => v.split(','))
    .map((v) => v.trim())
    .filter(Boolean)) {
    const found = item in ROWS ? [item] : Object.keys(ROWS).filter((name) => ROWS[name]!.numbers.includes(item));
    if (!found.length) usageError(`unknown row "${item}"`);
    for (const name of found) if (!names.includes(name)) names.push(name);
  }
  return names;
}

function parse(argv: string[]): { runs: number; only: string[]; image: string; keep: boolean; keyMs: number } {
  let parsed: ReturnType<
    typeof parseArgs<{
      options: {
        runs: { type: 'string' };
        only: { type: 'string'; multiple: true };
        skip: { type: 'string'; multiple: true };
        'key-ms': { type: 'string' };
        image: { type: 'string' };
        keep: { type: 'boolean' };
        help: { type: 'boolean'; short: 'h' };
      };
    }>
  >;
  try {
    parsed = parseArgs({
      args: argv,
      options: {
        runs: { type: 'string' },
        only: { type: 'string', multiple: true },
        skip: { type: 'string', multiple: true },
        'key-ms': { type: 'string' },
        image: { type: 'string' },
        keep: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: false,
    });
  } catch (err) {
    usageError(err instanceof Error ? err.message.split('\n')[0]! : String(err));
  }
  if (parsed.values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  const runsText = parsed.values.runs ?? '5';
  if (!/^[1-9]\d*$/.test(runsText)) usageError(`--runs must be a whole number above 0, not "${runsText}"`);
  const keyText = parsed.values['key-ms'] ?? String(keyMs);
  if (!/^[1-9]\d*$/.test(keyText)) usageError(`--key-ms must be a whole number above 0, not "${keyText}"`);
  const only = rowNames(parsed.values.only);
  const skip = rowNames(parsed.values.skip);
  return {
    runs: Number(runsText),
    only: Object.keys(ROWS).filter((n) => (only.length === 0 || only.includes(n)) && !skip.includes(n)),
    keyMs: Number(keyText),
    image: parsed.values.image ?? 'nanoclaw-agent:test',
    keep: parsed.values.keep ?? false,
  };
}

async function main(): Promise<number> {
  const { runs, only, image, keep, keyMs: typingKeyMs } = parse(process.argv.slice(2));
  keyMs = typingKeyMs;
  if (Bun.spawnSync(['docker', 'info'], { stdout: 'ignore', stderr: 'ignore' }).exitCode !== 0) {
    console.error('bench: the Docker engine is not reachable (docker info failed).');
    return 1;
  }
  if (Bun.spawnSync(['docker', 'image', 'inspect', image], { stdout: 'ignore', stderr: 'ignore' }).exitCode !== 0) {
    console.error(
      `bench: the image ${image} is missing; build it with: BUILD_CA_CERT=/etc/ssl/certs/ca-certificates.crt ./container/build.sh --test`,
    );
    return 1;
  }
  const bench = new Bench(image);
  let interrupted = false;
  const onSignal = (signal: string) => {
    if (interrupted) process.exit(130);
    interrupted = true;
    progress('bench', `${signal}: removing this run's containers, processes and temp files`);
    void bench.cleanup(false).finally(() => process.exit(130));
  };
  process.on('SIGINT', () => onSignal('SIGINT'));
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  const rows: Row[] = [];
  const spans: { name: string; before: Conditions; after: Conditions }[] = [];
  let failed = 0;
  const started = mono();
  try {
    await bench.start();
    for (const name of only) {
      progress(name, `starting (${runs} runs)`);
      const rowStarted = mono();
      const before = conditions();
      let measured: Row[];
      try {
        measured = await ROWS[name]!.run(bench, runs);
      } catch (err) {
        if (interrupted) break;
        const message = err instanceof Error ? err.message : String(err);
        progress(name, `FAILED: ${message}`);
        measured = [
          {
            key: ROWS[name]!.numbers[0]!,
            figure: name,
            unit: 'ms',
            samples: [],
            baseline: '',
            base: null,
            failed: message,
          },
        ];
      }
      const after = conditions();
      spans.push({ name, before, after });
      for (const row of measured) {
        row.during = { before, after };
        if (row.failed) failed++;
      }
      rows.push(...measured);
      progress(name, `done in ${((mono() - rowStarted) / 1000).toFixed(0)} s`);
    }
  } finally {
    if (!interrupted) await bench.cleanup(true, keep);
  }
  if (interrupted) return 130;
  progress('bench', `all done in ${((mono() - started) / 1000).toFixed(0)} s`);
  process.stdout.write(table(rows, runs, image));
  process.stdout.write(`\nThe machine during each row (${availableParallelism()} CPUs):\n\n${conditionsTable(spans)}`);
  return failed ? 1 : 0;
}

process.exit(await main());
