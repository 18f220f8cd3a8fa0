/**
 * How fast is "what is new in this chat?" with a million stored messages?
 *
 *   bun bench/store.ts [totalMessages=1000000] [chats=1000]
 *
 * Fills a fresh store/messages.db-shaped database in a temp dir, then times
 * Store.messagesSince() (the query behind every agent run and follow-up) for random
 * chats with a realistic cursor (a few unanswered messages), against two baselines in
 * the same run: the same SQL forced onto a full table scan, and onto the (chat_jid, id)
 * unique index instead of messages_by_chat. Prints medians over many queries.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Store } from '../nanoclaw.ts';

const total = Number(process.argv[2] ?? 1_000_000);
const chats = Number(process.argv[3] ?? 1000);
const queries = 2000;
const dir = mkdtempSync(join(tmpdir(), 'nanoclaw-bench-'));
const store = new Store(join(dir, 'messages.db'));

const median = (values: number[]) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
};

console.log(`Filling ${total.toLocaleString()} messages across ${chats} chats…`);
let started = performance.now();
const insert = store.db.prepare(
  'INSERT INTO messages (id, chat_jid, sender, sender_name, content, timestamp, is_from_me, is_bot_message) VALUES (?, ?, ?, ?, ?, ?, 0, ?)',
);
const batch = 50_000;
for (let offset = 0; offset < total; offset += batch) {
  store.db.transaction(() => {
    for (let i = offset; i < Math.min(total, offset + batch); i++) {
      insert.run(
        `m${i}`,
        `chat${i % chats}@g.us`,
        'x@s.whatsapp.net',
        'Someone',
        `message number ${i} with some ordinary text`,
        new Date(1_700_000_000_000 + i * 1000).toISOString(),
        i % 7 === 0 ? 1 : 0,
      );
    }
  })();
  process.stdout.write(`\r  ${Math.min(total, offset + batch).toLocaleString()} / ${total.toLocaleString()}`);
}
const fillSeconds = (performance.now() - started) / 1000;
console.log(
  `\n  filled in ${fillSeconds.toFixed(1)} s (${Math.round(total / fillSeconds).toLocaleString()} inserts/s, batched)`,
);

// A cursor a few messages behind the end of each chat: the usual case.
const cursors = new Map<string, number>();
for (const row of store.db
  .query<{ chat_jid: string; seq: number }, []>(
    'SELECT chat_jid, MAX(seq) - 5 * ? AS seq FROM messages GROUP BY chat_jid'.replace('?', String(chats)),
  )
  .all()) {
  cursors.set(row.chat_jid, row.seq);
}
const pick = () => `chat${Math.floor(Math.random() * chats)}@g.us`;

function time(label: string, run: (chat: string, after: number) => unknown[], count: number): number {
  const samples: number[] = [];
  let rows = 0;
  for (let i = 0; i < count; i++) {
    const chat = pick();
    const t = performance.now();
    rows += run(chat, cursors.get(chat)!).length;
    samples.push(performance.now() - t);
  }
  const ms = median(samples);
  console.log(
    `  ${label.padEnd(46)} median ${(ms * 1000).toFixed(1).padStart(9)} µs   (${(rows / count).toFixed(1)} rows/query)`,
  );
  return ms;
}

const baselineSql = (hint: string, seq = 'seq') =>
  `SELECT * FROM (SELECT * FROM messages ${hint} WHERE chat_jid = ? AND ${seq} > ? AND is_bot_message = 0 ORDER BY seq DESC LIMIT 500) ORDER BY seq`;
// "+seq" stops SQLite from using the rowid range, so this really reads the whole table.
const scan = store.db.prepare(baselineSql('NOT INDEXED', '+seq'));
const uniqueIndex = store.db
  .query<{ name: string }, []>(
    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages' AND name LIKE 'sqlite_autoindex%'",
  )
  .get()!.name;
const viaUnique = store.db.prepare(baselineSql(`INDEXED BY ${uniqueIndex}`));

console.log(`\nmessagesSince() over ${total.toLocaleString()} messages:`);
const ours = time('Store.messagesSince (index messages_by_chat)', (c, a) => store.messagesSince(c, a), queries);
const unique = time(`same SQL, INDEXED BY ${uniqueIndex}`, (c, a) => viaUnique.all(c, a), Math.max(20, queries / 20));
const full = time('same SQL, NOT INDEXED (full scan)', (c, a) => scan.all(c, a), 15);
console.log(`\n  ratio full scan / ours:     ${(full / ours).toFixed(0)}×`);
console.log(`  ratio (chat_jid,id) / ours: ${(unique / ours).toFixed(1)}×`);

started = performance.now();
const plan = store.db
  .query<{ detail: string }, [string, number]>(`EXPLAIN QUERY PLAN ${baselineSql('')}`)
  .all('chat1@g.us', 0);
console.log(`  plan: ${plan.map((p) => p.detail).join(' | ')}`);
store.close();
rmSync(dir, { recursive: true, force: true });
