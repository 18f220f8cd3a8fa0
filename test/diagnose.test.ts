/**
 * scripts/diagnose.sh against a healthy project and against projects broken one way each.
 * Each fixture is a real project layout (real SQLite store, real files, real WhatsApp
 * credentials as baileys writes them) with the fake docker as CONTAINER_RUNTIME, and the
 * script runs as a user runs it. The script asks the host (config get, auth --check,
 * mounts, model check), so the fixture's code directory holds a copy of nanoclaw.ts that a
 * test may break to see the behaviour checks catch it.
 */
import {
  chmodSync,
  copyFileSync,
  mkdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { addGroup, Store, type Config } from '../nanoclaw.ts';
import { startFakeModel } from '../scripts/scripted-model.ts';
import {
  fakeDocker,
  linkedAuthDir,
  NO_MODEL_URL,
  pendingPairingAuthDir,
  tempDir,
  tempProject,
  type FakeDocker,
} from './helpers.ts';

const REPO = fileURLToPath(new URL('..', import.meta.url));
/** The Kimi Code CLI this checkout pins (the image, real or fake, runs it). */
const PIN = (
  JSON.parse(readFileSync(join(REPO, 'container', 'agent-runner', 'package.json'), 'utf8')) as {
    devDependencies: Record<string, string>;
  }
).devDependencies['@moonshot-ai/kimi-code']!;
const IMAGE_OK = `Kimi Code CLI ${PIN}; kimi doctor finds its files valid`;
/** The user's own number, as linkedAuthDir() links it: a WhatsApp user's main chat. */
const OWN_JID = '4915100000001@s.whatsapp.net';

interface Fixture {
  config: Config;
  codeDir: string;
  docker: FakeDocker;
  env: Record<string, string>;
}

// Stand-ins for a running service (their pid in data/nanoclaw.pid); stopped after the file,
// not after each test, since some tests run side by side.
const sleepers: { kill(): void }[] = [];
afterAll(() => {
  for (const s of sleepers.splice(0)) s.kill();
});

/** Replaces text in a file of the fixture, failing loudly when the text is not there (any more). */
function edit(file: string, from: string, to: string): void {
  const text = readFileSync(file, 'utf8');
  if (!text.includes(from)) throw new Error(`${file} no longer contains ${JSON.stringify(from)}: update this test`);
  writeFileSync(file, text.replaceAll(from, to));
}

/** Moves the credentials baileys left in `dir` into the project's store/auth/. */
function useAuth(f: Fixture, dir: string): void {
  const auth = join(f.config.storeDir, 'auth');
  rmSync(auth, { recursive: true, force: true });
  mkdirSync(auth, { recursive: true });
  copyFileSync(join(dir, 'creds.json'), join(auth, 'creds.json'));
}

/** A project on which every check passes: a WhatsApp user, linked, with the service running. */
async function healthyProject(): Promise<Fixture> {
  const docker = fakeDocker();
  const config = tempProject({}, 'KIMI_API_KEY=sk-diagnose-1234567890\n');
  const codeDir = tempDir('nanoclaw-code-');
  mkdirSync(join(codeDir, 'scripts'));
  mkdirSync(join(codeDir, 'container', 'agent-runner'), { recursive: true });
  const files = [
    'nanoclaw.ts',
    'bunfig.toml',
    'scripts/diagnose.sh',
    'scripts/service.sh',
    'container/agent-runner/package.json',
  ];
  for (const file of files) copyFileSync(join(REPO, file), join(codeDir, file));
  symlinkSync(join(REPO, 'node_modules'), join(codeDir, 'node_modules'));
  const store = new Store(config.dbPath);
  addGroup(config, store, { jid: OWN_JID, name: 'Me', folder: 'main', isMain: true });
  store.close();
  mkdirSync(join(config.groupsDir, 'main', 'logs'), { recursive: true });
  writeFileSync(
    join(config.groupsDir, 'main', 'logs', 'container-2026-01-01T10-00-00-000Z.log'),
    'Exit code:  0\nResults:    1\n',
  );
  mkdirSync(config.logsDir, { recursive: true });
  writeFileSync(
    join(config.logsDir, 'nanoclaw.log'),
    ['s1', 's1', 's1'].map((id) => `[2026-01-01 10:00:00.000] INFO: [main] Session initialized: ${id}`).join('\n') +
      '\n',
  );
  const sleeper = Bun.spawn(['sleep', '3600']); // killed after the file; outlives any run under load
  sleepers.push(sleeper);
  mkdirSync(config.dataDir, { recursive: true });
  writeFileSync(join(config.dataDir, 'nanoclaw.pid'), String(sleeper.pid));
  const bunDir = join(process.execPath, '..');
  const fixture = {
    config,
    codeDir,
    docker,
    env: {
      PATH: `${bunDir}:${process.env.PATH}`,
      HOME: process.env.HOME!,
      NANOCLAW_ROOT: config.projectRoot,
      CONTAINER_RUNTIME: docker.path,
      KIMI_BASE_URL: NO_MODEL_URL,
    },
  };
  useAuth(fixture, await linkedAuthDir());
  return fixture;
}

/** Someone who only ever used `bun nanoclaw.ts chat`: main is main@local, no WhatsApp, no service. */
async function terminalProject(): Promise<Fixture> {
  const fixture = await healthyProject();
  rmSync(join(fixture.config.storeDir, 'auth'), { recursive: true, force: true });
  rmSync(join(fixture.config.dataDir, 'nanoclaw.pid'));
  Bun.spawnSync([
    'sqlite3',
    fixture.config.dbPath,
    "UPDATE registered_groups SET jid = 'main@local' WHERE is_main = 1",
  ]);
  return fixture;
}

interface Check {
  check: string;
  status: 'ok' | 'fail' | 'info';
  detail: string;
  fix: string;
}

async function run(argv: string[], f: Fixture, cwd = tempDir()): Promise<{ out: string; err: string; code: number }> {
  // Not spawnSync: the model check may talk to a fake model served by this very process.
  const proc = Bun.spawn(argv, { cwd, env: f.env, stdout: 'pipe', stderr: 'pipe' });
  const [out, err, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { out, err, code };
}

async function diagnose(
  f: Fixture,
): Promise<{ checks: Record<string, Check>; list: Check[]; code: number; text: string }> {
  const script = join(f.codeDir, 'scripts', 'diagnose.sh');
  // One after the other, as a person runs them. (The two forms once disagreed under load: a
  // `printf | grep -q` under pipefail, now gone from the script.)
  const json = await run(['bash', script, '--json'], f);
  const list = JSON.parse(json.out) as Check[];
  const human = await run(['bash', script], f, '/');
  const failedIn = (text: string) => [...text.matchAll(/^FAIL {2}([^:]+):/gm)].map((m) => m[1]);
  expect(failedIn(human.out), human.out).toEqual(list.filter((c) => c.status === 'fail').map((c) => c.check));
  expect(human.code).toBe(json.code);
  return { checks: Object.fromEntries(list.map((c) => [c.check, c])), list, code: json.code, text: human.out };
}

const failing = (checks: Record<string, Check>) =>
  Object.values(checks)
    .filter((c) => c.status === 'fail')
    .map((c) => c.check);

type Diagnosis = Awaited<ReturnType<typeof diagnose>>;
const diagnosed = new Map<string, Promise<{ fixture: Fixture; result: Diagnosis }>>();

/** A project state diagnosed once, however many cases read it: `make` builds it the first time its name is asked for. */
function diagnosedOnce(name: string, make: () => Promise<Fixture>): Promise<{ fixture: Fixture; result: Diagnosis }> {
  let run = diagnosed.get(name);
  if (!run) {
    run = make().then(async (fixture) => ({ fixture, result: await diagnose(fixture) }));
    diagnosed.set(name, run);
  }
  return run;
}

describe('scripts/diagnose.sh', () => {
  it('passes every check on a healthy project, in the documented order, from any directory', async () => {
    const { checks, code, text } = await diagnose(await healthyProject());
    expect(failing(checks)).toEqual([]);
    expect(code).toBe(0);
    expect(Object.keys(checks)).toEqual([
      'Settings',
      'API key',
      'Key delivery',
      'data/env/env',
      'Container engine',
      'Agent image',
      'Session mount',
      'Groups',
      'Container logs',
      'Session continuity',
      'Bun',
      'WhatsApp',
      'Database',
      'IPC',
      'Disk',
      'Service',
      'Model endpoint',
    ]);
    // No network in the fixture (KIMI_BASE_URL is a closed loopback port): a note, not a failure.
    expect(checks['Model endpoint']).toMatchObject({
      status: 'info',
      detail: expect.stringContaining('not checked: no network'),
    });
    expect(checks['API key']!.detail).toBe('KIMI_API_KEY is set (22 characters)');
    expect(checks['Agent image']!.detail).toBe(`nanoclaw-agent:latest, ${IMAGE_OK}`);
    expect(checks.Groups!.detail).toContain(`main is main (${OWN_JID})`);
    expect(checks.WhatsApp).toMatchObject({ status: 'ok', detail: expect.stringContaining('linked') });
    expect(checks['Session mount']).toMatchObject({
      status: 'ok',
      detail: 'data/sessions/main/.kimi -> /home/node/.kimi (rw)',
    });
    expect(checks['Key delivery']!.detail).toContain("NanoClaw's model proxy");
    // The guide's checklist says data/env/env is "created on first run"; NanoClaw never needs it.
    expect(checks['data/env/env']).toMatchObject({
      status: 'info',
      detail: expect.stringContaining('cp .env data/env/env'),
    });
    expect(text).toContain('All checks passed.');
    expect(text).not.toContain('sk-diagnose-1234567890');
  });

  const brokenOneWay: [string, (f: Fixture) => void, string, string][] = [
    ['no key', (f) => writeFileSync(f.config.envFile, 'TZ=UTC\n'), 'API key', 'KIMI_API_KEY='],
    ['no image', (f) => f.docker.set('no-image'), 'Agent image', './container/build.sh'],
    ['no kimi in the image', (f) => f.docker.set('no-kimi'), 'Agent image', '--no-cache'],
    [
      'an image older than the pin',
      (f) => edit(join(f.codeDir, 'container', 'agent-runner', 'package.json'), `"${PIN}"`, '"99.0.0"'),
      'Agent image',
      './container/build.sh (the image is older than the code)',
    ],
    // The host itself mounts the sessions elsewhere: the check reads its mount table, not its source.
    [
      'wrong session mount path',
      (f) => edit(join(f.codeDir, 'nanoclaw.ts'), "'/home/node/.kimi'", "'/root/.kimi'"),
      'Session mount',
      '/home/node/.kimi',
    ],
    [
      '.env loading left on',
      (f) => writeFileSync(join(f.codeDir, 'bunfig.toml'), '[install]\nexact = true\n'),
      'Key delivery',
      'env = false',
    ],
    ['bunfig.toml missing', (f) => rmSync(join(f.codeDir, 'bunfig.toml')), 'Key delivery', 'env = false'],
    [
      'the main group sees .env',
      (f) => edit(join(f.codeDir, 'nanoclaw.ts'), "HIDDEN_FROM_MAIN = ['.env', ", 'HIDDEN_FROM_MAIN = ['),
      'Key delivery',
      'HIDDEN_FROM_MAIN',
    ],
    [
      'a bad setting in .env',
      (f) => writeFileSync(f.config.envFile, 'KIMI_API_KEY=sk-diagnose-1234567890\nLOG_LEVEL=loud\n'),
      'Settings',
      '.env',
    ],
    ['the host cannot load its packages', (f) => rmSync(join(f.codeDir, 'node_modules')), 'Settings', 'bun install'],
    [
      'stuck IPC file',
      (f) => {
        const dir = join(f.config.ipcDir, 'main', 'messages');
        mkdirSync(dir, { recursive: true });
        writeFileSync(join(dir, '1-old.json'), '{}');
        utimesSync(join(dir, '1-old.json'), new Date(Date.now() - 600_000), new Date(Date.now() - 600_000));
      },
      'IPC',
      'start NanoClaw',
    ],
    [
      'rejected IPC file',
      (f) => {
        mkdirSync(join(f.config.ipcDir, 'errors'), { recursive: true });
        writeFileSync(join(f.config.ipcDir, 'errors', 'main-messages-1.json'), '{');
      },
      'IPC',
      'IPC file rejected',
    ],
    [
      'not linked to WhatsApp',
      (f) => rmSync(join(f.config.storeDir, 'auth'), { recursive: true }),
      'WhatsApp',
      'bun nanoclaw.ts auth',
    ],
    // What the old check took for a link: the file exists, but WhatsApp never confirmed a device.
    [
      'creds.json without a device',
      (f) => writeFileSync(join(f.config.storeDir, 'auth', 'creds.json'), '{}'),
      'WhatsApp',
      'bun nanoclaw.ts auth',
    ],
    ['a pairing never finished', (f) => useAuth(f, pendingPairingAuthDir()), 'WhatsApp', 'bun nanoclaw.ts auth'],
    [
      'a readable copy of the key in data/env/env',
      (f) => {
        mkdirSync(join(f.config.dataDir, 'env'), { recursive: true });
        copyFileSync(f.config.envFile, join(f.config.dataDir, 'env', 'env'));
        chmodSync(join(f.config.dataDir, 'env', 'env'), 0o644);
      },
      'data/env/env',
      'chmod 600',
    ],
    [
      'service not running',
      (f) => writeFileSync(join(f.config.dataDir, 'nanoclaw.pid'), '999999'),
      'Service',
      'service install',
    ],
    [
      'latest container run failed',
      (f) =>
        writeFileSync(
          join(f.config.groupsDir, 'main', 'logs', 'container-2026-01-02T10-00-00-000Z.log'),
          'Exit code:  1\nResults:    1 (last error: LLM is not set)\n',
        ),
      'Container logs',
      'docs/troubleshooting.md',
    ],
    [
      'a new session every run',
      (f) =>
        writeFileSync(
          join(f.config.logsDir, 'nanoclaw.log'),
          `${['a', 'b', 'c', 'd', 'e']
            .map((id) => `[2026-01-01 10:00:00.000] INFO: [main] Session initialized: ${id}`)
            .join('\n')}\n`,
        ),
      'Session continuity',
      'sessions clear main',
    ],
    [
      'no main group',
      (f) => Bun.spawnSync(['sqlite3', f.config.dbPath, 'DELETE FROM registered_groups']),
      'Groups',
      'bun nanoclaw.ts',
    ],
  ];

  /** A healthy project broken the named way, diagnosed once: the cases below and later ones read the same run. */
  const brokenWay = (name: string) => {
    const breakIt = brokenOneWay.find(([way]) => way === name)![1];
    return diagnosedOnce(name, async () => {
      const fixture = await healthyProject();
      breakIt(fixture);
      return fixture;
    });
  };

  // Each case has its own project (code copy, store, fake docker): they run side by side.
  for (const [name, , check, fixMentions] of brokenOneWay) {
    it.concurrent(`names the one broken piece and its fix: ${name}`, async () => {
      const { checks, code, text } = (await brokenWay(name)).result;
      expect(failing(checks)).toEqual([check]);
      expect(checks[check]!.fix).toContain(fixMentions);
      expect(code).toBe(1);
      expect(text).toContain(`FAIL  ${check}:`);
      expect(text).toContain('1 check(s) failed.');
    });
  }

  it('the behaviour checks say what the host really does: where it mounts the sessions, which file it shows', async () => {
    const moved = (await brokenWay('wrong session mount path')).result;
    expect(moved.checks['Session mount']!.detail).toContain('at /root/.kimi');
    const shown = (await brokenWay('the main group sees .env')).result;
    expect(shown.checks['Key delivery']!.detail).toContain('.env (seen at /workspace/project/.env)');
    const refused = (await brokenWay('a bad setting in .env')).result;
    expect(refused.checks.Settings!.detail).toContain('LOG_LEVEL="loud" is not valid');
    // The other checks still ran, on the environment and the defaults.
    expect(refused.checks['Container engine']!.status).toBe('ok');
    expect(refused.checks['Agent image']!.detail).toBe(`nanoclaw-agent:latest, ${IMAGE_OK}`);
  });

  it('reads settings as the host does: a trailing comment in .env is not part of the value', async () => {
    const fixture = await healthyProject();
    writeFileSync(
      fixture.config.envFile,
      'KIMI_API_KEY=sk-diagnose-1234567890   # my key\nCONTAINER_IMAGE=nanoclaw-agent:latest # the image\n',
    );
    const { checks, code } = await diagnose(fixture);
    expect(failing(checks)).toEqual([]);
    expect(code).toBe(0);
    expect(checks['API key']!.detail).toBe('KIMI_API_KEY is set (22 characters)');
    expect(checks['Agent image']!.detail).toBe(`nanoclaw-agent:latest, ${IMAGE_OK}`);
    const inspected = fixture.docker
      .calls()
      .filter((c) => c.command === 'image')
      .map((c) => c.argv.at(-1));
    expect(inspected.length).toBeGreaterThan(0);
    expect(new Set(inspected)).toEqual(new Set(['nanoclaw-agent:latest']));
  });

  it('the environment wins over .env, for the key too', async () => {
    const fixture = await healthyProject();
    writeFileSync(fixture.config.envFile, 'CONTAINER_IMAGE=from-dotenv:1\nCONTAINER_RUNTIME=/nowhere/docker\n');
    fixture.env.CONTAINER_IMAGE = 'from-env:2';
    fixture.env.KIMI_API_KEY = 'sk-from-the-environment';
    const { checks, code } = await diagnose(fixture);
    expect(failing(checks)).toEqual([]);
    expect(code).toBe(0);
    expect(checks['Agent image']!.detail).toBe(`from-env:2, ${IMAGE_OK}`);
    expect(checks.Settings!.detail).toContain(`runtime ${fixture.docker.path}, image from-env:2`);
    expect(checks['API key']!.detail).toBe('KIMI_API_KEY is set (23 characters)');
  });

  it('a terminal-only user (main@local, never linked, no service) passes, with notes on WhatsApp and the service', async () => {
    const { checks, code, text } = await diagnose(await terminalProject());
    expect(failing(checks)).toEqual([]);
    expect(code).toBe(0);
    expect(checks.Groups!.detail).toContain('main is main (main@local)');
    expect(checks.WhatsApp).toMatchObject({ status: 'info', detail: expect.stringContaining('bun nanoclaw.ts chat') });
    expect(checks.WhatsApp!.detail).toContain('to add WhatsApp: bun nanoclaw.ts auth');
    expect(checks.Service).toMatchObject({ status: 'info', detail: expect.stringContaining('not running') });
    expect(text).toContain('INFO  WhatsApp: not linked: you use the terminal');
    expect(text).toContain('All checks passed.');
  });

  it('finds the service unit scripts/service.sh installed for this project, under the same install id', async () => {
    const fixture = await terminalProject();
    const dryRun = await run(
      [process.execPath, join(REPO, 'nanoclaw.ts'), 'service', 'install', '--dry-run', '--platform', 'linux'],
      fixture,
    );
    const id = /nanoclaw-([0-9a-f]{12})\.service$/m.exec(dryRun.out)![1];
    // A service manager (systemd or launchd) that knows this install's unit, and only it, as active.
    const bin = tempDir();
    const manager = `#!/bin/sh\nfor a in "$@"; do case $a in nanoclaw-${id}|com.nanoclaw.${id}) exit 0;; esac; done\nexit 3\n`;
    for (const name of ['systemctl', 'launchctl']) writeFileSync(join(bin, name), manager, { mode: 0o755 });
    fixture.env.PATH = `${bin}:${fixture.env.PATH}`;
    const { checks } = await diagnose(fixture);
    expect(checks.Service).toMatchObject({ status: 'ok', detail: expect.stringContaining('service unit is active') });
  });

  it('a terminal user whose pairing never finished: WhatsApp fails, the service stays a note', async () => {
    const fixture = await terminalProject();
    useAuth(fixture, pendingPairingAuthDir());
    const { checks, code } = await diagnose(fixture);
    expect(failing(checks)).toEqual(['WhatsApp']);
    expect(checks.WhatsApp!.detail).toContain('never finished');
    expect(checks.WhatsApp!.fix).toContain('bun nanoclaw.ts auth');
    expect(checks.Service!.status).toBe('info');
    expect(code).toBe(1);
  });

  it('data/env/env made by hand for the manual test: a note when only its owner can read it', async () => {
    const fixture = await healthyProject();
    const copy = join(fixture.config.dataDir, 'env', 'env');
    mkdirSync(join(fixture.config.dataDir, 'env'), { recursive: true });
    copyFileSync(fixture.config.envFile, copy);
    chmodSync(copy, 0o600);
    const quiet = await diagnose(fixture);
    expect(failing(quiet.checks)).toEqual([]);
    expect(quiet.code).toBe(0);
    expect(quiet.checks['data/env/env']).toMatchObject({
      status: 'info',
      detail: expect.stringContaining('NanoClaw does not use it'),
    });
    // NanoClaw's mounts hide it from the main group (data/ is masked).
    expect(quiet.checks['Key delivery']!.status).toBe('ok');
    chmodSync(copy, 0o640);
    const loud = await diagnose(fixture);
    expect(failing(loud.checks)).toEqual(['data/env/env']);
    expect(loud.checks['data/env/env']!.fix).toContain('chmod 600 data/env/env');
  });

  it('--help prints the usage and exits 0; an unknown option is one line and the usage, exit 2', async () => {
    const fixture = await healthyProject();
    const script = join(fixture.codeDir, 'scripts', 'diagnose.sh');
    for (const flag of ['--help', '-h']) {
      const help = await run(['bash', script, flag], fixture);
      expect(help.code).toBe(0);
      expect(help.out).toContain('Usage: scripts/diagnose.sh [--json]');
      expect(help.out).toContain('Exit status');
    }
    const wrong = await run(['bash', script, '--jsno'], fixture);
    expect(wrong.code).toBe(2);
    expect(wrong.out).toBe('');
    expect(wrong.err.split('\n')[0]).toBe("diagnose.sh: unknown option '--jsno'");
    expect(wrong.err).toContain('Usage: scripts/diagnose.sh');
    expect(fixture.docker.calls()).toEqual([]); // rejected before any check ran
  });

  it('bun nanoclaw.ts diagnose --json, run as a user runs it, gives the checks the script gives', async () => {
    const { fixture, result: direct } = await brokenWay('no image');
    const viaHost = await run([process.execPath, join(fixture.codeDir, 'nanoclaw.ts'), 'diagnose', '--json'], fixture);
    const list = JSON.parse(viaHost.out) as Check[];
    expect(list.map((c) => [c.check, c.status])).toEqual(direct.list.map((c) => [c.check, c.status]));
    expect(list.find((c) => c.check === 'Agent image')!.fix).toBe('./container/build.sh');
    expect(viaHost.code).toBe(1);
    expect(direct.code).toBe(1);
  });

  it('bun nanoclaw.ts diagnose sees a key given only in the environment, and keeps it from docker', async () => {
    const fixture = await healthyProject();
    writeFileSync(fixture.config.envFile, 'TZ=UTC\n');
    fixture.env.KIMI_API_KEY = 'sk-only-in-the-environment';
    const viaHost = await run([process.execPath, join(fixture.codeDir, 'nanoclaw.ts'), 'diagnose', '--json'], fixture);
    const list = JSON.parse(viaHost.out) as Check[];
    expect(list.find((c) => c.check === 'API key')).toMatchObject({
      status: 'ok',
      detail: 'KIMI_API_KEY is set (26 characters)',
    });
    expect(viaHost.code).toBe(0);
    expect(fixture.docker.calls().length).toBeGreaterThan(0);
    for (const call of fixture.docker.calls())
      expect(JSON.stringify(call.env)).not.toContain('sk-only-in-the-environment');
  });

  it('the model endpoint is asked through the proxy: a key it accepts is OK, a refused key fails naming the fix', async () => {
    const model = startFakeModel({ key: 'sk-diagnose-1234567890' });
    try {
      const fixture = await healthyProject();
      fixture.env.KIMI_BASE_URL = model.url;
      fixture.env.KIMI_MODEL_NAME = 'kimi-k2.5';
      const accepted = await diagnose(fixture);
      expect(accepted.checks['Model endpoint']).toMatchObject({
        status: 'ok',
        detail: expect.stringContaining('accepts the key'),
      });
      expect(
        model.requests.some((r) => r.path === '/v1/models' && r.authorization === 'Bearer sk-diagnose-1234567890'),
      ).toBe(true);
      writeFileSync(fixture.config.envFile, 'KIMI_API_KEY=sk-wrong-key\n');
      const refused = await diagnose(fixture);
      expect(failing(refused.checks)).toEqual(['Model endpoint']);
      expect(refused.checks['Model endpoint']!.detail).toContain('401');
      expect(refused.checks['Model endpoint']!.fix).toContain('KIMI_PLATFORM');
      expect(refused.text).toContain('FAIL  Model endpoint:');
    } finally {
      model.stop();
    }
  });

  it('a stopped engine fails the engine check and the image check that depends on it', async () => {
    const fixture = await healthyProject();
    fixture.docker.set('engine-down');
    const { checks, code } = await diagnose(fixture);
    expect(failing(checks)).toEqual(['Container engine', 'Agent image']);
    expect(checks['Container engine']!.detail).toContain('Cannot connect to the Docker daemon');
    expect(checks['Container engine']!.fix).toContain('systemctl start docker');
    expect(code).toBe(2);
  });

  it('a corrupted database fails the integrity check', async () => {
    const fixture = await healthyProject();
    const db = readFileSync(fixture.config.dbPath);
    for (let i = 4096; i < Math.min(db.length, 16384); i++) db[i] = 0x5a; // scribble over the first table pages
    writeFileSync(fixture.config.dbPath, db);
    Bun.spawnSync(['rm', '-f', `${fixture.config.dbPath}-wal`, `${fixture.config.dbPath}-shm`]);
    const { checks, code } = await diagnose(fixture);
    expect(checks.Database!.status).toBe('fail');
    expect(checks.Database!.fix).toContain('.recover');
    expect(code).toBe(failing(checks).length);
  });
});

describe('service files (--dry-run)', () => {
  /** `bun nanoclaw.ts service install --dry-run` for a project, with a HOME of its own. */
  function dryRun(platform: 'linux' | 'macos') {
    const config = tempProject();
    const home = tempDir('nanoclaw-home-');
    const args = ['service', 'install', '--dry-run', '--platform', platform];
    const run = Bun.spawnSync([process.execPath, join(REPO, 'nanoclaw.ts'), ...args], {
      env: { PATH: process.env.PATH!, HOME: home, NANOCLAW_ROOT: config.projectRoot },
    });
    expect(run.exitCode).toBe(0);
    return { config, home, out: run.stdout.toString() };
  }

  it('systemd: runs bun nanoclaw.ts in the project, restarts on failure, output into logs/', () => {
    const { config, out } = dryRun('linux');
    expect(out).toMatch(/^# .*\/\.config\/systemd\/user\/nanoclaw-[0-9a-f]{12}\.service$/m);
    expect(out).toContain(`WorkingDirectory=${config.projectRoot}\n`);
    expect(out).toContain(`ExecStart=${process.execPath} ${join(REPO, 'nanoclaw.ts')}\n`);
    expect(out).toContain(`Environment=NANOCLAW_ROOT=${config.projectRoot}\n`);
    expect(out).toContain(`StandardOutput=append:${config.projectRoot}/logs/nanoclaw.log\n`);
    expect(out).toContain(`StandardError=append:${config.projectRoot}/logs/nanoclaw.error.log\n`);
    expect(out).toContain('Restart=on-failure');
    expect(out).toContain('WantedBy=default.target');
    expect(out).not.toContain('KIMI_API_KEY');
  });

  it('launchd: a plist with the same program, directory and log files', () => {
    const { config, out } = dryRun('macos');
    const file = /^# (.*\/Library\/LaunchAgents\/com\.nanoclaw\.[0-9a-f]{12}\.plist)$/m.exec(out)?.[1];
    expect(file).toBeDefined();
    expect(out).toContain(`<string>${process.execPath}</string><string>${join(REPO, 'nanoclaw.ts')}</string>`);
    expect(out).toContain(`<key>StandardOutPath</key><string>${config.projectRoot}/logs/nanoclaw.log</string>`);
    expect(out).toContain(`<key>StandardErrorPath</key><string>${config.projectRoot}/logs/nanoclaw.error.log</string>`);
    expect(out).toContain('<key>KeepAlive</key><true/>');
    expect(out).toContain(`$ launchctl load -w ${file}`);
  });

  it('the CLI prints the file and the commands, and changes nothing', () => {
    const { home, out } = dryRun('linux');
    expect(out).toMatch(new RegExp(`^# ${home}/\\.config/systemd/user/nanoclaw-[0-9a-f]{12}\\.service$`, 'm'));
    expect(out).toMatch(/^\$ systemctl --user enable --now nanoclaw-[0-9a-f]{12}$/m);
    expect(Bun.spawnSync(['ls', join(home, '.config')]).exitCode).not.toBe(0); // nothing written
  });
});
