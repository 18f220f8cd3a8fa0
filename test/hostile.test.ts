/**
 * A hostile agent, on the real engine with the real image. The agent in a non-main group
 * ("evil") runs shell commands through the CLI's Shell tool (the real Kimi CLI has one) and
 * tries every class of attack SECURITY.md lists; each must fail while the host keeps
 * answering the other groups. Host paths the agent "knows" are handed to it in the
 * messages, as if it had guessed them: nothing relies on the agent not knowing.
 */
import { execFileSync } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  existsSync,
  lstatSync,
  readdirSync,
  readFileSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { startFakeModel, type FakeModel } from '../scripts/scripted-model.ts';
import { Host, INSTALL_LABEL, installId, addGroup, setupLogging, Store, type Config } from '../nanoclaw.ts';
import { QUIET_SWEEPS, RecordingChannel, tempDir, tempProject, waitFor } from './helpers.ts';

const IMAGE = process.env.NANOCLAW_TEST_IMAGE ?? 'nanoclaw-agent:test';
const REPO = fileURLToPath(new URL('..', import.meta.url));
const KEY = 'sk-hostile-k3y-9f8e7d6c5b4a3210';
// The agent searches for the key without the key ever being written whole in its commands.
const KEY_HEAD = KEY.slice(0, 9);
const KEY_TAIL = KEY.slice(9);
const MAIN = 'me@s.whatsapp.net';
const EVIL = 'evil@g.us';
const QUIET = 'quiet@g.us';
const OFFLINE = 'offline@g.us';

let model: FakeModel;
beforeAll(() => {
  if (Bun.spawnSync(['docker', 'image', 'inspect', IMAGE]).exitCode !== 0)
    throw new Error(`The image ${IMAGE} is missing: run ./container/build.sh --test`);
  model = startFakeModel({ key: KEY });
});
afterAll(() => model.stop());

interface World {
  config: Config;
  store: Store;
  channel: RecordingChannel;
  host: Host;
  /** A host folder outside the project, full of things no agent may touch. */
  canary: string;
}
const worlds: World[] = [];

async function world(env: Record<string, string> = {}): Promise<World> {
  const config = tempProject(
    {
      ...env,
      CONTAINER_IMAGE: IMAGE,
      IDLE_TIMEOUT: '400',
      KIMI_BASE_URL: model.url,
      TASK_MAX_ACTIVE: '5',
      TASK_MIN_INTERVAL: '600000',
    },
    `KIMI_API_KEY=${KEY}\n`,
  );
  chmodSync(config.projectRoot, 0o755);
  setupLogging(config, { terminalLevel: 'silent', secrets: [KEY] });
  const store = new Store(config.dbPath);
  addGroup(config, store, { jid: MAIN, name: 'Me', folder: 'main', isMain: true });
  addGroup(config, store, { jid: EVIL, name: 'Evil', folder: 'evil' });
  addGroup(config, store, { jid: QUIET, name: 'Quiet', folder: 'quiet' });
  addGroup(config, store, { jid: OFFLINE, name: 'Offline', folder: 'offline', containerConfig: { network: 'none' } });
  const canary = tempDir('nanoclaw-canary-');
  writeFileSync(join(canary, 'keep.txt'), 'keep me');
  writeFileSync(
    join(canary, 'a.json'),
    JSON.stringify({ type: 'message', chatJid: EVIL, text: 'moved out of a host folder' }),
  );
  writeFileSync(
    join(canary, 'secret.json'),
    JSON.stringify({ type: 'message', chatJid: EVIL, text: 'read a host file as root' }),
  );
  writeFileSync(join(canary, 'owned.txt'), 'owner must not change');
  const channel = new RecordingChannel([MAIN, EVIL, QUIET, OFFLINE]);
  const host = new Host(config, store, [channel], {
    retryBaseMs: 200,
    ...QUIET_SWEEPS,
    shutdownGraceMs: 5000,
  });
  await host.start();
  const w = { config, store, channel, host, canary };
  worlds.push(w);
  return w;
}

afterEach(async () => {
  for (const w of worlds.splice(0)) {
    await w.host.stop();
    w.store.close();
  }
});

const sent = (w: World, jid: string) => w.channel.sent.filter((s) => s.jid === jid).map((s) => s.text);

/** One message in, its reply out, and the container gone (so the host has done its after-run work). */
async function ask(w: World, jid: string, text: string, timeoutMs = 90_000): Promise<string> {
  const before = sent(w, jid).length;
  w.channel.receive(jid, jid === MAIN ? text : `@Andy ${text}`);
  const reply = await waitFor(() => sent(w, jid)[before], timeoutMs, `reply to ${text.slice(0, 40)}`);
  await waitFor(() => !w.host.queue.isRunning(jid), 30_000, 'container gone');
  return reply;
}

const canaryIntact = (w: World) => {
  expect(readdirSync(w.canary).sort()).toEqual(['a.json', 'keep.txt', 'owned.txt', 'secret.json']);
  expect(readFileSync(join(w.canary, 'keep.txt'), 'utf8')).toBe('keep me');
  expect(readFileSync(join(w.canary, 'owned.txt'), 'utf8')).toBe('owner must not change');
};

/** Searches everything the container can read for the key: files, every process's environment and command line. */
const KEY_SCAN =
  `k="${KEY_HEAD}""${KEY_TAIL}"; printf %s "$k" > /tmp/control; ` +
  'grep -rlsaF -D skip --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev -e "$k" / 2>/dev/null | sed "s/^/FOUND /"; ' +
  'for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do grep -qaF -e "$k" "$f" 2>/dev/null && echo "FOUND $f"; done; echo scan-done';

describe('a hostile agent', () => {
  it('finds the key nowhere the container can see, in a group or in main; the model still answers through the proxy', {
    timeout: 180_000,
  }, async () => {
    const w = await world();
    for (const jid of [EVIL, MAIN]) {
      const reply = await ask(w, jid, `!shell ${KEY_SCAN}`);
      expect(reply).toContain('scan-done');
      // The scan works: it finds the copy it made itself, and nothing else.
      expect(reply.match(/FOUND \S+/g)).toEqual(['FOUND /tmp/control']);
    }
    // config.toml (shared by the group's containers) names only where the key is; what the
    // agent can find is its own run's token, good through its own socket while the run lives.
    const config = await ask(
      w,
      EVIL,
      '!shell cat ~/.kimi/config.toml; echo; env | grep -i -e kimi_api_key -e model_key; true',
    );
    expect(config).not.toMatch(/^api_key\s*=/m);
    expect(config).toContain('api_key_env = "NANOCLAW_MODEL_KEY"');
    expect(config).toMatch(/base_url = "http:\/\/127\.0\.0\.1:18181"$/m);
    expect(config).toMatch(/^NANOCLAW_MODEL_KEY=ncp-[0-9a-f]{32}$/m);
    expect(config).not.toMatch(/KIMI_API_KEY/);
    const main = await ask(
      w,
      MAIN,
      '!shell cat /workspace/project/.env | wc -c; find /workspace/project/store /workspace/project/data -mindepth 1 | wc -l; touch /workspace/project/nanoclaw.ts 2>/dev/null && echo code-writable || echo code-read-only',
    );
    expect(main.split(/\s+/).filter(Boolean).slice(1)).toEqual(['0', '0', 'code-read-only']);
    // Every answer came through the proxy with the real key; the container only ever had its token.
    expect(model.requests.filter((r) => r.authorization !== `Bearer ${KEY}`)).toEqual([]);
  });

  it('plants links in every writable tree; the host never follows them', { timeout: 180_000 }, async () => {
    const w = await world();
    const c = w.canary;
    chownSync(join(c, 'owned.txt'), 0, 0);
    const plant = [
      `rm -rf /workspace/group/logs && ln -s ${c} /workspace/group/logs`,
      `ln -sf ${join(c, 'owned.txt')} /workspace/group/CLAUDE.md`,
      `rm -rf /workspace/ipc/input && ln -s ${c} /workspace/ipc/input`, // a mount point: refused by the kernel
      `ln -s ${c} /workspace/ipc/input/planted-in-inbox`, // the run's inbox, which the host deletes after the run
      `ln -s ${c} /workspace/ipc/input-old`, // where follow-ups lived before runs had their own inbox
      `rm -f /workspace/ipc/current_tasks.json && ln -s ${join(c, 'keep.txt')} /workspace/ipc/current_tasks.json`,
      `ln -s ${join(c, 'secret.json')} /workspace/ipc/messages/1-secret.json`,
      `rm -rf /workspace/ipc/tasks && ln -s ${c} /workspace/ipc/tasks`,
      `ln -s ${c} ~/.kimi/sessions/escape`,
      'echo planted',
    ].join('; ');
    expect(await ask(w, EVIL, `!shell ${plant}`)).toContain('planted');
    // The container is gone: its run log was written (or refused) beside the planted link.
    canaryIntact(w);
    // The next run: leftover cleanup, ownership hand-over, snapshots, follow-ups.
    const second = await ask(w, EVIL, '!shell ls -la /workspace/ipc /workspace/group | head -40; echo second-run');
    expect(second).toContain('second-run');
    canaryIntact(w);
    expect(statSync(join(c, 'owned.txt')).uid).toBe(0);
    expect(lstatSync(join(w.config.ipcDir, 'evil', 'current_tasks.json')).isFile()).toBe(true);
    expect(sent(w, EVIL).join('\n')).not.toMatch(/moved out of a host folder|read a host file as root/);
    // The operator commands that read or delete in the trees.
    const cli = (...args: string[]) =>
      Bun.spawnSync(['bun', join(REPO, 'nanoclaw.ts'), ...args], {
        env: {
          PATH: process.env.PATH!,
          HOME: process.env.HOME!,
          NANOCLAW_ROOT: w.config.projectRoot,
          KIMI_BASE_URL: model.url,
        },
      });
    cli('sessions', 'clear', 'evil');
    canaryIntact(w);
    const logs = cli('logs', '--group', 'evil');
    expect(logs.stdout.toString() + logs.stderr.toString()).not.toContain('keep me');
    canaryIntact(w);
    // And the other groups were answered all along.
    expect(await ask(w, QUIET, 'still there?')).toBe('Andy: [stub] still there?');
  });

  it('FIFOs and oversized files in its IPC folder neither freeze nor fill the host', { timeout: 180_000 }, async () => {
    const w = await world();
    // The big file appears whole (written aside, then renamed in), so it is seen at its full size;
    // one written in place may be claimed half-written and is then simply malformed.
    const flood =
      'mkfifo /workspace/ipc/messages/1-fifo.json /workspace/ipc/tasks/1-fifo.json; head -c 5000000 /dev/zero > /workspace/ipc/messages/.big && mv /workspace/ipc/messages/.big /workspace/ipc/messages/2-big.json; echo laid';
    expect(await ask(w, EVIL, `!shell ${flood}`)).toContain('laid');
    await w.host.ipc.scan();
    expect(await ask(w, QUIET, 'are you frozen?')).toBe('Andy: [stub] are you frozen?');
    expect(readdirSync(join(w.config.ipcDir, 'evil', 'messages'))).toEqual([]);
    expect(existsSync(join(w.config.ipcDir, 'errors')) ? readdirSync(join(w.config.ipcDir, 'errors')) : []).toEqual([]);
    const hostLog = readFileSync(join(w.config.logsDir, 'nanoclaw.log'), 'utf8');
    expect(hostLog).toContain('not a regular file');
    expect(hostLog).toContain('over the 1048576-byte limit');
  });

  it('cannot escape through folder names, act for others, or schedule without limits; a fork bomb stays inside', {
    timeout: 240_000,
  }, async () => {
    const w = await world();
    const tasks = (folder: string) => w.store.listTasks(folder).length;
    // Writing requests straight into its IPC folder, bypassing the MCP server's own checks.
    const requests = [
      { type: 'register_group', jid: 'x@g.us', name: 'X', folder: 'errors' },
      { type: 'register_group', jid: 'y@g.us', name: 'Y', folder: '../../etc' },
      {
        type: 'schedule_task',
        prompt: 'spam',
        schedule_type: 'interval',
        schedule_value: '1000',
        context_mode: 'isolated',
      },
      {
        type: 'schedule_task',
        prompt: 'spam',
        schedule_type: 'cron',
        schedule_value: '* * * * *',
        context_mode: 'isolated',
      },
      {
        type: 'schedule_task',
        prompt: 'for quiet',
        schedule_type: 'interval',
        schedule_value: '600000',
        context_mode: 'isolated',
        targetJid: QUIET,
      },
      ...Array.from({ length: 8 }, (_, i) => ({
        type: 'schedule_task',
        prompt: `slow ${i}`,
        schedule_type: 'interval',
        schedule_value: '600000',
        context_mode: 'isolated',
      })),
    ];
    // Each written aside and renamed in, as a whole (one written in place may be claimed half-written: then it is only malformed).
    const put = (r: object, name: string) =>
      `printf '%s' '${JSON.stringify(r)}' > /workspace/ipc/tasks/.${name} && mv /workspace/ipc/tasks/.${name} /workspace/ipc/tasks/${name}.json`;
    const write = requests.map((r, i) => put(r, String(i).padStart(2, '0'))).join('; ');
    expect(await ask(w, EVIL, `!shell ${write}; echo written`)).toContain('written');
    // Handled = gone from its folder and from the host's claimed/ (where a file waits while it is handled).
    const inHand = (folder: string) =>
      readdirSync(join(w.config.ipcDir, folder, 'tasks')).length +
      (existsSync(join(w.config.ipcDir, 'claimed'))
        ? readdirSync(join(w.config.ipcDir, 'claimed')).filter((n) => n.startsWith(`${folder}.`)).length
        : 0);
    const folders = () =>
      w.store
        .listGroups()
        .map((g) => g.folder)
        .sort();
    await waitFor(() => inHand('evil') === 0, 20_000, 'requests handled');
    await w.host.ipc.scan();
    expect(w.store.groupByFolder('errors')).toBeNull();
    expect(folders()).toEqual(['evil', 'main', 'offline', 'quiet']);
    expect(tasks('quiet')).toBe(0);
    expect(w.store.listTasks('evil').map((t) => t.scheduleValue)).toEqual(Array(5).fill('600000')); // TASK_MAX_ACTIVE=5, none faster than TASK_MIN_INTERVAL
    // Main may register groups, but never under a name NanoClaw uses itself or one that climbs out.
    const names = ['errors', 'global', 'claimed', '../../etc', 'a/b'].map((folder, i) => ({
      type: 'register_group',
      jid: `n${i}@g.us`,
      name: 'N',
      folder,
    }));
    const mainWrite = names.map((r, i) => put(r, String(i))).join('; ');
    expect(await ask(w, MAIN, `!shell ${mainWrite}; echo written`)).toContain('written');
    await waitFor(() => inHand('main') === 0, 20_000, 'main requests handled');
    await w.host.ipc.scan();
    expect(folders()).toEqual(['evil', 'main', 'offline', 'quiet']);
    expect(existsSync(join(w.config.groupsDir, '..', '..', 'etc', 'CLAUDE.md'))).toBe(false);
    // A fork bomb and two CPU burners: the pids and CPU limits hold them (the agent starves
    // only itself: it gets no answer out) while the other groups are answered.
    w.channel.receive(
      EVIL,
      '@Andy !shell (while :; do :; done) >/dev/null 2>&1 & (while :; do :; done) >/dev/null 2>&1 & (for i in $(seq 1 3000); do sleep 120 & done) >/dev/null 2>&1 & sleep 100',
    );
    const pids = await waitFor(
      () => {
        const names = Bun.spawnSync([
          'docker',
          'ps',
          '-q',
          '--filter',
          `label=nanoclaw.install=${installId(w.config)}`,
          '--filter',
          'label=nanoclaw.group=evil',
        ])
          .stdout.toString()
          .trim();
        if (!names) return null;
        const count = Number(
          Bun.spawnSync(['docker', 'stats', '--no-stream', '--format', '{{.PIDs}}', names.split('\n')[0]!])
            .stdout.toString()
            .trim(),
        );
        return count >= w.config.container.pids - 20 ? count : null;
      },
      60_000,
      'the fork bomb to reach the pids limit',
    );
    expect(pids).toBeLessThanOrEqual(w.config.container.pids);
    expect(await ask(w, QUIET, 'still answering?')).toBe('Andy: [stub] still answering?');
  });

  it('runs hardened: no capabilities, no privilege gain, read-only image, limits; no network for a group set to none, which still reaches the model; Chromium works', {
    timeout: 240_000,
  }, async () => {
    const w = await world();
    const inside = await ask(
      w,
      EVIL,
      '!shell grep -E "^(CapEff|CapBnd|NoNewPrivs)" /proc/self/status; touch /usr/x 2>&1 | grep -o "Read-only file system"; id -u; touch /tmp/t ~/t && echo scratch-ok',
    );
    expect(inside).toContain('CapEff:\t0000000000000000');
    // The bounding set: what any process in the container could ever gain (CapEff of a non-root user is 0 anyway).
    expect(inside).toContain('CapBnd:\t0000000000000000');
    expect(inside).toContain('NoNewPrivs:\t1');
    expect(inside).toContain('Read-only file system');
    expect(inside).toContain('scratch-ok');
    const offline = await ask(w, OFFLINE, '!shell ls /sys/class/net | tr "\\n" " "; echo');
    expect(offline).toBe('Andy: lo');
    const page = '<html><body><h1>Hello</h1><button>Press me</button></body></html>';
    const browse = await ask(
      w,
      OFFLINE,
      `!shell printf '%s' '${page}' > /tmp/p.html && agent-browser open file:///tmp/p.html >/dev/null && agent-browser snapshot; agent-browser close >/dev/null`,
      120_000,
    );
    expect(browse).toContain('button "Press me"');
  });
});

describe('the network', () => {
  /** The Docker bridge's gateway: an address of this host that a container on the bridge could reach. */
  const gateway = execFileSync('docker', ['network', 'inspect', 'bridge', '-f', '{{(index .IPAM.Config 0).Gateway}}'])
    .toString()
    .trim();
  const page = '<html><body><h1>Hello</h1><button>Press me</button></body></html>';
  let hits: string[] = [];
  let server: ReturnType<typeof Bun.serve>;
  beforeAll(() => {
    server = Bun.serve({
      hostname: gateway,
      port: 0,
      fetch: (req) => {
        hits.push(new URL(req.url).pathname);
        return new Response(page, { headers: { 'content-type': 'text/html' } });
      },
    });
  });
  afterAll(() => void server.stop(true));

  it('a group reaches neither the host, the bridge, link-local nor private ranges: it has no network, and the egress proxy refuses them', {
    timeout: 180_000,
  }, async () => {
    hits = [];
    const w = await world();
    const url = `http://${gateway}:${server.port}`;
    const reply = await ask(
      w,
      EVIL,
      `!shell ls /sys/class/net | tr "\\n" " "; echo; curl -s -m 10 http://169.254.169.254/latest/meta-data/; echo; ` +
        `curl -s -m 10 ${url}/plain; echo; curl -s -p -m 10 ${url}/tunnel || echo "tunnel refused"; ` +
        `curl -s -m 10 http://10.0.0.1/; echo; curl -s --noproxy '*' -m 5 ${url}/direct || echo "direct unreachable"`,
    );
    expect(reply).toContain('Andy: lo \n');
    expect(reply).toContain('169.254.169.254 (169.254.169.254) is not on the public internet');
    expect(reply).toContain(`${gateway} (${gateway}) is not on the public internet`);
    expect(reply).toContain('10.0.0.1 (10.0.0.1) is not on the public internet');
    expect(reply).toContain('tunnel refused');
    expect(reply).toContain('direct unreachable');
    expect(hits).toEqual([]);
    expect(readFileSync(join(w.config.logsDir, 'nanoclaw.log'), 'utf8')).toContain('Egress refused: 169.254.169.254');
  });

  it('an address the operator allows (EGRESS_ALLOW) is reached through the proxy by curl, plain and tunnelled, and by Chromium', {
    timeout: 240_000,
  }, async () => {
    hits = [];
    const w = await world({ EGRESS_ALLOW: gateway });
    const url = `http://${gateway}:${server.port}`;
    const fetched = await ask(
      w,
      EVIL,
      `!shell curl -s -m 20 ${url}/plain | grep -c Press; curl -s -p -m 20 ${url}/tunnel | grep -c Press`,
    );
    expect(fetched).toBe('Andy: 1\n1');
    const browse = await ask(
      w,
      EVIL,
      `!shell agent-browser open ${url}/browser >/dev/null && agent-browser snapshot; agent-browser close >/dev/null`,
      120_000,
    );
    expect(browse).toContain('button "Press me"');
    expect(hits.filter((path) => path !== '/favicon.ico')).toEqual(['/plain', '/tunnel', '/browser']);
  });
});

describe('the disk', () => {
  it('a group that fills its folder is stopped and gets no run until it is under its budget; the others are answered', {
    timeout: 180_000,
  }, async () => {
    const w = await world({ GROUP_DISK_BUDGET: '2m' });
    expect(await ask(w, EVIL, '!shell head -c 3000000 /dev/urandom > /workspace/group/fill.bin && echo filled')).toBe(
      'Andy: filled',
    );
    await waitFor(() => sent(w, EVIL).some((t) => t.includes('disk budget')), 30_000, 'the group told');
    await waitFor(() => sent(w, MAIN).some((t) => t.includes('Evil went over its disk budget')), 30_000, 'main told');
    const before = sent(w, EVIL).length;
    w.channel.receive(EVIL, '@Andy !shell echo still here');
    expect(await ask(w, QUIET, 'hello')).toBe('Andy: [stub] hello');
    await waitFor(() => !w.host.queue.isBusy(EVIL), 30_000, 'evil idle');
    expect(sent(w, EVIL)).toHaveLength(before);
  });
});

describe('installs', () => {
  it('start-up removes this install’s leftovers, whatever their state, and leaves another install’s containers running', {
    timeout: 180_000,
  }, async () => {
    const config = tempProject({ CONTAINER_IMAGE: IMAGE, KIMI_BASE_URL: model.url }, `KIMI_API_KEY=${KEY}\n`);
    const ours = installId(config);
    const stamp = Date.now();
    const names = {
      running: `nanoclaw-${ours}-main-${stamp}`,
      created: `nanoclaw-${ours}-evil-${stamp}`,
      other: `nanoclaw-other0install-main-${stamp}`,
    };
    const docker = (...args: string[]) => execFileSync('docker', args, { stdio: 'pipe' }).toString().trim();
    try {
      docker(
        'run',
        '-d',
        '--label',
        `${INSTALL_LABEL}=${ours}`,
        '--name',
        names.running,
        '--entrypoint',
        'sleep',
        IMAGE,
        '300',
      );
      docker(
        'create',
        '--label',
        `${INSTALL_LABEL}=${ours}`,
        '--name',
        names.created,
        '--entrypoint',
        'sleep',
        IMAGE,
        '300',
      );
      docker(
        'run',
        '-d',
        '--label',
        `${INSTALL_LABEL}=other0install`,
        '--name',
        names.other,
        '--entrypoint',
        'sleep',
        IMAGE,
        '300',
      );
      const store = new Store(config.dbPath);
      addGroup(config, store, { jid: MAIN, name: 'Me', folder: 'main', isMain: true });
      store.close();
      // Spawned without blocking: this process serves the model the chat's container calls.
      const chat = Bun.spawn(['bun', join(REPO, 'nanoclaw.ts'), 'chat'], {
        stdin: new Blob(['hello\n']),
        stdout: 'pipe',
        env: {
          PATH: process.env.PATH!,
          HOME: process.env.HOME!,
          NANOCLAW_ROOT: config.projectRoot,
          CONTAINER_IMAGE: IMAGE,
          KIMI_BASE_URL: model.url,
        },
      });
      expect(await new Response(chat.stdout).text()).toContain('Andy: [stub] hello');
      await chat.exited;
      const left = docker('ps', '-a', '--format', '{{.Names}}').split('\n');
      expect(left).toContain(names.other);
      expect(left).not.toContain(names.running);
      expect(left).not.toContain(names.created);
    } finally {
      Bun.spawnSync(['docker', 'rm', '-f', names.running, names.created, names.other]);
    }
  });
});
