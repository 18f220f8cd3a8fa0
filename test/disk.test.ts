/**
 * Disk: what a group's writable trees take is measured without following links, a group over
 * GROUP_DISK_BUDGET gets no run (its chat and main told, its running container stopped,
 * other groups answered), it answers again once under; and the host's reserve file is given
 * up when free space runs short and made again when there is room.
 */
import { existsSync, mkdirSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { AgentTree, diskReserve, groupDiskUsage, treeBytes } from '../nanoclaw.ts';
import {
  FakeClock,
  fakeDocker,
  RecordingChannel,
  startWorld,
  tempDir,
  tempProject,
  texts,
  waitFor,
} from './helpers.ts';

const MIB = 1024 * 1024;
const MAIN = 'me@s.whatsapp.net';
const FAMILY = 'family@g.us';
const WORK = 'work@g.us';
const DAY = 24 * 3_600_000;

describe('treeBytes', () => {
  it('counts what files take on disk, never what a link points to, and nothing of a tree that is not there', () => {
    const root = tempDir();
    const outside = tempDir();
    writeFileSync(join(outside, 'big.bin'), Buffer.alloc(8 * MIB, 1));
    mkdirSync(join(root, 'sub'));
    writeFileSync(join(root, 'sub', 'three.bin'), Buffer.alloc(3 * MIB, 1));
    symlinkSync(join(outside, 'big.bin'), join(root, 'link-to-file'));
    symlinkSync(outside, join(root, 'link-to-dir'));
    const bytes = treeBytes(new AgentTree(root));
    expect(bytes).toBeGreaterThanOrEqual(3 * MIB);
    expect(bytes).toBeLessThan(4 * MIB);
    expect(treeBytes(new AgentTree(join(root, 'absent')))).toBe(0);
    expect(existsSync(join(root, 'absent'))).toBe(false);
  });
});

describe('the reserve', () => {
  it('is made when there is room, released when free space runs short, and made again', () => {
    let free = 100 * MIB;
    const reserve = diskReserve(join(tempDir(), 'store', 'disk-reserve'), 2 * MIB, () => free);
    expect(reserve.check()).toBe('made');
    expect(statSync(reserve.path).size).toBe(2 * MIB);
    expect(reserve.check()).toBeNull();
    free = MIB;
    expect(reserve.check()).toBe('released');
    expect(existsSync(reserve.path)).toBe(false);
    expect(reserve.check()).toBeNull(); // no room yet to make it again
    free = 100 * MIB;
    expect(reserve.check()).toBe('made');
    expect(diskReserve(join(tempDir(), 'r'), 0, () => 0).check()).toBeNull(); // DISK_RESERVE=0: none
  });
});

describe('a group over its disk budget', () => {
  async function world(freeDiskBytes?: () => number) {
    const docker = fakeDocker();
    const w = await startWorld({
      config: tempProject(
        { CONTAINER_RUNTIME: docker.path, GROUP_DISK_BUDGET: '1m' },
        'KIMI_API_KEY=sk-disk-test-0123456789\n',
      ),
      channel: new RecordingChannel([MAIN, FAMILY, WORK]),
      groups: [
        { jid: MAIN, name: 'Me', folder: 'main', isMain: true },
        { jid: FAMILY, name: 'Family', folder: 'family', requiresTrigger: false },
        { jid: WORK, name: 'Work', folder: 'work', requiresTrigger: false },
      ],
      options: freeDiskBytes ? { freeDiskBytes } : {},
    });
    const runsOf = (folder: string) => docker.runs().filter((run) => run.argv.includes(`nanoclaw.group=${folder}`));
    return { ...w, docker, runsOf };
  }

  it('filled by its agent: stopped, told once, no run while over (others answered), answers again once under', {
    timeout: 60_000,
  }, async () => {
    const w = await world();
    w.channel.receive(FAMILY, `!fill ${2 * MIB}`);
    await waitFor(() => texts(w, FAMILY).some((t) => t.includes('filled')), 60_000, 'the fill run');
    // Measured as the run ended: the group is over before anything else comes.
    await waitFor(() => texts(w, FAMILY).some((t) => t.includes('disk budget')), 60_000, 'the notice');
    expect(groupDiskUsage(w.config, 'family')).toBeGreaterThan(MIB);
    expect(texts(w, FAMILY).find((t) => t.includes('disk budget'))).toContain('groups/family');
    await waitFor(() => texts(w, MAIN).some((t) => t.includes('Family went over')), 60_000, 'main told');
    const runs = w.runsOf('family').length;
    w.channel.receive(FAMILY, 'are you there?');
    w.channel.receive(WORK, 'hello work');
    await waitFor(() => texts(w, WORK).includes('Andy: echo: hello work'), 60_000, 'work answered');
    await waitFor(() => !w.host.queue.isBusy(FAMILY), 60_000, 'family idle');
    await w.host.recover(); // a later sweep: still over, told no more
    expect(w.runsOf('family')).toHaveLength(runs);
    expect(texts(w, FAMILY).filter((t) => t.includes('disk budget'))).toHaveLength(1);
    rmSync(join(w.config.groupsDir, 'family', 'fill.bin'));
    await w.host.recover(); // the sweep
    await waitFor(() => texts(w, FAMILY).includes('Andy: echo: are you there?'), 60_000, 'answered once under');
  });

  it('going over while its container runs: the sweep stops it', { timeout: 60_000 }, async () => {
    const w = await world();
    w.channel.receive(FAMILY, `!fill ${2 * MIB} hold`);
    await waitFor(() => existsSync(join(w.config.groupsDir, 'family', 'fill.bin')), 60_000, 'the fill');
    await waitFor(() => statSync(join(w.config.groupsDir, 'family', 'fill.bin')).size === 2 * MIB, 60_000, 'filled');
    expect(w.host.queue.isRunning(FAMILY)).toBe(true);
    await w.host.recover(); // the sweep
    await waitFor(() => !w.host.queue.isRunning(FAMILY), 60_000, 'the container stopped');
    expect(texts(w, FAMILY).some((t) => t.includes('disk budget'))).toBe(true);
  });

  it('a disk that fills: the host gives up its reserve and tells main; then makes it again', async () => {
    let free = 100 * MIB;
    const w = await world(() => free);
    const reserve = join(w.config.storeDir, 'disk-reserve');
    expect(statSync(reserve).size).toBe(MIB); // made at start (tempProject: DISK_RESERVE=1m)
    free = MIB / 2;
    await w.host.recover(); // the sweep
    expect(existsSync(reserve)).toBe(false);
    await waitFor(() => texts(w, MAIN).some((t) => t.includes('The disk is almost full')), 60_000, 'told');
    free = 100 * MIB;
    await w.host.recover(); // the sweep
    expect(existsSync(reserve)).toBe(true);
  });
});

describe('the daily backup', () => {
  it('is made at start, then once a day by the host’s clock, keeping the newest seven', async () => {
    const clock = new FakeClock();
    const w = await startWorld({
      config: tempProject(),
      channel: new RecordingChannel([MAIN]),
      groups: [{ jid: MAIN, name: 'Me', folder: 'main', isMain: true }],
      options: { clock, recoverySweepMs: 100 * DAY },
    });
    const backups = () =>
      readdirSync(join(w.config.storeDir, 'backups'))
        .filter((file) => file.endsWith('.db'))
        .sort();
    await w.host.recover(); // after the start's own sweep
    expect(backups()).toEqual(['messages-2026-12-01T09-00-00-000Z.db']);
    clock.jump(DAY - 60_000);
    await w.host.recover();
    expect(backups()).toHaveLength(1);
    for (let day = 1; day <= 8; day++) {
      clock.jump(day === 1 ? 60_000 : DAY);
      await w.host.recover();
    }
    expect(backups()).toHaveLength(7);
    expect(backups().at(-1)).toBe('messages-2026-12-09T09-00-00-000Z.db');
  });
});
