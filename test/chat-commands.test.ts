/**
 * Chat commands (/help, /status, /reset) through the host with a RecordingChannel and the
 * fake docker: answered by the host, never by a container, only for senders who may drive
 * the agent, and never shown to the agent.
 */
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { chatCommand } from '../nanoclaw.ts';
import {
  RecordingChannel,
  fakeDocker,
  startWorld,
  taskRow,
  tempProject,
  texts,
  waitFor,
  type FakeDocker,
  type World as HostWorld,
} from './helpers.ts';

const SECRET = 'sk-chat-commands-abcdefghijkl';
const MAIN = 'me@s.whatsapp.net';
const FAMILY = 'family@g.us';
const CLUB = 'club@g.us';
const BOB = '4915100000002@s.whatsapp.net';
const MALLORY = { sender: '4915100000009@s.whatsapp.net', senderName: 'Mallory', isFromMe: false };

type World = HostWorld & { docker: FakeDocker };

async function world(): Promise<World> {
  const docker = fakeDocker();
  const w = await startWorld({
    config: tempProject({ CONTAINER_RUNTIME: docker.path, TZ: 'UTC' }, `KIMI_API_KEY=${SECRET}\n`),
    channel: new RecordingChannel([MAIN, FAMILY, CLUB]),
    groups: [
      { jid: MAIN, name: 'Me', folder: 'main', isMain: true },
      { jid: FAMILY, name: 'Family', folder: 'family' },
      { jid: CLUB, name: 'Club', folder: 'club', allow: [BOB] },
    ],
    secrets: [SECRET],
  });
  return { ...w, docker };
}

const prompts = (w: World) => w.docker.runs().map((run) => (JSON.parse(run.stdin!) as { prompt: string }).prompt);

describe('which messages are chat commands', () => {
  it('a whole message of / and a known word (any case), alone or after the trigger; anything more is text', () => {
    expect(chatCommand('/status', '@Andy')).toBe('status');
    expect(chatCommand('  /RESET ', '@Andy')).toBe('reset');
    expect(chatCommand('@andy /help', '@Andy')).toBe('help');
    expect(chatCommand('[replying to: "Andy: done"]\n/status', '@Andy')).toBe('status');
    for (const text of ['/reset the plan', 'please /status', '/statuses', '/unknown', 'status', '@Bob /help', '//help'])
      expect(chatCommand(text, '@Andy'), text).toBeNull();
  });
});

describe('chat commands through the host', () => {
  it('/help and /status are answered by the host, with no container; the agent never sees them', async () => {
    const w = await world();
    const soon = new Date(Date.now() + 3_600_000).toISOString();
    w.store.createTask(taskRow({ id: 't-fam', groupFolder: 'family', chatJid: FAMILY, nextRun: soon }));
    w.store.createTask(taskRow({ id: 't-fam-2', groupFolder: 'family', chatJid: FAMILY, status: 'paused' }));
    w.channel.receive(FAMILY, 'just chatting', { sender: BOB, senderName: 'Bob', isFromMe: false }); // context, no trigger
    await waitFor(() => !w.host.queue.isBusy(FAMILY), 60_000, 'the queue done looking at it');
    w.channel.receive(FAMILY, '/help', { sender: BOB, senderName: 'Bob', isFromMe: false });
    await waitFor(() => texts(w, FAMILY).length === 1, 60_000, 'the help');
    expect(texts(w, FAMILY)[0]).toBe(
      "Andy: /help: these commands\n/status: what is running, waiting and scheduled (in the main chat: every group's)\n/reset: start this chat's conversation over (the agent forgets the session; its memory, CLAUDE.md, stays)\nStart anything else with @Andy to ask the agent.",
    );
    w.channel.receive(FAMILY, '@Andy /status', { sender: BOB, senderName: 'Bob', isFromMe: false });
    await waitFor(() => texts(w, FAMILY).length === 2, 60_000, 'the group’s status');
    const next = soon.slice(0, 16).replace('T', ' ');
    expect(texts(w, FAMILY)[1]).toBe(
      `Andy: Family: agent idle, 1 message waiting, 1 task scheduled (next ${next}), 1 paused`,
    );
    w.channel.receive(MAIN, '/status');
    await waitFor(() => texts(w, MAIN).length === 1, 60_000, 'main’s status');
    expect(texts(w, MAIN)[0]).toBe(
      `Andy: Me: agent idle, 0 messages waiting, 0 tasks scheduled\nFamily: agent idle, 1 message waiting, 1 task scheduled (next ${next}), 1 paused\nClub: agent idle, 0 messages waiting, 0 tasks scheduled\nContainers: 0 of ${w.config.maxConcurrentContainers} working, 0 of ${w.config.warmPool.size} ready. Times in UTC.`,
    );
    expect(w.docker.runs()).toHaveLength(0);
    // The agent's next turn has the chat's words, not the commands.
    w.channel.receive(FAMILY, '@Andy what did I miss?', { sender: BOB, senderName: 'Bob', isFromMe: false });
    await waitFor(() => texts(w, FAMILY).length === 3, 60_000, 'the agent’s answer');
    expect(prompts(w)).toHaveLength(1);
    expect(prompts(w)[0]).toContain('just chatting');
    expect(prompts(w)[0]).not.toContain('/help');
    expect(prompts(w)[0]).not.toContain('/status');
  });

  it('/reset forgets the session (row and files) and closes the live container; the next message starts a new conversation', async () => {
    const w = await world();
    w.channel.receive(MAIN, 'hello');
    await waitFor(() => texts(w, MAIN).length === 1, 60_000, 'the first answer');
    await waitFor(() => w.store.getSession('main') !== null, 60_000, 'the session saved');
    const sessions = join(w.config.dataDir, 'sessions', 'main', '.kimi', 'sessions');
    mkdirSync(sessions, { recursive: true });
    writeFileSync(join(sessions, 'context.jsonl'), '{}\n');
    w.channel.receive(MAIN, '!sleep 500'); // a turn of the live container, still going when /reset comes
    const handedOver = () => w.docker.calls().some((call) => (call.text ?? call.stdin ?? '').includes('!sleep 500'));
    await waitFor(handedOver, 60_000, 'the turn handed over');
    w.channel.receive(MAIN, '/reset');
    await waitFor(() => texts(w, MAIN).length === 2, 60_000, 'the reset answer');
    expect(texts(w, MAIN)[1]).toBe(
      'Andy: Done: the next message starts a new conversation. (The current one is closed first.)',
    );
    expect(w.store.getSession('main')).toBeNull();
    expect(existsSync(sessions)).toBe(false);
    await waitFor(() => texts(w, MAIN).length === 3, 60_000, 'the turn’s own answer');
    expect(texts(w, MAIN)[2]).toBe('Andy: slept 500');
    await waitFor(() => !w.host.queue.isRunning(MAIN), 60_000, 'the container closed');
    expect(w.store.getSession('main')).toBeNull(); // the turn that ended after the reset did not bring it back
    w.channel.receive(MAIN, 'fresh start');
    await waitFor(() => texts(w, MAIN).length === 4, 60_000, 'the next answer');
    const second = JSON.parse(w.docker.runs()[1]!.stdin!) as { sessionId?: string; prompt: string };
    expect(second.sessionId).toBeUndefined();
    expect(second.prompt).not.toContain('/reset');
  });

  it('only senders who may drive the agent; a copy delivered again is answered once', async () => {
    const w = await world();
    w.store.setSession('club', 'club-session');
    w.channel.receive(CLUB, '/reset', MALLORY); // not on the club's allowlist: just a message
    await waitFor(() => !w.host.queue.isBusy(CLUB), 60_000, 'the queue done looking at it');
    w.channel.receive(CLUB, '/status', { sender: BOB, senderName: 'Bob', isFromMe: false });
    await waitFor(() => texts(w, CLUB).length === 1, 60_000, 'Bob’s status');
    expect(texts(w, CLUB)[0]).toMatch(/^Andy: Club: agent idle, 1 message waiting/); // Mallory's, kept as context
    expect(w.store.getSession('club')).toBe('club-session');
    const again = w.channel.receive(MAIN, '/help');
    await waitFor(() => texts(w, MAIN).length === 1, 60_000, 'the help');
    w.channel.handlers!.onMessage(again, { name: 'Me', isGroup: false }); // WhatsApp delivers it again
    await w.host.settleOutbox();
    await Bun.sleep(100);
    expect(texts(w, MAIN)).toHaveLength(1);
    expect(w.docker.runs()).toHaveLength(0);
  });
});
