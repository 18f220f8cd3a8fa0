import { Database } from 'bun:sqlite';
import { readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { addGroup, needsAgent, Store, type NewMessage, type ScheduledTask } from '../nanoclaw.ts';
import { taskRow, tempDir, tempProject } from './helpers.ts';

/** How many migrations nanoclaw.ts has: a new one updates this. */
const SCHEMA_VERSION = 7;

const message = (id: string, chatJid: string, extra: Partial<NewMessage> = {}): NewMessage => ({
  id,
  chatJid,
  sender: 'a@s.whatsapp.net',
  senderName: 'A',
  content: `text ${id}`,
  timestamp: '2026-01-01T10:00:00.000Z',
  isFromMe: false,
  isBotMessage: false,
  ...extra,
});

/** A task of its group's chat, created at a fixed time. */
const task = (id: string, groupFolder: string, nextRun: string | null, status: ScheduledTask['status'] = 'active') =>
  taskRow({ id, groupFolder, chatJid: `${groupFolder}@g.us`, nextRun, status, createdAt: '2026-01-01T00:00:00.000Z' });

describe('Store schema', () => {
  it('creates every table at the current version, in WAL mode, and reopens without change', () => {
    const path = join(tempDir(), 'messages.db');
    const store = new Store(path);
    expect(store.db.query('PRAGMA user_version').get()).toEqual({ user_version: SCHEMA_VERSION });
    expect(store.db.query('PRAGMA journal_mode').get()).toEqual({ journal_mode: 'wal' });
    const tables = store.db
      .query<{ name: string }, []>(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
      )
      .all()
      .map((t) => t.name);
    expect(tables).toEqual([
      'chats',
      'ipc_done',
      'messages',
      'model_usage',
      'outbox',
      'registered_groups',
      'router_state',
      'scheduled_tasks',
      'sessions',
      'task_claims',
      'task_run_logs',
    ]);
    const sessionColumns = store.db.query<{ name: string; pk: number }, []>('PRAGMA table_info(sessions)').all();
    expect(sessionColumns.find((c) => c.name === 'group_folder')?.pk).toBe(1);
    expect(sessionColumns.map((c) => c.name)).toContain('session_id');
    store.setSession('main', 's1');
    store.close();
    const again = new Store(path);
    expect(again.getSession('main')).toBe('s1');
    again.close();
  });

  it('migrates a database from schema 1 without losing data', () => {
    const path = join(tempDir(), 'messages.db');
    const store = new Store(path);
    store.setSession('main', 'kept');
    store.db.exec(
      'DROP TABLE task_claims; DROP TABLE ipc_done; DROP TABLE outbox; DROP TABLE model_usage; ALTER TABLE registered_groups DROP COLUMN allowed_senders; ALTER TABLE scheduled_tasks DROP COLUMN paused_reason; PRAGMA user_version = 1',
    ); // as the first release left it
    store.close();
    const upgraded = new Store(path);
    expect(upgraded.db.query('PRAGMA user_version').get()).toEqual({ user_version: SCHEMA_VERSION });
    expect(upgraded.getSession('main')).toBe('kept');
    upgraded.addOutbound('whatsapp', 'a@g.us', 'hello', '3EB0TEST1');
    expect(upgraded.unsentHeads('whatsapp')[0]).toMatchObject({
      jid: 'a@g.us',
      text: 'hello',
      messageId: '3EB0TEST1',
      attempts: 0,
    });
    upgraded.addModelUsage('2026-12-01', 'main', { ok: true, promptTokens: 10, completionTokens: 2 });
    upgraded.addModelUsage('2026-12-01', 'main', { ok: false, promptTokens: 0, completionTokens: 0 });
    upgraded.addModelUsage('2026-12-02', 'family', { ok: true, promptTokens: 5, completionTokens: 1 });
    expect(upgraded.modelUsage('2026-12-01')).toEqual([
      { day: '2026-12-01', groupFolder: 'main', requests: 2, failed: 1, promptTokens: 10, completionTokens: 2 },
      { day: '2026-12-02', groupFolder: 'family', requests: 1, failed: 0, promptTokens: 5, completionTokens: 1 },
    ]);
    expect(upgraded.modelUsage('2026-12-02', 'main')).toEqual([]);
    upgraded.close();
  });

  it('migration 4 gives replies left in the outbox by an older version a message id, and keeps them unsent', () => {
    const path = join(tempDir(), 'messages.db');
    const old = new Store(path);
    old.db.exec(`DROP TABLE task_claims; DROP TABLE ipc_done; DROP INDEX outbox_by_message; DROP INDEX outbox_unsent;
      ALTER TABLE outbox DROP COLUMN message_id; ALTER TABLE outbox DROP COLUMN sent_at; ALTER TABLE outbox DROP COLUMN attempts; ALTER TABLE outbox DROP COLUMN error;
      ALTER TABLE outbox DROP COLUMN sent_content; ALTER TABLE registered_groups DROP COLUMN allowed_senders;
      ALTER TABLE outbox DROP COLUMN file; ALTER TABLE outbox DROP COLUMN file_meta; ALTER TABLE scheduled_tasks DROP COLUMN paused_reason; PRAGMA user_version = 3`);
    old.db
      .query(
        "INSERT INTO outbox (channel, chat_jid, text, created_at) VALUES ('whatsapp', 'a@g.us', 'from before', '2026-01-01')",
      )
      .run();
    old.close();
    const store = new Store(path);
    expect(store.unsentHeads('whatsapp')[0]).toMatchObject({
      text: 'from before',
      messageId: '3EB0NC0000000000000001',
    });
    store.close();
  });

  it('migration 6 gives every group of an older database an empty allowlist: everyone in a group, only the owner in main', () => {
    const path = join(tempDir(), 'messages.db');
    const old = new Store(path);
    old.db.exec(
      'ALTER TABLE registered_groups DROP COLUMN allowed_senders; ALTER TABLE outbox DROP COLUMN file; ALTER TABLE outbox DROP COLUMN file_meta; ALTER TABLE scheduled_tasks DROP COLUMN paused_reason; PRAGMA user_version = 5',
    );
    const insert = old.db.query(
      `INSERT INTO registered_groups (jid, name, folder, trigger_word, requires_trigger, is_main, added_at)
       VALUES (?, ?, ?, '@Andy', ?, ?, '2026-01-01')`,
    );
    insert.run('me-main@g.us', 'Main', 'main', 0, 1);
    insert.run('fam@g.us', 'Family', 'family', 1, 0);
    old.close();
    const store = new Store(path);
    expect(store.db.query('PRAGMA user_version').get()).toEqual({ user_version: SCHEMA_VERSION });
    const main = store.mainGroup()!;
    const family = store.groupByFolder('family')!;
    expect([main.allow, family.allow]).toEqual([[], []]);
    const stranger = { ...message('1', 'fam@g.us', { content: '@Andy hi' }), seq: 1 };
    expect(needsAgent(family, [stranger])).toBe(true);
    expect(needsAgent(main, [{ ...stranger, chatJid: main.jid }])).toBe(false);
    expect(needsAgent(main, [{ ...stranger, chatJid: main.jid, isFromMe: true }])).toBe(true);
    store.close();
  });

  it('outbox parts: each chat’s oldest unsent first, sent once marked, given up after failing, found by message id', () => {
    const store = new Store(join(tempDir(), 'messages.db'));
    store.addOutbound('whatsapp', 'a@g.us', 'first', 'ID1');
    store.addOutbound('whatsapp', 'a@g.us', 'second', 'ID2');
    store.addOutbound('whatsapp', 'b@g.us', 'other chat', 'ID4');
    store.addOutbound('local', 'main@local', 'elsewhere', 'ID3');
    const heads = () => store.unsentHeads('whatsapp').map((part) => part.messageId);
    expect(heads()).toEqual(['ID1', 'ID4']); // one lane per chat, oldest first
    const first = store.unsentHeads('whatsapp')[0]!;
    store.markSendFailed(first.id, 'offline', false);
    expect(store.unsentHeads('whatsapp')[0]).toMatchObject({ messageId: 'ID1', attempts: 1 });
    store.markSent(first.id);
    expect(heads()).toEqual(['ID2', 'ID4']);
    store.markSendFailed(store.unsentHeads('whatsapp')[0]!.id, 'bad jid', true);
    store.markSent(store.unsentHeads('whatsapp')[0]!.id);
    expect(heads()).toEqual([]);
    expect(store.unsent('local').length).toBe(1);
    const lastBefore = store.lastOutboxId();
    store.addOutbound('local', 'main@local', 'queued later', 'ID5');
    expect(store.unsent('local', lastBefore).map((part) => part.messageId)).toEqual(['ID5']); // only what came after
    store.markSent(store.unsent('local', lastBefore)[0]!.id);
    expect(store.outboundByMessageId('ID1')).toEqual({ chatJid: 'a@g.us', text: 'first', sentContent: null });
    expect([store.hasOutbound('ID1'), store.hasOutbound('ID3'), store.hasOutbound('NOT-OURS')]).toEqual([
      true,
      true,
      false,
    ]);
    store.recordSentContent('ID1', new Uint8Array([0x0a, 0x02, 0x68, 0x69]));
    expect(store.outboundByMessageId('ID1')!.sentContent).toEqual(new Uint8Array([0x0a, 0x02, 0x68, 0x69]));
    expect(store.pruneOutbox(new Date(Date.now() + 1000).toISOString())).toBe(4);
    expect(store.outboundByMessageId('ID1')).toBeNull();
    expect(store.hasOutbound('ID1')).toBe(false);
    expect(store.unsent('local').length).toBe(1); // never pruned while unsent
    store.close();
  });

  it('task claims: one per task at a time; IPC done-marks', () => {
    const store = new Store(join(tempDir(), 'messages.db'));
    store.createTask(taskRow({ id: 't1', groupFolder: 'g', chatJid: 'g@g.us' }));
    expect(store.claimTask('t1', '2026-01-01T00:00:00.000Z')).toBe(true);
    expect(store.claimTask('t1', '2026-01-01T00:01:00.000Z')).toBe(false);
    expect(store.taskClaims()).toEqual([
      expect.objectContaining({ taskId: 't1', dueAt: '2026-01-01T00:00:00.000Z', attempt: 1 }),
    ]);
    store.releaseTask('t1');
    expect(store.taskClaims()).toEqual([]);
    expect(store.isIpcDone('c1')).toBe(false);
    store.markIpcDone('c1');
    store.markIpcDone('c1');
    expect(store.isIpcDone('c1')).toBe(true);
    store.close();
  });

  it('refuses a database from a newer version instead of damaging it', () => {
    const path = join(tempDir(), 'messages.db');
    const db = new Database(path);
    db.exec(`PRAGMA user_version = ${SCHEMA_VERSION + 1}`);
    db.close();
    expect(() => new Store(path)).toThrow('newer than this code knows');
  });

  it('answers the per-chat query from the messages_by_chat index', () => {
    const store = new Store(join(tempDir(), 'messages.db'));
    const plan = store.db
      .query<{ detail: string }, []>(
        "EXPLAIN QUERY PLAN SELECT * FROM messages WHERE chat_jid = 'x' AND seq > 5 AND is_bot_message = 0 ORDER BY seq DESC LIMIT 500",
      )
      .all()
      .map((row) => row.detail)
      .join(' | ');
    expect(plan).toContain('USING INDEX messages_by_chat');
    store.close();
  });
});

describe('messages and cursors', () => {
  it('stores a message once per chat and id', () => {
    const store = new Store(join(tempDir(), 'messages.db'));
    expect(store.storeMessage(message('m1', 'a@g.us'))).toBe(1);
    expect(store.storeMessage(message('m1', 'a@g.us', { content: 'replayed' }))).toBeNull();
    expect(store.storeMessage(message('m1', 'b@g.us'))).toBeGreaterThan(1); // same id in another chat is another message
    expect(store.messagesSince('a@g.us', 0).map((m) => m.content)).toEqual(['text m1']);
    store.close();
  });

  it('returns what came after the cursor in this chat, oldest first, without the bot’s own', () => {
    const store = new Store(join(tempDir(), 'messages.db'));
    store.storeMessage(message('1', 'a@g.us'));
    store.storeMessage(message('2', 'b@g.us'));
    store.storeMessage(message('3', 'a@g.us', { isBotMessage: true }));
    store.storeMessage(message('4', 'a@g.us', { isFromMe: true }));
    store.storeMessage(message('5', 'a@g.us'));
    expect(store.messagesSince('a@g.us', 0).map((m) => m.id)).toEqual(['1', '4', '5']);
    expect(store.messagesSince('a@g.us', 1).map((m) => m.id)).toEqual(['4', '5']);
    expect(store.messagesSince('a@g.us', 0, 2).map((m) => m.id)).toEqual(['4', '5']); // the newest within the limit
    expect(store.messagesSince('a@g.us', 0)[1]).toMatchObject({ isFromMe: true, isBotMessage: false, seq: 4 });
    expect(store.latestSeq('a@g.us')).toBe(5);
    expect(store.getCursor('a@g.us')).toBe(0);
    store.setCursor('a@g.us', 4);
    expect(store.getCursor('a@g.us')).toBe(4);
    expect(store.getCursor('b@g.us')).toBe(0);
    store.close();
  });

  it('keeps chat metadata, and a newer message time only moves forward', () => {
    const store = new Store(join(tempDir(), 'messages.db'));
    store.upsertChat({
      jid: 'a@g.us',
      name: 'Family',
      channel: 'whatsapp',
      isGroup: true,
      lastMessageAt: '2026-01-02T00:00:00.000Z',
    });
    store.upsertChat({
      jid: 'a@g.us',
      name: null,
      channel: 'whatsapp',
      isGroup: true,
      lastMessageAt: '2026-01-01T00:00:00.000Z',
    });
    expect(store.listChats()).toEqual([
      { jid: 'a@g.us', name: 'Family', channel: 'whatsapp', isGroup: true, lastMessageAt: '2026-01-02T00:00:00.000Z' },
    ]);
    store.close();
  });
});

describe('groups, sessions, tasks', () => {
  it('registers groups with one main and unique folders; a new group starts its cursor at the latest message', () => {
    const config = tempProject();
    const store = new Store(config.dbPath);
    store.storeMessage(message('old', 'fam@g.us'));
    const family = addGroup(config, store, { jid: 'fam@g.us', name: 'Family', folder: 'family' });
    expect(family).toMatchObject({ trigger: '@Andy', requiresTrigger: true, isMain: false });
    expect(store.getCursor('fam@g.us')).toBe(1); // history before registration is not replayed
    addGroup(config, store, { jid: 'me@s.whatsapp.net', name: 'Me', folder: 'main', isMain: true });
    expect(store.mainGroup()?.requiresTrigger).toBe(false);
    expect(() => addGroup(config, store, { jid: 'x@g.us', name: 'X', folder: 'family' })).toThrow('already used');
    expect(() => addGroup(config, store, { jid: 'y@g.us', name: 'Y', folder: 'other', isMain: true })).toThrow(
      'already a main group',
    );
    expect(() => addGroup(config, store, { jid: 'z@g.us', name: 'Z', folder: 'Bad Name' })).toThrow('lowercase');
    expect(() => addGroup(config, store, { jid: 'z@g.us', name: 'Z', folder: 'global' })).toThrow();
    expect(() => store.db.query("UPDATE registered_groups SET is_main = 1 WHERE folder = 'family'").run()).toThrow();
    expect(store.listGroups().map((g) => g.folder)).toEqual(['main', 'family']);
    const allow = ['4915100000002@s.whatsapp.net', '123456789@lid'];
    addGroup(config, store, { jid: 'club@g.us', name: 'Club', folder: 'club', allow });
    expect(store.groupByFolder('club')?.allow).toEqual(allow);
    expect(() => addGroup(config, store, { jid: 'w@g.us', name: 'W', folder: 'w', allow: ['bob'] })).toThrow(
      'allow: "bob" is not a WhatsApp sender id',
    );
    store.close();
  });

  it('keeps one session per group folder', () => {
    const store = new Store(join(tempDir(), 'messages.db'));
    store.setSession('main', 'a');
    store.setSession('main', 'b');
    store.setSession('family', 'c');
    expect(store.listSessions().map((s) => [s.groupFolder, s.sessionId])).toEqual([
      ['family', 'c'],
      ['main', 'b'],
    ]);
    expect(store.deleteSession('main')).toBe(true);
    expect(store.getSession('main')).toBeNull();
    store.close();
  });

  it('lists upcoming active tasks soonest first, logs runs, and drops the logs with the task', () => {
    const store = new Store(join(tempDir(), 'messages.db'));
    store.createTask(task('late', 'a', '2026-01-03T00:00:00.000Z'));
    store.createTask(task('soon', 'b', '2026-01-01T00:00:00.000Z'));
    store.createTask(task('paused', 'a', '2026-01-02T00:00:00.000Z', 'paused'));
    store.createTask(task('done', 'a', null, 'completed'));
    expect(store.upcomingTasks().map((t) => t.id)).toEqual(['soon', 'late']);
    expect(
      store
        .listTasks('a')
        .map((t) => t.id)
        .sort(),
    ).toEqual(['done', 'late', 'paused']);
    expect(store.updateTask('late', { status: 'paused', lastResult: 'ok' })).toBe(true);
    expect(store.getTask('late')).toMatchObject({ status: 'paused', lastResult: 'ok' });
    store.logTaskRun({
      taskId: 'soon',
      runAt: '2026-01-01T00:00:01.000Z',
      durationMs: 900,
      status: 'success',
      result: 'done',
      error: null,
    });
    store.logTaskRun({
      taskId: 'soon',
      runAt: '2026-01-02T00:00:01.000Z',
      durationMs: 800,
      status: 'error',
      result: null,
      error: 'boom',
    });
    expect(store.taskRuns('soon').map((r) => r.status)).toEqual(['error', 'success']);
    expect(() =>
      store.logTaskRun({ taskId: 'ghost', runAt: 'x', durationMs: 1, status: 'success', result: null, error: null }),
    ).toThrow();
    store.deleteTask('soon');
    expect(store.db.query('SELECT COUNT(*) AS n FROM task_run_logs').get()).toEqual({ n: 0 });
    store.close();
  });

  it('knows when its file was deleted or replaced under it; backs up a consistent copy and keeps the newest', () => {
    const dir = tempDir();
    const path = join(dir, 'messages.db');
    const store = new Store(path);
    store.setSession('main', 's1');
    expect(store.stillAtPath()).toBe(true);
    const backups = join(dir, 'backups');
    for (let day = 1; day <= 4; day++) store.backup(backups, 3, new Date(`2026-12-0${day}T03:00:00Z`));
    const kept = readdirSync(backups).sort();
    expect(kept).toEqual([
      'messages-2026-12-02T03-00-00-000Z.db',
      'messages-2026-12-03T03-00-00-000Z.db',
      'messages-2026-12-04T03-00-00-000Z.db',
    ]);
    const copy = new Store(join(backups, kept.at(-1)!));
    expect(copy.getSession('main')).toBe('s1');
    copy.close();
    renameSync(path, `${path}.moved`);
    writeFileSync(path, '');
    expect(store.stillAtPath()).toBe(false);
    rmSync(path);
    expect(store.stillAtPath()).toBe(false);
    store.close();
  });
});

describe('queries that grow with what changed, not with all there is', () => {
  it('due tasks: only active ones whose next run has come, soonest first', () => {
    const store = new Store(join(tempDir(), 'messages.db'));
    store.createTask(task('later', 'g', '2026-06-01T12:00:00.001Z'));
    store.createTask(task('second', 'g', '2026-06-01T11:00:00.000Z'));
    store.createTask(task('first', 'g', '2026-06-01T10:00:00.000Z'));
    store.createTask(task('paused', 'g', '2026-06-01T09:00:00.000Z', 'paused'));
    store.createTask(task('unscheduled', 'g', null));
    expect(store.upcomingTasks('2026-06-01T12:00:00.000Z').map((t) => t.id)).toEqual(['first', 'second']);
    expect(store.upcomingTasks().map((t) => t.id)).toEqual(['first', 'second', 'later']);
    store.close();
  });

  it('a limited task list keeps the active and paused tasks, then the newest completed, and lists them oldest first', () => {
    const store = new Store(join(tempDir(), 'messages.db'));
    const at = (n: number) => `2026-01-0${n}T00:00:00.000Z`;
    store.createTask({ ...task('old-active', 'g', at(9)), createdAt: at(1) });
    store.createTask({ ...task('old-done', 'g', null, 'completed'), createdAt: at(2) });
    store.createTask({ ...task('new-done', 'g', null, 'completed'), createdAt: at(3) });
    store.createTask({ ...task('other-group', 'h', at(8)), createdAt: at(4) });
    store.createTask({ ...task('held', 'g', at(7), 'paused'), createdAt: at(5) });
    expect(store.listTasks('g', 2).map((t) => t.id)).toEqual(['old-active', 'held']);
    expect(store.listTasks('g', 3).map((t) => t.id)).toEqual(['old-active', 'new-done', 'held']);
    expect(store.listTasks(undefined, 3).map((t) => t.id)).toEqual(['old-active', 'other-group', 'held']);
    expect(store.listTasks(undefined, 4).map((t) => t.id)).toEqual(['old-active', 'new-done', 'other-group', 'held']);
    expect(store.listTasks('g').map((t) => t.id)).toEqual(['old-active', 'old-done', 'new-done', 'held']);
    expect(store.listTasks().map((t) => t.id)).toEqual(['old-active', 'old-done', 'new-done', 'other-group', 'held']);
    store.close();
  });

  it('the newest runs of several tasks in one call: at most `limit` each, newest first, in the order asked', () => {
    const store = new Store(join(tempDir(), 'messages.db'));
    for (const id of ['a', 'b', 'quiet']) store.createTask(task(id, 'g', null));
    for (const [id, n] of [
      ['a', 1],
      ['b', 1],
      ['a', 2],
      ['a', 3],
      ['b', 2],
    ] as const)
      store.logTaskRun({
        taskId: id,
        runAt: `2026-01-0${n}`,
        durationMs: n,
        status: 'success',
        result: null,
        error: null,
      });
    const runs = store.taskRuns(['b', 'quiet', 'a'], 2).map((r) => `${r.taskId}${r.runAt.slice(-1)}`);
    expect(runs).toEqual(['b2', 'b1', 'a3', 'a2']);
    expect(store.taskRuns('a').map((r) => r.durationMs)).toEqual([3, 2, 1]);
    store.close();
  });

  it('the tasks version moves with every task write, here or by another process, and not with messages', () => {
    const path = join(tempDir(), 'messages.db');
    const store = new Store(path);
    const seen = [store.tasksVersion()];
    const moved = () => {
      const now = store.tasksVersion();
      const changed = now !== seen.at(-1);
      seen.push(now);
      return changed;
    };
    store.storeMessage(message('m1', 'g@g.us'));
    expect(moved()).toBe(false);
    store.createTask(task('t', 'g', null));
    expect(moved()).toBe(true);
    store.updateTask('t', { prompt: 'new words' });
    expect(moved()).toBe(true);
    store.logTaskRun({ taskId: 't', runAt: 'x', durationMs: 1, status: 'success', result: null, error: null });
    expect(moved()).toBe(true);
    expect(moved()).toBe(false);
    const other = new Store(path); // the `tasks` command, in its own process
    other.updateTask('t', { status: 'paused' });
    other.close();
    expect(moved()).toBe(true);
    store.deleteTask('t');
    expect(moved()).toBe(true);
    store.close();
  });

  it('each group’s cursor and newest message from a person, without reading its messages', () => {
    const config = tempProject();
    const store = new Store(config.dbPath);
    const family = addGroup(config, store, { jid: 'fam@g.us', name: 'Family', folder: 'family' });
    addGroup(config, store, { jid: 'empty@g.us', name: 'Empty', folder: 'empty' });
    const first = store.storeMessage(message('1', 'fam@g.us'))!;
    store.setCursor(family.jid, first);
    const second = store.storeMessage(message('2', 'fam@g.us'))!;
    store.storeMessage(message('3', 'fam@g.us', { isBotMessage: true }));
    store.storeMessage(message('4', 'stranger@g.us'));
    expect(store.groupsWithProgress().map(({ group, cursor, newest }) => [group.folder, cursor, newest])).toEqual([
      ['family', first, second],
      ['empty', 0, 0],
    ]);
    store.close();
  });
});
