import {
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  realpathSync,
  renameSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { availableParallelism } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeEach, describe, expect, it } from 'vitest';
import { OutboxSender, setupLogging, Store, visibleText } from '../nanoclaw.ts';
import {
  fakeDocker,
  flakyServer,
  linkedAuthDir,
  NO_MODEL_URL,
  openAsWhatsAppWould,
  pendingPairingAuthDir,
  RecordingWhatsApp,
  taskRow,
  tempDir,
  tempProject,
  waitFor,
  type FakeDocker,
  socketOf,
} from './helpers.ts';

const REPO = fileURLToPath(new URL('..', import.meta.url));
const ENTRY = join(REPO, 'nanoclaw.ts');
const SECRET = 'sk-cli-test-zyxwvutsrqponmlk';
const FAMILY = '120363000000000101@g.us';

let docker: FakeDocker;
let root: string;

beforeEach(() => {
  docker = fakeDocker();
  root = tempProject().projectRoot;
  copyFileSync(join(REPO, 'bunfig.toml'), join(root, 'bunfig.toml'));
  writeFileSync(join(root, '.env'), `KIMI_API_KEY=${SECRET}\nTZ=UTC\n`);
});

/** The environment the CLI runs in here: this project, the fake docker, no model unless `extra` names one. */
function cliEnv(extra: Record<string, string> = {}): Record<string, string> {
  return {
    PATH: process.env.PATH!,
    HOME: process.env.HOME!,
    NANOCLAW_ROOT: root,
    CONTAINER_RUNTIME: docker.path,
    KIMI_BASE_URL: NO_MODEL_URL,
    ...extra,
  };
}

/** Runs `bun nanoclaw.ts …` the way a user does, from the project directory. */
async function cli(args: string[], stdin = '', env: Record<string, string> = {}) {
  const proc = Bun.spawn([process.execPath, ENTRY, ...args], {
    cwd: root,
    stdin: new Blob([stdin]),
    stdout: 'pipe',
    stderr: 'pipe',
    env: cliEnv(env),
  });
  const [stdout, stderr, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { stdout, stderr, code };
}

/** The unit `service install --dry-run` shows for a project (and where it would write it). */
async function unitFor(project: string, home: string): Promise<{ file: string; unit: string }> {
  const { stdout, code } = await cli(['service', 'install', '--dry-run', '--platform', 'linux'], '', {
    NANOCLAW_ROOT: project,
    HOME: home,
  });
  expect(code).toBe(0);
  return { file: /^# (.+)$/m.exec(stdout)![1]!, unit: stdout };
}

/** `chat` on pipes, its container started on a turn that takes `sleepMs`. */
async function chatMidTurn(sleepMs: number) {
  const proc = Bun.spawn([process.execPath, ENTRY, 'chat'], {
    cwd: root,
    stdin: 'pipe',
    stdout: 'pipe',
    stderr: 'pipe',
    env: cliEnv(),
  });
  proc.stdin.write(`!sleep ${sleepMs}\n`);
  await proc.stdin.flush();
  await waitFor(() => docker.runs().length > 0, 90_000, 'run started'); // a chat's start-up, however busy the machine
  return proc;
}

describe('bun nanoclaw.ts', () => {
  it('--help lists the commands', async () => {
    const { stdout, code } = await cli(['--help']);
    expect(code).toBe(0);
    for (const command of ['chat', 'groups list', 'groups register', 'sessions clear', 'start'])
      expect(stdout).toContain(command);
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
    expect((await cli(['groups', 'register', FAMILY, 'family', '--name', 'Family'])).code).toBe(0);
    const listed = await cli(['groups', 'list']);
    expect(listed.stdout).toMatch(/family\s+120363000000000101@g\.us\s+trigger @Andy\s+Family/);
    expect(existsSync(join(root, 'groups', 'family', 'CLAUDE.md'))).toBe(true);
    const duplicate = await cli(['groups', 'register', '120363000000000102@g.us', 'family']);
    expect(duplicate.code).toBe(2);
    expect(duplicate.stderr).toContain('already used');
    const bad = await cli(['groups', 'register', '120363000000000103@g.us', '../escape']);
    expect(bad.code).toBe(2);
    expect((await cli(['groups', 'remove', 'family'])).code).toBe(0);
    expect((await cli(['groups', 'list'])).stdout).not.toContain(FAMILY);
  });

  it('groups register --allow keeps who may wake the agent; groups list shows it', async () => {
    const allow = '4915100000002@s.whatsapp.net,123456789@lid';
    expect((await cli(['groups', 'register', FAMILY, 'family', '--allow', allow])).code).toBe(0);
    expect((await cli(['groups', 'register', '120363000000000106@g.us', 'open'])).code).toBe(0);
    const store = new Store(join(root, 'store', 'messages.db'));
    expect(store.groupByFolder('family')!.allow).toEqual(allow.split(','));
    store.close();
    const listed = (await cli(['groups', 'list'])).stdout;
    expect(listed).toMatch(/^family .*\(wakes it: the owner and 4915100000002@s\.whatsapp\.net, 123456789@lid\)$/m);
    expect(listed).toMatch(/^open .*\(wakes it: everyone in the chat\)$/m);
  });

  it('logs --group shows a run log’s control characters written out (no raw ESC reaches the terminal), and only the host’s own run logs', async () => {
    const dir = join(root, 'groups', 'family', 'logs');
    mkdirSync(dir, { recursive: true });
    writeFileSync(
      join(dir, 'container-2026-01-01T00-00-00-000Z.log'),
      'stderr: \x1b[2J\x1b]0;owned\x07cleared\r\nkept\ttab\n',
    );
    writeFileSync(join(dir, 'container-zzz-forged.log'), 'forged\n'); // sorts last, but is no name the host writes
    const { stdout, code } = await cli(['logs', '--group', 'family']);
    expect(code).toBe(0);
    // biome-ignore lint/suspicious/noControlCharactersInRegex: no control character may reach the terminal
    expect(stdout).not.toMatch(/[\x00-\x08\x0b-\x1f\x7f]/);
    expect(stdout).toContain('stderr: \\x1b[2J\\x1b]0;owned\\x07cleared\\x0d\nkept\ttab');
    expect(stdout).not.toContain('forged');
  });

  it('groups register --network sets a group’s network; host is refused', async () => {
    expect((await cli(['groups', 'register', '120363000000000104@g.us', 'offline', '--network', 'none'])).code).toBe(0);
    const store = new Store(join(root, 'store', 'messages.db'));
    expect(store.groupByFolder('offline')!.containerConfig).toEqual({ network: 'none' });
    store.close();
    expect((await cli(['mounts', 'offline'])).stdout).toContain('network: none');
    const host = await cli(['groups', 'register', '120363000000000105@g.us', 'hostnet', '--network', 'host']);
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
    const lines = stdout
      .trim()
      .split('\n')
      .map((l) => l.split(/\s+/));
    expect(lines).toEqual([
      ['day', 'group', 'requests', 'failed', 'prompt', 'tokens', 'output', 'tokens'],
      [today, 'family', '1', '0', '300', '20'],
      [today, 'main', '2', '1', '1200', '80'],
      ['total', '3', '1500', '100'],
    ]);
    const json = JSON.parse((await cli(['usage', '--group', 'main', '--json'], '', { TZ: 'UTC' })).stdout);
    expect(json).toEqual([
      { day: today, groupFolder: 'main', requests: 2, failed: 1, promptTokens: 1200, completionTokens: 80 },
    ]);
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
    const { startFakeModel } = await import('../scripts/scripted-model.ts');
    const model = startFakeModel({ key: SECRET });
    try {
      writeFileSync(join(root, '.env'), `KIMI_API_KEY=${SECRET}\n`);
      // cli() spawns without blocking: this process serves the model.
      const check = async (env: Record<string, string>) => {
        const { stdout, code } = await cli(['model', 'check'], '', env);
        return { stdout, code };
      };
      expect(await check({ KIMI_BASE_URL: model.url })).toEqual({
        code: 0,
        stdout: `OK: ${model.url} accepts the key; kimi-k2.5 is listed\n`,
      });
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
    await cli(['groups', 'register', FAMILY, 'family']);
    const mounts = await cli(['mounts', 'family']);
    expect(mounts.stdout).toContain(`${root}/groups/global -> /workspace/global (ro)`);
    expect(mounts.stdout).toContain(`${root}/data/sessions/family/.kimi -> /home/node/.kimi (rw)`);
    expect(mounts.stdout).toContain(
      `${root}/data/proxy/<run>.sock -> /run/nanoclaw/model.sock (rw) — the model proxy, one socket per run`,
    );
    expect(mounts.stdout).toContain(`${root}/data/input/<run> -> /workspace/ipc/input (rw)`);
    expect(existsSync(join(root, 'data', 'ipc', 'family'))).toBe(false); // shown, not made
    expect(mounts.stdout).toContain(
      `${root}/data/proxy/<run>.egress.sock -> /run/nanoclaw/egress.sock (rw) — the egress proxy (public internet only), one socket per run`,
    );
    expect(mounts.stdout).toContain('network: egress');
    expect((await cli(['mounts', 'family', '--docker-args'])).stdout.split('\n')).toContain(
      `${root}/groups/family:/workspace/group`,
    );
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
    mkdirSync(join(root, 'store'), { recursive: true });
    renameSync(await linkedAuthDir(), join(root, 'store', 'auth'));
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

  it('reports an agent error on stderr with a non-zero exit; the failed line is not answered later behind the person’s back', async () => {
    const failed = await cli(['chat'], '!failonce LLM is not set\n');
    expect(failed.code).toBe(1);
    expect(failed.stderr).toContain('LLM is not set');
    const next = await cli(['chat'], 'anyone?\n');
    const prompt = JSON.parse(docker.runs().at(-1)!.stdin!).prompt as string;
    expect(prompt).not.toContain('!failonce LLM is not set');
    expect(next.stdout).toBe('Andy: echo: anyone?\n');
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
    const proc = await chatMidTurn(4000);
    proc.kill('SIGTERM');
    expect(await proc.exited).toBe(0);
    expect(await new Response(proc.stdout).text()).toBe('Andy: slept 4000\n');
    expect(docker.calls().some((c) => c.command === 'closed')).toBe(true);
    expect(existsSync(join(root, 'data', 'nanoclaw.pid'))).toBe(false);
    const next = await cli(['chat'], '');
    expect(next.code).toBe(0);
    expect(docker.answering()).toHaveLength(1); // answered, so nothing to redo (the next start only warms main)
  });

  it('a chat shows only its own answers: what an earlier chat left unanswered or unprinted is left out, and said so', async () => {
    await cli(['chat'], 'first\n');
    const store = new Store(join(root, 'store', 'messages.db'));
    store.storeMessage({
      id: 'left-1',
      chatJid: 'main@local',
      sender: 'local:user',
      senderName: 'You',
      content: 'typed before the earlier chat was killed',
      timestamp: new Date().toISOString(),
      isFromMe: true,
      isBotMessage: false,
    });
    store.addOutbound('local', 'main@local', 'Andy: an answer the earlier chat never printed', 'left-out-1');
    store.close();
    const { stdout, stderr } = await cli(['chat'], 'second\n');
    expect(stdout).toBe('Andy: echo: second\n');
    expect(stderr).toContain('An earlier chat ended with 1 line(s) unanswered and 1 answer part(s) unprinted');
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

describe('the database kept safe', () => {
  it('a damaged database: one line naming the backup to restore, exit 2, no stack', async () => {
    mkdirSync(join(root, 'store'), { recursive: true });
    writeFileSync(join(root, 'store', 'messages.db'), 'this is not a database, it is a shopping list\n'.repeat(200));
    const { stderr, code } = await cli(['groups', 'list']);
    expect(code).toBe(2);
    expect(stderr).toContain('store/messages.db is damaged or not a database');
    expect(stderr).toContain('ls -t');
    expect(stderr).not.toMatch(/\bat \S+ \(/); // no stack trace
  });

  it('a database damaged past its first pages: the same one line at start-up, exit 2, no stack', async () => {
    await cli(['chat'], 'hi\n');
    const db = join(root, 'store', 'messages.db');
    const sql = "PRAGMA wal_checkpoint(TRUNCATE); SELECT rootpage FROM sqlite_master WHERE name = 'chats'";
    const page = Number(Bun.spawnSync(['sqlite3', db, sql]).stdout.toString().trim().split('\n').at(-1));
    const file = openSync(db, 'r+');
    writeSync(file, Buffer.alloc(4096, 0x41), 0, 4096, (page - 1) * 4096); // the chats table's page, overwritten
    closeSync(file);
    const { stderr, code } = await cli(['chat'], 'hello\n');
    expect(code).toBe(2);
    expect(stderr).toContain('store/messages.db is damaged or not a database (SQLITE_CORRUPT)');
    expect(stderr).toContain('ls -t');
    expect(stderr).not.toMatch(/\bat \S+ \(/);
  });

  it('a database gone where NanoClaw ran before is not silently started afresh; on purpose, it can be', async () => {
    await cli(['chat'], 'hi\n');
    expect(existsSync(join(root, 'data', 'sessions', 'main'))).toBe(true);
    for (const suffix of ['', '-wal', '-shm']) rmSync(join(root, 'store', `messages.db${suffix}`), { force: true });
    const refused = await cli(['chat'], 'hello again\n');
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain('store/messages.db is missing or empty, but NanoClaw ran here before');
    expect(refused.stderr).toContain('store/backups/');
    expect(existsSync(join(root, 'store', 'messages.db'))).toBe(false); // nothing empty left for the next start to take
    expect(docker.runs()).toHaveLength(1);
    const fresh = await cli(['chat'], 'hello again\n', { NANOCLAW_NEW_DATABASE: '1' });
    expect(fresh.code).toBe(0);
    expect(fresh.stdout).toContain('echo: hello again');
  });

  it('the host backs the database up, a consistent copy that opens with its data', async () => {
    await cli(['chat'], 'hi\n');
    const backups = readdirSync(join(root, 'store', 'backups')).filter((file) => file.endsWith('.db'));
    expect(backups).toHaveLength(1);
    const copy = new Store(join(root, 'store', 'backups', backups[0]!));
    expect(copy.mainGroup()?.folder).toBe('main');
    copy.close();
  });
});

/** Every mistake a new user makes on day one: one line, the command's usage, exit 2, nothing in the error log. */
describe('bun nanoclaw.ts never crashes on a typo', () => {
  const mistakes: [string[], string][] = [
    [['auth', '--bogus'], 'Unknown option --bogus.'],
    [['auth', '--pairing-code'], '--pairing-code needs a value.'],
    [['auth', 'now'], 'auth takes no arguments.'],
    [['tasks', 'list', '--jsn'], 'Unknown option --jsn.'],
    [['tasks', 'frob'], 'Unknown tasks command "frob".'],
    [['tasks', 'run'], 'tasks run needs one task id'],
    [['logs', '--lines', '-5'], '--lines needs a value (one that starts with "-" goes as --lines=-…).'],
    [['logs', '--lines=-5'], '--lines takes a whole number above 0, not "-5".'],
    [['usage', '--days', '0'], '--days takes a whole number above 0, not "0".'],
    [['usage', '--json=yes'], '--json takes no value.'],
    [['groups', 'register', 'family-chat', 'family'], '"family-chat" is not a WhatsApp chat id'],
    [['groups', 'register', FAMILY, 'family', '--trigger', 'Bot'], 'trigger "Bot" must be @ and one word, e.g. @Andy.'],
    [['groups', 'list', '--main'], '--main belongs to groups register|add.'],
    [
      ['groups', 'register', FAMILY, 'family', '--allow', '4915100000002@s.whatsapp.net,bob'],
      'allow: "bob" is not a WhatsApp sender id (<phone digits>@s.whatsapp.net or <digits>@lid).',
    ],
    [['mounts'], 'mounts needs one group folder'],
    [['service', 'restart'], 'Unknown service command "restart".'],
    [['service', 'install', '--platform', 'windows'], '--platform windows: use linux or macos.'],
    [['sessions', 'clear'], 'sessions clear needs one group folder.'],
    [['config', 'get', 'NOPE'], '"NOPE" is not a NanoClaw setting'],
    [['model', 'status'], 'Unknown model command "status".'],
    [['chat', '--fast'], 'Unknown option --fast.'],
    [['start', 'now'], 'start takes no arguments.'],
    [['diagnose', '--verbose'], 'Unknown option --verbose.'],
  ];
  it('answers each mistake with one line saying what is wrong, then that command’s usage, exit 2', async () => {
    const results = await Promise.all(mistakes.map(([args]) => cli(args)));
    results.forEach(({ stdout, stderr, code }, i) => {
      const [args, message] = mistakes[i]!;
      const what = args.join(' ');
      expect(code, what).toBe(2);
      expect(stderr.split('\n')[0], what).toContain(message);
      expect(stderr, what).toContain(`Usage: bun nanoclaw.ts …\n  ${args[0] === 'start' ? '(none), start' : args[0]}`);
      expect(stderr, what).not.toMatch(/^\s+at |Error:|TypeError/m);
      expect(stdout, what).toBe('');
    });
    const errorLog = join(root, 'logs', 'nanoclaw.error.log');
    expect(existsSync(errorLog) ? readFileSync(errorLog, 'utf8') : '').toBe('');
  });

  it('--help on any command shows that command’s usage and exits 0', async () => {
    const asks = [
      ['auth', '--help'],
      ['mounts', '--help'],
      ['tasks', '--help'],
      ['tasks', 'run', '-h'],
      ['groups', 'register', '--help'],
      ['service', '-h'],
      ['config', '--help'],
      ['usage', '--help'],
      ['logs', '--help'],
      ['sessions', '--help'],
      ['model', '--help'],
      ['chat', '--help'],
      ['start', '--help'],
      ['diagnose', '--help'],
      ['help', 'tasks'],
    ];
    const results = await Promise.all(asks.map((args) => cli(args)));
    results.forEach(({ stdout, stderr, code }, i) => {
      const command = asks[i]![0] === 'help' ? asks[i]![1]! : asks[i]![0]!;
      expect(code, asks[i]!.join(' ')).toBe(0);
      expect(stdout, asks[i]!.join(' ')).toContain(
        `Usage: bun nanoclaw.ts …\n  ${command === 'start' ? '(none), start' : command}`,
      );
      expect(stderr, asks[i]!.join(' ')).toBe('');
    });
  });
});

describe('settings, linking and tasks as a user meets them', () => {
  it('config get prints what the host uses: the environment over .env, comments stripped, the key only as "set"', async () => {
    writeFileSync(
      join(root, '.env'),
      `KIMI_API_KEY=${SECRET}   # from the console\nCONTAINER_IMAGE=my-agent:2 # the image\nTZ=UTC\n`,
    );
    const got = await cli(
      [
        'config',
        'get',
        'CONTAINER_IMAGE',
        'CONTAINER_RUNTIME',
        'KIMI_API_KEY',
        'MAX_CONCURRENT_CONTAINERS',
        'KIMI_BASE_URL',
      ],
      '',
      { KIMI_BASE_URL: 'http://127.0.0.1:9/v1' },
    );
    expect(got.code).toBe(0);
    expect(got.stdout.split('\n')).toEqual([
      'my-agent:2',
      docker.path,
      `set (${SECRET.length} characters)`,
      String(Math.max(2, availableParallelism())),
      'http://127.0.0.1:9/v1',
      '',
    ]);
    const list = await cli(['config', 'list']);
    expect(list.stdout).toMatch(/CONTAINER_IMAGE\s+my-agent:2\s+\(\.env\)/);
    expect(list.stdout).toMatch(/CONTAINER_RUNTIME\s+\S+\s+\(environment\)/);
    expect(list.stdout).toMatch(/IDLE_TIMEOUT\s+1800000\s+\(default\)/);
    expect(got.stdout + list.stdout).not.toContain(SECRET);
  });

  it('auth --check tells linked from a pairing left unfinished from nothing', async () => {
    expect((await cli(['auth', '--check'])).code).toBe(3);
    mkdirSync(join(root, 'store'), { recursive: true });
    renameSync(pendingPairingAuthDir(), join(root, 'store', 'auth'));
    const pending = await cli(['auth', '--check']);
    expect(pending.code).toBe(4);
    expect(pending.stdout).toContain('never finished');
    const start = await cli([]);
    expect(start.code).toBe(2);
    expect(start.stderr).toContain('a pairing was started but never finished');
  });

  it('auth without a network says so (not “remove store/auth”), and clears what an unfinished pairing left', async () => {
    mkdirSync(join(root, 'store'), { recursive: true });
    renameSync(pendingPairingAuthDir(), join(root, 'store', 'auth'));
    const offline = await cli(['auth'], '', { WHATSAPP_SERVER_URL: 'ws://127.0.0.1:9/ws/chat' }); // a closed port: no network
    expect(offline.code).toBe(1);
    expect(offline.stdout).toContain('never finished; starting over');
    expect(offline.stderr).toContain('No network: WhatsApp cannot be reached');
    expect(offline.stderr).not.toContain('remove store/auth');
    expect(existsSync(join(root, 'store', 'auth', 'creds.json'))).toBe(false);
  });

  it('tasks run puts what a WhatsApp task says in the outbox and says so; the service then sends it under the same id', async () => {
    await cli(['groups', 'register', FAMILY, 'family', '--name', 'Family']);
    const store = new Store(join(root, 'store', 'messages.db'));
    store.createTask(
      taskRow({
        id: 'water',
        groupFolder: 'family',
        chatJid: FAMILY,
        prompt: 'water the plants',
        scheduleType: 'cron',
        scheduleValue: '0 9 * * *',
        nextRun: new Date(Date.now() + 86_400_000).toISOString(),
        createdAt: new Date().toISOString(),
      }),
    );
    store.close();
    const unlinked = await cli(['tasks', 'run', 'water']);
    expect(unlinked.code).toBe(0);
    expect(unlinked.stdout).toContain(`→ ${FAMILY} (queued for WhatsApp): Andy: echo: water the plants`);
    expect(unlinked.stdout).toContain('WhatsApp is not linked on this machine');
    renameSync(await linkedAuthDir(), join(root, 'store', 'auth'));
    const linked = await cli(['tasks', 'run', 'water']);
    expect(linked.stdout).toContain('Queued in the outbox, for WhatsApp as soon as the service runs');
    const service = new Store(join(root, 'store', 'messages.db'));
    const queued = service.unsent('whatsapp');
    expect(queued.map((m) => m.text)).toEqual(['Andy: echo: water the plants', 'Andy: echo: water the plants']);
    setupLogging(tempProject(), { terminalLevel: 'silent' }); // baileys logs through ours
    const server = flakyServer(60_000);
    const whatsapp = new RecordingWhatsApp({
      authDir: join(root, 'store', 'auth'),
      assistantName: 'Andy',
      hasOwnNumber: false,
      mediaTreeFor: () => null,
      waWebSocketUrl: server.url,
      store: service,
    });
    const sender = new OutboxSender(service, whatsapp, { retryBaseMs: 50 });
    try {
      await whatsapp.connect({ onMessage: () => {}, onReady: () => sender.kick() });
      openAsWhatsAppWould(socketOf(whatsapp));
      await waitFor(() => whatsapp.delivered.length === 2, 60_000, 'the queued task messages');
      await sender.settle();
      expect(whatsapp.delivered.map((d) => d.messageId)).toEqual(queued.map((m) => m.messageId));
      expect(service.unsent('whatsapp').length).toBe(0);
    } finally {
      sender.stop();
      await whatsapp.disconnect();
      server.stop();
      service.close();
    }
  });

  it('tasks run while the service runs asks the service (the task is due now) instead of refusing', async () => {
    await cli(['groups', 'register', FAMILY, 'family']);
    const store = new Store(join(root, 'store', 'messages.db'));
    const task = {
      groupFolder: 'family',
      chatJid: FAMILY,
      scheduleType: 'cron' as const,
      scheduleValue: '0 9 * * *',
      nextRun: new Date(Date.now() + 86_400_000).toISOString(),
      createdAt: new Date().toISOString(),
    };
    store.createTask(taskRow({ ...task, id: 'active' }));
    store.createTask(taskRow({ ...task, id: 'resting', status: 'paused' }));
    store.close();
    const service = Bun.spawn(['sleep', '30']);
    mkdirSync(join(root, 'data'), { recursive: true });
    writeFileSync(join(root, 'data', 'nanoclaw.pid'), String(service.pid));
    try {
      const asked = await cli(['tasks', 'run', 'active']);
      expect(asked.code).toBe(0);
      expect(asked.stdout).toContain(`NanoClaw is running (pid ${service.pid}): it runs active`);
      const after = new Store(join(root, 'store', 'messages.db'));
      expect(Math.abs(new Date(after.getTask('active')!.nextRun!).getTime() - Date.now())).toBeLessThan(10_000);
      after.close();
      const paused = await cli(['tasks', 'run', 'resting']);
      expect(paused.code).toBe(2);
      expect(paused.stderr).toContain('tasks resume resting');
      expect(docker.runs()).toHaveLength(0);
    } finally {
      service.kill();
    }
  });

  it('service uninstall without a user systemd removes the unit file anyway and says in one line why; status says it cannot tell', async () => {
    const home = tempDir();
    const bin = tempDir();
    writeFileSync(join(bin, 'systemctl'), '#!/bin/sh\necho "Failed to connect to bus: No medium found" >&2\nexit 1\n', {
      mode: 0o755,
    });
    const { file: unit } = await unitFor(root, home);
    mkdirSync(join(unit, '..'), { recursive: true });
    writeFileSync(unit, '[Unit]\n');
    const env = { HOME: home, PATH: `${bin}:${process.env.PATH}` };
    const status = await cli(['service', 'status', '--platform', 'linux'], '', env);
    expect(status.code).toBe(3);
    expect(status.stdout.trim().split('\n')).toEqual([
      `systemd (your user instance) cannot be reached (Failed to connect to bus: No medium found); the unit file is installed at ${unit}.`,
    ]);
    const removed = await cli(['service', 'uninstall', '--platform', 'linux'], '', env);
    expect(removed.code).toBe(0);
    expect(removed.stdout).toContain(
      'systemd (your user instance) could not be asked to stop NanoClaw (Failed to connect to bus: No medium found).',
    );
    expect(removed.stdout).toContain(`Removed ${unit}`);
    expect(existsSync(unit)).toBe(false);
  });

  it('service install on macOS hands launchctl the plist path as one argument, even with a space in the home folder', async () => {
    const home = tempDir('home with space-');
    const bin = tempDir();
    const calls = join(bin, 'calls');
    writeFileSync(join(bin, 'launchctl'), `#!/bin/sh\nfor a in "$@"; do echo "$a"; done >>'${calls}'\n`, {
      mode: 0o755,
    });
    const env = { HOME: home, PATH: `${bin}:${process.env.PATH}` };
    const installed = await cli(['service', 'install', '--platform', 'macos'], '', env);
    expect(installed.code).toBe(0);
    const plist = /^Wrote (.+)$/m.exec(installed.stdout)![1]!;
    expect(plist.startsWith(home)).toBe(true);
    expect(readFileSync(calls, 'utf8').split('\n').filter(Boolean)).toEqual(['load', '-w', plist]);
  });
});

/** `chat` on a real terminal (a pty from util-linux `script`), as a person types into it. */
describe('what reaches the operator’s terminal', () => {
  it('escapes control characters and bidi overrides, keeps newlines, tabs and letters', () => {
    expect(visibleText('a\x1b]0;pwned\x07b\x1b[2J\r\u202eevil\u2066\tok\né')).toBe(
      'a\\x1b]0;pwned\\x07b\\x1b[2J\\x0d\\u202eevil\\u2066\tok\né',
    );
  });
});

describe('chat manners on a terminal', () => {
  function onTerminal() {
    const proc = Bun.spawn(['script', '-qfec', `${process.execPath} ${ENTRY} chat`, '/dev/null'], {
      cwd: root,
      stdin: 'pipe',
      stdout: 'pipe',
      stderr: 'pipe',
      env: cliEnv({ TERM: 'xterm' }),
    });
    let screen = '';
    const drained = (async () => {
      for await (const chunk of proc.stdout) screen += new TextDecoder().decode(chunk);
    })();
    return {
      proc,
      screen: () => screen,
      /** The exit code, once the last of the output has been read too. */
      exited: async () => {
        const code = await proc.exited;
        await drained;
        return code;
      },
      type: async (keys: string) => {
        proc.stdin.write(keys);
        await proc.stdin.flush();
      },
    };
  }

  it('shows a spinner while the agent works, the reply above the prompt; Ctrl-C mid-turn stops it at once, exits 130, and the next start does not answer it behind the user’s back', async () => {
    const term = onTerminal();
    await waitFor(() => term.screen().includes('you › '), 60_000, 'the prompt');
    await term.type('hello there\r');
    await waitFor(() => term.screen().includes('Andy: echo: hello there'), 60_000, 'the reply');
    await term.type('!sleep 20000\r');
    const sent = term.screen().length; // the first turn's spinner is already on the screen: look past it
    await waitFor(() => /[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] Andy is working… you › /.test(term.screen().slice(sent)), 60_000, 'the spinner');
    const pressed = Date.now();
    await term.type('\x03');
    expect(await term.exited()).toBe(130);
    expect(Date.now() - pressed).toBeLessThan(8_000); // not the 20 s the turn would take
    expect(term.screen()).toContain('Stopped. That message will not be answered');
    // biome-ignore lint/suspicious/noControlCharactersInRegex: the terminal's erase-line escape is what is checked
    expect(term.screen()).toMatch(/\r\x1b\[2KAndy: echo: hello there\r?\n/); // printed on a cleared line, not after the prompt
    expect(docker.calls().some((c) => c.argv[0] === 'stop')).toBe(true);
    const runs = docker.answering().length;
    const next = await cli(['chat'], '');
    expect(next.code).toBe(0);
    expect(docker.answering()).toHaveLength(runs); // the abandoned message was not run again
  });

  it('Ctrl-C pressed with the Enter, before the turn has begun, still stops that message for good', async () => {
    const term = onTerminal();
    await waitFor(() => term.screen().includes('you › '), 60_000, 'the prompt');
    const pressed = Date.now();
    await term.type('!sleep 20000\r\x03');
    expect(await term.exited()).toBe(130);
    expect(Date.now() - pressed).toBeLessThan(8_000);
    expect(term.screen()).toContain('Stopped. That message will not be answered');
    expect(term.screen()).not.toContain('The agent failed'); // a stopped container is no failure to report
    const runs = docker.answering().length;
    const next = await cli(['chat'], '');
    expect(next.code).toBe(0);
    expect(docker.answering()).toHaveLength(runs); // not answered behind the user's back
  });

  it('starts the agent at the first keystroke, so the typed line goes into a running container', async () => {
    const term = onTerminal();
    await waitFor(() => term.screen().includes('you › '), 60_000, 'the prompt');
    await term.type('h');
    await waitFor(
      () => docker.calls().some((c) => c.command === 'warm-start'),
      60_000,
      'a container started while typing',
    );
    await term.type('ello\r');
    await waitFor(() => term.screen().includes('Andy: echo: hello'), 60_000, 'the reply');
    expect(docker.runs()).toHaveLength(1);
    expect(docker.calls().filter((c) => c.command === 'follow-up')).toHaveLength(1);
    await term.type('\x04');
    expect(await term.exited()).toBe(0);
  });

  it('piped, it prints replies only; a failed turn says when it is retried, and that it was not, once the input ended', async () => {
    const failed = await cli(['chat'], '!fail the model is down\n');
    expect(failed.stdout).toBe('');
    expect(failed.stderr).toContain('The agent failed: the model is down');
    expect(failed.stderr).toContain('Retrying in 5 s (attempt 1 of 5).');
    expect(failed.stderr).toContain('Not answered: the agent failed and the input ended before a retry.');
    // The next chat shows only its own run's answers: the failed line is not answered behind the person's back.
    const next = await cli(['chat'], 'hello\n');
    expect(next.stdout).toBe('Andy: echo: hello\n');
    expect(next.stderr).not.toContain('The agent failed');
    // biome-ignore lint/suspicious/noControlCharactersInRegex: no terminal escapes may reach a pipe
    expect(failed.stderr).not.toMatch(/[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]|\x1b\[/);
  });
});

describe('a newcomer’s first steps', () => {
  it('service units are named per install: two projects on one machine get two units', async () => {
    const home = tempDir();
    const other = tempProject().projectRoot;
    const [mine, theirs] = [await unitFor(root, home), await unitFor(other, home)];
    expect(mine.file).toMatch(new RegExp(`^${home}/\\.config/systemd/user/nanoclaw-[0-9a-f]{12}\\.service$`));
    expect(theirs.file).not.toBe(mine.file);
    expect(mine.unit).toContain(`WorkingDirectory=${root}\n`);
    expect(theirs.unit).toContain(`WorkingDirectory=${other}\n`);
    expect(mine.unit).toMatch(/^\$ systemctl --user enable --now nanoclaw-[0-9a-f]{12}$/m);
  });

  it('service install for a data folder (NANOCLAW_ROOT) writes a unit that starts the real nanoclaw.ts there', async () => {
    const home = tempDir();
    const { file } = await unitFor(root, home);
    const bin = tempDir();
    writeFileSync(join(bin, 'systemctl'), '#!/bin/sh\nexit 0\n', { mode: 0o755 }); // a user systemd that says yes
    const installed = await cli(['service', 'install', '--platform', 'linux'], '', {
      HOME: home,
      PATH: `${bin}:${process.env.PATH}`,
    });
    expect(installed.code).toBe(0);
    expect(installed.stdout).toContain(`Wrote ${file}`);
    const unit = readFileSync(file, 'utf8');
    const [, program, entry] = /^ExecStart=(\S+) (\S+)$/m.exec(unit)!;
    expect([program, entry]).toEqual([process.execPath, ENTRY]);
    expect(existsSync(join(root, 'nanoclaw.ts'))).toBe(false); // the data folder holds no code
    expect(unit).toContain(`Environment=NANOCLAW_ROOT=${root}\n`);
    expect(unit).toContain(`WorkingDirectory=${root}\n`);
  });

  it('Ctrl-C (SIGINT) mid-turn is an orderly stop: exit 130, logged at info, nothing at ERROR', async () => {
    const proc = await chatMidTurn(20000);
    proc.kill('SIGINT');
    expect(await proc.exited).toBe(130);
    expect(await new Response(proc.stderr).text()).toBe('');
    const errorLog = join(root, 'logs', 'nanoclaw.error.log');
    expect(existsSync(errorLog) ? readFileSync(errorLog, 'utf8') : '').toBe('');
    const hostLog = readFileSync(join(root, 'logs', 'nanoclaw.log'), 'utf8');
    expect(hostLog).toMatch(/ INFO: Stopped by Ctrl-C/);
    expect(hostLog).toMatch(/ INFO: \[main\] Agent container stopped/);
    expect(hostLog).not.toMatch(/ ERROR: /);
  });

  it('groups add --mount: a folder the allowlist allows is mounted (read-only unless rw); one outside it is one line, exit 2', async () => {
    const shared = realpathSync(tempDir());
    const outside = realpathSync(tempDir());
    const allowlist = join(root, 'mount-allowlist.json');
    writeFileSync(allowlist, JSON.stringify({ allowedRoots: [{ path: shared, allowReadWrite: true }] }));
    const env = { NANOCLAW_MOUNT_ALLOWLIST: allowlist };
    const refused = await cli(['groups', 'add', FAMILY, 'family', '--mount', outside], '', env);
    expect(refused.code).toBe(2);
    expect(refused.stderr.split('\n')[0]).toBe(`--mount ${outside}: refused (not under any allowed root).`);
    expect(refused.stderr).toContain('Usage: bun nanoclaw.ts …\n  groups list');
    expect(refused.stderr).not.toMatch(/^\s+at /m);
    expect((await cli(['groups', 'list'], '', env)).stdout).not.toContain(FAMILY); // nothing registered
    const mount = ['--mount', `${shared}:docs:rw`, '--mount', shared];
    expect((await cli(['groups', 'add', FAMILY, 'family', ...mount], '', env)).code).toBe(0);
    const mounts = (await cli(['mounts', 'family'], '', env)).stdout;
    expect(mounts).toContain(`${shared} -> /workspace/extra/docs (rw)`);
    expect(mounts).toContain(`${shared} -> /workspace/extra/${basename(shared)} (ro)`);
    const bad = await cli(['groups', 'add', '120363000000000102@g.us', 'two', '--mount', `${shared}:a:b:c`], '', env);
    expect(bad.code).toBe(2);
    expect(bad.stderr.split('\n')[0]).toBe(`--mount ${shared}:a:b:c: use <hostPath>[:<containerPath>][:ro|rw].`);
  });

  it('scripts/container.sh test on a group that never ran says so in one line (no EACCES inside the container), and runs nothing', async () => {
    expect((await cli(['groups', 'register', FAMILY, 'family'])).code).toBe(0);
    const run = Bun.spawnSync(['bash', join(REPO, 'scripts', 'container.sh'), 'test', 'family'], {
      env: cliEnv({ PATH: `${dirname(process.execPath)}:${process.env.PATH}` }),
      stdout: 'pipe',
      stderr: 'pipe',
    });
    expect(run.exitCode).toBe(2);
    const lines = run.stderr.toString().trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^groups\/family has not run yet \(\S+ does not exist\): send it a message first/);
    expect(docker.runs()).toHaveLength(0);
  });
});
