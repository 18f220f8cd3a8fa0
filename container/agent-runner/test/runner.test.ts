/**
 * The agent-runner outside Docker, with the real Kimi Code CLI (the pinned npm package,
 * under Bun) over ACP, the real MCP server, and the scripted model (fake-model.ts) as the
 * only double, at the HTTP boundary. HOME and the workspace live in temp folders.
 */
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { KEY_ENV } from '../src/config.ts';
import { FRESH_SESSION_NOTE } from '../src/runner.ts';
import { startFakeModel } from '../../../scripts/scripted-model.ts';
import {
  close,
  followUp,
  hostAnswering,
  input,
  type Live,
  messages,
  runRunner,
  until,
  type Workspace,
  workspace,
} from './helpers.ts';

// Each run starts the real CLI (seconds on a busy machine), and some tests run several.
vi.setConfig({ testTimeout: 240_000 });

const KEY = 'sk-runner-test-abcdef';
/** The scripted model the CLI calls over HTTP, as it calls Moonshot; it checks the key. */
const model = startFakeModel({ key: KEY });
afterAll(() => model.stop());

const run = (
  ws: Workspace,
  stdin: unknown,
  options: { during?: (live: Live) => Promise<void>; env?: Record<string, string> } = {},
) => runRunner(ws, stdin, { modelUrl: model.url, ...options });

/** Every file under a folder, recursively, with its text (for "no key left anywhere"). */
function allText(dir: string): string {
  let text = '';
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile()) continue;
    text += readFileSync(join(entry.parentPath, entry.name), 'latin1');
  }
  return text;
}

/** The question the runner relayed to the chat (an IPC message that expects a reply), once it is there. */
async function relayed(ws: Workspace): Promise<{ text: string; expectsReply: boolean }> {
  const dir = join(ws.ws, 'ipc', 'messages');
  await until(() => readdirSync(dir).some((f) => !f.startsWith('.')), 'the question in the chat');
  const file = readdirSync(dir).find((f) => !f.startsWith('.'))!;
  return JSON.parse(readFileSync(join(dir, file), 'utf8'));
}

describe('the runner drives Kimi Code CLI', () => {
  it('answers, says which session it used, resumes it next time, and leaves no key anywhere in the group’s files', async () => {
    const ws = workspace();
    const first = await run(ws, input(messages('remember the word kumquat'), KEY, { upTo: 41 }));
    expect(first.code).toBe(0);
    expect(first.results).toEqual([
      {
        status: 'success',
        result: '[stub] remember the word kumquat',
        sessionId: expect.stringMatching(/^session_/),
        upTo: 41,
      },
    ]);
    const sessionId = first.results[0]!.sessionId!;
    expect(first.stderr).toContain(`Session initialized: ${sessionId}`);

    const second = await run(ws, input(messages('what was the word?'), KEY, { sessionId }));
    expect(second.results[0]).toMatchObject({ status: 'success', sessionId });
    expect(second.stderr).toContain(`Session initialized: ${sessionId}`);
    // The model was sent the first turn again: the session really resumed.
    const last = model.requests.at(-1)!.body.messages!;
    expect(JSON.stringify(last)).toContain('remember the word kumquat');
    expect(allText(ws.home)).not.toContain(KEY);
    expect(readFileSync(join(ws.home, '.kimi', 'config.toml'), 'utf8')).toContain(`api_key_env = "${KEY_ENV}"`);
  });

  it('an unknown session (the old CLI’s, or cleared) starts a new one, and the result names it', async () => {
    const ws = workspace();
    const legacy = '3f2b8c1e-1111-4222-8333-944445555666';
    const { results, stderr } = await run(ws, input('hello', KEY, { sessionId: legacy }));
    expect(results[0]).toMatchObject({ status: 'success', result: '[stub] hello' });
    expect(results[0]!.sessionId).not.toBe(legacy);
    expect(stderr).toContain(`session ${legacy} cannot be resumed`);
  });

  it('puts the role and both memories into the system prompt (the shared one only for non-main), around the CLI’s own', async () => {
    const memories = { global: 'GLOBAL-MARKER tea', group: 'GROUP-MARKER dinner' };
    const family = await run(workspace(memories), input('!context', KEY));
    const prompt = family.results[0]!.result!;
    expect(prompt).toContain('You are Andy');
    expect(prompt).toContain('GLOBAL-MARKER tea');
    expect(prompt).toContain('GROUP-MARKER dinner');
    expect(prompt).toContain('Kimi Code CLI'); // ${base_prompt}: the CLI's own instructions are kept
    const main = await run(workspace(memories), input('!context', KEY, { isMain: true, groupFolder: 'main' }));
    expect(main.results[0]!.result).not.toContain('GLOBAL-MARKER');
  });

  it('memory edited after the session began reaches the model with the next prompt, once', async () => {
    const ws = workspace({ group: 'OLD-MEMORY' }, true);
    const first = await run(ws, input('hi', KEY), {
      during: async (live) => {
        await until(() => live.results().length === 1, 'the first answer');
        close(ws);
      },
    });
    writeFileSync(join(ws.ws, 'group', 'CLAUDE.md'), 'NEW-MEMORY');
    const sessionId = first.results[0]!.sessionId!;
    const { results } = await run(ws, input('!context', KEY, { sessionId }), {
      during: async (live) => {
        await until(() => live.results().length === 1, 'the first answer');
        followUp(ws, '!context');
        await until(() => live.results().length === 2, 'the second answer');
        close(ws);
      },
    });
    expect(results[0]!.result).toContain('<memory-update>');
    expect(results[0]!.result).toContain('NEW-MEMORY');
    // The second turn's request holds the update once (in the first turn), not again.
    expect(results[1]!.result!.match(/<memory-update>/g)).toHaveLength(1);
  });

  it('no key → the model refuses (401) and the result says so as `auth`, exit 1', async () => {
    const { results, code } = await run(workspace(), input('hello', ''));
    expect(code).toBe(1);
    expect(results).toEqual([expect.objectContaining({ status: 'error', errorKind: 'auth' })]);
  });

  it('takes the key from /workspace/env-dir/env when stdin has none (the guide’s manual test)', async () => {
    const ws = workspace();
    const envDir = join(ws.ws, 'env-dir');
    Bun.spawnSync(['mkdir', '-p', envDir]);
    writeFileSync(join(envDir, 'env'), `KIMI_API_KEY=${KEY}\n`);
    const { results, code } = await run(ws, {
      prompt: 'What is 2+2?',
      groupFolder: 'test',
      chatJid: 'test@g.us',
      isMain: false,
    });
    expect(code).toBe(0);
    expect(results[0]).toMatchObject({ status: 'success', result: '[stub] What is 2+2?' });
  });

  it('provider errors come back sorted: 400 not worth a retry, 429 and 503 after the CLI’s own short retries', async () => {
    const cases = [
      ['!fail the request is malformed', 'bad-request', 1],
      ['!status 429 slow down', 'rate-limit', 3],
      ['!status 503 down for maintenance', 'unavailable', 3],
    ] as const;
    await Promise.all(
      cases.map(async ([prompt, kind, attempts]) => {
        const before = model.requests.filter((r) => JSON.stringify(r.body).includes(prompt)).length;
        const { results, code } = await run(workspace(), input(prompt, KEY));
        expect(code).toBe(1);
        expect(results).toEqual([expect.objectContaining({ status: 'error', errorKind: kind })]);
        expect(results[0]!.error).toContain(prompt.split(' ').slice(2).join(' '));
        expect(model.requests.filter((r) => JSON.stringify(r.body).includes(prompt)).length - before).toBe(attempts);
      }),
    );
  });

  it('a short outage is absorbed by the CLI’s retries within the turn', async () => {
    const { results } = await run(workspace(), input('!flaky 503 1', KEY));
    expect(results[0]).toMatchObject({ status: 'success', result: '[stub] recovered' });
  });

  it('broken stdin gives an error result, not a hang', async () => {
    const { results, code } = await run(workspace(), '{"prompt":');
    expect(code).toBe(1);
    expect(results[0]).toMatchObject({ status: 'error', error: expect.stringContaining('not JSON') });
  });
});

describe('turns as the session records them', () => {
  it('a turn of several steps: each step’s words are their own message, never glued', async () => {
    const { results } = await run(workspace(), input('!steps', KEY));
    expect(results[0]).toMatchObject({ status: 'success', result: 'Here is the answer.', earlier: ['Let me check.'] });
  });

  it('a step cut off mid-stream and retried is said once, not glued to its retry', async () => {
    const { results } = await run(workspace(), input('!cut here is the weather in Berlin', KEY));
    expect(results[0]).toMatchObject({ status: 'success', result: '[stub] here is the weather in Berlin' });
    expect(results[0]!.earlier).toBeUndefined();
  });

  it('a context that is too long: the CLI compacts it and answers; its compaction notes are not in the answer', async () => {
    const ws = workspace();
    const first = await run(ws, input('first words', KEY));
    const { results } = await run(ws, input('!context-full', KEY, { sessionId: first.results[0]!.sessionId }));
    expect(results[0]).toMatchObject({ status: 'success', result: '[stub] fits now' });
    expect(JSON.stringify(results)).not.toMatch(/Compact/);
    expect(JSON.stringify(results)).not.toContain(FRESH_SESSION_NOTE);
  });

  it('a tool call the CLI does not offer (plan mode) fails as a tool error and the turn goes on', async () => {
    const { results, code } = await run(workspace(), input('!tool EnterPlanMode {}', KEY));
    expect(code).toBe(0);
    expect(results[0]!.status).toBe('success');
    expect(results[0]!.result).toMatch(/^tool error: /);
    const tools = model.requests.at(-1)!.body.tools!.map((t) => t.function.name);
    expect(tools).toContain('Bash');
    expect(tools).not.toContain('EnterPlanMode');
    expect(tools).not.toContain('CronCreate');
  });

  it('the model sees a picture: ReadMediaFile hands it over as an image', async () => {
    const ws = workspace();
    const png = Buffer.from(
      'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==',
      'base64',
    );
    Bun.spawnSync(['mkdir', '-p', join(ws.ws, 'group', 'media')]);
    const path = join(ws.ws, 'group', 'media', 'dot.png');
    writeFileSync(path, png);
    const { results } = await run(ws, input(messages(`[image: ${path}] !image what is this?`), KEY));
    expect(results[0]!.result).toMatch(/^\[stub\] I see image\/png, \d+ bytes, sha256 [0-9a-f]{12}$/);
  });

  it('send_message through the real MCP server writes an IPC file and reports the host’s decision; a non-main group cannot register groups', async () => {
    const ws = workspace();
    const stop = hostAnswering(join(ws.ws, 'ipc'));
    const sent = await run(ws, input('!tool mcp__nanoclaw__send_message {"text":"on my way"}', KEY)).finally(stop);
    expect(sent.results[0]!.result).toBe('Message sent to this chat.');
    const files = readdirSync(join(ws.ws, 'ipc', 'messages'));
    expect(files).toHaveLength(1);
    expect(JSON.parse(readFileSync(join(ws.ws, 'ipc', 'messages', files[0]!), 'utf8'))).toMatchObject({
      type: 'message',
      chatJid: 'family@g.us',
      text: 'on my way',
    });
    const refused = await run(
      ws,
      input('!tool mcp__nanoclaw__register_group {"jid":"1@g.us","name":"x","folder":"x"}', KEY),
    );
    expect(refused.results[0]!.result).toMatch(/^tool error: .*only available in the main chat/);
    expect(readdirSync(join(ws.ws, 'ipc', 'tasks'))).toEqual([]);
  });
});

describe('follow-ups, tasks and questions', () => {
  it('follow-ups are turns of their own, in order; each result says up to which message it answered; _close ends with exit 0', async () => {
    const ws = workspace({}, true);
    const { results, code } = await run(ws, input(messages('!sleep 1500'), KEY, { upTo: 10 }), {
      during: async (live) => {
        await until(() => live.stderr().includes('timing prompt'), 'the first turn');
        followUp(ws, messages('second'), 11); // arrives during the first turn: queued
        followUp(ws, messages('third'), 12);
        await until(() => live.results().length === 2, 'two answers');
        followUp(ws, messages('fourth'), 15);
        await until(() => live.results().length === 3, 'three answers');
        close(ws);
      },
      env: { NANOCLAW_TIMING: '1' },
    });
    expect(code).toBe(0);
    expect(results.map((r) => [r.result, r.upTo])).toEqual([
      ['[stub] slept 1500', 10],
      ['[stub] third', 12], // second and third came during turn 1: one turn, answered together
      ['[stub] fourth', 15],
    ]);
  });

  it('follow-ups and _close still arrive when file events do not (watching off: the safety poll alone)', async () => {
    const ws = workspace({}, true);
    const { results, code } = await run(ws, input('one', KEY), {
      during: async (live) => {
        await until(() => live.results().length === 1, 'the first answer');
        followUp(ws, 'two');
        await until(() => live.results().length === 2, 'the follow-up answer');
        close(ws);
      },
      env: { NANOCLAW_INBOX_WATCH: '0', NANOCLAW_INBOX_POLL_MS: '100' },
    });
    expect(code).toBe(0);
    expect(results.map((r) => r.result)).toEqual(['[stub] one', '[stub] two']);
  });

  it('a task handed to a waiting container is its own turn, in the same session, told nobody sent it', async () => {
    const ws = workspace({}, true);
    const { results } = await run(ws, input('hello', KEY), {
      during: async (live) => {
        await until(() => live.results().length === 1, 'the first answer');
        followUp(ws, 'water the plants', undefined, 'task');
        await until(() => live.results().length === 2, 'the task answer');
        close(ws);
      },
    });
    expect(results[1]).toMatchObject({ status: 'success', result: '[stub] water the plants', task: true });
    expect(results[1]!.sessionId).toBe(results[0]!.sessionId);
    const request = JSON.stringify(model.requests.at(-1)!.body.messages);
    expect(request).toContain('[Scheduled task: this was not sent by a person just now.');
  });

  it('a question goes to the chat with numbered options; the reply by number answers it, and the turn covers the reply', async () => {
    const ws = workspace({}, true);
    const { results } = await run(ws, input(messages('!ask Which day? | Saturday | Sunday'), KEY, { upTo: 20 }), {
      during: async (live) => {
        const question = await relayed(ws);
        expect(question.expectsReply).toBe(true);
        expect(question.text).toContain('Which day?\n1. Saturday\n2. Sunday');
        followUp(ws, messages('2'), 21);
        await until(() => live.results().length === 1, 'the answer');
        close(ws);
      },
    });
    expect(results[0]).toMatchObject({ result: '[stub] answered: {"Which day?":"Sunday"}', upTo: 21 });
  });

  it('a reply in the person’s own words leaves the question unanswered and is the next turn', async () => {
    const ws = workspace({}, true);
    const { results } = await run(ws, input(messages('!ask Which day? | Saturday | Sunday'), KEY, { upTo: 30 }), {
      during: async (live) => {
        await relayed(ws);
        followUp(ws, messages('whenever it does not rain'), 31);
        await until(() => live.results().length === 2, 'both turns');
        close(ws);
      },
    });
    expect(results.map((r) => [r.result, r.upTo])).toEqual([
      [expect.stringMatching(/^\[stub\] no answer: /), 30],
      ['[stub] whenever it does not rain', 31],
    ]);
  });

  it('no answer in time, or nobody to ask (a scheduled task): the agent is told, and decides itself', async () => {
    const ws = workspace({}, true);
    const timedOut = await run(ws, input('!ask Which day? | Saturday | Sunday', KEY), {
      during: async (live) => {
        await until(() => live.results().length === 1, 'the answer');
        close(ws);
      },
      env: { NANOCLAW_QUESTION_TIMEOUT_MS: '300' },
    });
    expect(timedOut.results[0]!.result).toMatch(/^\[stub\] no answer: /);
    const task = await run(workspace(), input('!ask Which day? | Saturday | Sunday', KEY, { isScheduledTask: true }));
    expect(task.results[0]!.result).toMatch(/^\[stub\] no answer: /);
  });
});

describe('a CLI that fails mid-turn fails the turn at once', () => {
  it('the CLI killed during a turn: an error result, not a hang until the container’s timeout', async () => {
    const started = Date.now();
    // The Bash tool's parent is the CLI: the model asks it to kill its own CLI.
    const { results, code } = await run(workspace(), input('!shell kill -9 $PPID', KEY));
    expect(code).toBe(1);
    expect(results).toEqual([expect.objectContaining({ status: 'error', error: expect.stringMatching(/exited/) })]);
    expect(Date.now() - started).toBeLessThan(120_000);
  });

  it('a CLI silent past the limit: the turn is cancelled and fails', async () => {
    const { results, code } = await run(workspace(), input('!sleep 60000', KEY), {
      env: { NANOCLAW_TURN_SILENCE_MS: '1500' },
    });
    expect(code).toBe(1);
    expect(results).toEqual([
      expect.objectContaining({ status: 'error', error: expect.stringMatching(/sent nothing/) }),
    ]);
  });
});

describe('a warm start', () => {
  it('starts the CLI and its session with no prompt and no result; the first message is the first turn', async () => {
    const ws = workspace({}, true);
    const { results, stderr } = await run(ws, input('', KEY, { warm: true }), {
      during: async (live) => {
        await until(() => live.stderr().includes('timing cli-ready'), 'the CLI ready');
        expect(live.results()).toEqual([]);
        followUp(ws, messages('first message'), 5);
        await until(() => live.results().length === 1, 'the answer');
        close(ws);
      },
      env: { NANOCLAW_TIMING: '1' },
    });
    expect(results).toEqual([expect.objectContaining({ result: '[stub] first message', upTo: 5 })]);
    const phases = [...stderr.matchAll(/timing (\S+) (\d+)/g)].map((m) => m[1]);
    // Ready means ready: the CLI up, the session open and the CLI connected to the nanoclaw
    // tools (it listed them, over HTTP from the runner) before the first message is waited for.
    expect(phases).toEqual(['start', 'input', 'cli-up', 'session', 'mcp', 'cli-ready', 'prompt', 'result']);
    expect(stderr).toMatch(/ready: CLI up, session \S+ open, tools connected/);
  });

  it('closed before any message: exit 0 and nothing on stdout', async () => {
    const ws = workspace({}, true);
    const { stdout, code } = await run(ws, input('', KEY, { warm: true }), {
      during: async (live) => {
        await until(() => live.stderr().includes('Session initialized'), 'the session');
        close(ws);
      },
    });
    expect(code).toBe(0);
    expect(stdout).toBe('');
  });

  it('a warm input without an inbox is refused with what is missing', async () => {
    const { results, code } = await run(workspace(), input('', KEY, { warm: true }));
    expect(code).toBe(1);
    expect(results[0]!.error).toMatch(/needs the inbox/);
  });
});
