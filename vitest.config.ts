import { defineConfig } from 'vitest/config';

// Tests that drive the real Docker engine, or kill and fault real hosts, run one file at a
// time after everything else; the rest run two files at once (most of their time is spent
// waiting on child processes, not on the CPU).
const ENGINE = ['test/e2e.test.ts', 'test/hostile.test.ts', 'test/drills.test.ts', 'test/pause.test.ts'];

const shared = {
  // The default 'forks' pool crashes under Bun; threads work.
  pool: 'threads' as const,
  // Generous: on a busy 2-core machine (two suites at once) a test that spawns a dozen
  // Bun processes can take a while; no test depends on being fast.
  testTimeout: 120_000,
  hookTimeout: 120_000,
  // One temp folder per run (TMPDIR), removed at its end.
  globalSetup: ['test/global-setup.ts'],
};

export default defineConfig({
  test: {
    projects: [
      {
        test: {
          ...shared,
          name: 'unit',
          include: ['test/**/*.test.ts', 'container/agent-runner/test/**/*.test.ts'],
          exclude: ENGINE,
          maxWorkers: 2,
          sequence: { groupOrder: 0 },
        },
      },
      {
        test: {
          ...shared,
          name: 'engine',
          include: ENGINE,
          fileParallelism: false,
          sequence: { groupOrder: 1 },
        },
      },
    ],
  },
});
