/**
 * Kimi Code CLI, driven over the Agent Client Protocol: one `kimi acp` process per
 * container, one session in it, one prompt at a time.
 *
 * ACP streams what the agent says as it says it, but a stream cannot be taken back: a
 * model request retried after partial output streams both attempts, auto-compaction
 * streams its progress notes as answer text, and a failed turn ends as `end_turn` with no
 * text (ACP has no failed stop reason). The session's own record, `wire.jsonl`, says what
 * really happened: which steps ended, what each said, and why a turn failed. So a turn's
 * answer is read from there once the prompt returns; the stream only shows the CLI is alive.
 *
 * Checked against Kimi Code CLI 2.1.0 (@moonshot-ai/kimi-code, dist/main.mjs: acp-server
 * session.ts, events-map.ts, interaction-bridge.ts; agent-core-v2 wire records and
 * llm/requester/retry.ts) and @agentclientprotocol/sdk 2.4.0.
 */
import type {
  ClientConnection,
  CreateElicitationRequest,
  CreateElicitationResponse,
  NewSessionResponse,
  RequestPermissionRequest,
  RequestPermissionResponse,
} from '@agentclientprotocol/sdk';
import { closeSync, openSync, readdirSync, readSync, statSync } from 'node:fs';
import { join } from 'node:path';

/** A question the agent asks (its AskUserQuestion tool), as the runner relays it. */
export interface Question {
  /** The question itself. */
  text: string;
  /** A short label the CLI shows above it, if any. */
  header?: string;
  options: string[];
  multiSelect: boolean;
}

/** What the people in the chat chose: one entry per question (null: dismissed, unanswered). */
export type Answers = (string[] | null)[];

/** Why a turn failed, sorted for the host: `auth` and `bad-request` are never retried. */
export type ErrorKind = 'auth' | 'rate-limit' | 'unavailable' | 'bad-request' | 'context' | 'other';

export interface TurnError {
  message: string;
  kind: ErrorKind;
  /** The CLI's error code (e.g. provider.rate_limit), when it gave one. */
  code?: string;
  status?: number;
}

/** A turn as the session's record tells it. */
export interface TurnRecord {
  /** What each step that finished said, in order (a step retried after an error is not among them). */
  said: string[];
  error?: TurnError;
  /** Whether the record reached the turn's end (turn.ended). */
  ended: boolean;
}

/** The CLI's own progress notes, which ACP sends as answer text (acp-server session.ts emitLocalChunk). */
const LOCAL_NOTES = [
  /^Compacting conversation context(…| with instruction: [\s\S]*)$/,
  /^Compaction completed\.\n- Messages compacted: [\d,]+\n- Tokens before: [\d,]+\n- Tokens after: [\d,]+$/,
  /^Compaction cancelled\.$/,
  /^Compaction is blocked by the current turn; retry when the turn is idle\.$/,
];

/** Whether a streamed chunk is one of the CLI's notes (each arrives whole, as one chunk), not the model's words. */
export function isLocalNote(chunk: string): boolean {
  return LOCAL_NOTES.some((note) => note.test(chunk));
}

/**
 * Sorts a failure the way the host acts on it. From the CLI's error codes and HTTP status
 * (agent-core-v2 errors: provider.auth_error, provider.rate_limit, provider.overloaded,
 * provider.connection_error…; retry.ts retries 408, 409, 429 and 5xx itself), and from the
 * host's model proxy, whose refusal without a key is a 401 naming KIMI_API_KEY.
 */
export function classifyError(error: { code?: string; status?: number; message: string }): ErrorKind {
  const { code = '', status, message } = error;
  if (/context[_ ]?(overflow|length)|exceeded model token limit|maximum context/i.test(`${code} ${message}`))
    return 'context';
  if (
    code === 'provider.auth_error' ||
    status === 401 ||
    status === 403 ||
    /NanoClaw has no KIMI_API_KEY/.test(message)
  )
    return 'auth';
  if (code === 'provider.rate_limit' || status === 429) return 'rate-limit';
  if (
    code === 'provider.overloaded' ||
    code === 'provider.connection_error' ||
    (status !== undefined && (status >= 500 || status === 408 || status === 409))
  )
    return 'unavailable';
  if (code === 'provider.not_found' || (status !== undefined && status >= 400 && status < 500)) return 'bad-request';
  return 'other';
}

interface WireLine {
  type?: string;
  reason?: string;
  error?: { code?: string; message?: string; details?: { statusCode?: number } };
  event?: {
    type?: string;
    stepUuid?: string;
    uuid?: string;
    finishReason?: string;
    part?: { type?: string; text?: string };
  };
}

/** Reads the records a turn appended to wire.jsonl (complete lines, oldest first, from its turn.prompt on). */
export function readTurnRecord(lines: readonly string[]): TurnRecord {
  const steps = new Map<string, { text: string; failed: boolean }>();
  const step = (uuid: string) => {
    const entry = steps.get(uuid) ?? { text: '', failed: false };
    steps.set(uuid, entry);
    return entry;
  };
  let ended = false;
  let begun = false;
  let error: TurnError | undefined;
  for (const line of lines) {
    let record: WireLine;
    try {
      record = JSON.parse(line) as WireLine;
    } catch {
      continue;
    }
    // What an earlier turn wrote late (its end, its token counts) is not this turn's.
    if (record.type === 'turn.prompt') begun = true;
    if (!begun) continue;
    const event = record.event;
    if (record.type === 'context.append_loop_event' && event) {
      if (event.type === 'content.part' && event.stepUuid && event.part?.type === 'text')
        step(event.stepUuid).text += event.part.text ?? '';
      else if (event.type === 'step.end' && event.uuid && event.finishReason === 'error')
        step(event.uuid).failed = true;
    } else if (record.type === 'turn.ended') {
      ended = true;
      if (record.reason === 'failed') {
        const found = {
          code: record.error?.code,
          status: record.error?.details?.statusCode,
          message: record.error?.message || 'the turn failed',
        };
        error = { ...found, kind: classifyError(found) };
      }
    }
  }
  const said = [...steps.values()].filter((s) => !s.failed && s.text.trim()).map((s) => s.text.trim());
  return { said, ended, ...(error ? { error } : {}) };
}

/** The session's wire.jsonl: KIMI_CODE_HOME/sessions/wd_<dir>_<hash>/<session id>/agents/main/wire.jsonl. */
export function findWireFile(home: string, sessionId: string): string | null {
  let workspaces: string[];
  try {
    workspaces = readdirSync(join(home, 'sessions'));
  } catch {
    return null;
  }
  for (const workspace of workspaces) {
    const path = join(home, 'sessions', workspace, sessionId, 'agents', 'main', 'wire.jsonl');
    try {
      if (statSync(path).isFile()) return path;
    } catch {
      // not this workspace's
    }
  }
  return null;
}

/** The complete lines written to a file since `offset`, and where the next read starts. */
function readNewLines(path: string, offset: number): { lines: string[]; next: number } {
  const fd = openSync(path, 'r');
  try {
    const size = statSync(path).size;
    if (size <= offset) return { lines: [], next: offset };
    const buffer = Buffer.alloc(size - offset);
    const read = readSync(fd, buffer, 0, buffer.length, offset);
    const text = buffer.subarray(0, read).toString('utf8');
    const end = text.lastIndexOf('\n') + 1;
    return {
      lines: text.slice(0, end).split('\n').filter(Boolean),
      next: offset + Buffer.byteLength(text.slice(0, end)),
    };
  } finally {
    closeSync(fd);
  }
}

/** A timer this much later than due means the process was not running (a paused container). */
export const PAUSE_GAP_MS = 5_000;

export type McpServerSpec =
  | { name: string; command: string; args: string[]; env: Record<string, string> }
  | { name: string; type: 'http'; url: string; headers: Record<string, string> };

/** ACP passes environments and headers as lists of {name, value}. */
const pairs = (record: Record<string, string>) => Object.entries(record).map(([name, value]) => ({ name, value }));

export interface CliOptions {
  /** The command that starts the CLI, without `acp` (e.g. ['kimi']). */
  command: string[];
  /** KIMI_CODE_HOME: the group's ~/.kimi. */
  home: string;
  workDir: string;
  /** The CLI's environment (no KIMI_* overrides: config.toml is the one source). */
  env: Record<string, string>;
  /** The MCP servers every session gets (a command the CLI starts, or a URL it connects to), asked for as each opens. */
  mcpServers: () => McpServerSpec[];
  /** The agent asks the chat; resolves with the answers (null entries: unanswered). */
  ask(questions: Question[]): Promise<Answers>;
  /** A line the CLI wrote to stderr. */
  onStderr?(line: string): void;
  log(message: string): void;
  /** Fails a turn during which the CLI sends nothing for this long (default 10 min). */
  silenceLimitMs?: number;
  /** How long to wait for the session's record of a finished turn (default 5 s). */
  recordWaitMs?: number;
}

export interface TurnOutcome {
  said: string[];
  error?: TurnError;
}

/**
 * One `kimi acp` process and the session in it. Every prompt is one turn; the CLI refuses
 * a second prompt while one runs (it cannot be steered), so the runner queues follow-ups.
 */
export class KimiCli {
  sessionId = '';
  private wire: string | null = null;
  private lastHeard = Date.now();
  private streamed = '';
  private exitCode: number | null = null;

  private constructor(
    private readonly options: CliOptions,
    private readonly proc: ReturnType<typeof Bun.spawn<'pipe', 'pipe', 'pipe'>>,
    private readonly connection: ClientConnection,
  ) {
    void proc.exited.then((code) => {
      this.exitCode = code;
    });
  }

  /** Spawns `kimi acp` (at once, before anything else is awaited) and waits for its `initialize` answer. */
  static async start(options: CliOptions): Promise<KimiCli> {
    const proc = Bun.spawn([...options.command, 'acp'], {
      cwd: options.workDir,
      env: { ...options.env, KIMI_CODE_HOME: options.home },
      stdin: 'pipe',
      stdout: 'pipe',
      stderr: 'pipe',
    });
    void forEachLine(proc.stderr, (line) => options.onStderr?.(line));
    // Loaded once the CLI is starting (it takes a second; this, a fraction, on the other core).
    const { client, ndJsonStream } = await import('@agentclientprotocol/sdk');
    const stdin = new WritableStream<Uint8Array>({
      write: async (chunk) => {
        proc.stdin.write(chunk);
        await proc.stdin.flush();
      },
      close: async () => {
        await proc.stdin.end();
      },
    });
    let cli: KimiCli | null = null;
    const heard = () => {
      if (cli) cli.lastHeard = Date.now();
    };
    const app = client()
      .onNotification('session/update', ({ params }) => {
        heard();
        const update = params.update;
        if (update.sessionUpdate === 'agent_message_chunk' && update.content.type === 'text' && cli)
          if (!isLocalNote(update.content.text)) cli.streamed += update.content.text;
      })
      .onRequest('session/request_permission', async ({ params }) => {
        heard();
        return cli ? cli.permission(params) : { outcome: { outcome: 'cancelled' } };
      })
      .onRequest('elicitation/create', async ({ params }) => {
        heard();
        return cli ? cli.elicitation(params) : { action: 'cancel' };
      });
    const connection = app.connect(ndJsonStream(stdin, proc.stdout));
    cli = new KimiCli(options, proc, connection);
    const exited = proc.exited.then((code) => {
      throw new Error(`the Kimi CLI exited with code ${code} as it started (its stderr is in the run log)`);
    });
    await Promise.race([
      connection.agent.request('initialize', {
        protocolVersion: 1,
        // Forms carry every question of an AskUserQuestion (the permission fallback only its first).
        clientCapabilities: { elicitation: { form: {} } },
      }),
      exited,
    ]);
    return cli;
  }

  /**
   * Resumes the stored session, or starts a new one when there is none or the CLI does
   * not know it (an id of the old Python CLI, or cleared files). Returns whether it resumed.
   */
  async openSession(sessionId?: string): Promise<boolean> {
    const mcpServers = this.options
      .mcpServers()
      .map((server) =>
        'url' in server
          ? { type: 'http' as const, name: server.name, url: server.url, headers: pairs(server.headers) }
          : { name: server.name, command: server.command, args: server.args, env: pairs(server.env) },
      );
    if (sessionId) {
      try {
        await this.connection.agent.request('session/resume', { sessionId, cwd: this.options.workDir, mcpServers });
        this.sessionId = sessionId;
        this.wire = null;
        return true;
      } catch (err) {
        this.options.log(`session ${sessionId} cannot be resumed (${errorText(err)}); starting a new one`);
      }
    }
    const created: NewSessionResponse = await this.connection.agent.request('session/new', {
      cwd: this.options.workDir,
      mcpServers,
    });
    this.sessionId = created.sessionId;
    this.wire = null;
    return false;
  }

  /**
   * Runs one turn and returns what it said, read from the session's record. A CLI that
   * exits, or goes silent past the limit, fails the turn at once instead of leaving it to
   * the container's timeout.
   */
  async prompt(text: string): Promise<TurnOutcome> {
    this.wire ??= findWireFile(this.options.home, this.sessionId);
    const offset = this.wire ? statSync(this.wire).size : 0;
    this.streamed = '';
    this.lastHeard = Date.now();
    const request = this.connection.agent.request('session/prompt', {
      sessionId: this.sessionId,
      prompt: [{ type: 'text', text }],
    });
    const failure = await this.watch(request);
    if (failure) return { said: [], error: failure };
    return this.recordedTurn(offset);
  }

  /** Waits for the prompt's answer; returns why the turn failed, or null once it answered. */
  private async watch(request: Promise<unknown>): Promise<TurnError | null> {
    const silenceLimit = this.options.silenceLimitMs ?? 10 * 60_000;
    let timer: ReturnType<typeof setInterval> | undefined;
    let lastTick = Date.now();
    const watchdog = new Promise<TurnError>((resolve) => {
      timer = setInterval(() => {
        // A tick far later than due: the container was paused (docker pause), and so was
        // the CLI. Time paused is not silence.
        const now = Date.now();
        if (now - lastTick > PAUSE_GAP_MS) this.lastHeard += now - lastTick;
        lastTick = now;
        if (this.exitCode !== null)
          resolve({ kind: 'other', message: `the Kimi CLI exited with code ${this.exitCode} during the turn` });
        else if (Date.now() - this.lastHeard > silenceLimit) {
          void this.connection.agent.notify('session/cancel', { sessionId: this.sessionId }).catch(() => {});
          resolve({ kind: 'other', message: `the Kimi CLI sent nothing for ${Math.round(silenceLimit / 1000)} s` });
        }
      }, 200);
    });
    const answered = request.then(
      () => null,
      async (err: unknown): Promise<TurnError> => {
        const code = (err as { code?: unknown }).code;
        // The connection closes with the process: say what happened to the process.
        const exit = await Promise.race([this.proc.exited, Bun.sleep(1_000).then(() => null)]);
        if (exit !== null) return { kind: 'other', message: `the Kimi CLI exited with code ${exit} during the turn` };
        const message = errorText(err);
        // -32000: the CLI turned the model's refusal of the key into "authentication required".
        return { message, kind: code === -32000 ? 'auth' : classifyError({ message }) };
      },
    );
    try {
      return await Promise.race([answered, watchdog]);
    } finally {
      clearInterval(timer);
    }
  }

  /**
   * The turn's record in wire.jsonl, once the CLI has written its end (a few ms after the
   * prompt's answer). Without it (a CLI that keeps no record, or is too slow), the streamed
   * text stands in.
   */
  private async recordedTurn(offset: number): Promise<TurnOutcome> {
    const deadline = Date.now() + (this.options.recordWaitMs ?? 5_000);
    const lines: string[] = [];
    let next = offset;
    for (;;) {
      this.wire ??= findWireFile(this.options.home, this.sessionId);
      if (this.wire) {
        const read = readNewLines(this.wire, next);
        lines.push(...read.lines);
        next = read.next;
        const record = readTurnRecord(lines);
        if (record.ended) return { said: record.said, ...(record.error ? { error: record.error } : {}) };
      }
      if (Date.now() > deadline) break;
      await Bun.sleep(3);
    }
    this.options.log('the session record did not show the turn’s end in time; using the streamed text');
    const text = this.streamed.trim();
    return { said: text ? [text] : [] };
  }

  /** Tool approvals are granted (the runner is yolo); a question asked this way is relayed. */
  private async permission(params: RequestPermissionRequest): Promise<RequestPermissionResponse> {
    const options = params.options;
    const questionOptions = options.filter((o) => /^q0_opt_\d+$/.test(o.optionId));
    if (params.toolCall.title === 'AskUserQuestion' && questionOptions.length) {
      const text = params.toolCall.content?.find((c) => c.type === 'content')?.content;
      const [answer] = await this.options.ask([
        {
          text: text?.type === 'text' ? text.text : 'The agent asks:',
          options: questionOptions.map((o) => o.name),
          multiSelect: false,
        },
      ]);
      const chosen = questionOptions.find((o) => answer?.[0] === o.name);
      return { outcome: chosen ? { outcome: 'selected', optionId: chosen.optionId } : { outcome: 'cancelled' } };
    }
    const allow = options.find((o) => o.kind === 'allow_always') ?? options.find((o) => o.kind === 'allow_once');
    this.options.log(`approved "${params.toolCall.title ?? params.toolCall.toolCallId}": tools run without asking`);
    return { outcome: allow ? { outcome: 'selected', optionId: allow.optionId } : { outcome: 'cancelled' } };
  }

  /** AskUserQuestion through a form: every question, each single or multiple choice. */
  private async elicitation(params: CreateElicitationRequest): Promise<CreateElicitationResponse> {
    const schema = (params as { requestedSchema?: ElicitationSchema }).requestedSchema;
    const fields = Object.entries(schema?.properties ?? {});
    if (params.mode !== 'form' || fields.length === 0) return { action: 'decline' };
    const lines = params.message.split('\n');
    const questions: Question[] = fields.map(([, field], i) => {
      const multiSelect = field.type === 'array';
      const choices = (multiSelect ? field.items?.anyOf : field.oneOf) ?? [];
      return {
        text: lines.length === fields.length ? lines[i]! : (field.title ?? params.message),
        ...(field.title && lines.length === fields.length && field.title !== lines[i] ? { header: field.title } : {}),
        options: choices.map((c) => c.title ?? c.const),
        multiSelect,
      };
    });
    const answers = await this.options.ask(questions);
    const content: Record<string, string | string[]> = {};
    fields.forEach(([key, field], i) => {
      const choices = (field.type === 'array' ? field.items?.anyOf : field.oneOf) ?? [];
      const picked = (answers[i] ?? [])
        .map((label) => choices.find((c) => (c.title ?? c.const) === label)?.const)
        .filter((value): value is string => value !== undefined);
      if (picked.length) content[key] = field.type === 'array' ? picked : picked[0]!;
    });
    return Object.keys(content).length ? { action: 'accept', content } : { action: 'decline' };
  }

  /** Ends the session so its last turn is on disk, then the process (killed if it will not go). */
  async close(graceMs = 5_000): Promise<void> {
    if (this.sessionId && this.exitCode === null)
      await Promise.race([
        this.connection.agent.request('session/close', { sessionId: this.sessionId }).catch(() => {}),
        Bun.sleep(graceMs),
      ]);
    this.connection.close();
    try {
      await this.proc.stdin.end();
    } catch {
      // already closed
    }
    const exited = await Promise.race([this.proc.exited, Bun.sleep(graceMs).then(() => null)]);
    if (exited === null) this.proc.kill('SIGKILL');
  }
}

interface ElicitationChoice {
  const: string;
  title?: string;
}
interface ElicitationSchema {
  properties?: Record<
    string,
    { type?: string; title?: string; oneOf?: ElicitationChoice[]; items?: { anyOf?: ElicitationChoice[] } }
  >;
}

export const errorText = (err: unknown): string => (err instanceof Error ? err.message : String(err));

/** Calls `onLine` for each line of a stream as it arrives. */
async function forEachLine(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void): Promise<void> {
  const decoder = new TextDecoder();
  let pending = '';
  for await (const chunk of stream) {
    pending += decoder.decode(chunk, { stream: true });
    let newline = pending.indexOf('\n');
    while (newline >= 0) {
      onLine(pending.slice(0, newline));
      pending = pending.slice(newline + 1);
      newline = pending.indexOf('\n');
    }
    // A flood without newlines is cut rather than held.
    if (pending.length > 64 * 1024) {
      onLine(pending);
      pending = '';
    }
  }
  if (pending) onLine(pending);
}
