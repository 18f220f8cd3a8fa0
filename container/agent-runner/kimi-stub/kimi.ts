#!/usr/bin/env bun
/**
 * A test double of the `kimi` CLI, as strict as the real one where NanoClaw meets it.
 *
 * Modelled on kimi-cli 1.49.0 (MoonshotAI/kimi-cli at tag 1.49.0, wire protocol 1.10;
 * the version the Dockerfile pins — test/kimi-stub.test.ts checks they agree), read in:
 *   src/kimi_cli/cli/__init__.py       flags (`--config-file` must exist), `--version`, `info`, usage errors (exit 2)
 *   src/kimi_cli/wire/server.py        the stdio JSON-RPC server: initialize (any client
 *                                      protocol_version is accepted, 1.10 answered), prompt,
 *                                      steer, cancel, requests to the client and their replies
 *   src/kimi_cli/wire/jsonrpc.py       message shapes, string ids, error codes -32700…-32003
 *   src/kimi_cli/wire/types.py         event and request payloads (StepRetry, QuestionRequest…)
 *   src/kimi_cli/soul/kimisoul.py      the turn loop: steps, tool calls, steer at step ends,
 *                                      3 attempts per step for 429/5xx/empty with StepRetry
 *   src/kimi_cli/soul/context.py       context.jsonl; the system prompt written first, once,
 *                                      and reused on resume (prepended to a legacy history)
 *   src/kimi_cli/soul/agent.py         agent file, ROLE_ADDITIONAL, AGENTS.md discovery;
 *                                      load_agent starts MCP loading (start_mcp_loading)
 *   src/kimi_cli/cli/__init__.py, app.py   MCP servers are deferred only for the
 *                                      interactive shell; with --wire they connect as the
 *                                      process starts, before initialize is served
 *   src/kimi_cli/soul/toolset.py       load_mcp_tools(in_background=True): connecting in a
 *                                      background task; mcp_status_snapshot
 *   src/kimi_cli/soul/kimisoul.py      _agent_loop: a turn first waits for that task,
 *                                      announced by StatusUpdate(mcp_status), MCPLoadingBegin/End
 *   src/kimi_cli/wire/types.py         MCPLoadingBegin, MCPLoadingEnd, MCPStatusSnapshot
 *   src/kimi_cli/soul/approval.py      approvals: none under --yolo, else ApprovalRequest
 *   src/kimi_cli/config.py, llm.py     config.toml, model selection, KIMI_* overrides,
 *                                      capabilities (configured ∪ derived from the name)
 *   src/kimi_cli/tools/shell/          the Shell tool and its result messages
 *   src/kimi_cli/tools/file/read_media.py   ReadMediaFile, only with image_in or video_in
 *   src/kimi_cli/tools/ask_user/       AskUserQuestion: a QuestionRequest, then wait
 *   packages/kosong/src/kosong/chat_provider/kimi.py   the HTTP call and stream parsing
 *   openai-python _base_client.py      two client retries (408/409/429/5xx, connection),
 *                                      x-should-retry, "Error code: N - {…}" messages
 *
 * Like the real CLI, it makes every model call over HTTP: POST {base_url}/chat/completions
 * with `Authorization: Bearer <api_key>`, streamed. Only the model is fake (see
 * fake-model.ts, which tests run; under the host, requests reach it through NanoClaw's
 * model proxy). Not modelled: auto-compaction, subagents, slash commands, hooks, plan
 * mode tools. Test knobs: a user message "!crash" makes it exit 1 mid-turn, as a crashed
 * CLI would; KIMI_STUB_WIRE_PROTOCOL makes it report another protocol version;
 * KIMI_STUB_RETRY_WAIT_SCALE=<factor> shortens the waits between retries (not the
 * announced wait_s) for tests that only count attempts; KIMI_STUB_TRACE=<file> makes it append `<what> <epoch-ms>` lines as it starts (`start`),
 * answers `initialize`, has its MCP servers connected (`mcp-connected`) and takes a
 * `prompt`, so tests can see when the CLI started relative to the first prompt.
 */
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { createHash, randomUUID } from 'node:crypto';
import { appendFileSync, existsSync, mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';

/** The CLI version this double stands for; the Dockerfile pins the same (a test checks). */
export const KIMI_CLI_VERSION = '1.49.0';
/**
 * What 1.49.0 answers in initialize, whatever the client sent: the real CLI never compares
 * versions (wire/server.py _handle_initialize), and neither does this double. For tests
 * of a client's own check, KIMI_STUB_WIRE_PROTOCOL makes it report another.
 */
export const WIRE_PROTOCOL_VERSION = process.env.KIMI_STUB_WIRE_PROTOCOL || '1.10';

/** A retry's wait; KIMI_STUB_RETRY_WAIT_SCALE (a test knob) shortens every one by that factor, announcements unchanged. */
function retryWait(ms: number): Promise<void> {
  const scale = Number(process.env.KIMI_STUB_RETRY_WAIT_SCALE ?? 1);
  return Bun.sleep(ms * (scale >= 0 ? scale : 1));
}

/** The KIMI_STUB_TRACE knob: one `<what> <epoch-ms>` line per step of the CLI's life a test asks about. */
function trace(what: string): void {
  if (process.env.KIMI_STUB_TRACE) appendFileSync(process.env.KIMI_STUB_TRACE, `${what} ${Date.now()}\n`);
}

// ───────────────────────────── flags ─────────────────────────────

export interface CliArgs {
  session?: string;
  workDir: string;
  wire: boolean;
  model?: string;
  thinking?: boolean;
  yolo: boolean;
  agentFile?: string;
  /** --config-file: read instead of <share>/config.toml (cli/__init__.py: the file must exist). */
  configFile?: string;
  skillsDirs: string[];
  mcpConfigFiles: string[];
}

export class UsageError extends Error {}

/** The flags the real CLI has that matter here; anything else is a usage error (exit 2), as Typer does. */
export function parseArgs(argv: readonly string[], cwd = process.cwd()): CliArgs {
  const args: CliArgs = { workDir: cwd, wire: false, yolo: false, skillsDirs: [], mcpConfigFiles: [] };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i]!;
    const value = () => {
      const next = argv[++i];
      if (next === undefined) throw new UsageError(`Option '${flag}' requires an argument.`);
      return next;
    };
    switch (flag) {
      case '--session':
      case '--resume':
      case '-S':
      case '-r':
        args.session = value();
        break;
      case '--work-dir':
      case '-w':
        args.workDir = value();
        break;
      case '--wire':
        args.wire = true;
        break;
      case '--model':
      case '-m':
        args.model = value();
        break;
      case '--thinking':
        args.thinking = true;
        break;
      case '--no-thinking':
        args.thinking = false;
        break;
      case '--yolo':
      case '--yes':
      case '-y':
      case '--auto-approve':
        args.yolo = true;
        break;
      case '--agent-file':
        args.agentFile = value();
        break;
      case '--skills-dir':
        args.skillsDirs.push(value());
        break;
      case '--mcp-config-file':
        args.mcpConfigFiles.push(value());
        break;
      case '--config-file':
        args.configFile = value();
        break;
      default:
        throw new UsageError(`No such option: ${flag}`);
    }
  }
  args.workDir = resolve(cwd, args.workDir);
  if (!existsSync(args.workDir) || !statSync(args.workDir).isDirectory())
    throw new UsageError(`Invalid value for '--work-dir' / '-w': Directory '${args.workDir}' does not exist.`);
  if (args.agentFile !== undefined && !existsSync(args.agentFile))
    throw new UsageError(`Invalid value for '--agent-file': File '${args.agentFile}' does not exist.`);
  if (args.configFile !== undefined && (!existsSync(args.configFile) || !statSync(args.configFile).isFile()))
    throw new UsageError(`Invalid value for '--config-file': File '${args.configFile}' does not exist.`);
  return args;
}

// ───────────────────────────── configuration ─────────────────────────────

export type Capability = 'image_in' | 'video_in' | 'thinking' | 'always_thinking';

export interface Llm {
  baseUrl: string;
  apiKey: string;
  model: string;
  maxContextSize: number;
  capabilities: Set<Capability>;
}

interface ConfigFile {
  default_model?: string;
  providers?: Record<string, { type?: string; base_url?: string; api_key?: string }>;
  models?: Record<string, { provider?: string; model?: string; max_context_size?: number; capabilities?: string[] }>;
}

export const shareDir = (env: Record<string, string | undefined> = process.env) =>
  env.KIMI_SHARE_DIR || join(env.HOME || homedir(), '.kimi');

/** Capabilities the CLI adds by model name (llm.py derive_model_capabilities). */
export function derivedCapabilities(model: string): Capability[] {
  const name = model.toLowerCase();
  if (name.includes('thinking') || name.includes('reason')) return ['thinking', 'always_thinking'];
  if (name === 'kimi-for-coding' || name === 'kimi-code') return ['thinking', 'image_in', 'video_in'];
  return [];
}

/**
 * The model this run uses, or null ("LLM is not set"): --model must name a [models] key
 * (an unknown alias selects nothing), else default_model. For `kimi` providers the KIMI_*
 * variables override the file. An empty api_key still makes an LLM (requests then go
 * without a key and the server refuses them).
 */
export function selectLlm(
  config: ConfigFile,
  alias: string | undefined,
  env: Record<string, string | undefined>,
): Llm | null {
  const chosen = alias !== undefined ? (config.models?.[alias] ? alias : undefined) : config.default_model || undefined;
  const model = chosen ? config.models?.[chosen] : undefined;
  const provider = model?.provider ? config.providers?.[model.provider] : undefined;
  let baseUrl = provider?.base_url ?? '';
  let apiKey = provider?.api_key ?? '';
  let name = model?.model ?? '';
  let maxContextSize = model?.max_context_size ?? 100_000;
  let configured = (model?.capabilities ?? []) as Capability[];
  if ((provider?.type ?? 'kimi') === 'kimi') {
    baseUrl = env.KIMI_BASE_URL ?? baseUrl;
    apiKey = env.KIMI_API_KEY ?? apiKey;
    name = env.KIMI_MODEL_NAME ?? name;
    if (env.KIMI_MODEL_MAX_CONTEXT_SIZE) maxContextSize = Number(env.KIMI_MODEL_MAX_CONTEXT_SIZE);
    if (env.KIMI_MODEL_CAPABILITIES !== undefined)
      configured = env.KIMI_MODEL_CAPABILITIES.split(',')
        .map((c) => c.trim())
        .filter(Boolean) as Capability[];
  }
  if (!baseUrl || !name) return null;
  return {
    baseUrl,
    apiKey,
    model: name,
    maxContextSize,
    capabilities: new Set([...configured, ...derivedCapabilities(name)]),
  };
}

function readConfig(share: string, configFile?: string): ConfigFile {
  const file = configFile ?? join(share, 'config.toml');
  if (!existsSync(file)) return {};
  try {
    return Bun.TOML.parse(readFileSync(file, 'utf8')) as ConfigFile;
  } catch (err) {
    throw new Error(`Invalid configuration file ${file}: ${err instanceof Error ? err.message : err}`);
  }
}

// ───────────────────────────── the system prompt ─────────────────────────────

/** AGENTS.md files from the project root (nearest .git, else the work dir) down to the work dir. */
export function agentsMd(workDir: string): string {
  let root = workDir;
  for (let dir = workDir; ; dir = dirname(dir)) {
    if (existsSync(join(dir, '.git'))) {
      root = dir;
      break;
    }
    if (dirname(dir) === dir) break;
  }
  const dirs: string[] = [];
  for (let dir = workDir; ; dir = dirname(dir)) {
    dirs.unshift(dir);
    if (dir === root || dirname(dir) === dir) break;
  }
  const parts: string[] = [];
  for (const dir of dirs) {
    for (const name of ['.kimi/AGENTS.md', existsSync(join(dir, 'AGENTS.md')) ? 'AGENTS.md' : 'agents.md']) {
      const path = join(dir, name);
      if (!existsSync(path)) continue;
      const text = readFileSync(path, 'utf8').trim();
      if (text) parts.push(`<!-- From: ${path} -->\n${text}`);
    }
  }
  return parts.join('\n\n').slice(0, 32 * 1024);
}

/** The default agent's prompt with the agent file's arguments, rendered when the process starts. */
export function renderSystemPrompt(agentFile: string | undefined, workDir: string, now = new Date()): string {
  let role = '';
  if (agentFile) {
    const spec = Bun.YAML.parse(readFileSync(agentFile, 'utf8')) as {
      version?: unknown;
      agent?: { extend?: string; system_prompt_args?: Record<string, string> };
    };
    if (String(spec?.version) !== '1') throw new Error(`Unsupported agent spec version: ${String(spec?.version)}`);
    role = spec.agent?.system_prompt_args?.ROLE_ADDITIONAL ?? '';
  }
  return [
    "You are Kimi Code CLI, an interactive general AI agent running on a user's computer. (kimi-stub: a test double)",
    role,
    `The current date and time is ${now.toISOString()}. The current working directory is ${workDir}.`,
    agentsMd(workDir),
  ]
    .filter(Boolean)
    .join('\n\n');
}

// ───────────────────────────── the session on disk ─────────────────────────────

export const sessionDir = (share: string, workDir: string, sessionId: string) =>
  join(share, 'sessions', createHash('md5').update(workDir).digest('hex'), sessionId);

/**
 * The session's files: context.jsonl (first line `_system_prompt`, then the history),
 * wire.jsonl (a metadata line, then events) and state.json. As in CLI ≥ 1.21, the system
 * prompt is written once, when the session is created, and reused as stored whenever the
 * session is opened again — later changes to the agent file or AGENTS.md do not reach it.
 */
export class SessionFiles {
  readonly dir: string;
  readonly systemPrompt: string;

  constructor(
    share: string,
    workDir: string,
    readonly id: string,
    freshPrompt: string,
    yolo: boolean,
  ) {
    this.dir = sessionDir(share, workDir, id);
    mkdirSync(this.dir, { recursive: true });
    const stored = this.records()
      .filter((r) => r.role === '_system_prompt')
      .at(-1);
    this.systemPrompt = typeof stored?.content === 'string' ? stored.content : freshPrompt;
    // write_system_prompt: the first record; a history without one (a legacy session) gets it prepended.
    if (!stored) {
      const rest = existsSync(this.context) ? readFileSync(this.context, 'utf8') : '';
      writeFileSync(
        `${this.context}.tmp`,
        `${JSON.stringify({ role: '_system_prompt', content: freshPrompt })}\n${rest}`,
      );
      renameSync(`${this.context}.tmp`, this.context);
    }
    if (!existsSync(this.wire))
      writeFileSync(this.wire, `${JSON.stringify({ type: 'metadata', protocol_version: WIRE_PROTOCOL_VERSION })}\n`);
    if (!existsSync(join(this.dir, 'state.json'))) {
      writeFileSync(
        join(this.dir, 'state.json'),
        JSON.stringify(
          {
            version: 1,
            approval: { yolo, afk: false, auto_approve_actions: [] },
            additional_dirs: [],
            plan_mode: false,
            todos: [],
          },
          null,
          2,
        ),
      );
    }
    const registry = join(share, 'kimi.json');
    const known = existsSync(registry)
      ? (JSON.parse(readFileSync(registry, 'utf8')) as {
          work_dirs?: { path: string; kaos: string; last_session_id: string | null }[];
        })
      : {};
    const workDirs = (known.work_dirs ?? []).filter((w) => w.path !== workDir);
    writeFileSync(
      registry,
      JSON.stringify(
        { ...known, work_dirs: [...workDirs, { path: workDir, kaos: 'local', last_session_id: id }] },
        null,
        2,
      ),
    );
  }

  get context(): string {
    return join(this.dir, 'context.jsonl');
  }

  get wire(): string {
    return join(this.dir, 'wire.jsonl');
  }

  records(): { role?: string; content?: unknown; [key: string]: unknown }[] {
    if (!existsSync(this.context)) return [];
    return readFileSync(this.context, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((line) => JSON.parse(line));
  }

  /** The conversation so far, as chat messages (the model's view). */
  history(): ChatMessage[] {
    return this.records().filter(
      (r) => r.role === 'user' || r.role === 'assistant' || r.role === 'tool',
    ) as ChatMessage[];
  }

  append(...messages: ChatMessage[]): void {
    for (const message of messages) appendFileSync(this.context, `${JSON.stringify(message)}\n`);
  }

  recordEvent(type: string, payload: unknown): void {
    appendFileSync(this.wire, `${JSON.stringify({ timestamp: Date.now() / 1000, message: { type, payload } })}\n`);
  }
}

// ───────────────────────────── tools ─────────────────────────────

export interface ChatMessage {
  role: 'user' | 'assistant' | 'tool' | 'system';
  content?: unknown;
  tool_calls?: ToolCall[];
  tool_call_id?: string;
}

export interface ToolCall {
  type: 'function';
  id: string;
  function: { name: string; arguments: string };
}

/** A content part as kosong sends it: text, or media by URL (a data URL for local files). */
export type Part =
  | { type: 'text'; text: string }
  | { type: 'image_url'; image_url: { url: string } }
  | { type: 'video_url'; video_url: { url: string } };

interface ToolReturn {
  isError: boolean;
  output: string | Part[];
  message: string;
}

/** What a tool may ask of the client mid-call: an approval (unless yolo) or an answer to a question. */
interface ToolContext {
  callId: string;
  approve(action: string, description: string, display: unknown[]): Promise<boolean>;
  ask(questions: unknown[]): Promise<Record<string, string> | null>;
}

interface Tool {
  name: string;
  description: string;
  parameters: Record<string, unknown>;
  run(args: Record<string, unknown>, ctx: ToolContext): Promise<ToolReturn>;
}

/** How a tool's result reaches the model (soul/message.py): "<system>…</system>", then the output. */
export function toolResultContent(result: ToolReturn): string | Part[] {
  const head = result.isError
    ? `<system>ERROR: ${result.message}</system>`
    : result.message
      ? `<system>${result.message}</system>`
      : '';
  if (typeof result.output !== 'string')
    return [...(head ? [{ type: 'text' as const, text: head }] : []), ...result.output];
  if (!head && !result.output) return '<system>Tool output is empty.</system>';
  return [head, result.output].filter(Boolean).join('\n');
}

const REJECTED =
  'The tool call is rejected by the user. Stop what you are doing and wait for the user to tell you how to proceed.';

const MEDIA_TYPES: Record<string, { kind: 'image' | 'video'; mime: string }> = {
  jpg: { kind: 'image', mime: 'image/jpeg' },
  jpeg: { kind: 'image', mime: 'image/jpeg' },
  png: { kind: 'image', mime: 'image/png' },
  gif: { kind: 'image', mime: 'image/gif' },
  webp: { kind: 'image', mime: 'image/webp' },
  mp4: { kind: 'video', mime: 'video/mp4' },
};

function builtinTools(workDir: string, capabilities: ReadonlySet<Capability>, canAsk: boolean): Tool[] {
  const inWorkDir = (path: unknown) =>
    typeof path === 'string' ? (isAbsolute(path) ? path : join(workDir, path)) : '';
  const tools: Tool[] = [
    {
      name: 'Shell',
      description: 'Execute a bash command. Use it to run programs, inspect files and the system.',
      parameters: {
        type: 'object',
        properties: { command: { type: 'string' }, timeout: { type: 'integer', default: 60 } },
        required: ['command'],
      },
      async run(args, ctx) {
        const command = String(args.command ?? '');
        if (
          !(await ctx.approve('run command', `Run command \`${command}\``, [
            { type: 'shell', language: 'bash', command },
          ]))
        )
          return { isError: true, output: '', message: REJECTED };
        const timeoutS = Math.min(Math.max(Number(args.timeout) || 60, 1), 300);
        const proc = Bun.spawn(['bash', '-c', 'exec 2>&1; eval "$KIMI_STUB_COMMAND"'], {
          cwd: workDir,
          env: { ...process.env, KIMI_STUB_COMMAND: command },
          stdout: 'pipe',
          stderr: 'pipe',
        });
        const timer = setTimeout(() => proc.kill(), timeoutS * 1000);
        const output = await new Response(proc.stdout).text();
        const code = await proc.exited;
        clearTimeout(timer);
        return code === 0
          ? { isError: false, output, message: 'Command executed successfully.' }
          : { isError: true, output, message: `Command failed with exit code: ${code}.` };
      },
    },
    {
      name: 'ReadFile',
      description: 'Read a text file.',
      parameters: { type: 'object', properties: { path: { type: 'string' } }, required: ['path'] },
      async run(args) {
        try {
          return { isError: false, output: readFileSync(inWorkDir(args.path), 'utf8'), message: '' };
        } catch (err) {
          return {
            isError: true,
            output: '',
            message: `Failed to read ${String(args.path)}: ${err instanceof Error ? err.message : err}`,
          };
        }
      },
    },
    {
      name: 'WriteFile',
      description: 'Write a text file.',
      parameters: {
        type: 'object',
        properties: { path: { type: 'string' }, content: { type: 'string' } },
        required: ['path', 'content'],
      },
      async run(args, ctx) {
        if (!(await ctx.approve('edit file', `Write file \`${String(args.path)}\``, [])))
          return { isError: true, output: '', message: REJECTED };
        try {
          writeFileSync(inWorkDir(args.path), String(args.content ?? ''));
          return {
            isError: false,
            output: '',
            message: `File successfully overwritten. Current size: ${String(args.content ?? '').length} bytes.`,
          };
        } catch (err) {
          return {
            isError: true,
            output: '',
            message: `Failed to write ${String(args.path)}: ${err instanceof Error ? err.message : err}`,
          };
        }
      },
    },
  ];
  // tools/file/read_media.py: skipped (SkipThisTool) when the model has neither image_in nor video_in.
  if (capabilities.has('image_in') || capabilities.has('video_in')) {
    tools.push({
      name: 'ReadMediaFile',
      description: 'Read an image or video file so you can see it.',
      parameters: { type: 'object', properties: { path: { type: 'string' } }, required: ['path'] },
      async run(args) {
        const path = inWorkDir(args.path);
        const type = MEDIA_TYPES[path.split('.').pop()?.toLowerCase() ?? ''];
        if (!existsSync(path))
          return { isError: true, output: '', message: `\`${String(args.path)}\` does not exist.` };
        if (!type)
          return { isError: true, output: '', message: `\`${String(args.path)}\` is not an image or video file.` };
        if (!capabilities.has(type.kind === 'image' ? 'image_in' : 'video_in')) {
          return { isError: true, output: '', message: `The current model does not support ${type.kind} input.` };
        }
        const data = readFileSync(path);
        const url = `data:${type.mime};base64,${data.toString('base64')}`;
        const media: Part =
          type.kind === 'image' ? { type: 'image_url', image_url: { url } } : { type: 'video_url', video_url: { url } };
        return {
          isError: false,
          output: [
            { type: 'text', text: `<${type.kind} path="${path}">` },
            media,
            { type: 'text', text: `</${type.kind}>` },
          ],
          message: `Loaded ${type.kind} file \`${path}\` (${type.mime}, ${data.length} bytes).`,
        };
      },
    });
  }
  // tools/ask_user: offered only when the client said it can answer (initialize capabilities).
  if (canAsk) {
    tools.push({
      name: 'AskUserQuestion',
      description: 'Ask the user 1-4 questions with 2-4 options each, and wait for the answers.',
      parameters: {
        type: 'object',
        required: ['questions'],
        properties: {
          questions: {
            type: 'array',
            items: {
              type: 'object',
              properties: {
                question: { type: 'string' },
                header: { type: 'string' },
                options: { type: 'array' },
                multi_select: { type: 'boolean' },
              },
            },
          },
        },
      },
      async run(args, ctx) {
        const questions = (Array.isArray(args.questions) ? args.questions : []).map(
          (q: {
            question?: string;
            header?: string;
            options?: { label?: string; description?: string }[];
            multi_select?: boolean;
          }) => ({
            question: String(q.question ?? ''),
            header: String(q.header ?? ''),
            options: (q.options ?? []).map((o) => ({
              label: String(o.label ?? ''),
              description: String(o.description ?? ''),
            })),
            multi_select: Boolean(q.multi_select),
            body: null,
            other_label: null,
            other_description: null,
          }),
        );
        if (
          questions.length < 1 ||
          questions.length > 4 ||
          questions.some((q) => q.options.length < 2 || q.options.length > 4)
        ) {
          return { isError: true, output: '', message: 'questions: 1-4 questions with 2-4 options each' };
        }
        const answers = await ctx.ask(questions);
        if (!answers || Object.keys(answers).length === 0) {
          return {
            isError: false,
            output: '{"answers": {}, "note": "User dismissed the question without answering."}',
            message: 'User dismissed the question without answering.',
          };
        }
        return { isError: false, output: JSON.stringify({ answers }), message: 'User has answered.' };
      },
    });
  }
  return tools;
}

type McpServerStatus = 'pending' | 'connecting' | 'connected' | 'failed';

/**
 * MCP servers from mcp.json, connected in the background from the moment the process
 * starts — before initialize is even answered — as kimi-cli does outside its interactive
 * shell (load_agent → load_mcp_tools(in_background=True)); a turn waits for them first.
 */
class McpTools {
  private readonly clients: Client[] = [];
  readonly tools: Tool[] = [];
  readonly ready: Promise<void>;
  private loading = true;
  private readonly servers = new Map<string, { status: McpServerStatus; tools: string[] }>();

  constructor(configFiles: readonly string[]) {
    this.ready = this.connect(configFiles).finally(() => {
      this.loading = false;
    });
    this.ready.then(
      () => trace('mcp-connected'),
      () => {},
    ); // a failure is reported by the first prompt
  }

  /** Still connecting (toolset.py has_pending_mcp_tools). */
  get isLoading(): boolean {
    return this.loading;
  }

  /** toolset.py mcp_status_snapshot: null without servers. */
  snapshot(): {
    loading: boolean;
    connected: number;
    total: number;
    tools: number;
    servers: { name: string; status: McpServerStatus; tools: string[] }[];
  } | null {
    if (this.servers.size === 0) return null;
    const servers = [...this.servers].map(([name, info]) => ({ name, status: info.status, tools: [...info.tools] }));
    return {
      loading: this.loading,
      connected: servers.filter((s) => s.status === 'connected').length,
      total: servers.length,
      tools: servers.reduce((n, s) => n + s.tools.length, 0),
      servers,
    };
  }

  private async connect(configFiles: readonly string[]): Promise<void> {
    const failures: Record<string, string> = {};
    const specs: [string, { command: string; args?: string[]; env?: Record<string, string> }][] = [];
    for (const file of configFiles) {
      if (!existsSync(file)) continue;
      const { mcpServers = {} } = JSON.parse(readFileSync(file, 'utf8')) as {
        mcpServers?: Record<string, { command: string; args?: string[]; env?: Record<string, string> }>;
      };
      for (const entry of Object.entries(mcpServers)) {
        specs.push(entry);
        this.servers.set(entry[0], { status: 'pending', tools: [] });
      }
    }
    // All servers at once, as the CLI gathers them.
    await Promise.all(
      specs.map(async ([server, spec]) => {
        const info = this.servers.get(server)!;
        info.status = 'connecting';
        try {
          const client = new Client({ name: 'kimi-cli', version: KIMI_CLI_VERSION });
          await client.connect(
            new StdioClientTransport({
              command: spec.command,
              args: spec.args ?? [],
              env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', ...spec.env },
            }),
          );
          this.clients.push(client);
          const { tools } = await client.listTools();
          for (const tool of tools) {
            info.tools.push(tool.name);
            this.tools.push({
              name: tool.name,
              description: `This is an MCP (Model Context Protocol) tool from MCP server \`${server}\`.\n\n${tool.description ?? ''}`,
              parameters: tool.inputSchema as Record<string, unknown>,
              run: async (args, ctx) => {
                if (!(await ctx.approve(`mcp:${tool.name}`, `Call MCP tool \`${tool.name}\`.`, [])))
                  return { isError: true, output: '', message: REJECTED };
                const result = (await client.callTool({ name: tool.name, arguments: args })) as {
                  content?: { type: string; text?: string }[];
                  isError?: boolean;
                };
                const output = (result.content ?? [])
                  .filter((c) => c.type === 'text')
                  .map((c) => c.text)
                  .join('\n');
                return {
                  isError: Boolean(result.isError),
                  output,
                  message: result.isError ? 'Tool execution failed.' : '',
                };
              },
            });
          }
          info.status = 'connected';
        } catch (err) {
          info.status = 'failed';
          failures[server] = err instanceof Error ? err.message : String(err);
        }
      }),
    );
    if (Object.keys(failures).length)
      throw new Error(`MCPRuntimeError: Failed to connect MCP servers: ${JSON.stringify(failures)}`);
  }

  async close(): Promise<void> {
    await Promise.all(this.clients.map((c) => c.close().catch(() => {})));
  }
}

// ───────────────────────────── the model call ─────────────────────────────

/** A JSON value as Python's repr() shows it: what openai-python puts into "Error code: N - …". */
export function pythonRepr(value: unknown): string {
  if (value === null || value === undefined) return 'None';
  if (value === true) return 'True';
  if (value === false) return 'False';
  if (typeof value === 'number') return String(value);
  if (typeof value === 'string') {
    const quote = value.includes("'") && !value.includes('"') ? '"' : "'";
    return `${quote}${value.replace(/\\/g, '\\\\').replace(new RegExp(quote, 'g'), `\\${quote}`).replace(/\n/g, '\\n')}${quote}`;
  }
  if (Array.isArray(value)) return `[${value.map(pythonRepr).join(', ')}]`;
  return `{${Object.entries(value as Record<string, unknown>)
    .map(([k, v]) => `${pythonRepr(k)}: ${pythonRepr(v)}`)
    .join(', ')}}`;
}

/** A failed model call; `retryable` as the CLI's own retry loop decides (429, 500, 502, 503, 504, empty, connection). */
export class ProviderError extends Error {
  constructor(
    message: string,
    readonly status: number | null,
    readonly retryable: boolean,
    readonly errorType: 'APIStatusError' | 'APIConnectionError' | 'APIEmptyResponseError' | 'ChatProviderError',
  ) {
    super(message);
  }
}

/** Attempts of the CLI's loop per step (loop_control.max_retries_per_step), and openai-python's own retries inside each. */
export const MAX_ATTEMPTS_PER_STEP = 3;
export const CLIENT_RETRIES = 2;

/** openai-python's backoff before retry n (from 0), in ms; see postWithClientRetries. */
const clientBackoffMs = (retry: number) => Math.min(0.5 * 2 ** retry, 8) * (1 - 0.25 * Math.random()) * 1000;

/**
 * One HTTP request the way openai-python makes it: 408, 409, 429, 5xx and connection
 * errors are retried twice (backoff 0.5·2ⁿ s, at most 8, minus up to a quarter; a
 * retry-after of up to 60 s is honoured), unless the server says `x-should-retry: false`.
 */
async function postWithClientRetries(url: string, init: RequestInit, signal: AbortSignal): Promise<Response> {
  for (let retry = 0; ; retry++) {
    let response: Response;
    try {
      response = await fetch(url, { ...init, signal });
    } catch (err) {
      if (signal.aborted) throw err;
      if (retry < CLIENT_RETRIES) {
        await retryWait(clientBackoffMs(retry));
        continue;
      }
      throw new ProviderError('Connection error.', null, true, 'APIConnectionError');
    }
    if (response.ok) return response;
    const header = response.headers.get('x-should-retry');
    const status = response.status;
    const clientRetries =
      header === 'true' ||
      (header !== 'false' && (status === 408 || status === 409 || status === 429 || status >= 500));
    if (clientRetries && retry < CLIENT_RETRIES) {
      const after =
        Number(response.headers.get('retry-after-ms')) || Number(response.headers.get('retry-after')) * 1000 || 0;
      await response.body?.cancel();
      await retryWait(after > 0 && after <= 60_000 ? after : clientBackoffMs(retry));
      continue;
    }
    throw new ProviderError(
      await statusErrorMessage(response),
      status,
      [429, 500, 502, 503, 504].includes(status),
      'APIStatusError',
    );
  }
}

/** openai-python's message for an HTTP error: "Error code: 429 - {'error': …}". */
export async function statusErrorMessage(response: Response): Promise<string> {
  const text = await response.text();
  if (!text) return `Error code: ${response.status}`;
  try {
    return `Error code: ${response.status} - ${pythonRepr(JSON.parse(text))}`;
  } catch {
    return `Error code: ${response.status} - ${text}`;
  }
}

interface StepOutput {
  text: string;
  toolCalls: ToolCall[];
  usage: { prompt_tokens?: number; completion_tokens?: number; cached_tokens?: number } | null;
  messageId: string | null;
}

/** One streamed completion; every delta becomes its own event, as on the real wire. */
async function streamCompletion(
  llm: Llm,
  body: Record<string, unknown>,
  emit: (type: string, payload: unknown) => void,
  signal: AbortSignal,
): Promise<StepOutput> {
  const headers: Record<string, string> = {
    'content-type': 'application/json',
    'user-agent': `KimiCLI/${KIMI_CLI_VERSION}`,
  };
  if (llm.apiKey) headers.authorization = `Bearer ${llm.apiKey}`; // an empty key sends none
  const response = await postWithClientRetries(
    `${llm.baseUrl.replace(/\/+$/, '')}/chat/completions`,
    { method: 'POST', headers, body: JSON.stringify(body) },
    signal,
  );
  const out: StepOutput = { text: '', toolCalls: [], usage: null, messageId: null };
  const decoder = new TextDecoder();
  let buffer = '';
  for await (const chunk of response.body!) {
    buffer += decoder.decode(chunk, { stream: true });
    for (let newline = buffer.indexOf('\n'); newline >= 0; newline = buffer.indexOf('\n')) {
      const line = buffer.slice(0, newline).trim();
      buffer = buffer.slice(newline + 1);
      const data = /^data:\s*(.*)$/.exec(line)?.[1];
      if (!data || data === '[DONE]') continue;
      const parsed = JSON.parse(data) as {
        id?: string;
        error?: { message?: string };
        usage?: StepOutput['usage'];
        choices?: {
          delta?: {
            content?: string;
            reasoning_content?: string;
            tool_calls?: { id?: string; function?: { name?: string; arguments?: string } }[];
          };
          usage?: StepOutput['usage'];
        }[];
      };
      if (parsed.error)
        throw new ProviderError(
          `Error: ${parsed.error.message ?? JSON.stringify(parsed.error)}`,
          null,
          false,
          'ChatProviderError',
        );
      if (parsed.id) out.messageId = parsed.id;
      out.usage = parsed.usage ?? parsed.choices?.[0]?.usage ?? out.usage;
      const delta = parsed.choices?.[0]?.delta;
      if (!delta) continue;
      if (typeof delta.reasoning_content === 'string')
        emit('ContentPart', { type: 'think', think: delta.reasoning_content, encrypted: null });
      if (delta.content) {
        out.text += delta.content;
        emit('ContentPart', { type: 'text', text: delta.content });
      }
      for (const call of delta.tool_calls ?? []) {
        if (call.function?.name) {
          const toolCall: ToolCall = {
            type: 'function',
            id: call.id ?? randomUUID(),
            function: { name: call.function.name, arguments: call.function.arguments ?? '' },
          };
          out.toolCalls.push(toolCall);
          emit('ToolCall', { ...toolCall, extras: null });
        } else if (call.function?.arguments && out.toolCalls.length) {
          out.toolCalls.at(-1)!.function.arguments += call.function.arguments;
          emit('ToolCallPart', { arguments_part: call.function.arguments });
        }
      }
    }
  }
  if (!out.text && out.toolCalls.length === 0)
    throw new ProviderError('The API returned an empty response.', null, true, 'APIEmptyResponseError');
  return out;
}

// ───────────────────────────── the wire server ─────────────────────────────

/** JSON-RPC errors as the real server sends them (wire/jsonrpc.py). */
export const ErrorCode = {
  PARSE_ERROR: -32700,
  INVALID_REQUEST: -32600,
  METHOD_NOT_FOUND: -32601,
  INVALID_PARAMS: -32602,
  INTERNAL_ERROR: -32603,
  INVALID_STATE: -32000,
  LLM_NOT_SET: -32001,
  LLM_NOT_SUPPORTED: -32002,
  CHAT_PROVIDER_ERROR: -32003,
} as const;

class RpcError extends Error {
  constructor(
    readonly code: number,
    message: string,
  ) {
    super(message);
  }
}

const SLASH_COMMANDS = [
  { name: 'init', description: 'Analyze the codebase and generate an `AGENTS.md` file', aliases: [] },
  { name: 'compact', description: 'Compact the context', aliases: [] },
  { name: 'clear', description: 'Clear the context', aliases: ['reset'] },
  { name: 'yolo', description: 'Toggle YOLO mode (auto-approve all actions)', aliases: [] },
];

interface Turn {
  steers: string[];
  abort: AbortController;
  /** A tool call was rejected without feedback: the root turn ends after this step. */
  stop: boolean;
}

/** Media parts a prompt carries (user input may be a part list). */
function mediaKinds(input: unknown): Set<'image' | 'video'> {
  const kinds = new Set<'image' | 'video'>();
  if (Array.isArray(input)) {
    for (const part of input as { type?: string }[]) {
      if (part?.type === 'image_url') kinds.add('image');
      if (part?.type === 'video_url') kinds.add('video');
    }
  }
  return kinds;
}

export async function serveWire(args: CliArgs, env: Record<string, string | undefined> = process.env): Promise<void> {
  const share = shareDir(env);
  mkdirSync(share, { recursive: true });
  const llm = selectLlm(readConfig(share, args.configFile), args.model, env);
  const sessionId = args.session ?? randomUUID();
  const session = new SessionFiles(
    share,
    args.workDir,
    sessionId,
    renderSystemPrompt(args.agentFile, args.workDir),
    args.yolo,
  );
  const mcpFiles = args.mcpConfigFiles.length ? args.mcpConfigFiles : [join(share, 'mcp.json')];
  trace('start');
  const mcp = new McpTools(mcpFiles);
  let initialized = false;
  let supportsQuestion = false;
  const tools = () => [...builtinTools(args.workDir, llm?.capabilities ?? new Set(), supportsQuestion), ...mcp.tools];
  /** Requests to the client (approvals, questions), answered by its responses, matched by id. */
  const pending = new Map<string, (response: { result?: unknown; error?: unknown }) => void>();
  const approvedForSession = new Set<string>();

  const send = (message: Record<string, unknown>) =>
    process.stdout.write(`${JSON.stringify({ jsonrpc: '2.0', ...message })}\n`);
  const emit = (type: string, payload: unknown) => {
    send({ method: 'event', params: { type, payload } });
    session.recordEvent(type, payload);
  };
  const fail = (id: string | null, code: number, message: string) => send({ id, error: { code, message, data: null } });
  let turn: Turn | null = null;

  /** Sends a request and waits (forever, as the CLI does) for the client's response. */
  const request = (type: string, payload: { id: string }) =>
    new Promise<{ result?: unknown; error?: unknown }>((resolve) => {
      pending.set(payload.id, resolve);
      // Before initialize the CLI drops approval requests (server.py _root_hub_loop): nothing answers them.
      if (initialized || type !== 'ApprovalRequest')
        send({ method: 'request', id: payload.id, params: { type, payload } });
    });

  const contextFor = (call: ToolCall, current: Turn): ToolContext => ({
    callId: call.id,
    approve: async (action, description, display) => {
      if (args.yolo || approvedForSession.has(action)) return true; // yolo: no request at all (soul/approval.py)
      const id = randomUUID();
      const { result } = await request('ApprovalRequest', {
        id,
        tool_call_id: call.id,
        sender: call.function.name,
        action,
        description,
        source_kind: 'foreground_turn',
        source_id: null,
        agent_id: null,
        subagent_type: null,
        source_description: null,
        display,
      } as { id: string });
      const answer = result as { response?: string; feedback?: string } | undefined;
      const response =
        answer?.response === 'approve' || answer?.response === 'approve_for_session' ? answer.response : 'reject';
      emit('ApprovalResponse', { request_id: id, response, feedback: answer?.feedback ?? null });
      if (response === 'approve_for_session') approvedForSession.add(action);
      if (response === 'reject' && !answer?.feedback) current.stop = true;
      return response !== 'reject';
    },
    ask: async (questions) => {
      const id = randomUUID();
      const { result } = await request('QuestionRequest', { id, tool_call_id: call.id, questions } as { id: string });
      const answers = (result as { answers?: Record<string, string> } | undefined)?.answers;
      return answers && typeof answers === 'object' ? answers : null;
    },
  });

  async function runTurn(userInput: unknown, current: Turn): Promise<Record<string, unknown>> {
    emit('TurnBegin', { user_input: userInput });
    try {
      if (!llm) throw new RpcError(ErrorCode.LLM_NOT_SET, 'LLM is not set');
      for (const kind of mediaKinds(userInput)) {
        const needed = kind === 'image' ? 'image_in' : 'video_in';
        if (!llm.capabilities.has(needed))
          throw new RpcError(
            ErrorCode.LLM_NOT_SUPPORTED,
            `LLM model '${llm.model}' does not support required capability: ${needed}.`,
          );
      }
      // kimisoul.py _agent_loop: MCP servers still connecting are waited for, and announced.
      const loading = mcp.isLoading && mcp.snapshot() !== null;
      if (loading) {
        emit('StatusUpdate', { mcp_status: mcp.snapshot() });
        emit('MCPLoadingBegin', {});
      }
      try {
        await mcp.ready;
      } catch (err) {
        throw new RpcError(ErrorCode.INTERNAL_ERROR, err instanceof Error ? err.message : String(err));
      } finally {
        if (loading) {
          emit('StatusUpdate', { mcp_status: mcp.snapshot() });
          emit('MCPLoadingEnd', {});
        }
      }
      const inputText = typeof userInput === 'string' ? userInput : JSON.stringify(userInput);
      if (/(^|\n)\s*(<message[^>]*>)?(@\S+\s+)?!crash\b/.test(inputText)) {
        process.stderr.write('kimi-stub: crashing as asked\n');
        process.exit(1);
      }
      session.append({ role: 'user', content: userInput });
      for (let step = 1; ; step++) {
        emit('StepBegin', { n: step });
        const body = {
          model: llm.model,
          messages: [{ role: 'system', content: session.systemPrompt }, ...session.history()],
          tools: tools().map((t) => ({
            type: 'function',
            function: { name: t.name, description: t.description, parameters: t.parameters },
          })),
          stream: true,
          stream_options: { include_usage: true },
          prompt_cache_key: sessionId,
          max_completion_tokens: llm.maxContextSize,
          thinking: { type: args.thinking && llm.capabilities.has('thinking') ? 'enabled' : 'disabled' },
        };
        let output: StepOutput | null = null;
        for (let attempt = 1; !output; attempt++) {
          try {
            output = await streamCompletion(llm, body, emit, current.abort.signal);
          } catch (err) {
            if (current.abort.signal.aborted) return { status: 'cancelled' };
            const retry = err instanceof ProviderError && err.retryable && attempt < MAX_ATTEMPTS_PER_STEP;
            if (retry) {
              // tenacity wait_exponential_jitter(initial=0.3, max=5, jitter=0.5), announced by StepRetry
              const waitS = Math.min(5, 0.3 * 2 ** (attempt - 1) + Math.random() * 0.5);
              emit('StepRetry', {
                n: step,
                next_attempt: attempt + 1,
                max_attempts: MAX_ATTEMPTS_PER_STEP,
                wait_s: waitS,
                error_type: err.errorType,
                status_code: err.status,
              });
              await retryWait(waitS * 1000);
              continue;
            }
            emit('StepInterrupted', {});
            throw new RpcError(ErrorCode.CHAT_PROVIDER_ERROR, err instanceof Error ? err.message : String(err));
          }
        }
        const input = output.usage?.prompt_tokens ?? null;
        const cached = output.usage?.cached_tokens ?? 0;
        emit('StatusUpdate', {
          context_usage: input === null ? null : input / llm.maxContextSize,
          context_tokens: input,
          max_context_tokens: input === null ? null : llm.maxContextSize,
          token_usage: output.usage
            ? {
                input_other: (input ?? 0) - cached,
                output: output.usage.completion_tokens ?? 0,
                input_cache_read: cached,
                input_cache_creation: 0,
              }
            : null,
          message_id: output.messageId,
          plan_mode: false,
          mcp_status: null,
        });
        const assistant: ChatMessage = {
          role: 'assistant',
          content: output.text,
          ...(output.toolCalls.length ? { tool_calls: output.toolCalls } : {}),
        };
        const results: ChatMessage[] = [];
        for (const call of output.toolCalls) {
          const tool = tools().find((t) => t.name === call.function.name);
          let result: ToolReturn;
          if (!tool) {
            result = { isError: true, output: '', message: `Tool \`${call.function.name}\` not found` };
          } else {
            let parsed: Record<string, unknown> = {};
            try {
              parsed = call.function.arguments ? (JSON.parse(call.function.arguments) as Record<string, unknown>) : {};
              result = await tool.run(parsed, contextFor(call, current));
            } catch (err) {
              result = {
                isError: true,
                output: '',
                message: `Error parsing or running the tool: ${err instanceof Error ? err.message : err}`,
              };
            }
          }
          emit('ToolResult', {
            tool_call_id: call.id,
            return_value: {
              is_error: result.isError,
              output: result.output,
              message: result.message,
              display: [],
              extras: null,
            },
          });
          if (current.stop) break;
          results.push({ role: 'tool', content: toolResultContent(result), tool_call_id: call.id });
        }
        session.append(assistant, ...results);
        if (current.abort.signal.aborted) return { status: 'cancelled' };
        if (current.stop) return { status: 'finished' };
        const steered = current.steers.splice(0);
        for (const text of steered) {
          session.append({ role: 'user', content: text });
          emit('SteerInput', { user_input: text });
        }
        if (output.toolCalls.length === 0 && steered.length === 0) return { status: 'finished' };
      }
    } finally {
      emit('TurnEnd', {});
    }
  }

  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let message: { jsonrpc?: unknown; id?: unknown; method?: unknown; params?: Record<string, unknown> };
    try {
      message = JSON.parse(line);
    } catch {
      fail(null, ErrorCode.PARSE_ERROR, 'Invalid JSON format');
      continue;
    }
    if (
      message === null ||
      typeof message !== 'object' ||
      message.jsonrpc !== '2.0' ||
      (message.id !== undefined && typeof message.id !== 'string')
    ) {
      fail(null, ErrorCode.INVALID_REQUEST, 'Invalid request');
      continue;
    }
    if (message.method === undefined) {
      // A response to one of our requests: its id is the request's.
      const answer = typeof message.id === 'string' ? pending.get(message.id) : undefined;
      if (answer) {
        pending.delete(message.id as string);
        answer({ result: (message as { result?: unknown }).result, error: (message as { error?: unknown }).error });
      }
      continue;
    }
    const id = (message.id as string | undefined) ?? null;
    const params = message.params ?? {};
    const reply = (work: () => Promise<unknown> | unknown) => {
      void (async () => {
        try {
          const result = await work();
          if (id !== null) send({ id, result });
        } catch (err) {
          const code = err instanceof RpcError ? err.code : ErrorCode.INTERNAL_ERROR;
          if (id !== null)
            fail(
              id,
              code,
              err instanceof RpcError
                ? err.message
                : `${err instanceof Error ? err.name : 'Error'}: ${err instanceof Error ? err.message : err}`,
            );
        }
      })();
    };
    switch (message.method) {
      case 'initialize':
        reply(() => {
          if (typeof params.protocol_version !== 'string')
            throw new RpcError(ErrorCode.INVALID_PARAMS, 'Invalid parameters for method `initialize`');
          if (turn) throw new RpcError(ErrorCode.INVALID_STATE, 'An agent turn is already in progress');
          initialized = true;
          trace('initialize');
          supportsQuestion =
            (params.capabilities as { supports_question?: unknown } | undefined)?.supports_question === true;
          return {
            protocol_version: WIRE_PROTOCOL_VERSION,
            server: { name: 'Kimi Code CLI', version: KIMI_CLI_VERSION },
            slash_commands: SLASH_COMMANDS,
            hooks: { supported_events: [], configured: {} },
            capabilities: { supports_question: true },
          };
        });
        break;
      case 'prompt':
        reply(async () => {
          if (params.user_input === undefined)
            throw new RpcError(ErrorCode.INVALID_PARAMS, 'Invalid parameters for method `prompt`');
          if (turn) throw new RpcError(ErrorCode.INVALID_STATE, 'An agent turn is already in progress');
          trace('prompt');
          const current: Turn = { steers: [], abort: new AbortController(), stop: false };
          turn = current;
          try {
            return await runTurn(params.user_input, current);
          } finally {
            turn = null;
          }
        });
        break;
      case 'steer':
        reply(() => {
          if (!turn) throw new RpcError(ErrorCode.INVALID_STATE, 'No agent turn is in progress');
          turn.steers.push(
            typeof params.user_input === 'string' ? params.user_input : JSON.stringify(params.user_input),
          );
          return { status: 'steered' };
        });
        break;
      case 'cancel':
        reply(() => {
          if (!turn) throw new RpcError(ErrorCode.INVALID_STATE, 'No agent turn is in progress');
          turn.abort.abort();
          return {};
        });
        break;
      case 'set_plan_mode':
        reply(() => ({ status: 'ok', plan_mode: Boolean(params.enabled) }));
        break;
      default:
        if (id !== null) fail(id, ErrorCode.METHOD_NOT_FOUND, `Unexpected method received: ${String(message.method)}`);
    }
  }
  await mcp.close();
}

if (import.meta.main) {
  const argv = process.argv.slice(2);
  if (argv.includes('--version') || argv.includes('-V')) {
    console.log(`kimi, version ${KIMI_CLI_VERSION}`);
  } else if (argv[0] === 'info') {
    console.log(
      `kimi-cli version: ${KIMI_CLI_VERSION}\nagent spec versions: 1\nwire protocol: ${WIRE_PROTOCOL_VERSION}\npython version: (none: kimi-stub, a test double on Bun ${Bun.version})`,
    );
  } else {
    let args: CliArgs;
    try {
      args = parseArgs(argv);
      if (!args.wire) throw new UsageError('kimi-stub only serves the wire protocol (--wire)');
    } catch (err) {
      process.stderr.write(
        `Usage: kimi [OPTIONS] COMMAND [ARGS]...\nTry 'kimi -h' for help.\n\nError: ${err instanceof Error ? err.message : err}\n`,
      );
      process.exit(2);
    }
    try {
      await serveWire(args);
    } catch (err) {
      process.stderr.write(
        `${err instanceof Error ? err.message : err}\nSee logs: ${join(shareDir(), 'logs', 'kimi.log')}\n`,
      );
      process.exit(1);
    }
  }
}
