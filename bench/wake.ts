/**
 * How fast does a stored message start an agent run?
 *
 *   bun bench/wake.ts [messages=20]
 *
 * A real Host (real SQLite store, queue, container runner) with a recording channel; the
 * container runtime is a tiny shell script that notes the instant `docker run` is invoked
 * and answers at once. Reports the time from the channel handing over a message to that
 * invocation, next to what a 2-second poll (the original design) would add, computed for
 * the same arrival instants.
 */
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Host, addGroup, setupLogging, Store } from '../nanoclaw.ts';
import { RecordingChannel, tempDir, tempProject, waitFor } from '../test/helpers.ts';

const count = Number(process.argv[2] ?? 20);
const dir = tempDir('nanoclaw-bench-wake-');
const runtime = join(dir, 'docker');
const stamps = join(dir, 'stamps');
writeFileSync(
  runtime,
  `#!/bin/sh\n[ "$1" = run ] || exit 0\ndate +%s%3N >> "${stamps}"\ncat > /dev/null\nprintf -- '---NANOCLAW_RESULT_START---\\n{"status":"success","result":null}\\n---NANOCLAW_RESULT_END---\\n'\n`,
);
chmodSync(runtime, 0o755);
writeFileSync(stamps, '');
const config = tempProject({ CONTAINER_RUNTIME: runtime }, 'KIMI_API_KEY=sk-bench-wake-000\n');
setupLogging(config, { terminalLevel: 'silent' });
const store = new Store(config.dbPath);
addGroup(config, store, { jid: 'me@s.whatsapp.net', name: 'Me', folder: 'main', isMain: true });
const channel = new RecordingChannel(['me@s.whatsapp.net']);
const host = new Host(config, store, [channel], { recoverySweepMs: 3_600_000, ipcSweepMs: 3_600_000 });
await host.start();

const latencies: number[] = [];
const pollDelays: number[] = [];
const pollPhase = Math.random() * 2000;
for (let i = 0; i < count; i++) {
  await waitFor(() => !host.queue.isRunning('me@s.whatsapp.net'), 10_000, 'idle queue');
  await Bun.sleep(50 + Math.random() * 100);
  const sentMs = Date.now();
  channel.receive('me@s.whatsapp.net', `message ${i}`);
  await waitFor(() => readFileSync(stamps, 'utf8').trim().split('\n').filter(Boolean).length === i + 1, 10_000, 'docker run');
  const invokedMs = Number(readFileSync(stamps, 'utf8').trim().split('\n')[i]);
  latencies.push(invokedMs - sentMs);
  pollDelays.push(2000 - ((sentMs + pollPhase) % 2000));
}
await host.stop();
store.close();

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
console.log(`${count} messages`);
console.log(`  event-driven: message → docker run   median ${median(latencies)} ms, worst ${Math.max(...latencies)} ms (millisecond clock; includes starting the runtime process)`);
console.log(`  2 s poll (computed for the same arrivals): median ${median(pollDelays).toFixed(0)} ms, worst ${Math.max(...pollDelays).toFixed(0)} ms`);
