import { copyFileSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import {
  Host,
  nextRunAfterFiring,
  addGroup,
  Scheduler,
  SNAPSHOT_TASKS_MAX,
  TASK_WARM_LEAD_MS,
  setupLogging,
  Store,
  tasksSnapshot,
  writeSnapshots,
  type Config,
  type ScheduledTask,
} from '../nanoclaw.ts';
import {
  FakeClock,
  fakeDocker,
  QUIET_SWEEPS,
  RecordingChannel,
  taskRow,
  tempProject,
  waitFor,
  type FakeDocker,
} from './helpers.ts';

const MAIN = 'me@s.whatsapp.net';
const FAMILY = 'family@g.us';
const HOUR = 3_600_000;

function task(overrides: Partial<ScheduledTask>): ScheduledTask {
  return taskRow({
    id: `t-${Math.random().toString(36).slice(2)}`,
    groupFolder: 'family',
    chatJid: FAMILY,
    prompt: 'water the plants',
    scheduleValue: String(HOUR),
    nextRun: new Date().toISOString(),
    createdAt: new Date().toISOString(),
    ...overrides,
  });
}

describe('nextRunAfterFiring', () => {
  const now = new Date('2026-06-01T12:00:00.000Z');
  it('keeps an interval on its grid when on time', () => {
    const t = task({ nextRun: '2026-06-01T11:59:59.500Z' });
    expect(nextRunAfterFiring(t, 'UTC', now)!.toISOString()).toBe('2026-06-01T12:59:59.500Z');
  });
  it('after downtime an interval counts from now: one run, not one per missed interval', () => {
    const t = task({ nextRun: '2026-06-01T08:00:00.000Z' });
    expect(nextRunAfterFiring(t, 'UTC', now)!.toISOString()).toBe('2026-06-01T13:00:00.000Z');
  });
  it('a missed cron runs once and then follows its schedule in the user’s timezone', () => {
    const t = task({ scheduleType: 'cron', scheduleValue: '0 9 * * *', nextRun: '2026-05-30T07:00:00.000Z' });
    // 09:00 in Berlin (UTC+2 in June) after 12:00 UTC on June 1 is June 2, 07:00 UTC.
    expect(nextRunAfterFiring(t, 'Europe/Berlin', now)!.toISOString()).toBe('2026-06-02T07:00:00.000Z');
  });
  it('a once task has nothing after it', () => {
    expect(
      nextRunAfterFiring(task({ scheduleType: 'once', scheduleValue: '2026-06-01 11:00' }), 'UTC', now),
    ).toBeNull();
  });
});

describe('Scheduler', () => {
  let store: Store;
  let scheduler: Scheduler | null = null;
  afterEach(() => {
    scheduler?.stop();
    store?.close();
  });

  let clock: FakeClock;
  function setup(): { fired: { id: string; at: number }[] } {
    const config = tempProject();
    store = new Store(config.dbPath);
    clock = new FakeClock(Date.now());
    const fired: { id: string; at: number }[] = [];
    scheduler = new Scheduler(store, 'UTC', (t) => fired.push({ id: t.id, at: clock.now() }), clock);
    return { fired };
  }

  it('fires a task exactly at its due time, once, and moves next_run on', async () => {
    const { fired } = setup();
    const due = clock.now() + 300;
    const t = task({ nextRun: new Date(due).toISOString(), scheduleValue: '60000' });
    store.createTask(t);
    scheduler!.start();
    await clock.advance(299);
    expect(fired).toEqual([]);
    await clock.advance(1);
    expect(fired).toEqual([{ id: t.id, at: due }]);
    await clock.advance(30_000);
    expect(fired).toHaveLength(1);
    expect(store.getTask(t.id)!.nextRun).toBe(new Date(due + 60_000).toISOString());
  });

  /** A scheduler on a fresh store (re-reading every second) that records each onSoon: which task, when. */
  function schedulerTellingSoon(): { soon: { id: string; at: number }[]; start: () => void } {
    store = new Store(tempProject().dbPath);
    clock = new FakeClock(Date.now());
    const soon: { id: string; at: number }[] = [];
    scheduler = new Scheduler(
      store,
      'UTC',
      () => {},
      clock,
      (t) => soon.push({ id: t.id, at: clock.now() }),
    );
    const created = scheduler;
    return { soon, start: () => created.start() };
  }

  it('tells onSoon once per due time when the next task is TASK_WARM_LEAD_MS away, not before', async () => {
    const { soon, start } = schedulerTellingSoon();
    const due = clock.now() + TASK_WARM_LEAD_MS + 1_000;
    const t = task({ nextRun: new Date(due).toISOString(), scheduleValue: '60000' });
    store.createTask(t);
    start();
    await clock.advance(800);
    expect(soon).toEqual([]); // still more than the lead away
    await clock.advance(200);
    expect(soon).toEqual([{ id: t.id, at: due - TASK_WARM_LEAD_MS }]);
    await clock.advance(TASK_WARM_LEAD_MS - 1);
    expect(soon).toHaveLength(1); // once, though the schedule is read every second
  });

  it('tells onSoon of every task within the lead, not only the soonest', async () => {
    const { soon, start } = schedulerTellingSoon();
    const first = clock.now() + TASK_WARM_LEAD_MS + 1_000;
    const isolated = task({ nextRun: new Date(first).toISOString(), contextMode: 'isolated' });
    const inChat = task({ nextRun: new Date(first + 2_000).toISOString(), contextMode: 'group' });
    store.createTask(isolated);
    store.createTask(inChat);
    start();
    await clock.advance(3_000);
    // The chat's task is told its lead before it is due, though the isolated one is still due first.
    expect(soon.map((s) => s.id)).toEqual([isolated.id, inChat.id]);
    expect(soon[1]!.at).toBe(first + 2_000 - TASK_WARM_LEAD_MS);
  });

  it('runs a task missed during downtime once at start', async () => {
    const { fired } = setup();
    const t = task({ nextRun: new Date(clock.now() - 5 * HOUR).toISOString() });
    store.createTask(t);
    scheduler!.start();
    await clock.advance(0);
    expect(fired).toHaveLength(1);
    await clock.advance(10 * 60_000);
    expect(fired).toHaveLength(1);
    expect(store.getTask(t.id)!.nextRun).toBe(new Date(fired[0]!.at + HOUR).toISOString());
  });

  it('does not fire paused or cancelled tasks, and sees a change made by another process within its recheck', async () => {
    const { fired } = setup();
    const paused = task({ nextRun: new Date(clock.now() + 200).toISOString() });
    const cancelled = task({ nextRun: new Date(clock.now() + 200).toISOString() });
    store.createTask(paused);
    store.createTask(cancelled);
    scheduler!.start();
    // Another connection (like the `tasks` command) changes them just before they are due.
    const other = new Store(join(store.db.filename, '..', 'messages.db'));
    other.updateTask(paused.id, { status: 'paused' });
    other.deleteTask(cancelled.id);
    const later = task({ nextRun: new Date(clock.now() + 500).toISOString() });
    other.createTask(later);
    other.close();
    await clock.advance(499);
    expect(fired).toEqual([]);
    await clock.advance(1);
    expect(fired.map((f) => f.id)).toEqual([later.id]);
    await clock.advance(5_000);
    expect(fired).toHaveLength(1);
  });

  it('a wall clock that jumps forward and back leaves no interval task silent for the size of the jump', async () => {
    const { fired } = setup();
    const t = task({ nextRun: new Date(clock.now() + HOUR).toISOString(), scheduleValue: String(HOUR) });
    store.createTask(t);
    scheduler!.start();
    clock.jump(5 * HOUR); // the clock is set 5 h ahead: the task is late, fires once (at the next look, within 1 s)
    await clock.advance(1_000);
    expect(fired).toHaveLength(1);
    expect(new Date(store.getTask(t.id)!.nextRun!).getTime()).toBe(fired[0]!.at + HOUR);
    store.releaseTask(t.id); // the run is over (the host releases its claim when it records it)
    clock.jump(-5 * HOUR); // and set right again: its next run lay 5 h + 1 h ahead
    await clock.advance(1_000);
    const next = new Date(store.getTask(t.id)!.nextRun!).getTime();
    expect(next - clock.now()).toBeLessThanOrEqual(HOUR);
    await clock.advance(HOUR);
    expect(fired).toHaveLength(2); // within the hour, not after six
  });

  it('pauses a task whose stored schedule became invalid instead of failing every second', async () => {
    const { fired } = setup();
    const broken = task({
      scheduleType: 'cron',
      scheduleValue: 'not a cron',
      nextRun: new Date(clock.now() - 1000).toISOString(),
    });
    store.createTask(broken);
    scheduler!.start();
    await clock.advance(0);
    expect(store.getTask(broken.id)!.status).toBe('paused');
    await clock.advance(5_000);
    expect(fired).toHaveLength(0);
  });
});

describe('tasks through the host (fake docker)', () => {
  let docker: FakeDocker;
  let config: Config;
  let store: Store;
  let host: Host;
  let channel: RecordingChannel;

  async function start(env: Record<string, string> = {}) {
    docker = fakeDocker();
    config = tempProject({ CONTAINER_RUNTIME: docker.path, ...env }, 'KIMI_API_KEY=sk-tasks-test-123456\n');
    setupLogging(config, { terminalLevel: 'silent' });
    store = new Store(config.dbPath);
    addGroup(config, store, { jid: MAIN, name: 'Me', folder: 'main', isMain: true });
    addGroup(config, store, { jid: FAMILY, name: 'Family', folder: 'family' });
    channel = new RecordingChannel([MAIN, FAMILY]);
    host = new Host(config, store, [channel], {
      retryBaseMs: 50,
      ...QUIET_SWEEPS,
      shutdownGraceMs: 2000,
    });
    await host.start();
  }
  afterEach(async () => {
    await host?.stop();
    store?.close();
  });

  it('an interval task answers in its chat, closes its container at once, and is logged', async () => {
    await start({ IDLE_TIMEOUT: '600000' });
    const t = task({ nextRun: new Date(Date.now() + 100).toISOString(), scheduleValue: '600000' });
    store.createTask(t);
    host.scheduler.arm();
    await waitFor(() => channel.sent.length === 1, 60_000, 'task reply');
    expect(channel.sent.map(({ jid, text }) => ({ jid, text }))).toEqual([
      { jid: FAMILY, text: 'Andy: echo: water the plants' },
    ]);
    await waitFor(() => docker.calls().some((c) => c.command === 'closed'), 60_000, 'prompt close');
    await waitFor(() => store.taskRuns(t.id).length === 1, 60_000, 'run log');
    const [run] = store.taskRuns(t.id);
    expect(run).toMatchObject({ status: 'success', result: 'echo: water the plants', error: null });
    expect(store.getTask(t.id)).toMatchObject({ lastResult: 'echo: water the plants', status: 'active' });
    const stdin = JSON.parse(docker.runs()[0]!.stdin!);
    expect(stdin.isScheduledTask).toBe(true);
    expect(stdin.sessionId).toBeUndefined(); // isolated: a fresh session
  });

  it('a task run now (tasks run) stops the host after it, through stop(): no send retry or other timer is left', async () => {
    docker = fakeDocker();
    config = tempProject({ CONTAINER_RUNTIME: docker.path }, 'KIMI_API_KEY=sk-tasks-test-123456\n');
    setupLogging(config, { terminalLevel: 'silent' });
    store = new Store(config.dbPath);
    addGroup(config, store, { jid: FAMILY, name: 'Family', folder: 'family' });
    channel = new RecordingChannel([FAMILY]);
    channel.deliver = async () => {
      throw new Error('offline'); // the part stays in the outbox, and its sender sets a retry
    };
    const clock = new FakeClock(Date.now());
    host = new Host(config, store, [channel], { ...QUIET_SWEEPS, clock });
    const t = task({ nextRun: null });
    store.createTask(t);
    expect(await host.runTaskNow(t.id)).toMatchObject({ status: 'success' });
    expect(store.unsent('recording').map((m) => m.text)).toEqual(['Andy: echo: water the plants']);
    expect(clock.pending).toEqual([]);
  });

  it('a group-context task resumes the group’s session; a once task ends completed', async () => {
    await start();
    store.setSession('family', 'family-session-1');
    const t = task({
      scheduleType: 'once',
      scheduleValue: new Date(Date.now() + 100).toISOString(),
      nextRun: new Date(Date.now() + 100).toISOString(),
      contextMode: 'group',
    });
    store.createTask(t);
    host.scheduler.arm();
    await waitFor(() => store.getTask(t.id)?.status === 'completed', 60_000, 'completed');
    expect(JSON.parse(docker.runs()[0]!.stdin!).sessionId).toBe('family-session-1');
    expect(store.getTask(t.id)!.nextRun).toBeNull();
  });

  it('keeps <internal> task output private and records failures', async () => {
    await start();
    const quiet = task({ prompt: '!internal', nextRun: new Date(Date.now() + 50).toISOString() });
    const failing = task({
      prompt: '!fail quota exceeded',
      groupFolder: 'main',
      chatJid: MAIN,
      nextRun: new Date(Date.now() + 50).toISOString(),
    });
    store.createTask(quiet);
    store.createTask(failing);
    host.scheduler.arm();
    await waitFor(
      () => store.taskRuns(failing.id).length === 1 && store.taskRuns(quiet.id).length === 1,
      60_000,
      'both runs',
    );
    expect(channel.sent.map(({ jid, text }) => ({ jid, text }))).toEqual([{ jid: FAMILY, text: 'Andy: visible' }]);
    expect(store.taskRuns(failing.id)[0]).toMatchObject({ status: 'error', error: 'quota exceeded' });
    expect(store.getTask(failing.id)!.lastResult).toBe('Error: quota exceeded');
  });

  const events = () =>
    docker
      .calls()
      .filter((c) => ['run', 'warm-start', 'closed', 'follow-up', 'task-turn'].includes(c.command))
      .map((c) => c.command);

  it('a group-context task in a chat whose container waits is that container’s next turn: no new container, nothing closed', async () => {
    await start({ IDLE_TIMEOUT: '600000' });
    channel.receive(FAMILY, '@Andy hello');
    await waitFor(() => channel.sent.length === 1, 60_000, 'chat reply');
    const t = task({ contextMode: 'group', nextRun: new Date().toISOString() });
    store.createTask(t);
    host.scheduler.arm();
    await waitFor(() => store.taskRuns(t.id).length === 1, 60_000, 'task run');
    expect(store.taskRuns(t.id)[0]).toMatchObject({ status: 'success', result: 'echo: water the plants' });
    expect(channel.sent.map((m) => m.text)).toEqual(['Andy: echo: hello', 'Andy: echo: water the plants']);
    // The chat's next message is a follow-up into the same, still warm container.
    channel.receive(FAMILY, '@Andy and now?');
    await waitFor(() => channel.sent.length === 3, 60_000, 'reply after the task');
    expect(channel.sent[2]!.text).toBe('Andy: echo: and now?');
    expect(events()).toEqual(['run', 'task-turn', 'follow-up']);
    expect(store.getTask(t.id)!.lastResult).toBe('echo: water the plants');
  });

  it('a group-context task due while the chat’s agent is busy waits for its answer, then is the next turn; messages meanwhile follow it', async () => {
    await start({ IDLE_TIMEOUT: '600000' });
    channel.receive(FAMILY, '@Andy !sleep 600');
    await waitFor(() => docker.runs().length === 1, 60_000, 'chat run');
    const t = task({ contextMode: 'group', nextRun: new Date().toISOString() });
    store.createTask(t);
    host.scheduler.arm();
    await waitFor(() => docker.calls().some((c) => c.command === 'task-turn'), 60_000, 'task turn');
    channel.receive(FAMILY, '@Andy during the task'); // held while the task has the container
    await waitFor(() => channel.sent.length === 3, 60_000, 'all three answers');
    expect(channel.sent.map((m) => m.text)).toEqual([
      'Andy: slept 600',
      'Andy: echo: water the plants',
      'Andy: echo: during the task',
    ]);
    expect(events()).toEqual(['run', 'task-turn', 'follow-up']);
    expect(docker.runs()).toHaveLength(1);
  });

  it('an isolated task gets its own container beside the chat’s, which stays open for the chat', async () => {
    await start({ IDLE_TIMEOUT: '600000' });
    channel.receive(FAMILY, '@Andy hello');
    await waitFor(() => channel.sent.length === 1, 60_000, 'chat reply');
    const t = task({ contextMode: 'isolated', nextRun: new Date().toISOString() });
    store.createTask(t);
    host.scheduler.arm();
    await waitFor(() => store.taskRuns(t.id).length === 1, 60_000, 'task run');
    expect(JSON.parse(docker.runs()[1]!.stdin!)).toMatchObject({ isScheduledTask: true, prompt: 'water the plants' });
    expect(JSON.parse(docker.runs()[1]!.stdin!).sessionId).toBeUndefined();
    channel.receive(FAMILY, '@Andy still there?');
    await waitFor(() => channel.sent.length === 3, 60_000, 'reply after the task');
    // The task's container closed after its answer; the chat's never did.
    expect(events()).toEqual(['run', 'run', 'closed', 'follow-up']);
  });

  it('a task turn whose container dies is recorded as failed, and the chat goes on in a new container', async () => {
    await start({ IDLE_TIMEOUT: '600000' });
    channel.receive(FAMILY, '@Andy hello');
    await waitFor(() => channel.sent.length === 1, 60_000, 'chat reply');
    const t = task({ contextMode: 'group', prompt: '!crash', nextRun: new Date().toISOString() });
    store.createTask(t);
    host.scheduler.arm();
    await waitFor(() => store.taskRuns(t.id).length === 1, 60_000, 'task run');
    expect(store.taskRuns(t.id)[0]).toMatchObject({
      status: 'error',
      error: 'the container stopped before the task was answered',
    });
    expect(store.taskClaims()).toEqual([]);
    channel.receive(FAMILY, '@Andy back?');
    await waitFor(() => channel.sent.length === 2, 60_000, 'reply in a new container');
    expect(docker.runs()).toHaveLength(2);
  });
});

describe('bun nanoclaw.ts tasks', () => {
  const REPO = fileURLToPath(new URL('..', import.meta.url));
  it('lists, shows, pauses, resumes, runs and cancels', async () => {
    const docker = fakeDocker();
    const config = tempProject({}, '');
    copyFileSync(join(REPO, 'bunfig.toml'), join(config.projectRoot, 'bunfig.toml'));
    writeFileSync(join(config.projectRoot, '.env'), 'KIMI_API_KEY=sk-tasks-cli-123456\nTZ=Asia/Tokyo\n');
    const store = new Store(config.dbPath);
    addGroup(config, store, { jid: FAMILY, name: 'Family', folder: 'family' });
    const t = task({ scheduleType: 'cron', scheduleValue: '0 9 * * *', nextRun: '2030-01-01T00:00:00.000Z' });
    store.createTask(t);
    store.close();
    const cli = async (...args: string[]) => {
      const proc = Bun.spawn([process.execPath, join(REPO, 'nanoclaw.ts'), 'tasks', ...args], {
        cwd: config.projectRoot,
        stdout: 'pipe',
        stderr: 'pipe',
        env: {
          PATH: process.env.PATH!,
          HOME: process.env.HOME!,
          NANOCLAW_ROOT: config.projectRoot,
          CONTAINER_RUNTIME: docker.path,
        },
      });
      const [stdout, stderr, code] = await Promise.all([
        new Response(proc.stdout).text(),
        new Response(proc.stderr).text(),
        proc.exited,
      ]);
      return { stdout, stderr, code };
    };
    const list = await cli('list');
    expect(list.stdout).toContain(t.id);
    expect(list.stdout).toContain('2030-01-01 09:00 Asia/Tokyo'); // shown in the user's timezone
    const json = JSON.parse((await cli('list', '--json')).stdout);
    expect(json[0]).toMatchObject({ id: t.id, scheduleValue: '0 9 * * *' });
    expect((await cli('pause', t.id)).code).toBe(0);
    expect((await cli('show', t.id)).stdout).toContain('(paused)');
    const resumed = await cli('resume', t.id);
    expect(resumed.stdout).toMatch(/next run \d{4}-\d{2}-\d{2} 09:00 Asia\/Tokyo/);
    const run = await cli('run', t.id);
    expect(run.code).toBe(0);
    expect(run.stdout).toBe(
      `→ ${FAMILY} (queued for WhatsApp): Andy: echo: water the plants\nWhatsApp is not linked on this machine: queued in the outbox until you link it (bun nanoclaw.ts auth) and start NanoClaw.\n`,
    );
    expect((await cli('show', t.id)).stdout).toMatch(/recent runs:\n.*success/);
    expect((await cli('cancel', t.id)).code).toBe(0);
    expect((await cli('show', t.id)).code).toBe(2);
    expect((await cli('run', 'no-such-task')).stderr).toContain('No task with id');
  });

  it('a removed group’s tasks are paused with the reason (list, show, main’s snapshot), never fired, and resumable once it is registered again', async () => {
    const GROUP = '120363000000000001@g.us';
    const config = tempProject({}, '');
    copyFileSync(join(REPO, 'bunfig.toml'), join(config.projectRoot, 'bunfig.toml'));
    writeFileSync(join(config.projectRoot, '.env'), 'KIMI_API_KEY=sk-tasks-cli-123456\nTZ=UTC\n');
    let store = new Store(config.dbPath);
    addGroup(config, store, { jid: MAIN, name: 'Me', folder: 'main', isMain: true });
    addGroup(config, store, { jid: GROUP, name: 'Family', folder: 'family' });
    const active = task({
      chatJid: GROUP,
      scheduleType: 'cron',
      scheduleValue: '0 9 * * *',
      nextRun: '2030-01-01T09:00:00.000Z',
    });
    const pausedBefore = task({ chatJid: GROUP, status: 'paused', nextRun: null });
    store.createTask(active);
    store.createTask(pausedBefore);
    store.close();
    const cli = async (...args: string[]) => {
      const proc = Bun.spawn([process.execPath, join(REPO, 'nanoclaw.ts'), ...args], {
        cwd: config.projectRoot,
        stdout: 'pipe',
        stderr: 'pipe',
        env: { PATH: process.env.PATH!, HOME: process.env.HOME!, NANOCLAW_ROOT: config.projectRoot },
      });
      const [stdout, stderr, code] = await Promise.all([
        new Response(proc.stdout).text(),
        new Response(proc.stderr).text(),
        proc.exited,
      ]);
      return { stdout, stderr, code };
    };
    const removed = await cli('groups', 'remove', 'family');
    expect(removed.code).toBe(0);
    expect(removed.stdout).toContain(`Paused its 1 active task(s): ${active.id}.`);
    const reason = /its group was removed on \d{4}-\d{2}-\d{2}; register the group again to resume it/;
    const list = (await cli('tasks', 'list')).stdout.split('\n');
    expect(list.find((line) => line.startsWith(active.id))).toMatch(/ paused .*\(paused: its group was removed on /);
    expect(list.find((line) => line.startsWith(pausedBefore.id))).not.toContain('(paused:'); // paused by someone: no reason
    expect((await cli('tasks', 'show', active.id)).stdout).toMatch(
      new RegExp(`^Task ${active.id} \\(paused: ${reason.source}\\)`),
    );
    store = new Store(config.dbPath);
    expect(store.upcomingTasks().map((t) => t.id)).toEqual([]); // the scheduler has nothing to fire
    const snapshot = tasksSnapshot(store, store.mainGroup()!);
    expect(snapshot.find((t) => t.id === active.id)).toMatchObject({
      status: 'paused',
      paused_reason: expect.stringMatching(reason),
    });
    store.close();

    const early = await cli('tasks', 'resume', active.id);
    expect(early.code).toBe(2);
    expect(early.stderr).toContain(`belongs to group "family", which is not registered: register it again first`);
    const again = await cli('groups', 'register', GROUP, 'family', '--name', 'Family');
    expect(again.code).toBe(0);
    expect(again.stdout).toContain(`Paused by NanoClaw, waiting for you: ${active.id} (its group was removed on`);
    const resumed = await cli('tasks', 'resume', active.id);
    expect(resumed.code).toBe(0);
    store = new Store(config.dbPath);
    expect(store.getTask(active.id)).toMatchObject({ status: 'active', pausedReason: null });
    expect(store.upcomingTasks().map((t) => t.id)).toEqual([active.id]);
    store.close();
  });
});

describe('the tasks snapshot', () => {
  it('is rebuilt only when tasks or their runs changed, or the file is not the one written', () => {
    const config = tempProject();
    const store = new Store(config.dbPath);
    const main = addGroup(config, store, { jid: MAIN, name: 'Me', folder: 'main', isMain: true });
    const t = task({ id: 'water' });
    store.createTask(t);
    const file = join(config.ipcDir, 'main', 'current_tasks.json');
    const inode = () => statSync(file).ino;
    const listed = () => JSON.parse(readFileSync(file, 'utf8')) as { id: string; recent_runs: unknown[] }[];
    const written = new Map<string, string>();
    writeSnapshots(config, store, main, written);
    const first = inode();
    writeSnapshots(config, store, main, written);
    expect(inode()).toBe(first); // nothing changed: not written again
    store.logTaskRun({ taskId: 'water', runAt: 'x', durationMs: 1, status: 'success', result: 'ok', error: null });
    writeSnapshots(config, store, main, written);
    expect(inode()).not.toBe(first);
    expect(listed()[0]!.recent_runs).toHaveLength(1);
    rmSync(file); // the agent removed it
    writeSnapshots(config, store, main, written);
    expect(listed().map((x) => x.id)).toEqual(['water']);
    writeFileSync(file, '[]'); // or wrote its own
    writeSnapshots(config, store, main, written);
    expect(listed().map((x) => x.id)).toEqual(['water']);
    store.close();
  });

  it(`lists at most ${SNAPSHOT_TASKS_MAX} tasks, the active ones first`, () => {
    const config = tempProject();
    const store = new Store(config.dbPath);
    const main = addGroup(config, store, { jid: MAIN, name: 'Me', folder: 'main', isMain: true });
    store.transaction(() => {
      for (let i = 0; i < SNAPSHOT_TASKS_MAX + 5; i++)
        store.createTask(
          task({
            id: `t${String(i).padStart(4, '0')}`,
            status: i < 10 ? 'active' : 'completed',
            createdAt: new Date(Date.UTC(2026, 0, 1, 0, 0, i)).toISOString(),
          }),
        );
    });
    const ids = tasksSnapshot(store, main).map((x) => x.id);
    expect(ids).toHaveLength(SNAPSHOT_TASKS_MAX);
    expect(ids.slice(0, 10)).toEqual(Array.from({ length: 10 }, (_, i) => `t000${i}`));
    expect(ids.at(-1)).toBe(`t0${SNAPSHOT_TASKS_MAX + 4}`);
    store.close();
  });
});
