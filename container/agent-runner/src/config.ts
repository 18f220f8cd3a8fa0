/**
 * What the agent-runner writes before the Kimi CLI starts, as pure functions of the input:
 * ~/.kimi/config.toml (provider, model alias k25, key), ~/.kimi/mcp.json (the nanoclaw
 * MCP server with this group's identity) and the agent file that puts NanoClaw's role
 * and the group's memory into Kimi's system prompt.
 */

/** The model alias the host and the guide use. */
export const MODEL_ALIAS = 'k25';

export interface KimiSettings {
  apiKey?: string;
  /** KIMI_BASE_URL: another endpoint (e.g. a local OpenAI-compatible server). */
  baseUrl?: string;
  /** KIMI_MODEL_NAME: the provider's model name behind the alias. */
  modelName?: string;
  /** KIMI_PROVIDER: the Kimi CLI provider type; `kimi` unless a local model is used. */
  providerType?: string;
  /** What the model takes in (KIMI_MODEL_CAPABILITIES); by default from its name (modelCapabilities). */
  capabilities?: string[];
}

/**
 * What a model can take in, as kimi-cli 1.49.0 decides it for models from the platforms'
 * lists (auth/platforms.py: ids starting kimi-k2 get thinking, image_in and video_in;
 * llm.py: kimi-for-coding and kimi-code the same). Without image_in the CLI drops its
 * ReadMediaFile tool and refuses pictures, so the agent could not look at a photo.
 */
export function modelCapabilities(model: string): string[] {
  const name = model.toLowerCase();
  if (name.startsWith('kimi-k2') || name === 'kimi-for-coding' || name === 'kimi-code')
    return ['thinking', 'image_in', 'video_in'];
  return [];
}

export const DEFAULTS = {
  baseUrl: 'https://api.moonshot.ai/v1',
  modelName: 'kimi-k2.5',
  providerType: 'kimi',
  maxContextSize: 262_144,
};

/** A TOML basic string: quotes, backslashes and control characters escaped. */
export function tomlString(value: string): string {
  return JSON.stringify(value).replace(/\u007f/g, '\\u007f');
}

export function buildConfigToml(settings: KimiSettings): string {
  const provider = settings.providerType || DEFAULTS.providerType;
  const model = settings.modelName || DEFAULTS.modelName;
  const capabilities = settings.capabilities ?? modelCapabilities(model);
  const lines = [
    '# Written by the NanoClaw agent-runner at every start; edits here are overwritten.',
    `default_model = ${tomlString(MODEL_ALIAS)}`,
    '',
    '[providers.nanoclaw]',
    `type = ${tomlString(provider)}`,
    `base_url = ${tomlString(settings.baseUrl || DEFAULTS.baseUrl)}`,
    `api_key = ${tomlString(settings.apiKey ?? '')}`,
    '',
    `[models.${MODEL_ALIAS}]`,
    'provider = "nanoclaw"',
    `model = ${tomlString(model)}`,
    `max_context_size = ${DEFAULTS.maxContextSize}`,
    `capabilities = [${capabilities.map(tomlString).join(', ')}]`,
    '',
  ];
  return lines.join('\n');
}

export interface GroupIdentity {
  chatJid: string;
  groupFolder: string;
  isMain: boolean;
  ipcDir: string;
  timezone: string;
}

/** ~/.kimi/mcp.json: the one MCP server the agent gets, started with Bun from the image. */
export function buildMcpConfig(identity: GroupIdentity, serverScript: string, bunPath = 'bun'): string {
  return `${JSON.stringify(
    {
      mcpServers: {
        nanoclaw: {
          command: bunPath,
          args: [serverScript],
          env: {
            NANOCLAW_CHAT_JID: identity.chatJid,
            NANOCLAW_GROUP_FOLDER: identity.groupFolder,
            NANOCLAW_IS_MAIN: identity.isMain ? '1' : '0',
            NANOCLAW_IPC_DIR: identity.ipcDir,
            TZ: identity.timezone,
          },
        },
      },
    },
    null,
    2,
  )}\n`;
}

export interface RoleInput {
  assistantName: string;
  isMain: boolean;
  timezone: string;
  globalMemory?: string | null;
  groupMemory?: string | null;
}

/** NanoClaw's part of the system prompt: who the agent is, how to talk, what it can do. */
export function buildRole(input: RoleInput): string {
  const sections = [
    `You are ${input.assistantName}, a personal assistant that lives in the user's WhatsApp. ` +
      `Messages reach you as <messages> with each <message> carrying its sender and local time (${input.timezone}).`,
    [
      'How to write:',
      '- This is WhatsApp: keep answers short and conversational; several short messages beat one long one.',
      '- Formatting that WhatsApp shows: *bold*, _italic_, ~strike~, ```monospace```, and simple lists. No tables, no headings.',
      '- Everything you say in your final answer is sent to the chat. Wrap thinking, notes to yourself and anything the chat must not see in <internal>…</internal>; it is removed before sending.',
      '- If there is nothing worth sending, answer only with <internal>…</internal>.',
    ].join('\n'),
    [
      'Your tools (the nanoclaw MCP server):',
      '- send_message: send a message to this chat right away (e.g. progress on long work, or several separate messages).',
      '- schedule_task, list_tasks, get_task, update_task, pause_task, resume_task, cancel_task: reminders and recurring jobs. Times are in the user timezone.',
      input.isMain
        ? '- register_group, refresh_groups: add WhatsApp groups (see /workspace/ipc/available_groups.json). This is the main chat: you may act for every registered group.'
        : '- You act only for this group: you can message only this chat and manage only its tasks.',
    ].join('\n'),
    [
      'Your files:',
      '- /workspace/group is your working folder for this chat; its CLAUDE.md is your memory here: update it when you learn something worth keeping.',
      input.isMain
        ? '- /workspace/project is the NanoClaw project, read-only (its secrets are hidden). You can change the memory every group reads: /workspace/project/groups/global/CLAUDE.md.'
        : '- /workspace/global holds the memory shared by all groups (read-only here).',
      '- Media people send are saved under /workspace/group/media/.',
    ].join('\n'),
  ];
  if (input.globalMemory?.trim())
    sections.push(`Shared memory (CLAUDE.md of all groups):\n${input.globalMemory.trim()}`);
  if (input.groupMemory?.trim()) sections.push(`This group's memory (CLAUDE.md):\n${input.groupMemory.trim()}`);
  return sections.join('\n\n');
}

/**
 * The agent file: extends Kimi's default agent and adds the role. Written as JSON, which
 * is valid YAML, so no YAML escaping rules can break it.
 */
export function buildAgentFile(role: string): string {
  return `${JSON.stringify({ version: 1, agent: { extend: 'default', system_prompt_args: { ROLE_ADDITIONAL: role } } }, null, 2)}\n`;
}

/** What a scheduled task's prompt looks like to the agent: nobody typed it just now. */
export function scheduledTaskPrompt(prompt: string): string {
  return `[Scheduled task: this was not sent by a person just now. It runs on a schedule the user set up. Do what it asks; what you answer is sent to the chat, so wrap anything that should not be sent in <internal>.]\n\n${prompt}`;
}

/** KIMI_API_KEY from an env-file (the guide's /workspace/env-dir/env). */
export function keyFromEnvFile(text: string): string | undefined {
  for (const line of text.split(/\r?\n/)) {
    const match = /^\s*(?:export\s+)?KIMI_API_KEY\s*=\s*(.*)$/.exec(line);
    if (match) return match[1]!.trim().replace(/^(['"])(.*)\1$/, '$2') || undefined;
  }
  return undefined;
}
