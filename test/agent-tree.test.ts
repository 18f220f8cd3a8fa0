/**
 * AgentTree: the host's only way into folders an agent can write. Every case plants what a
 * hostile agent could (links to host paths, FIFOs, oversized files) and checks that the
 * host refuses, never blocks, and leaves everything outside the tree as it was.
 */
import { execFileSync } from 'node:child_process';
import {
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  statSync,
  symlinkSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { AgentTree, MAX_AGENT_FILE_BYTES, readRegularFile, UnsafePathError } from '../nanoclaw.ts';
import { tempDir } from './helpers.ts';

/** A tree and, beside it, a host folder holding things an agent must never reach. */
function layout() {
  const base = tempDir('nanoclaw-tree-');
  const root = join(base, 'tree');
  const outside = join(base, 'host-secrets');
  mkdirSync(root);
  mkdirSync(outside);
  writeFileSync(join(outside, 'secret.json'), '{"type":"message","chatJid":"x@g.us","text":"stolen"}');
  writeFileSync(join(outside, 'keep.txt'), 'keep me');
  return { root, outside, tree: new AgentTree(root) };
}

const outsideIsIntact = (outside: string) => {
  expect(readdirSync(outside).sort()).toEqual(['keep.txt', 'secret.json']);
  expect(readFileSync(join(outside, 'keep.txt'), 'utf8')).toBe('keep me');
};

describe('AgentTree', () => {
  it('creates folders and files beneath its root, and reads them back', () => {
    const { root, tree } = layout();
    tree.create('logs/run.log', 'hello');
    expect(readFileSync(join(root, 'logs', 'run.log'), 'utf8')).toBe('hello');
    expect(tree.readBytes('logs/run.log').toString()).toBe('hello');
    tree.replace('logs/run.log', 'again');
    expect(tree.readBytes('logs/run.log').toString()).toBe('again');
    expect(tree.entries('logs')).toEqual([{ name: 'run.log', kind: 'file' }]);
    expect(tree.entries('missing')).toEqual([]);
    expect(tree.tail('logs/run.log', 3)).toBe('ain');
  });

  it('never writes through a folder that is a link, however deep', () => {
    const { root, outside, tree } = layout();
    symlinkSync(outside, join(root, 'logs'));
    expect(() => tree.create('logs/container-1.log', 'x')).toThrow(UnsafePathError);
    mkdirSync(join(root, 'a'));
    symlinkSync(outside, join(root, 'a', 'b'));
    expect(() => tree.create('a/b/c/file', 'x')).toThrow(UnsafePathError);
    expect(() => tree.ensureDir('a/b/c')).toThrow(UnsafePathError);
    expect(() => tree.replace('logs/current_tasks.json', '{}')).toThrow(UnsafePathError);
    outsideIsIntact(outside);
  });

  it('never replaces or follows an existing name when creating', () => {
    const { root, outside, tree } = layout();
    symlinkSync(join(outside, 'keep.txt'), join(root, 'CLAUDE.md'));
    expect(() => tree.create('CLAUDE.md', 'overwritten?')).toThrow(/EEXIST/);
    outsideIsIntact(outside);
  });

  it('replacing a name that is a link replaces the link, not what it points to', () => {
    const { root, outside, tree } = layout();
    symlinkSync(join(outside, 'keep.txt'), join(root, 'current_tasks.json'));
    tree.replace('current_tasks.json', '[]');
    expect(lstatSync(join(root, 'current_tasks.json')).isFile()).toBe(true);
    expect(readFileSync(join(root, 'current_tasks.json'), 'utf8')).toBe('[]');
    outsideIsIntact(outside);
  });

  it('refuses to read links, FIFOs and oversized files, without blocking or reading them', () => {
    const { root, outside, tree } = layout();
    symlinkSync(join(outside, 'secret.json'), join(root, 'link.json'));
    execFileSync('mkfifo', [join(root, 'fifo.json')]);
    writeFileSync(join(root, 'big.json'), '');
    truncateSync(join(root, 'big.json'), MAX_AGENT_FILE_BYTES + 1); // sparse: reading it would be visible as time and memory
    expect(() => tree.readBytes('link.json')).toThrow(/is a link/);
    expect(() => tree.readBytes('fifo.json')).toThrow(/not a regular file/); // with a blocking open this would hang forever
    expect(() => tree.readBytes('big.json')).toThrow(/over the 1048576-byte limit/);
    expect(() => readRegularFile(join(root, 'fifo.json'))).toThrow(UnsafePathError);
    expect(
      tree
        .entries()
        .map((e) => `${e.name}:${e.kind}`)
        .sort(),
    ).toEqual(['big.json:file', 'fifo.json:other', 'link.json:other']);
  });

  it('refuses paths that climb out', () => {
    const { tree } = layout();
    for (const bad of ['../host-secrets/keep.txt', 'a/../../x', '/etc/passwd'])
      expect(() => tree.readBytes(bad), bad).toThrow(UnsafePathError);
  });

  it('removes links themselves and whole folders, never anything a link points to', () => {
    const { root, outside, tree } = layout();
    symlinkSync(outside, join(root, 'sessions'));
    expect(tree.remove('sessions')).toBe(true);
    expect(existsSync(join(root, 'sessions'))).toBe(false);
    mkdirSync(join(root, 'deep', 'er'), { recursive: true });
    writeFileSync(join(root, 'deep', 'er', 'f'), '');
    symlinkSync(outside, join(root, 'deep', 'er', 'escape'));
    symlinkSync(join(outside, 'keep.txt'), join(root, 'deep', 'file-link'));
    expect(tree.remove('deep')).toBe(true);
    expect(existsSync(join(root, 'deep'))).toBe(false);
    expect(tree.remove('deep')).toBe(false);
    outsideIsIntact(outside);
  });

  it('moves entries out by renaming them: a link moves as a link', () => {
    const { root, outside, tree } = layout();
    mkdirSync(join(root, 'messages'));
    symlinkSync(join(outside, 'secret.json'), join(root, 'messages', '1.json'));
    const claimed = join(tempDir(), 'claimed.json');
    expect(tree.moveOut('messages/1.json', claimed)).toBe(true);
    expect(lstatSync(claimed).isSymbolicLink()).toBe(true);
    expect(() => readRegularFile(claimed)).toThrow(/is a link/);
    expect(tree.moveOut('messages/1.json', claimed)).toBe(false);
    outsideIsIntact(outside);
  });

  it('a folder swapped for a link is refused at the next step', () => {
    const { root, outside, tree } = layout();
    tree.create('input/1.json', '{}');
    execFileSync('rm', ['-rf', join(root, 'input')]);
    symlinkSync(outside, join(root, 'input'));
    expect(() => tree.entries('input')).toThrow(UnsafePathError);
    expect(() => tree.replace('input/2.json', '{}')).toThrow(UnsafePathError);
    outsideIsIntact(outside);
  });

  it('hands over what it creates and the named entries to the container user, never a link’s target', () => {
    const { root, outside } = layout();
    // As root (CI) the owner really changes to 1000; as a user, to oneself (the same calls, nothing to see).
    const asRoot = process.getuid?.() === 0;
    const owner = asRoot ? { uid: 1000, gid: 1000 } : { uid: process.getuid!(), gid: process.getgid!() };
    const tree = new AgentTree(root, owner);
    tree.create('logs/run.log', 'x');
    expect(statSync(join(root, 'logs')).uid).toBe(owner.uid);
    expect(statSync(join(root, 'logs', 'run.log')).uid).toBe(owner.uid);
    symlinkSync(join(outside, 'keep.txt'), join(root, 'CLAUDE.md'));
    const before = statSync(join(outside, 'keep.txt')).uid;
    tree.handOver('CLAUDE.md');
    expect(statSync(root).uid).toBe(owner.uid);
    expect(statSync(join(outside, 'keep.txt')).uid).toBe(before);
    if (asRoot) expect(before).toBe(0);
  });
});
