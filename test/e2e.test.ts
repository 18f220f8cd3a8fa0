/**
 * End to end on a real Docker engine with the real test image (nanoclaw-agent:test, built
 * from container/Dockerfile by `container/build.sh --test`): the real agent-runner, the
 * real Kimi Code CLI over ACP and the real MCP server inside, the host's real model proxy
 * outside; only the model is scripted (scripts/scripted-model.ts, on loopback, checking
 * the key). `npm test` builds the image before running this file.
 */
import { chmodSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { startFakeModel, type FakeModel } from '../scripts/scripted-model.ts';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import {
  buildDockerArgs,
  groupMounts,
  groupTrees,
  hardeningArgs,
  Host,
  INSTALL_LABEL,
  installId,
  removeLeftoverContainers,
  unpauseContainer,
  ModelProxy,
  prepareGroupFolders,
  RESULT_END,
  RESULT_START,
  addGroup,
  setupLogging,
  Store,
  type Config,
  type RegisteredGroup,
} from '../nanoclaw.ts';
import { proto, type WAMessage } from '@whiskeysockets/baileys';
import {
  encryptedStream,
  flakyServer,
  linkedAuthDir,
  openAsWhatsAppWould,
  QUIET_SWEEPS,
  RecordingChannel,
  RecordingWhatsApp,
  startWorld,
  taskRow,
  tempDir,
  tempProject,
  texts,
  waitFor,
  socketOf,
} from './helpers.ts';

const IMAGE = process.env.NANOCLAW_TEST_IMAGE ?? 'nanoclaw-agent:test';
const KEY = 'sk-e2e-test-key-0123456789';
const MAIN = 'me@s.whatsapp.net';
const FAMILY = 'family@g.us';
const WORK = 'work@g.us';

/** The real docker, wrapped so the test can count `docker run`s. */
function recordingDocker(): { path: string; runs(): number } {
  const dir = tempDir('nanoclaw-e2e-docker-');
  const path = join(dir, 'docker');
  const log = join(dir, 'calls');
  writeFileSync(path, `#!/bin/sh\necho "$1" >> "${log}"\nexec docker "$@"\n`);
  chmodSync(path, 0o755);
  return {
    path,
    runs: () =>
      existsSync(log)
        ? readFileSync(log, 'utf8')
            .split('\n')
            .filter((l) => l === 'run').length
        : 0,
  };
}

/** The scripted model: the host's proxy forwards to it, with the real key, which it checks. */
let model: FakeModel;
beforeAll(() => {
  const inspect = Bun.spawnSync(['docker', 'image', 'inspect', IMAGE]);
  if (inspect.exitCode !== 0) {
    throw new Error(`The image ${IMAGE} is missing: run ./container/build.sh --test (npm test does this first).`);
  }
  model = startFakeModel({ key: KEY });
  return () => model.stop();
});

interface World {
  config: Config;
  store: Store;
  channel: RecordingChannel;
  host: Host;
  docker: ReturnType<typeof recordingDocker>;
  groups: Record<'main' | 'family' | 'work', RegisteredGroup>;
}

async function world(env: Record<string, string> = {}, dotEnv = `KIMI_API_KEY=${KEY}\n`): Promise<World> {
  const docker = recordingDocker();
  const config = tempProject(
    { CONTAINER_RUNTIME: docker.path, CONTAINER_IMAGE: IMAGE, IDLE_TIMEOUT: '60000', KIMI_BASE_URL: model.url, ...env },
    dotEnv,
  );
  const w = await startWorld({
    config,
    channel: new RecordingChannel([MAIN, FAMILY, WORK]),
    groups: [
      { jid: MAIN, name: 'Me', folder: 'main', isMain: true },
      { jid: FAMILY, name: 'Family', folder: 'family' },
      { jid: WORK, name: 'Work', folder: 'work' },
    ],
    secrets: [KEY],
    options: { retryBaseMs: 200, shutdownGraceMs: 5000 },
  });
  // Memories the agent must read (the containers mount the folders; the host does not read them).
  writeFileSync(join(config.groupsDir, 'global', 'CLAUDE.md'), 'GLOBAL-MEMORY-MARKER: the user likes tea.\n');
  writeFileSync(join(config.groupsDir, 'family', 'CLAUDE.md'), 'FAMILY-MEMORY-MARKER: dinner is at 7.\n');
  const [main, family, work] = w.registered as [RegisteredGroup, RegisteredGroup, RegisteredGroup];
  return { ...w, docker, groups: { main, family, work } };
}

describe('the image on its own', () => {
  it('answers the guide’s manual test JSON piped into docker run -i (the model through a proxy socket)', async () => {
    const dir = tempDir('nanoclaw-e2e-model-');
    chmodSync(dir, 0o755);
    // The host's own proxy on a socket, in front of the scripted model: what a run gets mounted.
    const proxy = new ModelProxy({ mode: 'unix', dir, upstream: model.url, apiKey: () => KEY, record: () => {} });
    const run = proxy.open('test', `e2e-${Date.now()}`);
    const input = {
      prompt: 'test',
      groupFolder: 'test',
      chatJid: 'test@g.us',
      isMain: false,
      secrets: { KIMI_API_KEY: run.token },
    };
    const proc = Bun.spawn(
      [
        'docker',
        'run',
        '-i',
        '--rm',
        '--network',
        'none',
        '-v',
        `${run.socketPath}:/run/nanoclaw/model.sock`,
        '-e',
        'NANOCLAW_MODEL_SOCKET=/run/nanoclaw/model.sock',
        IMAGE,
      ],
      {
        stdin: new Blob([JSON.stringify(input)]),
        stdout: 'pipe',
        stderr: 'pipe',
      },
    );
    const stdout = await new Response(proc.stdout).text();
    await proc.exited;
    run.close();
    proxy.stop();
    const start = stdout.indexOf(RESULT_START);
    const end = stdout.indexOf(RESULT_END);
    expect(start).toBeGreaterThanOrEqual(0);
    const result = JSON.parse(stdout.slice(start + RESULT_START.length, end).trim());
    expect(result).toMatchObject({ status: 'success', result: '[stub] test' });
  });

  it('a paused container is thawed through the engine’s own API (no CLI process on the reply’s path)', async () => {
    const name = `nanoclaw-thaw-test-${process.pid}`;
    const docker = (...args: string[]) =>
      Bun.spawnSync(['docker', ...args])
        .stdout.toString()
        .trim();
    docker('run', '-d', '--rm', '--name', name, '--entrypoint', 'sleep', IMAGE, 'infinity');
    try {
      docker('pause', name);
      expect(docker('inspect', '-f', '{{.State.Paused}}', name)).toBe('true');
      expect(await unpauseContainer('docker', name)).toBe('engine');
      expect(docker('inspect', '-f', '{{.State.Paused}}', name)).toBe('false');
    } finally {
      docker('rm', '-f', name);
    }
  });

  it('runs the pinned Kimi Code CLI: `kimi --version` is the runner’s pin, and the guide’s `kimi info` answers', async () => {
    const pin = (
      JSON.parse(readFileSync(new URL('../container/agent-runner/package.json', import.meta.url), 'utf8')) as {
        devDependencies: Record<string, string>;
      }
    ).devDependencies['@moonshot-ai/kimi-code'];
    const run = Bun.spawnSync([
      'docker',
      'run',
      '--rm',
      '--entrypoint',
      '/bin/bash',
      IMAGE,
      '-c',
      'kimi --version; kimi info',
    ]);
    const [version, info] = [run.stdout.toString().split('\n')[0], run.stdout.toString()];
    expect(run.exitCode).toBe(0);
    expect(version).toBe(pin);
    expect(info).toContain(`kimi-code: ${pin} (pinned: ${pin})`);
    expect(info).toContain('home: /home/node/.kimi');
    expect(info).toContain('config files are valid');
  });

  it('runs as node (uid 1000, HOME=/home/node) with exactly the contract’s mounts, hardened', async () => {
    const w = await world();
    const mountsFor = (group: RegisteredGroup) => groupMounts(w.config, group);
    const probe = (group: RegisteredGroup, script: string) => {
      prepareGroupFolders(w.config, group); // as runContainer prepares them
      const args = buildDockerArgs(
        `nanoclaw-e2e-probe-${Date.now()}`,
        IMAGE,
        mountsFor(group),
        {},
        hardeningArgs(w.config, group),
      );
      args.splice(args.indexOf(IMAGE), 0, '--entrypoint', '/bin/bash');
      const run = Bun.spawnSync(['docker', ...args, '-c', script]);
      return run.stdout.toString().trim();
    };
    expect(probe(w.groups.family, 'id -u; echo $HOME; whoami')).toBe('1000\n/home/node\nnode');
    const family = probe(
      w.groups.family,
      'touch /workspace/global/x 2>/dev/null && echo global-writable || echo global-ro; ' +
        'test -d /workspace/project && echo has-project || echo no-project; ' +
        'touch /workspace/group/ok && echo group-rw; ls /home/node/.kimi/../.kimi >/dev/null && echo kimi-ok; ' +
        'ls /workspace; cat /workspace/group/CLAUDE.md',
    );
    expect(family).toContain('global-ro');
    expect(family).toContain('no-project');
    expect(family).toContain('group-rw');
    expect(family).toContain('FAMILY-MEMORY-MARKER');
    expect(family).not.toContain('main'); // no other group's folder in sight
    chmodSync(w.config.projectRoot, 0o755); // a checkout is world-readable; mkdtemp's 0700 is not
    const mountPoints = (group: RegisteredGroup) =>
      probe(group, "awk '{print $2}' /proc/mounts | grep -E '^/(workspace|home/node)' | sort").split('\n');
    expect(mountPoints(w.groups.main)).toEqual([
      '/home/node',
      '/home/node/.kimi',
      '/workspace/group',
      '/workspace/group/logs',
      '/workspace/ipc',
      '/workspace/project',
      '/workspace/project/.env',
      '/workspace/project/data',
      '/workspace/project/groups/global',
      '/workspace/project/store',
    ]);
    expect(mountPoints(w.groups.family)).toEqual([
      '/home/node',
      '/home/node/.kimi',
      '/workspace/global',
      '/workspace/group',
      '/workspace/group/logs',
      '/workspace/ipc',
    ]);
    const main = probe(
      w.groups.main,
      'ls /workspace/project/groups; cat /workspace/project/.env; find /workspace/project/store /workspace/project/data -mindepth 1 | wc -l; ' +
        'touch /workspace/project/x 2>/dev/null && echo project-writable || echo project-ro; ' +
        'echo edited >> /workspace/project/groups/global/CLAUDE.md && echo global-writable',
    );
    expect(main.split('\n')).toEqual(
      expect.arrayContaining(['family', 'global', 'main', 'work', '0', 'project-ro', 'global-writable']),
    );
    expect(main).not.toContain(KEY);
    expect(readFileSync(join(w.config.groupsDir, 'global', 'CLAUDE.md'), 'utf8')).toContain('edited');
  });
});

describe('host and real container together', () => {
  it('chat: a message in, the stub’s reply out; the next run resumes the same session', async () => {
    const w = await world({ IDLE_TIMEOUT: '500' });
    w.channel.receive(MAIN, 'hello there');
    await waitFor(() => texts(w).length === 1, 60_000, 'first reply');
    expect(texts(w)).toEqual(['Andy: [stub] hello there']);
    const session = w.store.getSession('main');
    expect(session).toBeTruthy();
    await waitFor(() => !w.host.queue.isRunning(MAIN), 60_000, 'idle close');
    w.channel.receive(MAIN, '!session');
    await waitFor(() => texts(w).length === 2, 60_000, 'second reply');
    expect(texts(w)[1]).toBe(`Andy: [stub] ${session}`);
    expect(w.docker.runs()).toBe(2);
    expect(w.store.getSession('main')).toBe(session);
    const ids = [
      ...readFileSync(join(w.config.logsDir, 'nanoclaw.log'), 'utf8').matchAll(/Session initialized: (\S+)$/gm),
    ].map((m) => m[1]);
    expect(ids).toEqual([session, session]);
  });

  it('hands a follow-up to the live container (no second docker run) and _close ends it', async () => {
    const w = await world();
    w.channel.receive(MAIN, 'one');
    await waitFor(() => texts(w).length === 1, 60_000, 'first reply');
    w.channel.receive(MAIN, 'two');
    await waitFor(() => texts(w).length === 2, 60_000, 'follow-up reply');
    expect(texts(w)).toEqual(['Andy: [stub] one', 'Andy: [stub] two']);
    expect(w.docker.runs()).toBe(1);
    w.host.queue.closeContainer(MAIN); // _close into the run's own inbox
    await waitFor(() => !w.host.queue.isRunning(MAIN), 60_000, 'container closed');
  });

  it('a ready agent from the warm pool is really frozen (docker pause) after WARM_PAUSE_AFTER; the next message thaws it and is answered in the same session', async () => {
    const w = await world({ WARM_PAUSE_AFTER: '300' });
    w.channel.receive(MAIN, 'one');
    await waitFor(() => texts(w).length === 1, 60_000, 'first reply');
    const paused = () =>
      Bun.spawnSync([
        'docker',
        'ps',
        '--filter',
        `label=${INSTALL_LABEL}=${installId(w.config)}`,
        '--filter',
        'status=paused',
        '--format',
        '{{.Names}}',
      ])
        .stdout.toString()
        .trim();
    await waitFor(() => paused() !== '', 60_000, 'the container paused');
    w.channel.receive(MAIN, '!session');
    await waitFor(() => texts(w).length === 2, 60_000, 'the thawed agent’s reply');
    expect(texts(w)[1]).toBe(`Andy: [stub] ${w.store.getSession('main')}`);
    expect(w.docker.runs()).toBe(1); // a frozen container cannot answer: this reply proves the thaw
    // A host that died leaves its paused agents behind: the next start removes them like any leftover.
    await waitFor(() => paused() !== '', 60_000, 'paused again');
    const frozen = paused();
    expect(removeLeftoverContainers(w.config)).toEqual([frozen]);
    expect(paused()).toBe('');
  });

  it('typing starts the real container with no prompt; the message then goes into it and is answered, one docker run', async () => {
    const w = await world();
    expect(w.host.prewarm(MAIN)).toBe(true);
    await Bun.sleep(1500); // the container, its runner and the CLI come up with nothing to answer
    expect(texts(w)).toEqual([]);
    w.channel.receive(MAIN, 'warm hello');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    expect(texts(w)).toEqual(['Andy: [stub] warm hello']);
    expect(w.docker.runs()).toBe(1);
    expect(w.store.messagesSince(MAIN, w.store.getCursor(MAIN))).toEqual([]);
  });

  it('a group-context task in a chat with a live container is a turn of it: same container, same session, chat container not closed', async () => {
    const w = await world();
    w.channel.receive(FAMILY, '@Andy hello');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    const session = w.store.getSession('family');
    w.store.createTask(
      taskRow({
        id: 'e2e-turn',
        groupFolder: 'family',
        chatJid: FAMILY,
        prompt: 'water the plants',
        scheduleValue: '600000',
        contextMode: 'group',
        nextRun: new Date().toISOString(),
        createdAt: new Date().toISOString(),
      }),
    );
    w.host.scheduler.arm();
    await waitFor(() => w.store.taskRuns('e2e-turn').length === 1, 60_000, 'task run');
    expect(w.store.taskRuns('e2e-turn')[0]).toMatchObject({ status: 'success', result: '[stub] water the plants' });
    expect(texts(w, FAMILY)).toEqual(['Andy: [stub] hello', 'Andy: [stub] water the plants']);
    w.channel.receive(FAMILY, '@Andy still here?');
    await waitFor(() => texts(w).length === 3, 60_000, 'reply after the task');
    expect(w.docker.runs()).toBe(1);
    expect(w.store.getSession('family')).toBe(session);
  });

  it('!context shows both memories reached the agent', async () => {
    const w = await world();
    w.channel.receive(FAMILY, '@Andy !context');
    await waitFor(() => texts(w).length === 1, 60_000, 'reply');
    expect(texts(w)[0]).toContain('GLOBAL-MEMORY-MARKER');
    expect(texts(w)[0]).toContain('FAMILY-MEMORY-MARKER');
  });

  it('send_message reaches the group’s chat; a non-main group cannot message another chat', async () => {
    const w = await world();
    w.channel.receive(FAMILY, '@Andy !tool mcp__nanoclaw__send_message {"text":"hello family"}');
    await waitFor(() => texts(w, FAMILY).includes('Andy: hello family'), 60_000, 'tool message');
    w.channel.receive(FAMILY, `@Andy !tool mcp__nanoclaw__send_message {"text":"psst","chatJid":"${WORK}"}`);
    await waitFor(() => texts(w, FAMILY).length >= 3, 60_000, 'second tool reply');
    await Bun.sleep(500);
    expect(texts(w, WORK)).toEqual([]);
  });

  it('schedule_task, register_group and refresh_groups by role', async () => {
    const w = await world();
    w.channel.receive(
      FAMILY,
      '@Andy !tool mcp__nanoclaw__schedule_task {"prompt":"water the plants","schedule_type":"cron","schedule_value":"0 9 * * *","context_mode":"group"}',
    );
    await waitFor(() => w.store.listTasks('family').length === 1, 60_000, 'task stored');
    w.channel.receive(
      FAMILY,
      '@Andy !tool mcp__nanoclaw__register_group {"jid":"club@g.us","name":"Club","folder":"club"}',
    );
    await waitFor(() => texts(w, FAMILY).length >= 2, 60_000, 'refusal reply');
    expect(w.store.groupByJid('club@g.us')).toBeNull();
    w.channel.receive(MAIN, '!tool mcp__nanoclaw__register_group {"jid":"club@g.us","name":"Club","folder":"club"}');
    await waitFor(() => w.store.groupByJid('club@g.us'), 60_000, 'club registered by main');
    w.channel.receive(MAIN, '!tool mcp__nanoclaw__refresh_groups {}');
    await waitFor(() => texts(w, MAIN).length >= 2, 60_000, 'refresh reply');
  });

  it('no key → the chat is told once what to fix, nothing retried; with the key back, a new message is answered', async () => {
    const w = await world({}, '');
    w.channel.receive(MAIN, 'are you there?');
    await waitFor(() => texts(w).length === 1, 60_000, 'the notice');
    expect(texts(w)[0]).toContain('NanoClaw has no Kimi key');
    expect(texts(w)[0]).toContain('KIMI_API_KEY');
    w.channel.receive(MAIN, 'still there?');
    const stillThere = w.store.latestSeq(MAIN);
    // Its run fails like the first: the messages it was given count as answered, quietly.
    await waitFor(() => w.store.getCursor(MAIN) >= stillThere, 90_000, 'the second message given up');
    await waitFor(() => !w.host.queue.isRunning(MAIN), 60_000, 'its container gone');
    expect(texts(w)).toHaveLength(1); // told once, not once per message
    writeFileSync(w.config.envFile, `KIMI_API_KEY=${KEY}\n`);
    w.channel.receive(MAIN, 'and now?');
    await waitFor(() => texts(w).length === 2, 90_000, 'answer after the key came back');
    expect(texts(w)[1]).toBe('Andy: [stub] and now?');
  });

  it('the CLI killed mid-turn → an error at once, retried with backoff, and no reply is sent twice', async () => {
    const w = await world();
    w.channel.receive(MAIN, 'before the crash');
    await waitFor(() => texts(w).length === 1, 60_000, 'first reply');
    w.channel.receive(MAIN, '!shell kill -9 $PPID'); // the Bash tool's parent is the CLI
    await waitFor(() => w.docker.runs() >= 2, 60_000, 'a retry');
    await Bun.sleep(1000);
    expect(texts(w).filter((t) => t === 'Andy: [stub] before the crash')).toHaveLength(1);
  });
});

describe('WhatsApp and scheduled tasks with the real container', () => {
  it('a WhatsApp message through the channel’s handler → exactly one reply through its send path', async () => {
    const config = tempProject(
      { CONTAINER_IMAGE: IMAGE, IDLE_TIMEOUT: '60000', KIMI_BASE_URL: model.url },
      `KIMI_API_KEY=${KEY}\n`,
    );
    setupLogging(config, { terminalLevel: 'silent', secrets: [KEY] });
    const store = new Store(config.dbPath);
    addGroup(config, store, { jid: FAMILY, name: 'Family', folder: 'family' });
    const server = flakyServer(60_000);
    const whatsapp = new RecordingWhatsApp({
      authDir: await linkedAuthDir(),
      assistantName: 'Andy',
      hasOwnNumber: false,
      waWebSocketUrl: server.url,
      mediaTreeFor: () => null,
      store,
    });
    const host = new Host(config, store, [whatsapp], QUIET_SWEEPS);
    try {
      await host.start();
      openAsWhatsAppWould(socketOf(whatsapp));
      const inbound = proto.WebMessageInfo.fromObject({
        key: { remoteJid: FAMILY, participant: '4915100000002@s.whatsapp.net', fromMe: false, id: '3EB0E2E0001' },
        message: { extendedTextMessage: { text: '@Andy are we on for sunday?' } },
        messageTimestamp: Math.floor(Date.now() / 1000),
        pushName: 'Alice',
      }) as WAMessage;
      socketOf(whatsapp).ev.emit('messages.upsert', { messages: [inbound], type: 'notify' });
      socketOf(whatsapp).ev.emit('messages.upsert', { messages: [inbound], type: 'append' }); // delivered twice
      await waitFor(() => whatsapp.delivered.length === 1, 60_000, 'reply');
      await Bun.sleep(1000);
      expect(whatsapp.delivered.map(({ jid, text }) => ({ jid, text }))).toEqual([
        { jid: FAMILY, text: 'Andy: [stub] are we on for sunday?' },
      ]);
    } finally {
      await host.stop();
      store.close();
      server.stop();
    }
  });

  it('an interval task whose agent calls send_message: the message reaches the chat', async () => {
    const w = await world();
    w.store.createTask(
      taskRow({
        id: 'e2e-interval',
        groupFolder: 'family',
        chatJid: FAMILY,
        prompt: '!tool mcp__nanoclaw__send_message {"text":"time to water the plants"}',
        scheduleValue: '600000',
        nextRun: new Date(Date.now() + 200).toISOString(),
        createdAt: new Date().toISOString(),
      }),
    );
    w.host.scheduler.arm();
    await waitFor(() => texts(w, FAMILY).includes('Andy: time to water the plants'), 60_000, 'task message');
    await waitFor(() => w.store.taskRuns('e2e-interval').length === 1, 60_000, 'run logged');
    expect(w.store.taskRuns('e2e-interval')[0]).toMatchObject({ status: 'success' });
    expect(new Date(w.store.getTask('e2e-interval')!.nextRun!).getTime()).toBeGreaterThan(Date.now() + 500_000);
  });
});

describe('what the real Kimi CLI does, through the host and the real image', () => {
  it('a question goes to the group with numbered options; the answer needs no trigger; the agent goes on with it', async () => {
    const w = await world();
    w.channel.receive(FAMILY, '@Andy !ask Which day? | Saturday | Sunday');
    const question = await waitFor(
      () => texts(w, FAMILY).find((t) => t.includes('Which day?')),
      60_000,
      'the question',
    );
    expect(question).toBe(
      'Andy: ❓ Which day?\n1. Saturday\n2. Sunday\n_Reply with a number; anything else is read as a new message._',
    );
    w.channel.receive(FAMILY, '2');
    await waitFor(() => texts(w, FAMILY).length === 2, 60_000, 'the answer');
    expect(texts(w, FAMILY)[1]).toBe('Andy: [stub] answered: {"Which day?":"Sunday"}');
    expect(w.docker.runs()).toBe(1);
  });

  it('a turn of several steps reaches the chat as separate messages, never glued', async () => {
    const w = await world();
    w.channel.receive(MAIN, '!steps');
    await waitFor(() => texts(w, MAIN).length === 2, 60_000, 'both steps');
    expect(texts(w, MAIN)).toEqual(['Andy: Let me check.', 'Andy: Here is the answer.']);
  });

  it('memory edited between two containers of one session reaches the model (the CLI would keep the old system prompt)', async () => {
    const w = await world({ IDLE_TIMEOUT: '300' });
    w.channel.receive(FAMILY, '@Andy !context');
    await waitFor(() => texts(w, FAMILY).length === 1, 60_000, 'first context');
    expect(texts(w, FAMILY)[0]).toContain('FAMILY-MEMORY-MARKER');
    const session = w.store.getSession('family');
    await waitFor(() => !w.host.queue.isRunning(FAMILY), 60_000, 'container closed');
    writeFileSync(join(w.config.groupsDir, 'family', 'CLAUDE.md'), 'FAMILY-MEMORY-EDITED: dinner is at 8 now.\n');
    w.channel.receive(FAMILY, '@Andy !context');
    await waitFor(() => texts(w, FAMILY).length === 2, 60_000, 'second context');
    // The session keeps the system prompt it began with; the edit comes as a <memory-update>.
    expect(texts(w, FAMILY)[1]).toMatch(/<memory-update>[\s\S]*FAMILY-MEMORY-EDITED[\s\S]*<\/memory-update>/);
    expect(w.store.getSession('family')).toBe(session);
    expect(w.docker.runs()).toBe(2);
  });

  it('a context too long for the model: the CLI compacts it and answers in the same session; its notes stay out of the chat', async () => {
    const w = await world();
    w.channel.receive(MAIN, 'hello');
    await waitFor(() => texts(w, MAIN).length === 1, 60_000, 'first answer');
    const before = w.store.getSession('main');
    w.channel.receive(MAIN, '!context-full');
    await waitFor(() => texts(w, MAIN).length === 2, 60_000, 'the answer');
    await Bun.sleep(500);
    expect(texts(w, MAIN).slice(1)).toEqual(['Andy: [stub] fits now']);
    expect(w.store.getSession('main')).toBe(before);
  });

  it('a refused key: the chat hears once what to fix, and the run is not retried', async () => {
    const w = await world({}, 'KIMI_API_KEY=sk-not-the-right-key-0000\n');
    w.channel.receive(MAIN, 'hello?');
    await waitFor(() => texts(w, MAIN).length === 1, 60_000, 'the notice');
    expect(texts(w, MAIN)[0]).toMatch(
      /^Andy: I cannot answer: http:\/\/127\.0\.0\.1:\d+\/v1 refused the Kimi key \(401\)\. Check KIMI_API_KEY in \.env; /,
    );
    await Bun.sleep(1500);
    expect(w.docker.runs()).toBe(1);
  });

  it('a photo sent to a group reaches the model as a picture: downloaded by the host, read by the CLI’s ReadMediaFile', async () => {
    const config = tempProject(
      { CONTAINER_IMAGE: IMAGE, IDLE_TIMEOUT: '60000', KIMI_BASE_URL: model.url },
      `KIMI_API_KEY=${KEY}\n`,
    );
    chmodSync(config.projectRoot, 0o755);
    setupLogging(config, { terminalLevel: 'silent', secrets: [KEY] });
    const store = new Store(config.dbPath);
    addGroup(config, store, { jid: FAMILY, name: 'Family', folder: 'family' });
    const photo = Buffer.from('ffd8ffe000104a46494600010100000100010000ffdb004300', 'hex');
    const encrypted = await encryptedStream(photo, 'image');
    const media = Bun.serve({ port: 0, fetch: () => new Response(Bun.file(encrypted.encFilePath)) });
    const server = flakyServer(60_000);
    const whatsapp = new RecordingWhatsApp({
      authDir: await linkedAuthDir(),
      assistantName: 'Andy',
      hasOwnNumber: false,
      waWebSocketUrl: server.url,
      mediaTreeFor: (jid) => (store.groupByJid(jid) ? groupTrees(config, 'family').group : null),
      store,
    });
    const host = new Host(config, store, [whatsapp], QUIET_SWEEPS);
    try {
      await host.start();
      openAsWhatsAppWould(socketOf(whatsapp));
      const imageMessage = {
        url: `http://127.0.0.1:${media.port}/media/cat.enc`,
        mimetype: 'image/jpeg',
        caption: '@Andy !image what is this?',
        mediaKey: encrypted.mediaKey,
        fileSha256: encrypted.fileSha256,
        fileEncSha256: encrypted.fileEncSha256,
        fileLength: photo.length,
      };
      const inbound = proto.WebMessageInfo.fromObject({
        key: { remoteJid: FAMILY, participant: '4915100000002@s.whatsapp.net', fromMe: false, id: '3EB0PHOTO0001' },
        message: { imageMessage },
        messageTimestamp: Math.floor(Date.now() / 1000),
        pushName: 'Alice',
      }) as WAMessage;
      socketOf(whatsapp).ev.emit('messages.upsert', { messages: [inbound], type: 'notify' });
      await waitFor(() => whatsapp.delivered.length === 1, 60_000, 'reply');
      const hash = new Bun.CryptoHasher('sha256').update(photo).digest('hex').slice(0, 12);
      expect(whatsapp.delivered[0]!.text).toBe(`Andy: [stub] I see image/jpeg, ${photo.length} bytes, sha256 ${hash}`);
    } finally {
      await host.stop();
      store.close();
      server.stop();
      media.stop(true);
    }
  });
});
