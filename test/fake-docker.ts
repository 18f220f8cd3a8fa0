/**
 * A stand-in for the `docker` CLI, for host tests that must not depend on an engine.
 *
 * Installed by test/helpers.ts as `<dir>/docker` (a shell wrapper). Everything it sees
 * is appended to `<dir>/calls.jsonl` (argv, its own environment, the stdin of `run`),
 * so tests can assert the exact command line and stdin contract. `docker run` plays a
 * scripted container that follows container/CONTRACT.md: it answers each prompt by the
 * last <message> in it, then waits for follow-ups ({"type":"message"} or, a scheduled
 * task as the next turn, {"type":"task"}) in the IPC input folder it was given with -v,
 * until `_close`. A warm start (`"warm": true`, empty prompt) answers nothing until the
 * first follow-up.
 *
 * Behaviour switches are files in <dir> (the host hands children no custom environment):
 *   engine-down      `docker info` fails like a stopped daemon
 *   no-image         `docker image inspect` fails
 *   running          names printed by `docker ps` (`rm -f` takes them away)
 *   no-kimi          `docker run --entrypoint kimi IMAGE --version` (or `info`) fails
 *   paused-<name>    written by `docker pause`, removed by `unpause`: the container reads no input meanwhile
 *   hold-ready       a container started now does not say `ready:` (nor read its prompt) until it is removed,
 *                    as a runner whose CLI is still starting
 *
 * The "model", by the text of the last message (after an optional @Name trigger):
 *   anything        → "echo: <text>"
 *   !fail TEXT      → error result TEXT, exit 1
 *   !crash          → exit 2 with no result
 *   !exit0          → exit 0 with no result (a runner that ended without answering)
 *   !sleep MS       → wait, then "slept MS"
 *   !internal       → "<internal>hidden</internal>visible"
 *   !silent         → success with a null result
 *   !failonce TEXT  → error the first time this exact prompt text is seen, echo after
 *   !model TEXT     → asks the model through the run's proxy socket (the -v onto
 *                     /run/nanoclaw/model.sock) with the token from stdin; answers
 *                     "model <status>: <body>"
 *   !deaf           → answers, then ignores _close (the host must stop it)
 *   !refused        → the model refused the key: an error result of kind auth, exit 1
 *   !fill BYTES [hold] → writes BYTES to fill.bin in the group folder (-v onto /workspace/group),
 *                     then answers "filled BYTES"; with hold, never answers (the run goes on)
 *   !flood BYTES [stdout] → writes BYTES of "x" with no newline to stderr (or stdout) and never
 *                     answers (the host must stop it)
 */
import { appendFileSync, existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { RESULT_END as END, RESULT_START as START } from '../nanoclaw.ts';

const [, , wrapperPath, ...argv] = process.argv;
const stateDir = join(wrapperPath!, '..');

function record(entry: Record<string, unknown>): void {
  appendFileSync(
    join(stateDir, 'calls.jsonl'),
    `${JSON.stringify({ argv, env: process.env, pid: process.pid, ...entry })}\n`,
  );
}

function unescapeXml(text: string): string {
  return text
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&quot;/g, '"')
    .replace(/&amp;/g, '&');
}

function lastMessageText(prompt: string): string {
  const all = [...prompt.matchAll(/<message [^>]*>([\s\S]*?)<\/message>/g)];
  const text = all.length ? unescapeXml(all.at(-1)![1]!) : prompt;
  return text.replace(/^@\S+\s+/, '').trim();
}

/** What every result of the turn being answered carries (CONTRACT.md): the newest message it answered, whether it was a task. */
let turn: { upTo?: number; task?: true } = {};

function emit(result: Record<string, unknown>): void {
  process.stdout.write(`${START}\n${JSON.stringify({ ...result, ...turn })}\n${END}\n`);
}

let deaf = false;
let token = '';

async function answer(prompt: string, sessionId: string): Promise<void> {
  const text = lastMessageText(prompt);
  const [command, ...rest] = text.split(' ');
  const arg = rest.join(' ');
  switch (command) {
    case '!fail':
      emit({ status: 'error', result: null, error: arg || 'failed', sessionId });
      return process.exit(1);
    case '!exit0':
      return process.exit(0);
    case '!crash':
      process.stderr.write('fake container crashing\n');
      return process.exit(2);
    case '!sleep':
      await Bun.sleep(Number(arg));
      emit({ status: 'success', result: `slept ${arg}`, sessionId });
      return;
    case '!internal':
      emit({ status: 'success', result: '<internal>hidden</internal>visible', sessionId });
      return;
    case '!silent':
      emit({ status: 'success', result: null, sessionId });
      return;
    case '!fill': {
      const [bytes, hold] = arg.split(' ');
      writeFileSync(join(mountedHostPath('/workspace/group')!, 'fill.bin'), Buffer.alloc(Number(bytes), 1));
      if (hold) return new Promise(() => {});
      emit({ status: 'success', result: `filled ${bytes}`, sessionId });
      return;
    }
    case '!flood': {
      const [bytes, where] = arg.split(' ');
      const out = where === 'stdout' ? process.stdout : process.stderr;
      const piece = Buffer.alloc(64 * 1024, 'x');
      for (let left = Number(bytes); left > 0; left -= piece.length)
        if (!out.write(left < piece.length ? piece.subarray(0, left) : piece))
          await new Promise((resolve) => out.once('drain', resolve));
      return new Promise(() => {});
    }
    case '!refused':
      emit({
        status: 'error',
        result: null,
        error: "Error code: 401 - {'error': {'message': 'Invalid Authentication'}}",
        errorKind: 'auth',
        sessionId,
      });
      return process.exit(1);
    case '!deaf':
      deaf = true;
      emit({ status: 'success', result: 'not listening', sessionId });
      return;
    case '!model': {
      const socket = mountedHostPath('/run/nanoclaw/model.sock');
      if (!socket) {
        emit({ status: 'error', result: null, error: 'no model socket mounted', sessionId });
        return;
      }
      const response = await fetch('http://model/chat/completions', {
        unix: socket,
        method: 'POST',
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'k25', messages: [{ role: 'user', content: arg }] }),
      } as RequestInit);
      emit({ status: 'success', result: `model ${response.status}: ${await response.text()}`, sessionId });
      return;
    }
    case '!failonce': {
      const seen = join(stateDir, `seen-${Bun.hash(prompt)}`);
      if (!existsSync(seen)) {
        writeFileSync(seen, '');
        emit({ status: 'error', result: null, error: arg || 'failed once', sessionId });
        process.exit(1);
      }
      emit({ status: 'success', result: `echo: ${text}`, sessionId });
      return;
    }
    default:
      emit({ status: 'success', result: `echo: ${text}`, sessionId });
  }
}

function mountedHostPath(containerPath: string): string | null {
  for (let i = 0; i < argv.length - 1; i++) {
    if (argv[i] !== '-v') continue;
    const [host, inside] = argv[i + 1]!.split(':');
    if (inside === containerPath) return host!;
  }
  return null;
}

async function run(): Promise<never> {
  const entrypoint = argv.indexOf('--entrypoint');
  if (entrypoint >= 0) {
    // `docker run --rm --entrypoint kimi IMAGE --version` (diagnostics): answer like the image would.
    record({ command: 'run-entrypoint' });
    if (argv[entrypoint + 1] === 'kimi' && ['--version', 'info'].includes(argv.at(-1)!)) {
      if (existsSync(join(stateDir, 'no-kimi'))) process.exit(127);
      // As the image answers: the pinned version (container/kimi prints `info`).
      const pin = (
        JSON.parse(readFileSync(new URL('../container/agent-runner/package.json', import.meta.url), 'utf8')) as {
          devDependencies: Record<string, string>;
        }
      ).devDependencies['@moonshot-ai/kimi-code'];
      if (argv.at(-1) === '--version') console.log(pin);
      else console.log(`kimi-code: ${pin} (pinned: ${pin})\nKimi doctor\n\nAll checked config files are valid.`);
      process.exit(0);
    }
    process.exit(64);
  }
  const stdin = await new Response(Bun.stdin.stream()).text();
  record({ command: 'run', stdin });
  const input = JSON.parse(stdin) as {
    prompt: string;
    warm?: boolean;
    sessionId?: string;
    upTo?: number;
    secrets?: { KIMI_API_KEY?: string };
  };
  token = input.secrets?.KIMI_API_KEY ?? '';
  const sessionId = input.sessionId ?? `fake-session-${process.pid}`;
  process.stderr.write('fake agent: reading the prompt\n');
  process.stderr.write(`Session initialized: ${sessionId}\n`);
  // Warm (CONTRACT.md): no prompt; the first follow-up is the first turn.
  if (input.warm && input.prompt !== '') {
    emit({ status: 'error', result: null, error: 'a warm start carries no prompt' });
    process.exit(1);
  }
  while (existsSync(join(stateDir, 'hold-ready'))) await Bun.sleep(20);
  // As the runner says it once its CLI, session and tools are up (CONTRACT.md).
  process.stderr.write(`[agent-runner] ready: CLI up, session ${sessionId} open, tools connected, 1 ms after start\n`);
  if (input.warm) record({ command: 'warm-start' });
  else {
    turn = input.upTo === undefined ? {} : { upTo: input.upTo };
    await answer(input.prompt, sessionId);
  }

  // The run's own inbox is mounted over /workspace/ipc/input.
  const ipc = mountedHostPath('/workspace/ipc');
  const inputDir = mountedHostPath('/workspace/ipc/input') ?? (ipc ? join(ipc, 'input') : null);
  const name = argv[argv.indexOf('--name') + 1]!;
  for (;;) {
    if (existsSync(join(stateDir, `stop-${name}`))) process.exit(137);
    // Frozen like a paused container: nothing is read until `docker unpause`.
    if (inputDir && existsSync(inputDir) && !existsSync(join(stateDir, `paused-${name}`))) {
      for (const file of readdirSync(inputDir)
        .filter((f) => !f.startsWith('.'))
        .sort()) {
        const path = join(inputDir, file);
        if (file === '_close') {
          if (deaf) continue;
          rmSync(path, { force: true });
          record({ command: 'closed', name });
          process.exit(0);
        }
        const followUp = JSON.parse(readFileSync(path, 'utf8')) as { type: string; text: string; upTo?: number };
        rmSync(path, { force: true });
        record({ command: followUp.type === 'task' ? 'task-turn' : 'follow-up', name, text: followUp.text });
        turn = {
          ...(followUp.upTo === undefined ? {} : { upTo: followUp.upTo }),
          ...(followUp.type === 'task' ? { task: true as const } : {}),
        };
        await answer(followUp.text, sessionId);
      }
    }
    await Bun.sleep(20);
  }
}

const [command] = argv;
switch (command) {
  case 'info':
    record({ command });
    if (existsSync(join(stateDir, 'engine-down'))) {
      process.stderr.write(
        'Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?\n',
      );
      process.exit(1);
    }
    console.log('Server Version: fake');
    break;
  case 'image':
    record({ command });
    if (existsSync(join(stateDir, 'no-image'))) {
      process.stderr.write(`Error: No such image: ${argv.at(-1)}\n`);
      process.exit(1);
    }
    console.log('[{}]');
    break;
  case 'ps': {
    record({ command });
    const running = join(stateDir, 'running');
    if (existsSync(running)) process.stdout.write(readFileSync(running, 'utf8'));
    break;
  }
  case 'pause':
    record({ command, name: argv.at(-1) });
    writeFileSync(join(stateDir, `paused-${argv.at(-1)}`), '');
    break;
  case 'unpause':
    record({ command, name: argv.at(-1) });
    rmSync(join(stateDir, `paused-${argv.at(-1)}`), { force: true });
    break;
  case 'stop':
    record({ command, name: argv.at(-1) });
    writeFileSync(join(stateDir, `stop-${argv.at(-1)}`), '');
    break;
  case 'rm': {
    const names = argv.slice(1).filter((arg) => !arg.startsWith('-'));
    record({ command, names });
    for (const name of names) writeFileSync(join(stateDir, `stop-${name}`), '');
    const running = join(stateDir, 'running');
    if (existsSync(running))
      writeFileSync(
        running,
        readFileSync(running, 'utf8')
          .split('\n')
          .filter((n) => n && !names.includes(n))
          .map((n) => `${n}\n`)
          .join(''),
      );
    break;
  }
  case 'run':
    await run();
    break;
  default:
    process.stderr.write(`fake docker: unsupported command ${command}\n`);
    process.exit(64);
}
