/**
 * Costs that should not grow with the work: one task firing, one snapshot write, one
 * recovery sweep, at 10 / 1k / 10k tasks and 10 / 200 groups, on a real SQLite file.
 *
 *   npm run bench:scale  (= bun bench/scale.ts)  [--runs N]
 *
 * Each row is a median and a worst over N runs (default 7) of the call's own time, and the
 * longest event-loop stall seen while it ran: a 1 ms timer notes how late each of its ticks
 * comes. The baseline, measured in the same run, is a bare indexed SQLite read (one task by
 * id). The machine's load average and /proc/pressure/cpu are printed with the table, since
 * other work on the machine shows up in every figure.
 *
 * Firing: one task due among N, fired by the Scheduler (its due look, the claim, the next
 * run). Snapshot: main's current_tasks.json and available_groups.json (main sees every
 * group's tasks, each with 3 past runs), unchanged since the last write and after one task
 * changed. Sweep: Host.recover() with G trigger-only groups, each with 500 unanswered
 * messages that do not call the agent (the chatter of a busy group), 1k tasks.
 */
import { existsSync, readFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { parseArgs } from 'node:util';
import { addGroup, Host, type RegisteredGroup, Scheduler, Store, writeSnapshots } from '../nanoclaw.ts';
import { RecordingChannel, taskRow, tempProject } from '../test/helpers.ts';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '7' } } });
const RUNS = Number(values.runs);
const TICK_MS = 1;

interface Sample {
  ms: number;
  stallMs: number;
}

/** Runs `fn` with a 1 ms timer ticking around it: its own time, and the most any tick came late. */
async function sample(fn: () => unknown): Promise<Sample> {
  let last = performance.now();
  let stallMs = 0;
  const timer = setInterval(() => {
    const now = performance.now();
    stallMs = Math.max(stallMs, now - last - TICK_MS);
    last = now;
  }, TICK_MS);
  await Bun.sleep(5);
  stallMs = 0;
  const started = performance.now();
  await fn();
  const ms = performance.now() - started;
  await Bun.sleep(5);
  clearInterval(timer);
  return { ms, stallMs: Math.max(0, stallMs) };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const worst = (xs: number[]) => Math.max(...xs);
const f = (ms: number) => (ms < 1 ? `${(ms * 1000).toFixed(0)} µs` : `${ms.toFixed(1)} ms`).padStart(9);

const rows: string[] = [];
const worstStalls = new Map<string, number>();
async function row(label: string, prepare: (run: number) => void, fn: (run: number) => unknown): Promise<void> {
  const samples: Sample[] = [];
  for (let run = 0; run < RUNS; run++) {
    prepare(run);
    samples.push(await sample(() => fn(run)));
  }
  const ms = samples.map((s) => s.ms);
  const stalls = samples.map((s) => s.stallMs);
  worstStalls.set(label, worst(stalls));
  const line = `${label.padEnd(44)} ${f(median(ms))} ${f(worst(ms))}   ${f(median(stalls))} ${f(worst(stalls))}`;
  rows.push(line);
  process.stderr.write(`${line}\n`);
}

/** A project with a main group and `groups` trigger-only groups, `tasks` interval tasks over them (3 runs each). */
function world(groupCount: number, taskCount: number) {
  const config = tempProject({ DISK_RESERVE: '1k' });
  const store = new Store(config.dbPath);
  const main = addGroup(config, store, { jid: 'main@s.whatsapp.net', name: 'main', folder: 'main', isMain: true });
  const groups: RegisteredGroup[] = [];
  for (let g = 0; g < groupCount; g++)
    groups.push(addGroup(config, store, { jid: `12036300${g}@g.us`, name: `g${g}`, folder: `g${g}` }));
  const now = Date.now();
  store.transaction(() => {
    for (let t = 0; t < taskCount; t++) {
      const group = groups[t % groups.length]!;
      const id = `task-${t}`;
      store.createTask(
        taskRow({
          id,
          groupFolder: group.folder,
          chatJid: group.jid,
          prompt: `Every hour: look at the news about topic ${t} and tell the group what changed.`,
          scheduleValue: '3600000',
          nextRun: new Date(now + 60_000 + ((t * 3_600_000) / taskCount) * 0.9).toISOString(),
          createdAt: new Date(now - taskCount + t).toISOString(),
        }),
      );
      for (let r = 0; r < 3; r++)
        store.logTaskRun({
          taskId: id,
          runAt: new Date(now - (r + 1) * 3_600_000).toISOString(),
          durationMs: 12_000,
          status: 'success',
          result: `Nothing new about topic ${t} this hour.`,
          error: null,
        });
    }
  });
  return { config, store, main, groups };
}

function pressure(): string {
  const path = '/proc/pressure/cpu';
  return existsSync(path) ? readFileSync(path, 'utf8').trim().replace(/\n/g, ' | ') : 'unavailable';
}

async function main(): Promise<void> {
  const header = `${'row'.padEnd(44)} ${'median'.padStart(9)} ${'worst'.padStart(9)}   ${'stall med'.padStart(9)} ${'stall max'.padStart(9)}`;
  process.stderr.write(`${header}\n`);
  const load = loadavg().map((l) => l.toFixed(2));

  for (const taskCount of [10, 1000, 10_000]) {
    const w = world(10, taskCount);
    const scheduler = new Scheduler(w.store, 'UTC', () => {});
    const fireDue = () => (scheduler as unknown as { fireDue(): void }).fireDue();
    await row(
      `baseline: one task by id (${taskCount} tasks)`,
      () => {},
      (run) => w.store.getTask(`task-${run}`),
    );
    await row(
      `firing: 1 due of ${taskCount} tasks`,
      (run) => w.store.updateTask(`task-${run}`, { nextRun: new Date(Date.now() - 1000).toISOString() }),
      fireDue,
    );
    const written = new Map<string, string>();
    writeSnapshots(w.config, w.store, w.main, written);
    await row(
      `snapshot: main, ${taskCount} tasks, unchanged`,
      () => {},
      () => writeSnapshots(w.config, w.store, w.main, written),
    );
    await row(
      `snapshot: main, ${taskCount} tasks, 1 changed`,
      (run) => w.store.updateTask(`task-${run + RUNS}`, { prompt: `changed ${run}` }),
      () => writeSnapshots(w.config, w.store, w.main, written),
    );
    w.store.close();
  }

  for (const groupCount of [10, 200]) {
    const w = world(groupCount, 1000);
    w.store.transaction(() => {
      for (const group of w.groups)
        for (let m = 0; m < 500; m++)
          w.store.storeMessage({
            id: `${group.folder}-${m}`,
            chatJid: group.jid,
            sender: `4915100${m % 7}@s.whatsapp.net`,
            senderName: `Person ${m % 7}`,
            content: `just chatting, message ${m}, nobody calls the bot here`,
            timestamp: new Date(Date.now() - (500 - m) * 1000).toISOString(),
            isFromMe: false,
            isBotMessage: false,
          });
    });
    const host = new Host(w.config, w.store, [new RecordingChannel([w.main.jid, ...w.groups.map((g) => g.jid)])], {
      recoverySweepMs: 3_600_000,
    });
    host.recover(); // the first sweep also makes the day's backup
    await row(
      `baseline: one task by id (${groupCount} groups)`,
      () => {},
      (run) => w.store.getTask(`task-${run}`),
    );
    await row(
      `sweep: ${groupCount} groups × 500 unanswered`,
      () => {},
      () => host.recover(),
    );
    w.store.close();
  }

  console.log(
    `runs: ${RUNS} each; load average ${load.join(' ')} (at start), ${loadavg()
      .map((l) => l.toFixed(2))
      .join(' ')} (at end)`,
  );
  console.log(`/proc/pressure/cpu: ${pressure()}`);
  console.log(header);
  for (const line of rows) console.log(line);
  const largest = [...worstStalls].filter(([label]) => /10000 tasks|200 groups/.test(label));
  const [code, baseline] = [false, true].map((isBaseline) =>
    largest.filter(([label]) => label.startsWith('baseline') === isBaseline).sort((a, b) => b[1] - a[1]),
  );
  console.log(
    `longest event-loop stall at 10k tasks / 200 groups: ${code![0]![1].toFixed(1)} ms (${code![0]![0]}); ` +
      `in the baseline's runs (a bare query: the machine's own noise): ${baseline![0]![1].toFixed(1)} ms`,
  );
}

await main();
