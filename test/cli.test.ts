import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeEach, describe, expect, it } from 'vitest';
import { Store } from '../nanoclaw.ts';
import { fakeDocker, NO_MODEL_URL, tempProject, type FakeDocker } from './helpers.ts';

const REPO = fileURLToPath(new URL('..', import.meta.url));
const ENTRY = join(REPO, 'nanoclaw.ts');
const SECRET = 'sk-cli-test-zyxwvutsrqponmlk';

let docker: FakeDocker;
let root: string;

beforeEach(() => {
  docker = fakeDocker();
  root = tempProject().projectRoot;
  copyFileSync(join(REPO, 'bunfig.toml'), join(root, 'bunfig.toml'));
  writeFileSync(join(root, '.env'), `KIMI_API_KEY=${SECRET}\nTZ=UTC\n`);
});

/** Runs `bun nanoclaw.ts …` the way a user does, from the project directory. */
async function cli(args: string[], stdin = '', env: Record<string, string> = {}) {
  const proc = Bun.spawn([process.execPath, ENTRY, ...args], {
    cwd: root,
    stdin: new Blob([stdin]),
    stdout: 'pipe',
    stderr: 'pipe',
    env: { PATH: process.env.PATH!, HOME: process.env.HOME!, NANOCLAW_ROOT: root, CONTAINER_RUNTIME: docker.path, KIMI_BASE_URL: NO_MODEL_URL, ...env },
  });
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  return { stdout, stderr, code };
}

describe('bun nanoclaw.ts', () => {
  it('--help lists the commands', async () => {
    const { stdout, code } = await cli(['--help']);
    expect(code).toBe(0);
    for (const command of ['chat', 'groups list', 'groups register', 'sessions clear', 'start']) expect(stdout).toContain(command);
  });

  it('wrong usage gives a message and a non-zero exit', async () => {
    for (const args of [['frobnicate'], ['groups', 'explode'], ['sessions', 'clear'], ['chat', 'extra']]) {
      const { stderr, code } = await cli(args);
      expect(code, args.join(' ')).toBe(2);
      expect(stderr.length, args.join(' ')).toBeGreaterThan(10);
    }
  });

  it('invalid settings name the variable', async () => {
    const { stderr, code } = await cli(['groups', 'list'], '', { MAX_CONCURRENT_CONTAINERS: 'lots' });
    expect(code).toBe(2);
    expect(stderr).toContain('MAX_CONCURRENT_CONTAINERS');
  });

  it('registers, lists and removes groups', async () => {
    expect((await cli(['groups', 'register', 'fam@g.us', 'family', '--name', 'Family'])).code).toBe(0);
    const listed = await cli(['groups', 'list']);
    expect(listed.stdout).toMatch(/family\s+fam@g\.us\s+trigger @Andy\s+Family/);
    expect(existsSync(join(root, 'groups', 'family', 'CLAUDE.md'))).toBe(true);
    const duplicate = await cli(['groups', 'register', 'other@g.us', 'family']);
    expect(duplicate.code).toBe(2);
    expect(duplicate.stderr).toContain('already used');
    const bad = await cli(['groups', 'register', 'x@g.us', '../escape']);
    expect(bad.code).toBe(2);
    expect((await cli(['groups', 'remove', 'family'])).code).toBe(0);
    expect((await cli(['groups', 'list'])).stdout).not.toContain('fam@g.us');
  });

  it('groups register --network sets a group’s network; host is refused', async () => {
    expect((await cli(['groups', 'register', 'off@g.us', 'offline', '--network', 'none'])).code).toBe(0);
    const store = new Store(join(root, 'store', 'messages.db'));
    expect(store.groupByFolder('offline')!.containerConfig).toEqual({ network: 'none' });
    store.close();
    expect((await cli(['mounts', 'offline'])).stdout).toContain('network: none');
    const host = await cli(['groups', 'register', 'h@g.us', 'hostnet', '--network', 'host']);
    expect(host.code).toBe(2);
    expect(host.stderr).toContain('never host');
  });

  it('usage shows model requests and tokens by group and day', async () => {
    expect((await cli(['usage'])).stdout).toContain('No model requests in the last 30 days');
    const store = new Store(join(root, 'store', 'messages.db'));
    const today = new Date().toISOString().slice(0, 10);
    store.addModelUsage(today, 'main', { ok: true, promptTokens: 1200, completionTokens: 80 });
    store.addModelUsage(today, 'main', { ok: false, promptTokens: 0, completionTokens: 0 });
    store.addModelUsage(today, 'family', { ok: true, promptTokens: 300, completionTokens: 20 });
    store.addModelUsage('2020-01-01', 'family', { ok: true, promptTokens: 999, completionTokens: 9 });
    store.close();
    const { code, stdout } = await cli(['usage'], '', { TZ: 'UTC' });
    expect(code).toBe(0);
    const lines = stdout.trim().split('\n').map((l) => l.split(/\s+/));
    expect(lines).toEqual([
      ['day', 'group', 'requests', 'failed', 'prompt', 'tokens', 'output', 'tokens'],
      [today, 'family', '1', '0', '300', '20'],
      [today, 'main', '2', '1', '1200', '80'],
      ['total', '3', '1500', '100'],
    ]);
    const json = JSON.parse((await cli(['usage', '--group', 'main', '--json'], '', { TZ: 'UTC' })).stdout);
    expect(json).toEqual([{ day: today, groupFolder: 'main', requests: 2, failed: 1, promptTokens: 1200, completionTokens: 80 }]);
    expect((await cli(['usage', '--days', 'lots'])).code).toBe(2);
  });

  it('the service logs an unexpected error or rejection and keeps running; twenty in a minute stop it with a clear message', async () => {
    const script = `
      import { keepRunningThroughErrors, loadConfig, setupLogging } from ${JSON.stringify(ENTRY)};
      const config = loadConfig(${JSON.stringify(root)}, { TZ: 'UTC' });
      setupLogging(config, { terminalLevel: 'silent' });
      keepRunningThroughErrors();
      Promise.reject(new Error('a forgotten promise'));
      setTimeout(() => { throw new Error('a throwing timer'); }, 10);
      setTimeout(() => {
        console.log('still running');
        if (process.argv.includes('--storm')) for (let i = 0; i < 25; i++) Promise.reject(new Error('storm ' + i));
        else process.exit(0);
      }, 100);
      setTimeout(() => console.log('outlived the storm'), 600);
    `;
    const file = join(root, 'keep-running.ts');
    writeFileSync(file, script);
    const calm = Bun.spawnSync([process.execPath, file], { env: { PATH: process.env.PATH! } });
    expect(calm.stdout.toString().trim()).toBe('still running');
    expect(calm.exitCode).toBe(0);
    const errors = readFileSync(join(root, 'logs', 'nanoclaw.error.log'), 'utf8');
    expect(errors).toContain('Unexpected rejection; NanoClaw keeps running');
    expect(errors).toContain('a forgotten promise');
    expect(errors).toContain('Unexpected error; NanoClaw keeps running');
    const storm = Bun.spawnSync([process.execPath, file, '--storm'], { env: { PATH: process.env.PATH! } });
    expect(storm.exitCode).toBe(1);
    expect(storm.stderr.toString()).toContain('more than 20 unexpected errors within a minute');
    expect(storm.stdout.toString()).not.toContain('outlived the storm');
  });

  it('model check asks the endpoint through the proxy: accepted, refused (with the fix), or no network', async () => {
    const { startFakeModel } = await import('../container/agent-runner/kimi-stub/fake-model.ts');
    const model = startFakeModel({ key: SECRET });
    try {
      writeFileSync(join(root, '.env'), `KIMI_API_KEY=${SECRET}\n`);
      // Spawned without blocking: this process serves the model.
      const check = async (env: Record<string, string>) => {
        const proc = Bun.spawn(['bun', ENTRY, 'model', 'check'], { stdout: 'pipe', env: { PATH: process.env.PATH!, HOME: process.env.HOME!, NANOCLAW_ROOT: root, ...env } });
        return { stdout: await new Response(proc.stdout).text(), code: await proc.exited };
      };
      expect(await check({ KIMI_BASE_URL: model.url })).toEqual({ code: 0, stdout: `OK: ${model.url} accepts the key; kimi-k2.5 is listed\n` });
      expect(model.requests.at(-1)).toMatchObject({ path: '/v1/models', authorization: `Bearer ${SECRET}` });
      writeFileSync(join(root, '.env'), 'KIMI_API_KEY=sk-wrong-key-123456\n');
      const refused = await check({ KIMI_BASE_URL: model.url });
      expect(refused.code).toBe(1);
      expect(refused.stdout).toContain('refused the Kimi key (401)');
      const offline = await check({ KIMI_BASE_URL: NO_MODEL_URL });
      expect(offline.code).toBe(3);
      expect(offline.stdout).toMatch(/^NOT CHECKED: no network to http:\/\/127\.0\.0\.1:9\/v1/);
      expect((await cli(['model', 'chek'])).code).toBe(2);
    } finally {
      model.stop();
    }
  });

  it('sessions clear removes the session files and the database row together', async () => {
    const store = new Store(join(root, 'store', 'messages.db'));
    store.setSession('main', 'sess-123');
    store.setSession('family', 'sess-456');
    store.close();
    const sessionFiles = join(root, 'data', 'sessions', 'main', '.kimi', 'sessions', 'abc', 'sess-123');
    mkdirSync(sessionFiles, { recursive: true });
    writeFileSync(join(sessionFiles, 'history.jsonl'), '{}\n');
    expect((await cli(['sessions', 'list'])).stdout).toContain('sess-123');
    const { code, stdout } = await cli(['sessions', 'clear', 'main']);
    expect(code).toBe(0);
    expect(stdout).toContain('main');
    expect(existsSync(join(root, 'data', 'sessions', 'main', '.kimi', 'sessions'))).toBe(false);
    const after = new Store(join(root, 'store', 'messages.db'));
    expect(after.getSession('main')).toBeNull();
    expect(after.getSession('family')).toBe('sess-456');
    after.close();
  });

  it('mounts shows a group’s mount table; logs shows the host log and a group’s latest run', async () => {
    expect((await cli(['logs'])).stdout).toContain('No host log yet');
    await cli(['groups', 'register', 'fam@g.us', 'family']);
    const mounts = await cli(['mounts', 'family']);
    expect(mounts.stdout).toContain(`${root}/groups/global -> /workspace/global (ro)`);
    expect(mounts.stdout).toContain(`${root}/data/sessions/family/.kimi -> /home/node/.kimi (rw)`);
    expect(mounts.stdout).toContain('-> /run/nanoclaw/model.sock (the model proxy, one socket per run)');
    expect(mounts.stdout).toContain('network: bridge');
    expect((await cli(['mounts', 'family', '--docker-args'])).stdout.split('\n')).toContain(`${root}/groups/family:/workspace/group`);
    expect((await cli(['mounts', 'nobody'])).code).toBe(2);
    await cli(['chat'], '!fail the model is down\n');
    const hostLog = await cli(['logs', '--lines', '5']);
    expect(hostLog.stdout).toContain('== logs/nanoclaw.log (last 5 lines) ==');
    expect(hostLog.stdout).toContain('nanoclaw.error.log');
    const groupLog = await cli(['logs', '--group', 'main']);
    expect(groupLog.stdout).toMatch(/Recent runs of main:\n {2}groups\/main\/logs\/container-.*\.log/);
    expect(groupLog.stdout).toContain('the model is down');
    expect((await cli(['logs', '--lines', 'many'])).code).toBe(2);
  });

  it('auth checks the pairing-code number, and leaves an existing link alone', async () => {
    const bad = await cli(['auth', '--pairing-code', '12-ab']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('country code, digits only');
    mkdirSync(join(root, 'store', 'auth'), { recursive: true });
    writeFileSync(join(root, 'store', 'auth', 'creds.json'), '{}');
    const again = await cli(['auth']);
    expect(again.code).toBe(0);
    expect(again.stdout).toContain('already linked');
  });

  it('start without linked WhatsApp says how to link it, and how to talk from the terminal', async () => {
    const { stderr, code } = await cli([]);
    expect(code).not.toBe(0);
    expect(stderr).toContain('bun nanoclaw.ts auth');
    expect(stderr).toContain('bun nanoclaw.ts chat');
  });
});

describe('bun nanoclaw.ts chat (piped)', () => {
  it('sends each line, prints each reply, exits after the last; the next chat resumes the session', async () => {
    const { stdout, stderr, code } = await cli(['chat'], 'hello\nhow are you\n');
    expect(stderr).toBe('');
    expect(code).toBe(0);
    expect(stdout).toBe('Andy: echo: hello\nAndy: echo: how are you\n');
    const firstSession = JSON.parse(docker.runs()[0]!.stdin!).sessionId;
    expect(firstSession).toBeUndefined();

    const again = await cli(['chat'], 'still there?\n');
    expect(again.stdout).toBe('Andy: echo: still there?\n');
    const runs = docker.runs();
    const resumed = JSON.parse(runs.at(-1)!.stdin!).sessionId;
    expect(resumed).toMatch(/^fake-session-/);
    const store = new Store(join(root, 'store', 'messages.db'));
    expect(store.getSession('main')).toBe(resumed);
    store.close();
    const log = readFileSync(join(root, 'logs', 'nanoclaw.log'), 'utf8');
    const ids = [...log.matchAll(/Session initialized: (\S+)$/gm)].map((m) => m[1]);
    expect(ids.at(-1)).toBe(resumed);
  });

  it('keeps the key out of the container (a per-run token instead), docker’s environment and arguments, and the logs', async () => {
    await cli(['chat'], 'hi\n', { LOG_LEVEL: 'debug' });
    const run = docker.runs()[0]!;
    expect(JSON.parse(run.stdin!).secrets.KIMI_API_KEY).toMatch(/^ncp-[0-9a-f]{32}$/);
    expect(run.stdin).not.toContain(SECRET);
    expect(JSON.stringify(run.env)).not.toContain(SECRET);
    expect(run.argv.join(' ')).not.toContain(SECRET);
    for (const file of ['nanoclaw.log', 'nanoclaw.error.log']) {
      const path = join(root, 'logs', file);
      if (existsSync(path)) expect(readFileSync(path, 'utf8')).not.toContain(SECRET);
    }
    expect(readFileSync(join(root, 'logs', 'nanoclaw.log'), 'utf8')).toContain('Container command');
  });

  it('reports an agent error on stderr with a non-zero exit, and the message is retried later', async () => {
    const failed = await cli(['chat'], '!failonce LLM is not set\n');
    expect(failed.code).toBe(1);
    expect(failed.stderr).toContain('LLM is not set');
    const next = await cli(['chat'], 'anyone?\n');
    const retried = JSON.parse(docker.runs().at(-1)!.stdin!).prompt as string;
    expect(retried).toContain('!failonce LLM is not set'); // the cursor was not moved past it
    expect(next.stdout).toBe('Andy: echo: !failonce LLM is not set\nAndy: echo: anyone?\n');
    expect(next.code).toBe(0);
  });

  it('stops with one clear message when the engine, the image or the key is missing', async () => {
    docker.set('engine-down');
    const down = await cli(['chat'], 'hi\n');
    expect(down.code).toBe(2);
    expect(down.stderr).toContain('sudo systemctl start docker');
    docker.set('engine-down', false);
    docker.set('no-image');
    const noImage = await cli(['chat'], 'hi\n');
    expect(noImage.stderr).toContain('./container/build.sh');
    docker.set('no-image', false);
    writeFileSync(join(root, '.env'), 'TZ=UTC\n');
    const noKey = await cli(['chat'], 'hi\n');
    expect(noKey.code).toBe(2);
    expect(noKey.stderr).toContain('KIMI_API_KEY');
    expect(docker.runs()).toHaveLength(0);
  });

  it('refuses to run next to another live host on the same project', async () => {
    mkdirSync(join(root, 'data'), { recursive: true });
    const other = Bun.spawn(['sleep', '30']);
    writeFileSync(join(root, 'data', 'nanoclaw.pid'), String(other.pid));
    try {
      const { code, stderr } = await cli(['chat'], 'hi\n');
      expect(code).toBe(2);
      expect(stderr).toContain(`already running here (pid ${other.pid})`);
    } finally {
      other.kill();
    }
  });

  it('on SIGTERM mid-answer lets the turn finish, delivers it, and exits cleanly', async () => {
    const proc = Bun.spawn([process.execPath, ENTRY, 'chat'], {
      cwd: root, stdin: 'pipe', stdout: 'pipe', stderr: 'pipe',
      env: { PATH: process.env.PATH!, HOME: process.env.HOME!, NANOCLAW_ROOT: root, CONTAINER_RUNTIME: docker.path, KIMI_BASE_URL: NO_MODEL_URL },
    });
    proc.stdin.write('!sleep 4000\n');
    await proc.stdin.flush();
    const deadline = Date.now() + 10_000;
    while (docker.runs().length === 0 && Date.now() < deadline) await Bun.sleep(20);
    proc.kill('SIGTERM');
    expect(await proc.exited).toBe(0);
    expect(await new Response(proc.stdout).text()).toBe('Andy: slept 4000\n');
    expect(docker.calls().some((c) => c.command === 'closed')).toBe(true);
    expect(existsSync(join(root, 'data', 'nanoclaw.pid'))).toBe(false);
    const next = await cli(['chat'], '');
    expect(next.code).toBe(0);
    expect(docker.runs()).toHaveLength(1); // answered, so nothing to redo
  });

  it('leaves a store the guide’s sqlite3 recipe can edit', async () => {
    await cli(['chat'], 'hi\n');
    const db = join(root, 'store', 'messages.db');
    const sqlite = Bun.spawnSync(['sqlite3', db, "DELETE FROM sessions WHERE group_folder = 'main'"]);
    expect(sqlite.exitCode, sqlite.stderr.toString()).toBe(0);
    const store = new Store(db);
    expect(store.getSession('main')).toBeNull();
    store.close();
  });
});
