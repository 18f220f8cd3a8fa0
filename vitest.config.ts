import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    // The default 'forks' pool crashes under Bun; threads work.
    pool: 'threads',
    include: ['test/**/*.test.ts', 'container/agent-runner/test/**/*.test.ts'],
    testTimeout: 30_000,
    hookTimeout: 120_000,
  },
});
