import { mkdirSync, realpathSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  buildDockerArgs,
  containerEnvironment,
  defaultContainerCpus,
  groupMounts,
  hardeningArgs,
  installId,
  isValidFolder,
  loadConfig,
  loadMountAllowlist,
  MODEL_SOCKET_IN_CONTAINER,
  readLines,
  resultLines,
  runPaths,
  RESULT_END,
  RESULT_START,
  validateExtraMounts,
  type RegisteredGroup,
  type ContainerResult,
} from '../nanoclaw.ts';
import { tempDir, tempProject } from './helpers.ts';

const group = (folder: string, isMain = false): RegisteredGroup => ({
  jid: `${folder}@g.us`,
  name: folder,
  folder,
  trigger: '@Andy',
  requiresTrigger: !isMain,
  isMain,
  allow: [],
  addedAt: '',
});

describe('groupMounts', () => {
  it('main: its folder, the project read-only with the shared memory writable and the secrets hidden, its IPC and Kimi home', () => {
    const config = tempProject();
    const root = config.projectRoot;
    expect(groupMounts(config, group('main', true))).toEqual([
      { hostPath: `${root}/groups/main`, containerPath: '/workspace/group', readonly: false },
      { hostPath: `${root}/groups/main/logs`, containerPath: '/workspace/group/logs', readonly: true },
      { hostPath: root, containerPath: '/workspace/project', readonly: true },
      { hostPath: `${root}/groups/global`, containerPath: '/workspace/project/groups/global', readonly: false },
      { hostPath: `${root}/data/ipc/main`, containerPath: '/workspace/ipc', readonly: false },
      { hostPath: `${root}/data/sessions/main/.kimi`, containerPath: '/home/node/.kimi', readonly: false },
    ]);
    // Once they exist, .env, store/ and data/ are covered by host-only empty stand-ins.
    writeFileSync(join(root, '.env'), 'KIMI_API_KEY=sk-hidden-0001\n');
    mkdirSync(join(root, 'store', 'auth'), { recursive: true });
    mkdirSync(join(root, 'data'), { recursive: true });
    const masks = groupMounts(config, group('main', true)).filter((m) =>
      /\/workspace\/project\/(\.env|store|data)$/.test(m.containerPath),
    );
    expect(masks).toEqual([
      { hostPath: `${root}/data/mask/empty`, containerPath: '/workspace/project/.env', readonly: true },
      { hostPath: `${root}/data/mask/empty-dir`, containerPath: '/workspace/project/store', readonly: true },
      { hostPath: `${root}/data/mask/empty-dir`, containerPath: '/workspace/project/data', readonly: true },
    ]);
  });

  it('other groups: the global folder read-only, never the project', () => {
    const config = tempProject();
    const root = config.projectRoot;
    expect(groupMounts(config, group('family'))).toEqual([
      { hostPath: `${root}/groups/family`, containerPath: '/workspace/group', readonly: false },
      { hostPath: `${root}/groups/family/logs`, containerPath: '/workspace/group/logs', readonly: true }, // the run logs: the host's record
      { hostPath: `${root}/groups/global`, containerPath: '/workspace/global', readonly: true },
      { hostPath: `${root}/data/ipc/family`, containerPath: '/workspace/ipc', readonly: false },
      { hostPath: `${root}/data/sessions/family/.kimi`, containerPath: '/home/node/.kimi', readonly: false },
    ]);
  });
});

describe('runPaths', () => {
  it('a run’s inbox and proxy sockets, each only when the run has that proxy', () => {
    const config = tempProject({ MODEL_PROXY: 'unix', CONTAINER_NETWORK: 'egress' });
    const root = config.projectRoot;
    expect(runPaths(config, group('family'), 'r1')).toEqual({
      inbox: `${root}/data/input/r1`,
      modelSocket: `${root}/data/proxy/r1.sock`,
      egressSocket: `${root}/data/proxy/r1.egress.sock`,
    });
    const offline = { ...group('family'), containerConfig: { network: 'none' } };
    expect(runPaths(config, offline, 'r1').egressSocket).toBeNull();
    const tcp = runPaths(tempProject({ MODEL_PROXY: 'tcp' }), group('family'), 'r1');
    expect([tcp.modelSocket, tcp.egressSocket]).toEqual([null, null]);
  });
});

describe('docker arguments', () => {
  it('run -i --rm --name, env pairs, volumes with :ro, image last', () => {
    const args = buildDockerArgs(
      'nanoclaw-family-1',
      'img:1',
      [
        { hostPath: '/a', containerPath: '/workspace/group', readonly: false },
        { hostPath: '/b', containerPath: '/workspace/global', readonly: true },
      ],
      { TZ: 'UTC' },
      ['--user', '501:20'],
    );
    expect(args).toEqual([
      'run',
      '-i',
      '--rm',
      '--name',
      'nanoclaw-family-1',
      '--user',
      '501:20',
      '-e',
      'TZ=UTC',
      '-v',
      '/a:/workspace/group',
      '-v',
      '/b:/workspace/global:ro',
      'img:1',
    ]);
  });

  it('runs as the image’s node user for root and uid 1000, as the host user otherwise', () => {
    const userArgs = (uid: number, gid: number) => {
      const args = hardeningArgs(tempProject(), group('family'), uid, gid);
      return args.slice(0, args.indexOf('--init'));
    };
    expect(userArgs(0, 0)).toEqual([]);
    expect(userArgs(1000, 1000)).toEqual([]);
    expect(userArgs(501, 20)).toEqual(['--user', '501:20', '-e', 'HOME=/home/node']);
  });

  it('passes settings and where the proxy is, but never the key nor the real endpoint', () => {
    const config = tempProject({
      KIMI_BASE_URL: 'http://localhost:8000/v1',
      KIMI_MODEL_NAME: 'm',
      KIMI_PROVIDER: 'openai_responses',
      KIMI_API_KEY: 'sk-not-here-123',
    });
    expect(containerEnvironment(config, { url: undefined })).toEqual({
      TZ: 'UTC',
      ASSISTANT_NAME: 'Andy',
      KIMI_MODEL_NAME: 'm',
      KIMI_PROVIDER: 'openai_responses',
      NANOCLAW_MODEL_SOCKET: MODEL_SOCKET_IN_CONTAINER,
      NANOCLAW_QUESTION_TIMEOUT_MS: '600000',
    });
    expect(containerEnvironment(config, { url: 'http://host.docker.internal:4321' })).toMatchObject({
      NANOCLAW_MODEL_URL: 'http://host.docker.internal:4321',
    });
    expect(containerEnvironment(config, null)).not.toHaveProperty('NANOCLAW_MODEL_SOCKET');
  });

  it('hardens every container: no capabilities, no privilege gain, limits, read-only image, network, install label', () => {
    const config = tempProject({ CONTAINER_MEMORY: '1g', CONTAINER_CPUS: '1.5', CONTAINER_PIDS: '300' });
    const args = hardeningArgs(config, group('family'), 0, 0);
    const pairs = (flag: string) => args.flatMap((arg, i) => (args[i - 1] === flag ? [arg] : []));
    expect(pairs('--cap-drop')).toEqual(['ALL']);
    expect(pairs('--security-opt')).toEqual(['no-new-privileges']);
    expect(pairs('--pids-limit')).toEqual(['300']);
    expect(pairs('--memory')).toEqual(['1g']);
    expect(pairs('--memory-swap')).toEqual(['1g']);
    expect(pairs('--cpus')).toEqual(['1.5']);
    expect(args).toContain('--read-only');
    expect(args[0]).toBe('--init');
    expect(pairs('--tmpfs').find((t) => t.startsWith('/home/node:'))).toContain('uid=1000,gid=1000');
    // The default: no network of its own; the web only through the host's egress proxy.
    expect(pairs('--network')).toEqual(['none']);
    expect(hardeningArgs(tempProject({ CONTAINER_NETWORK: 'bridge' }), group('family'), 0, 0)).toContain('bridge');
    expect(pairs('--label')).toEqual([`nanoclaw.install=${installId(config)}`, 'nanoclaw.group=family']);
    // A host user other than root owns its container's home; a group can have no network at all.
    const own = hardeningArgs(config, { ...group('family'), containerConfig: { network: 'none' } }, 501, 20);
    expect(
      own.flatMap((arg, i) => (own[i - 1] === '--tmpfs' ? [arg] : [])).find((t) => t.startsWith('/home/node:')),
    ).toContain('uid=501,gid=20');
    expect(own[own.indexOf('--network') + 1]).toBe('none');
  });

  it('limits default to half the CPUs and refuse a bad value or the host network', () => {
    expect(defaultContainerCpus(2)).toBe(1);
    expect(defaultContainerCpus(1)).toBe(1);
    expect(defaultContainerCpus(16)).toBe(8);
    const root = tempDir();
    expect(() => loadConfig(root, { CONTAINER_NETWORK: 'host' })).toThrow('CONTAINER_NETWORK');
    expect(() => loadConfig(root, { CONTAINER_MEMORY: 'lots' })).toThrow('CONTAINER_MEMORY');
    expect(() => loadConfig(root, { CONTAINER_CPUS: '0' })).toThrow('CONTAINER_CPUS');
    expect(() => loadConfig(root, { MODEL_PROXY: 'off' })).toThrow('MODEL_PROXY');
    expect(loadConfig(root, { CONTAINER_NETWORK: 'none' }).container.network).toBe('none');
  });

  it('two project directories are two installs', () => {
    expect(installId(tempProject())).not.toBe(installId(tempProject()));
    const config = tempProject();
    expect(installId(config)).toBe(installId(loadConfig(config.projectRoot, { TZ: 'UTC' })));
    expect(installId(config)).toMatch(/^[0-9a-f]{12}$/);
  });

  it('refuses folder names that NanoClaw uses itself, or that could climb out', () => {
    for (const bad of ['global', 'errors', 'claimed', '../x', 'a/b', '.hidden', 'Family', ''])
      expect(isValidFolder(bad), bad).toBe(false);
    for (const good of ['family', 'main', 'work-2', 'a_b']) expect(isValidFolder(good), good).toBe(true);
  });
});

describe('extra mounts through the allowlist', () => {
  function layout() {
    const home = realpathSync(tempDir());
    for (const dir of ['projects/site', 'projects/.ssh', 'projects/app/.env', 'private/notes', 'projects/keys'])
      mkdirSync(join(home, dir), { recursive: true });
    writeFileSync(join(home, 'projects', 'keys', 'id_rsa'), 'secret');
    symlinkSync(join(home, 'private', 'notes'), join(home, 'projects', 'sneaky'));
    symlinkSync(join(home, 'projects', 'site'), join(home, 'shortcut'));
    return home;
  }

  it('refuses everything without an allowlist', () => {
    const home = layout();
    const { mounts, rejected } = validateExtraMounts([{ hostPath: join(home, 'projects', 'site') }], null, true);
    expect(mounts).toEqual([]);
    expect(rejected[0]!.reason).toContain('no mount allowlist');
  });

  it('mounts only under allowed roots, resolving symlinks, never credentials', () => {
    const home = layout();
    const allowlist = { allowedRoots: [{ path: join(home, 'projects'), allowReadWrite: true }] };
    const { mounts, rejected } = validateExtraMounts(
      [
        { hostPath: join(home, 'projects', 'site'), readonly: false },
        { hostPath: join(home, 'shortcut'), containerPath: 'web' }, // a link from outside into the root: its real path counts
        { hostPath: join(home, 'private', 'notes') },
        { hostPath: join(home, 'projects', 'sneaky') }, // a link inside the root pointing outside it
        { hostPath: join(home, 'projects', '.ssh') },
        { hostPath: join(home, 'projects', 'app', '.env') },
        { hostPath: join(home, 'projects', 'keys', 'id_rsa') },
        { hostPath: join(home, 'projects', 'site'), containerPath: '../escape' },
        { hostPath: join(home, 'nowhere') },
      ],
      allowlist,
      true,
    );
    expect(mounts).toEqual([
      { hostPath: join(home, 'projects', 'site'), containerPath: '/workspace/extra/site', readonly: false },
      { hostPath: join(home, 'projects', 'site'), containerPath: '/workspace/extra/web', readonly: true },
    ]);
    expect(rejected.map((r) => r.reason)).toEqual([
      'not under any allowed root',
      'not under any allowed root',
      'matches blocked pattern ".ssh"',
      'matches blocked pattern ".env"',
      'matches blocked pattern "id_rsa"',
      'container name "../escape" must be a plain folder name',
      'path does not exist',
    ]);
  });

  it('makes mounts read-only for other groups when asked, and for roots without read-write', () => {
    const home = layout();
    const request = [{ hostPath: join(home, 'projects', 'site'), readonly: false }];
    const rw = { allowedRoots: [{ path: join(home, 'projects'), allowReadWrite: true }], nonMainReadOnly: true };
    expect(validateExtraMounts(request, rw, true).mounts[0]!.readonly).toBe(false);
    expect(validateExtraMounts(request, rw, false).mounts[0]!.readonly).toBe(true);
    const ro = { allowedRoots: [{ path: join(home, 'projects') }] };
    expect(validateExtraMounts(request, ro, true).mounts[0]!.readonly).toBe(true);
    const custom = {
      allowedRoots: [{ path: join(home, 'projects'), allowReadWrite: true }],
      blockedPatterns: ['site'],
    };
    expect(validateExtraMounts(request, custom, true).rejected[0]!.reason).toBe('matches blocked pattern "site"');
  });

  it('reads the allowlist file and says what is wrong with a bad one', () => {
    const dir = tempDir();
    expect(loadMountAllowlist(join(dir, 'missing.json'))).toBeNull();
    writeFileSync(join(dir, 'bad.json'), '{"roots": []}');
    expect(() => loadMountAllowlist(join(dir, 'bad.json'))).toThrow('"allowedRoots"');
  });
});

describe('resultLines', () => {
  const wrap = (json: string) => `${RESULT_START}\n${json}\n${RESULT_END}\n`;
  const resultsIn = async (chunks: string[]) => {
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        for (const chunk of chunks) controller.enqueue(new TextEncoder().encode(chunk));
        controller.close();
      },
    });
    const found: ContainerResult[] = [];
    await readLines(
      stream,
      1024,
      resultLines((result) => void found.push(result)),
    );
    return found;
  };

  it('finds results whatever the chunking, and keeps other output aside', async () => {
    const stream = `booting\n${wrap('{"status":"success","result":"one","sessionId":"s"}')}noise\n${wrap('{"status":"error","result":null,"error":"bad"}')}`;
    const found = await resultsIn([...stream]);
    expect(found).toEqual([
      { status: 'success', result: 'one', sessionId: 's' },
      { status: 'error', result: null, error: 'bad' },
    ]);
    expect(await resultsIn([stream])).toEqual(found);
  });

  it('turns an unreadable result into an error result', async () => {
    expect(await resultsIn([wrap('{"status": "success", "result": ')])).toEqual([
      expect.objectContaining({ status: 'error', error: expect.stringContaining('Unreadable result') }),
    ]);
    expect((await resultsIn([wrap('{"result": "no status"}')]))[0]!.status).toBe('error');
  });
});
