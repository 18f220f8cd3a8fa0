import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism, totalmem } from 'node:os';
import { isAbsolute, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import * as nc from '../nanoclaw.ts';
import {
  childProcessEnv,
  ConfigError,
  defaultConcurrency,
  keyRefusedNotice,
  defaultPoolSize,
  loadConfig,
  maskSecrets,
  readSecrets,
  setupLogging,
  takeSecretsOutOfEnvironment,
} from '../nanoclaw.ts';
import { tempDir, tempProject } from './helpers.ts';

const REPO = fileURLToPath(new URL('..', import.meta.url));

describe('.env', () => {
  it('reads KEY=value lines with quotes, export and comments', () => {
    const root = tempDir();
    const text = [
      '# a comment',
      '',
      'ASSISTANT_NAME=value',
      'export CONTAINER_IMAGE=yes',
      'KIMI_MODEL_CAPABILITIES="with spaces # not a comment"',
      "CONTAINER_RUNTIME='single'",
      'TRANSCRIBE_MODEL=abc # comment',
      'KIMI_BASE_URL="line\\nnext"',
      'not a line',
    ].join('\n');
    writeFileSync(join(root, '.env'), text);
    const config = loadConfig(root, { TZ: 'UTC' });
    expect(config).toMatchObject({ assistantName: 'value', containerImage: 'yes', containerRuntime: 'single' });
    expect(config.kimi).toMatchObject({ capabilities: 'with spaces # not a comment', baseUrl: 'line\nnext' });
    expect(config.transcribe.model).toBe('abc');
  });
});

describe('loadConfig', () => {
  it('has the documented defaults and absolute paths', () => {
    const root = tempDir();
    const config = loadConfig(root, { TZ: 'UTC' });
    expect(config).toMatchObject({
      assistantName: 'Andy',
      assistantHasOwnNumber: false,
      containerImage: 'nanoclaw-agent:latest',
      containerRuntime: 'docker',
      containerTimeoutMs: 1_800_000,
      idleTimeoutMs: 1_800_000,
      maxConcurrentContainers: Math.max(2, availableParallelism()),
      warmPool: { size: Math.min(8, Math.max(1, Math.floor(totalmem() / 2 ** 31))), pauseAfterMs: 60_000 },
      logLevel: 'info',
      timezone: 'UTC',
    });
    for (const key of [
      'projectRoot',
      'groupsDir',
      'dataDir',
      'storeDir',
      'logsDir',
      'dbPath',
      'ipcDir',
      'sessionsDir',
      'envFile',
    ] as const) {
      expect(isAbsolute(config[key]), key).toBe(true);
    }
    expect(config.dbPath).toBe(join(root, 'store', 'messages.db'));
    expect(loadConfig('relative/path', {}).projectRoot).toBe(join(process.cwd(), 'relative/path'));
  });

  it('runs as many containers at once as the machine has CPUs, at least two', () => {
    expect([1, 2, 3, 8, 64].map((cores) => defaultConcurrency(cores))).toEqual([2, 2, 3, 8, 64]);
  });

  it('takes .env, and the environment wins over it', () => {
    const root = tempDir();
    writeFileSync(
      join(root, '.env'),
      'ASSISTANT_NAME=Bea\nMAX_CONCURRENT_CONTAINERS=5\nASSISTANT_HAS_OWN_NUMBER=true\nKIMI_MODEL_NAME=m1\n',
    );
    const config = loadConfig(root, { MAX_CONCURRENT_CONTAINERS: '2', TZ: 'Asia/Tokyo' });
    expect(config).toMatchObject({
      assistantName: 'Bea',
      maxConcurrentContainers: 2,
      assistantHasOwnNumber: true,
      timezone: 'Asia/Tokyo',
    });
    expect(config.kimi).toEqual({
      platform: 'moonshot-ai',
      modelName: 'm1',
      baseUrl: 'https://api.moonshot.ai/v1',
      provider: undefined,
      capabilities: undefined,
      questionTimeoutMs: 600_000,
    });
  });

  it('keeps one ready agent per 2 GiB of memory, at least 1 and at most 8; WARM_POOL_SIZE=0 turns the pool off', () => {
    const GiB = 2 ** 30;
    expect([1 * GiB, 4 * GiB, 8e9, 24 * GiB, 64 * GiB].map((bytes) => defaultPoolSize(bytes))).toEqual([1, 2, 3, 8, 8]);
    const root = tempDir();
    expect(loadConfig(root, { TZ: 'UTC', WARM_POOL_SIZE: '0' }).warmPool.size).toBe(0);
    expect(loadConfig(root, { TZ: 'UTC', WARM_PAUSE_AFTER: '5000' }).warmPool.pauseAfterMs).toBe(5000);
  });

  it('refuses bad values, naming the variable', () => {
    const root = tempDir();
    const bad: [Record<string, string>, string][] = [
      [{ CONTAINER_TIMEOUT: 'soon' }, 'CONTAINER_TIMEOUT'],
      [{ IDLE_TIMEOUT: '-5' }, 'IDLE_TIMEOUT'],
      [{ MAX_CONCURRENT_CONTAINERS: '1.5' }, 'MAX_CONCURRENT_CONTAINERS'],
      [{ WARM_POOL_SIZE: '-1' }, 'WARM_POOL_SIZE'],
      [{ WARM_PAUSE_AFTER: '0' }, 'WARM_PAUSE_AFTER'],
      [{ TZ: 'Mars/Olympus' }, 'TZ'],
      [{ LOG_LEVEL: 'loud' }, 'LOG_LEVEL'],
      [{ ASSISTANT_NAME: 'a(b)' }, 'ASSISTANT_NAME'],
      [{ KIMI_PROVIDER: 'ollama' }, 'KIMI_PROVIDER'],
    ];
    for (const [env, name] of bad) {
      expect(() => loadConfig(root, env), name).toThrow(ConfigError);
      expect(() => loadConfig(root, env), name).toThrow(name);
    }
  });
});

describe('yes/no settings', () => {
  it('take true/false, yes/no, on/off and 1/0 in any case', () => {
    const root = tempDir();
    const own = (value: string) => loadConfig(root, { ASSISTANT_HAS_OWN_NUMBER: value }).assistantHasOwnNumber;
    for (const value of ['true', 'TRUE', 'Yes', 'on', '1']) expect(own(value), value).toBe(true);
    for (const value of ['false', 'False', 'NO', 'off', '0']) expect(own(value), value).toBe(false);
    expect(loadConfig(root, {}).tasks.limitMain).toBe(true);
    expect(loadConfig(root, { TASK_LIMITS_MAIN: 'off' }).tasks.limitMain).toBe(false);
  });

  it('refuse anything else (a typo is never a silent false), naming the variable and the accepted words', () => {
    const root = tempDir();
    for (const [name, value] of [
      ['ASSISTANT_HAS_OWN_NUMBER', 'ture'],
      ['TASK_LIMITS_MAIN', 'flase'],
      ['ASSISTANT_HAS_OWN_NUMBER', 'enabled'],
    ] as const) {
      expect(() => loadConfig(root, { [name]: value }), value).toThrow(ConfigError);
      expect(() => loadConfig(root, { [name]: value }), value).toThrow(
        `${name}="${value}" is not valid: use true or false (or yes/no, on/off, 1/0).`,
      );
    }
  });
});

describe('the settings, documented', () => {
  /** The table as `bun nanoclaw.ts config docs` prints it from the settings in the code. */
  const printed = () => {
    const root = tempDir();
    const run = Bun.spawnSync([process.execPath, join(REPO, 'nanoclaw.ts'), 'config', 'docs'], {
      cwd: root,
      env: { PATH: process.env.PATH!, HOME: root, NANOCLAW_ROOT: root, TZ: 'UTC' },
    });
    expect(run.stderr.toString()).toBe('');
    expect(run.exitCode).toBe(0);
    return run.stdout.toString();
  };

  it('docs/configuration.md holds the table the code prints (regenerate it with: bun nanoclaw.ts config docs)', () => {
    const guide = readFileSync(join(REPO, 'docs', 'configuration.md'), 'utf8');
    const between = /<!-- settings:start -->\n([\s\S]*?)<!-- settings:end -->/.exec(guide);
    expect(between, 'the settings:start and settings:end markers').not.toBeNull();
    const table = printed();
    expect(table).toContain('| `CONTAINER_IMAGE` | text | `nanoclaw-agent:latest` |');
    expect(between![1]).toBe(table);
  });

  it('.env.example mentions every setting and every secret', () => {
    const example = readFileSync(join(REPO, '.env.example'), 'utf8');
    const names = [...printed().matchAll(/^\| `([A-Z_]+)` \|/gm)].map((match) => match[1]!);
    expect(names.length).toBeGreaterThan(30);
    const missing = [...names, ...nc.SECRET_KEYS].filter((name) => !new RegExp(`^(# )?${name}=`, 'm').test(example));
    expect(missing).toEqual([]);
  });
});

describe('secrets', () => {
  it('leave the environment object, stay readable, and never reach a child environment', () => {
    const root = tempDir();
    writeFileSync(join(root, '.env'), 'KIMI_API_KEY=sk-from-dotenv-123\nOTHER_FROM_DOTENV=1\n');
    const config = loadConfig(root, {});
    expect(readSecrets(config)).toEqual({ KIMI_API_KEY: 'sk-from-dotenv-123' });
    const env: Record<string, string | undefined> = {
      KIMI_API_KEY: 'sk-from-env-456',
      PATH: '/usr/bin',
      HOME: '/home/x',
      RANDOM_VAR: 'x',
    };
    takeSecretsOutOfEnvironment(env);
    expect(env.KIMI_API_KEY).toBeUndefined();
    expect(readSecrets(config)).toEqual({ KIMI_API_KEY: 'sk-from-env-456' }); // the environment wins over .env
    expect(childProcessEnv({ ...env, KIMI_API_KEY: 'sk-again' })).toEqual({ PATH: '/usr/bin', HOME: '/home/x' });
  });

  it('bunfig.toml keeps Bun from loading .env into process.env (and without it Bun would)', () => {
    const dir = tempDir();
    writeFileSync(join(dir, '.env'), 'KIMI_API_KEY=sk-dotenv-leak-check\n');
    writeFileSync(join(dir, 'probe.ts'), 'console.log(process.env.KIMI_API_KEY ?? "absent")');
    const run = () =>
      Bun.spawnSync([process.execPath, 'probe.ts'], { cwd: dir, env: { PATH: process.env.PATH! } })
        .stdout.toString()
        .trim();
    expect(run()).toBe('sk-dotenv-leak-check');
    copyFileSync(join(REPO, 'bunfig.toml'), join(dir, 'bunfig.toml'));
    expect(run()).toBe('absent');
  });

  it('are masked in text, raw and JSON-escaped', () => {
    expect(maskSecrets('key=sk-abc123 and "sk-abc123"', ['sk-abc123'])).toBe('key=[REDACTED] and "[REDACTED]"');
    expect(maskSecrets('{"k":"a\\"b-secret"}', ['a"b-secret'])).toBe('{"k":"[REDACTED]"}');
    expect(maskSecrets('short ab stays', ['ab'])).toBe('short ab stays'); // too short to be a key
  });
});

describe('logging', () => {
  it('writes everything at LOG_LEVEL to nanoclaw.log and only errors to nanoclaw.error.log, secrets masked', () => {
    const config = tempProject({ LOG_LEVEL: 'info' });
    const secret = 'sk-logging-test-987654';
    setupLogging(config, { terminalLevel: 'silent', secrets: [secret] });
    nc.log.debug('a debug line');
    nc.log.info({ group: 'family' }, `Session initialized: abc-123`);
    nc.log.info({ nested: { token: secret }, secrets: { KIMI_API_KEY: secret } }, `the key is ${secret}`);
    nc.log.error({ group: 'main' }, 'something broke');
    const main = readFileSync(join(config.logsDir, 'nanoclaw.log'), 'utf8');
    const errors = readFileSync(join(config.logsDir, 'nanoclaw.error.log'), 'utf8');
    expect(main).not.toContain('a debug line');
    expect(main).toContain('[family] Session initialized: abc-123\n');
    expect(main).not.toContain(secret);
    expect(main).toContain('[REDACTED]');
    expect(errors).toContain('[main] something broke');
    expect(errors).not.toContain('Session initialized');
    // The guide's check: grep "Session initialized" logs/nanoclaw.log | awk '{print $NF}'
    const ids = Bun.spawnSync([
      'sh',
      '-c',
      `grep "Session initialized" "${join(config.logsDir, 'nanoclaw.log')}" | awk '{print $NF}'`,
    ])
      .stdout.toString()
      .trim();
    expect(ids).toBe('abc-123');
  });

  it('shows debug lines at LOG_LEVEL=debug', () => {
    const config = tempProject({ LOG_LEVEL: 'debug' });
    mkdirSync(config.logsDir, { recursive: true });
    setupLogging(config, { terminalLevel: 'silent' });
    nc.log.debug('a debug line');
    expect(readFileSync(join(config.logsDir, 'nanoclaw.log'), 'utf8')).toContain('a debug line');
  });
});

describe('Kimi endpoints by key kind', () => {
  it('KIMI_PLATFORM picks the base URL and model of each kind of key; KIMI_BASE_URL and KIMI_MODEL_NAME still win', () => {
    const root = tempDir();
    expect(loadConfig(root, {}).kimi).toMatchObject({
      platform: 'moonshot-ai',
      baseUrl: 'https://api.moonshot.ai/v1',
      modelName: 'kimi-k2.5',
    });
    expect(loadConfig(root, { KIMI_PLATFORM: 'moonshot-cn' }).kimi).toMatchObject({
      baseUrl: 'https://api.moonshot.cn/v1',
      modelName: 'kimi-k2.5',
    });
    expect(loadConfig(root, { KIMI_PLATFORM: 'kimi-code' }).kimi).toMatchObject({
      baseUrl: 'https://api.kimi.com/coding/v1',
      modelName: 'kimi-for-coding',
    });
    expect(
      loadConfig(root, { KIMI_PLATFORM: 'kimi-code', KIMI_MODEL_NAME: 'x', KIMI_BASE_URL: 'http://127.0.0.1:1/v1' })
        .kimi,
    ).toMatchObject({ baseUrl: 'http://127.0.0.1:1/v1', modelName: 'x' });
    expect(() => loadConfig(root, { KIMI_PLATFORM: 'openai' })).toThrow(
      'KIMI_PLATFORM="openai" is not valid: use moonshot-ai, moonshot-cn, kimi-code',
    );
  });

  it('a refused key is explained in one line naming the settings for the other kinds of key', () => {
    const config = loadConfig(tempDir(), {});
    const notice = keyRefusedNotice(config, "Error code: 401 - {'error': {'message': 'Invalid Authentication'}}");
    for (const fact of ['https://api.moonshot.ai/v1', '(401)', 'KIMI_API_KEY in .env', 'platform.moonshot.cn keys'])
      expect(notice).toContain(fact);
    expect(notice).toContain('KIMI_PLATFORM=moonshot-cn; Kimi Code keys: KIMI_PLATFORM=kimi-code.');
    expect(notice).not.toContain('KIMI_PLATFORM=moonshot-ai');
    expect(notice).not.toContain('\n');
    expect(keyRefusedNotice(config, 'NanoClaw has no KIMI_API_KEY: put it in the .env file')).toContain(
      'Put KIMI_API_KEY=… in the .env file',
    );
  });
});
