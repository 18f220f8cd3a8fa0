/** The inbox: a watch, and a safety poll for when file events do not come (bind mounts on Docker Desktop). */
import { mkdirSync, readdirSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Inbox } from '../src/runner.ts';
import { tempDir } from './helpers.ts';

/** Written as the host writes it: a dot-named temp file, renamed into place. */
const drop = (dir: string, name: string, text: string, type = 'message', upTo?: number) => {
  writeFileSync(join(dir, `.${name}`), JSON.stringify({ type, text, ...(upTo !== undefined ? { upTo } : {}) }));
  renameSync(join(dir, `.${name}`), join(dir, name));
};
const inboxes: Inbox[] = [];
const open = (dir: string, options: ConstructorParameters<typeof Inbox>[1]) => {
  const inbox = new Inbox(dir, options);
  inboxes.push(inbox);
  inbox.start();
  return inbox;
};
afterAll(() => {
  for (const inbox of inboxes) inbox.stop();
});
const HOUR = 3_600_000;

describe('the inbox', () => {
  it('a file event wakes the wait between turns: nothing else could within the test (the safety poll is an hour)', async () => {
    const dir = tempDir();
    const inbox = open(dir, { pollMs: HOUR });
    expect(inbox.watching).toBe(true);
    const waiting = inbox.nextInput(HOUR);
    drop(dir, '1-a.json', 'hello', 'message', 4);
    expect(await waiting).toEqual({ kind: 'turn', item: { kind: 'message', text: 'hello', upTo: 4 } });
    expect(readdirSync(dir)).toEqual([]);
  });

  it('_close ends the wait at once, through the watch', async () => {
    const dir = tempDir();
    const inbox = open(dir, { pollMs: HOUR });
    const waiting = inbox.nextInput(HOUR);
    writeFileSync(join(dir, '_close'), '');
    expect(await waiting).toEqual({ kind: 'close' });
    expect(inbox.closeRequested).toBe(true);
  });

  it('the safety poll alone finds files: with watching off, and where the folder cannot be watched', async () => {
    const dir = tempDir();
    const unwatched = open(dir, { pollMs: 30, watch: false });
    expect(unwatched.watching).toBe(false);
    const waiting = unwatched.nextInput(HOUR);
    drop(dir, '1-a.json', 'polled');
    expect(await waiting).toEqual({ kind: 'turn', item: { kind: 'message', text: 'polled' } });

    const later = join(tempDir(), 'input'); // not there yet when the inbox starts: no watch can be set up
    const polled = open(later, { pollMs: 30 });
    expect(polled.watching).toBe(false);
    const closing = polled.nextInput(HOUR);
    mkdirSync(later);
    writeFileSync(join(later, '_close'), '');
    expect(await closing).toEqual({ kind: 'close' });
  });

  it('reads in name order, joins what queued up into one turn, skips dotfiles and bad JSON; _close waits for the queue', async () => {
    const dir = tempDir();
    const inbox = open(dir, { pollMs: HOUR, watch: false });
    drop(dir, '2-b.json', 'second', 'message', 8);
    drop(dir, '1-a.json', 'first', 'message', 5);
    writeFileSync(join(dir, '3-c.json'), '{"type":');
    writeFileSync(join(dir, '.4-d.json'), JSON.stringify({ type: 'message', text: 'not yet' }));
    writeFileSync(join(dir, '_close'), '');
    expect(await inbox.nextInput(HOUR)).toEqual({
      kind: 'turn',
      item: { kind: 'message', text: 'first\nsecond', upTo: 8 },
    });
    expect(await inbox.nextInput(HOUR)).toEqual({ kind: 'close' });
    expect(readdirSync(dir)).toEqual(['.4-d.json']);
    const idle = open(tempDir(), { pollMs: HOUR });
    expect(await idle.nextInput(20)).toEqual({ kind: 'idle' });
  });

  it('a scheduled task is a turn of its own and never taken as an answer; a message waiting is', async () => {
    const dir = tempDir();
    const inbox = open(dir, { pollMs: HOUR });
    const answer = inbox.nextAnswer(50);
    drop(dir, '1-t.json', 'water the plants', 'task');
    expect(await answer).toBeNull();
    drop(dir, '2-m.json', 'my answer', 'message', 3);
    // A message that came while nobody waited for an answer is the answer once one is asked for.
    await Bun.sleep(0);
    inbox.poll();
    expect(await inbox.nextAnswer(HOUR)).toEqual({ kind: 'message', text: 'my answer', upTo: 3 });
    expect(await inbox.nextInput(HOUR)).toEqual({ kind: 'turn', item: { kind: 'task', text: 'water the plants' } });
  });

  it('a reply that answered nothing goes back to the front: it is the next turn', async () => {
    const dir = tempDir();
    const inbox = open(dir, { pollMs: HOUR, watch: false });
    drop(dir, '1-a.json', 'later one', 'message', 9);
    inbox.poll();
    inbox.requeue({ kind: 'message', text: 'own words', upTo: 7 });
    expect(await inbox.nextInput(HOUR)).toEqual({
      kind: 'turn',
      item: { kind: 'message', text: 'own words\nlater one', upTo: 9 },
    });
  });
});
