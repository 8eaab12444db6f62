// Unit tests of the positions a page keeps for the next page of its tab (`resume`).

import { test } from "node:test";
import assert from "node:assert/strict";
import { PositionStore, ResyncClient, tokenSubject } from "../../src/resync.js";

/** An in-memory `Storage`, with a switch that makes writes fail as a full one does. */
class MemoryStorage {
  constructor() {
    this.items = new Map();
    this.full = false;
  }
  get length() {
    return this.items.size;
  }
  key(index) {
    return [...this.items.keys()][index] ?? null;
  }
  getItem(key) {
    return this.items.get(key) ?? null;
  }
  setItem(key, value) {
    if (this.full) throw new Error("QuotaExceededError");
    this.items.set(key, String(value));
  }
  removeItem(key) {
    this.items.delete(key);
  }
}

const jwt = (claims) => `e30.${Buffer.from(JSON.stringify(claims)).toString("base64url")}.sig`;

test("a token's subject scopes positions, and an opaque token is never kept", () => {
  assert.equal(tokenSubject(undefined), "anonymous");
  assert.equal(tokenSubject(jwt({ sub: "ana" })), "sub:ana");
  assert.notEqual(tokenSubject("opaque-1"), tokenSubject("opaque-2"));
  assert.ok(!tokenSubject("opaque-secret").includes("secret"));
});

test("a position is offered to the next store of the same scope only", () => {
  const storage = new MemoryStorage();
  const store = new PositionStore(storage, "https://a#sub:ana");
  store.set("news", { epoch: "e1", seq: 7 });
  store.flush();
  assert.deepEqual(new PositionStore(storage, "https://a#sub:ana").get("news"), { epoch: "e1", seq: 7 });
  assert.equal(new PositionStore(storage, "https://a#sub:bob").get("news"), undefined, "another user");
  assert.equal(new PositionStore(storage, "https://b#sub:ana").get("news"), undefined, "another server");
});

test("positions are bounded in age, channels and records", () => {
  const storage = new MemoryStorage();
  let now = 1_000_000;
  const clock = () => now;
  const store = new PositionStore(storage, "s", { maxAge: 60_000, maxChannels: 3 }, clock);
  for (let index = 0; index < 5; index += 1) store.set(`c${index}`, { epoch: "e", seq: index });
  store.flush();
  const next = new PositionStore(storage, "s", { maxAge: 60_000, maxChannels: 3 }, clock);
  assert.deepEqual(
    ["c0", "c1", "c2", "c3", "c4"].map((channel) => next.get(channel)?.seq),
    [undefined, undefined, 2, 3, 4],
    "the most recently moved channels stay",
  );
  now += 60_001;
  assert.equal(next.get("c4"), undefined, "too old to offer");
  for (let scope = 0; scope < 12; scope += 1) {
    now += 1;
    const other = new PositionStore(storage, `scope${scope}`, { maxScopes: 8 }, clock);
    other.set("c", { epoch: "e", seq: scope });
    other.flush();
  }
  assert.equal(storage.length, 8, "at most maxScopes records");
  assert.equal(new PositionStore(storage, "scope11", {}, clock).get("c").seq, 11, "the newest records stay");
});

test("a full or corrupt storage keeps nothing and breaks nothing", () => {
  const storage = new MemoryStorage();
  storage.setItem("resync.positions:s", "{not json");
  const store = new PositionStore(storage, "s");
  assert.equal(store.get("news"), undefined);
  storage.full = true;
  store.set("news", { epoch: "e", seq: 1 });
  assert.doesNotThrow(() => store.flush());
  storage.full = false;
  storage.setItem("resync.positions:s", JSON.stringify({ at: 1, channels: { news: ["e", -1, 1], ok: ["e", "5", 1] } }));
  const checked = new PositionStore(storage, "s");
  assert.equal(checked.get("news"), undefined, "a negative seq is not offered");
  assert.equal(checked.get("ok"), undefined, "a seq that is not a number is not offered");
});

test("a client subscribes from the kept position unless told not to, and forgets a channel it leaves", () => {
  const storage = new MemoryStorage();
  const token = jwt({ sub: "ana" });
  const first = new ResyncClient("http://127.0.0.1:1", { autoConnect: false, token, resume: { storage } });
  first.subscribe("news");
  first.deliver({ channel: "news", epoch: "e1", seq: 4, data: null });
  const left = first.subscribe("gone");
  first.deliver({ channel: "gone", epoch: "e1", seq: 2, data: null });
  left.unsubscribe();
  first.close();
  const next = new ResyncClient("http://127.0.0.1:1", { autoConnect: false, token, resume: { storage } });
  assert.deepEqual(next.subscribe("news").position(), { epoch: "e1", seq: 4 });
  assert.equal(next.subscribe("gone").position(), undefined, "left on purpose: from now");
  next.close();
  const optedOut = new ResyncClient("http://127.0.0.1:1", { autoConnect: false, token, resume: { storage } });
  assert.equal(optedOut.subscribe("news", { resume: false }).position(), undefined);
  optedOut.close();
  const off = new ResyncClient("http://127.0.0.1:1", { autoConnect: false, token, resume: false });
  assert.equal(off.subscribe("news").position(), undefined);
  off.close();
  const bob = new ResyncClient("http://127.0.0.1:1", { autoConnect: false, token: jwt({ sub: "bob" }), resume: { storage } });
  assert.equal(bob.subscribe("news").position(), undefined, "another user's position is not taken");
  bob.close();
});

test("a subscription taken up again before the next write keeps its position (StrictMode mounts twice)", () => {
  const storage = new MemoryStorage();
  const store = new PositionStore(storage, "s");
  store.set("news", { epoch: "e", seq: 3 });
  store.flush();
  const next = new PositionStore(storage, "s");
  next.delete("news");
  assert.deepEqual(next.get("news"), { epoch: "e", seq: 3 }, "still offered before the write");
  next.set("news", { epoch: "e", seq: 4 });
  next.flush();
  assert.deepEqual(new PositionStore(storage, "s").get("news"), { epoch: "e", seq: 4 });
  next.delete("news");
  next.flush();
  assert.equal(new PositionStore(storage, "s").get("news"), undefined, "left for good once written");
});

test("kept page state comes back with its position, or as too large to keep", () => {
  const storage = new MemoryStorage();
  const store = new PositionStore(storage, "s", { maxKeptBytes: 200, maxKept: 2 });
  store.setKept("feed", [{ seq: 1 }, { seq: 2 }], { epoch: "e", seq: 2 });
  store.setKept("big", "x".repeat(500), { epoch: "e", seq: 9 });
  store.flush();
  const next = new PositionStore(storage, "s", { maxKeptBytes: 200, maxKept: 2 });
  assert.deepEqual(next.getKept("feed"), { value: [{ seq: 1 }, { seq: 2 }], position: { epoch: "e", seq: 2 } });
  assert.deepEqual(next.getKept("big"), { value: null, position: { epoch: "e", seq: 9 } }, "refetch, do not guess");
  assert.equal(new PositionStore(storage, "other").getKept("feed"), undefined, "another scope");
  next.setKept("third", 3, { epoch: "e", seq: 1 });
  next.flush();
  const kept = [...storage.items.keys()].filter((key) => key.startsWith("resync.kept:"));
  assert.equal(kept.length, 2, "at most maxKept records");
});

test("clear() forgets a user's positions and kept state, and nobody else's", () => {
  const storage = new MemoryStorage();
  const ann = new PositionStore(storage, "https://a#sub:ann");
  const bob = new PositionStore(storage, "https://a#sub:bob");
  ann.set("inbox:ann", { epoch: "e", seq: 1 });
  ann.setKept("feed", [1], { epoch: "e", seq: 1 });
  bob.set("inbox:bob", { epoch: "e", seq: 2 });
  ann.flush();
  bob.flush();
  ann.clear();
  assert.ok(![...storage.items.keys()].some((key) => key.includes("sub:ann")), "nothing of ann's is left");
  assert.deepEqual(new PositionStore(storage, "https://a#sub:bob").get("inbox:bob"), { epoch: "e", seq: 2 });
});

test("invalidateOnReset refetches a TanStack query when its channel resets", async () => {
  const { invalidateOnReset } = await import("../../src/tanstack.js");
  const invalidated = [];
  const queryClient = { invalidateQueries: (filters) => invalidated.push(filters.queryKey) };
  const client = new ResyncClient("http://127.0.0.1:1", { autoConnect: false, resume: false });
  const events = [];
  const subscription = invalidateOnReset(client, queryClient, "todos", ["todos"], { onEvent: (event) => events.push(event.seq) });
  client.fresh("todos", { epoch: "e1", seq: 0 });
  client.deliver({ channel: "todos", epoch: "e1", seq: 1, data: null });
  assert.deepEqual(invalidated, [], "an event is the app's to apply");
  assert.deepEqual(events, [1]);
  client.reset({ channel: "todos", reason: "truncated", position: { epoch: "e1", seq: 9 } });
  assert.deepEqual(invalidated, [["todos"]], "a reset refetches the query");
  subscription.unsubscribe();
  client.reset({ channel: "todos", reason: "truncated", position: { epoch: "e1", seq: 10 } });
  assert.equal(invalidated.length, 1, "nothing after unsubscribe");
  client.close();
});

test("subscribeKeyed keeps each key's latest value: a state, then only newer events", () => {
  const client = new ResyncClient("http://127.0.0.1:1", { autoConnect: false, resume: false });
  const seen = [];
  const keyed = client.subscribeKeyed("prices:fx", { onChange: (values, changed) => seen.push([Object.fromEntries(values), changed]) });
  const position = { epoch: "e", seq: 10 };
  client.keyedState({ type: "state", channel: "prices:fx", entries: [{ key: "a", seq: 9, data: 1 }], position, more: true });
  assert.equal(seen.length, 0, "nothing until the state is whole");
  client.keyedState({ type: "state", channel: "prices:fx", entries: [{ key: "b", seq: 12, data: null }, { key: "c", seq: 4, data: 3 }], position });
  assert.deepEqual(seen.pop(), [{ a: 1, c: 3 }, ["a", "b", "c"]]);
  // Events after the state's position: one already in the state is not applied again.
  client.deliver({ channel: "prices:fx", epoch: "e", seq: 11, key: "a", data: 2 });
  client.deliver({ channel: "prices:fx", epoch: "e", seq: 12, key: "b", data: 5 });
  client.deliver({ channel: "prices:fx", epoch: "e", seq: 13, key: "c", data: null });
  assert.deepEqual(seen, [
    [{ a: 2, c: 3 }, ["a"]],
    [{ a: 2 }, ["c"]],
  ], "b's seq 12 was the delete the state already held");
  assert.deepEqual(Object.fromEntries(keyed.values()), { a: 2 });
  keyed.unsubscribe();
  client.close();
});
