/**
 * How long the Kimi Code CLI takes to start inside the agent image, as the host runs it
 * (the hardening flags of every agent container, no network), next to the floors in the
 * same run: a bare container (`true`) and Bun in one (`bun -e 1`); and what a whole cold
 * reply costs (the agent-runner as the image's entrypoint, step by step).
 *
 *   bun bench/cli-start.ts [--runs N] [IMAGE | NAME=IMAGE …]
 *
 * Each image (default nanoclaw-agent:latest) is asked two things, --runs times each
 * (default 7), the images taking turns so that a noisy moment hits all of them alike:
 *   --version    `docker run … IMAGE kimi --version`, wall time until it exits;
 *   initialize   `docker run -i … IMAGE kimi acp` with an ACP `initialize` request already
 *                on stdin, wall time until the first line of stdout (checked to be the answer).
 *   reply        the image's own entrypoint (the agent-runner) given a prompt on stdin, the
 *                model scripted (scripts/scripted-model.ts) behind the host's real model
 *                proxy on a mounted socket, as a cold run of a new group gets it: the time
 *                from spawning `docker` to each of the runner's NANOCLAW_TIMING marks
 *                (start, input, cli-up, session, mcp, cli-ready, prompt, result; an image
 *                whose runner has fewer marks shows fewer) and the container's CPU-seconds
 *                up to its result, read from its cgroup (cpu.stat usage_usec, or cgroup v1
 *                cpuacct.usage) while it waits for follow-ups; then it is sent `_close`.
 * CPU-seconds of --version and initialize come from extra runs of the same command under
 * bash's `time` inside the container (user+sys of the whole CLI process, start to exit);
 * the wall time of those runs is not used, since bash is not part of a real start.
 * The floors run on the first image. Prints medians and the worst run, the image sizes,
 * the load average before and after, and the CPU count.
 */
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import { ModelProxy } from '../nanoclaw.ts';
import { startFakeModel } from '../scripts/scripted-model.ts';

const HARDENING = [
  '--init',
  '--cap-drop',
  'ALL',
  '--security-opt',
  'no-new-privileges',
  '--read-only',
  '--tmpfs',
  '/tmp:rw,exec,nosuid,nodev,size=1g',
  '--tmpfs',
  '/home/node:rw,exec,nosuid,nodev,uid=1000,gid=1000,size=512m',
  '--network',
  'none',
  '-u',
  '1000',
];
const INITIALIZE = `${JSON.stringify({
  jsonrpc: '2.0',
  id: 1,
  method: 'initialize',
  params: { protocolVersion: 1, clientCapabilities: {} },
})}\n`;
const TIMEOUT_MS = 60_000;

function usage(code: number): never {
  (code ? console.error : console.log)(
    'Usage: bun bench/cli-start.ts [--runs N] [IMAGE | NAME=IMAGE …]\n' +
      '  Start-up of `kimi --version` and `kimi acp` → initialize in each image, with the\n' +
      '  container floors (`true`, `bun -e 1`) measured on the first. Default image: nanoclaw-agent:latest.',
  );
  process.exit(code);
}

function parseArgs(argv: string[]) {
  let runs = 7;
  const images: { name: string; image: string }[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '-h' || arg === '--help') usage(0);
    else if (arg === '--runs' || arg.startsWith('--runs=')) {
      const value = arg === '--runs' ? argv[++i] : arg.slice('--runs='.length);
      runs = Number(value);
      if (!Number.isInteger(runs) || runs < 1) {
        console.error(`--runs needs a whole number ≥ 1, not '${value}'`);
        usage(2);
      }
    } else if (arg.startsWith('-')) {
      console.error(`unknown option '${arg}'`);
      usage(2);
    } else {
      const eq = arg.indexOf('=');
      images.push(eq > 0 ? { name: arg.slice(0, eq), image: arg.slice(eq + 1) } : { name: arg, image: arg });
    }
  }
  if (!images.length) images.push({ name: 'nanoclaw-agent:latest', image: 'nanoclaw-agent:latest' });
  return { runs, images };
}

interface Run {
  /** ms from spawning `docker` to its exit. */
  exitMs: number;
  /** ms to the first line of stdout (NaN if none), and that line. */
  lineMs: number;
  line: string;
  stderr: string;
}

/**
 * One `docker` invocation. With `input`, it is written to stdin at once (before the CLI is
 * up, as the host does) and stdin stays open until the first line of stdout has come, as
 * a client waiting for its answer would; then it is closed. Throws if docker fails.
 */
async function docker(args: string[], input?: string): Promise<Run> {
  const started = performance.now();
  const proc = Bun.spawn(['docker', ...args], { stdin: 'pipe', stdout: 'pipe', stderr: 'pipe' });
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    proc.kill();
  }, TIMEOUT_MS);
  const stderr = new Response(proc.stderr).text();
  if (input !== undefined) {
    proc.stdin.write(input);
    await proc.stdin.flush();
  } else proc.stdin.end();
  let out = '';
  let lineMs = Number.NaN;
  const decoder = new TextDecoder();
  for await (const chunk of proc.stdout) {
    out += decoder.decode(chunk, { stream: true });
    if (Number.isNaN(lineMs) && out.includes('\n')) {
      lineMs = performance.now() - started;
      if (input !== undefined) proc.stdin.end();
    }
  }
  if (input !== undefined && Number.isNaN(lineMs)) proc.stdin.end();
  const code = await proc.exited;
  const exitMs = performance.now() - started;
  clearTimeout(timer);
  if (timedOut) throw new Error(`docker ${args.join(' ')} took over ${TIMEOUT_MS / 1000} s: stopped`);
  if (code !== 0) throw new Error(`docker ${args.join(' ')} exited ${code}: ${(await stderr).trim().slice(-500)}`);
  return { exitMs, lineMs, line: out.split('\n')[0]!, stderr: await stderr };
}

/** The first line must be the answer to the initialize request. */
function checkAnswer(run: Run): number {
  let answer: { id?: unknown; result?: { protocolVersion?: unknown } } = {};
  try {
    answer = JSON.parse(run.line);
  } catch {
    // reported below
  }
  if (answer.id !== 1 || answer.result?.protocolVersion === undefined)
    throw new Error(
      `kimi acp did not answer initialize: first line ${JSON.stringify(run.line.slice(0, 300))}; stderr ${run.stderr.trim().slice(-500)}`,
    );
  return run.lineMs;
}

/** CPU-seconds (user+sys) of one start, from bash's `time` around the command in the container. */
async function cpuSeconds(image: string, command: string, input?: string): Promise<number> {
  const script = `TIMEFORMAT='cpu %3U %3S'; time ${command}`;
  const run = await docker(
    ['run', '--rm', '-i', ...HARDENING, '--entrypoint', '/bin/bash', image, '-c', script],
    input,
  );
  if (input !== undefined) checkAnswer(run);
  const match = /cpu (\d+\.\d+) (\d+\.\d+)/.exec(run.stderr);
  if (!match) throw new Error(`no CPU time from \`${command}\` in ${image}: ${run.stderr.slice(-500)}`);
  return Number(match[1]) + Number(match[2]);
}

/** The runner's NANOCLAW_TIMING marks, in the order a cold run passes them. */
const PHASES = ['start', 'input', 'cli-up', 'session', 'mcp', 'cli-ready', 'prompt', 'result'] as const;

/** CPU-seconds a running container has used so far, from its cgroup (v2 under either driver, or v1). */
function containerCpuSeconds(id: string): number {
  for (const path of [
    `/sys/fs/cgroup/system.slice/docker-${id}.scope/cpu.stat`,
    `/sys/fs/cgroup/docker/${id}/cpu.stat`,
  ]) {
    if (!existsSync(path)) continue;
    const usec = /usage_usec (\d+)/.exec(readFileSync(path, 'utf8'));
    if (usec) return Number(usec[1]) / 1e6;
  }
  const v1 = `/sys/fs/cgroup/cpuacct/docker/${id}/cpuacct.usage`;
  if (existsSync(v1)) return Number(readFileSync(v1, 'utf8')) / 1e9;
  throw new Error(`no cgroup CPU accounting found for container ${id.slice(0, 12)}`);
}

interface Reply {
  /** ms from spawning `docker` to each timing mark the runner wrote. */
  phases: Map<string, number>;
  /** CPU-seconds of the container up to its first result. */
  cpu: number;
}

/**
 * One cold reply: the runner in a fresh container answers one prompt through the model
 * proxy; its CPU is read once the result is out (the container then waits for follow-ups).
 */
async function coldReply(image: string, proxy: ModelProxy, n: number): Promise<Reply> {
  const dir = mkdtempSync(join(tmpdir(), 'nanoclaw-bench-'));
  const name = `nanoclaw-bench-${process.pid}-${n}`;
  const run = proxy.open('bench', name);
  try {
    mkdirSync(join(dir, 'ipc', 'input'), { recursive: true });
    for (const d of [dir, join(dir, 'ipc'), join(dir, 'ipc', 'input')]) chmodSync(d, 0o777);
    const stdin = JSON.stringify({
      prompt: '<messages><message sender="Ann" time="2026-01-01 10:00">hello</message></messages>',
      groupFolder: 'bench',
      chatJid: 'bench@g.us',
      isMain: false,
      secrets: { KIMI_API_KEY: run.token },
    });
    const spawned = Date.now();
    const proc = Bun.spawn(
      [
        'docker',
        'run',
        '-i',
        '--rm',
        '--name',
        name,
        ...HARDENING,
        '-e',
        'NANOCLAW_TIMING=1',
        '-e',
        'NANOCLAW_MODEL_SOCKET=/run/nanoclaw/model.sock',
        '-v',
        `${run.socketPath}:/run/nanoclaw/model.sock`,
        '-v',
        `${join(dir, 'ipc')}:/workspace/ipc`,
        image,
      ],
      { stdin: new Blob([stdin]), stdout: 'pipe', stderr: 'pipe' },
    );
    const timer = setTimeout(() => proc.kill(), TIMEOUT_MS);
    const stderr = new Response(proc.stderr).text();
    let out = '';
    const decoder = new TextDecoder();
    let cpu = Number.NaN;
    for await (const chunk of proc.stdout) {
      out += decoder.decode(chunk, { stream: true });
      if (Number.isNaN(cpu) && out.includes('---NANOCLAW_RESULT_END---')) {
        const id = (await docker(['inspect', '--format', '{{.Id}}', name])).line.trim();
        cpu = containerCpuSeconds(id);
        writeFileSync(join(dir, 'ipc', 'input', '_close'), '');
      }
    }
    const code = await proc.exited;
    clearTimeout(timer);
    const err = await stderr;
    if (Number.isNaN(cpu) || !out.includes('"status":"success"'))
      throw new Error(`the runner in ${image} gave no answer (exit ${code}): ${out.slice(-300)} ${err.slice(-800)}`);
    const phases = new Map<string, number>();
    for (const [, phase, at] of err.matchAll(/timing (\S+) (\d+)/g)) phases.set(phase!, Number(at) - spawned);
    return { phases, cpu };
  } finally {
    run.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
};
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
const secs = (ms: number) => (ms / 1000).toFixed(2);

async function imageSize(image: string): Promise<number> {
  return Number((await docker(['image', 'inspect', '--format', '{{.Size}}', image])).line.trim());
}

if (import.meta.main) {
  const { runs, images } = parseArgs(process.argv.slice(2));
  const sizes = new Map<string, number>();
  for (const { image } of images) {
    try {
      sizes.set(image, await imageSize(image));
    } catch {
      console.error(`The image ${image} does not exist: build it (./container/build.sh) or name another.`);
      process.exit(1);
    }
  }
  const first = images[0]!.image;
  const run = (image: string, entrypoint: string, ...rest: string[]) => [
    'run',
    '--rm',
    ...HARDENING,
    '--entrypoint',
    entrypoint,
    image,
    ...rest,
  ];
  const interactive = (image: string) => ['run', '--rm', '-i', ...HARDENING, '--entrypoint', 'kimi', image, 'acp'];

  // Warm-up (not counted): the engine's and the page cache's first touch of each image.
  for (const { image } of images) await docker(run(image, 'kimi', '--version'));

  // The host's model proxy in front of the scripted model: what a run gets mounted.
  const model = startFakeModel();
  const proxyDir = mkdtempSync(join(tmpdir(), 'nanoclaw-bench-proxy-'));
  chmodSync(proxyDir, 0o755);
  const proxy = new ModelProxy({
    mode: 'unix',
    dir: proxyDir,
    upstream: model.url,
    apiKey: () => 'sk-bench',
    record: () => {},
  });
  const replies = new Map<string, Reply[]>();

  const load = { before: loadavg(), after: '' };
  const wallRows = new Map<string, number[]>();
  const cpuRows = new Map<string, number[]>();
  const add = (rows: Map<string, number[]>, key: string, value: number) =>
    rows.set(key, [...(rows.get(key) ?? []), value]);
  for (let i = 0; i < runs; i++) {
    process.stderr.write(`run ${i + 1}/${runs}\r`);
    add(wallRows, 'floor true', (await docker(run(first, 'true'))).exitMs);
    add(wallRows, 'floor bun -e 1', (await docker(run(first, 'bun', '-e', '1'))).exitMs);
    add(cpuRows, 'floor bun -e 1', await cpuSeconds(first, 'bun -e 1'));
    for (const { name, image } of images) {
      add(wallRows, `${name} --version`, (await docker(run(image, 'kimi', '--version'))).exitMs);
      add(wallRows, `${name} initialize`, checkAnswer(await docker(interactive(image), INITIALIZE)));
      add(cpuRows, `${name} --version`, await cpuSeconds(image, 'kimi --version'));
      add(cpuRows, `${name} initialize`, await cpuSeconds(image, 'kimi acp', INITIALIZE));
      replies.set(name, [...(replies.get(name) ?? []), await coldReply(image, proxy, i)]);
    }
  }
  load.after = loadavg();
  proxy.stop();
  model.stop();
  rmSync(proxyDir, { recursive: true, force: true });

  console.log(`\nKimi Code CLI start-up, ${runs} runs each, docker run with the hardening flags and --network none`);
  console.log(`CPUs: ${availableParallelism()}; load average before: ${load.before}; after: ${load.after}\n`);
  console.log('| what | image size | wall median | wall worst | CPU-s median | CPU-s worst |');
  console.log('|---|---:|---:|---:|---:|---:|');
  const mb = (bytes: number | undefined) => (bytes === undefined ? '' : `${(bytes / 1e6).toFixed(0)} MB`);
  for (const [key, values] of wallRows) {
    const cpu = cpuRows.get(key);
    const name = key.replace(/ (--version|initialize|true|bun -e 1)$/, '');
    const size = key.startsWith('floor') ? undefined : sizes.get(images.find((i) => i.name === name)!.image);
    console.log(
      `| ${key} | ${mb(size)} | ${secs(median(values))} s | ${secs(Math.max(...values))} s | ${
        cpu ? median(cpu).toFixed(2) : ''
      } | ${cpu ? Math.max(...cpu).toFixed(2) : ''} |`,
    );
  }
  console.log(
    '\n--version: until the container exits; initialize: until the first line of `kimi acp`.\n' +
      'CPU-s: user+sys of the CLI inside the container (separate runs under bash `time`, start to exit).',
  );

  console.log(
    '\nA cold reply (the runner, a new session, one prompt): seconds from `docker run` to each mark, median (worst)',
  );
  console.log(`| image | ${PHASES.join(' | ')} | CPU-s to result | result / initialize | result / floor true |`);
  console.log(`|---|${PHASES.map(() => '---:').join('|')}|---:|---:|---:|`);
  const floor = median(wallRows.get('floor true')!);
  for (const [name, runsOf] of replies) {
    const cells = PHASES.map((phase) => {
      const values = runsOf.map((r) => r.phases.get(phase)).filter((v): v is number => v !== undefined);
      return values.length ? `${secs(median(values))} (${secs(Math.max(...values))})` : '—';
    });
    const cpus = runsOf.map((r) => r.cpu);
    const result = median(runsOf.map((r) => r.phases.get('result') ?? Number.NaN));
    const init = median(wallRows.get(`${name} initialize`)!);
    console.log(
      `| ${name} | ${cells.join(' | ')} | ${median(cpus).toFixed(2)} (${Math.max(...cpus).toFixed(2)}) | ${(result / init).toFixed(2)}× | ${(result / floor).toFixed(2)}× |`,
    );
  }
  console.log(
    "\nresult / initialize: the cold reply against the CLI's own start floor in the image (docker run → `kimi acp` answers initialize).\n" +
      'CPU-s to result: the whole container (runner, CLI, MCP server, Chromium never), from its cgroup.',
  );
}
