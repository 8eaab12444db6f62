// Deploys and outages as clients nobody here wrote see them: Chromium's own EventSource and
// the npm `eventsource` package, with no resync client code, must stay OPEN through a deploy
// (SIGTERM, then a new process on the same port), a kill -9 and a Redis outage, and receive
// what was published: on the default (disk) broker every event once and no reset. Each test proves its fault happened (the process exited, Redis was down while the
// sources came back) and counts the reconnects.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { EventSource as NodeEventSource } from "eventsource";
import { Proxy, eventually, freePort, launch, publish, stack, startRedis, startServer } from "./helpers.js";
import { recordSource, summarize } from "./pages/record-source.js";

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

// Chromium opens at most 6 HTTP/1.1 connections per host and profile: 8 sources are 2
// browser contexts of 4.
const CONTEXTS = 2;
const SOURCES_PER_PAGE = 4;
const BROWSER_SOURCES = CONTEXTS * SOURCES_PER_PAGE;
const NODE_SOURCES = 4;

/** `CONTEXTS` pages, each in its own browser context, with `SOURCES_PER_PAGE` sources. */
async function openPages(url) {
  const contexts = [];
  const pages = [];
  for (let index = 0; index < CONTEXTS; index++) {
    const context = await browser.newContext();
    contexts.push(context);
    const page = await context.newPage();
    await page.goto(`${url}&count=${SOURCES_PER_PAGE}`);
    pages.push(page);
  }
  return { pages, close: () => Promise.all(contexts.map((context) => context.close())) };
}

/** The npm package's EventSources, recorded like the page's. */
function nodeSources(base, channels, count) {
  return Array.from({ length: count }, () => recordSource(new NodeEventSource(`${base}/sse?channels=${channels}`)));
}

/** Every source of the pages and of node, as plain data. */
async function everySource(pages, node) {
  const fromPages = (await Promise.all(pages.pages.map((page) => page.evaluate(() => window.summary())))).flat();
  return [...fromPages, ...summarize(node)];
}

/** Waits until every source satisfies `check`; returns them. */
function untilEvery(pages, node, check, message) {
  return eventually(async () => {
    const all = await everySource(pages, node);
    return all.every(check) && all;
  }, { message });
}

const OPEN = 1;
const CLOSED = 2;
const hasEvent = (n) => (source) => source.events.some((event) => event.data?.n === n);

async function publishWhenReady(base, channel, data) {
  // Right after a restart the broker may still be reconnecting: retry until it stores.
  return eventually(() => publish(base, channel, data).catch(() => false), { message: `publish ${JSON.stringify(data)}` });
}

/** The `n`s of a source's events, in the order it got them. */
const ns = (source) => source.events.map((event) => event.data?.n);

// A deploy (SIGTERM, then a new process on the same port and data directory) and a crash
// (kill -9, then a new process) on the default broker, which keeps history on disk: every
// source reconnects by itself and gets every event exactly once, in order, with no reset.
for (const [fault, stopOld] of [
  ["a deploy", async (server) => assert.equal((await server.terminate()).code, 0, "the old process drained and exited by itself")],
  ["a kill -9", async (server) => server.stop()],
]) {
  test(`${fault} on the default broker leaves every EventSource open, with every event once and no reset`, async (t) => {
    const port = await freePort();
    const listen = ["--listen", `127.0.0.1:${port}`];
    let server = await startServer([...listen, "--shutdown-spread-ms", "1000"]);
    const dataDir = ["--data-dir", server.dataDir];
    const pageServer = await new Proxy(server.port).start(); // serves the page only
    const node = nodeSources(server.base, "deploy", NODE_SOURCES);
    const page = await openPages(`${pageServer.base}/e2e/sources.html?channels=deploy&base=${encodeURIComponent(server.base)}`);
    t.after(async () => {
      for (const { source } of node) source.close();
      await page.close();
      await pageServer.stop();
      await server.stop();
    });
    await untilEvery(page, node, (source) => source.readyState === OPEN, "every source open");
    for (const n of [1, 2, 3]) await publish(server.base, "deploy", { n });
    await untilEvery(page, node, (source) => ns(source).length === 3, "events 1-3 everywhere");

    await stopOld(server);
    server = await startServer([...listen, ...dataDir]);
    // Published while the sources are (or may still be) away: they get them on their return.
    for (const n of [4, 5]) await publishWhenReady(server.base, "deploy", { n });
    await untilEvery(page, node, (source) => source.readyState === OPEN && source.opens >= 2, "every source back on the new process");
    await publish(server.base, "deploy", { n: 6 });
    const sources = await untilEvery(page, node, (source) => ns(source).length >= 6, "events 4-6 everywhere after the restart");
    for (const [index, source] of sources.entries()) {
      assert.deepEqual(ns(source), [1, 2, 3, 4, 5, 6], `source ${index}: every event once, in order`);
      assert.deepEqual(source.resets, [], `source ${index} was reset`);
      assert.ok(source.opens >= 2, `source ${index} reconnected by itself (${source.opens} opens)`);
      const seqs = source.events.map((event) => event.seq);
      assert.deepEqual(seqs, [1, 2, 3, 4, 5, 6], `source ${index}: the seqs go on`);
    }
    assert.equal(sources.length, BROWSER_SOURCES + NODE_SOURCES);
  });
}

// On the memory broker history does not survive the process: every source is told to
// refetch, plainly, and the next event reaches all of them.
test("a deploy on the memory broker leaves every EventSource open, told to refetch, and the next event arrives", async (t) => {
  const port = await freePort();
  const listen = ["--listen", `127.0.0.1:${port}`, "--broker", "memory"];
  let server = await startServer([...listen, "--shutdown-spread-ms", "1000"]);
  const pageServer = await new Proxy(server.port).start(); // serves the page only
  const node = nodeSources(server.base, "deploy", NODE_SOURCES);
  const page = await openPages(`${pageServer.base}/e2e/sources.html?channels=deploy&base=${encodeURIComponent(server.base)}`);
  t.after(async () => {
    for (const { source } of node) source.close();
    await page.close();
    await pageServer.stop();
    await server.stop();
  });
  await untilEvery(page, node, (source) => source.readyState === OPEN, "every source open");
  await publish(server.base, "deploy", { n: 1 });
  await untilEvery(page, node, hasEvent(1), "event 1 everywhere");

  const exit = await server.terminate();
  assert.equal(exit.code, 0, "the old process drained and exited by itself");
  server = await startServer(listen);
  // Every source comes back to the new process by itself and is told to refetch (the
  // in-memory history did not survive); then the next event must reach all of them.
  await untilEvery(page, node, (source) => source.readyState === OPEN && source.resets.some((reset) => reset.reason === "epoch_changed"), "every source back on the new process");
  await publish(server.base, "deploy", { n: 2 });
  const sources = await untilEvery(page, node, hasEvent(2), "event 2 everywhere after the deploy");
  for (const [index, source] of sources.entries()) {
    assert.equal(source.readyState, OPEN, `source ${index} is open`);
    assert.ok(source.opens >= 2, `source ${index} reconnected by itself (${source.opens} opens)`);
    assert.ok(
      source.resets.some((reset) => reset.reason === "epoch_changed"),
      `source ${index} was told to refetch: ${JSON.stringify(source.resets)}`,
    );
  }
  assert.equal(sources.length, BROWSER_SOURCES + NODE_SOURCES);
});

test("a Redis outage leaves every EventSource open, and the next event arrives", async (t) => {
  const redis = await startRedis();
  const server = await startServer(["--broker", "redis", "--redis-url", redis.url]);
  const proxy = await new Proxy(server.port).start();
  const node = nodeSources(proxy.base, "outage", NODE_SOURCES);
  const page = await openPages(`${proxy.base}/e2e/sources.html?channels=outage`);
  t.after(async () => {
    for (const { source } of node) source.close();
    await page.close();
    await proxy.stop();
    await server.stop();
    await redis.kill();
  });
  await untilEvery(page, node, (source) => source.readyState === OPEN, "every source open");
  await publish(server.base, "outage", { n: 1 });
  await untilEvery(page, node, hasEvent(1), "event 1 everywhere");

  await redis.kill();
  assert.equal(redis.running, false, "Redis is down");
  // Cut every stream at the proxy: each source comes back while Redis is still down.
  const acceptedBefore = proxy.accepted;
  const streamsBefore = (await everySource(page, node)).map((source) => source.subscribed);
  assert.ok(proxy.cutAll() >= BROWSER_SOURCES + NODE_SOURCES, "every stream was cut");
  const sources = BROWSER_SOURCES + NODE_SOURCES;
  await eventually(() => proxy.accepted >= acceptedBefore + 2 * sources, { message: "two reconnects per source during the outage" });
  assert.equal(redis.running, false, "the reconnects happened during the outage");
  const during = await everySource(page, node);
  assert.ok(during.every((source) => source.readyState !== CLOSED), `no source gave up: ${JSON.stringify(during.map((source) => source.readyState))}`);

  await redis.restart();
  // Every source opens a real stream again by itself; then the next event must reach all.
  await untilEvery(page, node, (source, index) => source.readyState === OPEN && source.subscribed > streamsBefore[index], "every source streaming again");
  await publishWhenReady(server.base, "outage", { n: 2 });
  const after = await untilEvery(page, node, hasEvent(2), "event 2 everywhere after the outage");
  for (const [index, source] of after.entries()) {
    assert.equal(source.readyState, OPEN, `source ${index} is open`);
    assert.ok(source.opens >= 2, `source ${index} reconnected (${source.opens} opens)`);
  }
});

test("a bare EventSource that only listens for reset is told when history no longer reaches back", async (t) => {
  const { server, proxy, context } = await stack(browser, t, ["--history-size", "5"]);
  const page = await context.newPage();
  await page.goto(`${proxy.base}/e2e/sources.html?count=1&channels=trimmed`);
  const summary = async () => (await page.evaluate(() => window.summary()))[0];
  await eventually(async () => (await summary()).subscribed === 1, { message: "stream open" });
  await publish(server.base, "trimmed", { n: 1 });
  await eventually(async () => (await summary()).events.length === 1, { message: "event 1" });
  assert.ok(proxy.cutAll() >= 1, "the stream was cut");
  // EventSource waits its retry time (1 s) before coming back: 20 events go out meanwhile,
  // and history keeps only the last 5.
  for (let n = 2; n <= 21; n++) await publish(server.base, "trimmed", { n });
  const back = await eventually(async () => {
    const source = await summary();
    return source.resets.length > 0 && source;
  }, { message: "a reset after the reconnect" });
  assert.ok(back.subscribed >= 2, "the reset came with the reconnect");
  assert.deepEqual(back.resets.map((reset) => [reset.channel, reset.reason, reset.position.seq]), [["trimmed", "truncated", 21]]);
  assert.equal(back.readyState, OPEN);
});
