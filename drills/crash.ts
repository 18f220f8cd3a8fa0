#!/usr/bin/env bun
/**
 * Crash drill: the real host (drills/host.ts, its own process, the real image) is killed
 * with -9 again and again — at random moments while a container starts, mid-run and
 * during a task, and exactly at each point of the exactly-once protocol
 * (NANOCLAW_CRASH_AT) — then started again. Afterwards every message, IPC request and
 * task must have reached the chat exactly once, and nothing may be left undone.
 *
 *   bun drills/crash.ts [--kills 132] [--seed N] [--groups ROUNDS]   (--groups: the multi-group drill too)
 */
import { parseArgs } from 'node:util';
import { DRILL_CHAT, DRILL_GROUPS } from './host.ts';
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
  /** Or: kill -9 the moment the item's reply is seen going out to the chat. */
  killAtSend?: true;
}

export const KINDS: readonly Kind[] = [
  { drill: 'kill while a container starts', work: 'message', killAfter: [100, 450] },
  { drill: 'kill mid-run', work: 'message', killAfter: [700, 1800] },
  { drill: 'reply recorded, not yet sent', work: 'message', crashAt: 'reply-recorded' },
  { drill: 'reply about to be sent', work: 'message', crashAt: 'outbox-delivering' },
  { drill: 'reply sent, not yet marked sent', work: 'message', crashAt: 'outbox-delivered' },
  { drill: 'kill as the reply goes out', work: 'message', killAtSend: true },
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
    let startKills = 0;
    for (let k = 0; k < options.kills; k++) {
      const kind = KINDS[k % KINDS.length]!;
      const host = new DrillHost(project, kind.crashAt);
      if (!(await host.ready)) {
        // It died at start, on what an earlier host left: that is a kill too, but the kind
        // still gets an item of its own (within a few tries), so no row passes on none.
        kills.set(kind, (kills.get(kind) ?? 0) + 1);
        startKills++;
        options.progress?.(`kill ${k + 1}/${options.kills}: ${kind.drill} (at start, on what an earlier host left)`);
        if (startKills <= 5) {
          // A clean host first finishes what is left, so the next try of this kind is not killed at start again.
          const clean = new DrillHost(project);
          if (await clean.ready) {
            resendUnstored(clean);
            await until(() => Object.values(stuck(project)).every((n) => n === 0), 60_000);
            await clean.close();
          }
          k--;
        }
        continue;
      }
      startKills = 0;
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
      } else if (kind.killAtSend) {
        await until(() => deliveries(project).some((d) => named(item, d.text)), 45_000);
        host.kill();
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
        note: kind.crashAt
          ? `at ${kind.crashAt}`
          : kind.killAtSend
            ? 'kill -9 as the reply is seen going out'
            : `kill -9 after ${kind.killAfter!.join('–')} ms`,
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

/**
 * Three chats at once (main and two groups without a trigger), with follow-ups sent while
 * a turn runs — some land just as it ends — and kills that come twice in a row (the second
 * while the restarted host is still recovering from the first).
 */
export async function runMultiGroupDrill(options: {
  kills: number;
  seed?: number;
  progress?: (line: string) => void;
}): Promise<CrashDrillResult> {
  const seed = options.seed ?? Math.floor(Math.random() * 2 ** 31);
  const rand = random(seed);
  const between = ([low, high]: [number, number]) => low + Math.floor(rand() * (high - low));
  const project: DrillProject = drillProject({ think: () => between([200, 800]) });
  const chats = [DRILL_CHAT, ...DRILL_GROUPS];
  const rows = {
    first: { drill: 'three chats at once', kills: 0, items: [] as string[] },
    followUp: { drill: 'follow-ups during a turn, near its end', kills: 0, items: [] as string[] },
    double: { drill: 'killed twice in a row', kills: 0, items: [] as string[] },
  };
  const sent: { id: string; chat: string }[] = [];
  const send = (host: DrillHost, id: string, chat: string) => {
    sent.push({ id, chat });
    host.send(id, id, chat);
  };
  const resendUnstored = (host: DrillHost) => {
    const stored = storedIds(project);
    for (const { id, chat } of sent) if (!stored.has(id)) host.send(id, id, chat);
  };
  const started = async () => {
    const host = new DrillHost(project);
    if (!(await host.ready)) throw new Error(`a drill host did not start: ${host.lastWords()}`);
    resendUnstored(host);
    return host;
  };
  try {
    for (let k = 0; k < options.kills; k++) {
      const host = await started();
      for (const chat of chats) {
        const id = `g${k}${chat[0]}`;
        rows.first.items.push(id);
        send(host, id, chat);
      }
      // A follow-up for one chat while its turn runs; the model thinks 200–800 ms, so some land at its end.
      await Bun.sleep(between([150, 900]));
      const follow = `f${k}`;
      rows.followUp.items.push(follow);
      send(host, follow, chats[k % chats.length]!);
      await Bun.sleep(between([100, 900]));
      host.kill();
      await host.exited;
      rows.first.kills++;
      rows.followUp.kills++;
      if (k % 2 === 1) {
        // Killed again while recovering what the first kill left, with one more message on the way.
        const again = await started();
        const id = `d${k}`;
        rows.double.items.push(id);
        send(again, id, chats[(k + 1) % chats.length]!);
        await Bun.sleep(between([50, 500]));
        again.kill();
        await again.exited;
        rows.double.kills++;
      }
      options.progress?.(`round ${k + 1}/${options.kills}`);
    }
    const host = await started();
    const all = [...rows.first.items, ...rows.followUp.items, ...rows.double.items];
    await until(() => tally(all, deliveries(project), named).lost === 0, 240_000);
    await until(() => Object.values(stuck(project)).every((n) => n === 0), 60_000);
    await host.close();
    const delivered = deliveries(project);
    const left = stuck(project);
    const stuckCount = Object.values(left).reduce((a, b) => a + b, 0);
    const out: Row[] = Object.values(rows).map((row) => {
      const t = tally(row.items, delivered, named);
      return { drill: row.drill, kills: row.kills, items: t.items, lost: t.lost, doubled: t.doubled, stuck: 0 };
    });
    const t = tally(all, delivered, named);
    const total: Row = {
      drill: 'all',
      kills: rows.first.kills + rows.double.kills,
      items: t.items,
      lost: t.lost,
      doubled: t.doubled,
      stuck: stuckCount,
      note: `seed ${seed}${stuckCount ? `; stuck: ${JSON.stringify(left)}` : ''}`,
    };
    return { rows: out, total, seed };
  } finally {
    project.stop();
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: process.argv.slice(2),
    options: {
      kills: { type: 'string', default: String(KINDS.length * 12) },
      seed: { type: 'string' },
      groups: { type: 'string' },
    },
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
  let bad = result.total.lost + result.total.doubled + result.total.stuck;
  if (values.groups) {
    const rounds = Number(values.groups);
    const groupsStarted = Date.now();
    const multi = await runMultiGroupDrill({
      kills: rounds,
      seed: values.seed ? Number(values.seed) : undefined,
      progress: (line) => process.stderr.write(`${line}\n`),
    });
    printTable(`Multi-group drill: ${rounds} rounds in ${Math.round((Date.now() - groupsStarted) / 1000)} s`, [
      ...multi.rows,
      multi.total,
    ]);
    bad += multi.total.lost + multi.total.doubled + multi.total.stuck;
  }
  process.exit(bad ? 1 : 0);
}
