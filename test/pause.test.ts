/**
 * A container paused while it waits (the host `docker pause`s an idle one and unpauses it
 * when a message comes), on a real Docker engine with the real test image: the runner
 * must take the message written while it was frozen, even though its idle limit fell due
 * during the pause, and answer it. Only the model is scripted (behind the host's real
 * model proxy, on a mounted socket).
 */
import { chmodSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeIpcFile } from '../container/agent-runner/src/mcp-server.ts';
import { ModelProxy, RESULT_END, RESULT_START } from '../nanoclaw.ts';
import { type FakeModel, startFakeModel } from '../scripts/scripted-model.ts';
import { tempDir, waitFor } from './helpers.ts';

const IMAGE = process.env.NANOCLAW_TEST_IMAGE ?? 'nanoclaw-agent:test';
const KEY = 'sk-pause-test-key-0123456789';
/** The runner's idle limit in this test: shorter than the pause, so it falls due while frozen. */
const IDLE_MS = 8_000;
const PAUSE_MS = 15_000;

let model: FakeModel;
beforeAll(() => {
  if (Bun.spawnSync(['docker', 'image', 'inspect', IMAGE]).exitCode !== 0)
    throw new Error(`The image ${IMAGE} is missing: run ./container/build.sh --test (npm test does this first).`);
  model = startFakeModel({ key: KEY });
});
afterAll(() => model?.stop());

const docker = (...args: string[]) => {
  const run = Bun.spawnSync(['docker', ...args]);
  if (run.exitCode !== 0) throw new Error(`docker ${args.join(' ')}: ${run.stderr.toString()}`);
};

describe('a paused container', () => {
  it('takes the message written while it was paused (its idle limit due meanwhile) and answers it after the unpause', async () => {
    const dir = tempDir('nanoclaw-pause-');
    const ipc = join(dir, 'ipc');
    mkdirSync(join(ipc, 'input'), { recursive: true });
    for (const d of [dir, ipc, join(ipc, 'input')]) chmodSync(d, 0o777); // the container runs as uid 1000
    const proxyDir = join(dir, 'proxy');
    mkdirSync(proxyDir, { mode: 0o755 });
    const proxy = new ModelProxy({
      mode: 'unix',
      dir: proxyDir,
      upstream: model.url,
      apiKey: () => KEY,
      record: () => {},
    });
    const name = `nanoclaw-pause-test-${process.pid}-${Date.now()}`;
    const run = proxy.open('pause', name);
    const input = { prompt: '', warm: true, groupFolder: 'pause', chatJid: 'pause@g.us', isMain: false };
    const proc = Bun.spawn(
      [
        'docker',
        'run',
        '-i',
        '--rm',
        '--name',
        name,
        '--network',
        'none',
        '-e',
        `NANOCLAW_RUNNER_IDLE_MS=${IDLE_MS}`,
        '-e',
        'NANOCLAW_MODEL_SOCKET=/run/nanoclaw/model.sock',
        '-v',
        `${run.socketPath}:/run/nanoclaw/model.sock`,
        '-v',
        `${ipc}:/workspace/ipc`,
        IMAGE,
      ],
      {
        stdin: new Blob([JSON.stringify({ ...input, secrets: { KIMI_API_KEY: run.token } })]),
        stdout: 'pipe',
        stderr: 'pipe',
      },
    );
    let out = '';
    let err = '';
    const pump = async (stream: ReadableStream<Uint8Array>, add: (text: string) => void) => {
      const decoder = new TextDecoder();
      for await (const chunk of stream) add(decoder.decode(chunk, { stream: true }));
    };
    const reading = Promise.all([pump(proc.stdout, (t) => (out += t)), pump(proc.stderr, (t) => (err += t))]);
    try {
      // Warm and fully ready (CLI, session, tools), then frozen as an idle container is.
      await waitFor(() => err.includes('ready: CLI up'), 90_000, 'the runner ready');
      // The tools are served by the runner itself: no MCP server process of their own.
      const processes = Bun.spawnSync(['docker', 'exec', name, 'ps', '-eo', 'args']).stdout.toString();
      expect(processes).toContain('kimi acp');
      expect(processes).not.toContain('mcp-server');
      docker('pause', name);
      writeIpcFile(join(ipc, 'input'), { type: 'message', text: 'while you slept', upTo: 7 });
      await Bun.sleep(PAUSE_MS);
      docker('unpause', name);
      await waitFor(() => out.includes(RESULT_END), 90_000, 'the answer');
      writeIpcFile(join(ipc, 'input'), { type: 'message', text: 'and after', upTo: 8 });
      await waitFor(() => out.split(RESULT_END).length === 3, 90_000, 'the second answer');
      Bun.spawnSync(['touch', join(ipc, 'input', '_close')]);
      expect(await proc.exited).toBe(0);
      await reading;
    } finally {
      proc.kill();
      Bun.spawnSync(['docker', 'rm', '-f', name]);
      run.close();
      proxy.stop();
    }
    const results = [...out.matchAll(new RegExp(`${RESULT_START}\\n(.*)\\n${RESULT_END}`, 'g'))].map((m) =>
      JSON.parse(m[1]!),
    );
    expect(results).toEqual([
      expect.objectContaining({ status: 'success', result: '[stub] while you slept', upTo: 7 }),
      expect.objectContaining({ status: 'success', result: '[stub] and after', upTo: 8 }),
    ]);
  });
});
