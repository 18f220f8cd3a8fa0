import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import {
  addGroup,
  GROUPS_SYNCED_AT,
  splitForWhatsApp,
  Store,
  TASK_WARM_LEAD_MS,
  type Config,
  type HostOptions,
} from '../nanoclaw.ts';
import {
  FakeClock,
  fakeDocker,
  RecordingChannel,
  shutDown,
  startWorld,
  taskRow,
  tempProject,
  texts,
  waitFor,
  type FakeDocker,
  type World as HostWorld,
  writeJsonAtomic,
  MAIN,
  FAMILY,
  WORK,
  THREE_GROUPS,
} from './helpers.ts';

const REPO = fileURLToPath(new URL('..', import.meta.url));

const SECRET = 'sk-host-test-abcdefghijklmnop';

type World = HostWorld & { docker: FakeDocker };

async function world(
  env: Record<string, string> = {},
  options: HostOptions = {},
  reuse?: { docker: FakeDocker; config: Config },
): Promise<World> {
  const docker = reuse?.docker ?? fakeDocker();
  const w = await startWorld({
    config: reuse?.config ?? tempProject({ CONTAINER_RUNTIME: docker.path, ...env }, `KIMI_API_KEY=${SECRET}\n`),
    channel: new RecordingChannel([MAIN, FAMILY, WORK, 'stranger@g.us']),
    groups: reuse ? [] : THREE_GROUPS,
    secrets: [SECRET],
    options,
  });
  return { ...w, docker };
}

const stdinOf = (w: World, i: number) =>
  JSON.parse(w.docker.runs()[i]!.stdin!) as { prompt: string; sessionId?: string; chatJid: string };

describe('timers the host keeps, on a clock the test moves', () => {
  it('the recovery sweep finds a message that came in without an event, exactly every recoverySweepMs', async () => {
    const clock = new FakeClock();
    const w = await world({}, { clock, recoverySweepMs: 60_000 });
    // start() does not wait for its own sweep, which yields once per group (disk check): a message stored meanwhile
    // was found by it once in CI. One more sweep, awaited, ends after that one (same steps, queued behind it).
    await w.host.recover();
    // Stored behind the host's back (as by a crash between storing and queueing): only the sweep can see it.
    w.store.storeMessage({
      id: 'quiet-1',
      chatJid: MAIN,
      sender: 'u',
      senderName: 'U',
      content: 'anyone?',
      timestamp: new Date().toISOString(),
      isFromMe: true,
      isBotMessage: false,
    });
    await clock.advance(59_999);
    expect(w.docker.runs()).toHaveLength(0);
    await clock.advance(1);
    await waitFor(() => texts(w).length === 1, 60_000, 'answered after the sweep');
    expect(texts(w)).toEqual(['Andy: echo: anyone?']);
  });
});

describe('the recovery sweep', () => {
  const chatter = (w: World, id: string, content: string) =>
    w.store.storeMessage({
      id,
      chatJid: FAMILY,
      sender: '4915100000001@s.whatsapp.net',
      senderName: 'Uncle',
      content,
      timestamp: new Date().toISOString(),
      isFromMe: false,
      isBotMessage: false,
    });

  it('reads a group’s unanswered messages again only past what it already found quiet, under the same wake rule', async () => {
    const w = await world();
    // Stored behind the host's back, as by a crash between storing and queueing: only the sweep sees them.
    for (let i = 0; i < 3; i++) chatter(w, `quiet-${i}`, `just chatting ${i}`);
    await w.host.recover();
    await w.host.recover();
    expect(w.docker.runs()).toHaveLength(0); // no trigger: nothing for the agent
    chatter(w, 'called', '@Andy what time is it?');
    await w.host.recover();
    await waitFor(() => texts(w, FAMILY).length === 1, 60_000, 'the triggered answer');
    expect(texts(w, FAMILY)[0]).toBe('Andy: echo: what time is it?');
    expect(JSON.parse(w.docker.runs()[0]!.stdin!).prompt).toContain('just chatting 0'); // the chatter came with it
  });

  it('a group whose wake rule changed has its quiet messages judged again', async () => {
    const w = await world();
    chatter(w, 'quiet', 'just chatting');
    await w.host.recover();
    expect(w.docker.runs()).toHaveLength(0);
    w.store.db.query('UPDATE registered_groups SET requires_trigger = 0 WHERE jid = ?').run(FAMILY); // as `groups` would
    await w.host.recover();
    await waitFor(() => texts(w, FAMILY).length === 1, 60_000, 'the answer without a trigger');
    expect(texts(w, FAMILY)[0]).toBe('Andy: echo: just chatting');
  });
});

describe('warm when it matters', () => {
  it('typing in a registered chat starts its container with no prompt; the message then goes into it as a follow-up', async () => {
    const w = await world();
    w.channel.typing(MAIN);
    await waitFor(() => w.docker.calls().some((c) => c.command === 'warm-start'), 60_000, 'warm start');
    expect(stdinOf(w, 0)).toMatchObject({ prompt: '', warm: true, chatJid: MAIN });
    expect(w.channel.sent).toEqual([]);
    w.channel.receive(MAIN, 'hello');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    expect(texts(w)).toEqual(['Andy: echo: hello']);
    expect(w.docker.runs()).toHaveLength(1);
    expect(
      w.docker
        .calls()
        .filter((c) => c.command === 'follow-up')
        .map((c) => c.text),
    ).toHaveLength(1);
    // The cursor moved with the answer: a restart would not answer it again.
    expect(w.store.messagesSince(MAIN, w.store.getCursor(MAIN))).toEqual([]);
  });

  it('a message that arrives while the warm container is still being started goes into it once it is up, not after IDLE_TIMEOUT', async () => {
    const clock = new FakeClock(); // IDLE_TIMEOUT never passes unless the test moves it
    const w = await world({}, { clock });
    w.channel.typing(MAIN);
    w.channel.receive(MAIN, 'pasted at once'); // same tick: no container to hand it to yet
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    expect(texts(w)).toEqual(['Andy: echo: pasted at once']);
    expect(w.docker.runs()).toHaveLength(1);
  });

  it('typing starts nothing in an unregistered chat; in a chat whose agent waits paused it thaws that agent, no second container', async () => {
    const w = await world({ WARM_PAUSE_AFTER: '50' });
    expect(w.host.prewarm('stranger@g.us')).toBe(false);
    w.channel.receive(MAIN, 'hello');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    const did = (verb: string) => w.docker.calls().some((c) => c.command === verb);
    await waitFor(() => did('pause'), 60_000, 'paused');
    expect(w.host.prewarm(MAIN)).toBe(true);
    await waitFor(() => did('unpause'), 60_000, 'thawed by typing');
    expect(w.docker.runs()).toHaveLength(1);
  });

  it('a warm container no message comes to waits in the pool: paused after WARM_PAUSE_AFTER, closed after IDLE_TIMEOUT, on a clock the test moves', async () => {
    const clock = new FakeClock();
    const w = await world({ WARM_PAUSE_AFTER: '1000', IDLE_TIMEOUT: '5000' }, { clock });
    expect(w.host.prewarm(MAIN)).toBe(true);
    await waitFor(() => w.docker.calls().some((c) => c.command === 'warm-start'), 60_000, 'warm start');
    const did = (verb: string) => w.docker.calls().some((c) => c.command === verb);
    await clock.advance(1_000); // (exactly when: test/queue.test.ts)
    await waitFor(() => did('pause'), 60_000, 'paused');
    await clock.advance(3_999);
    expect(did('closed')).toBe(false);
    await clock.advance(1);
    await waitFor(() => w.docker.calls().some((c) => c.command === 'closed'), 60_000, 'closed');
    expect(w.channel.sent).toEqual([]);
  });

  it('a task in a chat’s context due soon readies the chat’s agent TASK_WARM_LEAD_MS ahead; at its time it is a turn of that agent', async () => {
    const clock = new FakeClock();
    const w = await world({}, { clock });
    const due = clock.now() + TASK_WARM_LEAD_MS + 5_000;
    w.store.createTask(
      taskRow({
        id: 'plants',
        groupFolder: 'family',
        chatJid: FAMILY,
        prompt: 'water the plants',
        contextMode: 'group',
        scheduleValue: '3600000',
        nextRun: new Date(due).toISOString(),
        createdAt: new Date().toISOString(),
      }),
    );
    w.host.scheduler.arm();
    await clock.advance(4_000);
    expect(w.docker.runs()).toHaveLength(0);
    await clock.advance(1_000);
    await waitFor(() => w.docker.calls().some((c) => c.command === 'warm-start'), 60_000, 'readied ahead');
    expect(JSON.parse(w.docker.runs()[0]!.stdin!).chatJid).toBe(FAMILY);
    await clock.advance(TASK_WARM_LEAD_MS);
    await waitFor(() => texts(w).length === 1, 60_000, 'the task’s answer');
    expect(texts(w)).toEqual(['Andy: echo: water the plants']);
    expect(w.docker.calls().filter((c) => c.command === 'task-turn')).toHaveLength(1);
    expect(w.docker.runs()).toHaveLength(1);
  });

  it('a warm start holds its slot until its agent says ready: at MAX_CONCURRENT_CONTAINERS=1 a second group warms only then', async () => {
    const w = await world({ MAX_CONCURRENT_CONTAINERS: '1', WARM_POOL_SIZE: '2' });
    const typist = '4915100000009@s.whatsapp.net';
    w.store.db.query('UPDATE registered_groups SET requires_trigger = 0 WHERE jid = ?').run(WORK);
    w.docker.set('hold-ready'); // the CLI inside is still starting
    expect(w.host.prewarm(MAIN)).toBe(true);
    await waitFor(() => w.docker.runs().length === 1, 60_000, 'the first container started');
    await Bun.sleep(200);
    expect(w.host.prewarm(WORK, typist)).toBe(false); // the one slot is still main's
    expect(w.docker.runs()).toHaveLength(1);
    w.docker.set('hold-ready', false);
    await waitFor(() => w.host.prewarm(WORK, typist), 60_000, 'the slot freed by the ready line');
    await waitFor(() => w.docker.runs().length === 2, 60_000, 'the second container started');
    expect(w.docker.runs().map((run) => JSON.parse(run.stdin!).chatJid)).toEqual([MAIN, WORK]);
  });

  it('typing warms main and a group only where the typist drives the agent: named by its allow list, or anyone without a trigger', async () => {
    const w = await world();
    const ALICE = '4915100000002@s.whatsapp.net';
    const CLUB = 'stranger@g.us'; // a chat the channel has: registered now, with an allowlist
    addGroup(w.config, w.store, { jid: CLUB, name: 'Club', folder: 'club', allow: [ALICE] });
    w.store.db.query('UPDATE registered_groups SET requires_trigger = 0 WHERE jid = ?').run(WORK);
    expect(w.host.prewarm(FAMILY, ALICE)).toBe(false); // a trigger and no list: typing says nothing of the trigger
    expect(w.host.prewarm(CLUB, '4915100000009@s.whatsapp.net')).toBe(false);
    expect(w.host.prewarm(CLUB)).toBe(false); // who types is not known
    expect(w.docker.runs()).toHaveLength(0);
    expect(w.host.prewarm(CLUB, ALICE)).toBe(true);
    expect(w.host.prewarm(WORK, '4915100000009@s.whatsapp.net')).toBe(true); // (main is warmed in the test above)
  });

  it('in a group that needs the trigger, a warm container takes only a message that has it', async () => {
    const w = await world();
    const ALICE = { sender: '4915100000002@s.whatsapp.net' };
    const CLUB = 'stranger@g.us'; // a chat the channel has: registered now, with an allowlist
    addGroup(w.config, w.store, { jid: CLUB, name: 'Club', folder: 'club', allow: [ALICE.sender] });
    w.channel.typing(CLUB, ALICE.sender);
    await waitFor(() => w.docker.calls().some((c) => c.command === 'warm-start'), 60_000, 'warm start');
    w.channel.receive(CLUB, 'just chatting', ALICE);
    await Bun.sleep(100);
    expect(w.docker.calls().some((c) => c.command === 'follow-up')).toBe(false);
    w.channel.receive(CLUB, '@Andy now you', ALICE);
    await waitFor(() => texts(w, CLUB).length === 1, 60_000, 'reply');
    const handed = w.docker
      .calls()
      .filter((c) => c.command === 'follow-up')
      .map((c) => String(c.text));
    expect(handed).toHaveLength(1);
    expect(handed[0]).toContain('just chatting'); // the context since the last answer comes with it
    expect(texts(w, CLUB)).toEqual(['Andy: echo: now you']);
  });
});

describe('routing into a live container', () => {
  it('checks only the message that arrived: messages without the trigger cost no re-read of the pending ones', async () => {
    const w = await world();
    w.channel.receive(FAMILY, '@Andy first');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    const reads: number[] = [];
    const original = w.store.messagesSince.bind(w.store);
    w.store.messagesSince = (jid, after, limit) => {
      const rows = original(jid, after, limit);
      reads.push(rows.length);
      return rows;
    };
    for (let i = 0; i < 50; i++) w.channel.receive(FAMILY, `chatter ${i}`);
    expect(reads).toEqual([]);
    w.channel.receive(FAMILY, '@Andy sum it up');
    expect(reads).toEqual([51]); // once, for the batch handed over
    await waitFor(() => texts(w).length === 2, 60_000, 'second reply');
  });
});

describe('routing', () => {
  it('answers the main group without a trigger, prefixed with the assistant name', async () => {
    const w = await world();
    w.channel.receive(MAIN, 'hello');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    expect(texts(w)).toEqual(['Andy: echo: hello']);
    expect(stdinOf(w, 0).chatJid).toBe(MAIN);
  });

  it('sends no prefix when the assistant has its own number', async () => {
    const w = await world({ ASSISTANT_HAS_OWN_NUMBER: 'true' });
    w.channel.receive(MAIN, 'hello');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    expect(texts(w)).toEqual(['echo: hello']);
  });

  it('waits for the trigger in other groups, then hands over everything since the last answer', async () => {
    const w = await world();
    w.channel.receive(FAMILY, 'are we meeting on sunday?', { senderName: 'Bob' });
    w.channel.receive(FAMILY, 'I think so');
    await Bun.sleep(300);
    expect(w.docker.runs()).toHaveLength(0);
    w.channel.receive(FAMILY, '@andy what time works?');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    const prompt = stdinOf(w, 0).prompt;
    expect(prompt).toContain('sender="Bob"');
    expect(prompt).toContain('are we meeting on sunday?');
    expect(prompt).toContain('I think so');
    expect(texts(w, FAMILY)).toEqual(['Andy: echo: what time works?']);
  });

  it('keeps <internal> text private and sends nothing for a silent answer', async () => {
    const w = await world();
    w.channel.receive(MAIN, '!internal');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    expect(texts(w)).toEqual(['Andy: visible']);
    w.channel.receive(MAIN, '!silent');
    await waitFor(() => w.docker.calls().some((c) => c.command === 'follow-up'), 60_000, 'follow-up');
    await Bun.sleep(200);
    expect(texts(w)).toEqual(['Andy: visible']);
  });

  it('stores only metadata for unregistered chats and never runs for them', async () => {
    const w = await world();
    w.channel.receive('stranger@g.us', '@Andy hi');
    await Bun.sleep(200);
    expect(w.docker.runs()).toHaveLength(0);
    expect(w.store.listChats().map((c) => c.jid)).toContain('stranger@g.us');
    expect(w.store.db.query("SELECT COUNT(*) AS n FROM messages WHERE chat_jid = 'stranger@g.us'").get()).toEqual({
      n: 0,
    });
  });

  it('never triggers on the bot’s own messages (the channel knows them by id, not by a name prefix), and ignores a message delivered twice', async () => {
    const w = await world();
    w.channel.receive(MAIN, 'Andy: an earlier reply of mine', { isFromMe: true, isBotMessage: true });
    w.channel.receive(MAIN, 'flagged by the channel', { isBotMessage: true });
    await Bun.sleep(300);
    expect(w.docker.runs()).toHaveLength(0);
    const msg = w.channel.receive(FAMILY, '@Andy once');
    w.channel.handlers!.onMessage(msg, { name: 'Family', isGroup: true });
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    await Bun.sleep(200);
    expect(w.docker.runs()).toHaveLength(1);
    expect(stdinOf(w, 0).prompt.match(/<message /g)).toHaveLength(1);
  });
});

describe('containers per group', () => {
  it('hands new messages to the live container instead of starting another', async () => {
    const w = await world();
    w.channel.receive(MAIN, 'first');
    await waitFor(() => texts(w).length === 1, 60_000, 'first reply');
    w.channel.receive(MAIN, 'second');
    await waitFor(() => texts(w).length === 2, 60_000, 'second reply');
    expect(texts(w)).toEqual(['Andy: echo: first', 'Andy: echo: second']);
    expect(w.docker.runs()).toHaveLength(1);
  });

  it('closes an idle container after IDLE_TIMEOUT; the next message starts a new one resuming the session', async () => {
    const w = await world({ IDLE_TIMEOUT: '200' });
    w.channel.receive(MAIN, 'first');
    await waitFor(() => w.docker.calls().some((c) => c.command === 'closed'), 60_000, 'idle close');
    const session = w.store.getSession('main');
    expect(session).toMatch(/^fake-session-/);
    w.channel.receive(MAIN, 'again');
    await waitFor(() => texts(w).length === 2, 60_000, 'second reply');
    expect(w.docker.runs()).toHaveLength(2);
    expect(stdinOf(w, 1).sessionId).toBe(session);
    const log = readFileSync(join(w.config.logsDir, 'nanoclaw.log'), 'utf8');
    expect(log).toContain(`Session initialized: ${session}`);
  });

  it('respects MAX_CONCURRENT_CONTAINERS and still answers every group', async () => {
    const w = await world({ MAX_CONCURRENT_CONTAINERS: '1' });
    const runsAtEachTurn: number[] = [];
    w.host.onTurn = () => runsAtEachTurn.push(w.docker.runs().length);
    w.channel.receive(FAMILY, '@Andy one');
    w.channel.receive(WORK, '@Andy two');
    await waitFor(() => texts(w).length === 2, 60_000, 'both replies');
    // The second container started only once the first had answered; the first then waited
    // in the warm pool beside it (not closed for it: a ready agent holds no slot).
    expect(runsAtEachTurn).toEqual([1, 2]);
    expect(w.docker.calls().filter((c) => c.command === 'closed')).toEqual([]);
    expect(w.host.queue.poolMembers).toEqual([FAMILY, WORK]);
  });

  it('a ready agent is paused after WARM_PAUSE_AFTER, thawed by the next message, which it answers; the pool keeps WARM_POOL_SIZE agents', async () => {
    const w = await world({ WARM_PAUSE_AFTER: '50', WARM_POOL_SIZE: '1' });
    w.channel.receive(FAMILY, '@Andy one');
    await waitFor(() => w.docker.calls().some((c) => c.command === 'pause'), 60_000, 'paused');
    w.channel.receive(FAMILY, '@Andy two');
    await waitFor(() => texts(w).length === 2, 60_000, 'the answer from the thawed agent');
    expect(texts(w).at(-1)).toContain('echo: two');
    expect(w.docker.runs()).toHaveLength(1);
    const verbs = w.docker.calls().map((c) => c.command);
    expect(verbs.indexOf('unpause')).toBeGreaterThan(verbs.indexOf('pause'));
    // Another group answered: the pool holds one, so the family chat's agent (waiting longest) is closed.
    w.channel.receive(WORK, '@Andy three');
    await waitFor(() => w.docker.calls().some((c) => c.command === 'closed'), 60_000, 'evicted');
    expect(w.host.queue.poolMembers).toEqual([WORK]);
  });

  it('writes the task and group snapshots before a run', async () => {
    const w = await world();
    w.channel.receive(FAMILY, '@Andy hi');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    const ipc = join(w.config.ipcDir, 'family');
    expect(JSON.parse(readFileSync(join(ipc, 'current_tasks.json'), 'utf8'))).toEqual([]);
    expect(JSON.parse(readFileSync(join(ipc, 'available_groups.json'), 'utf8')).groups).toEqual([]);
  });
});

describe('failures', () => {
  it('retries a failed run with the same messages and sends the answer once', async () => {
    const w = await world();
    w.channel.receive(MAIN, '!failonce provider hiccup');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply after retry');
    expect(w.docker.runs()).toHaveLength(2);
    expect(stdinOf(w, 1).prompt).toBe(stdinOf(w, 0).prompt);
    await Bun.sleep(300);
    expect(texts(w)).toEqual(['Andy: echo: !failonce provider hiccup']);
  });

  it('after a crash mid-conversation, retries only what was not answered and never resends a reply', async () => {
    const w = await world();
    w.channel.receive(MAIN, 'answered');
    await waitFor(() => texts(w).length === 1, 60_000, 'first reply');
    w.channel.receive(MAIN, '!crash');
    await waitFor(() => w.docker.runs().length >= 2, 60_000, 'retry run');
    const retried = stdinOf(w, 1).prompt;
    expect(retried).toContain('!crash');
    expect(retried).not.toContain('answered');
    await Bun.sleep(300);
    expect(texts(w)).toEqual(['Andy: echo: answered']);
  });

  it('a follow-up queued behind a turn is not counted answered when the turn after it dies: it is retried', async () => {
    const w = await world();
    w.channel.receive(MAIN, '!sleep 400');
    await waitFor(() => w.docker.runs().length === 1, 60_000, 'the first run');
    await Bun.sleep(100);
    w.channel.receive(MAIN, '!failonce the next turn dies'); // handed to the live container, queued behind its turn
    await waitFor(() => texts(w).length === 2, 60_000, 'both answers');
    expect(texts(w)).toEqual(['Andy: slept 400', 'Andy: echo: !failonce the next turn dies']);
    expect(w.docker.runs()).toHaveLength(2); // the follow-up went into a new container, not into the void
    expect(stdinOf(w, 1).prompt).toContain('!failonce the next turn dies');
    expect(stdinOf(w, 1).prompt).not.toContain('!sleep 400');
  });

  it('a refused key gives up only what the failed turn covered: a message that came meanwhile gets its own run', async () => {
    const w = await world();
    w.channel.receive(MAIN, '!refused');
    w.channel.receive(MAIN, 'sent after the key was fixed'); // goes into the container, which fails before it
    await waitFor(() => texts(w).length === 2, 60_000, 'the notice and the answer');
    expect(texts(w)[0]).toContain('refused the Kimi key');
    expect(texts(w)[1]).toBe('Andy: echo: sent after the key was fixed');
    expect(w.store.messagesSince(MAIN, w.store.getCursor(MAIN))).toEqual([]);
  });

  it('a container that ends without answering (exit 0, no result) has failed: retried with backoff, then given up and told', async () => {
    const w = await world({}, { maxRetries: 2, retryBaseMs: 50 });
    const turns: { status: string; error?: string }[] = [];
    w.host.onTurn = (t) => turns.push(t);
    w.channel.receive(MAIN, '!exit0');
    await waitFor(() => texts(w).length === 1, 60_000, 'the give-up notice');
    expect(w.docker.runs()).toHaveLength(3); // the run and two retries, not one a second forever
    expect(turns[0]).toMatchObject({ status: 'error', error: 'the agent container ended without an answer' });
    expect(texts(w)[0]).toContain('Sorry, I could not answer that');
    await Bun.sleep(300);
    expect(w.docker.runs()).toHaveLength(3);
  });

  it('its database deleted or replaced under it, the host stops and says so, instead of writing to a file nobody reads', async () => {
    let fatal = '';
    const w = await world({}, { onFatal: (message) => (fatal = message) });
    rmSync(w.config.dbPath);
    writeFileSync(w.config.dbPath, '');
    w.host.recover();
    await waitFor(() => fatal !== '', 60_000, 'the fatal notice');
    expect(fatal).toContain('was deleted or replaced while NanoClaw was running');
    expect(fatal).toContain('store/backups/');
  });

  it('emits an error turn so a waiting user hears about it', async () => {
    const w = await world({}, { maxRetries: 0 });
    const turns: unknown[] = [];
    w.host.onTurn = (t) => turns.push(t);
    w.channel.receive(MAIN, '!fail LLM is not set');
    await waitFor(() => turns.length >= 1, 60_000, 'turn');
    expect(turns[0]).toMatchObject({ chatJid: MAIN, status: 'error', error: 'LLM is not set' });
  });

  it('processes messages stored before a crash when the host starts again', async () => {
    const docker = fakeDocker();
    const config = tempProject({ CONTAINER_RUNTIME: docker.path }, `KIMI_API_KEY=${SECRET}\n`);
    const setup = new Store(config.dbPath);
    addGroup(config, setup, { jid: MAIN, name: 'Me', folder: 'main', isMain: true });
    // The previous host stored this, then died before running the agent.
    setup.storeMessage({
      id: 'lost-1',
      chatJid: MAIN,
      sender: 'me',
      senderName: 'Me',
      content: 'did you get this?',
      timestamp: new Date().toISOString(),
      isFromMe: true,
      isBotMessage: false,
    });
    setup.close();
    const w = await world({}, {}, { docker, config });
    await waitFor(() => texts(w).length === 1, 60_000, 'recovered reply');
    expect(texts(w)).toEqual(['Andy: echo: did you get this?']);
  });

  it('after a restart, groups active within IDLE_TIMEOUT get a ready agent again (the old ones were removed); quiet ones do not', async () => {
    const first = await world({ MAX_CONCURRENT_CONTAINERS: '4' });
    first.channel.receive(FAMILY, '@Andy hello');
    await waitFor(() => texts(first).length === 1, 60_000, 'answer');
    // Work spoke last two hours ago: past IDLE_TIMEOUT (30 min).
    first.store.upsertChat({
      jid: WORK,
      channel: 'test',
      isGroup: true,
      lastMessageAt: new Date(Date.now() - 2 * 3_600_000).toISOString(),
    });
    await shutDown(first);
    const runsBefore = first.docker.runs().length;
    const second = await world({}, {}, { docker: first.docker, config: first.config });
    await waitFor(() => second.host.queue.poolMembers.length === 1, 60_000, 'a ready agent');
    expect(second.host.queue.poolMembers).toEqual([FAMILY]);
    await waitFor(() => second.docker.runs().length > runsBefore, 60_000, 'the warm start recorded');
    const warmed = second.docker.runs().slice(runsBefore);
    expect(warmed.map((run) => JSON.parse(run.stdin!).chatJid)).toEqual([FAMILY]);
    second.channel.receive(FAMILY, '@Andy again');
    await waitFor(() => texts(second).length === 1, 60_000, 'answered by the ready agent');
    expect(second.docker.runs().length).toBe(runsBefore + 1);
  });

  it('a run cut short by shutdown is answered after restart', async () => {
    const first = await world({}, { shutdownGraceMs: 200 }); // the turn takes longer than the grace
    first.channel.receive(MAIN, '!sleep 1200');
    await waitFor(() => first.docker.runs().length === 1, 60_000, 'run started');
    await shutDown(first);
    expect(texts(first)).toEqual([]);
    const second = await world({}, {}, { docker: first.docker, config: first.config });
    await waitFor(() => texts(second).length === 1, 60_000, 'answer after restart');
    expect(texts(second)).toEqual(['Andy: slept 1200']);
  });
});

describe('IPC from the agent', () => {
  const drop = (w: World, folder: string, kind: 'messages' | 'tasks', data: unknown) =>
    writeJsonAtomic(
      join(w.config.ipcDir, folder, kind, `${Date.now()}-${Math.random().toString(36).slice(2)}.json`),
      data,
    );

  it('sends a message to the group’s own chat, and refuses another group’s chat', async () => {
    const w = await world();
    drop(w, 'family', 'messages', { type: 'message', chatJid: WORK, text: 'sneaky' });
    drop(w, 'family', 'messages', { type: 'message', chatJid: FAMILY, text: 'dinner at 7' });
    await waitFor(() => texts(w).length === 1, 60_000, 'ipc message');
    await Bun.sleep(200);
    expect(w.channel.sent.map(({ jid, text }) => ({ jid, text }))).toEqual([
      { jid: FAMILY, text: 'Andy: dinner at 7' },
    ]); // said like an answer
    expect(readFileSync(join(w.config.logsDir, 'nanoclaw.log'), 'utf8')).toContain('IPC request refused');
  });

  it('answers each request with the host’s decision where the agent’s tool waits for it: done (with what), or refused and why', async () => {
    const w = await world();
    const ipc = join(w.config.ipcDir, 'family');
    const decision = async (name: string) => {
      const file = join(ipc, 'responses', name);
      await waitFor(() => existsSync(file), 60_000, `the decision on ${name}`);
      return JSON.parse(readFileSync(file, 'utf8')) as { ok: boolean; detail?: string; reason?: string };
    };
    writeJsonAtomic(join(ipc, 'tasks', '1-too-often.json'), {
      type: 'schedule_task',
      prompt: 'ping',
      schedule_type: 'interval',
      schedule_value: '60000',
    });
    expect(await decision('1-too-often.json')).toEqual({
      ok: false,
      reason: 'runs every 60 s, more often than allowed (TASK_MIN_INTERVAL=300000 ms)',
    });
    writeJsonAtomic(join(ipc, 'tasks', '2-fine.json'), {
      type: 'schedule_task',
      prompt: 'water the plants',
      schedule_type: 'cron',
      schedule_value: '0 9 * * *',
    });
    const accepted = await decision('2-fine.json');
    expect(accepted.ok).toBe(true);
    const id = w.store.listTasks('family')[0]!.id;
    expect(accepted.detail).toMatch(new RegExp(`^scheduled as ${id}; first run \\d{4}-\\d{2}-\\d{2} 09:00 \\(UTC\\)$`));
    writeJsonAtomic(join(ipc, 'messages', '3-elsewhere.json'), { type: 'message', chatJid: WORK, text: 'psst' });
    expect(await decision('3-elsewhere.json')).toEqual({
      ok: false,
      reason: 'group "family" may only message its own chat',
    });
    writeJsonAtomic(join(ipc, 'tasks', '4-broken.json'), { type: 'schedule_task', prompt: 'x' });
    expect((await decision('4-broken.json')).reason).toContain('schedule_type');
  });

  it('lets main message any registered group', async () => {
    const w = await world();
    drop(w, 'main', 'messages', { type: 'message', chatJid: WORK, text: 'from main' });
    await waitFor(() => texts(w).length === 1, 60_000, 'ipc message');
    expect(w.channel.sent.map(({ jid, text }) => ({ jid, text }))).toEqual([{ jid: WORK, text: 'Andy: from main' }]);
  });

  it('refresh_groups that no channel could sync leaves groups_synced_at unset: the stamp records only a real sync', async () => {
    const w = await world(); // the recording channel has no group list to sync
    const ipc = join(w.config.ipcDir, 'main');
    writeJsonAtomic(join(ipc, 'tasks', '1-refresh.json'), { type: 'refresh_groups' });
    const response = join(ipc, 'responses', '1-refresh.json');
    await waitFor(() => existsSync(response), 60_000, 'the decision');
    expect(JSON.parse(readFileSync(response, 'utf8'))).toEqual({ ok: true });
    await Bun.sleep(100); // the refresh runs after the request is answered
    expect(w.store.getState(GROUPS_SYNCED_AT)).toBeNull();
    expect(JSON.parse(readFileSync(join(ipc, 'available_groups.json'), 'utf8')).lastSync).toBeNull();
  });

  it('moves a malformed file to data/ipc/errors and keeps going', async () => {
    const w = await world();
    mkdirSync(join(w.config.ipcDir, 'work', 'messages'), { recursive: true });
    writeFileSync(join(w.config.ipcDir, 'work', 'messages', '1-broken.json'), '{"type": "message", "chatJid":');
    drop(w, 'work', 'messages', { type: 'message', chatJid: WORK, text: 'after the broken one' });
    await waitFor(() => texts(w).length === 1, 60_000, 'good message');
    const errors = readdirSync(join(w.config.ipcDir, 'errors'));
    expect(errors).toEqual([expect.stringMatching(/^work\.messages\.[0-9a-f-]{36}\.1-broken\.json$/)]);
    expect(readFileSync(join(w.config.ipcDir, 'errors', errors[0]!), 'utf8')).toBe('{"type": "message", "chatJid":');
  });

  it('schedules tasks for its own chat only, and only main registers groups', async () => {
    const w = await world();
    drop(w, 'family', 'tasks', {
      type: 'schedule_task',
      prompt: 'water the plants',
      schedule_type: 'cron',
      schedule_value: '0 9 * * *',
      context_mode: 'group',
    });
    drop(w, 'family', 'tasks', {
      type: 'schedule_task',
      prompt: 'meddle',
      schedule_type: 'interval',
      schedule_value: '60000',
      context_mode: 'isolated',
      targetJid: WORK,
    });
    drop(w, 'family', 'tasks', { type: 'register_group', jid: 'new@g.us', name: 'New', folder: 'new' });
    drop(w, 'main', 'tasks', { type: 'register_group', jid: 'club@g.us', name: 'Club', folder: 'club' });
    await waitFor(() => w.store.groupByJid('club@g.us'), 60_000, 'club registered');
    await waitFor(() => w.store.listTasks().length === 1, 60_000, 'task stored');
    await Bun.sleep(200);
    const [task] = w.store.listTasks();
    expect(task).toMatchObject({
      groupFolder: 'family',
      chatJid: FAMILY,
      prompt: 'water the plants',
      status: 'active',
      contextMode: 'group',
    });
    expect(new Date(task!.nextRun!).getUTCHours()).toBe(9); // TZ=UTC in tests
    expect(w.store.groupByJid('new@g.us')).toBeNull();
    expect(existsSync(join(w.config.groupsDir, 'club', 'CLAUDE.md'))).toBe(true);
    const snapshot = JSON.parse(readFileSync(join(w.config.ipcDir, 'family', 'current_tasks.json'), 'utf8'));
    expect(snapshot.map((t: { prompt: string }) => t.prompt)).toEqual(['water the plants']);
  });

  it('resuming a one-off whose time has passed is refused alike from the agent and from the CLI; the task stays paused', async () => {
    const w = await world();
    w.store.createTask(
      taskRow({
        id: 'past-once',
        groupFolder: 'family',
        chatJid: FAMILY,
        scheduleType: 'once',
        scheduleValue: '2020-01-01 09:00',
        contextMode: 'group',
        status: 'paused',
        createdAt: new Date().toISOString(),
      }),
    );
    drop(w, 'family', 'tasks', { type: 'resume_task', taskId: 'past-once' });
    await waitFor(
      () => existsSync(join(w.config.ipcDir, 'errors')) && readdirSync(join(w.config.ipcDir, 'errors')).length === 1,
      60_000,
      'refused',
    );
    expect(w.store.getTask('past-once')).toMatchObject({ status: 'paused', nextRun: null });
    expect(readFileSync(join(w.config.logsDir, 'nanoclaw.log'), 'utf8')).toContain('has no future run left');
    const cli = Bun.spawn([process.execPath, join(REPO, 'nanoclaw.ts'), 'tasks', 'resume', 'past-once'], {
      stdout: 'pipe',
      stderr: 'pipe',
      env: {
        PATH: process.env.PATH!,
        HOME: process.env.HOME!,
        NANOCLAW_ROOT: w.config.projectRoot,
        CONTAINER_RUNTIME: w.docker.path,
      },
    });
    const [stderr, code] = await Promise.all([new Response(cli.stderr).text(), cli.exited]);
    expect(code).toBe(2);
    expect(stderr.trim()).toBe('Task past-once has no future run left (once, 2020-01-01 09:00).');
    expect(w.store.getTask('past-once')).toMatchObject({ status: 'paused' });
  });

  it('lets a group pause and cancel its own task but not another group’s', async () => {
    const w = await world();
    drop(w, 'work', 'tasks', {
      type: 'schedule_task',
      prompt: 'standup',
      schedule_type: 'interval',
      schedule_value: '3600000',
      context_mode: 'isolated',
    });
    const task = await waitFor(() => w.store.listTasks()[0], 60_000, 'task');
    drop(w, 'family', 'tasks', { type: 'cancel_task', taskId: task.id });
    drop(w, 'work', 'tasks', { type: 'pause_task', taskId: task.id });
    await waitFor(() => w.store.getTask(task.id)?.status === 'paused', 60_000, 'paused');
    expect(w.store.getTask(task.id)).not.toBeNull();
    drop(w, 'work', 'tasks', { type: 'cancel_task', taskId: task.id });
    await waitFor(() => w.store.getTask(task.id) === null, 60_000, 'cancelled');
  });

  it('a task the CLI cancels right after an agent’s request was checked is not changed: the request is refused as gone', async () => {
    const w = await world();
    w.store.createTask(
      taskRow({ id: 'doomed', groupFolder: 'family', chatJid: FAMILY, scheduleValue: '3600000', status: 'paused' }),
    );
    const cli = new Store(w.config.dbPath); // the CLI's own connection, as its process has
    const read = w.store.getTask;
    let cancelled = false;
    w.store.getTask = (id) => {
      const task = read(id);
      if (id === 'doomed' && !cancelled) {
        cancelled = true; // the first read of it, the check's: the CLI cancels it just then
        cli.deleteTask(id);
      }
      return task;
    };
    writeJsonAtomic(join(w.config.ipcDir, 'family', 'tasks', 'resume.json'), { type: 'resume_task', taskId: 'doomed' });
    const response = join(w.config.ipcDir, 'family', 'responses', 'resume.json');
    await waitFor(() => existsSync(response), 60_000, 'the decision');
    // The check shares the transaction of the change: SQLite refuses that write (the database changed since the
    // check), and the request's next pass finds the task gone.
    expect(JSON.parse(readFileSync(response, 'utf8'))).toEqual({ ok: false, reason: 'no task with id doomed' });
    expect(cancelled).toBe(true);
    expect(w.store.getTask('doomed')).toBeNull();
    cli.close();
  });
});

describe('send caps and who may wake the agent', () => {
  type Decision = { ok: boolean; detail?: string; reason?: string };
  const decisions = (w: World, folder: string): Decision[] => {
    const dir = join(w.config.ipcDir, folder, 'responses');
    return existsSync(dir)
      ? readdirSync(dir)
          .sort()
          .map((name) => JSON.parse(readFileSync(join(dir, name), 'utf8')) as Decision)
      : [];
  };
  const send = (w: World, folder: string, name: string, chatJid: string, text: string) =>
    writeJsonAtomic(join(w.config.ipcDir, folder, 'messages', name), { type: 'message', chatJid, text });

  it('a flood of 100 send_message from a group: SEND_MAX_PER_MINUTE delivered, the rest refused with when to send again; main is served meanwhile', async () => {
    const clock = new FakeClock();
    const w = await world({ SEND_MAX_PER_MINUTE: '20' }, { clock });
    for (let i = 0; i < 100; i++) send(w, 'family', `${String(i).padStart(3, '0')}.json`, FAMILY, `flood ${i}`);
    w.channel.receive(MAIN, 'still there?');
    send(w, 'main', 'during.json', MAIN, 'main speaks during the flood');
    await waitFor(() => decisions(w, 'family').length === 100, 60_000, 'a decision on every request');
    await waitFor(() => texts(w, MAIN).length === 2, 60_000, 'main’s messages');
    await w.host.settleOutbox();
    expect(texts(w, MAIN).sort()).toEqual(['Andy: echo: still there?', 'Andy: main speaks during the flood']);
    expect(texts(w, FAMILY)).toEqual(Array.from({ length: 20 }, (_, i) => `Andy: flood ${i}`));
    const refused = decisions(w, 'family').filter((d) => !d.ok);
    expect(refused).toHaveLength(80);
    for (const d of refused)
      expect(d.reason).toBe(
        'group "family" already sent 20 messages in the last minute (SEND_MAX_PER_MINUTE=20); it may send again in 60 s',
      );
    expect(w.store.db.query('SELECT COUNT(*) AS n FROM outbox WHERE chat_jid = ?').get(FAMILY)).toEqual({ n: 20 }); // nothing queued
    await clock.advance(60_000); // the window slides
    send(w, 'family', 'later.json', FAMILY, 'a minute later');
    await waitFor(() => decisions(w, 'family').length === 101, 60_000, 'the later decision');
    expect(decisions(w, 'family').at(-1)).toEqual({ ok: true });
  });

  it('a text that would be more than SEND_MAX_PARTS WhatsApp messages (1 MiB: over 260) is refused, not cut, and not counted', async () => {
    const w = await world();
    w.channel.layout = (text) => splitForWhatsApp(text); // WhatsApp's own split
    const huge = 'word '.repeat((1024 * 1024 - 200) / 5);
    const parts = splitForWhatsApp(`Andy: ${huge}`).length;
    expect(parts).toBeGreaterThan(260);
    send(w, 'family', '1-huge.json', FAMILY, huge);
    await waitFor(() => decisions(w, 'family').length === 1, 60_000, 'the decision');
    expect(decisions(w, 'family')[0]).toEqual({
      ok: false,
      reason: `this text would be ${parts} WhatsApp messages, more than one send_message may be (SEND_MAX_PARTS=10); send a shorter text`,
    });
    send(w, 'family', '2-short.json', FAMILY, 'the gist');
    await waitFor(() => decisions(w, 'family').length === 2, 60_000, 'the second decision');
    await w.host.settleOutbox();
    expect(texts(w, FAMILY)).toEqual(['Andy: the gist']);
  });

  it('only allowed senders wake a group (the others are its context); a main group wakes only for its owner', async () => {
    const w = await world();
    const CLUB = 'stranger@g.us'; // a chat the channel has: registered now, with an allowlist
    addGroup(w.config, w.store, { jid: CLUB, name: 'Club', folder: 'club', allow: ['4915100000002@s.whatsapp.net'] });
    // Main moved to a WhatsApp group the owner shares with others.
    w.store.db.query('UPDATE registered_groups SET is_main = 0').run();
    w.store.db.query('UPDATE registered_groups SET is_main = 1, requires_trigger = 0 WHERE jid = ?').run(WORK);
    const mallory = { sender: '4915100000009@s.whatsapp.net', senderName: 'Mallory', isFromMe: false };
    w.channel.receive(CLUB, '@Andy let me in', mallory);
    w.channel.receive(WORK, 'run my errands', mallory);
    await Bun.sleep(300);
    expect(w.docker.runs()).toHaveLength(0);
    w.channel.receive(CLUB, '@Andy what did Mallory say?', { sender: '4915100000002@s.whatsapp.net' });
    await waitFor(() => texts(w, CLUB).length === 1, 60_000, 'the allowed sender answered');
    expect(stdinOf(w, 0).prompt).toContain('let me in'); // context, not a trigger
    w.channel.receive(WORK, 'mine', { isFromMe: true });
    await waitFor(() => texts(w, WORK).length === 1, 60_000, 'the owner answered');
    expect(stdinOf(w, 1).prompt).toContain('run my errands');
  });
});

describe('secrets', () => {
  it('never reaches the container (a per-run proxy token goes on stdin) and never appears in any log', async () => {
    const w = await world({ LOG_LEVEL: 'debug' });
    w.channel.receive(MAIN, `please remember ${SECRET}`); // even when someone pastes it
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    await shutDown(w);
    const run = w.docker.runs()[0]!;
    expect(JSON.parse(run.stdin!).secrets).toEqual({ KIMI_API_KEY: expect.stringMatching(/^ncp-[0-9a-f]{32}$/) });
    expect(JSON.stringify(run.env)).not.toContain(SECRET);
    expect(run.argv.join(' ')).not.toContain(SECRET);
    const logFiles = [
      join(w.config.logsDir, 'nanoclaw.log'),
      join(w.config.logsDir, 'nanoclaw.error.log'),
      ...readdirSync(join(w.config.groupsDir, 'main', 'logs')).map((f) => join(w.config.groupsDir, 'main', 'logs', f)),
    ].filter(existsSync);
    expect(logFiles.length).toBeGreaterThanOrEqual(2);
    for (const file of logFiles) expect(readFileSync(file, 'utf8')).not.toContain(SECRET);
  });
});
