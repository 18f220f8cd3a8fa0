/**
 * The model proxy on its own: real unix sockets and loopback ports, a stand-in upstream on
 * loopback that records what reached it. What the container sends is all it controls.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  MAX_MODEL_REQUEST_BYTES,
  MAX_MODEL_REQUESTS_PER_RUN,
  ModelProxy,
  modelRoute,
  type ModelProxyOptions,
} from '../nanoclaw.ts';
import { tempDir, waitFor } from './helpers.ts';

const KEY = 'sk-proxy-test-0123456789abcdef';

function upstream(
  answer: (req: Request) => Response | Promise<Response> = () =>
    Response.json({ ok: true, usage: { prompt_tokens: 3, completion_tokens: 4 } }),
) {
  const seen: { path: string; headers: Record<string, string>; body: string }[] = [];
  const server = Bun.serve({
    hostname: '127.0.0.1',
    port: 0,
    async fetch(req) {
      seen.push({
        path: new URL(req.url).pathname + new URL(req.url).search,
        headers: Object.fromEntries(req.headers),
        body: await req.clone().text(),
      });
      return answer(req);
    },
  });
  return { url: `http://127.0.0.1:${server.port}/v1`, seen, stop: () => server.stop(true) };
}

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0)) cleanup();
});

function proxy(upstreamUrl: string, extra: Partial<ModelProxyOptions> = {}) {
  const records: { folder: string; ok: boolean; status: number; usage: unknown }[] = [];
  const p = new ModelProxy({
    mode: 'unix',
    dir: join(tempDir(), 'proxy'),
    upstream: upstreamUrl,
    apiKey: () => KEY,
    record: (folder, entry) => records.push({ folder, ...entry }),
    ...extra,
  });
  cleanups.push(() => p.stop());
  return { p, records };
}

const call = (
  socket: string | undefined,
  token: string,
  body = '{"model":"k25"}',
  path = '/chat/completions',
  headers: Record<string, string> = {},
) =>
  fetch(`http://proxy${path}`, {
    unix: socket,
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json', ...headers },
    body,
  } as RequestInit);

describe('ModelProxy', () => {
  it('forwards a live run’s request with the real key in place of its token, and nothing else of the hop', async () => {
    const up = upstream();
    cleanups.push(up.stop);
    const { p, records } = proxy(up.url);
    const run = p.open('family', 'run-1');
    const response = await call(run.socketPath, run.token, '{"model":"k25"}', '/chat/completions?x=1', {
      'x-api-key': 'ignored',
      'accept-encoding': 'br',
      'user-agent': 'KimiCLI/1.49.0',
    });
    expect(response.status).toBe(200);
    expect(await response.json()).toEqual({ ok: true, usage: { prompt_tokens: 3, completion_tokens: 4 } });
    expect(up.seen).toHaveLength(1);
    expect(up.seen[0]!.path).toBe('/v1/chat/completions?x=1');
    expect(up.seen[0]!.headers.authorization).toBe(`Bearer ${KEY}`);
    expect(up.seen[0]!.headers['x-api-key']).toBeUndefined();
    expect(up.seen[0]!.headers['user-agent']).toBe('KimiCLI/1.49.0');
    expect(up.seen[0]!.body).toBe('{"model":"k25"}');
    expect(JSON.stringify(up.seen)).not.toContain(run.token);
    expect(records).toEqual([
      { folder: 'family', ok: true, status: 200, usage: { promptTokens: 3, completionTokens: 4 } },
    ]);
    run.close();
    expect(existsSync(run.socketPath!)).toBe(false);
  });

  it('accepts only the token of the run whose socket it is, and no token once the run is over', async () => {
    const up = upstream();
    cleanups.push(up.stop);
    const { p, records } = proxy(up.url);
    const a = p.open('family', 'run-a');
    const b = p.open('work', 'run-b');
    for (const [socket, token] of [
      [a.socketPath, b.token],
      [a.socketPath, 'ncp-guess'],
      [a.socketPath, ''],
    ] as const) {
      const refused = await call(socket, token);
      expect(refused.status).toBe(401);
      expect(((await refused.json()) as { error: { message: string } }).error.message).toContain(
        'does not belong to a running container',
      );
    }
    a.close();
    const ok = await call(b.socketPath, b.token);
    expect(ok.status).toBe(200);
    b.close();
    expect(up.seen).toHaveLength(1);
    expect(records.map((r) => r.folder)).toEqual(['work']);
  });

  it('without a key on the host: a clear 401 naming the fix, and nothing sent upstream', async () => {
    const up = upstream();
    cleanups.push(up.stop);
    const { p, records } = proxy(up.url, { apiKey: () => undefined });
    const run = p.open('main', 'run-1');
    const response = await call(run.socketPath, run.token);
    expect(response.status).toBe(401);
    expect(((await response.json()) as { error: { message: string } }).error.message).toBe(
      'NanoClaw has no KIMI_API_KEY: put it in the .env file of the NanoClaw project.',
    );
    expect(up.seen).toEqual([]);
    expect(records).toEqual([{ folder: 'main', ok: false, status: 401, usage: null }]);
    run.close();
  });

  it('a server that needs no key (a local model, KIMI_PROVIDER other than kimi): passed on without one', async () => {
    const up = upstream();
    cleanups.push(up.stop);
    const { p } = proxy(up.url, { apiKey: () => undefined, keyRequired: false });
    const run = p.open('main', 'run-1');
    const response = await call(run.socketPath, run.token);
    expect(response.status).toBe(200);
    expect(up.seen).toHaveLength(1);
    expect(up.seen[0]!.headers.authorization).toBeUndefined();
    run.close();
  });

  it('an unreachable upstream is a 502 that names the host, never the key; a huge request is refused', async () => {
    const { p } = proxy('http://127.0.0.1:9/v1');
    const run = p.open('main', 'run-1');
    const response = await call(run.socketPath, run.token);
    expect(response.status).toBe(502);
    const text = await response.text();
    expect(text).toContain('could not reach http://127.0.0.1:9');
    expect(text).not.toContain(KEY);
    const huge = await call(run.socketPath, run.token, 'x'.repeat(33 * 1024 * 1024));
    expect(huge.status).toBe(413);
    run.close();
  });

  it('streams server-sent events as they come, and counts the usage of the last chunk', async () => {
    const encoder = new TextEncoder();
    // The upstream sends the rest only once the client has the first chunk: a proxy that
    // buffered the answer would never deliver it, and this test would time out.
    let clientHasFirst: () => void = () => {};
    const firstDelivered = new Promise<void>((resolve) => (clientHasFirst = resolve));
    const up = upstream(
      () =>
        new Response(
          new ReadableStream({
            async start(controller) {
              controller.enqueue(encoder.encode('data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'));
              await firstDelivered;
              controller.enqueue(
                encoder.encode(
                  'data: {"choices":[{"delta":{"content":"lo"}}]}\n\ndata: {"choices":[{"delta":{},"usage":{"prompt_tokens":12,"completion_tokens":2}}]}\n\ndata: [DONE]\n\n',
                ),
              );
              controller.close();
            },
          }),
          { headers: { 'content-type': 'text/event-stream' } },
        ),
    );
    cleanups.push(up.stop);
    const { p, records } = proxy(up.url);
    const run = p.open('family', 'run-1');
    const response = await call(run.socketPath, run.token, '{"stream":true}');
    const reader = response.body!.getReader();
    const first = new TextDecoder().decode((await reader.read()).value);
    expect(first).toContain('"Hel"');
    expect(first).not.toContain('[DONE]');
    clientHasFirst();
    let rest = '';
    for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read())
      rest += new TextDecoder().decode(chunk.value);
    expect(rest).toContain('[DONE]');
    await Bun.sleep(20);
    expect(records).toEqual([
      { folder: 'family', ok: true, status: 200, usage: { promptTokens: 12, completionTokens: 2 } },
    ]);
    run.close();
  });

  it('passes on only chat, the model list and file upload, its path normalised first; anything else never reaches the upstream', async () => {
    const up = upstream();
    cleanups.push(up.stop);
    const { p } = proxy(up.url);
    const run = p.open('family', 'run-1');
    const ask = (method: string, path: string) =>
      fetch(`http://proxy${path}`, {
        unix: run.socketPath,
        method,
        headers: { authorization: `Bearer ${run.token}` },
        body: method === 'GET' ? undefined : '{}',
      } as RequestInit);
    for (const [method, path] of [
      ['DELETE', '/files/file-123'],
      ['GET', '/files'],
      ['GET', '/chat/completions'],
      ['POST', '/models'],
      ['POST', '/%2e%2e/admin/keys'],
      ['POST', '/chat/completions/%2e%2e/%2e%2e/users'],
      ['POST', '/chat%252fcompletions'],
      ['POST', '/chat/completions%00'],
      ['PUT', '/chat/completions'],
    ]) {
      const response = await ask(method!, path!);
      expect([method, path, response.status]).toEqual([method, path, 403]);
      expect(await response.text()).toContain('not a model request');
    }
    expect(up.seen).toEqual([]);
    for (const [method, path] of [
      ['POST', '/chat/completions'],
      ['POST', '//chat/completions/'],
      ['GET', '/models'],
      ['POST', '/files'],
    ])
      expect((await ask(method!, path!)).status).toBe(200);
    expect(up.seen.map((seen) => seen.path)).toEqual([
      '/v1/chat/completions',
      '/v1/chat/completions',
      '/v1/models',
      '/v1/files',
    ]);
    expect(modelRoute('post', '/./chat/completions')).toBeNull();
    expect(modelRoute('POST', '/chat/%E0%A4%A')).toBeNull(); // not decodable
    run.close();
  });

  it('streams a request body on as it comes, and refuses one past the limit while reading it', async () => {
    // The client sends its second piece only once the upstream has its first: a proxy that
    // read the whole body before passing it on would never get there, and this would time out.
    let upstreamHasFirst: () => void = () => {};
    const firstArrived = new Promise<void>((resolve) => (upstreamHasFirst = resolve));
    // Its own upstream: the shared one reads each body whole before answering.
    const server = Bun.serve({
      hostname: '127.0.0.1',
      port: 0,
      fetch: (req) => count(req),
    });
    cleanups.push(() => server.stop(true));
    const count = async (req: Request) => {
      const reader = req.body!.getReader();
      let bytes = 0;
      try {
        for (let next = await reader.read(); !next.done; next = await reader.read()) {
          bytes += next.value.byteLength;
          upstreamHasFirst();
        }
      } catch {
        return new Response('cut', { status: 400 });
      }
      received.push(bytes);
      return Response.json({ bytes });
    };
    const received: number[] = [];
    const { p } = proxy(`http://127.0.0.1:${server.port}/v1`);
    const run = p.open('family', 'run-1');
    const piece = new Uint8Array(1024 * 1024).fill(120);
    const send = (pieces: number) => {
      let sent = 0;
      const body = new ReadableStream<Uint8Array>({
        async pull(controller) {
          if (sent === 1) await firstArrived;
          if (sent++ < pieces) controller.enqueue(piece);
          else controller.close();
        },
      });
      return fetch('http://proxy/chat/completions', {
        unix: run.socketPath,
        method: 'POST',
        headers: { authorization: `Bearer ${run.token}` },
        body,
        duplex: 'half',
      } as RequestInit);
    };
    const small = await send(3);
    expect(await small.json()).toEqual({ bytes: 3 * piece.byteLength });
    const huge = await send(MAX_MODEL_REQUEST_BYTES / piece.byteLength + 2);
    expect(huge.status).toBe(413);
    // A declared length over the limit is refused before anything is read or sent.
    const declared = await fetch('http://proxy/chat/completions', {
      unix: run.socketPath,
      method: 'POST',
      headers: { authorization: `Bearer ${run.token}` },
      body: new Uint8Array(MAX_MODEL_REQUEST_BYTES + 10),
    } as RequestInit);
    expect(declared.status).toBe(413);
    expect(received).toEqual([3 * piece.byteLength]); // the one cut short was never taken as whole
    run.close();
  });

  it(`holds at most ${MAX_MODEL_REQUESTS_PER_RUN} requests of one run at once; a finished or abandoned one frees its place`, async () => {
    const holds: (() => void)[] = [];
    const up = upstream(async (req) => {
      await new Promise<void>((resolve) => holds.push(resolve));
      if (!req.headers.get('x-abandoned')) return Response.json({ ok: true });
      return new Response(new ReadableStream({ start: (controller) => controller.enqueue(new Uint8Array([123])) }));
    });
    cleanups.push(up.stop);
    const { p, records } = proxy(up.url);
    const run = p.open('family', 'run-1');
    const other = p.open('quiet', 'run-2');
    // One client gives up while its request waits at the upstream; the answer that comes then never ends.
    const abandon = new AbortController();
    const abandoned = fetch('http://proxy/chat/completions', {
      unix: run.socketPath,
      method: 'POST',
      headers: { authorization: `Bearer ${run.token}`, 'x-abandoned': 'yes' },
      body: '{}',
      signal: abandon.signal,
    } as RequestInit).catch(() => 'abandoned');
    const open = Array.from({ length: MAX_MODEL_REQUESTS_PER_RUN - 1 }, () => call(run.socketPath, run.token));
    await waitFor(() => holds.length === MAX_MODEL_REQUESTS_PER_RUN || null, 60_000, 'requests at the upstream');
    const refused = await call(run.socketPath, run.token);
    expect(refused.status).toBe(429);
    expect(refused.headers.get('retry-after')).toBe('1');
    // Another run has its own places.
    const theirs = call(other.socketPath, other.token);
    await waitFor(
      () => holds.length === MAX_MODEL_REQUESTS_PER_RUN + 1 || null,
      60_000,
      'the other run at the upstream',
    );
    abandon.abort();
    expect(await abandoned).toBe('abandoned');
    for (const release of holds.splice(0)) release();
    expect((await Promise.all([...open, theirs])).map((r) => r.status)).toEqual(
      Array(MAX_MODEL_REQUESTS_PER_RUN).fill(200),
    );
    await Promise.all((await Promise.all(open)).map((r) => r.text()));
    await waitFor(() => records.length === MAX_MODEL_REQUESTS_PER_RUN + 1 || null, 60_000, 'every request over');
    // Every place is free again, the abandoned request's too.
    const again = Array.from({ length: MAX_MODEL_REQUESTS_PER_RUN }, () => call(run.socketPath, run.token));
    await waitFor(() => holds.length === MAX_MODEL_REQUESTS_PER_RUN || null, 60_000, 'all places freed');
    for (const release of holds.splice(0)) release();
    expect((await Promise.all(again)).map((r) => r.status)).toEqual(Array(MAX_MODEL_REQUESTS_PER_RUN).fill(200));
    run.close();
    other.close();
  });

  it('an upstream error goes back with the key masked in it, and cut short when long', async () => {
    const up = upstream(
      (req) =>
        new Response(
          JSON.stringify({
            error: { message: `bad key ${req.headers.get('authorization')}`, pad: 'y'.repeat(200_000) },
          }),
          { status: 401, headers: { 'content-type': 'application/json' } },
        ),
    );
    cleanups.push(up.stop);
    const { p, records } = proxy(up.url);
    const run = p.open('family', 'run-1');
    const response = await call(run.socketPath, run.token);
    expect(response.status).toBe(401);
    const text = await response.text();
    expect(text).toContain('bad key Bearer [REDACTED]');
    expect(text).not.toContain(KEY);
    expect(text.length).toBeLessThanOrEqual(64 * 1024);
    expect(records).toEqual([{ folder: 'family', ok: false, status: 401, usage: null }]);
    run.close();
  });

  it('tcp mode (Docker Desktop) listens on loopback, one port for all runs, tokens still per run', async () => {
    const up = upstream();
    cleanups.push(up.stop);
    const { p } = proxy(up.url, { mode: 'tcp' });
    const run = p.open('main', 'run-1');
    expect(run.url).toMatch(/^http:\/\/host\.docker\.internal:\d+$/);
    const port = new URL(run.url!).port;
    const local = (token: string) =>
      fetch(`http://127.0.0.1:${port}/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${token}` },
        body: '{}',
      });
    expect((await local(run.token)).status).toBe(200);
    expect((await local('ncp-other')).status).toBe(401);
    run.close();
    expect((await local(run.token)).status).toBe(401);
  });
});

describe('usage counting', () => {
  it('reads usage at the top level or in a choice, across chunks, and ignores what is not JSON', async () => {
    const answers: [string, string[]][] = [
      ['application/json', ['{"usage":{"prompt_tokens":2,', '"completion_tokens":9}}']],
      [
        'text/event-stream',
        ['data: not json\n\ndata: {"usage":{"prompt_tokens":7,"comple', 'tion_tokens":1}}\n\n', 'data: [DONE]'],
      ],
      ['text/event-stream', ['data: {"choices":[{"delta":{}},{"usage":{"prompt_tokens":5}}]}\n\n']],
      ['application/json', ['{"choices":[]}']],
    ];
    const up = upstream(() => {
      const [type, chunks] = answers[up.seen.length - 1]!;
      const body = new ReadableStream({
        start(controller) {
          for (const chunk of chunks) controller.enqueue(new TextEncoder().encode(chunk));
          controller.close();
        },
      });
      return new Response(body, { headers: { 'content-type': type } });
    });
    cleanups.push(up.stop);
    const { p, records } = proxy(up.url);
    const run = p.open('family', 'run-1');
    for (const _ of answers) await (await call(run.socketPath, run.token)).text();
    await waitFor(() => records.length === answers.length || null, 60_000, 'every answer counted');
    expect(records.map((record) => record.usage)).toEqual([
      { promptTokens: 2, completionTokens: 9 },
      { promptTokens: 7, completionTokens: 1 },
      { promptTokens: 5, completionTokens: 0 },
      null,
    ]);
    run.close();
  });
});
