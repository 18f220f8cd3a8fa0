// The host file reads top to bottom: every name a section uses is declared in that section or
// one above it. The sections are the file's numbered banners; a reference is what the
// TypeScript checker resolves an identifier to, so a local that shares a top-level name does
// not count.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';

const FILE = join(import.meta.dirname, '..', 'nanoclaw.ts');
const BANNER = /^\/\/ ─+ (\d+)\. ([^:]+):/;

interface Section {
  number: number;
  title: string;
  start: number; // character offset of the banner
}

function sectionsOf(text: string): Section[] {
  const sections: Section[] = [];
  let offset = 0;
  for (const line of text.split('\n')) {
    const match = BANNER.exec(line);
    if (match) sections.push({ number: Number(match[1]), title: (match[2] ?? '').trim(), start: offset });
    offset += line.length + 1;
  }
  return sections;
}

/** Every reference from one section to a top-level declaration of a later one, as "from → to: name". */
function downwardReferences(file: string): string[] {
  const program = ts.createProgram([file], { noResolve: true, noLib: true, allowJs: false, types: [] });
  const checker = program.getTypeChecker();
  const source = program.getSourceFile(file);
  if (!source) throw new Error(`cannot read ${file}`);
  const sections = sectionsOf(source.text);
  const sectionAt = (pos: number) => sections.findLast((s) => s.start <= pos);
  const found = new Set<string>();
  const isTopLevel = (declaration: ts.Declaration) =>
    declaration.parent === source ||
    (ts.isVariableDeclaration(declaration) && declaration.parent.parent.parent === source);
  const visit = (node: ts.Node) => {
    if (ts.isIdentifier(node)) {
      const declaration = checker.getSymbolAtLocation(node)?.declarations?.[0];
      if (declaration && declaration.getSourceFile() === source && isTopLevel(declaration)) {
        const from = sectionAt(node.getStart(source));
        const to = sectionAt(declaration.getStart(source));
        if (from && to && to.number > from.number)
          found.add(`${from.number}. ${from.title} → ${to.number}. ${to.title}: ${node.text}`);
      }
    }
    ts.forEachChild(node, visit);
  };
  ts.forEachChild(source, visit);
  return [...found].sort();
}

describe('nanoclaw.ts reads top to bottom', () => {
  const text = readFileSync(FILE, 'utf8');

  it('is cut into numbered sections, in order', () => {
    const numbers = sectionsOf(text).map((s) => s.number);
    expect(numbers.length).toBeGreaterThan(8);
    expect(numbers).toEqual(numbers.map((_, i) => i + 1));
  });

  it('never names something declared in a later section', () => {
    expect(downwardReferences(FILE)).toEqual([]);
  });
});
