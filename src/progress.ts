// Progress for long tasks (image builds, imports). On a terminal: one line redrawn in place
// with the step, a bar and the elapsed time. Otherwise: one plain line per step, so logs of
// non-interactive runs stay readable.

export interface Progress {
  /** Starts step `n` of the total with a label. */
  step(label: string): void;
  /** Extra detail for the current step (e.g. the last line of a tool's output). */
  detail(text: string): void;
  done(summary: string): void;
  fail(): void;
}

export function createProgress(title: string, totalSteps: number, out: NodeJS.WriteStream = process.stderr): Progress {
  const tty = Boolean(out.isTTY);
  const started = Date.now();
  let n = 0;
  let label = '';
  let detailText = '';
  let timer: NodeJS.Timeout | undefined;
  const elapsed = () => `${((Date.now() - started) / 1000).toFixed(1)}s`;

  const draw = () => {
    const width = 20;
    const filled = Math.round((Math.max(0, n - 1) / totalSteps) * width);
    const bar = '#'.repeat(filled) + '-'.repeat(width - filled);
    const cols = out.columns ?? 100;
    const line = `${title} [${bar}] ${n}/${totalSteps} ${label} ${elapsed()}${detailText ? ` · ${detailText}` : ''}`;
    out.write(`\r\x1b[2K${line.slice(0, cols - 1)}`);
  };

  return {
    step(l) {
      n += 1;
      label = l;
      detailText = '';
      if (tty) {
        draw();
        timer ??= setInterval(draw, 250).unref();
      } else {
        out.write(`${title}: step ${n}/${totalSteps}: ${l} (${elapsed()})\n`);
      }
    },
    detail(text) {
      detailText = text.trim().slice(0, 60);
      if (tty) draw();
    },
    done(summary) {
      if (timer) clearInterval(timer);
      if (tty) out.write(`\r\x1b[2K`);
      out.write(`${title}: ${summary} (${elapsed()})\n`);
    },
    fail() {
      if (timer) clearInterval(timer);
      if (tty) out.write('\n');
    },
  };
}
