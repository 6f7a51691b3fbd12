import assert from 'node:assert/strict';
import { MayflyError } from '../../src/errors.ts';

/** Runs `fn`, which must throw a MayflyError; returns it for exact checks. */
export function catchMayfly(fn: () => unknown): MayflyError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof MayflyError, `expected a MayflyError, got ${String(e)}`);
    return e;
  }
  assert.fail('expected an error to be thrown');
}
