/**
 * The agent-runner outside Docker: the real runner, the real Kimi Agent SDK, the real MCP
 * server and client, with the kimi wire-protocol stub as the CLI. HOME and the workspace
 * live in temp dirs.
 */
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { startFakeModel } from '../kimi-stub/fake-model.ts';
import {
  buildAgentFile,
  buildConfigToml,
  buildMcpConfig,
  buildRole,
  keyFromEnvFile,
  scheduledTaskPrompt,
} from '../src/config.ts';
import { scheduleProblem, writeIpcFile } from '../src/mcp-server.ts';
import type { Session } from '@moonshot-ai/kimi-agent-sdk';
import {
  answerFor,
  cliWithOwnConfig,
  errorKind,
  FRESH_SESSION_NOTE,
  Inbox,
  parseInput,
  questionText,
  refreshSystemPrompt,
  RESULT_END,
  RESULT_START,
  sessionContextFile,
  startCli,
  timingMarks,
  withMemoryUpdate,
} from '../src/runner.ts';
import { connectMcp } from './mcp-client.ts';

const RUNNER_DIR = fileURLToPath(new URL('..', import.meta.url));
const STUB = join(RUNNER_DIR, 'kimi-stub', 'kimi');
const KEY = 'sk-runner-test-abcdef';
/** The scripted model the stub calls over HTTP, like the real CLI calls Moonshot; it checks the key. */
const model = startFakeModel({ key: KEY });
afterAll(() => model.stop());

/** A workspace; with `inbox` the runner stays for follow-ups (as under the host), else it answers once. */
function workspace(memories: { global?: string; group?: string } = {}, inbox = false) {
  const root = mkdtempSync(join(tmpdir(), 'nanoclaw-runner-'));
  const ws = join(root, 'workspace');
  for (const dir of ['group', 'global', 'ipc/messages', 'ipc/tasks', ...(inbox ? ['ipc/input'] : [])])
    mkdirSync(join(ws, dir), { recursive: true });
  mkdirSync(join(root, 'home'));
  if (memories.global) writeFileSync(join(ws, 'global', 'CLAUDE.md'), memories.global);
  if (memories.group) writeFileSync(join(ws, 'group', 'CLAUDE.md'), memories.group);
  return { root, ws, home: join(root, 'home') };
}

const messages = (...texts: string[]) =>
  `<messages>\n${texts.map((t) => `<message sender="Ann" time="2026-01-01 10:00">${t}</message>`).join('\n')}\n</messages>`;

type Result = {
  status: string;
  result: string | null;
  sessionId?: string;
  error?: string;
  earlier?: string[];
  errorKind?: string;
};

interface RunResult {
  results: Result[];
  stdout: string;
  stderr: string;
  code: number;
}

const parseResults = (out: string): Result[] =>
  [...out.matchAll(new RegExp(`${RESULT_START}\\n(.*)\\n${RESULT_END}`, 'g'))].map((m) => JSON.parse(m[1]!) as Result);

/** Waits until check() holds, looking every 10 ms; fails (naming what) after 15 s. */
async function until(check: () => boolean, what: string): Promise<void> {
  for (const started = Date.now(); !check(); await Bun.sleep(10)) {
    if (Date.now() - started > 15_000) throw new Error(`still waiting for ${what}`);
  }
}

/** The runner while it runs: what it has said so far. */
interface Live {
  results(): Result[];
  stderr(): string;
}

/** Runs the runner as the container would; `during` can watch it and drop follow-up files while it runs. */
async function runRunner(
  ws: ReturnType<typeof workspace>,
  input: unknown,
  during?: (live: Live) => Promise<void>,
  env: Record<string, string> = {},
): Promise<RunResult> {
  const proc = Bun.spawn([process.execPath, join(RUNNER_DIR, 'src', 'runner.ts')], {
    stdin: new Blob([typeof input === 'string' ? input : JSON.stringify(input)]),
    stdout: 'pipe',
    stderr: 'pipe',
    env: {
      PATH: process.env.PATH!,
      HOME: ws.home,
      NANOCLAW_WORKSPACE: ws.ws,
      KIMI_EXECUTABLE: STUB,
      KIMI_BASE_URL: model.url,
      TZ: 'Europe/Berlin',
      ...env,
    },
  });
  let out = '';
  let err = '';
  const pump = async (stream: ReadableStream<Uint8Array>, add: (text: string) => void) => {
    const decoder = new TextDecoder();
    for await (const chunk of stream) add(decoder.decode(chunk, { stream: true }));
  };
  const reading = Promise.all([pump(proc.stdout, (t) => (out += t)), pump(proc.stderr, (t) => (err += t))]);
  try {
    await during?.({ results: () => parseResults(out), stderr: () => err });
  } catch (error) {
    proc.kill();
    throw error;
  }
  const [, code] = await Promise.all([reading, proc.exited]);
  return { results: parseResults(out), stdout: out, stderr: err, code };
}

const input = (prompt: string, extra: Record<string, unknown> = {}) => ({
  prompt,
  groupFolder: 'family',
  chatJid: 'family@g.us',
  isMain: false,
  secrets: { KIMI_API_KEY: KEY },
  ...extra,
});
const close = (ws: ReturnType<typeof workspace>) => writeFileSync(join(ws.ws, 'ipc', 'input', '_close'), '');
const followUp = (ws: ReturnType<typeof workspace>, text: string) =>
  writeIpcFile(join(ws.ws, 'ipc', 'input'), { type: 'message', text });

describe('config builders', () => {
  it('config.toml names the k25 alias, the provider and the key, with TOML-safe strings', () => {
    const toml = buildConfigToml({
      apiKey: 'sk-"quoted"\\x',
      baseUrl: 'http://localhost:11434/v1',
      modelName: 'qwen3',
      providerType: 'openai_legacy',
    });
    // biome-ignore lint/suspicious/noExplicitAny: a parsed TOML document, read field by field
    const parsed = Bun.TOML.parse(toml) as Record<string, any>;
    expect(parsed.default_model).toBe('k25');
    expect(parsed.models.k25).toMatchObject({ provider: 'nanoclaw', model: 'qwen3' });
    expect(parsed.providers.nanoclaw).toEqual({
      type: 'openai_legacy',
      base_url: 'http://localhost:11434/v1',
      api_key: 'sk-"quoted"\\x',
    });
    // biome-ignore lint/suspicious/noExplicitAny: a parsed TOML document, read field by field
    const defaults = Bun.TOML.parse(buildConfigToml({})) as Record<string, any>;
    expect(defaults.providers.nanoclaw.type).toBe('kimi');
    expect(defaults.providers.nanoclaw.api_key).toBe('');
  });

  it('mcp.json starts the nanoclaw server with the group’s identity', () => {
    const config = JSON.parse(
      buildMcpConfig(
        { chatJid: 'g@g.us', groupFolder: 'g', isMain: false, ipcDir: '/workspace/ipc', timezone: 'Asia/Tokyo' },
        '/app/src/mcp-server.ts',
        '/usr/local/bin/bun',
      ),
    );
    expect(config.mcpServers.nanoclaw).toEqual({
      command: '/usr/local/bin/bun',
      args: ['/app/src/mcp-server.ts'],
      env: {
        NANOCLAW_CHAT_JID: 'g@g.us',
        NANOCLAW_GROUP_FOLDER: 'g',
        NANOCLAW_IS_MAIN: '0',
        NANOCLAW_IPC_DIR: '/workspace/ipc',
        TZ: 'Asia/Tokyo',
      },
    });
  });

  it('the agent file extends the default agent with the role and both memories', () => {
    const role = buildRole({
      assistantName: 'Bob',
      isMain: false,
      timezone: 'UTC',
      globalMemory: 'likes tea',
      groupMemory: 'dinner at 7',
    });
    const spec = Bun.YAML.parse(buildAgentFile(role)) as {
      version: number;
      agent: { extend: string; system_prompt_args: { ROLE_ADDITIONAL: string } };
    };
    expect(spec.version).toBe(1);
    expect(spec.agent.extend).toBe('default');
    const text = spec.agent.system_prompt_args.ROLE_ADDITIONAL;
    for (const part of ['You are Bob', '<internal>', 'send_message', 'schedule_task', 'likes tea', 'dinner at 7'])
      expect(text).toContain(part);
    expect(text).not.toContain('register_group');
    expect(buildRole({ assistantName: 'Bob', isMain: true, timezone: 'UTC' })).toContain('register_group');
  });

  it('scheduled prompts say no person sent them; the env-file key is found', () => {
    expect(scheduledTaskPrompt('check the build')).toMatch(
      /^\[Scheduled task: [^\n]*not sent by a person[^\n]*\]\n\ncheck the build$/,
    );
    expect(keyFromEnvFile('# x\nOTHER=1\nKIMI_API_KEY="sk-abc"\n')).toBe('sk-abc');
    expect(keyFromEnvFile('KIMI_API_KEY=\n')).toBeUndefined();
  });

  it('rejects broken input with the field’s name', () => {
    expect(() => parseInput('')).toThrow('no input');
    expect(() => parseInput('{"prompt": ')).toThrow('not JSON');
    expect(() => parseInput('[]')).toThrow('JSON object');
    expect(() => parseInput('{"prompt":"x","groupFolder":"g","chatJid":"c"}')).toThrow('"isMain"');
    expect(() => parseInput('{"prompt":"","groupFolder":"g","chatJid":"c","isMain":false}')).toThrow('"prompt"');
    expect(() =>
      parseInput('{"prompt":"x","groupFolder":"g","chatJid":"c","isMain":false,"sessionId":"../x"}'),
    ).toThrow('"sessionId"');
  });

  it('validates schedules the way the host will', () => {
    const now = new Date('2026-06-01T12:00:00Z');
    expect(scheduleProblem('cron', '0 9 * * 1-5', 'Europe/Berlin', now)).toBeNull();
    expect(scheduleProblem('cron', 'every morning', 'UTC', now)).toContain('e.g. "0 9 * * 1-5"');
    expect(scheduleProblem('interval', '999', 'UTC', now)).toContain('at least 1000');
    expect(scheduleProblem('interval', '3600000', 'UTC', now)).toBeNull();
    expect(scheduleProblem('once', '2026-12-24 17:00', 'UTC', now)).toBeNull();
    expect(scheduleProblem('once', '2020-01-01T00:00:00Z', 'UTC', now)).toContain('in the past');
    expect(scheduleProblem('once', 'tomorrow', 'UTC', now)).toContain('YYYY-MM-DD HH:MM');
  });
});

describe('the runner with the real SDK and the kimi stub', () => {
  it('answers, logs the session, resumes it next time, and leaves no key behind', async () => {
    const ws = workspace();
    const first = await runRunner(ws, input(messages('hello', '@Andy how are you &amp; the kids?')));
    expect(first.code).toBe(0);
    expect(first.results).toHaveLength(1);
    expect(first.results[0]).toMatchObject({ status: 'success', result: '[stub] how are you & the kids?' });
    const sessionId = first.results[0]!.sessionId!;
    expect(first.stderr).toContain(`Session initialized: ${sessionId}`);
    const config = join(ws.home, '.kimi', 'config.toml');
    expect(statSync(config).mode & 0o777).toBe(0o600);
    expect(readFileSync(config, 'utf8')).not.toContain(KEY);
    expect(readdirSync(join(ws.home, '.kimi', 'sessions'))).toHaveLength(1);

    const second = await runRunner(ws, input(messages('!session'), { sessionId }));
    expect(second.results[0]!.result).toBe(`[stub] ${sessionId}`);
  });

  it('puts the global and group memory into the agent’s system prompt (global only for non-main)', async () => {
    const ws = workspace({ global: 'GLOBAL-NOTE', group: 'GROUP-NOTE' });
    const other = await runRunner(ws, input(messages('!context')));
    expect(other.results[0]!.result).toContain('GLOBAL-NOTE');
    expect(other.results[0]!.result).toContain('GROUP-NOTE');
    const main = await runRunner(ws, input(messages('!context'), { isMain: true }));
    expect(main.results[0]!.result).not.toContain('GLOBAL-NOTE');
    expect(main.results[0]!.result).toContain('GROUP-NOTE');
  });

  it('no key → the model refuses the keyless request (401, as Moonshot does) and the error result says so, exit 1', async () => {
    const ws = workspace();
    const before = model.requests.length;
    const run = await runRunner(ws, input(messages('hi'), { secrets: {} }));
    expect(run.code).toBe(1);
    expect(run.results).toEqual([
      expect.objectContaining({ status: 'error', result: null, error: expect.stringContaining('Error code: 401') }),
    ]);
    expect(model.requests.slice(before).map((r) => r.authorization)).toEqual([null]);
  });

  it('takes the key from /workspace/env-dir/env when stdin has none (the guide’s manual test)', async () => {
    const ws = workspace();
    mkdirSync(join(ws.ws, 'env-dir'));
    writeFileSync(join(ws.ws, 'env-dir', 'env'), `KIMI_API_KEY=${KEY}\n`);
    const run = await runRunner(ws, {
      prompt: 'What is 2+2?',
      groupFolder: 'test',
      chatJid: 'test@g.us',
      isMain: false,
    });
    expect(run.results[0]).toMatchObject({ status: 'success', result: '[stub] What is 2+2?' });
  });

  it('provider errors and crashes come back as error results', async () => {
    const ws = workspace();
    const failed = await runRunner(ws, input(messages('!fail rate limited by provider')));
    expect(failed.results[0]).toMatchObject({
      status: 'error',
      error: expect.stringContaining('rate limited by provider'),
    });
    expect(failed.code).toBe(1);
    const crashed = await runRunner(ws, input(messages('!crash')));
    expect(crashed.code).toBe(1);
    expect(crashed.results[0]).toMatchObject({ status: 'error' });
  });

  it('broken stdin gives an error result, not a hang', async () => {
    const ws = workspace();
    const run = await runRunner(ws, '{"prompt": "unterminated');
    expect(run.code).toBe(1);
    expect(run.results[0]).toMatchObject({ status: 'error', error: expect.stringContaining('not JSON') });
  });

  it('follow-ups: steered into a running turn, or the next turn; _close ends with exit 0 (all through the watch: the safety poll is an hour)', async () => {
    const ws = workspace({}, true);
    const asked = model.requests.length;
    const run = await runRunner(
      ws,
      input(messages('!sleep 1000')),
      async (live) => {
        await until(() => model.requests.length > asked, 'the model to be asked');
        followUp(ws, messages('also this')); // arrives while the model "thinks"
        await until(() => live.results().length === 1, 'the first answer');
        followUp(ws, messages('and then this'));
        await until(() => live.results().length === 2, 'the second answer');
        close(ws);
      },
      { NANOCLAW_INBOX_POLL_MS: '3600000' },
    );
    expect(run.code).toBe(0);
    // The steered message joins the running turn and is answered in its next step: the
    // first step's answer comes along as `earlier`, never glued to (or dropped for) the next.
    expect(run.results.map((r) => [r.earlier ?? [], r.result])).toEqual([
      [['[stub] slept 1000'], '[stub] also this'],
      [[], '[stub] and then this'],
    ]);
    expect(readdirSync(join(ws.ws, 'ipc', 'input'))).toEqual([]);
  });

  it('follow-ups and _close still arrive when file events do not (watching off: the safety poll alone)', async () => {
    const ws = workspace({}, true);
    const run = await runRunner(
      ws,
      input(messages('one')),
      async (live) => {
        await until(() => live.results().length === 1, 'the first answer');
        followUp(ws, messages('two'));
        await until(() => live.results().length === 2, 'the second answer');
        close(ws);
      },
      { NANOCLAW_INBOX_WATCH: '0', NANOCLAW_INBOX_POLL_MS: '100' },
    );
    expect(run.code).toBe(0);
    expect(run.results.map((r) => r.result)).toEqual(['[stub] one', '[stub] two']);
  });

  it('a task handed to a waiting container is its next turn, in the same session, told nobody sent it', async () => {
    const ws = workspace({}, true);
    const run = await runRunner(ws, input(messages('hello')), async (live) => {
      await until(() => live.results().length === 1, 'the first answer');
      writeIpcFile(join(ws.ws, 'ipc', 'input'), { type: 'task', text: 'water the plants' });
      await until(() => live.results().length === 2, 'the task’s answer');
      close(ws);
    });
    expect(run.code).toBe(0);
    expect(run.results.map((r) => r.result)).toEqual(['[stub] hello', '[stub] water the plants']);
    expect(new Set(run.results.map((r) => r.sessionId)).size).toBe(1);
    const history = sessionContextFile(join(ws.home, '.kimi'), join(ws.ws, 'group'), run.results[0]!.sessionId!);
    expect(readFileSync(history, 'utf8')).toContain('Scheduled task');
  });

  it('a scheduled task is told nobody sent it', async () => {
    const ws = workspace();
    const run = await runRunner(ws, input('water the plants', { isScheduledTask: true }));
    expect(run.results[0]!.result).toBe('[stub] water the plants');
    const history = sessionContextFile(join(ws.home, '.kimi'), join(ws.ws, 'group'), run.results[0]!.sessionId!);
    expect(readFileSync(history, 'utf8')).toContain('Scheduled task');
  });

  it('send_message through the real MCP server writes an IPC file; a non-main group cannot register groups', async () => {
    const ws = workspace({}, true);
    const run = await runRunner(ws, input(messages('!tool send_message {"text":"dinner is ready"}')), async (live) => {
      await until(() => live.results().length === 1, 'the first answer');
      followUp(ws, messages('!tool register_group {"jid":"x@g.us","name":"X","folder":"x"}'));
      await until(() => live.results().length === 2, 'the second answer');
      close(ws);
    });
    expect(run.results.map((r) => r.result)).toEqual([
      'Message queued for this chat.',
      'tool error: register_group is only available in the main chat.',
    ]);
    const files = readdirSync(join(ws.ws, 'ipc', 'messages'));
    expect(files).toHaveLength(1);
    expect(JSON.parse(readFileSync(join(ws.ws, 'ipc', 'messages', files[0]!), 'utf8'))).toMatchObject({
      type: 'message',
      chatJid: 'family@g.us',
      text: 'dinner is ready',
    });
    expect(readdirSync(join(ws.ws, 'ipc', 'tasks'))).toEqual([]);
  });
});

describe('the nanoclaw MCP server over stdio', () => {
  async function connect(isMain: boolean, ipcDir: string, tasks: unknown[] = []) {
    writeFileSync(join(ipcDir, 'current_tasks.json'), JSON.stringify(tasks));
    const client = await connectMcp({
      chatJid: 'me@g.us',
      groupFolder: 'me',
      isMain,
      ipcDir,
      timezone: 'Europe/Berlin',
    });
    const call = async (name: string, args: Record<string, unknown> = {}) => {
      const result = (await client.callTool({ name, arguments: args })) as {
        content: { text: string }[];
        isError?: boolean;
      };
      return { text: result.content.map((c) => c.text).join('\n'), isError: Boolean(result.isError) };
    };
    return { client, call };
  }
  const ipc = () => {
    const dir = mkdtempSync(join(tmpdir(), 'nanoclaw-mcp-'));
    mkdirSync(join(dir, 'tasks'));
    mkdirSync(join(dir, 'messages'));
    return dir;
  };
  const written = (dir: string, kind: string) =>
    readdirSync(join(dir, kind)).map((f) => JSON.parse(readFileSync(join(dir, kind, f), 'utf8')));

  it('offers the tools with descriptions', async () => {
    const dir = ipc();
    const { client } = await connect(false, dir);
    const { tools } = await client.listTools();
    expect(tools.map((t) => t.name).sort()).toEqual([
      'cancel_task',
      'get_task',
      'list_tasks',
      'pause_task',
      'refresh_groups',
      'register_group',
      'resume_task',
      'schedule_task',
      'send_message',
      'update_task',
    ]);
    for (const tool of tools) expect(tool.description!.length).toBeGreaterThan(20);
    await client.close();
  });

  it('validates schedules before writing anything', async () => {
    const dir = ipc();
    const { client, call } = await connect(false, dir);
    const bad = await call('schedule_task', { prompt: 'x', schedule_type: 'cron', schedule_value: '61 * * * *' });
    expect(bad.isError).toBe(true);
    expect(bad.text).toContain('not a valid cron expression');
    expect(written(dir, 'tasks')).toEqual([]);
    const good = await call('schedule_task', {
      prompt: 'stretch',
      schedule_type: 'cron',
      schedule_value: '0 9 * * 1-5',
    });
    expect(good.isError).toBe(false);
    expect(written(dir, 'tasks')).toEqual([
      expect.objectContaining({
        type: 'schedule_task',
        prompt: 'stretch',
        schedule_type: 'cron',
        schedule_value: '0 9 * * 1-5',
        context_mode: 'group',
      }),
    ]);
    expect(readdirSync(join(dir, 'tasks')).some((f) => f.startsWith('.'))).toBe(false); // no temp file left behind
    await client.close();
  });

  it('keeps a non-main group to its own chat and tasks; main may do everything', async () => {
    const tasks = [
      {
        id: 'task-1',
        groupFolder: 'me',
        chatJid: 'me@g.us',
        prompt: 'p',
        schedule_type: 'interval',
        schedule_value: '60000',
        context_mode: 'group',
        status: 'active',
        next_run: null,
        last_run: null,
        last_result: null,
        recent_runs: [
          { run_at: '2026-01-01T00:00:00Z', duration_ms: 12, status: 'success', result: 'done', error: null },
        ],
      },
    ];
    const dir = ipc();
    const member = await connect(false, dir, tasks);
    expect((await member.call('send_message', { text: 'hi', chatJid: 'other@g.us' })).isError).toBe(true);
    expect(
      (
        await member.call('schedule_task', {
          prompt: 'x',
          schedule_type: 'interval',
          schedule_value: '60000',
          targetJid: 'other@g.us',
        })
      ).isError,
    ).toBe(true);
    expect((await member.call('refresh_groups')).isError).toBe(true);
    expect((await member.call('pause_task', { task_id: 'not-mine' })).isError).toBe(true);
    expect((await member.call('pause_task', { task_id: 'task-1' })).isError).toBe(false);
    expect((await member.call('get_task', { task_id: 'task-1' })).text).toContain('done');
    expect((await member.call('list_tasks')).text).toContain('task-1');
    await member.client.close();
    expect(written(dir, 'tasks')).toEqual([expect.objectContaining({ type: 'pause_task', taskId: 'task-1' })]);
    expect(written(dir, 'messages')).toEqual([]);

    const mainDir = ipc();
    const main = await connect(true, mainDir);
    expect((await main.call('send_message', { text: 'hello', chatJid: 'other@g.us' })).isError).toBe(false);
    expect((await main.call('register_group', { jid: 'new@g.us', name: 'New', folder: 'new' })).isError).toBe(false);
    expect((await main.call('refresh_groups')).isError).toBe(false);
    await main.client.close();
    expect(written(mainDir, 'messages')).toEqual([
      expect.objectContaining({ type: 'message', chatJid: 'other@g.us', text: 'hello' }),
    ]);
    expect(
      written(mainDir, 'tasks')
        .map((t) => t.type)
        .sort(),
    ).toEqual(['refresh_groups', 'register_group']);
    expect(existsSync(join(mainDir, 'current_tasks.json'))).toBe(true);
  });
});

describe('what the real CLI does that the runner must handle', () => {
  /** The question the runner relayed to the chat, once it is there. */
  const relayed = async (ws: ReturnType<typeof workspace>) => {
    const dir = join(ws.ws, 'ipc', 'messages');
    for (let i = 0; i < 100; i++) {
      const files = readdirSync(dir);
      if (files.length)
        return JSON.parse(readFileSync(join(dir, files[0]!), 'utf8')) as { chatJid: string; text: string };
      await Bun.sleep(50);
    }
    throw new Error('no question reached the chat');
  };

  it('a question (AskUserQuestion) goes to the chat with numbered options; the next message answers it', async () => {
    const ws = workspace({}, true);
    let question: { chatJid: string; text: string } | undefined;
    const run = await runRunner(ws, input(messages('!ask Which day? | Saturday | Sunday')), async (live) => {
      question = await relayed(ws);
      followUp(ws, messages('2'));
      await until(() => live.results().length === 1, 'the answer');
      close(ws);
    });
    expect(question).toMatchObject({
      type: 'message',
      chatJid: 'family@g.us',
      text: expect.stringContaining('Which day?\n1. Saturday\n2. Sunday'),
    });
    expect(run.results.map((r) => r.result)).toEqual(['[stub] answered: {"Which day?":"Sunday"}']);
  });

  it('no answer in time, or nobody to ask (a scheduled task): the agent is told so and decides itself', async () => {
    const ws = workspace({}, true);
    const late = await runRunner(
      ws,
      input(messages('!ask Tea? | Yes | No')),
      async (live) => {
        await relayed(ws);
        await until(() => live.results().length === 1, 'the answer');
        close(ws);
      },
      { NANOCLAW_QUESTION_TIMEOUT_MS: '500' },
    );
    expect(late.results[0]!.result).toContain('No answer came within');
    expect(late.results[0]!.result).toContain('Decide yourself');
    const taskWs = workspace({}, true);
    const task = await runRunner(taskWs, input('!ask Tea? | Yes | No', { isScheduledTask: true }), async (live) => {
      await until(() => live.results().length === 1, 'the answer');
      close(taskWs);
    });
    expect(readdirSync(join(taskWs.ws, 'ipc', 'messages'))).toEqual([]); // nothing was asked in the chat
    expect(task.results[0]!.result).toContain('Nobody can answer here');
  });

  it('a turn of several steps: each step’s words are their own message, never glued', async () => {
    const run = await runRunner(workspace(), input(messages('!steps')));
    expect(run.results).toEqual([
      expect.objectContaining({ status: 'success', earlier: ['Let me check.'], result: 'Here is the answer.' }),
    ]);
  });

  it('provider errors: the CLI’s own retries (client and step) absorb a short outage; what remains is classified', async () => {
    const ws = workspace();
    // The double's retry waits (openai-python's backoff, the CLI's StepRetry) shortened a hundredfold: attempts are what counts here.
    const fast = { KIMI_STUB_RETRY_WAIT_SCALE: '0.01' };
    const recovered = await runRunner(ws, input(messages('!flaky 503 2')), undefined, fast);
    expect(recovered.results[0]!.result).toBe('[stub] recovered');
    const before = model.requests.length;
    const limited = await runRunner(ws, input(messages('!status 429 slow down')), undefined, fast);
    expect(limited.results[0]).toMatchObject({
      status: 'error',
      errorKind: 'rate-limit',
      error: expect.stringContaining('Error code: 429'),
    });
    expect(model.requests.length - before).toBe(9); // 3 attempts of the step, each with openai-python's 2 retries
    const refused = await runRunner(ws, input(messages('!status 401 Invalid Authentication')), undefined, fast);
    expect(refused.results[0]).toMatchObject({ status: 'error', errorKind: 'auth' });
  });

  it('each CLI reads its own run’s config: another container of the group rewriting ~/.kimi/config.toml meanwhile changes nothing', async () => {
    const ws = workspace({}, true);
    const run = await runRunner(ws, input(messages('hello')), async (live) => {
      await until(() => live.results().length === 1, 'the first answer');
      // As an isolated task's container of the same group would, starting or ending now:
      writeFileSync(
        join(ws.home, '.kimi', 'config.toml'),
        buildConfigToml({ apiKey: 'ncp-another-runs-token', baseUrl: model.url }),
      );
      followUp(ws, messages('!context-full')); // the runner starts a second CLI, for a fresh session
      await until(() => live.results().length === 2, 'the answer from the new CLI');
      close(ws);
    });
    expect(run.results.map((r) => [r.status, r.result])).toEqual([
      ['success', '[stub] hello'],
      ['success', '[stub] fits in a fresh session'],
    ]);
  });

  it('the CLI wrapper passes --config-file and every argument through unchanged, whatever the paths hold', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'nanoclaw-wrap-'));
    const echo = join(dir, "it's echo");
    writeFileSync(echo, '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n', { mode: 0o700 });
    const wrapper = cliWithOwnConfig(echo, join(dir, 'my config.toml'), dir);
    const out = Bun.spawnSync([wrapper, '--wire', 'two words', "it's"]).stdout.toString();
    expect(out.split('\n')).toEqual(['--config-file', join(dir, 'my config.toml'), '--wire', 'two words', "it's", '']);
  });

  it('a context that is too long: the turn goes on in a fresh session, and says so', async () => {
    const ws = workspace();
    const first = await runRunner(ws, input(messages('hello')));
    const sessionId = first.results[0]!.sessionId!;
    const full = await runRunner(ws, input(messages('!context-full'), { sessionId }));
    expect(full.results[0]).toMatchObject({
      status: 'success',
      result: '[stub] fits in a fresh session',
      earlier: [FRESH_SESSION_NOTE],
    });
    expect(full.results[0]!.sessionId).not.toBe(sessionId);
    expect(full.stderr).toContain(`Session initialized: ${full.results[0]!.sessionId}`);
  });

  it('memory is current on a resumed session (the CLI would reuse the old system prompt) and within one container', async () => {
    const ws = workspace({ group: 'MEMORY-ONE' }, true);
    const first = await runRunner(ws, input(messages('!context')), async (live) => {
      await until(() => live.results().length === 1, 'the first answer');
      writeFileSync(join(ws.ws, 'group', 'CLAUDE.md'), 'MEMORY-LATER');
      followUp(ws, messages('!context')); // the same container, a later turn
      await until(() => live.results().length === 2, 'the second answer');
      close(ws);
    });
    expect(first.results[0]!.result).toContain('MEMORY-ONE');
    expect(first.results[1]!.result).toContain('<memory-update>');
    expect(first.results[1]!.result).toContain('MEMORY-LATER');
    writeFileSync(join(ws.ws, 'group', 'CLAUDE.md'), 'MEMORY-TWO');
    const second = await runRunner(
      ws,
      input(messages('!context'), { sessionId: first.results[0]!.sessionId }),
      async (live) => {
        await until(() => live.results().length === 1, 'the answer');
        close(ws);
      },
    );
    expect(second.results[0]!.result).toContain('MEMORY-TWO');
    expect(second.results[0]!.result).not.toContain('MEMORY-ONE');
    expect(second.results[0]!.sessionId).toBe(first.results[0]!.sessionId);
  });

  it('the model sees a picture: ReadMediaFile exists (config.toml declares image_in) and hands it over as an image', async () => {
    const ws = workspace();
    mkdirSync(join(ws.ws, 'group', 'media'));
    const picture = join(ws.ws, 'group', 'media', 'cat.png');
    const bytes = Buffer.from('89504e470d0a1a0a0000000d4948445200000001000000010806000000', 'hex');
    writeFileSync(picture, bytes);
    const hash = new Bun.CryptoHasher('sha256').update(bytes).digest('hex').slice(0, 12);
    const seen = await runRunner(ws, input(messages(`[image: ${picture}] !image`)));
    expect(seen.results[0]!.result).toBe(`[stub] I see image/png, ${bytes.length} bytes, sha256 ${hash}`);
    const toml = Bun.TOML.parse(readFileSync(join(ws.home, '.kimi', 'config.toml'), 'utf8')) as {
      models: { k25: { capabilities: string[] } };
    };
    expect(toml.models.k25.capabilities).toEqual(['thinking', 'image_in', 'video_in']);
    const blind = await runRunner(ws, input(messages(`[image: ${picture}] !image`)), undefined, {
      KIMI_MODEL_CAPABILITIES: '',
    });
    expect(blind.results[0]!.result).toContain('ReadMediaFile` not found');
  });
});

describe('the runner’s pure parts for these', () => {
  const question = {
    question: 'Which day?',
    header: 'Plan',
    options: [
      { label: 'Saturday', description: 'the market is open' },
      { label: 'Sunday', description: '' },
      { label: 'Monday', description: '' },
    ],
    multi_select: false,
    body: null,
    other_label: null,
    other_description: null,
  };
  it('writes a question for WhatsApp and reads the answer: a number, a label or words of one’s own', () => {
    expect(questionText(question, 0, 2)).toBe(
      '❓ (1/2) *Plan*: Which day?\n1. Saturday — the market is open\n2. Sunday\n3. Monday\n_Reply with a number, or in your own words._',
    );
    expect(answerFor(question, ' 2 ')).toBe('Sunday');
    expect(answerFor(question, 'monday')).toBe('Monday');
    expect(answerFor(question, '7')).toBe('7');
    expect(answerFor(question, 'whenever it does not rain')).toBe('whenever it does not rain');
    expect(answerFor({ ...question, multi_select: true }, '1, 3')).toBe('Saturday, Monday');
  });

  it('classifies the CLI’s errors as the host needs them', () => {
    expect(errorKind("Error code: 401 - {'error': {'message': 'Invalid Authentication'}}")).toBe('auth');
    expect(errorKind("Error code: 429 - {'error': {}}")).toBe('rate-limit');
    expect(errorKind('Error code: 503 - x')).toBe('unavailable');
    expect(errorKind('Connection error.')).toBe('unavailable');
    expect(
      errorKind(
        "Error code: 400 - {'error': {'message': 'Invalid request: Your request exceeded model token limit: 262144'}}",
      ),
    ).toBe('context');
    expect(errorKind('LLM is not set')).toBe('other');
  });

  it('renews a stored system prompt only when it lacks the current role, keeping the history', () => {
    const dir = mkdtempSync(join(tmpdir(), 'nanoclaw-ctx-'));
    const file = sessionContextFile(dir, '/workspace/group', 's1');
    expect(file).toMatch(/sessions\/[0-9a-f]{32}\/s1\/context\.jsonl$/);
    mkdirSync(join(file, '..'), { recursive: true });
    const history = [
      { role: '_system_prompt', content: 'base ROLE-A' },
      { role: '_checkpoint', id: 0 },
      { role: 'user', content: 'hi' },
    ];
    writeFileSync(file, history.map((r) => `${JSON.stringify(r)}\n`).join(''));
    expect(refreshSystemPrompt(file, 'ROLE-A')).toBe(false);
    expect(refreshSystemPrompt(file, 'ROLE-B')).toBe(true);
    expect(
      readFileSync(file, 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l).role),
    ).toEqual(['_checkpoint', 'user']);
    expect(
      withMemoryUpdate('p', { globalMemory: 'g', groupMemory: 'a' }, { globalMemory: 'g', groupMemory: 'a' }),
    ).toBe('p');
    expect(
      withMemoryUpdate('p', { globalMemory: 'g', groupMemory: 'a' }, { globalMemory: 'g', groupMemory: 'b' }),
    ).toMatch(/^<memory-update>\nThis group's memory \(CLAUDE\.md\), as it is now:\nb\n<\/memory-update>\n\np$/);
  });
});

describe('the inbox: a watch, and a safety poll for when file events do not come', () => {
  const folder = () => mkdtempSync(join(tmpdir(), 'nanoclaw-inbox-'));
  /** Written as the host writes it: a dot-named temp file, renamed into place. */
  const drop = (dir: string, name: string, text: string, type = 'message') => {
    writeFileSync(join(dir, `.${name}`), JSON.stringify({ type, text }));
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

  it('a file event wakes the wait between turns: nothing else could within the test (the safety poll is an hour)', async () => {
    const dir = folder();
    const inbox = open(dir, { pollMs: 3_600_000 });
    expect(inbox.watching).toBe(true);
    const waiting = inbox.nextInput(3_600_000);
    drop(dir, '1-a.json', 'hello');
    expect(await waiting).toEqual({ kind: 'message', text: 'hello' });
    expect(readdirSync(dir)).toEqual([]);
  });

  it('_close ends the wait at once, through the watch', async () => {
    const dir = folder();
    const inbox = open(dir, { pollMs: 3_600_000 });
    const waiting = inbox.nextInput(3_600_000);
    writeFileSync(join(dir, '_close'), '');
    expect(await waiting).toEqual({ kind: 'close' });
    expect(inbox.closeRequested).toBe(true);
  });

  it('the safety poll alone finds files: with watching off, and where the folder cannot be watched', async () => {
    const dir = folder();
    const unwatched = open(dir, { pollMs: 30, watch: false });
    expect(unwatched.watching).toBe(false);
    const waiting = unwatched.nextInput(3_600_000);
    drop(dir, '1-a.json', 'polled');
    expect(await waiting).toEqual({ kind: 'message', text: 'polled' });

    const later = join(folder(), 'input'); // not there yet when the inbox starts: no watch can be set up
    const polled = open(later, { pollMs: 30 });
    expect(polled.watching).toBe(false);
    const closing = polled.nextInput(3_600_000);
    mkdirSync(later);
    writeFileSync(join(later, '_close'), '');
    expect(await closing).toEqual({ kind: 'close' });
  });

  it('reads in name order, joins what queued up into one prompt, skips dotfiles and bad JSON; _close waits for the queue', async () => {
    const dir = folder();
    const inbox = open(dir, { pollMs: 3_600_000, watch: false });
    drop(dir, '2-b.json', 'second');
    drop(dir, '1-a.json', 'first');
    writeFileSync(join(dir, '3-c.json'), '{"type":');
    writeFileSync(join(dir, '.4-d.json'), JSON.stringify({ type: 'message', text: 'not yet' }));
    writeFileSync(join(dir, '_close'), '');
    expect(await inbox.nextInput(3_600_000)).toEqual({ kind: 'message', text: 'first\nsecond' });
    expect(await inbox.nextInput(3_600_000)).toEqual({ kind: 'close' });
    expect(readdirSync(dir)).toEqual(['.4-d.json']);
    const idle = open(folder(), { pollMs: 3_600_000 });
    expect(await idle.nextInput(20)).toEqual({ kind: 'idle' });
  });

  it('a scheduled task ({"type":"task"}) is a turn of its own, told nobody sent it: never steered into a turn, never taken as an answer', async () => {
    const dir = folder();
    const inbox = open(dir, { pollMs: 3_600_000 });
    const steered: string[] = [];
    inbox.onMessage = (text) => steered.push(text);
    const answer = inbox.nextAnswer(50);
    drop(dir, '1-t.json', 'water the plants', 'task');
    expect(await answer).toBeNull();
    expect(steered).toEqual([]);
    inbox.onMessage = null;
    expect(await inbox.nextInput(3_600_000)).toEqual({
      kind: 'message',
      text: scheduledTaskPrompt('water the plants'),
    });
  });

  it('a message goes to a waiting answer first, else into the running turn', async () => {
    const dir = folder();
    const inbox = open(dir, { pollMs: 3_600_000 });
    const steered: string[] = [];
    inbox.onMessage = (text) => steered.push(text);
    const answer = inbox.nextAnswer(3_600_000);
    drop(dir, '1-a.json', 'the answer');
    expect(await answer).toBe('the answer');
    drop(dir, '2-b.json', 'steer me');
    await until(() => steered.length === 1, 'the steered message');
    expect(steered).toEqual(['steer me']);
    expect(inbox.takeQueued()).toBeNull();
  });
});

describe('the CLI starts with the session; a warm start waits for its first prompt', () => {
  /** The kimi double's KIMI_STUB_TRACE lines: what it did, when. */
  const traced = (file: string) =>
    existsSync(file)
      ? readFileSync(file, 'utf8')
          .split('\n')
          .filter(Boolean)
          .map((line) => {
            const [what, at] = line.split(' ');
            return { what: what!, at: Number(at) };
          })
      : [];
  const timings = (stderr: string) =>
    Object.fromEntries(
      [...stderr.matchAll(/^\[agent-runner\] timing (\S+) (\d+)$/gm)].map((m) => [m[1]!, Number(m[2])]),
    );

  it('the CLI is started (spawned and initialized) before the first prompt; timing lines mark each phase once, in order', async () => {
    const ws = workspace();
    const trace = join(ws.root, 'kimi-trace');
    const run = await runRunner(ws, input(messages('hello')), undefined, {
      KIMI_STUB_TRACE: trace,
      NANOCLAW_TIMING: '1',
    });
    expect(run.results).toEqual([expect.objectContaining({ status: 'success', result: '[stub] hello' })]);
    const marks = timings(run.stderr);
    const phases = ['start', 'input', 'cli-ready', 'prompt', 'first-event', 'result'];
    expect(Object.keys(marks)).toEqual(phases);
    expect(run.stderr.match(/ timing /g)).toHaveLength(phases.length);
    for (let i = 1; i < phases.length; i++) expect(marks[phases[i]!]).toBeGreaterThanOrEqual(marks[phases[i - 1]!]!);
    const cli = traced(trace);
    expect(cli.map((t) => t.what).filter((w) => w !== 'mcp-connected')).toEqual(['start', 'initialize', 'prompt']); // one CLI, not a second at the prompt
    expect(cli.find((t) => t.what === 'initialize')!.at).toBeLessThanOrEqual(marks.prompt!);
    expect(run.stderr).not.toContain('does not know'); // kimi-cli's MCPLoadingBegin/End are expected, not news
  });

  it('no timing lines without NANOCLAW_TIMING=1; without the SDK’s internal method the CLI starts at the first prompt, silently', async () => {
    const run = await runRunner(workspace(), input(messages('hello')));
    expect(run.stderr).not.toContain('timing');
    expect(await startCli({} as unknown as Session)).toBe(false); // e.g. another SDK version
    const lines: string[] = [];
    const mark = timingMarks({ NANOCLAW_TIMING: '1' }, (line) => lines.push(line));
    mark('prompt', 5);
    mark('prompt', 6);
    expect(lines).toEqual(['[agent-runner] timing prompt 5\n']);
    timingMarks({}, (line) => lines.push(line))('start');
    expect(lines).toHaveLength(1);
  });

  it('warm: session, CLI and its MCP servers start with no prompt and no result; the first message is the first turn', async () => {
    const ws = workspace({}, true);
    const trace = join(ws.root, 'kimi-trace');
    let sentAt = 0;
    const run = await runRunner(
      ws,
      input('', { warm: true }),
      async (live) => {
        await until(
          () => traced(trace).some((t) => t.what === 'mcp-connected') && /timing cli-ready/.test(live.stderr()),
          'the CLI and its MCP servers',
        );
        expect(live.results()).toEqual([]);
        expect(traced(trace).map((t) => t.what)).not.toContain('prompt');
        sentAt = Date.now();
        followUp(ws, messages('good morning'));
        await until(() => live.results().length === 1, 'the answer');
        followUp(ws, messages('and now?'));
        await until(() => live.results().length === 2, 'the second answer');
        close(ws);
      },
      { KIMI_STUB_TRACE: trace, NANOCLAW_TIMING: '1' },
    );
    expect(run.code).toBe(0);
    expect(run.results.map((r) => [r.status, r.result])).toEqual([
      ['success', '[stub] good morning'],
      ['success', '[stub] and now?'],
    ]);
    expect(run.stderr).toContain(`Session initialized: ${run.results[0]!.sessionId}`);
    const cli = traced(trace);
    expect(cli.filter((t) => t.what === 'start')).toHaveLength(1);
    expect(cli.find((t) => t.what === 'initialize')!.at).toBeLessThanOrEqual(sentAt);
    expect(cli.find((t) => t.what === 'prompt')!.at).toBeGreaterThanOrEqual(sentAt);
    expect(timings(run.stderr).prompt).toBeGreaterThanOrEqual(sentAt);
  });

  it('warm, then _close or the idle limit before any message: exit 0 and nothing on stdout', async () => {
    const ws = workspace({}, true);
    const closed = await runRunner(
      ws,
      input('', { warm: true }),
      async (live) => {
        await until(() => /timing cli-ready/.test(live.stderr()), 'the CLI');
        close(ws);
      },
      { NANOCLAW_TIMING: '1', NANOCLAW_INBOX_POLL_MS: '3600000' },
    );
    expect(closed.code).toBe(0);
    expect(closed.stdout).toBe('');
    const idle = await runRunner(workspace({}, true), input('', { warm: true }), undefined, {
      NANOCLAW_RUNNER_IDLE_MS: '300',
    });
    expect(idle.code).toBe(0);
    expect(idle.stdout).toBe('');
    expect(idle.stderr).toContain('after a warm start');
  });

  it('a warm input with a prompt, with a "warm" that is no boolean, or without an inbox is refused', async () => {
    const base = { groupFolder: 'g', chatJid: 'c', isMain: false };
    expect(parseInput(JSON.stringify({ ...base, prompt: '', warm: true }))).toMatchObject({ prompt: '', warm: true });
    expect(() => parseInput(JSON.stringify({ ...base, prompt: 'hi', warm: true }))).toThrow(
      /"prompt" must be "" when "warm" is true/,
    );
    expect(() => parseInput(JSON.stringify({ ...base, warm: true }))).toThrow('"prompt"');
    expect(() => parseInput(JSON.stringify({ ...base, prompt: 'hi', warm: 'yes' }))).toThrow(
      '"warm" must be true or false',
    );
    expect(() => parseInput(JSON.stringify({ ...base, prompt: '', warm: false }))).toThrow('"prompt"');
    const run = await runRunner(workspace(), input('', { warm: true }));
    expect(run.code).toBe(1);
    expect(run.results).toEqual([
      expect.objectContaining({ status: 'error', error: expect.stringContaining('needs the inbox') }),
    ]);
  });
});
