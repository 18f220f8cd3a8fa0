/**
 * The kimi double on its own: as strict as kimi-cli 1.49.0 (its header names the files it
 * follows). Driven through the real Kimi Agent SDK where the SDK can, and with raw JSON-RPC
 * lines where a strict peer is tested with what a careless client might send.
 */
import { createSession } from '@moonshot-ai/kimi-agent-sdk';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { startFakeModel } from '../kimi-stub/fake-model.ts';
import { KIMI_CLI_VERSION, sessionDir } from '../kimi-stub/kimi.ts';
import { buildAgentFile, buildConfigToml, buildMcpConfig } from '../src/config.ts';
import { startCli } from '../src/runner.ts';

const RUNNER_DIR = fileURLToPath(new URL('..', import.meta.url));
const STUB = join(RUNNER_DIR, 'kimi-stub', 'kimi');
const KEY = 'sk-stub-test-0123456789';
const model = startFakeModel({ key: KEY });
afterAll(() => model.stop());

/** A HOME with config.toml, an agent file and a work dir, as the runner leaves them. */
function home(options: { role?: string; capabilities?: string[] } = {}) {
  const root = mkdtempSync(join(tmpdir(), 'nanoclaw-stub-'));
  const share = join(root, '.kimi');
  const work = join(root, 'work');
  mkdirSync(share);
  mkdirSync(work);
  writeFileSync(
    join(share, 'config.toml'),
    buildConfigToml({ apiKey: KEY, baseUrl: model.url, capabilities: options.capabilities }),
  );
  const agentFile = join(root, 'agent.yaml');
  writeFileSync(agentFile, buildAgentFile(options.role ?? 'ROLE-TEXT'));
  return { root, share, work, agentFile, env: { PATH: process.env.PATH!, HOME: root } };
}

const session = (h: ReturnType<typeof home>, id: string, extra: { yoloMode?: boolean; agentFile?: string } = {}) =>
  createSession({
    workDir: h.work,
    sessionId: id,
    model: 'k25',
    yoloMode: extra.yoloMode ?? true,
    agentFile: extra.agentFile ?? h.agentFile,
    executable: STUB,
    env: h.env,
  });

/** One turn through the SDK: the events and the text. */
async function turn(
  s: ReturnType<typeof session>,
  prompt: string,
  onEvent?: (event: { type: string; payload?: unknown }, t: ReturnType<ReturnType<typeof session>['prompt']>) => void,
) {
  const t = s.prompt(prompt);
  const events: { type: string; payload?: unknown }[] = [];
  let text = '';
  for await (const event of t) {
    events.push(event as { type: string; payload?: unknown });
    onEvent?.(event as { type: string; payload?: unknown }, t);
    if (event.type === 'ContentPart' && event.payload.type === 'text') text += event.payload.text;
  }
  return { events, text, result: await t.result };
}

/** Raw lines in, raw lines out: the strictness a careless client meets. */
async function raw(h: ReturnType<typeof home>, lines: string[]): Promise<Record<string, unknown>[]> {
  const proc = Bun.spawn([STUB, '--wire', '--work-dir', h.work, '--session', 'raw'], {
    stdin: new Blob([lines.map((l) => `${l}\n`).join('')]),
    stdout: 'pipe',
    env: h.env,
  });
  const out = await new Response(proc.stdout).text();
  await proc.exited;
  return out
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

describe('the kimi double', () => {
  it('states the kimi-cli version the Dockerfile pins, and its wire protocol', async () => {
    const dockerfile = readFileSync(join(RUNNER_DIR, '..', 'Dockerfile'), 'utf8');
    expect(/^ARG KIMI_CLI_VERSION=(\S+)$/m.exec(dockerfile)?.[1]).toBe(KIMI_CLI_VERSION);
    expect(readFileSync(join(RUNNER_DIR, 'kimi-stub', 'kimi.ts'), 'utf8')).toContain(`kimi-cli ${KIMI_CLI_VERSION}`);
    expect(Bun.spawnSync([STUB, '--version']).stdout.toString().trim()).toBe(`kimi, version ${KIMI_CLI_VERSION}`);
    expect(Bun.spawnSync([STUB, 'info']).stdout.toString()).toContain('wire protocol: 1.10');
    const other = Bun.spawnSync([STUB, 'info'], {
      env: { ...process.env, KIMI_STUB_WIRE_PROTOCOL: '2.0' },
    }).stdout.toString();
    expect(other).toContain('wire protocol: 2.0');
  });

  it('refuses unknown flags and a missing work dir with a usage error (exit 2), as Typer does', () => {
    const h = home();
    const bad = Bun.spawnSync([STUB, '--wire', '--work-dir', h.work, '--turbo'], { env: h.env });
    expect(bad.exitCode).toBe(2);
    expect(bad.stderr.toString()).toContain('No such option: --turbo');
    expect(Bun.spawnSync([STUB, '--wire', '--work-dir', join(h.root, 'nowhere')], { env: h.env }).exitCode).toBe(2);
    const noConfig = Bun.spawnSync([STUB, '--wire', '--work-dir', h.work, '--config-file', join(h.root, 'none.toml')], {
      env: h.env,
    });
    expect(noConfig.exitCode).toBe(2);
    expect(noConfig.stderr.toString()).toContain("Invalid value for '--config-file'");
  });

  it('speaks strict JSON-RPC: string ids only, exact error codes, refuses steer and cancel outside a turn, answers 1.10 to a 1.7 client', async () => {
    const h = home();
    const replies = await raw(h, [
      '{not json',
      '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocol_version":"1.7"}}',
      '{"jsonrpc":"2.0","id":"a","method":"initialize","params":{"protocol_version":"1.7","capabilities":{"supports_question":true}}}',
      '{"jsonrpc":"2.0","id":"b","method":"steer","params":{"user_input":"x"}}',
      '{"jsonrpc":"2.0","id":"c","method":"cancel"}',
      '{"jsonrpc":"2.0","id":"d","method":"launch"}',
    ]);
    const byId = (id: unknown) => replies.find((r) => r.id === id);
    expect(replies[0]).toEqual({
      jsonrpc: '2.0',
      id: null,
      error: { code: -32700, message: 'Invalid JSON format', data: null },
    });
    expect(replies[1]).toEqual({
      jsonrpc: '2.0',
      id: null,
      error: { code: -32600, message: 'Invalid request', data: null },
    });
    expect(byId('a')).toMatchObject({
      result: {
        protocol_version: '1.10',
        server: { name: 'Kimi Code CLI', version: KIMI_CLI_VERSION },
        capabilities: { supports_question: true },
      },
    });
    expect(byId('b')).toMatchObject({ error: { code: -32000, message: 'No agent turn is in progress' } });
    expect(byId('c')).toMatchObject({ error: { code: -32000, message: 'No agent turn is in progress' } });
    expect(byId('d')).toMatchObject({ error: { code: -32601, message: 'Unexpected method received: launch' } });
  });

  it('calls the model over HTTP at base_url with the key and the session as prompt_cache_key; usage comes back in StatusUpdate', async () => {
    const h = home();
    const before = model.requests.length;
    const s = session(h, 'http-1');
    const { text, events } = await turn(s, 'hello');
    await s.close();
    expect(text).toBe('[stub] hello');
    const request = model.requests[before]!;
    expect(request.path).toBe('/v1/chat/completions');
    expect(request.authorization).toBe(`Bearer ${KEY}`);
    expect(request.body).toMatchObject({ model: 'kimi-k2.5', stream: true, prompt_cache_key: 'http-1' });
    expect(request.body.messages![0]).toMatchObject({ role: 'system', content: expect.stringContaining('ROLE-TEXT') });
    const status = events.find((e) => e.type === 'StatusUpdate')!.payload as { token_usage: { output: number } };
    expect(status.token_usage.output).toBeGreaterThan(0);
  });

  it('keeps the system prompt a session began with, whatever the agent file says later; prepends one to a history without', async () => {
    const first = home({ role: 'ROLE-FIRST' });
    const s1 = session(first, 'frozen');
    await turn(s1, 'hi');
    await s1.close();
    const later = join(first.root, 'later.yaml');
    writeFileSync(later, buildAgentFile('ROLE-LATER'));
    const s2 = session(first, 'frozen', { agentFile: later });
    const { text } = await turn(s2, '!context');
    await s2.close();
    expect(text).toContain('ROLE-FIRST');
    expect(text).not.toContain('ROLE-LATER');
    const file = join(sessionDir(first.share, first.work, 'frozen'), 'context.jsonl');
    const lines = readFileSync(file, 'utf8').split('\n').filter(Boolean);
    writeFileSync(
      file,
      lines
        .filter((l) => !l.includes('_system_prompt'))
        .map((l) => `${l}\n`)
        .join(''),
    );
    const s3 = session(first, 'frozen', { agentFile: later });
    const renewed = await turn(s3, '!context');
    await s3.close();
    expect(renewed.text).toContain('ROLE-LATER');
    expect(JSON.parse(readFileSync(file, 'utf8').split('\n')[0]!)).toMatchObject({
      role: '_system_prompt',
      content: expect.stringContaining('ROLE-LATER'),
    });
    expect(existsSync(join(first.share, 'kimi.json'))).toBe(true);
  });

  it('asks for approval when not in yolo mode (approve runs the tool, reject ends the turn); never under yolo', async () => {
    const h = home();
    const ask = session(h, 'approve-1', { yoloMode: false });
    const approved = await turn(ask, '!shell echo approved-run', (event, t) => {
      if (event.type === 'ApprovalRequest') void t.approve((event.payload as { id: string }).id, 'approve');
    });
    expect(approved.events.map((e) => e.type)).toContain('ApprovalRequest');
    expect(approved.events.find((e) => e.type === 'ApprovalRequest')!.payload).toMatchObject({
      sender: 'Shell',
      action: 'run command',
      description: 'Run command `echo approved-run`',
    });
    expect(approved.text).toContain('approved-run');
    const rejected = await turn(ask, '!shell echo never', (event, t) => {
      if (event.type === 'ApprovalRequest') void t.approve((event.payload as { id: string }).id, 'reject');
    });
    await ask.close();
    expect(rejected.result).toMatchObject({ status: 'finished' });
    expect(rejected.events.filter((e) => e.type === 'StepBegin')).toHaveLength(1); // the turn stopped after the rejection
    const yolo = session(h, 'approve-2');
    const quiet = await turn(yolo, '!shell echo yolo-run');
    await yolo.close();
    expect(quiet.events.map((e) => e.type)).not.toContain('ApprovalRequest');
    expect(quiet.text).toContain('yolo-run');
  });

  it('offers ReadMediaFile only with image_in or video_in, and refuses a picture in the prompt without image_in', async () => {
    const blind = home({ capabilities: [] });
    const before = model.requests.length;
    const s = session(blind, 'media-1');
    await turn(s, 'hello');
    const tools = (model.requests[before]!.body.tools ?? []).map((t) => t.function.name);
    expect(tools).toContain('Shell');
    expect(tools).toContain('AskUserQuestion'); // the SDK says it can answer questions
    expect(tools).not.toContain('ReadMediaFile');
    const picture = s.prompt([
      { type: 'text', text: 'look' },
      { type: 'image_url', image_url: { url: 'data:image/png;base64,iVBORw0KGgo=' } },
    ]);
    await expect(
      (async () => {
        for await (const _ of picture) {
          // drain
        }
        return picture.result;
      })(),
    ).rejects.toThrow('does not support required capability: image_in');
    await s.close();
    const sighted = home({ capabilities: ['image_in'] });
    const at = model.requests.length;
    const s2 = session(sighted, 'media-2');
    await turn(s2, 'hello');
    await s2.close();
    expect((model.requests[at]!.body.tools ?? []).map((t) => t.function.name)).toContain('ReadMediaFile');
  });

  it('retries 5xx inside a step, announcing each wait with StepRetry; a 400 is not retried', async () => {
    const h = home();
    const s = session(h, 'retry-1');
    const before = model.requests.length;
    const flaky = await turn(s, '!flaky 500 4');
    expect(flaky.text).toBe('[stub] recovered');
    expect(model.requests.length - before).toBe(5); // 3 + 2 tries: the second attempt's third request answered
    // SDK 0.1.8 predates StepRetry: it hands it on as a non-fatal "unknown event" item (the runner logs and goes on).
    expect(flaky.events.filter((e) => e.type === 'error')).toEqual([
      expect.objectContaining({ code: 'UNKNOWN_EVENT_TYPE', message: expect.stringContaining('StepRetry') }),
    ]);
    const wire = readFileSync(join(sessionDir(h.share, h.work, 'retry-1'), 'wire.jsonl'), 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l));
    expect(wire[0]).toEqual({ type: 'metadata', protocol_version: '1.10' });
    expect(wire.filter((r) => r.message?.type === 'StepRetry').map((r) => r.message.payload)).toEqual([
      expect.objectContaining({
        n: 1,
        next_attempt: 2,
        max_attempts: 3,
        error_type: 'APIStatusError',
        status_code: 500,
      }),
    ]);
    const at = model.requests.length;
    await expect(turn(s, '!fail bad request')).rejects.toThrow(
      "Error code: 400 - {'error': {'message': 'bad request', 'type': 'invalid_request_error'}}",
    );
    expect(model.requests.length - at).toBe(1);
    await s.close();
  }, 30_000);

  it('connects its MCP servers as it starts, prompt or not; a prompt that comes first waits for them, announced as kimi-cli does', async () => {
    const h = home();
    const ipc = join(h.root, 'ipc');
    for (const dir of ['messages', 'tasks']) mkdirSync(join(ipc, dir), { recursive: true });
    const config = JSON.parse(
      buildMcpConfig(
        { chatJid: 'g@g.us', groupFolder: 'g', isMain: false, ipcDir: ipc, timezone: 'UTC' },
        join(RUNNER_DIR, 'src', 'mcp-server.ts'),
        process.execPath,
      ),
    );
    const server = config.mcpServers.nanoclaw as { command: string; args: string[] };
    // A server slow to start (0.3 s), so the prompt surely comes while it is still connecting.
    config.mcpServers.nanoclaw = {
      ...server,
      command: 'sh',
      args: ['-c', 'sleep 0.3; exec "$0" "$@"', server.command, ...server.args],
    };
    writeFileSync(join(h.share, 'mcp.json'), JSON.stringify(config));
    const trace = join(h.root, 'trace');
    const traced = () =>
      existsSync(trace)
        ? readFileSync(trace, 'utf8')
            .split('\n')
            .filter(Boolean)
            .map((line) => line.split(' ')[0])
        : [];
    const open = (id: string) =>
      createSession({
        workDir: h.work,
        sessionId: id,
        model: 'k25',
        yoloMode: true,
        agentFile: h.agentFile,
        executable: STUB,
        env: { ...h.env, KIMI_STUB_TRACE: trace },
      });

    const early = open('mcp-1');
    const first = await turn(early, 'hello');
    const second = await turn(early, 'again');
    await early.close();
    expect(traced()).toEqual(['start', 'initialize', 'prompt', 'mcp-connected', 'prompt']);
    // SDK 0.1.8 does not know MCPLoadingBegin/End: it hands them on as non-fatal "unknown event" items.
    expect(first.events.filter((e) => e.type === 'error').map((e) => (e as { message?: string }).message)).toEqual([
      'Unknown event type: MCPLoadingBegin',
      'Unknown event type: MCPLoadingEnd',
    ]);
    expect(second.events.filter((e) => e.type === 'error')).toEqual([]);
    const wire = readFileSync(join(sessionDir(h.share, h.work, 'mcp-1'), 'wire.jsonl'), 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l));
    const statuses = wire
      .filter((r) => r.message?.type === 'StatusUpdate' && r.message.payload.mcp_status)
      .map((r) => r.message.payload.mcp_status);
    expect(statuses).toEqual([
      expect.objectContaining({ loading: true, connected: 0, total: 1, tools: 0 }),
      expect.objectContaining({
        loading: false,
        connected: 1,
        total: 1,
        servers: [
          expect.objectContaining({
            name: 'nanoclaw',
            status: 'connected',
            tools: expect.arrayContaining(['send_message']),
          }),
        ],
      }),
    ]);

    rmSync(trace);
    const idle = open('mcp-2');
    expect(await startCli(idle)).toBe(true); // spawn and initialize, no prompt
    for (let i = 0; i < 500 && !traced().includes('mcp-connected'); i++) await Bun.sleep(10);
    await idle.close();
    expect(traced()).toEqual(['start', 'initialize', 'mcp-connected']);
  });
});
