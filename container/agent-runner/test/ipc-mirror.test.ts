/**
 * The agent's side of IPC and the host's, side by side: every file the real nanoclaw MCP
 * server (and the runner, for questions) writes is one the host's ipcActions() table accepts,
 * in the folder it was written to, and every action in the table has a tool that writes it.
 * This is what keeps the MCP tools' schemas and the host's mirrored.
 */
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ipcActions, parseIpcRequest, type IpcKind } from '../../../nanoclaw.ts';
import { writeIpcFile } from '../src/mcp-server.ts';
import { hostAnswering, tempDir } from './helpers.ts';
import { connectMcp } from './mcp-client.ts';

describe('IPC: the MCP tools and the host’s table agree', () => {
  it('every file the tools write parses on the host, in its folder, and every host action has a writer', async () => {
    const ipcDir = tempDir('nanoclaw-mirror-');
    for (const kind of ['messages', 'tasks']) mkdirSync(join(ipcDir, kind));
    const stopHost = hostAnswering(ipcDir); // the host's side: every request done
    const task = {
      id: 't1',
      groupFolder: 'main',
      chatJid: 'me@s.whatsapp.net',
      prompt: 'p',
      schedule_type: 'cron',
      schedule_value: '0 9 * * *',
      context_mode: 'group',
      status: 'active',
      next_run: null,
      last_run: null,
      last_result: null,
      recent_runs: [],
    };
    writeFileSync(join(ipcDir, 'current_tasks.json'), JSON.stringify([task]));
    const client = await connectMcp(
      { chatJid: 'me@s.whatsapp.net', groupFolder: 'main', isMain: true, ipcDir, timezone: 'Europe/Berlin' },
      'mirror',
    );
    const calls: [string, Record<string, unknown>][] = [
      ['send_message', { text: 'hello' }],
      ['send_file', { path: '/workspace/group/chart.png', caption: 'the chart' }],
      ['schedule_task', { prompt: 'water the plants', schedule_type: 'cron', schedule_value: '0 9 * * *' }],
      [
        'schedule_task',
        {
          prompt: 'once',
          schedule_type: 'once',
          schedule_value: '2030-01-01 10:00',
          context_mode: 'isolated',
          targetJid: 'fam@g.us',
        },
      ],
      ['pause_task', { task_id: 't1' }],
      ['resume_task', { task_id: 't1' }],
      ['cancel_task', { task_id: 't1' }],
      ['update_task', { task_id: 't1', prompt: 'new words', schedule_type: 'interval', schedule_value: '3600000' }],
      [
        'register_group',
        {
          jid: '120363000000000001@g.us',
          name: 'Family',
          folder: 'family',
          trigger: '@Andy',
          allow: ['4915100000002@s.whatsapp.net'],
        },
      ],
      ['refresh_groups', {}],
    ];
    try {
      for (const [name, args] of calls) {
        const result = (await client.callTool({ name, arguments: args })) as {
          isError?: boolean;
          content: { text: string }[];
        };
        expect(result.isError, `${name}: ${result.content.map((c) => c.text).join(' ')}`).toBeFalsy();
      }
    } finally {
      await client.close();
      stopHost();
    }
    // The runner's own writer: a question relayed to the chat.
    writeIpcFile(join(ipcDir, 'messages'), {
      type: 'message',
      chatJid: 'me@s.whatsapp.net',
      text: '❓ Which one?\n1. A\n2. B',
      expectsReply: true,
    });
    const written: { kind: IpcKind; data: Record<string, unknown> }[] = [];
    for (const kind of ['messages', 'tasks'] as const) {
      for (const file of readdirSync(join(ipcDir, kind)))
        written.push({ kind, data: JSON.parse(readFileSync(join(ipcDir, kind, file), 'utf8')) });
    }
    expect(written).toHaveLength(calls.length + 1);
    const types = new Set<string>();
    for (const { kind, data } of written) {
      const parsed = parseIpcRequest(kind, data); // throws on any disagreement
      expect(parsed.type).toBe(data.type);
      types.add(parsed.type);
    }
    expect([...types].sort()).toEqual(Object.keys(ipcActions()).sort());
    // The MCP tool's defaults are the host's: a task scheduled without context_mode runs in the group's context.
    const scheduled = written
      .map((w) => parseIpcRequest(w.kind, w.data))
      .find((r) => r.type === 'schedule_task' && r.prompt === 'water the plants');
    expect(scheduled).toMatchObject({ context_mode: 'group' });
    const registered = written.map((w) => parseIpcRequest(w.kind, w.data)).find((r) => r.type === 'register_group');
    expect(registered).toMatchObject({ allow: ['4915100000002@s.whatsapp.net'] });
    expect(
      parseIpcRequest('tasks', {
        type: 'schedule_task',
        prompt: 'p',
        schedule_type: 'cron',
        schedule_value: '0 9 * * *',
      }),
    ).toMatchObject({ context_mode: 'group' });
  });
});
