/** The tests' MCP client: the nanoclaw server started exactly as mcp.json tells the CLI to start it. */
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { fileURLToPath } from 'node:url';
import { buildMcpConfig, type GroupIdentity } from '../src/config.ts';

const SERVER = fileURLToPath(new URL('../src/mcp-server.ts', import.meta.url));

/** A client connected over stdio to the real nanoclaw MCP server with this group's identity. */
export async function connectMcp(
  identity: GroupIdentity,
  name = 'test',
  extraEnv: Record<string, string> = {},
): Promise<Client> {
  const { command, args, env } = JSON.parse(buildMcpConfig(identity, SERVER, process.execPath)).mcpServers.nanoclaw as {
    command: string;
    args: string[];
    env: Record<string, string>;
  };
  const client = new Client({ name, version: '1' });
  await client.connect(
    new StdioClientTransport({ command, args, env: { PATH: process.env.PATH!, ...env, ...extraEnv } }),
  );
  return client;
}
