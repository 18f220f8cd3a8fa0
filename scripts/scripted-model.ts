/**
 * A scripted stand-in for Moonshot's chat-completions endpoint, for tests and the demo
 * (`npm run demo`): the only double in an agent run (Kimi Code CLI, the ACP SDK, the runner,
 * the MCP server and the host's model proxy are all real). It speaks the OpenAI-compatible
 * protocol Kimi Code CLI's `kimi` provider uses, as checked against @moonshot-ai/kimi-code
 * 2.1.0 (dist/main.mjs: its OpenAI-compatible requester and llm/requester/retry.ts):
 * POST {base_url}/chat/completions with `Authorization: Bearer <key>`, `stream: true`
 * (server-sent events, usage in the last chunk's choice as Moonshot sends it), tools named
 * as the CLI offers them (`Bash`, `ReadMediaFile`, `AskUserQuestion`, MCP tools as
 * `mcp__<server>__<tool>`). It checks the key when given one and records every request.
 *
 * What the CLI puts in a request that is not the person's: <system-reminder> user messages
 * (the date, the permission mode), a compaction's summary request and the summary that
 * replaces the conversation, tool results that open with "Wall time: N seconds" (and
 * "<system>ERROR: …</system>" on failure), and after a failed turn the next prompt merged
 * into the same user message after a blank line. The script reacts to the newest message a
 * person wrote: the last <message> of a NanoClaw prompt (its @Name trigger dropped), or else
 * the last paragraph of the text:
 *   anything             → "[stub] <text>"
 *   !tool NAME {json}    → calls the tool NAME with those arguments; after its result,
 *                          answers with the result's text ("tool error: …" for errors)
 *   !shell COMMAND       → calls the CLI's Bash tool; then answers with its output
 *   !fail TEXT           → HTTP 400 with TEXT as the error message (not retried)
 *   !status CODE [TEXT]  → HTTP CODE with an OpenAI-style error body
 *   !sleep MS            → waits MS before answering "[stub] slept MS"
 *   !context             → answers with the system prompt it was sent (and any <memory-update>)
 *   !session             → answers with the request's prompt_cache_key
 *   !steps               → "Let me check." with a Bash call, then (after its result) "Here is the answer."
 *   !ask Q | A | B …     → calls AskUserQuestion (question Q, options A, B…); then
 *                          "[stub] answered: <answers>" or "[stub] no answer: <note>"
 *   !image               → calls ReadMediaFile on the "[image: PATH]" the prompt names; once
 *                          the tool result carries the picture, describes it:
 *                          "[stub] I see <mime>, <bytes> bytes, sha256 <first 12 hex>"
 *   !context-full        → HTTP 400 as Moonshot answers a request over the model's token limit
 *                          while the conversation has an answer in it; once the CLI compacted
 *                          it (asking for a summary, answered "[stub] summary: …") "[stub] fits now"
 *   !flaky CODE N        → HTTP CODE for the first N requests of this prompt, then "[stub] recovered"
 *   !cut TEXT            → the first time: "[stub] TEXT" cut off mid-stream (the connection
 *                          breaks); the CLI retries the step, and then it comes whole
 *
 * GET …/models lists kimi-k2.5, as the platforms do.
 *
 * In drill mode (the crash drills) it answers "[drill] " and the text of every message a
 * person sent since its last answer, so a message the host feeds twice shows up twice;
 * `delayMs` can make it think for a while, so a kill can land mid-run.
 */
import { chmodSync, rmSync } from 'node:fs';

export interface ChatMessage {
  role: string;
  content?: unknown;
  tool_calls?: { id: string; function: { name: string; arguments: string } }[];
  tool_call_id?: string;
}

export interface ChatRequest {
  model?: string;
  messages?: ChatMessage[];
  tools?: { type: string; function: { name: string; description?: string; parameters?: unknown } }[];
  stream?: boolean;
  prompt_cache_key?: string;
}

export type ScriptedReply =
  | {
      kind: 'text';
      text: string;
      delayMs?: number /** Streams this many chunks, then breaks the connection. */;
      cutAfter?: number;
    }
  | {
      kind: 'tool';
      name: string;
      args: Record<string, unknown> /** said before the call, in the same step */;
      text?: string;
    }
  | { kind: 'error'; status: number; message: string };

export interface RecordedRequest {
  path: string;
  authorization: string | null;
  body: ChatRequest;
}

/** How the demo's answers begin: nobody should take them for a model's. */
export const DEMO_LABEL = '(demo model, not Kimi:)';

/** Requests seen per prompt text (for !flaky). */
const seenPrompts = new Map<string, number>();

const unescapeXml = (text: string) =>
  text
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&quot;/g, '"')
    .replace(/&amp;/g, '&');

/** The text of a message's content: a string, or the text parts of a part list. */
export function contentText(content: unknown): string {
  if (typeof content === 'string') return content;
  if (Array.isArray(content))
    return content
      .map((part) =>
        part && typeof part === 'object' && 'text' in part ? String((part as { text: unknown }).text) : '',
      )
      .join('');
  return '';
}

/** The text the "model" reacts to. */
export function userText(text: string): string {
  // The CLI may open a session's first message with its own <system-reminder> blocks.
  const prompt = text.replace(/<system-reminder>[\s\S]*?<\/system-reminder>\s*/g, '');
  const messages = [...prompt.matchAll(/<message\b[^>]*>([\s\S]*?)<\/message>/g)];
  if (messages.length)
    return unescapeXml(messages.at(-1)![1]!)
      .trim()
      .replace(/^@\S+\s+/, '');
  // Otherwise its last paragraph: what follows a scheduled task's note, a <memory-update>,
  // or an earlier prompt the CLI merged in (it joins consecutive user messages with a blank line).
  const paragraphs = prompt.trim().split(/\n\s*\n/);
  return paragraphs.at(-1)!.trim();
}

/**
 * A tool result as Kimi Code CLI hands it over: "Wall time: N seconds" first, then on a
 * failure "<system>ERROR: …</system>", then the output.
 */
function toolOutput(content: unknown): string {
  const text = contentText(content).replace(/^Wall time: [\d.]+ seconds\n/, '');
  const error = /^<system>ERROR: ([\s\S]*?)<\/system>\n?/.exec(text);
  if (error) return `tool error: ${text.slice(error[0].length) || error[1]}`;
  return text.replace(/^<system>[\s\S]*?<\/system>\n?/, '');
}

/**
 * A user message the CLI wrote itself, not the person: its <system-reminder> notes (the
 * date, the permission mode, "compaction is complete") and the summary a compaction
 * leaves in place of the conversation.
 */
export function isReminder(message: ChatMessage): boolean {
  if (message.role !== 'user') return false;
  const text = contentText(message.content);
  return (
    /^\s*(<system-reminder>[\s\S]*?<\/system-reminder>\s*)+$/.test(text) ||
    text.startsWith(COMPACTED_PREFIX) ||
    text.startsWith(COMPACTION_REQUEST)
  );
}

/** How Kimi Code CLI 2.1.0 asks for a compaction summary, and how the summary opens the compacted context. */
const COMPACTION_REQUEST = 'You are about to run out of context.';
const COMPACTED_PREFIX = 'The conversation so far has been compacted';

/** The index of the newest user message a person (or the runner) wrote: not one of the CLI's reminders. */
export function lastPersonMessage(messages: readonly ChatMessage[]): number {
  for (let i = messages.length - 1; i >= 0; i--)
    if (messages[i]!.role === 'user' && !isReminder(messages[i]!)) return i;
  return -1;
}

/**
 * Drill mode: every message a person sent since the model's last answer, named — so a
 * message the host feeds again, in a later prompt, is named again and shows up twice.
 */
export function drillReply(request: ChatRequest): ScriptedReply {
  const messages = request.messages ?? [];
  const lastAnswer = messages.map((m) => m.role).lastIndexOf('assistant');
  const each = messages
    .slice(lastAnswer + 1)
    .filter((m) => m.role === 'user' && !isReminder(m))
    .flatMap((m) => {
      const prompt = contentText(m.content);
      const named = [...prompt.matchAll(/<message\b[^>]*>([\s\S]*?)<\/message>/g)].map((x) =>
        unescapeXml(x[1]!).trim(),
      );
      return named.length ? named : [userText(prompt)];
    });
  return { kind: 'text', text: `[drill] ${each.join(' ')}` };
}

/** The first image a tool result carries, described by its bytes. */
function describeImage(content: unknown): string | null {
  if (!Array.isArray(content)) return null;
  for (const part of content as { type?: string; image_url?: { url?: string } }[]) {
    const match = part?.type === 'image_url' ? /^data:([^;]+);base64,(.*)$/.exec(part.image_url?.url ?? '') : null;
    if (!match) continue;
    const bytes = Buffer.from(match[2]!, 'base64');
    return `${match[1]}, ${bytes.length} bytes, sha256 ${new Bun.CryptoHasher('sha256').update(bytes).digest('hex').slice(0, 12)}`;
  }
  return null;
}

/** What the scripted model answers to a request. */
export function scriptedReply(request: ChatRequest): ScriptedReply {
  const messages = request.messages ?? [];
  const newest = messages.at(-1);
  if (newest?.role === 'user' && contentText(newest.content).startsWith(COMPACTION_REQUEST))
    return { kind: 'text', text: '[stub] summary: the conversation so far, in brief.' };
  const lastUser = lastPersonMessage(messages);
  const raw = lastUser >= 0 ? contentText(messages[lastUser]!.content) : '';
  const text = userText(raw);
  const toolResult = messages
    .slice(lastUser + 1)
    .filter((m) => m.role === 'tool')
    .at(-1);
  // A media message reads "[image: PATH] caption": the directive may follow the picture.
  const [first = '', ...rest] = text.split(' ');
  const command = /(^|\s)!image\b/.test(text) ? '!image' : first;
  const argText = rest.join(' ').trim();
  switch (command) {
    case '!steps':
      return toolResult
        ? { kind: 'text', text: 'Here is the answer.' }
        : { kind: 'tool', name: 'Bash', args: { command: 'echo checked' }, text: 'Let me check.' };
    case '!ask': {
      if (toolResult) {
        const output = JSON.parse(toolOutput(toolResult.content)) as {
          answers: Record<string, string>;
          note?: string;
        };
        return {
          kind: 'text',
          text: Object.keys(output.answers).length
            ? `[stub] answered: ${JSON.stringify(output.answers)}`
            : `[stub] no answer: ${output.note}`,
        };
      }
      const [question = '', ...options] = argText.split('|').map((part) => part.trim());
      return {
        kind: 'tool',
        name: 'AskUserQuestion',
        args: {
          questions: [
            {
              question,
              header: '',
              options: options.map((label) => ({ label, description: '' })),
              multi_select: false,
            },
          ],
        },
      };
    }
    case '!image': {
      if (toolResult)
        return {
          kind: 'text',
          text: `[stub] I see ${describeImage(toolResult.content) ?? `no image (${contentText(toolResult.content).slice(0, 200)})`}`,
        };
      const path = /\[(?:image|sticker): (\/[^\]\s]+)/.exec(raw)?.[1];
      return path
        ? { kind: 'tool', name: 'ReadMediaFile', args: { path } }
        : { kind: 'text', text: '[stub] no image in the prompt' };
    }
    case '!context-full':
      // Over the limit while the conversation has earlier turns; a fresh session fits.
      return messages.some((m) => m.role === 'assistant')
        ? { kind: 'error', status: 400, message: 'Invalid request: Your request exceeded model token limit: 262144' }
        : { kind: 'text', text: '[stub] fits now' };
    case '!flaky': {
      const [code, times] = rest;
      const seen = (seenPrompts.get(raw) ?? 0) + 1;
      seenPrompts.set(raw, seen);
      return seen <= (Number(times) || 1)
        ? { kind: 'error', status: Number(code) || 503, message: `scripted ${code}, ${seen} of ${times}` }
        : { kind: 'text', text: '[stub] recovered' };
    }
    case '!tool':
    case '!shell': {
      if (toolResult) return { kind: 'text', text: toolOutput(toolResult.content) };
      if (command === '!shell') return { kind: 'tool', name: 'Bash', args: { command: argText } };
      const [name = '', ...json] = rest;
      try {
        return {
          kind: 'tool',
          name,
          args: json.join(' ').trim() ? (JSON.parse(json.join(' ')) as Record<string, unknown>) : {},
        };
      } catch {
        return { kind: 'text', text: `tool error: arguments are not JSON: ${json.join(' ')}` };
      }
    }
    case '!fail':
      return { kind: 'error', status: 400, message: argText || 'provider error' };
    case '!status': {
      const [code, ...message] = rest;
      return { kind: 'error', status: Number(code) || 500, message: message.join(' ') || `scripted ${code}` };
    }
    case '!cut': {
      const seen = (seenPrompts.get(raw) ?? 0) + 1;
      seenPrompts.set(raw, seen);
      return { kind: 'text', text: `[stub] ${argText}`, ...(seen === 1 ? { cutAfter: 2 } : {}) };
    }
    case '!sleep':
      return { kind: 'text', text: `[stub] slept ${argText}`, delayMs: Number(argText) || 0 };
    case '!context': {
      // What the model is told about itself: the system prompt, and any memory update since.
      const updates = messages
        .filter((m) => m.role === 'user')
        .map((m) => /<memory-update>[\s\S]*?<\/memory-update>/.exec(contentText(m.content))?.[0])
        .filter(Boolean);
      return {
        kind: 'text',
        text: [
          contentText(messages.find((m) => m.role === 'system')?.content) || '(no system prompt)',
          ...updates,
        ].join('\n'),
      };
    }
    case '!session':
      return { kind: 'text', text: `[stub] ${request.prompt_cache_key ?? '(no prompt_cache_key)'}` };
    default:
      return { kind: 'text', text: `[stub] ${text}` };
  }
}

const roughTokens = (text: string) => Math.max(1, Math.ceil(text.length / 4));

/** Chunks of a streamed completion, as Moonshot sends them (usage inside the last choice). */
function completionChunks(
  reply: Exclude<ScriptedReply, { kind: 'error' }>,
  request: ChatRequest,
  id: string,
): unknown[] {
  const model = request.model ?? 'kimi-k2.5';
  const base = { id, object: 'chat.completion.chunk', created: Math.floor(Date.now() / 1000), model };
  const promptTokens = roughTokens(JSON.stringify(request.messages ?? []));
  const chunks: unknown[] = [
    { ...base, choices: [{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }] },
  ];
  let output = '';
  if (reply.kind === 'text') {
    for (let i = 0; i < reply.text.length; i += 12) {
      chunks.push({
        ...base,
        choices: [{ index: 0, delta: { content: reply.text.slice(i, i + 12) }, finish_reason: null }],
      });
    }
    output = reply.text;
  } else {
    const args = JSON.stringify(reply.args);
    if (reply.text)
      chunks.push({ ...base, choices: [{ index: 0, delta: { content: reply.text }, finish_reason: null }] });
    const callId = `${reply.name}:${Math.random().toString(36).slice(2, 10)}`;
    chunks.push({
      ...base,
      choices: [
        {
          index: 0,
          delta: {
            tool_calls: [{ index: 0, id: callId, type: 'function', function: { name: reply.name, arguments: '' } }],
          },
          finish_reason: null,
        },
      ],
    });
    for (let i = 0; i < args.length; i += 16) {
      chunks.push({
        ...base,
        choices: [
          {
            index: 0,
            delta: { tool_calls: [{ index: 0, function: { arguments: args.slice(i, i + 16) } }] },
            finish_reason: null,
          },
        ],
      });
    }
    output = args;
  }
  const usage = {
    prompt_tokens: promptTokens,
    completion_tokens: roughTokens(output),
    total_tokens: promptTokens + roughTokens(output),
    cached_tokens: 0,
  };
  chunks.push({
    ...base,
    choices: [{ index: 0, delta: {}, finish_reason: reply.kind === 'tool' ? 'tool_calls' : 'stop', usage }],
  });
  return chunks;
}

export interface FakeModel {
  /** The base URL to configure (…/v1), or for a unix socket the socket's path. */
  readonly url: string;
  readonly socketPath?: string;
  readonly requests: RecordedRequest[];
  stop(): void;
}

/** Starts the scripted model on loopback (a port) or on a unix socket (mode 0666, for containers). */
export function startFakeModel(
  options: {
    key?: string;
    unix?: string;
    drill?: boolean;
    /** `npm run demo`: answers say they come from this script, not from Kimi. */
    demo?: boolean;
    port?: number;
    delayMs?: () => number;
  } = {},
): FakeModel {
  const requests: RecordedRequest[] = [];
  let counter = 0;
  const fetch = async (req: Request): Promise<Response> => {
    const path = new URL(req.url).pathname;
    let body: ChatRequest = {};
    try {
      body = (await req.json()) as ChatRequest;
    } catch {
      // recorded as an empty request; answered below
    }
    requests.push({ path, authorization: req.headers.get('authorization'), body });
    const authorized = options.key === undefined || req.headers.get('authorization') === `Bearer ${options.key}`;
    const refused = () =>
      Response.json(
        { error: { message: 'Invalid Authentication', type: 'invalid_authentication_error' } },
        { status: 401 },
      );
    if (req.method === 'GET' && path === '/v1/models') {
      if (!authorized) return refused();
      return Response.json({
        object: 'list',
        data: [
          {
            id: 'kimi-k2.5',
            object: 'model',
            context_length: 262144,
            supports_image_in: true,
            supports_video_in: true,
            supports_reasoning: true,
          },
        ],
      });
    }
    if (req.method !== 'POST' || path !== '/v1/chat/completions')
      return Response.json(
        { error: { message: `no route ${req.method} ${path}`, type: 'not_found' } },
        { status: 404 },
      );
    if (!authorized) return refused();
    let reply = options.drill ? drillReply(body) : scriptedReply(body);
    if (options.demo && reply.kind === 'text') reply = { ...reply, text: reply.text.replace(/^\[stub\]/, DEMO_LABEL) };
    const think = options.delayMs?.() ?? 0;
    if (think > 0) await Bun.sleep(think);
    if (reply.kind === 'error') {
      return Response.json(
        {
          error: {
            message: reply.message,
            type: reply.status === 429 ? 'rate_limit_reached_error' : 'invalid_request_error',
          },
        },
        { status: reply.status },
      );
    }
    if (reply.kind === 'text' && reply.delayMs) await Bun.sleep(reply.delayMs);
    const id = `chatcmpl-fake-${++counter}`;
    const chunks = completionChunks(reply, body, id);
    if (!body.stream) {
      const message =
        reply.kind === 'text'
          ? { role: 'assistant', content: reply.text }
          : {
              role: 'assistant',
              content: '',
              tool_calls: [
                {
                  id: `${reply.name}:0`,
                  type: 'function',
                  function: { name: reply.name, arguments: JSON.stringify(reply.args) },
                },
              ],
            };
      const last = chunks.at(-1) as { choices: { usage: unknown }[] };
      return Response.json({
        id,
        object: 'chat.completion',
        model: body.model,
        choices: [{ index: 0, message, finish_reason: 'stop' }],
        usage: last.choices[0]!.usage,
      });
    }
    const encoder = new TextEncoder();
    const cutAfter = reply.kind === 'text' ? reply.cutAfter : undefined;
    if (cutAfter !== undefined) {
      const stream = new ReadableStream<Uint8Array>({
        async start(controller) {
          for (const chunk of chunks.slice(0, cutAfter + 1))
            controller.enqueue(encoder.encode(`data: ${JSON.stringify(chunk)}\n\n`));
          await Bun.sleep(20);
          controller.error(new Error('scripted: connection cut mid-stream'));
        },
      });
      return new Response(stream, { headers: { 'content-type': 'text/event-stream' } });
    }
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        for (const chunk of chunks) controller.enqueue(encoder.encode(`data: ${JSON.stringify(chunk)}\n\n`));
        controller.enqueue(encoder.encode('data: [DONE]\n\n'));
        controller.close();
      },
    });
    return new Response(stream, { headers: { 'content-type': 'text/event-stream' } });
  };
  if (options.unix) {
    rmSync(options.unix, { force: true });
    const server = Bun.serve({ unix: options.unix, fetch });
    chmodSync(options.unix, 0o666);
    return { url: options.unix, socketPath: options.unix, requests, stop: () => void server.stop(true) };
  }
  const server = Bun.serve({ hostname: '127.0.0.1', port: options.port ?? 0, fetch });
  return { url: `http://127.0.0.1:${server.port}/v1`, requests, stop: () => void server.stop(true) };
}

/** `bun scripts/scripted-model.ts --demo KEY`: serves on loopback and prints its base URL (scripts/demo.sh). */
if (import.meta.main) {
  const key = process.argv[3] ?? 'demo';
  const model = startFakeModel({ key, demo: process.argv[2] === '--demo' });
  console.log(model.url);
  process.on('SIGTERM', () => {
    model.stop();
    process.exit(0);
  });
}
