// Shared by the benchmarks: summaries and printing. Each bench measures a baseline and mayfly
// in the same run and prints the ratio of medians.

export interface Summary {
  min: number;
  median: number;
  max: number;
}

export function summary(ms: number[]): Summary {
  const s = [...ms].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  const median = s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
  return { min: s[0]!, median, max: s.at(-1)! };
}

export function fmt(ms: number): string {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s`.padStart(9) : `${ms.toFixed(1)} ms`.padStart(9);
}

export function printComparison(title: string, mayfly: number[], baseline: number[], labels: { mayfly: string; baseline: string }): void {
  const m = summary(mayfly);
  const b = summary(baseline);
  const width = Math.max(labels.mayfly.length, labels.baseline.length) + 2;
  console.log(`\n${title}`);
  console.log(`${''.padEnd(width)}      min     median        max`);
  console.log(`${labels.mayfly.padEnd(width)}${fmt(m.min)}  ${fmt(m.median)}  ${fmt(m.max)}`);
  console.log(`${labels.baseline.padEnd(width)}${fmt(b.min)}  ${fmt(b.median)}  ${fmt(b.max)}`);
  console.log(`ratio of medians (baseline / mayfly): ${(b.median / m.median).toFixed(2)}x`);
}

export function fail(message: string): never {
  console.error(`bench: ${message}`);
  process.exit(2);
}
