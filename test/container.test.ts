import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  groupMounts,
  installId,
  MAX_RUN_OUTPUT,
  ModelProxy,
  preflight,
  removeLeftoverContainers,
  RUN_LOGS_KEPT,
  runContainer,
  runLogsToPrune,
  setupLogging,
  Store,
  addGroup,
  type Config,
  type ContainerInput,
  type ContainerResult,
  type RegisteredGroup,
  engineSocket,
  readLines,
} from '../nanoclaw.ts';
import { FakeClock, fakeDocker, tempDir, tempProject, type FakeDocker } from './helpers.ts';

const SECRET = 'sk-container-test-0123456789';

let docker: FakeDocker;
let config: Config;
let store: Store;
let group: RegisteredGroup;

function input(prompt: string, extra: Partial<ContainerInput> = {}): ContainerInput {
  return {
    prompt,
    groupFolder: group.folder,
    chatJid: group.jid,
    isMain: group.isMain,
    isScheduledTask: false,
    assistantName: 'Andy',
    secrets: { KIMI_API_KEY: SECRET },
    ...extra,
  };
}

const message = (text: string) =>
  `<messages>\n<message sender="Alice" time="2026-01-01 10:00">${text}</message>\n</messages>`;

async function run(
  prompt: string,
  extra: Partial<ContainerInput> = {},
  onStart?: Parameters<typeof runContainer>[0]['onStart'],
  proxy?: ModelProxy,
  clock?: FakeClock,
) {
  const results: ContainerResult[] = [];
  const outcome = await runContainer({
    config,
    group,
    input: input(prompt, extra),
    mounts: groupMounts(config, group),
    acceptsFollowUps: true,
    proxy,
    onResult: async (result) => {
      results.push(result);
    },
    onStart,
    clock,
  });
  return { outcome, results };
}

/** A stand-in for Moonshot on loopback that checks the key and records what reached it. */
function fakeUpstream() {
  const seen: { path: string; auth: string | null; body: string }[] = [];
  const server = Bun.serve({
    hostname: '127.0.0.1',
    port: 0,
    async fetch(req) {
      seen.push({ path: new URL(req.url).pathname, auth: req.headers.get('authorization'), body: await req.text() });
      if (req.headers.get('authorization') !== `Bearer ${SECRET}`)
        return Response.json({ error: { message: 'Invalid Authentication' } }, { status: 401 });
      return Response.json({
        choices: [{ message: { role: 'assistant', content: 'hello from upstream' } }],
        usage: { prompt_tokens: 11, completion_tokens: 3 },
      });
    },
  });
  return { url: `http://127.0.0.1:${server.port}/v1`, seen, stop: () => server.stop(true) };
}

beforeEach(() => {
  docker = fakeDocker();
  config = tempProject({ CONTAINER_RUNTIME: docker.path, CONTAINER_TIMEOUT: '60000' });
  setupLogging(config, { terminalLevel: 'silent', secrets: [SECRET] });
  store = new Store(config.dbPath);
  group = addGroup(config, store, { jid: 'fam@g.us', name: 'Family', folder: 'family' });
});

afterEach(() => store.close());

describe('runContainer with a fake docker', () => {
  it('runs docker with the exact flags and mounts of the contract', async () => {
    await run(message('hi'), {}, (live) => live.close());
    const [call] = docker.runs();
    const argv = call!.argv;
    expect(argv.slice(0, 4)).toEqual(['run', '-i', '--rm', '--name']);
    expect(argv[4]).toBe(`nanoclaw-${installId(config)}-family-${argv[4]!.split('-').at(-1)}`);
    expect(argv[4]).toMatch(/-\d{13}$/);
    for (const flag of [
      '--cap-drop',
      '--security-opt',
      '--pids-limit',
      '--memory',
      '--cpus',
      '--read-only',
      '--network',
    ])
      expect(argv).toContain(flag);
    expect(argv).toContain(`nanoclaw.install=${installId(config)}`);
    expect(argv.at(-1)).toBe('nanoclaw-agent:latest');
    const volumes = argv.flatMap((arg, i) => (argv[i - 1] === '-v' ? [arg] : []));
    const root = config.projectRoot;
    expect(volumes).toEqual([
      `${root}/groups/family:/workspace/group`,
      `${root}/groups/family/logs:/workspace/group/logs:ro`,
      `${root}/groups/global:/workspace/global:ro`,
      `${root}/data/ipc/family:/workspace/ipc`,
      `${root}/data/sessions/family/.kimi:/home/node/.kimi`,
      `${root}/data/input/${argv[4]!.replace(/^nanoclaw-/, '')}:/workspace/ipc/input`, // the run's own inbox
      `${root}/data/proxy/${argv[4]!.replace(/^nanoclaw-/, '')}.egress.sock:/run/nanoclaw/egress.sock`, // its only way out
    ]);
    expect(argv[argv.indexOf('--network') + 1]).toBe('none'); // the default egress network: no interface of its own
    expect(argv[argv.indexOf('--log-driver') + 1]).toBe('none'); // its output is bounded by the host, not kept by the engine
    const envFlags = argv.flatMap((arg, i) => (argv[i - 1] === '-e' ? [arg] : []));
    expect(envFlags).toContain('TZ=UTC');
    expect(envFlags.join(' ')).not.toContain(SECRET);
    for (const dir of [
      'groups/family/logs',
      'data/ipc/family/input',
      'data/ipc/family/messages',
      'data/ipc/family/tasks',
      'data/sessions/family/.kimi',
    ]) {
      expect(existsSync(join(root, dir))).toBe(true);
    }
  });

  it('stops a run that floods stderr or stdout past MAX_RUN_OUTPUT, without holding the flood in memory', {
    timeout: 120_000,
  }, async () => {
    for (const where of ['stderr', 'stdout']) {
      const retained = () => {
        Bun.gc(true);
        return process.memoryUsage().heapUsed;
      };
      const before = retained();
      const { outcome, results } = await run(message(`!flood ${MAX_RUN_OUTPUT + 8 * 1024 * 1024} ${where}`));
      // What the host still holds once it is done is a line and a tail, not the 72 MB that went by.
      expect(retained() - before).toBeLessThan(8 * 1024 * 1024);
      expect([where, outcome.oversized]).toEqual([where, true]);
      expect(outcome.lastError).toContain(`more than ${MAX_RUN_OUTPUT / 1024 / 1024} MB of output`);
      expect(results).toEqual([]);
    }
    expect(readFileSync(join(config.logsDir, 'nanoclaw.log'), 'utf8')).toContain('Container output over the limit');
  });

  it('splits a line-less flood in one pass, keeping one cut line', async () => {
    const chunks = [...Array.from({ length: 10_000 }, () => 'y'.repeat(1000)), '\nnext\r\n'];
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        for (const chunk of chunks) controller.enqueue(new TextEncoder().encode(chunk));
        controller.close();
      },
    });
    const seen: string[] = [];
    await readLines(stream, 16, (line) => void seen.push(line));
    expect(seen).toEqual(['y'.repeat(16), 'next']);
  });

  it('sends the stdin contract, with the key only there and never in docker’s environment', async () => {
    process.env.KIMI_API_KEY = 'sk-from-process-env-should-not-leak';
    try {
      await run(message('hi'), { sessionId: 'sess-1', isScheduledTask: true }, (live) => live.close());
    } finally {
      delete process.env.KIMI_API_KEY;
    }
    const [call] = docker.runs();
    const stdin = JSON.parse(call!.stdin!);
    // Without a model proxy the container gets no credential at all.
    expect(stdin).toEqual({
      prompt: message('hi'),
      groupFolder: 'family',
      chatJid: 'fam@g.us',
      isMain: false,
      sessionId: 'sess-1',
      isScheduledTask: true,
      assistantName: 'Andy',
      secrets: {},
    });
    expect(Object.keys(call!.env)).not.toContain('KIMI_API_KEY');
    expect(JSON.stringify(call!.env)).not.toContain('sk-from-process-env');
    expect(call!.argv.join(' ')).not.toContain(SECRET);
  });

  it('gives the container a per-run token and its socket, never the key; the proxy swaps in the key; the token dies with the run', async () => {
    writeFileSync(config.envFile, `KIMI_API_KEY=${SECRET}\n`);
    const upstream = fakeUpstream();
    const usage: { folder: string; ok: boolean; tokens: number }[] = [];
    const proxy = new ModelProxy({
      mode: 'unix',
      dir: join(config.dataDir, 'proxy'),
      upstream: upstream.url,
      apiKey: () => SECRET,
      record: (folder, entry) =>
        usage.push({
          folder,
          ok: entry.ok,
          tokens: (entry.usage?.promptTokens ?? 0) + (entry.usage?.completionTokens ?? 0),
        }),
    });
    try {
      const { results } = await run(message('!model hi'), {}, (live) => setTimeout(() => live.close(), 100), proxy);
      const [call] = docker.runs();
      const token = JSON.parse(call!.stdin!).secrets.KIMI_API_KEY as string;
      expect(token).toMatch(/^ncp-[0-9a-f]{32}$/);
      expect(call!.stdin).not.toContain(SECRET);
      const socketMount = call!.argv.find((arg) => arg.endsWith(':/run/nanoclaw/model.sock'))!;
      expect(socketMount).toMatch(new RegExp(`^${config.dataDir}/proxy/.*\\.sock:/run/nanoclaw/model\\.sock$`));
      expect(call!.argv).toContain('NANOCLAW_MODEL_SOCKET=/run/nanoclaw/model.sock');
      expect(results[0]!.result).toBe(
        'model 200: {"choices":[{"message":{"role":"assistant","content":"hello from upstream"}}],"usage":{"prompt_tokens":11,"completion_tokens":3}}',
      );
      expect(upstream.seen).toEqual([
        { path: '/v1/chat/completions', auth: `Bearer ${SECRET}`, body: expect.stringContaining('"hi"') },
      ]);
      expect(usage).toEqual([{ folder: 'family', ok: true, tokens: 14 }]);
      // After the run: socket gone, token refused even on a new run's proxy.
      expect(existsSync(socketMount.split(':')[0]!)).toBe(false);
      const next = proxy.open('family', 'probe');
      try {
        const response = await fetch('http://x/chat/completions', {
          unix: next.socketPath,
          method: 'POST',
          headers: { authorization: `Bearer ${token}` },
          body: '{}',
        } as RequestInit);
        expect(response.status).toBe(401);
        const ok = await fetch('http://x/chat/completions', {
          unix: next.socketPath,
          method: 'POST',
          headers: { authorization: `Bearer ${next.token}` },
          body: '{}',
        } as RequestInit);
        expect(ok.status).toBe(200);
      } finally {
        next.close();
      }
      expect(upstream.seen).toHaveLength(2); // the refused token never reached the upstream
    } finally {
      proxy.stop();
      upstream.stop();
    }
  });

  it('stops a container that ignores the close request after the grace period', async () => {
    config = { ...config, container: { ...config.container, closeGraceMs: 300 } };
    const { outcome, results } = await run(message('!deaf'), {}, (live) => setTimeout(() => live.close(), 50));
    expect(results.map((r) => r.result)).toEqual(['not listening']);
    expect(docker.calls().some((c) => c.command === 'stop' && c.name === docker.runs()[0]!.argv[4])).toBe(true);
    expect(outcome.exitCode).not.toBe(0);
  });

  it('streams results as they come and reports the session', async () => {
    const { outcome, results } = await run(message('hello'), {}, (live) => {
      setTimeout(() => live.sendInput(message('second')), 50);
      setTimeout(() => live.close(), 300);
    });
    expect(results.map((r) => r.result)).toEqual(['echo: hello', 'echo: second']);
    expect(outcome.exitCode).toBe(0);
    expect(outcome.results).toBe(2);
    expect(outcome.sessionId).toMatch(/^fake-session-/);
  });

  it('writes a run log with input summary, mounts and exit code, and stderr on error — never the key', async () => {
    const { outcome } = await run(message('!fail the model is down'));
    expect(outcome.exitCode).toBe(1);
    expect(outcome.lastError).toBe('the model is down');
    const logs = readdirSync(join(config.groupsDir, 'family', 'logs')).filter((f) => /^container-.*\.log$/.test(f));
    expect(logs).toHaveLength(1);
    const text = readFileSync(join(config.groupsDir, 'family', 'logs', logs[0]!), 'utf8');
    expect(text).toContain('Exit code:  1');
    expect(text).toContain(`${config.projectRoot}/groups/global -> /workspace/global (ro)`);
    expect(text).toContain('--- Stderr ---');
    expect(text).toContain('Session initialized');
    expect(text).toContain('model: no model proxy');
    expect(text).not.toContain(SECRET);
  });

  it('keeps the newest RUN_LOGS_KEPT run logs of a group and deletes older ones; forged names and links are neither counted, deleted nor followed', async () => {
    const dir = join(config.groupsDir, 'family', 'logs');
    mkdirSync(dir, { recursive: true });
    const old = (i: number) => `container-2020-01-01T00-00-00-${String(i).padStart(3, '0')}Z.log`;
    for (let i = 0; i < RUN_LOGS_KEPT; i++) writeFileSync(join(dir, old(i)), 'old');
    // Names that sort after every real log: counted as run logs, they would push every real one out.
    for (let i = 0; i < RUN_LOGS_KEPT; i++) writeFileSync(join(dir, `container-9999-forged-${i}.log`), 'forged');
    writeFileSync(join(dir, 'notes.txt'), 'the agent’s own');
    const outside = join(tempDir('nanoclaw-outside-'), 'precious.log');
    writeFileSync(outside, 'keep me');
    const link = 'container-2000-01-01T00-00-00-000Z.log'; // the host's own name, the oldest of all, but a link
    symlinkSync(outside, join(dir, link));
    await run(message('one more'), {}, (live) => live.close());
    const real = readdirSync(dir).filter((f) => /^container-\d{4}-\d{2}-\d{2}T[\d-]+Z\.log$/.test(f) && f !== link);
    expect(real).toHaveLength(RUN_LOGS_KEPT);
    expect(real).not.toContain(old(0));
    expect(real).toContain(old(1));
    expect(readdirSync(dir).filter((f) => f.includes('forged'))).toHaveLength(RUN_LOGS_KEPT);
    expect(readdirSync(dir)).toContain('notes.txt');
    expect(lstatSync(join(dir, link)).isSymbolicLink()).toBe(true);
    expect(readFileSync(outside, 'utf8')).toBe('keep me');
    expect(runLogsToPrune([old(2), 'container-b.log', 'x.txt', old(1), old(3)], 2)).toEqual([old(1)]);
  });

  it('keeps stderr out of the run log of a clean run unless LOG_LEVEL=debug', async () => {
    await run(message('quiet'), {}, (live) => live.close());
    const dir = join(config.groupsDir, 'family', 'logs');
    const first = readFileSync(join(dir, readdirSync(dir)[0]!), 'utf8');
    expect(first).not.toContain('--- Stderr ---');

    config = { ...config, logLevel: 'debug' };
    setupLogging(config, { terminalLevel: 'silent', secrets: [SECRET] });
    await Bun.sleep(5); // distinct log file name
    await run(message('loud'), {}, (live) => live.close());
    const newest = readdirSync(dir).sort().at(-1)!;
    expect(readFileSync(join(dir, newest), 'utf8')).toContain('--- Stderr ---');
    const hostLog = readFileSync(join(config.logsDir, 'nanoclaw.log'), 'utf8');
    expect(hostLog).toContain('Container mounts');
    expect(hostLog).toContain('Container command');
    expect(hostLog).toContain('stderr:');
    expect(hostLog).not.toContain(SECRET);
  });

  it('stops a container that produces nothing within CONTAINER_TIMEOUT, to the millisecond', async () => {
    const clock = new FakeClock();
    let started!: () => void;
    const live = new Promise<void>((resolve) => (started = resolve));
    const running = run(message('!sleep 20000'), {}, () => started(), undefined, clock);
    await live;
    expect(clock.pending).toEqual([config.containerTimeoutMs]);
    await clock.advance(config.containerTimeoutMs - 1);
    expect(docker.calls().filter((c) => c.command === 'stop')).toEqual([]);
    await clock.advance(1);
    const { outcome, results } = await running;
    expect(outcome.timedOut).toBe(true);
    expect(outcome.durationMs).toBe(config.containerTimeoutMs);
    expect(results).toEqual([]);
    // Named as runs are named (on a busy machine the fake may be stopped before it records its own run).
    const stopped = docker.calls().filter((c) => c.command === 'stop');
    expect(stopped.map((c) => c.name)).toEqual([expect.stringMatching(/^nanoclaw-[0-9a-f]+-family-\d{13}$/)]);
  });

  it('gives each run its own inbox: what an earlier run left (or an old container reads) never meets a new run', async () => {
    const oldInbox = join(config.ipcDir, 'family', 'input');
    mkdirSync(oldInbox, { recursive: true });
    writeFileSync(join(oldInbox, '_close'), '');
    writeFileSync(join(oldInbox, '1-old.json'), JSON.stringify({ type: 'message', text: message('stale') }));
    const { results } = await run(message('fresh'), {}, (live) => {
      setTimeout(() => live.sendInput(message('second')), 100);
      setTimeout(() => live.close(), 300);
    });
    expect(results.map((r) => r.result)).toEqual(['echo: fresh', 'echo: second']);
    expect(readdirSync(join(config.dataDir, 'input'))).toEqual([]); // removed after the run
  });
});

describe('the engine socket a thaw goes through', () => {
  it('is the local engine’s only for plain `docker` with no DOCKER_HOST or a unix:// one, and only when it exists', () => {
    const dir = tempDir();
    const socket = join(dir, 'docker.sock');
    writeFileSync(socket, '');
    expect(engineSocket('docker', { DOCKER_HOST: `unix://${socket}` })).toBe(socket);
    expect(engineSocket('docker', { DOCKER_HOST: `unix://${join(dir, 'absent.sock')}` })).toBeNull();
    expect(engineSocket('docker', { DOCKER_HOST: 'tcp://10.0.0.1:2375' })).toBeNull();
    expect(engineSocket('podman', { DOCKER_HOST: `unix://${socket}` })).toBeNull();
    expect(engineSocket(join(dir, 'docker'), { DOCKER_HOST: `unix://${socket}` })).toBeNull(); // a wrapper: its own rules
  });
});

describe('start-up checks', () => {
  it('passes when engine, image and key are there', () => {
    writeFileSync(config.envFile, `KIMI_API_KEY=${SECRET}\n`);
    expect(preflight(config)).toEqual([]);
  });

  it('names a stopped engine and how to start it', () => {
    writeFileSync(config.envFile, `KIMI_API_KEY=${SECRET}\n`);
    docker.set('engine-down');
    const problems = preflight(config);
    expect(problems).toHaveLength(1);
    expect(problems[0]).toContain('Cannot connect to the Docker daemon');
    expect(problems[0]).toContain('sudo systemctl start docker');
  });

  it('names a missing image and ./container/build.sh', () => {
    writeFileSync(config.envFile, `KIMI_API_KEY=${SECRET}\n`);
    docker.set('no-image');
    expect(preflight(config)).toEqual([expect.stringContaining('./container/build.sh')]);
  });

  it('names a missing key, and a missing runtime binary', () => {
    expect(preflight(config)).toEqual([expect.stringContaining('KIMI_API_KEY is not set')]);
    const problems = preflight({ ...config, containerRuntime: join(docker.dir, 'no-such-docker') });
    expect(problems[0]).toContain('not reachable');
  });

  it('does not ask for a Kimi key when a local OpenAI-compatible provider is configured', () => {
    expect(
      preflight({
        ...config,
        kimi: { ...config.kimi, provider: 'openai', baseUrl: 'http://localhost:11434/v1' },
      }),
    ).toEqual([]);
  });

  it('removes this install’s leftover containers, whatever their state, asking the engine by install label', () => {
    docker.setRunning(['nanoclaw-a-main-1', 'nanoclaw-a-family-2']);
    expect(removeLeftoverContainers(config)).toEqual(['nanoclaw-a-main-1', 'nanoclaw-a-family-2']);
    const ps = docker.calls().find((c) => c.command === 'ps')!;
    expect(ps.argv).toEqual([
      'ps',
      '-a',
      '--filter',
      `label=nanoclaw.install=${installId(config)}`,
      '--format',
      '{{.Names}}',
    ]);
    expect(
      docker
        .calls()
        .filter((c) => c.command === 'rm')
        .map((c) => c.names),
    ).toEqual([['nanoclaw-a-main-1', 'nanoclaw-a-family-2']]);
    expect(
      docker
        .calls()
        .find((c) => c.command === 'rm')!
        .argv.slice(0, 2),
    ).toEqual(['rm', '-f']);
    expect(removeLeftoverContainers(config)).toEqual([]);
  });
});
