#!/usr/bin/env bun
/**
 * Crash drill: the real host (drills/host.ts, its own process, the real image) is killed
 * with -9 again and again — at random moments while a container starts, mid-run and
 * during a task, and exactly at each point of the exactly-once protocol
 * (NANOCLAW_CRASH_AT) — then started again. Afterwards every message, IPC request and
 * task must have reached the chat exactly once, and nothing may be left undone.
 *
 *   bun drills/crash.ts [--kills 108] [--seed N]
 */
import { parseArgs } from 'node:util';
import {
  DrillHost,
  deliveries,
  drillProject,
  dropIpcMessage,
  dueTask,
  named,
  printTable,
  random,
  storedIds,
  stuck,
  tally,
  until,
  type DrillProject,
  type Row,
} from './harness.ts';

type Work = 'message' | 'ipc' | 'task';
interface Kind {
  drill: string;
  work: Work;
  /** A crash point the host kills itself at, exactly there. */
  crashAt?: string;
  /** Otherwise: kill -9 this many ms after the work was handed over. */
  killAfter?: [number, number];
}

export const KINDS: readonly Kind[] = [
  { drill: 'kill while a container starts', work: 'message', killAfter: [100, 450] },
  { drill: 'kill mid-run', work: 'message', killAfter: [700, 1800] },
  { drill: 'reply recorded, not yet sent', work: 'message', crashAt: 'reply-recorded' },
  { drill: 'reply sent, not yet marked sent', work: 'message', crashAt: 'outbox-delivered' },
  { drill: 'IPC request claimed, not handled', work: 'ipc', crashAt: 'ipc-claimed' },
  { drill: 'IPC request being handled', work: 'ipc', crashAt: 'ipc-handling' },
  { drill: 'IPC request done, not yet sent', work: 'ipc', crashAt: 'ipc-recorded' },
  { drill: 'kill during a task run', work: 'task', killAfter: [400, 1600] },
  { drill: 'task done, result not yet sent', work: 'task', crashAt: 'task-recorded' },
];

export interface CrashDrillResult {
  rows: Row[];
  total: Row;
  seed: number;
}

export async function runCrashDrill(options: {
  kills: number;
  seed?: number;
  progress?: (line: string) => void;
}): Promise<CrashDrillResult> {
  const seed = options.seed ?? Math.floor(Math.random() * 2 ** 31);
  const rand = random(seed);
  const between = ([low, high]: [number, number]) => low + Math.floor(rand() * (high - low));
  // The model thinks a little, so kills land inside runs as well as between them.
  const project: DrillProject = drillProject({ think: () => between([100, 700]) });
  const items = new Map<Kind, string[]>(KINDS.map((k) => [k, []]));
  const kills = new Map<Kind, number>();
  const messages: string[] = [];
  const resendUnstored = (host: DrillHost) => {
    const stored = storedIds(project);
    for (const id of messages) if (!stored.has(id)) host.send(id, id); // as WhatsApp delivers again what was never acknowledged
  };
  try {
    for (let k = 0; k < options.kills; k++) {
      const kind = KINDS[k % KINDS.length]!;
      const host = new DrillHost(project, kind.crashAt);
      if (!(await host.ready)) {
        kills.set(kind, (kills.get(kind) ?? 0) + 1);
        options.progress?.(`kill ${k + 1}/${options.kills}: ${kind.drill} (at start, on what an earlier host left)`);
        continue;
      }
      resendUnstored(host);
      // One fault per item: a random kill waits until what earlier kills left is recovered
      // (the crash points, at start-up, do land on recovered work).
      if (kind.killAfter) await until(() => Object.values(stuck(project)).every((n) => n === 0), 60_000);
      const item = `${kind.work[0]}${k}`;
      items.get(kind)!.push(item);
      if (kind.work === 'message') {
        messages.push(item);
        host.send(item, item);
      } else if (kind.work === 'ipc') {
        dropIpcMessage(project, `${Date.now()}-${k}.json`, item);
      } else {
        dueTask(project, item, item);
      }
      if (kind.crashAt) {
        const died = await Promise.race([host.exited.then(() => true), Bun.sleep(45_000).then(() => false)]);
        if (!died) host.kill();
      } else {
        await Bun.sleep(between(kind.killAfter!));
        host.kill();
      }
      await host.exited;
      kills.set(kind, (kills.get(kind) ?? 0) + 1);
      options.progress?.(`kill ${k + 1}/${options.kills}: ${kind.drill}`);
    }
    // A last, clean host finishes what the kills left.
    const host = new DrillHost(project);
    if (!(await host.ready)) throw new Error('the last, clean host did not start');
    resendUnstored(host);
    const all = [...items.values()].flat();
    await until(() => tally(all, deliveries(project), named).lost === 0, 180_000);
    await until(() => Object.values(stuck(project)).every((n) => n === 0), 60_000);
    await host.close();
    const delivered = deliveries(project);
    const left = stuck(project);
    const stuckCount = Object.values(left).reduce((a, b) => a + b, 0);
    const rows: Row[] = KINDS.map((kind) => {
      const t = tally(items.get(kind)!, delivered, named);
      return {
        drill: kind.drill,
        kills: kills.get(kind) ?? 0,
        items: t.items,
        lost: t.lost,
        doubled: t.doubled,
        stuck: 0,
        note: kind.crashAt ? `at ${kind.crashAt}` : `kill -9 after ${kind.killAfter!.join('–')} ms`,
      };
    });
    const all2 = tally(all, delivered, named);
    const total: Row = {
      drill: 'all',
      kills: options.kills,
      items: all2.items,
      lost: all2.lost,
      doubled: all2.doubled,
      stuck: stuckCount,
      note: `${all2.resentSameId} part(s) sent again under the same id; seed ${seed}${stuckCount ? `; stuck: ${JSON.stringify(left)}` : ''}`,
    };
    return { rows, total, seed };
  } finally {
    project.stop();
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: process.argv.slice(2),
    options: { kills: { type: 'string', default: String(KINDS.length * 12) }, seed: { type: 'string' } },
  });
  const kills = Number(values.kills);
  if (!Number.isInteger(kills) || kills <= 0) {
    console.error('--kills takes a whole number above 0\nUsage: bun drills/crash.ts [--kills N] [--seed N]');
    process.exit(2);
  }
  const started = Date.now();
  const result = await runCrashDrill({
    kills,
    seed: values.seed ? Number(values.seed) : undefined,
    progress: (line) => process.stderr.write(`${line}\n`),
  });
  printTable(
    `Crash drill: ${kills} kills in ${Math.round((Date.now() - started) / 1000)} s (the real host and image)`,
    [...result.rows, result.total],
  );
  const bad = result.total.lost + result.total.doubled + result.total.stuck;
  process.exit(bad ? 1 : 0);
}
