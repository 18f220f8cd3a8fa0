import { describe, expect, it } from 'vitest';
import { backoff, GroupQueue, type LiveContainer, type QueueOptions } from '../nanoclaw.ts';
import { FakeClock, settle, waitFor } from './helpers.ts';

/** A processMessages whose runs the test finishes by hand, one group at a time. */
function controlledRuns() {
  const running = new Map<string, (ok: boolean) => void>();
  const started: string[] = [];
  let concurrent = 0;
  let maxConcurrent = 0;
  const perGroupConcurrent = new Map<string, number>();
  let maxPerGroup = 0;
  const warmStarts: string[] = [];
  const processMessages = (jid: string, warm: boolean) =>
    new Promise<boolean>((resolve) => {
      started.push(jid);
      if (warm) warmStarts.push(jid);
      concurrent++;
      maxConcurrent = Math.max(maxConcurrent, concurrent);
      perGroupConcurrent.set(jid, (perGroupConcurrent.get(jid) ?? 0) + 1);
      maxPerGroup = Math.max(maxPerGroup, perGroupConcurrent.get(jid)!);
      running.set(jid, (ok) => {
        concurrent--;
        perGroupConcurrent.set(jid, perGroupConcurrent.get(jid)! - 1);
        running.delete(jid);
        resolve(ok);
      });
    });
  return {
    processMessages,
    started,
    warmStarts,
    running,
    finish: (jid: string, ok = true) => running.get(jid)!(ok),
    get maxConcurrent() {
      return maxConcurrent;
    },
    get maxPerGroup() {
      return maxPerGroup;
    },
  };
}

function queueWith(runs: ReturnType<typeof controlledRuns>, overrides: Partial<QueueOptions> = {}) {
  return new GroupQueue({
    maxConcurrent: 2,
    idleTimeoutMs: 60_000,
    pool: { size: 4, pauseAfterMs: 30_000 },
    retryBaseMs: 10,
    maxRetries: 3,
    processMessages: runs.processMessages,
    ...overrides,
  });
}

/** A live container double that records what the queue asks of it. */
function liveContainer(acceptsFollowUps = true) {
  const inputs: string[] = [];
  const calls = { close: 0, kill: 0, pause: 0, wake: 0 };
  const live: LiveContainer = {
    acceptsFollowUps,
    get closing() {
      return calls.close > 0;
    },
    sendInput: (text) => inputs.push(text) > 0,
    close: () => calls.close++,
    kill: async () => {
      calls.kill++;
    },
    pause: () => calls.pause++,
    wake: () => calls.wake++,
  };
  return { live, inputs, calls };
}

describe('backoff', () => {
  it('doubles from the base, up to the cap; with jitter, somewhere in the upper half', () => {
    expect([1, 2, 3, 4].map((n) => backoff(n, { baseMs: 5000 }))).toEqual([5000, 10000, 20000, 40000]);
    expect([1, 5, 10].map((n) => backoff(n, { baseMs: 1000, capMs: 8000 }))).toEqual([1000, 8000, 8000]);
    expect(backoff(3, { baseMs: 1000, jitter: true }, () => 0)).toBe(2000);
    expect(backoff(3, { baseMs: 1000, jitter: true }, () => 1)).toBe(4000);
  });
});

describe('GroupQueue', () => {
  it('never runs more containers than the limit, and starts the next when one finishes', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs);
    for (const jid of ['a', 'b', 'c', 'd']) queue.enqueueMessages(jid);
    expect(runs.started).toEqual(['a', 'b']);
    expect(queue.activeCount).toBe(2);
    runs.finish('a');
    await waitFor(() => runs.started.length === 3, 60_000, 'third start');
    expect(runs.started[2]).toBe('c');
    runs.finish('b');
    runs.finish('c');
    await waitFor(() => runs.started.length === 4, 60_000, 'fourth start');
    runs.finish('d');
    await waitFor(() => queue.activeCount === 0, 60_000, 'idle queue');
    expect(runs.maxConcurrent).toBe(2);
  });

  it('runs one container per group: new work for a running group waits for it, then runs once', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs);
    queue.enqueueMessages('a');
    queue.enqueueMessages('a');
    queue.enqueueMessages('a');
    expect(runs.started).toEqual(['a']);
    runs.finish('a');
    await waitFor(() => runs.started.length === 2, 60_000, 'second run');
    runs.finish('a');
    await waitFor(() => queue.activeCount === 0, 60_000, 'idle');
    expect(runs.started).toEqual(['a', 'a']);
    expect(runs.maxPerGroup).toBe(1);
  });

  it('serves waiting groups in order before a group that has more work again', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs, { maxConcurrent: 1 });
    queue.enqueueMessages('a');
    queue.enqueueMessages('b');
    queue.enqueueMessages('c');
    queue.enqueueMessages('a'); // more for a while it runs
    runs.finish('a');
    await waitFor(() => runs.started.length === 2, 60_000, 'b');
    runs.finish('b');
    await waitFor(() => runs.started.length === 3, 60_000, 'c');
    runs.finish('c');
    await waitFor(() => runs.started.length === 4, 60_000, 'a again');
    runs.finish('a');
    expect(runs.started).toEqual(['a', 'b', 'c', 'a']);
  });

  it('retries a failed run after 1, 2, 4 × the base, then gives up: exactly, on a clock the test moves', async () => {
    const clock = new FakeClock();
    const start = clock.now();
    const attempts: number[] = [];
    const gaveUp: number[] = [];
    const queue = new GroupQueue({
      maxConcurrent: 1,
      idleTimeoutMs: 60_000,
      pool: { size: 4, pauseAfterMs: 30_000 },
      retryBaseMs: 1000,
      maxRetries: 3,
      clock,
      processMessages: async () => {
        attempts.push(clock.now() - start);
        return false;
      },
      onGiveUp: () => gaveUp.push(clock.now() - start),
    });
    queue.enqueueMessages('a');
    await clock.advance(999);
    expect(attempts).toEqual([0]); // not a moment early
    await clock.advance(1);
    expect(attempts).toEqual([0, 1000]);
    await clock.advance(60_000);
    expect(attempts).toEqual([0, 1000, 3000, 7000]); // each gap twice the last
    expect(gaveUp).toEqual([7000]);
    expect(clock.pending).toEqual([]); // and nothing more is planned
  });

  it('a message that came during a failing run waits out the retry’s backoff too: the delay told is the delay kept', async () => {
    const clock = new FakeClock();
    const start = clock.now();
    const attempts: number[] = [];
    const retries: number[] = [];
    let queue!: GroupQueue;
    queue = new GroupQueue({
      maxConcurrent: 1,
      idleTimeoutMs: 60_000,
      pool: { size: 4, pauseAfterMs: 30_000 },
      retryBaseMs: 5_000,
      maxRetries: 3,
      clock,
      processMessages: async () => {
        attempts.push(clock.now() - start);
        if (attempts.length === 1) queue.enqueueMessages('a'); // the person sends another line while the agent fails
        return attempts.length > 1;
      },
      onRetry: (_jid, _attempt, delayMs) => retries.push(delayMs),
    });
    queue.enqueueMessages('a');
    await clock.advance(4_999);
    expect(attempts).toEqual([0]);
    queue.enqueueMessages('a'); // and another one during the backoff
    await clock.advance(1);
    expect(retries).toEqual([5_000]);
    expect(attempts).toEqual([0, 5_000]);
  });

  it('a group whose container was closing when its message came keeps its place, ahead of groups that came later', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs, { maxConcurrent: 1 });
    queue.enqueueMessages('a');
    const { live } = liveContainer();
    queue.attach('a', live);
    queue.closeContainer('a'); // answered and told to close: its slot is free
    queue.enqueueMessages('b'); // b takes the free slot
    queue.enqueueMessages('c'); // c waits
    queue.enqueueMessages('a'); // a message for a while its container closes
    runs.finish('a');
    runs.finish('b');
    await waitFor(() => runs.started.length === 3, 60_000, 'the next start');
    expect(runs.started).toEqual(['a', 'b', 'a']); // a goes on before c, which came after it
    runs.finish('a');
    await waitFor(() => runs.started.length === 4, 60_000, 'c');
    runs.finish('c');
  });

  it('resets the retry count after a success', async () => {
    const clock = new FakeClock();
    const results = [false, true, false, false, false, false];
    let calls = 0;
    const queue = new GroupQueue({
      maxConcurrent: 1,
      idleTimeoutMs: 60_000,
      pool: { size: 4, pauseAfterMs: 30_000 },
      retryBaseMs: 5,
      maxRetries: 3,
      clock,
      processMessages: async () => results[calls++] ?? true,
    });
    queue.enqueueMessages('a'); // fail, succeed
    await clock.advance(5);
    expect(calls).toBe(2);
    queue.enqueueMessages('a'); // fail ×4 → 1 run + 3 retries, a full budget again
    await clock.advance(5 + 10 + 20);
    expect(calls).toBe(6);
    await clock.advance(3_600_000);
    expect(calls).toBe(6);
  });

  it('hands follow-ups to the live container only while it runs and accepts them', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs);
    expect(queue.sendFollowUp('a', 'early')).toBe(false);
    queue.enqueueMessages('a');
    const { live, inputs } = liveContainer();
    queue.attach('a', live);
    expect(queue.sendFollowUp('a', 'one')).toBe(true);
    expect(inputs).toEqual(['one']);
    runs.finish('a');
    await waitFor(() => queue.activeCount === 0, 60_000, 'finished');
    expect(queue.sendFollowUp('a', 'late')).toBe(false);

    queue.enqueueMessages('b');
    queue.attach('b', liveContainer(false).live);
    expect(queue.sendFollowUp('b', 'to a task container')).toBe(false);
    runs.finish('b');
  });

  it('sends nothing to a container that was asked to close; the message waits for the next run', async () => {
    const clock = new FakeClock();
    const runs = controlledRuns();
    const queue = queueWith(runs, { idleTimeoutMs: 10, clock });
    queue.enqueueMessages('a');
    const { live, inputs, calls } = liveContainer();
    queue.attach('a', live);
    queue.markIdle('a');
    await clock.advance(10);
    expect(calls.close).toBe(1);
    expect(queue.sendFollowUp('a', 'too late for this one')).toBe(false);
    expect(inputs).toEqual([]);
    queue.enqueueMessages('a');
    runs.finish('a');
    await waitFor(() => runs.started.length === 2, 60_000, 'next run');
    runs.finish('a');
  });

  it('closes an idle container exactly after the idle timeout; a follow-up starts the wait again', async () => {
    const clock = new FakeClock();
    const runs = controlledRuns();
    const queue = queueWith(runs, { idleTimeoutMs: 80, clock });
    queue.enqueueMessages('a');
    const { live, calls } = liveContainer();
    queue.attach('a', live);
    queue.markIdle('a');
    await clock.advance(40);
    queue.sendFollowUp('a', 'more'); // clears the idle timer
    await clock.advance(200);
    expect(calls.close).toBe(0); // busy with the follow-up: no idle close
    queue.markIdle('a');
    await clock.advance(79);
    expect(calls.close).toBe(0);
    await clock.advance(1);
    expect(calls.close).toBe(1);
    runs.finish('a');
    await settle();
  });

  it('an answered agent waits in the warm pool without a slot: a waiting group starts beside it, and its own next message goes in at once', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs, { maxConcurrent: 1 });
    queue.enqueueMessages('a');
    const a = liveContainer();
    queue.attach('a', a.live);
    queue.enqueueMessages('b'); // the one slot is a's: b waits
    expect(runs.started).toEqual(['a']);
    queue.markIdle('a'); // a answered: its agent waits for the next message
    expect(runs.started).toEqual(['a', 'b']);
    expect(a.calls.close).toBe(0);
    expect(queue.poolMembers).toEqual(['a']);
    expect(queue.activeCount).toBe(1);
    // a's next message goes into its ready agent, though b holds the only slot; it counts again while a works.
    expect(queue.sendFollowUp('a', 'next')).toBe(true);
    expect(a.inputs).toEqual(['next']);
    expect(queue.poolMembers).toEqual([]);
    expect(queue.activeCount).toBe(2);
    // While both work, nobody else starts.
    queue.enqueueMessages('c');
    expect(runs.started).toEqual(['a', 'b']);
    queue.markIdle('a');
    expect(queue.activeCount).toBe(1);
    expect(runs.started).toEqual(['a', 'b']); // still one over: b's slot is the only one
    runs.finish('b');
    await waitFor(() => runs.started.length === 3, 60_000, 'c starts when b is done');
    expect(runs.started[2]).toBe('c');
    runs.finish('a');
    runs.finish('c');
  });

  it('pauses a waiting agent exactly after pauseAfterMs and closes it after the idle timeout; work in between cancels both', async () => {
    const clock = new FakeClock();
    const runs = controlledRuns();
    const queue = queueWith(runs, { clock, idleTimeoutMs: 1_000, pool: { size: 2, pauseAfterMs: 100 } });
    queue.enqueueMessages('a');
    const a = liveContainer();
    queue.attach('a', a.live);
    queue.markIdle('a');
    await clock.advance(99);
    expect(a.calls.pause).toBe(0);
    await clock.advance(1);
    expect(a.calls.pause).toBe(1);
    queue.sendFollowUp('a', 'wake up'); // the container thaws itself on input
    await clock.advance(5_000);
    expect(a.calls).toMatchObject({ close: 0, kill: 0, pause: 1 }); // working: neither paused again nor closed
    queue.markIdle('a');
    await clock.advance(999);
    expect(a.calls.close).toBe(0);
    await clock.advance(1);
    expect(a.calls).toMatchObject({ close: 1, kill: 0, pause: 2 });
    expect(queue.poolMembers).toEqual([]);
    runs.finish('a');
    await settle();
  });

  it('typing for a group whose agent waits paused thaws it at once and keeps it running another pauseAfterMs', async () => {
    const clock = new FakeClock();
    const runs = controlledRuns();
    const queue = queueWith(runs, { clock, pool: { size: 2, pauseAfterMs: 100 } });
    queue.enqueueMessages('a');
    const a = liveContainer();
    queue.attach('a', a.live);
    queue.markIdle('a');
    await clock.advance(100);
    expect(a.calls.pause).toBe(1);
    expect(queue.prewarm('a')).toBe(true);
    expect(a.calls.wake).toBe(1);
    expect(runs.started).toEqual(['a']); // no second container
    await clock.advance(99);
    expect(a.calls.pause).toBe(1);
    await clock.advance(1);
    expect(a.calls.pause).toBe(2);
    runs.finish('a');
    await settle();
  });

  it('keeps at most pool.size agents waiting: the one that waited longest is closed first', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs, { maxConcurrent: 3, pool: { size: 2, pauseAfterMs: 30_000 } });
    const agents = new Map<string, ReturnType<typeof liveContainer>>();
    for (const jid of ['a', 'b', 'c']) {
      queue.enqueueMessages(jid);
      agents.set(jid, liveContainer());
      queue.attach(jid, agents.get(jid)!.live);
    }
    queue.markIdle('a');
    queue.markIdle('b');
    queue.sendFollowUp('a', 'a again'); // a is used again: b is now the least recently used
    queue.markIdle('a');
    expect(queue.poolMembers).toEqual(['b', 'a']);
    queue.markIdle('c');
    expect(queue.poolMembers).toEqual(['a', 'c']);
    expect([...agents.values()].map((agent) => agent.calls.close)).toEqual([0, 1, 0]);
    for (const jid of ['a', 'b', 'c']) runs.finish(jid);
    await waitFor(() => queue.activeCount === 0, 60_000, 'all finished');
  });

  it('a pool of size 0 closes an answered agent at once and warms nothing ahead', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs, { pool: { size: 0, pauseAfterMs: 30_000 } });
    expect(queue.prewarm('a')).toBe(false);
    queue.enqueueMessages('a');
    const a = liveContainer();
    queue.attach('a', a.live);
    queue.markIdle('a');
    expect(a.calls.close).toBe(1);
    expect(queue.activeCount).toBe(0); // its slot is free at once, not when docker is done with it
    runs.finish('a');
    await settle();
  });

  it('a group-context task goes into the live chat container as a turn: at once when it waits, after its answer when busy; it is never closed for it', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs);
    const turns: string[] = [];
    const ownContainer: string[] = [];
    queue.enqueueMessages('a');
    const { live, calls } = liveContainer();
    queue.attach('a', live);
    queue.markIdle('a');
    queue.enqueueTask(
      'a',
      't1',
      async () => void ownContainer.push('t1'),
      () => turns.push('t1'),
    );
    expect(turns).toEqual(['t1']);
    // Busy with t1 now: t2 waits for the answer, then is the next turn.
    queue.enqueueTask(
      'a',
      't2',
      async () => void ownContainer.push('t2'),
      () => turns.push('t2'),
    );
    expect(turns).toEqual(['t1']);
    queue.markIdle('a');
    expect(turns).toEqual(['t1', 't2']);
    expect(calls.close).toBe(0);
    expect(ownContainer).toEqual([]);
    runs.finish('a');
  });

  it('a task waiting for a live container that then exits runs in its own container', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs);
    const ran: string[] = [];
    queue.enqueueMessages('a');
    queue.attach('a', liveContainer().live); // busy: never marked idle
    queue.enqueueTask(
      'a',
      't1',
      async () => void ran.push('own container'),
      () => ran.push('turn'),
    );
    runs.finish('a');
    await waitFor(() => ran.length === 1, 60_000, 'task ran');
    expect(ran).toEqual(['own container']);
  });

  it('prewarm starts a group’s container only into a free slot nobody waits for, and only when it has none', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs, { maxConcurrent: 2 });
    expect(queue.prewarm('a')).toBe(true);
    expect(queue.prewarm('a')).toBe(false); // already running
    expect(runs.started).toEqual(['a']);
    expect(runs.warmStarts).toEqual(['a']);
    queue.enqueueMessages('b');
    expect(queue.prewarm('c')).toBe(false); // the last slot is b's
    queue.enqueueMessages('c'); // waits
    expect(queue.prewarm('d')).toBe(false); // someone waits: warming would jump the line
    expect(runs.started).toEqual(['a', 'b']);
    runs.finish('a');
    await waitFor(() => runs.started.length === 3, 60_000, 'c gets the slot');
    expect(runs.started).toEqual(['a', 'b', 'c']);
    runs.finish('b');
    runs.finish('c');
  });

  it('runs a scheduled task after the group finishes, closing an idle chat container for it', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs);
    const taskRuns: string[] = [];
    queue.enqueueMessages('a');
    const { live, calls } = liveContainer();
    queue.attach('a', live);
    queue.markIdle('a');
    queue.enqueueTask('a', 't1', async () => {
      taskRuns.push('t1');
    });
    queue.enqueueTask('a', 't1', async () => {
      taskRuns.push('t1 again');
    });
    expect(calls.close).toBe(1);
    expect(taskRuns).toEqual([]);
    runs.finish('a');
    await waitFor(() => taskRuns.length === 1, 60_000, 'task ran');
    expect(taskRuns).toEqual(['t1']);
  });

  it('a container stopped while docker still starts it is stopped the moment it is up; the next run starts clean', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs);
    queue.enqueueMessages('a');
    await queue.kill('a'); // no container to stop yet
    const first = liveContainer();
    queue.attach('a', first.live);
    expect(first.calls.kill).toBe(1);
    runs.finish('a');
    await settle();
    queue.enqueueMessages('a');
    await waitFor(() => runs.started.length === 2, 60_000, 'the next run');
    const second = liveContainer();
    queue.attach('a', second.live);
    expect(second.calls.kill).toBe(0);
    runs.finish('a');
  });

  it('a container that comes up during shutdown is asked to close at once', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs);
    queue.enqueueMessages('a');
    const stopped = queue.shutdown(2000);
    const { live, calls } = liveContainer();
    queue.attach('a', live);
    expect(calls.close).toBe(1);
    runs.finish('a');
    await stopped;
    expect(calls.kill).toBe(0);
  });

  it('shutdown ends when the last run does, within the grace period, and kills nothing', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs);
    queue.enqueueMessages('a');
    const { live, calls } = liveContainer();
    queue.attach('a', live);
    let stopped = false;
    const stopping = queue.shutdown(60_000).then(() => {
      stopped = true;
    });
    await settle();
    expect(stopped).toBe(false); // the run has not ended: shutdown waits for it
    runs.finish('a');
    await stopping;
    expect(calls).toMatchObject({ close: 1, kill: 0 });
  });

  it('shutdown closes live containers, then kills what did not exit in the grace period', async () => {
    const runs = controlledRuns();
    const queue = queueWith(runs);
    queue.enqueueMessages('a');
    const { live, calls } = liveContainer();
    queue.attach('a', {
      ...live,
      kill: async () => {
        calls.kill++;
        runs.finish('a');
      },
    });
    await queue.shutdown(100);
    expect(calls.close).toBe(1);
    expect(calls.kill).toBe(1);
    expect(queue.activeCount).toBe(0);
    queue.enqueueMessages('b');
    expect(runs.started).toEqual(['a']); // nothing new after shutdown
  });
});
