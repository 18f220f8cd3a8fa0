#!/usr/bin/env bun
/**
 * The real NanoClaw host for the drills, in its own process: the same Host, Store, model
 * proxy, containers (real engine, real image), IPC watcher and scheduler as the service.
 * Only the messaging platform is a stand-in, because WhatsApp's servers cannot exist here,
 * and it behaves like them where it matters: inbound messages arrive as JSON lines on
 * stdin (`{"id","text","chat"?}`, possibly delivered again, as WhatsApp does after a reconnect),
 * and every part the host sends is appended, with its message id, to
 * <project>/deliveries.jsonl — a part sent again under the same id is the same message,
 * as a WhatsApp recipient sees it.
 *
 *   NANOCLAW_ROOT=<project> [NANOCLAW_CRASH_AT=<point>] bun drills/host.ts
 */
import { appendFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import {
  keepRunningThroughErrors,
  loadConfig,
  setupLogging,
  startHost,
  takeSecretsOutOfEnvironment,
  type Channel,
  type ChannelHandlers,
} from '../nanoclaw.ts';

/** The drills' main chat; the multi-group drill adds DRILL_GROUPS, which answer without a trigger. */
export const DRILL_CHAT = 'main@drill';
export const DRILL_GROUPS = ['alpha@drill', 'beta@drill'] as const;

export interface Delivery {
  messageId: string;
  jid: string;
  text: string;
}

class DrillChannel implements Channel {
  readonly name = 'drill';
  readonly ready = true;
  private handlers: ChannelHandlers | null = null;

  constructor(private readonly deliveries: string) {}

  ownsJid(jid: string): boolean {
    return jid.endsWith('@drill');
  }

  async connect(handlers: ChannelHandlers): Promise<void> {
    this.handlers = handlers;
  }

  layout(text: string): string[] {
    return [text];
  }

  async deliver(jid: string, text: string, messageId: string): Promise<void> {
    appendFileSync(this.deliveries, `${JSON.stringify({ messageId, jid, text } satisfies Delivery)}\n`);
  }

  receive(id: string, text: string, chat = DRILL_CHAT): void {
    this.handlers?.onMessage(
      {
        id,
        chatJid: chat,
        sender: 'user@drill',
        senderName: 'User',
        content: text,
        timestamp: new Date().toISOString(),
        isFromMe: chat === DRILL_CHAT, // the main chat is the user's own: only the owner wakes it
        isBotMessage: false,
      },
      { name: chat, isGroup: false },
    );
  }

  async disconnect(): Promise<void> {
    this.handlers = null;
  }
}

if (import.meta.main) {
  takeSecretsOutOfEnvironment();
  const root = process.env.NANOCLAW_ROOT;
  if (!root) throw new Error('NANOCLAW_ROOT must name the drill project');
  const config = loadConfig(root);
  setupLogging(config, { terminalLevel: 'silent' });
  const channel = new DrillChannel(join(config.projectRoot, 'deliveries.jsonl'));
  // A host that cannot start says why on stderr and exits non-zero, so the drill reports it.
  const { host, store, release } = await startHost(config, () => [channel]);
  keepRunningThroughErrors(); // as the service does; the drills count what it had to catch (logs/nanoclaw.error.log)
  await host.start();
  process.stdout.write('ready\n');
  for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    const { id, text, chat } = JSON.parse(line) as { id: string; text: string; chat?: string };
    channel.receive(id, text, chat);
  }
  await host.stop();
  store.close();
  release();
  process.exit(0);
}
