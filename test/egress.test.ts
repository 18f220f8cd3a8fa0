/**
 * The egress proxy on its own: which addresses count as the public internet, how a proxy
 * request is read, and, over a real unix socket with real loopback servers, that a refused
 * destination is never connected to and an allowed one is reached (CONNECT tunnels and
 * plain http requests). The container side is in hostile.test.ts.
 */
import { connect, createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { egressAddress, isPublicAddress, openEgressProxy, originRequestHead, proxyTarget } from '../nanoclaw.ts';
import { tempDir } from './helpers.ts';

describe('isPublicAddress', () => {
  it.each([
    '127.0.0.1',
    '10.1.2.3',
    '172.17.0.1',
    '172.31.255.255',
    '192.168.1.1',
    '169.254.169.254',
    '100.64.0.1',
    '0.0.0.0',
    '224.0.0.1',
    '255.255.255.255',
    '192.0.2.2',
    '::1',
    '::',
    'fe80::1',
    'fd00::2',
    'fc00::1',
    'ff02::1',
    '::ffff:127.0.0.1',
    '::ffff:10.0.0.1',
    '64:ff9b::a00:1',
    'not-an-address',
  ])('%s is not public', (ip) => expect(isPublicAddress(ip)).toBe(false));

  it.each(['1.1.1.1', '8.8.8.8', '172.32.0.1', '100.128.0.1', '2606:4700:4700::1111', '2a00:1450::1'])(
    '%s is public',
    (ip) => expect(isPublicAddress(ip)).toBe(true),
  );
});

describe('proxyTarget and originRequestHead', () => {
  it('reads CONNECT and absolute-form requests, and refuses the rest with a reason', () => {
    expect(proxyTarget('CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n')).toEqual({
      host: 'example.com',
      port: 443,
      tunnel: true,
    });
    expect(proxyTarget('CONNECT [2606:4700::1]:443 HTTP/1.1\r\n\r\n')).toEqual({
      host: '2606:4700::1',
      port: 443,
      tunnel: true,
    });
    expect(proxyTarget('GET http://Example.com/a?b=1 HTTP/1.1\r\n\r\n')).toEqual({
      host: 'example.com',
      port: 80,
      tunnel: false,
    });
    expect(proxyTarget('GET /relative HTTP/1.1\r\n\r\n')).toMatch(/absolute URL/);
    expect(proxyTarget('CONNECT example.com HTTP/1.1\r\n\r\n')).toMatch(/host:port/);
    expect(proxyTarget('CONNECT example.com:99999 HTTP/1.1\r\n\r\n')).toMatch(/host:port/);
    expect(proxyTarget('GET ftp://example.com/ HTTP/1.1\r\n\r\n')).toMatch(/only http/);
  });

  it('turns a proxied request into what the origin expects: path only, no proxy headers, one request', () => {
    const head = originRequestHead(
      'GET http://example.com:8080/p?q=1 HTTP/1.1\r\nHost: example.com:8080\r\nProxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n',
    );
    expect(head).toBe('GET /p?q=1 HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n');
  });
});

describe('egressAddress', () => {
  const resolvesTo = (addresses: string[]) => async () => addresses;
  it('connects to a public address of the name, never a private one it also has', async () => {
    expect(await egressAddress('x.example', [], resolvesTo(['10.0.0.1', '93.184.216.34']))).toEqual({
      address: '93.184.216.34',
    });
  });
  it('refuses a name that resolves only to local or private addresses, and says why', async () => {
    const decision = await egressAddress('metadata.internal', [], resolvesTo(['169.254.169.254']));
    expect(decision).toEqual({ refused: expect.stringMatching(/169\.254\.169\.254.*not on the public internet/) });
  });
  it('lets through what EGRESS_ALLOW names, by host or by address', async () => {
    expect(await egressAddress('nas.lan', ['nas.lan'], resolvesTo(['192.168.1.5']))).toEqual({
      address: '192.168.1.5',
    });
    expect(await egressAddress('nas.lan', ['192.168.1.5'], resolvesTo(['192.168.1.5']))).toEqual({
      address: '192.168.1.5',
    });
  });
  it('refuses a name that does not resolve', async () => {
    const failing = async () => {
      throw Object.assign(new Error('nope'), { code: 'ENOTFOUND' });
    };
    expect(await egressAddress('nowhere.invalid', [], failing)).toEqual({
      refused: expect.stringMatching(/ENOTFOUND/),
    });
  });
});

describe('the egress proxy on a unix socket', () => {
  const closers: (() => void)[] = [];
  afterEach(() => {
    for (const close of closers.splice(0)) close();
  });

  /** A loopback TCP server that answers every connection with a fixed HTTP response and records what it got. */
  async function origin(): Promise<{ port: number; received: string[]; connections: () => number }> {
    const received: string[] = [];
    let connections = 0;
    const server: Server = createServer((socket) => {
      connections++;
      let text = '';
      socket.on('data', (chunk) => {
        text += chunk.toString('latin1');
        if (text.includes('\r\n\r\n')) {
          received.push(text);
          socket.end('HTTP/1.1 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello there');
        }
      });
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    closers.push(() => server.close());
    const address = server.address();
    if (!address || typeof address === 'string') throw new Error('no port');
    return { port: address.port, received, connections: () => connections };
  }

  function proxy(allow: string[]): { path: string; refusals: string[] } {
    const refusals: string[] = [];
    const run = openEgressProxy(join(tempDir('nanoclaw-egress-'), 'e.sock'), allow, (reason) => refusals.push(reason));
    closers.push(run.close);
    return { path: run.socketPath, refusals };
  }

  /** Writes `request` to the proxy and collects everything it answers until it closes. */
  function exchange(socketPath: string, request: string): Promise<string> {
    return new Promise((resolve, reject) => {
      const socket = connect(socketPath);
      let answer = '';
      socket.on('data', (chunk) => {
        answer += chunk.toString('latin1');
      });
      socket.on('error', reject);
      socket.on('close', () => resolve(answer));
      socket.write(request);
    });
  }

  it('refuses loopback, link-local and private destinations without connecting to them', async () => {
    const server = await origin();
    const { path, refusals } = proxy([]);
    const tunnel = await exchange(path, `CONNECT 127.0.0.1:${server.port} HTTP/1.1\r\n\r\n`);
    expect(tunnel).toMatch(/^HTTP\/1\.1 403 /);
    expect(tunnel).toContain('127.0.0.1');
    const named = await exchange(path, `GET http://localhost:${server.port}/ HTTP/1.1\r\nHost: x\r\n\r\n`);
    expect(named).toMatch(/^HTTP\/1\.1 403 /);
    const metadata = await exchange(path, 'GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\n\r\n');
    expect(metadata).toMatch(/^HTTP\/1\.1 403 [\s\S]*not on the public internet/);
    expect(await exchange(path, 'GET /relative HTTP/1.1\r\n\r\n')).toMatch(/^HTTP\/1\.1 400 /);
    expect(server.connections()).toBe(0);
    expect(refusals).toHaveLength(4);
  });

  it('follows an allowed destination: a CONNECT tunnel, and a plain request rewritten for the origin', async () => {
    const server = await origin();
    const { path } = proxy(['127.0.0.1']);
    const tunnel = await exchange(
      path,
      `CONNECT 127.0.0.1:${server.port} HTTP/1.1\r\n\r\nGET /through HTTP/1.1\r\nHost: a\r\n\r\n`,
    );
    expect(tunnel).toMatch(/^HTTP\/1\.1 200 Connection established\r\n\r\nHTTP\/1\.1 200 OK[\s\S]*hello there$/);
    const plain = await exchange(
      path,
      `GET http://127.0.0.1:${server.port}/plain?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nProxy-Authorization: Basic eA==\r\n\r\n`,
    );
    expect(plain).toMatch(/^HTTP\/1\.1 200 OK[\s\S]*hello there$/);
    expect(server.received).toEqual([
      'GET /through HTTP/1.1\r\nHost: a\r\n\r\n',
      'GET /plain?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n',
    ]);
  });

  it('refuses a head that never ends rather than holding it', async () => {
    const { path } = proxy([]);
    expect(await exchange(path, `GET http://a/ HTTP/1.1\r\nX: ${'y'.repeat(20_000)}`)).toMatch(/^HTTP\/1\.1 400 /);
  });
});
