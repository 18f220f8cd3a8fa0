#!/usr/bin/env bun
/**
 * A stand-in for the `kimi` CLI that speaks its wire protocol (JSON-RPC 2.0, one JSON
 * object per line on stdin/stdout) so the real Kimi Agent SDK can drive it in tests.
 * Only the model is fake; the rest behaves like the CLI:
 *
 *  - flags: --session ID --work-dir DIR --wire [--model M] [--thinking|--no-thinking]
 *    [--yolo] [--agent-file F] [--skills-dir D]; also `kimi --version` and `kimi info`;
 *  - reads ~/.kimi/config.toml: without an API key for the model's provider (or
 *    KIMI_API_KEY in the environment) a prompt fails with -32001 "LLM is not set";
 *  - reads the agent file (YAML) and takes ROLE_ADDITIONAL as its system prompt;
 *  - reads ~/.kimi/mcp.json and starts those servers as a real MCP client;
 *  - keeps each session's history in ~/.kimi/sessions/<md5 of work dir>/<session id>/.
 *
 * The "model" answers the user text: the last <message> of the prompt (its @Name trigger
 * dropped), or else the prompt without leading "[…]" note lines:
 *   anything            → "[stub] <text>"
 *   !tool NAME {json}   → calls that MCP tool, answers with its text result
 *   !fail TEXT          → the prompt fails with JSON-RPC error -32003 TEXT
 *   !sleep MS           → waits, then "[stub] slept MS" (+ " [steered: …]" for steered input)
 *   !crash              → exits 1 in the middle of the turn
 *   !context            → answers with the system prompt it received
 *   !session            → answers with its session id
 */
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { createHash } from 'node:crypto';
import { appendFileSync, existsSync, mkdirSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

export const STUB_VERSION = '0.0.0-stub';

export interface CliArgs {
  session?: string;
  workDir: string;
  wire: boolean;
  model?: string;
  agentFile?: string;
  yolo: boolean;
}

export function parseArgs(argv: string[]): CliArgs {
  const args: CliArgs = { workDir: process.cwd(), wire: false, yolo: false };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => argv[++i];
    if (flag === '--session') args.session = value();
    else if (flag === '--work-dir') args.workDir = value()!;
    else if (flag === '--wire') args.wire = true;
    else if (flag === '--model') args.model = value();
    else if (flag === '--agent-file') args.agentFile = value();
    else if (flag === '--skills-dir') value();
    else if (flag === '--yolo') args.yolo = true;
  }
  return args;
}

/** The text the stub's "model" reacts to. */
export function userText(prompt: string): string {
  const messages = [...prompt.matchAll(/<message\b[^>]*>([\s\S]*?)<\/message>/g)];
  if (messages.length) {
    const last = messages.at(-1)![1]!.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&quot;/g, '"').replace(/&amp;/g, '&');
    return last.trim().replace(/^@\S+\s+/, '');
  }
  const lines = prompt.trim().split('\n');
  while (lines.length > 1 && (lines[0]!.startsWith('[') || lines[0]!.trim() === '')) lines.shift();
  return lines.join('\n').trim();
}

type Config = { default_model?: string; providers?: Record<string, { api_key?: string }>; models?: Record<string, { provider?: string }> };

export function hasLlm(config: Config, model: string | undefined, env: Record<string, string | undefined>): boolean {
  if (env.KIMI_API_KEY) return true;
  const alias = model ?? config.default_model;
  const provider = alias ? config.models?.[alias]?.provider : undefined;
  return Boolean(provider && config.providers?.[provider]?.api_key);
}

class RpcError extends Error {
  constructor(readonly code: number, message: string) {
    super(message);
  }
}

const kimiHome = () => join(process.env.KIMI_SHARE_DIR ?? join(process.env.HOME ?? homedir(), '.kimi'));

function readConfig(): Config {
  const file = join(kimiHome(), 'config.toml');
  return existsSync(file) ? (Bun.TOML.parse(readFileSync(file, 'utf8')) as Config) : {};
}

function readSystemPrompt(agentFile: string | undefined): string {
  if (!agentFile || !existsSync(agentFile)) return '';
  const spec = Bun.YAML.parse(readFileSync(agentFile, 'utf8')) as { agent?: { system_prompt_args?: { ROLE_ADDITIONAL?: string } } };
  return spec?.agent?.system_prompt_args?.ROLE_ADDITIONAL ?? '';
}

/** MCP servers from mcp.json, started on first use and kept for the session. */
class McpServers {
  private readonly clients = new Map<string, Client>();

  async call(tool: string, args: Record<string, unknown>): Promise<string> {
    await this.connectAll();
    for (const client of this.clients.values()) {
      const { tools } = await client.listTools();
      if (!tools.some((t) => t.name === tool)) continue;
      const result = (await client.callTool({ name: tool, arguments: args })) as { content?: { type: string; text?: string }[]; isError?: boolean };
      const body = (result.content ?? []).filter((c) => c.type === 'text').map((c) => c.text).join('\n');
      return result.isError ? `tool error: ${body}` : body;
    }
    return `tool error: no MCP server offers "${tool}"`;
  }

  private async connectAll(): Promise<void> {
    if (this.clients.size) return;
    const file = join(kimiHome(), 'mcp.json');
    if (!existsSync(file)) return;
    const { mcpServers = {} } = JSON.parse(readFileSync(file, 'utf8')) as { mcpServers?: Record<string, { command: string; args?: string[]; env?: Record<string, string> }> };
    for (const [name, spec] of Object.entries(mcpServers)) {
      const client = new Client({ name: 'kimi-stub', version: STUB_VERSION });
      await client.connect(new StdioClientTransport({ command: spec.command, args: spec.args ?? [], env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', ...spec.env } }));
      this.clients.set(name, client);
    }
  }

  async close(): Promise<void> {
    await Promise.all([...this.clients.values()].map((c) => c.close().catch(() => {})));
  }
}

async function wire(args: CliArgs): Promise<void> {
  const sessionId = args.session ?? crypto.randomUUID();
  const sessionDir = join(kimiHome(), 'sessions', createHash('md5').update(args.workDir).digest('hex'), sessionId);
  mkdirSync(sessionDir, { recursive: true });
  const history = join(sessionDir, 'context.jsonl');
  const systemPrompt = readSystemPrompt(args.agentFile);
  const mcp = new McpServers();
  const send = (message: Record<string, unknown>) => process.stdout.write(`${JSON.stringify({ jsonrpc: '2.0', ...message })}\n`);
  const event = (type: string, payload: Record<string, unknown>) => send({ method: 'event', params: { type, payload } });
  let steered: string[] = [];
  let cancel: (() => void) | null = null;

  async function think(text: string): Promise<string> {
    const [command = '', ...rest] = text.split(' ');
    const argText = rest.join(' ').trim();
    switch (command) {
      case '!fail':
        throw new RpcError(-32003, argText || 'provider error');
      case '!crash':
        process.stderr.write('kimi-stub: crashing as asked\n');
        process.exit(1);
      case '!sleep': {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, Number(argText) || 0);
          cancel = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        cancel = null;
        return `[stub] slept ${argText}${steered.length ? ` [steered: ${steered.join(' | ')}]` : ''}`;
      }
      case '!context':
        return systemPrompt || '(no system prompt)';
      case '!session':
        return `[stub] ${sessionId}`;
      case '!tool': {
        const name = rest[0] ?? '';
        const json = rest.slice(1).join(' ').trim();
        let toolArgs: Record<string, unknown> = {};
        try {
          toolArgs = json ? (JSON.parse(json) as Record<string, unknown>) : {};
        } catch {
          return `tool error: arguments are not JSON: ${json}`;
        }
        const callId = `call_${Date.now()}`;
        event('ToolCall', { type: 'function', id: callId, function: { name, arguments: JSON.stringify(toolArgs) } });
        const output = await mcp.call(name, toolArgs);
        event('ToolResult', { tool_call_id: callId, return_value: { is_error: output.startsWith('tool error'), output, message: '', display: [] } });
        return output;
      }
      default:
        return `[stub] ${text}`;
    }
  }

  async function prompt(userInput: unknown): Promise<Record<string, unknown>> {
    if (!hasLlm(readConfig(), args.model, process.env)) throw new RpcError(-32001, 'LLM is not set');
    const input = typeof userInput === 'string' ? userInput : JSON.stringify(userInput);
    steered = [];
    event('TurnBegin', { user_input: input });
    event('StepBegin', { n: 1 });
    const reply = await think(userText(input));
    appendFileSync(history, `${JSON.stringify({ role: 'user', content: input })}\n${JSON.stringify({ role: 'assistant', content: reply })}\n`);
    event('ContentPart', { type: 'text', text: reply });
    event('StatusUpdate', { context_usage: 0.01 });
    event('TurnEnd', {});
    return { status: 'finished' };
  }

  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let request: { id?: string | number; method?: string; params?: Record<string, unknown> };
    try {
      request = JSON.parse(line);
    } catch {
      send({ id: null, error: { code: -32700, message: 'Parse error' } });
      continue;
    }
    const { id, method, params = {} } = request;
    if (!method) continue; // a response to a request of ours: the stub makes none
    const reply = (work: Promise<unknown> | unknown) =>
      Promise.resolve(work).then(
        (result) => send({ id, result }),
        (err) => send({ id, error: { code: err instanceof RpcError ? err.code : -32603, message: err instanceof Error ? err.message : String(err) } }),
      );
    switch (method) {
      case 'initialize':
        void reply({ protocol_version: String(params.protocol_version ?? '1.7'), server: { name: 'kimi-stub', version: STUB_VERSION }, slash_commands: [] });
        break;
      case 'prompt':
        void reply(prompt(params.user_input));
        break;
      case 'steer': {
        const text = typeof params.user_input === 'string' ? params.user_input : JSON.stringify(params.user_input);
        steered.push(userText(text));
        event('SteerInput', { user_input: text });
        void reply({});
        break;
      }
      case 'cancel':
        (cancel as (() => void) | null)?.();
        void reply({});
        break;
      default:
        void reply(Promise.reject(new RpcError(-32601, `Method not found: ${method}`)));
    }
  }
  await mcp.close();
}

if (import.meta.main) {
  const argv = process.argv.slice(2);
  if (argv.includes('--version') || argv[0] === '-V') {
    console.log(STUB_VERSION);
  } else if (argv[0] === 'info') {
    console.log(`kimi-stub ${STUB_VERSION} (wire protocol 1.7; a test double of the Kimi CLI, no model)`);
  } else {
    const args = parseArgs(argv);
    if (!args.wire) {
      console.error('kimi-stub only speaks the wire protocol (--wire)');
      process.exit(2);
    }
    await wire(args);
  }
}
