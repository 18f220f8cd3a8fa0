/**
 * container/build.sh with the fake docker (test/helpers.ts). The fake has no `build`, so
 * each test puts a small `docker` of its own in front of it: `build` is recorded (its
 * arguments, its working directory, and the CA file present in the build context at that
 * moment), every other command goes on to the fake. build.sh runs from a copy of
 * container/, so nothing here touches the repository's own build context.
 */
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { fakeDocker, tempDir, type FakeDocker } from './helpers.ts';

const CONTAINER = fileURLToPath(new URL('../container/', import.meta.url));

interface Build {
  /** The copy of container/ that build.sh runs in. */
  context: string;
  docker: FakeDocker;
  /** The `docker` build.sh is given. */
  runtime: string;
  /** What the next `docker build` prints and exits with. */
  buildFails(output: string, code?: number): void;
  /** The recorded `docker build`, if there was one. */
  recorded(): { argv: string[]; cwd: string; ca: string | null } | null;
}

function buildSetup(): Build {
  const docker = fakeDocker();
  const context = join(tempDir('nanoclaw-build-'), 'container');
  mkdirSync(context);
  for (const file of ['build.sh', 'Dockerfile', '.dockerignore'])
    copyFileSync(join(CONTAINER, file), join(context, file));
  const state = tempDir('nanoclaw-build-state-');
  const runtime = join(state, 'docker');
  writeFileSync(
    runtime,
    [
      '#!/bin/sh',
      `state='${state}'`,
      'if [ "$1" = build ]; then',
      '  printf "%s\\n" "$@" > "$state/build-argv"',
      '  pwd > "$state/build-cwd"',
      '  if [ -f .build-ca.crt ]; then cp .build-ca.crt "$state/build-ca"; fi',
      '  if [ -f "$state/build-output" ]; then cat "$state/build-output"; fi',
      '  exit "$(cat "$state/build-exit" 2>/dev/null || echo 0)"',
      'fi',
      `exec '${docker.path}' "$@"`,
      '',
    ].join('\n'),
  );
  chmodSync(runtime, 0o755);
  return {
    context,
    docker,
    runtime,
    buildFails(output, code = 1) {
      writeFileSync(join(state, 'build-output'), output);
      writeFileSync(join(state, 'build-exit'), String(code));
    },
    recorded() {
      if (!existsSync(join(state, 'build-argv'))) return null;
      const ca = join(state, 'build-ca');
      return {
        argv: readFileSync(join(state, 'build-argv'), 'utf8').trimEnd().split('\n'),
        cwd: readFileSync(join(state, 'build-cwd'), 'utf8').trim(),
        ca: existsSync(ca) ? readFileSync(ca, 'utf8') : null,
      };
    },
  };
}

/** Runs build.sh as a user would, from another directory, with only the environment given (no CA variables of this machine). */
async function build(b: Build, args: string[] = [], env: Record<string, string> = {}) {
  const proc = Bun.spawn(['bash', join(b.context, 'build.sh'), ...args], {
    cwd: tempDir(),
    env: { PATH: process.env.PATH!, HOME: process.env.HOME!, CONTAINER_RUNTIME: b.runtime, ...env },
    stdout: 'pipe',
    stderr: 'pipe',
  });
  const [out, err, code] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  return { out, err, code };
}

function caFile(name: string): string {
  const path = join(tempDir('nanoclaw-ca-'), `${name}.pem`);
  writeFileSync(path, `-----BEGIN CERTIFICATE-----\n${name}\n-----END CERTIFICATE-----\n`);
  return path;
}

/** The value after `flag` in an argv. */
const valueAfter = (argv: string[], flag: string) => argv[argv.indexOf(flag) + 1];

describe('container/build.sh: the CA behind a proxy', () => {
  for (const variable of ['NODE_EXTRA_CA_CERTS', 'SSL_CERT_FILE', 'BUILD_CA_CERT']) {
    it(`${variable} is in the build context as .build-ca.crt while docker builds, and gone afterwards`, async () => {
      const b = buildSetup();
      const ca = caFile(variable);
      const { out, code } = await build(b, [], { [variable]: ca });
      expect(code).toBe(0);
      const call = b.recorded()!;
      expect(call.cwd).toBe(b.context);
      expect(call.ca).toBe(readFileSync(ca, 'utf8'));
      expect(out).toContain(`CA for the build: ${ca} (from ${variable})`);
      expect(existsSync(join(b.context, '.build-ca.crt'))).toBe(false);
    });
  }

  it('takes the first that is set, in the order npm test uses: BUILD_CA_CERT, NODE_EXTRA_CA_CERTS, SSL_CERT_FILE', async () => {
    const [explicit, node, ssl] = [caFile('explicit'), caFile('node'), caFile('ssl')];
    const all = buildSetup();
    await build(all, [], { BUILD_CA_CERT: explicit, NODE_EXTRA_CA_CERTS: node, SSL_CERT_FILE: ssl });
    expect(all.recorded()!.ca).toContain('explicit');
    const two = buildSetup();
    await build(two, [], { NODE_EXTRA_CA_CERTS: node, SSL_CERT_FILE: ssl });
    expect(two.recorded()!.ca).toContain('node');
  });

  it('a variable that names no file is passed over, with a note; BUILD_CA_CERT naming no file stops the build', async () => {
    const b = buildSetup();
    const ssl = caFile('ssl');
    const passed = await build(b, [], { NODE_EXTRA_CA_CERTS: '/nowhere/ca.pem', SSL_CERT_FILE: ssl });
    expect(passed.code).toBe(0);
    expect(passed.out).toContain('NODE_EXTRA_CA_CERTS=/nowhere/ca.pem is not a file');
    expect(b.recorded()!.ca).toContain('ssl');
    const stopped = buildSetup();
    const refused = await build(stopped, [], { BUILD_CA_CERT: '/nowhere/ca.pem', SSL_CERT_FILE: ssl });
    expect(refused.code).toBe(1);
    expect(refused.err).toContain('BUILD_CA_CERT=/nowhere/ca.pem is not a file');
    expect(stopped.recorded()).toBeNull();
  });

  it('with none set there is no extra CA (none is needed without a proxy), and a stale one is not reused', async () => {
    const b = buildSetup();
    writeFileSync(join(b.context, '.build-ca.crt'), 'left over from an interrupted build');
    const { out, code } = await build(b);
    expect(code).toBe(0);
    expect(b.recorded()!.ca).toBeNull();
    expect(out).toContain('No extra CA for the build');
    expect(existsSync(join(b.context, '.build-ca.crt'))).toBe(false);
  });
});

describe('container/build.sh: options', () => {
  it('builds nanoclaw-agent:latest by default and nanoclaw-agent:test for --test, from the same Dockerfile with the same arguments', async () => {
    const latest = buildSetup();
    expect((await build(latest)).code).toBe(0);
    expect(valueAfter(latest.recorded()!.argv, '-t')).toBe('nanoclaw-agent:latest');
    expect(latest.recorded()!.argv.at(-1)).toBe('.');
    const test = buildSetup();
    expect((await build(test, ['--test', '--no-cache'])).code).toBe(0);
    expect(valueAfter(test.recorded()!.argv, '-t')).toBe('nanoclaw-agent:test');
    expect(test.recorded()!.argv).toContain('--no-cache');
    // Nothing but the tag (and the cache flag) tells the two builds apart: the tests run what users run.
    const rest = (argv: string[]) =>
      argv.filter((arg, i) => arg !== '--no-cache' && arg !== '-t' && argv[i - 1] !== '-t');
    expect(rest(test.recorded()!.argv)).toEqual(rest(latest.recorded()!.argv));
    expect(latest.recorded()!.argv).not.toContain('--build-arg');
  });

  const tags: [string[], string][] = [
    [['--tag', 'my-agent:dev'], 'my-agent:dev'],
    [['-t', 'registry.example.com:5000/team/nanoclaw-agent:1.2'], 'registry.example.com:5000/team/nanoclaw-agent:1.2'],
    [['--tag=nanoclaw-agent'], 'nanoclaw-agent'],
    [['--tag', 'my-agent:stub', '--test'], 'my-agent:stub'],
  ];
  for (const [args, tag] of tags) {
    it(`${args.join(' ')} reaches docker build -t ${tag}`, async () => {
      const b = buildSetup();
      const { out, code } = await build(b, args);
      expect(code).toBe(0);
      expect(valueAfter(b.recorded()!.argv, '-t')).toBe(tag);
      expect(out).toContain(`==> Built ${tag} in`);
      expect(out).toContain(`CONTAINER_IMAGE=${tag}`);
    });
  }

  const hint = ' (lower-case name[:tag], e.g. nanoclaw-agent:dev)';
  const refused: [string, string[], string][] = [
    ['a tag with capitals', ['--tag', 'My-Agent:dev'], `'My-Agent:dev' is not a valid image name${hint}`],
    ['a tag with a space', ['-t', 'my agent'], `'my agent' is not a valid image name${hint}`],
    ['a tag with two colons', ['--tag', 'a:b:c'], `'a:b:c' is not a valid image name${hint}`],
    ['an empty tag', ['--tag='], `'' is not a valid image name${hint}`],
    ['--tag without a name', ['--tag'], '--tag needs an image name, e.g. --tag nanoclaw-agent:dev'],
    ['an unknown option', ['--no-cahce'], "unknown option '--no-cahce'"],
  ];
  for (const [name, args, message] of refused) {
    it(`refuses ${name}: one line and the usage, exit 2, nothing built`, async () => {
      const b = buildSetup();
      const { out, err, code } = await build(b, args);
      expect(code).toBe(2);
      expect(out).toBe('');
      expect(err.split('\n')[0]).toBe(`build.sh: ${message}`);
      expect(err).toContain('Usage: ./container/build.sh');
      expect(b.docker.calls()).toEqual([]);
      expect(b.recorded()).toBeNull();
    });
  }

  it('--help prints the usage and exits 0 without asking docker anything', async () => {
    for (const flag of ['--help', '-h']) {
      const b = buildSetup();
      const { out, code } = await build(b, [flag]);
      expect(code).toBe(0);
      expect(out).toContain('Usage: ./container/build.sh [--test] [--no-cache] [--tag NAME[:TAG]]');
      expect(out).toContain('BUILD_CA_CERT, else NODE_EXTRA_CA_CERTS, else SSL_CERT_FILE');
      expect(b.docker.calls()).toEqual([]);
    }
  });

  it('a stopped engine is said before any build', async () => {
    const b = buildSetup();
    b.docker.set('engine-down');
    const { err, code } = await build(b);
    expect(code).toBe(1);
    expect(err).toContain('engine is not running');
    expect(b.recorded()).toBeNull();
  });
});

describe('container/build.sh: no network for the CLI', () => {
  const failures: [string, string][] = [
    [
      'the Kimi Code CLI could not be installed',
      '#11 4.1 no network to install the Kimi CLI: https://registry.npmjs.org is unreachable (behind a proxy? see docs/troubleshooting.md)\n',
    ],
    [
      'Bun could not be downloaded',
      '#7 0.9 no network to install Bun: https://registry.npmjs.org is unreachable (behind a proxy? see docs/troubleshooting.md)\n',
    ],
  ];
  for (const [name, output] of failures) {
    it(`${name}: the build ends with "no network to install the Kimi CLI", and the CA is cleaned up`, async () => {
      const b = buildSetup();
      b.buildFails(output);
      const { out, err, code } = await build(b, [], { NODE_EXTRA_CA_CERTS: caFile('proxy') });
      expect(code).toBe(1);
      expect(out).toContain(output.trim().split('\n')[0]); // the build's own output is still shown
      expect(err).toContain('==> Build of nanoclaw-agent:latest failed: no network to install the Kimi CLI');
      expect(err).toContain('BUILD_CA_CERT');
      expect(b.recorded()!.ca).toContain('proxy');
      expect(existsSync(join(b.context, '.build-ca.crt'))).toBe(false);
    });
  }

  it('a step that merely contains the message (the build echoes its commands) is not blamed on the network', async () => {
    const b = buildSetup();
    b.buildFails(
      '#11 [6/9] RUN if ! bun add x; then echo "no network to install the Kimi CLI: …"; fi\n#11 ERROR: exit code: 3\n',
      3,
    );
    const { err, code } = await build(b);
    expect(code).toBe(3);
    expect(err).not.toContain('no network');
  });

  it('any other failure is not blamed on the network, and keeps its exit status', async () => {
    const b = buildSetup();
    b.buildFails('#9 ERROR: failed to solve: failed to compute cache key: "/agent-runner/bun.lock" not found\n', 17);
    const { err, code } = await build(b);
    expect(code).toBe(17);
    expect(err).not.toContain('no network');
    expect(err).toContain('==> Build of nanoclaw-agent:latest failed (exit 17)');
  });
});
