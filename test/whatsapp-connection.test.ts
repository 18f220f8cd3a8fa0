/**
 * The connection side of the WhatsApp channel, driven through a real baileys 7.0.0-rc14
 * socket (connected to a local WebSocket server, test/helpers.ts flakyServer) and its
 * event emitter. A close carries what baileys closes with: an error whose
 * output.statusCode is a DisconnectReason (lib/Types/index.d.ts) or one of
 * UNAUTHORIZED_CODES (lib/Defaults/index.js), as lib/Socket/socket.js raises them (Boom).
 * Time is a FakeClock: reconnect delays are read from its pending timers.
 */
import { afterEach, describe, expect, it } from 'vitest';
import {
  afterDisconnect,
  disconnectKind,
  setupLogging,
  WHATSAPP_STABLE_MS,
  type ChannelHandlers,
  type WhatsAppOptions,
} from '../nanoclaw.ts';
import {
  FakeClock,
  flakyServer,
  linkedAuthDir,
  openAsWhatsAppWould,
  RecordingWhatsApp,
  tempProject,
  waitFor,
} from './helpers.ts';

const DAY = 24 * 60 * 60_000;
const stops: (() => unknown)[] = [];
afterEach(async () => {
  for (const stop of stops.splice(0)) await stop();
});

/** How baileys closes a connection: a Boom with the status code (lib/Socket/socket.js end()). */
const boom = (statusCode: number, message = 'Connection Failure') =>
  Object.assign(new Error(message), { output: { statusCode } });

async function linkedChannel(extra: Partial<WhatsAppOptions> = {}) {
  setupLogging(tempProject(), { terminalLevel: 'silent' });
  const server = flakyServer(60_000);
  const clock = new FakeClock();
  const channel = new RecordingWhatsApp({
    authDir: await linkedAuthDir(),
    assistantName: 'Andy',
    hasOwnNumber: false,
    mediaTreeFor: () => null,
    waWebSocketUrl: server.url,
    reconnectBaseMs: 40,
    reconnectCapMs: 400,
    clock,
    ...extra,
  });
  stops.push(async () => {
    await channel.disconnect();
    server.stop();
  });
  return { channel, clock };
}

const closeWith = (channel: RecordingWhatsApp, error: Error) =>
  channel.socket!.ev.emit('connection.update', { connection: 'close', lastDisconnect: { error, date: new Date() } });

/** The reconnect the channel has scheduled (its delay), or null; the daily group sync is not one. */
const reconnectIn = (clock: FakeClock) => clock.pending.find((ms) => ms < DAY) ?? null;

describe('every disconnect reason, as baileys 7 defines it', () => {
  const noHandlers: ChannelHandlers = { onMessage: () => {} };
  const relink = 'Link this machine again: bun nanoclaw.ts auth --relink';
  const table: [number, string, 'stop' | 'now' | 'backoff', string?][] = [
    [401, 'logged-out', 'stop', relink],
    [403, 'unauthorized', 'stop', relink],
    [419, 'unauthorized', 'stop', relink],
    [411, 'device-mismatch', 'stop', relink],
    [440, 'replaced', 'stop', 'Another NanoClaw'],
    [515, 'restart', 'now'],
    [405, 'version-refused', 'backoff'],
    [408, 'network', 'backoff'],
    [428, 'network', 'backoff'],
    [500, 'other', 'backoff'],
    [503, 'other', 'backoff'],
  ];

  it.each(table)('%i (%s): %s', async (code, kind, then, says) => {
    const stopped: string[] = [];
    const { channel, clock } = await linkedChannel({ onStopped: (why) => stopped.push(why) });
    await channel.connect(noHandlers);
    openAsWhatsAppWould(channel.socket!);
    expect(disconnectKind(boom(code)).kind).toBe(kind);
    closeWith(channel, boom(code));
    if (then === 'stop') {
      expect(stopped).toHaveLength(1);
      expect(stopped[0]).toContain(says);
      expect(stopped[0]).toContain(`(${code}`);
      expect(reconnectIn(clock)).toBeNull(); // never again, however long
      await clock.advance(DAY - 1);
      expect(channel.socketsOpened).toBe(1);
      return;
    }
    expect(stopped).toEqual([]);
    const delay = reconnectIn(clock)!;
    if (then === 'now') expect(delay).toBe(0);
    else expect(delay).toBeGreaterThanOrEqual(20); // the first backoff step: 40 ms, jittered down to half
    await clock.advance(delay);
    await waitFor(() => channel.socketsOpened === 2, 5000, 'the next connection');
  });

  it('a 408 from an expired QR code and an OS network error are told apart from the rest', () => {
    expect(disconnectKind(boom(408, 'QR refs attempts ended')).kind).toBe('qr-expired');
    expect(disconnectKind(Object.assign(new Error('getaddrinfo'), { data: { code: 'ENOTFOUND' } })).kind).toBe(
      'network',
    );
    expect(afterDisconnect('qr-expired')).toEqual({ action: 'backoff' });
  });

  it('backs off exponentially up to the cap; a connection that drops at once never resets it, one that held does', async () => {
    const { channel, clock } = await linkedChannel();
    await channel.connect({ onMessage: () => {} });
    const dropAfter = async (openForMs: number) => {
      const opened = channel.socketsOpened;
      openAsWhatsAppWould(channel.socket!);
      await clock.advance(openForMs);
      closeWith(channel, boom(428, 'Connection Terminated'));
      const delay = reconnectIn(clock)!;
      await clock.advance(delay);
      await waitFor(() => channel.socketsOpened === opened + 1, 5000, 'the next connection');
      return delay;
    };
    const quick: number[] = [];
    for (let i = 0; i < 6; i++) quick.push(await dropAfter(1_000));
    const ceilings = [40, 80, 160, 320, 400, 400]; // base 40 ms, doubled, capped at 400 ms
    quick.forEach((delay, i) => {
      expect(delay).toBeGreaterThanOrEqual(ceilings[i]! / 2);
      expect(delay).toBeLessThanOrEqual(ceilings[i]!);
    });
    expect(await dropAfter(WHATSAPP_STABLE_MS)).toBeLessThanOrEqual(40); // it held: back to the first step
  });

  it('a restart WhatsApp asks for (515) does not count as a failure', async () => {
    const { channel, clock } = await linkedChannel();
    await channel.connect({ onMessage: () => {} });
    closeWith(channel, boom(428));
    await clock.advance(reconnectIn(clock)!);
    await waitFor(() => channel.socketsOpened === 2, 5000, 'second connection');
    closeWith(channel, boom(515, 'Stream Errored (restart required)'));
    expect(reconnectIn(clock)).toBe(0);
    await clock.advance(0);
    await waitFor(() => channel.socketsOpened === 3, 5000, 'third connection');
    closeWith(channel, boom(428));
    expect(reconnectIn(clock)).toBeLessThanOrEqual(80); // the second step, not the third
    expect(reconnectIn(clock)).toBeGreaterThanOrEqual(40);
  });
});
