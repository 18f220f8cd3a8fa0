/**
 * How late do scheduled tasks fire?
 *
 *   bun bench/scheduler.ts [firings=30]
 *
 * Creates tasks due at staggered instants (one every 150 ms, at odd sub-second offsets)
 * in a fresh store and lets the real Scheduler fire them, recording how long after its
 * due time each one was handed to the queue. As a baseline in the same run it replays
 * the same due times against a once-a-minute poll (the original's design), whose
 * lateness is computed from the poll instants.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Scheduler, Store } from '../nanoclaw.ts';

const firings = Number(process.argv[2] ?? 30);
const dir = mkdtempSync(join(tmpdir(), 'nanoclaw-bench-sched-'));
const store = new Store(join(dir, 'messages.db'));
const start = Date.now() + 500;
const due = new Map<string, number>();
for (let i = 0; i < firings; i++) {
  const at = start + i * 150 + ((i * 37) % 100);
  const id = `bench-${i}`;
  due.set(id, at);
  store.createTask({
    id, groupFolder: 'bench', chatJid: 'bench@g.us', prompt: 'tick', scheduleType: 'once', scheduleValue: new Date(at).toISOString(),
    contextMode: 'isolated', nextRun: new Date(at).toISOString(), lastRun: null, lastResult: null, status: 'active', createdAt: new Date().toISOString(),
  });
}
const lateness: number[] = [];
await new Promise<void>((done) => {
  const scheduler = new Scheduler(store, 'UTC', (task) => {
    lateness.push(Date.now() - due.get(task.id)!);
    if (lateness.length === firings) {
      scheduler.stop();
      done();
    }
  });
  scheduler.start();
});
store.close();
rmSync(dir, { recursive: true, force: true });

const stats = (values: number[]) => {
  const sorted = [...values].sort((a, b) => a - b);
  return { median: sorted[Math.floor(sorted.length / 2)]!, worst: sorted.at(-1)! };
};
// Baseline: a poll every 60 s starting at a random phase picks each task up at the next tick.
const pollPhase = Math.random() * 60_000;
const polled = [...due.values()].map((at) => {
  const sincePhase = at - (start - pollPhase);
  return Math.ceil(sincePhase / 60_000) * 60_000 - sincePhase;
});
const ours = stats(lateness);
const poll = stats(polled);
console.log(`${firings} firings`);
console.log(`  Scheduler (timer):       median ${ours.median} ms late, worst ${ours.worst} ms`);
console.log(`  60 s poll (baseline):    median ${Math.round(poll.median)} ms late, worst ${Math.round(poll.worst)} ms`);
console.log(`  ratio of medians:        ${(poll.median / Math.max(ours.median, 1)).toFixed(0)}× earlier`);
