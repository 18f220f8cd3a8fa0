/**
 * The fast drills, in CI: the real host as a separate process with the real image, killed
 * with -9 (every kind of kill, twice) and put under each ordinary fault. Nothing may be
 * lost, doubled or left undone. The long runs are `bun drills/crash.ts` (108 kills) and
 * `bun drills/faults.ts`; their tables are in docs/drills.md.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { KINDS, runCrashDrill, runMultiGroupDrill } from '../drills/crash.ts';
import { FAULT_DRILLS } from '../drills/faults.ts';
import { IMAGE, type Row } from '../drills/harness.ts';

beforeAll(() => {
  if (Bun.spawnSync(['docker', 'image', 'inspect', IMAGE]).exitCode !== 0)
    throw new Error(`The image ${IMAGE} is missing: run ./container/build.sh --test`);
});

const clean = (row: Row) => ({ drill: row.drill, lost: row.lost, doubled: row.doubled, stuck: row.stuck });

describe('crash drill', () => {
  it(`kill -9 at every point, ${KINDS.length * 2} times: every message, IPC request and task reaches the chat exactly once`, {
    timeout: 600_000,
  }, async () => {
    const { rows, total } = await runCrashDrill({ kills: KINDS.length * 2, seed: 20261201 });
    expect(total.kills).toBeGreaterThanOrEqual(KINDS.length * 2);
    // Every kind of kill had work of its own to lose: a row with no items proves nothing.
    for (const row of rows) expect(row.items, row.drill).toBeGreaterThan(0);
    expect(rows.map(clean)).toEqual(rows.map((r) => ({ drill: r.drill, lost: 0, doubled: 0, stuck: 0 })));
    expect(clean(total)).toEqual({ drill: 'all', lost: 0, doubled: 0, stuck: 0 });
  });
});

describe('multi-group drill', () => {
  it('three chats at once, follow-ups near a turn’s end, kills twice in a row: each message reaches its chat exactly once', {
    timeout: 600_000,
  }, async () => {
    const { rows, total } = await runMultiGroupDrill({ kills: 4, seed: 20261202 });
    for (const row of rows) expect(row.items, row.drill).toBeGreaterThan(0);
    expect(rows.map(clean)).toEqual(rows.map((r) => ({ drill: r.drill, lost: 0, doubled: 0, stuck: 0 })));
    expect(clean(total)).toEqual({ drill: 'all', lost: 0, doubled: 0, stuck: 0 });
  });
});

describe('fault drills', () => {
  for (const [name, drill] of Object.entries(FAULT_DRILLS)) {
    it(`${name}: nothing lost, doubled or left undone, and the host keeps running`, { timeout: 300_000 }, async () => {
      const row = await drill();
      expect(row.items).toBeGreaterThan(0);
      expect(row.note ?? '').not.toContain('DIED');
      // The database faults must have been felt (the host logged them), or the drill proves nothing.
      if (name === 'dbLocked' || name === 'walReadOnly') expect(row.note).toMatch(/felt: [1-9]/);
      expect(clean(row)).toEqual({ drill: row.drill, lost: 0, doubled: 0, stuck: 0 });
    });
  }
});
