/**
 * How long does an agent container take to answer, compared with the bare minimum?
 *
 *   bun bench/container-startup.ts [image=nanoclaw-agent:test] [runs=7]
 *
 * Measures, alternating so machine noise hits both alike:
 *   bare:   `docker run --rm --entrypoint true IMAGE` (the floor for any container start)
 *   agent:  the guide's manual test — its JSON piped into `docker run -i --rm IMAGE` —
 *           until the first result marker arrives (Bun starting the runner, the Kimi SDK
 *           spawning the CLI, one turn). With the test image the "model" is the stub.
 * Prints medians and the ratio.
 */
export {}; // a module, for top-level await

const image = process.argv[2] ?? 'nanoclaw-agent:test';
const runs = Number(process.argv[3] ?? 7);
const input = JSON.stringify({ prompt: 'What is 2+2?', groupFolder: 'bench', chatJid: 'bench@g.us', isMain: false, secrets: { KIMI_API_KEY: 'bench' } });

async function bare(): Promise<number> {
  const start = performance.now();
  const proc = Bun.spawn(['docker', 'run', '--rm', '--entrypoint', 'true', image], { stdout: 'ignore', stderr: 'ignore' });
  if ((await proc.exited) !== 0) throw new Error(`docker run ${image} failed: is the image built?`);
  return performance.now() - start;
}

async function firstResult(): Promise<number> {
  const start = performance.now();
  const proc = Bun.spawn(['docker', 'run', '-i', '--rm', image], { stdin: new Blob([input]), stdout: 'pipe', stderr: 'ignore' });
  let output = '';
  const decoder = new TextDecoder();
  for await (const chunk of proc.stdout) {
    output += decoder.decode(chunk, { stream: true });
    if (output.includes('---NANOCLAW_RESULT_END---')) break;
  }
  const elapsed = performance.now() - start;
  await proc.exited;
  if (!output.includes('"status":"success"')) throw new Error(`no successful result:\n${output}`);
  return elapsed;
}

const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
await bare(); // warm the engine's caches once
await firstResult();
const bareTimes: number[] = [];
const agentTimes: number[] = [];
for (let i = 0; i < runs; i++) {
  bareTimes.push(await bare());
  agentTimes.push(await firstResult());
  process.stdout.write(`\r  run ${i + 1}/${runs}`);
}
console.log(`\n${image}, ${runs} runs each`);
console.log(`  bare docker run (true):        median ${median(bareTimes).toFixed(0)} ms  (min ${Math.min(...bareTimes).toFixed(0)}, max ${Math.max(...bareTimes).toFixed(0)})`);
console.log(`  stdin JSON → first result:     median ${median(agentTimes).toFixed(0)} ms  (min ${Math.min(...agentTimes).toFixed(0)}, max ${Math.max(...agentTimes).toFixed(0)})`);
console.log(`  agent start-up above the floor: ${(median(agentTimes) - median(bareTimes)).toFixed(0)} ms (${(median(agentTimes) / median(bareTimes)).toFixed(2)}× the bare start)`);
