/**
 * Exactly once, in process: the host over a real SQLite file and the fake docker, with
 * what a crash leaves behind laid out by hand (a claimed IPC file, a task claim, unsent
 * outbox parts) or produced by stopping one host and starting another on the same store.
 * The crash drills (drills/) do the same with kill -9 against the real image.
 */
import { Database } from 'bun:sqlite';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  GIVE_UP_TEXT,
  addGroup,
  setupLogging,
  Store,
  type ChannelHandlers,
  type Config,
  type HostOptions,
} from '../nanoclaw.ts';
import {
  fakeDocker,
  RecordingChannel,
  startWorld,
  shutDown as stop,
  taskRow,
  tempProject,
  texts,
  waitFor,
  type FakeDocker,
  type World as HostWorld,
} from './helpers.ts';

const SECRET = 'sk-once-test-abcdefghijklmnop';
const MAIN = 'me@s.whatsapp.net';
const FAMILY = 'family@g.us';

/** A channel that can be down: it then refuses to deliver, and says so when it is back. */
class GatedChannel extends RecordingChannel {
  constructor(jids: string[], up = true) {
    super(jids);
    this.ready = up;
  }
  setUp(up: boolean): void {
    this.ready = up;
    if (up) (this.handlers as ChannelHandlers | null)?.onReady?.();
  }
  override async deliver(jid: string, text: string, messageId: string): Promise<void> {
    if (!this.ready) throw new Error('channel down');
    await super.deliver(jid, text, messageId);
  }
}

type World = HostWorld<GatedChannel> & { docker: FakeDocker };

function project(env: Record<string, string> = {}) {
  const docker = fakeDocker();
  const config = tempProject({ CONTAINER_RUNTIME: docker.path, ...env }, `KIMI_API_KEY=${SECRET}\n`);
  setupLogging(config, { terminalLevel: 'silent', secrets: [SECRET] });
  const store = new Store(config.dbPath);
  addGroup(config, store, { jid: MAIN, name: 'Me', folder: 'main', isMain: true });
  addGroup(config, store, { jid: FAMILY, name: 'Family', folder: 'family' });
  store.close();
  return { docker, config };
}

async function start(p: { docker: FakeDocker; config: Config }, options: HostOptions = {}, up = true): Promise<World> {
  const w = await startWorld({
    config: p.config,
    channel: new GatedChannel([MAIN, FAMILY], up),
    secrets: [SECRET],
    options: { retryBaseMs: 20, sendRetryMs: 50, ...options },
  });
  return { ...w, docker: p.docker };
}

describe('replies', () => {
  it('are recorded with the cursor before any send: a channel that is down gets them later, once', async () => {
    const w = await start(project(), {}, false);
    w.channel.receive(MAIN, 'hello');
    await waitFor(() => w.store.unsent('recording').length === 1, 60_000, 'reply recorded');
    const seq = w.store.latestSeq(MAIN);
    expect(w.store.getCursor(MAIN)).toBeGreaterThan(0); // answered: no run will make this reply again
    expect(texts(w)).toEqual([]);
    w.channel.setUp(true);
    await waitFor(() => texts(w).length === 1, 60_000, 'delivered');
    await w.host.settleOutbox();
    expect(texts(w)).toEqual(['Andy: echo: hello']);
    expect(w.store.unsent('recording').length).toBe(0);
    expect(w.docker.runs()).toHaveLength(1);
    // The bot's message in the history is stored under the id it was sent with.
    const bot = w.store.db
      .query<{ id: string }, [string]>('SELECT id FROM messages WHERE chat_jid = ? AND is_bot_message = 1')
      .all(MAIN);
    expect(bot.map((m) => m.id)).toEqual([w.channel.sent[0]!.messageId]);
    expect(seq).toBeGreaterThan(0);
  });

  it('a reply recorded but not sent when the host stopped goes out after the restart, under the same id, with no new run', async () => {
    const p = project();
    const first = await start(p, {}, false);
    first.channel.receive(MAIN, 'before the stop');
    await waitFor(() => first.store.unsent('recording').length === 1, 60_000, 'reply recorded');
    const messageId = first.store.unsentHeads('recording')[0]!.messageId;
    await stop(first);
    const second = await start(p);
    await waitFor(() => texts(second).length === 1, 60_000, 'delivered after restart');
    await second.host.settleOutbox();
    expect(second.channel.sent).toEqual([{ jid: MAIN, text: 'Andy: echo: before the stop', messageId }]);
    expect(second.docker.runs()).toHaveLength(1); // the first host's run only
  });

  it('a database that cannot take the answer ends the run without sending; the retry answers once', async () => {
    const w = await start(project(), { maxRetries: 5 });
    const locker = new Database(w.config.dbPath);
    w.channel.receive(MAIN, '!sleep 300');
    await waitFor(() => w.docker.runs().length === 1, 60_000, 'run started');
    locker.exec('PRAGMA busy_timeout = 0; BEGIN EXCLUSIVE'); // held while the answer arrives
    await Bun.sleep(1500);
    locker.exec('ROLLBACK');
    locker.close();
    await waitFor(() => texts(w).length === 1, 60_000, 'answer after the retry');
    await Bun.sleep(300);
    expect(texts(w)).toEqual(['Andy: slept 300']);
    expect(w.docker.runs().length).toBeGreaterThanOrEqual(2);
  });
});

describe('IPC requests', () => {
  it('one claimed before a crash is handled at the next start; one already done before it is not done again', async () => {
    const p = project();
    const claimed = join(p.config.ipcDir, 'claimed');
    mkdirSync(claimed, { recursive: true });
    // A claim is a folder holding the request under its own name.
    const undone = 'family.messages.0c1a1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3/1-a.json';
    const done = 'family.messages.9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a/2-b.json';
    for (const claim of [undone, done]) mkdirSync(join(claimed, dirname(claim)));
    writeFileSync(
      join(claimed, undone),
      JSON.stringify({ type: 'message', chatJid: FAMILY, text: 'claimed, not handled' }),
    );
    writeFileSync(
      join(claimed, done),
      JSON.stringify({ type: 'message', chatJid: FAMILY, text: 'handled before the crash' }),
    );
    const store = new Store(p.config.dbPath);
    store.markIpcDone('9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a');
    store.close();
    const w = await start(p);
    await waitFor(() => texts(w, FAMILY).length === 1, 60_000, 'the undone request');
    await w.host.ipc.scan();
    await w.host.settleOutbox();
    expect(texts(w, FAMILY)).toEqual(['Andy: claimed, not handled']);
    expect(readdirSync(claimed)).toEqual([]);
  });
});

describe('task runs', () => {
  const task = (id: string, scheduleType: 'once' | 'interval', prompt: string) =>
    taskRow({
      id,
      groupFolder: 'family',
      chatJid: FAMILY,
      prompt,
      scheduleType,
      scheduleValue: scheduleType === 'once' ? '2030-01-01 09:00' : '3600000',
      nextRun: scheduleType === 'once' ? null : new Date(Date.now() + 3_600_000).toISOString(),
      createdAt: new Date().toISOString(),
    });

  it('a run interrupted by a crash is logged and run once more; a once task then completes', async () => {
    const p = project();
    const store = new Store(p.config.dbPath);
    store.createTask(task('once-1', 'once', 'remind me'));
    store.createTask(task('every-1', 'interval', 'check the build'));
    for (const id of ['once-1', 'every-1']) {
      store.claimTask(id, '2026-01-01T09:00:00.000Z'); // as the scheduler does when the task is due
      store.markTaskStarted(id); // and as the run does when its container starts
    }
    store.close();
    const w = await start(p);
    await waitFor(() => texts(w, FAMILY).length === 2, 60_000, 'both re-run');
    await w.host.settleOutbox();
    expect(texts(w, FAMILY).sort()).toEqual(['Andy: echo: check the build', 'Andy: echo: remind me']);
    for (const id of ['once-1', 'every-1']) {
      const runs = w.store.taskRuns(id);
      expect(runs.map((r) => r.status).sort()).toEqual(['error', 'success']);
      expect(runs.find((r) => r.status === 'error')!.error).toContain('interrupted');
    }
    expect(w.store.getTask('once-1')).toMatchObject({ status: 'completed', nextRun: null });
    expect(w.store.getTask('every-1')!.status).toBe('active');
    expect(w.store.taskClaims()).toEqual([]);
    expect(w.docker.runs()).toHaveLength(2);
  });

  it('one that was due but had not started (it waited in the queue) simply runs, with nothing counted against it', async () => {
    const p = project();
    const store = new Store(p.config.dbPath);
    store.createTask(task('once-3', 'once', 'was waiting'));
    store.claimTask('once-3', '2026-01-01T09:00:00.000Z');
    store.close();
    const w = await start(p);
    await waitFor(() => texts(w, FAMILY).length === 1, 60_000, 'ran');
    expect(texts(w, FAMILY)).toEqual(['Andy: echo: was waiting']);
    expect(w.store.taskRuns('once-3').map((r) => r.status)).toEqual(['success']);
  });

  it('one interrupted twice is given up, never left stranded', async () => {
    const p = project();
    const store = new Store(p.config.dbPath);
    store.createTask(task('once-2', 'once', 'twice unlucky'));
    store.claimTask('once-2', null, 2); // its second attempt was interrupted too
    store.markTaskStarted('once-2');
    store.close();
    const w = await start(p);
    await waitFor(() => w.store.taskClaims().length === 0, 60_000, 'claim resolved');
    expect(w.store.getTask('once-2')).toMatchObject({ status: 'completed', nextRun: null });
    expect(w.store.getTask('once-2')!.lastResult).toContain('not run again');
    expect(w.docker.runs()).toHaveLength(0);
    // The chat it was for hears of it.
    await waitFor(() => texts(w, FAMILY).length === 1, 60_000, 'the notice');
    expect(texts(w, FAMILY)[0]).toMatch(
      /^Andy: A scheduled task \("twice unlucky"\) was interrupted twice .* It will not run again\.$/,
    );
  });
});

describe('poison messages', () => {
  it('after the last retry the chat is told once, the messages count as answered, and the next message starts fresh', async () => {
    const w = await start(project(), { maxRetries: 2, retryBaseMs: 20 });
    w.channel.receive(MAIN, '!fail always broken');
    await waitFor(() => texts(w).length === 1, 60_000, 'the notice');
    expect(texts(w)).toEqual([`Andy: ${GIVE_UP_TEXT}`]);
    expect(w.docker.runs()).toHaveLength(3); // the first try and two retries, then no more
    await w.host.recover(); // the sweep finds nothing left to retry
    await Bun.sleep(200);
    expect(w.docker.runs()).toHaveLength(3);
    w.channel.receive(MAIN, 'fresh start');
    await waitFor(() => texts(w).length === 2, 60_000, 'the next answer');
    expect(texts(w)[1]).toBe('Andy: echo: fresh start');
    expect(JSON.parse(w.docker.runs()[3]!.stdin!).prompt).not.toContain('always broken');
  });
});

describe('a refused key', () => {
  it('is told to the chat once, in one line naming the fix, and never retried', async () => {
    const w = await start(project(), { maxRetries: 5, retryBaseMs: 20 });
    w.channel.receive(MAIN, '!refused');
    await waitFor(() => texts(w).length === 1, 60_000, 'the notice');
    await Bun.sleep(300);
    expect(texts(w)).toEqual([
      expect.stringMatching(
        /^Andy: I cannot answer: http\S+ refused the Kimi key \(401\)\. Check KIMI_API_KEY in \.env; .*KIMI_PLATFORM=kimi-code\.$/,
      ),
    ]);
    expect(w.docker.runs()).toHaveLength(1); // not five retries of the same refusal
    w.channel.receive(MAIN, '!refused');
    await waitFor(() => w.docker.runs().length === 2, 60_000, 'the next message tried');
    await Bun.sleep(300);
    expect(texts(w)).toHaveLength(1); // told once
    expect(w.store.messagesSince(MAIN, w.store.getCursor(MAIN))).toEqual([]);
  });
});

describe('faults', () => {
  it('a locked database spills inbound messages and stores them, in order, once it is free; none lost, none twice', async () => {
    const w = await start(project());
    const locker = new Database(w.config.dbPath);
    locker.exec('PRAGMA busy_timeout = 0; BEGIN EXCLUSIVE');
    for (const text of ['one', 'two', 'three']) w.channel.receive(MAIN, text);
    const spill = join(w.config.dataDir, 'spill.jsonl');
    expect(
      readFileSync(spill, 'utf8')
        .trim()
        .split('\n')
        .map((line) => JSON.parse(line).message.content),
    ).toEqual(['one', 'two', 'three']);
    await Bun.sleep(1200);
    locker.exec('ROLLBACK');
    locker.close();
    // However the three are batched into turns, the last answer is to the last message.
    await waitFor(() => texts(w).at(-1) === 'Andy: echo: three', 60_000, 'answered after the lock');
    expect(new Set(texts(w)).size).toBe(texts(w).length); // none said twice
    const stored = w.store.db
      .query<{ content: string }, [string]>(
        'SELECT content FROM messages WHERE chat_jid = ? AND is_bot_message = 0 ORDER BY seq',
      )
      .all(MAIN);
    expect(stored.map((m) => m.content)).toEqual(['one', 'two', 'three']);
    expect(JSON.parse(w.docker.runs()[0]!.stdin!).prompt).toContain('>one<');
    expect(existsSync(spill)).toBe(false);
  });

  it('messages spilled by a host that stopped before the database came back are stored at the next start', async () => {
    const p = project();
    mkdirSync(p.config.dataDir, { recursive: true });
    const message = {
      id: 'SPILLED1',
      chatJid: MAIN,
      sender: 'me',
      senderName: 'Me',
      content: 'kept in the spill file',
      timestamp: new Date().toISOString(),
      isFromMe: true,
      isBotMessage: false,
    };
    writeFileSync(join(p.config.dataDir, 'spill.jsonl'), `${JSON.stringify({ message, chat: { isGroup: false } })}\n`);
    const w = await start(p);
    await waitFor(() => texts(w).length === 1, 60_000, 'answered');
    expect(texts(w)).toEqual(['Andy: echo: kept in the spill file']);
  });

  it('an unwritable log file never stops the host: its lines go to stderr, said once', async () => {
    const p = project();
    rmSync(join(p.config.logsDir, 'nanoclaw.log'), { force: true });
    mkdirSync(join(p.config.logsDir, 'nanoclaw.log')); // a folder where the file should be: unwritable, even for root
    const written: string[] = [];
    const original = process.stderr.write.bind(process.stderr);
    process.stderr.write = ((chunk: string | Uint8Array) => {
      written.push(String(chunk));
      return true;
    }) as typeof process.stderr.write;
    try {
      setupLogging(p.config, { terminalLevel: 'silent' });
      const w = await start(p);
      w.channel.receive(MAIN, 'still answering?');
      await waitFor(() => texts(w).length === 1, 60_000, 'answered');
      expect(written.filter((line) => line.includes('cannot write') && line.includes('nanoclaw.log'))).toHaveLength(1);
      expect(written.some((line) => line.includes('Starting agent container'))).toBe(true);
    } finally {
      process.stderr.write = original;
    }
  });
});
