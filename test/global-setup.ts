/**
 * Every temp file of a test run, its children's included (scripts, the fake docker, baileys),
 * goes into one folder made here and named in TMPDIR, which is removed when the run ends: so
 * nothing is left even when a test file is cut short before it can remove its own folders.
 * A folder whose run was killed outright (its process is gone) is removed by the next run.
 */
import { chmodSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Short: the host's unix sockets live a few folders down, and a socket path has at most 107 bytes. */
const PREFIX = 'nc-run-';

function runGone(dir: string): boolean {
  let pid: number;
  try {
    pid = Number(readFileSync(join(dir, '.pid'), 'utf8'));
  } catch {
    // No pid yet: another run may be starting (or the folder is already gone).
    return Date.now() - (statSync(dir, { throwIfNoEntry: false })?.mtimeMs ?? Date.now()) > 60_000;
  }
  try {
    process.kill(pid, 0);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ESRCH';
  }
}

export default function setup(): () => void {
  const parent = tmpdir();
  for (const name of readdirSync(parent)) {
    if (name.startsWith(PREFIX) && runGone(join(parent, name)))
      rmSync(join(parent, name), { recursive: true, force: true });
  }
  const dir = mkdtempSync(join(parent, PREFIX));
  chmodSync(dir, 0o755); // like /tmp: a test may hand a project inside it to another user
  writeFileSync(join(dir, '.pid'), String(process.pid));
  process.env.TMPDIR = dir;
  return () => rmSync(dir, { recursive: true, force: true });
}
