/**
 * The outbox sender with a real SQLite outbox, a channel that fails on purpose, and a clock
 * the test moves: no chat holds up another, a failing chat waits with backoff, nothing is
 * marked sent that was not delivered, and a part is abandoned only after hours of failing
 * while the channel was up, with someone told.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { type OutboundMessage, OutboxSender, Store, setupLogging } from '../nanoclaw.ts';
import { FakeClock, RecordingChannel, settle, tempDir, tempProject } from './helpers.ts';

/** A channel that refuses to deliver to the chats in `broken` (as WhatsApp would for a chat it cannot reach). */
class FlakyChannel extends RecordingChannel {
  readonly broken = new Set<string>();
  attempts = 0;
  override async deliver(jid: string, text: string, messageId: string): Promise<void> {
    this.attempts++;
    if (this.broken.has(jid)) throw new Error(`cannot reach ${jid}`);
    await super.deliver(jid, text, messageId);
  }
}

const A = 'a@g.us';
const B = 'b@g.us';
const open: { store: Store; sender: OutboxSender }[] = [];
afterEach(() => {
  for (const { store, sender } of open.splice(0)) {
    sender.stop();
    store.close();
  }
});

function setup() {
  setupLogging(tempProject(), { terminalLevel: 'silent' });
  const store = new Store(join(tempDir(), 'messages.db'));
  const channel = new FlakyChannel([A, B]);
  const clock = new FakeClock();
  const abandoned: { part: OutboundMessage; error: string }[] = [];
  const sender = new OutboxSender(store, channel, {
    clock,
    onAbandoned: (part, error) => abandoned.push({ part, error }),
  });
  open.push({ store, sender });
  const add = (jid: string, text: string) => store.addOutbound(channel.name, jid, text, `ID-${jid}-${text}`);
  const sent = (jid: string) => channel.sent.filter((s) => s.jid === jid).map((s) => s.text);
  return { store, channel, clock, sender, abandoned, add, sent };
}

describe('the outbox', () => {
  it('a chat whose sends fail holds up no other chat; it waits with growing backoff and then sends in order', async () => {
    const { channel, clock, sender, add, sent, store } = setup();
    channel.broken.add(A);
    add(A, 'a1');
    add(A, 'a2');
    add(B, 'b1');
    sender.kick();
    await sender.settle();
    expect(sent(B)).toEqual(['b1']);
    expect(sent(A)).toEqual([]);
    // The failing chat is tried again after a backoff that grows (jittered within its upper half).
    const waits: number[] = [];
    for (let i = 0; i < 4; i++) {
      const [wait] = clock.pending;
      waits.push(wait!);
      await clock.advance(wait!);
      await sender.settle();
    }
    expect(waits[0]).toBeGreaterThanOrEqual(2_500); // 5 s, jittered down to half
    expect(waits[0]).toBeLessThanOrEqual(5_000);
    expect(waits[3]).toBeGreaterThanOrEqual(20_000);
    expect(waits[3]).toBeLessThanOrEqual(40_000);
    expect(store.unsent(channel.name).length).toBe(2); // nothing marked sent that was not delivered
    add(B, 'b2'); // the other chat keeps going meanwhile
    sender.kick();
    await sender.settle();
    expect(sent(B)).toEqual(['b1', 'b2']);
    channel.broken.delete(A);
    await clock.advance(clock.pending[0]!);
    await sender.settle();
    expect(sent(A)).toEqual(['a1', 'a2']);
    expect(store.unsent(channel.name).length).toBe(0);
  });

  it('a flood from one chat does not make another wait behind it: one part per chat per round', async () => {
    const { channel, sender, add } = setup();
    for (let i = 0; i < 50; i++) add(A, `flood ${i}`);
    add(B, 'from main');
    sender.kick();
    await sender.settle();
    expect(channel.sent.findIndex((s) => s.jid === B)).toBeLessThanOrEqual(1);
    expect(channel.sent).toHaveLength(51);
  });

  it('an outage (channel down) is waited out however long; hours of failing while up abandon the part, and someone is told', async () => {
    const { channel, clock, sender, add, abandoned, store } = setup();
    channel.broken.add(A);
    add(A, 'lost cause');
    channel.ready = false;
    sender.kick();
    await sender.settle();
    expect(channel.attempts).toBe(0); // nothing is tried while the channel says it is down
    await clock.advance(10 * 3_600_000);
    channel.ready = true;
    sender.kick();
    await sender.settle();
    const upSince = clock.now();
    while (abandoned.length === 0 && clock.now() - upSince < 9 * 3_600_000) {
      await clock.advance(clock.pending[0] ?? 60_000);
      await sender.settle();
    }
    expect(clock.now() - upSince).toBeGreaterThanOrEqual(6 * 3_600_000); // not before the 6 h budget is used up
    expect(clock.now() - upSince).toBeLessThan(6 * 3_600_000 + 2 * 5 * 60_000); // nor long after (backoff capped at 5 min)
    expect(abandoned).toHaveLength(1);
    expect(abandoned[0]!.part.text).toBe('lost cause');
    expect(abandoned[0]!.error).toContain('cannot reach');
    expect(store.unsent(channel.name).length).toBe(0);
    // Kept in the table with its error, for a look.
    expect(store.db.query("SELECT error FROM outbox WHERE text = 'lost cause'").get()).toEqual({
      error: 'cannot reach a@g.us',
    });
    await settle();
  });

  it('a send the channel dropped under is tried again as soon as the channel is back, and outages do not grow the backoff', async () => {
    const { channel, clock, sender, add, sent } = setup();
    let drops = 0;
    const deliver = channel.deliver.bind(channel);
    channel.deliver = async (jid, text, messageId) => {
      if (drops < 12) {
        drops++;
        channel.ready = false; // the connection drops while this part is on its way
        throw new Error('connection dropped while sending');
      }
      return deliver(jid, text, messageId);
    };
    add(A, 'through the storm');
    for (let i = 0; i < 12; i++) {
      sender.kick();
      await sender.settle();
      channel.ready = true; // reconnected: the host's onReady kicks the sender
    }
    expect(clock.pending).toEqual([]); // no backoff timer: the next try comes with the reconnect
    sender.kick();
    await sender.settle();
    expect(sent(A)).toEqual(['through the storm']);
  });
});
