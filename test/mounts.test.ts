import { mkdirSync, realpathSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  buildDockerArgs, buildMounts, containerEnvironment, containerUserArgs, loadMountAllowlist, ResultParser, RESULT_END, RESULT_START,
  validateExtraMounts, type RegisteredGroup,
} from '../nanoclaw.ts';
import { tempDir, tempProject } from './helpers.ts';

const group = (folder: string, isMain = false): RegisteredGroup => ({
  jid: `${folder}@g.us`, name: folder, folder, trigger: '@Andy', requiresTrigger: !isMain, isMain, addedAt: '',
});

describe('buildMounts', () => {
  it('main: its folder, the project, its IPC and its Kimi home — never the global folder', () => {
    const config = tempProject();
    const root = config.projectRoot;
    expect(buildMounts(config, group('main', true))).toEqual([
      { hostPath: `${root}/groups/main`, containerPath: '/workspace/group', readonly: false },
      { hostPath: root, containerPath: '/workspace/project', readonly: false },
      { hostPath: `${root}/data/ipc/main`, containerPath: '/workspace/ipc', readonly: false },
      { hostPath: `${root}/data/sessions/main/.kimi`, containerPath: '/home/node/.kimi', readonly: false },
    ]);
  });

  it('other groups: the global folder read-only, never the project', () => {
    const config = tempProject();
    const root = config.projectRoot;
    expect(buildMounts(config, group('family'))).toEqual([
      { hostPath: `${root}/groups/family`, containerPath: '/workspace/group', readonly: false },
      { hostPath: `${root}/groups/global`, containerPath: '/workspace/global', readonly: true },
      { hostPath: `${root}/data/ipc/family`, containerPath: '/workspace/ipc', readonly: false },
      { hostPath: `${root}/data/sessions/family/.kimi`, containerPath: '/home/node/.kimi', readonly: false },
    ]);
  });
});

describe('docker arguments', () => {
  it('run -i --rm --name, env pairs, volumes with :ro, image last', () => {
    const args = buildDockerArgs('nanoclaw-family-1', 'img:1', [
      { hostPath: '/a', containerPath: '/workspace/group', readonly: false },
      { hostPath: '/b', containerPath: '/workspace/global', readonly: true },
    ], { TZ: 'UTC' }, ['--user', '501:20']);
    expect(args).toEqual(['run', '-i', '--rm', '--name', 'nanoclaw-family-1', '--user', '501:20', '-e', 'TZ=UTC', '-v', '/a:/workspace/group', '-v', '/b:/workspace/global:ro', 'img:1']);
  });

  it('runs as the image’s node user for root and uid 1000, as the host user otherwise', () => {
    expect(containerUserArgs(0, 0)).toEqual([]);
    expect(containerUserArgs(1000, 1000)).toEqual([]);
    expect(containerUserArgs(501, 20)).toEqual(['--user', '501:20', '-e', 'HOME=/home/node']);
  });

  it('passes settings but never the key', () => {
    const config = tempProject({ KIMI_BASE_URL: 'http://localhost:8000/v1', KIMI_MODEL_NAME: 'm', KIMI_PROVIDER: 'openai_legacy', KIMI_API_KEY: 'sk-not-here-123' });
    expect(containerEnvironment(config)).toEqual({ TZ: 'UTC', ASSISTANT_NAME: 'Andy', KIMI_BASE_URL: 'http://localhost:8000/v1', KIMI_MODEL_NAME: 'm', KIMI_PROVIDER: 'openai_legacy' });
  });
});

describe('extra mounts through the allowlist', () => {
  function layout() {
    const home = realpathSync(tempDir());
    for (const dir of ['projects/site', 'projects/.ssh', 'projects/app/.env', 'private/notes', 'projects/keys']) mkdirSync(join(home, dir), { recursive: true });
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
      'not under any allowed root', 'not under any allowed root', 'matches blocked pattern ".ssh"', 'matches blocked pattern ".env"',
      'matches blocked pattern "id_rsa"', 'container name "../escape" must be a plain folder name', 'path does not exist',
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
    const custom = { allowedRoots: [{ path: join(home, 'projects'), allowReadWrite: true }], blockedPatterns: ['site'] };
    expect(validateExtraMounts(request, custom, true).rejected[0]!.reason).toBe('matches blocked pattern "site"');
  });

  it('reads the allowlist file and says what is wrong with a bad one', () => {
    const dir = tempDir();
    expect(loadMountAllowlist(join(dir, 'missing.json'))).toBeNull();
    writeFileSync(join(dir, 'bad.json'), '{"roots": []}');
    expect(() => loadMountAllowlist(join(dir, 'bad.json'))).toThrow('"allowedRoots"');
  });
});

describe('ResultParser', () => {
  const wrap = (json: string) => `${RESULT_START}\n${json}\n${RESULT_END}\n`;

  it('finds results whatever the chunking, and keeps other output aside', () => {
    const stream = `booting\n${wrap('{"status":"success","result":"one","sessionId":"s"}')}noise\n${wrap('{"status":"error","result":null,"error":"bad"}')}`;
    const byChar = new ResultParser();
    const found = [...stream].flatMap((ch) => byChar.push(ch));
    expect(found).toEqual([
      { status: 'success', result: 'one', sessionId: 's' },
      { status: 'error', result: null, error: 'bad' },
    ]);
    expect(byChar.otherLines).toEqual(['booting', 'noise']);
    expect(new ResultParser().push(stream)).toEqual(found);
  });

  it('turns an unreadable result into an error result', () => {
    expect(new ResultParser().push(wrap('{"status": "success", "result": '))).toEqual([expect.objectContaining({ status: 'error', error: expect.stringContaining('Unreadable result') })]);
    expect(new ResultParser().push(wrap('{"result": "no status"}'))[0]!.status).toBe('error');
  });
});
