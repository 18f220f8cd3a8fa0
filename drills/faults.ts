#!/usr/bin/env bun
/**
 * Fault drills: ordinary faults while the real host serves (drills/host.ts, real image).
 * Each row counts the messages sent while the fault lasted: every one must be answered
 * exactly once afterwards, and the host must not have crashed.
 *
 *   bun drills/faults.ts
 *
 * "WAL read-only" and "log unwritable" make files immutable with chattr (root, ext4-like
 * filesystems): root ignores permission bits, so chmod would not fault anything.
 */
import { Database } from 'bun:sqlite';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { type AnyMessageContent, proto, type WAMessage } from '@whiskeysockets/baileys';
import { startFakeModel } from '../scripts/scripted-model.ts';
import { Host, installId, addGroup, setupLogging, Store, type Config } from '../nanoclaw.ts';
import {
  fastClock,
  flakyServer,
  linkedAuthDir,
  openAsWhatsAppWould,
  RecordingWhatsApp,
  socketOf,
  tempProject,
} from '../test/helpers.ts';
import {
  DrillHost,
  deliveries,
  drillProject,
  IMAGE,
  named,
  printTable,
  stuck,
  tally,
  until,
  type Row,
} from './harness.ts';

/** Messages sent while `fault` holds; then all must be answered exactly once by the same, still running host. */
async function underFault(
  drill: string,
  note: string,
  fault: {
    start(p: ReturnType<typeof drillProject>): void | Promise<void>;
    stop(p: ReturnType<typeof drillProject>): void | Promise<void>;
  },
  count = 5,
): Promise<Row> {
  const project = drillProject({ think: () => 150 });
  const host = new DrillHost(project);
  try {
    if (!(await host.ready)) throw new Error('the drill host did not start');
    host.send('warm', 'warm'); // the first write creates the WAL and the log
    await until(() => deliveries(project).length === 1, 60_000);
    await fault.start(project);
    const items = Array.from({ length: count }, (_, i) => `f${i}`);
    for (const item of items) {
      host.send(item, item);
      await Bun.sleep(300);
    }
    await Bun.sleep(1_500);
    await fault.stop(project);
    await until(() => tally(items, deliveries(project), named).lost === 0, 90_000);
    await until(() => Object.values(stuck(project)).every((n) => n === 0), 30_000);
    const alive = await Promise.race([host.exited.then(() => false), Bun.sleep(10).then(() => true)]);
    const t = tally(items, deliveries(project), named);
    const left = Object.values(stuck(project)).reduce((a, b) => a + b, 0);
    const died = alive ? '' : `; THE HOST DIED (exit ${host.proc.exitCode}): ${host.lastWords()}`;
    const caught = logLinesMatching(join(project.config.logsDir, 'nanoclaw.error.log'), /NanoClaw keeps running/);
    const unexpected = caught ? `; ${caught} unexpected error(s) caught by the process handler` : '';
    // Proof the fault was felt: what the host logged about it (the spill, a log it could not write).
    const felt = logLinesMatching(
      join(project.config.logsDir, 'nanoclaw.log'),
      /cannot take messages right now|could not record|Could not record/,
    );
    return {
      drill,
      kills: 0,
      items: t.items,
      lost: t.lost,
      doubled: t.doubled,
      stuck: left,
      note: `${note}${felt ? `; felt: ${felt} database error(s) logged` : ''}${unexpected}${died}`,
    };
  } finally {
    await fault.stop(project);
    await host.close();
    project.stop();
  }
}

/** How many lines of a log file match (0 when there is no file yet). */
function logLinesMatching(file: string, pattern: RegExp): number {
  if (!existsSync(file)) return 0;
  return readFileSync(file, 'utf8')
    .split('\n')
    .filter((line) => pattern.test(line)).length;
}

const chattr = (flag: '+i' | '-i', path: string) => {
  if (existsSync(path)) Bun.spawnSync(['chattr', flag, path]);
};

export async function dbLocked(): Promise<Row> {
  let holder: Database | null = null;
  return underFault('database locked by another process (4 s)', 'spilled, then stored', {
    start: (p) => {
      holder = new Database(p.config.dbPath);
      holder.exec('PRAGMA busy_timeout = 0; BEGIN EXCLUSIVE');
    },
    stop: () => {
      holder?.exec('ROLLBACK');
      holder?.close();
      holder = null;
    },
  });
}

/**
 * The WAL cannot be written. Only the -wal file is made immutable, not -shm: SQLite maps
 * -shm into memory, and on ext4 the first write to a page of a shared mapping of an
 * immutable file is a SIGBUS from the kernel's page-fault handler (ext4_page_mkwrite),
 * which no process can catch. That is a pulled mapping, not a read-only WAL; it killed
 * the drill host 2 times in 6 (a "Bus error" in Bun's crash report) before this changed.
 */
export async function walReadOnly(): Promise<Row> {
  const wal = (p: { config: Config }) => `${p.config.dbPath}-wal`;
  return underFault('WAL read-only (4 s)', 'chattr +i on messages.db-wal', {
    start: (p) => chattr('+i', wal(p)),
    stop: (p) => chattr('-i', wal(p)),
  });
}

export async function logUnwritable(): Promise<Row> {
  const file = (p: { config: Config }) => join(p.config.logsDir, 'nanoclaw.log');
  return underFault('log file unwritable (4 s)', 'chattr +i on logs/nanoclaw.log; lines went to stderr', {
    start: (p) => chattr('+i', file(p)),
    stop: (p) => chattr('-i', file(p)),
  });
}

export async function containerKilled(): Promise<Row> {
  const project = drillProject({ think: () => 2_500 });
  const host = new DrillHost(project);
  const items = ['k0', 'k1', 'k2'];
  try {
    if (!(await host.ready)) throw new Error('the drill host did not start');
    for (const item of items) {
      host.send(item, item);
      // Find the run's container and kill it from outside, mid-run.
      const name = await until(
        () =>
          Bun.spawnSync(['docker', 'ps', '-q', '--filter', `label=nanoclaw.install=${installId(project.config)}`])
            .stdout.toString()
            .trim() !== '',
        30_000,
      );
      if (name)
        Bun.spawnSync([
          'sh',
          '-c',
          `docker kill $(docker ps -q --filter label=nanoclaw.install=${installId(project.config)}) >/dev/null`,
        ]);
      await until(() => tally([item], deliveries(project), named).lost === 0, 90_000);
    }
    await until(() => Object.values(stuck(project)).every((n) => n === 0), 30_000);
    const t = tally(items, deliveries(project), named);
    const left = Object.values(stuck(project)).reduce((a, b) => a + b, 0);
    return {
      drill: 'container killed from outside, mid-run (3 times)',
      kills: 3,
      items: t.items,
      lost: t.lost,
      doubled: t.doubled,
      stuck: left,
      note: 'docker kill; the run is retried',
    };
  } finally {
    await host.close();
    project.stop();
  }
}

/**
 * WhatsApp: the socket (real baileys, against a local WebSocket server) is dropped 50 times
 * while messages come in and replies go out. A send that is in flight when the connection
 * drops either never reached WhatsApp or reached it without the acknowledgement coming
 * back (then it goes again under the same id, which the recipient sees once).
 */
export async function whatsappDrops(drops = 50): Promise<Row> {
  const key = 'sk-drill-wa-0123456789';
  const model = startFakeModel({ key, drill: true });
  const config = tempProject(
    { CONTAINER_IMAGE: IMAGE, IDLE_TIMEOUT: '60000', KIMI_BASE_URL: model.url },
    `KIMI_API_KEY=${key}\n`,
  );
  setupLogging(config, { terminalLevel: 'silent', secrets: [key] });
  const store = new Store(config.dbPath);
  const chat = '120363000000000001@g.us';
  addGroup(config, store, { jid: chat, name: 'Drill', folder: 'drill', requiresTrigger: false });
  const server = flakyServer(60_000);
  let seed = 7;
  const coin = () => {
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    return seed / 2 ** 31 < 0.5;
  };
  class DroppingWhatsApp extends RecordingWhatsApp {
    inFlight = 0;
    protected override async send(
      jid: string,
      given: AnyMessageContent,
      messageId: string,
    ): Promise<proto.IMessage | undefined> {
      if (!this.ready) throw new Error('offline');
      const text = 'text' in given ? given.text : '';
      this.inFlight++;
      await Bun.sleep(150); // in flight
      this.inFlight--;
      if (!this.ready) {
        if (coin()) this.delivered.push({ jid, text, messageId }); // it got there; the ack did not come back
        throw new Error('connection dropped while sending');
      }
      this.delivered.push({ jid, text, messageId });
      return { extendedTextMessage: { text } };
    }
  }
  const whatsapp = new DroppingWhatsApp({
    authDir: await linkedAuthDir(),
    assistantName: 'Andy',
    hasOwnNumber: false,
    waWebSocketUrl: server.url,
    mediaTreeFor: () => null,
    store,
    // The drill is about drops, not WhatsApp's pace: its clock runs 200 times fast, so the reconnects' backoff starts
    // at 5 ms (300 ms at most) and the rate limit's minute is 300 ms.
    clock: fastClock(200),
  });
  const host = new Host(config, store, [whatsapp], { recoverySweepMs: 60_000, ipcSweepMs: 60_000, sendRetryMs: 50 });
  const items: string[] = [];
  try {
    await host.start();
    openAsWhatsAppWould(socketOf(whatsapp));
    for (let i = 0; i < drops; i++) {
      const item = `w${i}`;
      items.push(item);
      const inbound = proto.WebMessageInfo.fromObject({
        key: { remoteJid: chat, participant: '4915100000002@s.whatsapp.net', fromMe: false, id: `3EB0DRILL${i}` },
        message: { conversation: item },
        messageTimestamp: Math.floor(Date.now() / 1000),
        pushName: 'Alice',
      }) as WAMessage;
      socketOf(whatsapp).ev.emit('messages.upsert', { messages: [inbound], type: 'notify' });
      // Drop the connection while the reply is on its way (or after a while, if none is).
      await until(() => whatsapp.inFlight > 0, 5_000);
      const before = whatsapp.socketsOpened;
      socketOf(whatsapp).ev.emit('connection.update', {
        connection: 'close',
        lastDisconnect: { error: new Error('drill drop'), date: new Date() },
      });
      await until(() => whatsapp.socketsOpened > before, 5_000);
      openAsWhatsAppWould(socketOf(whatsapp));
      socketOf(whatsapp).ev.emit('messages.upsert', { messages: [inbound], type: 'append' }); // WhatsApp delivers it again after a reconnect
    }
    const reached = () =>
      whatsapp.delivered.map((d) => ({ messageId: d.messageId, jid: d.jid, text: d.text.replace(/^Andy: /, '') }));
    await until(() => tally(items, reached(), named).lost === 0, 120_000);
    await host.settleOutbox();
    const t = tally(items, reached(), named);
    const unsent = store.unsent('whatsapp').length;
    return {
      drill: `WhatsApp socket dropped ${drops} times, sends in flight`,
      kills: 0,
      items: t.items,
      lost: t.lost,
      doubled: t.doubled,
      stuck: unsent,
      note: `${t.resentSameId} sent again under the same id after a lost ack`,
    };
  } finally {
    await host.stop();
    store.close();
    server.stop();
    model.stop();
  }
}

export const FAULT_DRILLS = { dbLocked, walReadOnly, logUnwritable, containerKilled, whatsappDrops };

if (import.meta.main) {
  const rows: Row[] = [];
  const only = process.argv.slice(2);
  const unknown = only.filter((name) => !(name in FAULT_DRILLS));
  if (unknown.length) {
    console.error(
      `Unknown drill ${unknown.join(', ')}.\nUsage: bun drills/faults.ts [${Object.keys(FAULT_DRILLS).join('|')} …]`,
    );
    process.exit(2);
  }
  for (const drill of Object.values(FAULT_DRILLS).filter((d) => only.length === 0 || only.includes(d.name))) {
    process.stderr.write(`running ${drill.name}…\n`);
    rows.push(await drill());
  }
  printTable('Fault drills (the real host and image)', rows);
  process.exit(rows.some((r) => r.lost + r.doubled + r.stuck > 0 || (r.note ?? '').includes('DIED')) ? 1 : 0);
}
