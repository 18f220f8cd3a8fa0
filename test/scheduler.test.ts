/**
 * Schedule arithmetic. Every expected instant below is worked out by hand from the
 * timezone rules (offsets noted next to each), not taken from the code's output.
 */
import { describe, expect, it } from 'vitest';
import { computeNextRun, parseOnceTime, ScheduleError } from '../nanoclaw.ts';

describe('parseOnceTime', () => {
  it('reads a local time without offset in the user’s timezone', () => {
    // Berlin in January is UTC+1.
    expect(parseOnceTime('2026-01-15 09:00', 'Europe/Berlin').toISOString()).toBe('2026-01-15T08:00:00.000Z');
    // Berlin in July is UTC+2 (summer time).
    expect(parseOnceTime('2026-07-15T09:00', 'Europe/Berlin').toISOString()).toBe('2026-07-15T07:00:00.000Z');
    // Kiritimati is UTC+14 all year: its 09:00 is the previous day 19:00 UTC.
    expect(parseOnceTime('2026-03-01 09:00', 'Pacific/Kiritimati').toISOString()).toBe('2026-02-28T19:00:00.000Z');
    // Pago Pago is UTC−11.
    expect(parseOnceTime('2026-03-01 20:30:15', 'Pacific/Pago_Pago').toISOString()).toBe('2026-03-02T07:30:15.000Z');
  });

  it('respects an explicit offset or Z', () => {
    expect(parseOnceTime('2026-01-15T09:00:00Z', 'Asia/Tokyo').toISOString()).toBe('2026-01-15T09:00:00.000Z');
    expect(parseOnceTime('2026-01-15T09:00:00+05:30', 'Europe/Berlin').toISOString()).toBe('2026-01-15T03:30:00.000Z');
  });

  it('lands on real instants around DST changes', () => {
    // Berlin springs forward on 2026-03-29 at 02:00 → 03:00 (UTC+1 → UTC+2).
    expect(parseOnceTime('2026-03-29 01:30', 'Europe/Berlin').toISOString()).toBe('2026-03-29T00:30:00.000Z');
    expect(parseOnceTime('2026-03-29 03:30', 'Europe/Berlin').toISOString()).toBe('2026-03-29T01:30:00.000Z');
    // New York falls back on 2026-11-01 at 02:00 → 01:00 (UTC−4 → UTC−5); 12:00 that day is UTC−5.
    expect(parseOnceTime('2026-11-01 12:00', 'America/New_York').toISOString()).toBe('2026-11-01T17:00:00.000Z');
    // A wall time that does not exist (02:30 on the spring-forward night) still yields an hour on that night.
    const gap = parseOnceTime('2026-03-29 02:30', 'Europe/Berlin').getTime();
    expect(gap).toBeGreaterThanOrEqual(Date.parse('2026-03-29T00:30:00Z'));
    expect(gap).toBeLessThanOrEqual(Date.parse('2026-03-29T01:30:00Z'));
  });

  it('refuses what is not a date-time, saying what to write', () => {
    expect(() => parseOnceTime('tomorrow at 9', 'UTC')).toThrow(ScheduleError);
    expect(() => parseOnceTime('tomorrow at 9', 'UTC')).toThrow('YYYY-MM-DD HH:MM');
    expect(() => parseOnceTime('2026-13-45T99:00:00Z', 'UTC')).toThrow(ScheduleError);
    expect(() => parseOnceTime('2026-02-30 10:00', 'UTC')).toThrow('not a real date');
    expect(() => parseOnceTime('2026-01-10 24:30', 'UTC')).toThrow('not a real date');
  });
});

describe('computeNextRun', () => {
  it('cron runs in the user’s timezone, across DST', () => {
    // Friday 2026-10-30 10:00 UTC; New York is UTC−4 until Sunday 2026-11-01, then UTC−5.
    const friday = new Date('2026-10-30T14:00:00Z'); // 10:00 in New York
    // Next weekday 09:00 New York after Friday 10:00 is Monday 2026-11-02 09:00 EST = 14:00 UTC.
    expect(computeNextRun('cron', '0 9 * * 1-5', 'America/New_York', friday)!.toISOString()).toBe(
      '2026-11-02T14:00:00.000Z',
    );
    // Daily 09:00 from Friday 10:00: Saturday 09:00 EDT = 13:00 UTC.
    expect(computeNextRun('cron', '0 9 * * *', 'America/New_York', friday)!.toISOString()).toBe(
      '2026-10-31T13:00:00.000Z',
    );
    // Same cron in Kiritimati (UTC+14): next 09:00 local after 2026-10-30T14:00Z (= Oct 31 04:00 local) is Oct 31 09:00 = Oct 30 19:00 UTC.
    expect(computeNextRun('cron', '0 9 * * *', 'Pacific/Kiritimati', friday)!.toISOString()).toBe(
      '2026-10-30T19:00:00.000Z',
    );
  });

  it('interval counts from the given instant; once is null when already past', () => {
    const from = new Date('2026-06-01T00:00:00Z');
    expect(computeNextRun('interval', '90000', 'UTC', from)!.toISOString()).toBe('2026-06-01T00:01:30.000Z');
    expect(computeNextRun('once', '2026-06-01 02:00', 'Europe/Berlin', from)).toBeNull(); // 00:00 UTC, i.e. already past
    expect(computeNextRun('once', '2026-06-01 03:00', 'Europe/Berlin', from)!.toISOString()).toBe(
      '2026-06-01T01:00:00.000Z',
    );
  });

  it('refuses invalid schedules with an example', () => {
    expect(() => computeNextRun('cron', 'every morning', 'UTC')).toThrow('e.g. "0 9 * * 1-5"');
    expect(() => computeNextRun('interval', '500', 'UTC')).toThrow('at least 1000');
    expect(() => computeNextRun('interval', '1.5e3x', 'UTC')).toThrow(ScheduleError);
  });
});
