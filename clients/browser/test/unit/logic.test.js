// Unit tests of the client's pure logic: backoff, close codes, cursors, duplicates.

import { test } from "node:test";
import assert from "node:assert/strict";
import {
  DEFAULT_BACKOFF,
  backoffDelay,
  closeAdvice,
  formatCursor,
  isDuplicate,
  parseCursor,
} from "../../src/resync.js";

/** A seeded random source (mulberry32), so sequences repeat. */
function seeded(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test("defect 7: backoff ceilings double from 500 ms and cap at 5 s", () => {
  const ceilings = [500, 1000, 2000, 4000, 5000, 5000, 5000, 5000];
  ceilings.forEach((ceiling, attempt) => {
    assert.equal(backoffDelay(attempt, DEFAULT_BACKOFF, () => 0.999999999), ceiling);
    assert.equal(backoffDelay(attempt, DEFAULT_BACKOFF, () => 0), 0);
  });
});

test("the same seed gives the same delays, and jitter covers the window", () => {
  const run = (seed) => {
    const random = seeded(seed);
    return Array.from({ length: 10 }, (_, attempt) => backoffDelay(attempt, DEFAULT_BACKOFF, random));
  };
  assert.deepEqual(run(42), run(42));
  assert.notDeepEqual(run(42), run(43));
  const random = seeded(1);
  const buckets = new Array(10).fill(0);
  for (let i = 0; i < 10000; i++) {
    const delay = backoffDelay(20, DEFAULT_BACKOFF, random);
    assert.ok(delay <= DEFAULT_BACKOFF.max);
    buckets[Math.min(9, Math.floor(delay / (DEFAULT_BACKOFF.max / 10)))] += 1;
  }
  for (const count of buckets) assert.ok(count > 800 && count < 1200, `uneven jitter: ${buckets}`);
});

test("close codes follow the protocol table", () => {
  const table = {
    1000: "stop", 1001: "backoff", 1006: "backoff", 1009: "backoff-drop-message", 1012: "soon",
    4000: "stop", 4003: "stop", 4099: "stop", 4100: "backoff", 4200: "soon", 4201: "soon",
    4300: "refresh-token", 4999: "backoff",
  };
  for (const [code, advice] of Object.entries(table)) assert.equal(closeAdvice(Number(code)), advice, code);
});

test("cursors round-trip and reject garbage", () => {
  const text = "chat:room-1:k3x9:17,news:a1b2:4";
  const positions = parseCursor(text);
  assert.deepEqual(positions.get("chat:room-1"), { epoch: "k3x9", seq: 17 });
  assert.equal(formatCursor(positions), text);
  assert.equal(parseCursor("").size, 0);
  for (const bad of ["nocolons", "c:e", "c:e:x", "c:e-1:1", "c:e:1,c:e:2"]) {
    assert.throws(() => parseCursor(bad), undefined, bad);
  }
});

test("duplicates are recognised only within the same epoch", () => {
  const last = { epoch: "e1", seq: 5 };
  assert.equal(isDuplicate(last, { epoch: "e1", seq: 5 }), true);
  assert.equal(isDuplicate(last, { epoch: "e1", seq: 4 }), true);
  assert.equal(isDuplicate(last, { epoch: "e1", seq: 6 }), false);
  assert.equal(isDuplicate(last, { epoch: "e2", seq: 1 }), false);
  assert.equal(isDuplicate(undefined, { epoch: "e1", seq: 1 }), false);
});
