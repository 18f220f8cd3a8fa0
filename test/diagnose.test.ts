/**
 * scripts/diagnose.sh against a healthy project and against projects broken one way each.
 * Each fixture is a real project layout (real SQLite store, real files) with the fake
 * docker as CONTAINER_RUNTIME, and the script runs as a user runs it.
 */
import { copyFileSync, mkdirSync, readFileSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { registerGroup, serviceDefinition, Store, type Config } from '../nanoclaw.ts';
import { startFakeModel } from '../container/agent-runner/kimi-stub/fake-model.ts';
import { fakeDocker, NO_MODEL_URL, tempDir, tempProject, type FakeDocker } from './helpers.ts';

const REPO = fileURLToPath(new URL('..', import.meta.url));

interface Fixture {
  config: Config;
  codeDir: string;
  docker: FakeDocker;
  env: Record<string, string>;
}

const sleepers: { kill(): void }[] = [];
afterEach(() => {
  for (const s of sleepers.splice(0)) s.kill();
});

/** A project in which every check passes. */
function healthyProject(): Fixture {
  const docker = fakeDocker();
  const config = tempProject({}, 'KIMI_API_KEY=sk-diagnose-1234567890\n');
  const codeDir = tempDir('nanoclaw-code-');
  mkdirSync(join(codeDir, 'scripts'));
  for (const file of ['nanoclaw.ts', 'bunfig.toml', 'scripts/diagnose.sh']) copyFileSync(join(REPO, file), join(codeDir, file));
  symlinkSync(join(REPO, 'node_modules'), join(codeDir, 'node_modules'));
  const store = new Store(config.dbPath);
  registerGroup(config, store, { jid: 'me@s.whatsapp.net', name: 'Me', folder: 'main', isMain: true });
  store.close();
  mkdirSync(join(config.storeDir, 'auth'), { recursive: true });
  writeFileSync(join(config.storeDir, 'auth', 'creds.json'), '{}');
  mkdirSync(join(config.groupsDir, 'main', 'logs'), { recursive: true });
  writeFileSync(join(config.groupsDir, 'main', 'logs', 'container-2026-01-01T10-00-00-000Z.log'), 'Exit code:  0\nResults:    1\n');
  mkdirSync(config.logsDir, { recursive: true });
  writeFileSync(
    join(config.logsDir, 'nanoclaw.log'),
    ['s1', 's1', 's1'].map((id) => `[2026-01-01 10:00:00.000] INFO: [main] Session initialized: ${id}`).join('\n') + '\n',
  );
  const sleeper = Bun.spawn(['sleep', '60']);
  sleepers.push(sleeper);
  mkdirSync(config.dataDir, { recursive: true });
  writeFileSync(join(config.dataDir, 'nanoclaw.pid'), String(sleeper.pid));
  const bunDir = join(process.execPath, '..');
  return { config, codeDir, docker, env: { PATH: `${bunDir}:${process.env.PATH}`, HOME: process.env.HOME!, NANOCLAW_ROOT: config.projectRoot, CONTAINER_RUNTIME: docker.path, KIMI_BASE_URL: NO_MODEL_URL } };
}

interface Check {
  check: string;
  status: 'ok' | 'fail' | 'info';
  detail: string;
  fix: string;
}

async function diagnose(f: Fixture): Promise<{ checks: Record<string, Check>; code: number; text: string }> {
  const script = join(f.codeDir, 'scripts', 'diagnose.sh');
  const json = Bun.spawn(['bash', script, '--json'], { cwd: tempDir(), env: f.env, stdout: 'pipe', stderr: 'pipe' });
  const [out, code] = await Promise.all([new Response(json.stdout).text(), json.exited]);
  const list = JSON.parse(out) as Check[];
  // Not spawnSync: the model check may talk to a fake model served by this very process.
  const human = Bun.spawn(['bash', script], { cwd: '/', env: f.env, stdout: 'pipe', stderr: 'pipe' });
  const text = await new Response(human.stdout).text();
  await human.exited;
  return { checks: Object.fromEntries(list.map((c) => [c.check, c])), code, text };
}

const failing = (checks: Record<string, Check>) => Object.values(checks).filter((c) => c.status === 'fail').map((c) => c.check);

describe('scripts/diagnose.sh', () => {
  it('passes every check on a healthy project, in the documented order, from any directory', async () => {
    const { checks, code, text } = await diagnose(healthyProject());
    expect(failing(checks)).toEqual([]);
    expect(code).toBe(0);
    expect(Object.keys(checks)).toEqual([
      'API key', 'Key delivery', 'Container engine', 'Agent image', 'Session mount', 'Groups', 'Container logs',
      'Session continuity', 'Bun', 'WhatsApp', 'Database', 'IPC', 'Disk', 'Service', 'Model endpoint',
    ]);
    // No network in the fixture (KIMI_BASE_URL is a closed loopback port): a note, not a failure.
    expect(checks['Model endpoint']).toMatchObject({ status: 'info', detail: expect.stringContaining('not checked: no network') });
    expect(checks['Agent image']!.detail).toContain('kimi 0.0.0-fake');
    expect(checks.Groups!.detail).toContain('main is main (me@s.whatsapp.net)');
    expect(text).toContain('All checks passed.');
  });

  const brokenOneWay: [string, (f: Fixture) => void, string, string][] = [
    ['no key', (f) => writeFileSync(f.config.envFile, 'TZ=UTC\n'), 'API key', 'KIMI_API_KEY='],
    ['no image', (f) => f.docker.set('no-image'), 'Agent image', './container/build.sh'],
    ['no kimi in the image', (f) => f.docker.set('no-kimi'), 'Agent image', '--no-cache'],
    ['wrong session mount path', (f) => {
      const file = join(f.codeDir, 'nanoclaw.ts');
      writeFileSync(file, readFileSync(file, 'utf8').replaceAll("'/home/node/.kimi'", "'/root/.kimi'"));
    }, 'Session mount', '/home/node/.kimi'],
    ['.env loading left on', (f) => writeFileSync(join(f.codeDir, 'bunfig.toml'), '[install]\nexact = true\n'), 'Key delivery', 'env = false'],
    ['stuck IPC file', (f) => {
      const dir = join(f.config.ipcDir, 'main', 'messages');
      mkdirSync(dir, { recursive: true });
      writeFileSync(join(dir, '1-old.json'), '{}');
      utimesSync(join(dir, '1-old.json'), new Date(Date.now() - 600_000), new Date(Date.now() - 600_000));
    }, 'IPC', 'start NanoClaw'],
    ['rejected IPC file', (f) => {
      mkdirSync(join(f.config.ipcDir, 'errors'), { recursive: true });
      writeFileSync(join(f.config.ipcDir, 'errors', 'main-messages-1.json'), '{');
    }, 'IPC', 'IPC file rejected'],
    ['not linked to WhatsApp', (f) => Bun.spawnSync(['rm', '-rf', join(f.config.storeDir, 'auth')]), 'WhatsApp', 'bun nanoclaw.ts auth'],
    ['service not running', (f) => writeFileSync(join(f.config.dataDir, 'nanoclaw.pid'), '999999'), 'Service', 'service install'],
    ['latest container run failed', (f) => writeFileSync(
      join(f.config.groupsDir, 'main', 'logs', 'container-2026-01-02T10-00-00-000Z.log'),
      'Exit code:  1\nResults:    1 (last error: LLM is not set)\n',
    ), 'Container logs', 'Troubleshooting'],
    ['a new session every run', (f) => writeFileSync(
      join(f.config.logsDir, 'nanoclaw.log'),
      ['a', 'b', 'c', 'd', 'e'].map((id) => `[2026-01-01 10:00:00.000] INFO: [main] Session initialized: ${id}`).join('\n') + '\n',
    ), 'Session continuity', 'sessions clear main'],
    ['no main group', (f) => Bun.spawnSync(['sqlite3', f.config.dbPath, 'DELETE FROM registered_groups']), 'Groups', 'bun nanoclaw.ts'],
  ];

  for (const [name, breakIt, check, fixMentions] of brokenOneWay) {
    it(`names the one broken piece and its fix: ${name}`, async () => {
      const fixture = healthyProject();
      breakIt(fixture);
      const { checks, code, text } = await diagnose(fixture);
      expect(failing(checks)).toEqual([check]);
      expect(checks[check]!.fix).toContain(fixMentions);
      expect(code).toBe(1);
      expect(text).toContain(`FAIL  ${check}:`);
      expect(text).toContain('1 check(s) failed.');
    });
  }

  it('the model endpoint is asked through the proxy: a key it accepts is OK, a refused key fails naming the fix', async () => {
    const model = startFakeModel({ key: 'sk-diagnose-1234567890' });
    try {
      const fixture = healthyProject();
      fixture.env.KIMI_BASE_URL = model.url;
      fixture.env.KIMI_MODEL_NAME = 'kimi-k2.5';
      const accepted = await diagnose(fixture);
      expect(accepted.checks['Model endpoint']).toMatchObject({ status: 'ok', detail: expect.stringContaining('accepts the key') });
      expect(model.requests.some((r) => r.path === '/v1/models' && r.authorization === 'Bearer sk-diagnose-1234567890')).toBe(true);
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
    const fixture = healthyProject();
    fixture.docker.set('engine-down');
    const { checks, code } = await diagnose(fixture);
    expect(failing(checks)).toEqual(['Container engine', 'Agent image']);
    expect(checks['Container engine']!.detail).toContain('Cannot connect to the Docker daemon');
    expect(checks['Container engine']!.fix).toContain('systemctl start docker');
    expect(code).toBe(2);
  });

  it('a corrupted database fails the integrity check', async () => {
    const fixture = healthyProject();
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
  it('systemd: runs bun nanoclaw.ts in the project, restarts on failure, output into logs/', () => {
    const config = tempProject();
    const unit = serviceDefinition(config, 'linux', '/opt/bun/bin/bun', '/usr/bin:/bin');
    expect(unit.file).toMatch(/\.config\/systemd\/user\/nanoclaw\.service$/);
    expect(unit.content).toContain(`WorkingDirectory=${config.projectRoot}\n`);
    expect(unit.content).toContain(`ExecStart=/opt/bun/bin/bun ${config.projectRoot}/nanoclaw.ts\n`);
    expect(unit.content).toContain(`StandardOutput=append:${config.projectRoot}/logs/nanoclaw.log\n`);
    expect(unit.content).toContain(`StandardError=append:${config.projectRoot}/logs/nanoclaw.error.log\n`);
    expect(unit.content).toContain('Restart=on-failure');
    expect(unit.content).toContain('WantedBy=default.target');
    expect(unit.content).not.toContain('KIMI_API_KEY');
  });

  it('launchd: a plist with the same program, directory and log files', () => {
    const config = tempProject();
    const agent = serviceDefinition(config, 'macos', '/opt/homebrew/bin/bun', '/usr/bin:/bin');
    expect(agent.file).toMatch(/Library\/LaunchAgents\/com\.nanoclaw\.plist$/);
    expect(agent.content).toContain('<string>/opt/homebrew/bin/bun</string><string>' + `${config.projectRoot}/nanoclaw.ts</string>`);
    expect(agent.content).toContain(`<key>StandardOutPath</key><string>${config.projectRoot}/logs/nanoclaw.log</string>`);
    expect(agent.content).toContain(`<key>StandardErrorPath</key><string>${config.projectRoot}/logs/nanoclaw.error.log</string>`);
    expect(agent.content).toContain('<key>KeepAlive</key><true/>');
    expect(agent.install).toEqual([['launchctl', 'load', '-w', agent.file]]);
  });

  it('the CLI prints the file and the commands, and changes nothing', async () => {
    const config = tempProject();
    const home = tempDir('nanoclaw-home-');
    const proc = Bun.spawn([process.execPath, join(REPO, 'nanoclaw.ts'), 'service', 'install', '--dry-run', '--platform', 'linux'], {
      env: { PATH: process.env.PATH!, HOME: home, NANOCLAW_ROOT: config.projectRoot }, stdout: 'pipe', stderr: 'pipe',
    });
    const [out, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
    expect(code).toBe(0);
    expect(out).toContain(`# ${home}/.config/systemd/user/nanoclaw.service`);
    expect(out).toContain('$ systemctl --user enable --now nanoclaw');
    expect(Bun.spawnSync(['ls', join(home, '.config')]).exitCode).not.toBe(0); // nothing written
  });
});
