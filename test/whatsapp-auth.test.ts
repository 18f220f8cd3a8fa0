/**
 * WhatsApp credentials on disk (store/auth): real files, written by the auth state the
 * channel and `auth` use, read back as baileys 7.0.0-rc14 reads them. Modelled on baileys'
 * lib/Utils/use-multi-file-auth-state.js (folder layout, file names, BufferJSON) and
 * lib/Utils/auth-utils.js (initAuthCreds). A crash is what it leaves on disk: a creds.json
 * written in place and cut short (as baileys' own writer can leave it), a temp file.
 */
import { BufferJSON, initAuthCreds, useMultiFileAuthState } from '@whiskeysockets/baileys';
import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  statSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { authPlan, setupLogging, useDurableAuthState, WhatsAppChannel } from '../nanoclaw.ts';
import { linkedAuthDir, pendingPairingAuthDir, tempDir, tempProject, waitFor } from './helpers.ts';

const ENTRY = fileURLToPath(new URL('../nanoclaw.ts', import.meta.url));

/** Saves the credentials once more, changed as baileys changes them (creds.update merges into the same object). */
async function saveChanged(authDir: string, nextPreKeyId: number): Promise<void> {
  const { state, saveCreds } = await useDurableAuthState(authDir);
  state.creds.nextPreKeyId = nextPreKeyId;
  await saveCreds();
}

const credsOf = (file: string) => JSON.parse(readFileSync(file, 'utf8'), BufferJSON.reviver);

describe('credentials written whole (store/auth)', () => {
  it('keeps the file names of baileys’ useMultiFileAuthState, so an existing link keeps working, and leaves no temp file', async () => {
    const ours = tempDir();
    const theirs = tempDir();
    const keys = {
      session: { '4915100000002.0': Buffer.from('s') },
      'sender-key': { '120363000000000001@g.us::4915100000002::0': Buffer.from('k') },
      'app-state-sync-key': { AAAA: { keyData: Buffer.alloc(32, 1), timestamp: 1 } },
    };
    for (const dir of [ours, theirs]) {
      const { state, saveCreds } = await (dir === ours ? useDurableAuthState(dir) : useMultiFileAuthState(dir));
      await state.keys.set(keys);
      await saveCreds();
    }
    expect(
      readdirSync(ours)
        .filter((f) => f !== 'creds.json.bak')
        .sort(),
    ).toEqual(readdirSync(theirs).sort());
    // What one wrote the other reads.
    const { state } = await useDurableAuthState(theirs);
    const read = await state.keys.get('app-state-sync-key', ['AAAA']);
    expect(Buffer.from(read.AAAA!.keyData!)).toEqual(Buffer.alloc(32, 1));
    expect((await state.keys.get('session', ['4915100000002.0']))['4915100000002.0']).toEqual(Buffer.from('s'));
    await state.keys.set({ session: { '4915100000002.0': null } });
    expect((await state.keys.get('session', ['4915100000002.0']))['4915100000002.0']).toBeNull();
    expect(readdirSync(ours).some((f) => f.endsWith('.tmp'))).toBe(false);
  });

  it('keeps the previous creds.json as creds.json.bak at every write, and writes one file in the order asked', async () => {
    const authDir = await linkedAuthDir();
    await saveChanged(authDir, 101);
    await saveChanged(authDir, 102);
    expect(credsOf(join(authDir, 'creds.json')).nextPreKeyId).toBe(102);
    expect(credsOf(join(authDir, 'creds.json.bak')).nextPreKeyId).toBe(101);
    const { state, saveCreds } = await useDurableAuthState(authDir);
    const saves: Promise<void>[] = [];
    for (let id = 200; id < 220; id++) {
      state.creds.nextPreKeyId = id;
      saves.push(saveCreds());
    }
    const writes = Array.from({ length: 20 }, (_, i) =>
      state.keys.set({ 'pre-key': { '1': { public: Buffer.from([i]), private: Buffer.from([i]) } } }),
    );
    await Promise.all([...saves, ...writes]);
    expect(credsOf(join(authDir, 'creds.json')).nextPreKeyId).toBe(219);
    expect(Buffer.from((await state.keys.get('pre-key', ['1']))['1']!.public)).toEqual(Buffer.from([19]));
  });

  it('a creds.json cut short or emptied by a crash is restored from creds.json.bak (logged), not taken for an unfinished pairing', async () => {
    const config = tempProject();
    setupLogging(config, { terminalLevel: 'silent' });
    const authDir = await linkedAuthDir();
    await saveChanged(authDir, 7); // the version before: creds.json.bak
    await saveChanged(authDir, 8);
    const whole = readFileSync(join(authDir, 'creds.json'), 'utf8');
    writeFileSync(join(authDir, 'creds.json'), whole.slice(0, Math.floor(whole.length / 2))); // half-written in place
    writeFileSync(join(authDir, 'creds.json.1a2b3c4d.tmp'), whole.slice(0, 10)); // a temp file a crash left
    const damaged = statSync(join(authDir, 'creds.json')).ino;
    expect(WhatsAppChannel.linkState(authDir)).toBe('linked');
    // Restored beside it and renamed over (a new file), never written in place: a crash mid-restore cannot cut it short.
    expect(statSync(join(authDir, 'creds.json')).ino).not.toBe(damaged);
    expect(credsOf(join(authDir, 'creds.json')).nextPreKeyId).toBe(7);
    expect(readFileSync(join(config.logsDir, 'nanoclaw.log'), 'utf8')).toContain(
      'restored their previous version from creds.json.bak',
    );
    truncateSync(join(authDir, 'creds.json'), 0); // empty: a full disk
    const { state } = await useDurableAuthState(authDir);
    expect(state.creds.me?.id).toBe('4915100000001:7@s.whatsapp.net');
    expect(state.creds.nextPreKeyId).toBe(7);
    expect(readdirSync(authDir).some((f) => f.endsWith('.tmp'))).toBe(false);
    // Without a whole backup it is damaged: neither linked nor a pairing to start over.
    writeFileSync(join(authDir, 'creds.json'), whole.slice(0, 40));
    writeFileSync(join(authDir, 'creds.json.bak'), '');
    expect(WhatsAppChannel.linkState(authDir)).toBe('damaged');
    expect(WhatsAppChannel.linkState(tempDir())).toBe('none');
  });

  it('auth replaces a linked device or damaged credentials only when the user says so', () => {
    expect(authPlan('none', false)).toBe('link');
    expect(authPlan('pending', false)).toBe('start-over'); // no device was ever confirmed
    expect(authPlan('linked', false)).toBe('ask');
    expect(authPlan('damaged', false)).toBe('ask');
    expect(authPlan('linked', true)).toBe('replace');
    expect(authPlan('damaged', true)).toBe('replace');
  });
});

describe('bun nanoclaw.ts auth and store/auth', () => {
  async function cli(root: string, args: string[]) {
    const proc = Bun.spawn([process.execPath, ENTRY, ...args], {
      cwd: root,
      stdin: new Blob(['y\n']), // not a terminal: a piped "y" is no consent
      stdout: 'pipe',
      stderr: 'pipe',
      env: {
        PATH: process.env.PATH!,
        HOME: process.env.HOME!,
        NANOCLAW_ROOT: root,
        WHATSAPP_SERVER_URL: 'ws://127.0.0.1:9/ws/chat', // a closed port: no network
      },
    });
    const [stdout, stderr, code] = await Promise.all([
      new Response(proc.stdout).text(),
      new Response(proc.stderr).text(),
      proc.exited,
    ]);
    return { stdout, stderr, code };
  }
  const projectWith = async (authDir: string) => {
    const root = tempProject().projectRoot;
    mkdirSync(join(root, 'store'), { recursive: true });
    renameSync(authDir, join(root, 'store', 'auth'));
    return { root, creds: join(root, 'store', 'auth', 'creds.json') };
  };

  it('damaged credentials without a terminal: one line naming auth --relink, exit 2, nothing deleted; --check exits 5', async () => {
    const authDir = await linkedAuthDir();
    writeFileSync(join(authDir, 'creds.json'), '{"noiseKey": {"priv');
    const { root, creds } = await projectWith(authDir);
    const asked = await cli(root, ['auth']);
    expect(asked.code).toBe(2);
    expect(asked.stderr.trim().split('\n')).toEqual([
      'store/auth/creds.json is damaged and has no whole backup. To link again (this deletes store/auth/): bun nanoclaw.ts auth --relink',
    ]);
    expect(readFileSync(creds, 'utf8')).toBe('{"noiseKey": {"priv');
    const check = await cli(root, ['auth', '--check']);
    expect(check.code).toBe(5);
    expect(check.stdout).toContain('auth --relink');
    expect((await cli(root, ['auth', '--check', '--relink'])).code).toBe(2);
  });

  it('a linked device is kept without --relink; with it, store/auth is replaced and the phone’s old entry named', async () => {
    const { root, creds } = await projectWith(await linkedAuthDir());
    const kept = await cli(root, ['auth']);
    expect(kept.code).toBe(0);
    expect(kept.stdout).toContain('already linked');
    expect(kept.stdout).toContain('bun nanoclaw.ts auth --relink');
    expect(existsSync(creds)).toBe(true);
    const relinked = await cli(root, ['auth', '--relink']);
    expect(relinked.stdout).toContain('Removed store/auth/');
    expect(relinked.stdout).toContain('Linked devices');
    expect(relinked.stderr).toContain('No network'); // it went on to link, and could not reach WhatsApp
    expect(relinked.code).toBe(1);
    expect(existsSync(creds)).toBe(false);
  });

  it('on a terminal (a pty from util-linux `script`), auth asks before deleting a linked device: no keeps it, yes replaces it', async () => {
    for (const [answer, kept] of [
      ['n', true],
      ['y', false],
    ] as const) {
      const { root, creds } = await projectWith(await linkedAuthDir());
      const proc = Bun.spawn(['script', '-qfec', `${process.execPath} ${ENTRY} auth`, '/dev/null'], {
        cwd: root,
        stdin: 'pipe',
        stdout: 'pipe',
        stderr: 'pipe',
        env: {
          PATH: process.env.PATH!,
          HOME: process.env.HOME!,
          TERM: 'xterm',
          NANOCLAW_ROOT: root,
          WHATSAPP_SERVER_URL: 'ws://127.0.0.1:9/ws/chat',
        },
      });
      let screen = '';
      const drained = (async () => {
        for await (const chunk of proc.stdout) screen += new TextDecoder().decode(chunk);
      })();
      await waitFor(() => screen.includes('[y/N]'), 60_000, 'the question');
      expect(screen).toContain(
        'WhatsApp is already linked (store/auth/). Delete store/auth/ and link this machine again?',
      );
      expect(existsSync(creds)).toBe(true); // nothing deleted before the answer
      proc.stdin.write(`${answer}\r`);
      await proc.stdin.flush();
      await proc.exited;
      await drained;
      expect(existsSync(creds)).toBe(kept);
      expect(screen).toContain(kept ? 'Nothing changed.' : 'Removed store/auth/');
    }
  });

  it('a pairing that never finished is started over without asking (it is no device)', async () => {
    const { root } = await projectWith(pendingPairingAuthDir());
    const again = await cli(root, ['auth']);
    expect(again.stdout).toContain('never finished; starting over');
    expect(again.stderr).toContain('No network');
  });
});

// initAuthCreds is what a fresh link starts from; a test that reads it keeps the import honest.
it('a fresh auth state is baileys’ initAuthCreds', async () => {
  const { state } = await useDurableAuthState(tempDir());
  expect(Object.keys(state.creds).sort()).toEqual(Object.keys(initAuthCreds()).sort());
});
