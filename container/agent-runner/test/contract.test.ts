/**
 * What the runner relies on, listed: the ACP methods, updates and fields (checked against
 * @agentclientprotocol/sdk's own schema, and against what the pinned Kimi Code CLI answers),
 * and the records of the CLI's session file (wire.jsonl) it reads a turn from. When either
 * package is updated, this file says what moved.
 */
import { client, methods, ndJsonStream } from '@agentclientprotocol/sdk';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { startFakeModel } from '../../../scripts/scripted-model.ts';
import { buildConfigToml, KEY_ENV } from '../src/config.ts';
import { findWireFile, readTurnRecord } from '../src/kimi.ts';
import { KIMI_MAIN, RUNNER_DIR, tempDir } from './helpers.ts';

vi.setConfig({ testTimeout: 120_000 });

/** The ACP methods the runner calls (client → agent) and answers (agent → client). */
const CALLS = ['initialize', 'session/new', 'session/resume', 'session/prompt', 'session/cancel', 'session/close'];
const ANSWERS = ['session/update', 'session/request_permission', 'elicitation/create'];

type Schema = {
  $defs: Record<
    string,
    { properties?: Record<string, unknown>; required?: string[]; oneOf?: unknown[]; anyOf?: unknown[]; enum?: string[] }
  >;
};
const schema = JSON.parse(
  readFileSync(join(RUNNER_DIR, 'node_modules', '@agentclientprotocol', 'sdk', 'schema', 'v1', 'schema.json'), 'utf8'),
) as Schema;
const fields = (name: string) => Object.keys(schema.$defs[name]?.properties ?? {});

describe('ACP, as @agentclientprotocol/sdk 2.4.0 defines it', () => {
  it('has every method the runner calls or answers', () => {
    const all = JSON.stringify(methods);
    for (const method of [...CALLS, ...ANSWERS]) expect(all).toContain(`"${method}"`);
  });

  it('has the fields the runner reads and writes', () => {
    expect(fields('InitializeRequest')).toEqual(expect.arrayContaining(['protocolVersion', 'clientCapabilities']));
    expect(fields('NewSessionRequest')).toEqual(expect.arrayContaining(['cwd', 'mcpServers']));
    expect(fields('NewSessionResponse')).toContain('sessionId');
    expect(fields('ResumeSessionRequest')).toEqual(expect.arrayContaining(['sessionId', 'cwd', 'mcpServers']));
    expect(fields('PromptRequest')).toEqual(expect.arrayContaining(['sessionId', 'prompt']));
    expect(fields('PromptResponse')).toContain('stopReason');
    expect(fields('RequestPermissionRequest')).toEqual(expect.arrayContaining(['toolCall', 'options']));
    expect(fields('PermissionOption')).toEqual(expect.arrayContaining(['optionId', 'name', 'kind']));
    expect(JSON.stringify(schema.$defs.PermissionOptionKind)).toContain('allow_always');
    expect(JSON.stringify(schema.$defs.SessionUpdate)).toContain('agent_message_chunk');
    expect(JSON.stringify(schema.$defs.ClientCapabilities)).toContain('elicitation');
  });
});

describe('the pinned Kimi Code CLI over ACP', () => {
  const model = startFakeModel({ key: 'sk-contract' });
  afterAll(() => model.stop());

  it('answers initialize with the capabilities the runner needs, and keeps a turn in wire.jsonl the way the runner reads it', async () => {
    const home = tempDir('nanoclaw-contract-');
    const work = tempDir('nanoclaw-contract-work-');
    Bun.write(join(home, 'config.toml'), buildConfigToml({ baseUrl: model.url }));
    const proc = Bun.spawn([process.execPath, KIMI_MAIN, 'acp'], {
      cwd: work,
      env: { PATH: process.env.PATH!, HOME: home, KIMI_CODE_HOME: home, [KEY_ENV]: 'sk-contract' },
      stdin: 'pipe',
      stdout: 'pipe',
      stderr: 'ignore',
    });
    const stdin = new WritableStream<Uint8Array>({
      write: (chunk) => {
        proc.stdin.write(chunk);
      },
    });
    const updates: string[] = [];
    const connection = client()
      .onNotification('session/update', ({ params }) => {
        updates.push(params.update.sessionUpdate);
      })
      .connect(ndJsonStream(stdin, proc.stdout));
    try {
      const init = await connection.agent.request('initialize', {
        protocolVersion: 1,
        clientCapabilities: { elicitation: { form: {} } },
      });
      expect(init.protocolVersion).toBe(1);
      expect(init.agentCapabilities?.sessionCapabilities).toEqual(expect.objectContaining({ resume: {}, close: {} }));
      expect(init.agentInfo).toMatchObject({ name: 'Kimi Code CLI' });
      const { sessionId } = await connection.agent.request('session/new', { cwd: work, mcpServers: [] });
      expect(sessionId).toMatch(/^session_/);
      const answer = await connection.agent.request('session/prompt', {
        sessionId,
        prompt: [{ type: 'text', text: 'contract check' }],
      });
      expect(answer.stopReason).toBe('end_turn');
      expect(updates).toContain('agent_message_chunk');
      await connection.agent.request('session/close', { sessionId });
      const wire = findWireFile(home, sessionId);
      expect(wire).not.toBeNull();
      const lines = readFileSync(wire!, 'utf8').split('\n').filter(Boolean);
      const types = new Set(lines.map((line) => (JSON.parse(line) as { type?: string }).type));
      for (const type of ['turn.prompt', 'context.append_loop_event', 'turn.ended']) expect(types).toContain(type);
      expect(readTurnRecord(lines)).toEqual({ said: ['[stub] contract check'], ended: true });
      // An unknown session is refused as "invalid params", which the runner takes for "start a new one".
      await expect(
        connection.agent.request('session/resume', { sessionId: 'session_unknown', cwd: work, mcpServers: [] }),
      ).rejects.toMatchObject({ code: -32602 });
    } finally {
      connection.close();
      proc.kill();
      await proc.exited;
    }
  });
});
