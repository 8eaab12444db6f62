// End-to-end tests in headless Chromium against the real resync-server binary.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { Proxy, channelInfo, eventually, launch, publish, signToken, sleep, stack as sharedStack, startServer } from "./helpers.js";

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

/** A server with a proxy in front, torn down after the test. */
const stack = (t, serverArgs = []) => sharedStack(browser, t, serverArgs);

const seqs = (received) => received.map((event) => event.seq);
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, index) => from + index);

async function received(page) {
  return page.evaluate(() => window.received);
}

/**
 * Waits until the server counts a subscriber of `channel`. Connected is not yet subscribed,
 * and a page follows from now: under load its subscribe can reach the server after the
 * first publish, which it then never sees.
 */
async function waitSubscribed(base, channel) {
  await eventually(async () => (await channelInfo(base, channel)).subscribers >= 1, { message: `${channel} subscribed` });
}

async function waitConnected(page, transport) {
  await eventually(
    () => page.evaluate((wanted) => window.client?.state.status === "connected" && (!wanted || window.client.state.transport === wanted), transport),
    { message: `connected over ${transport || "any transport"}` },
  );
}

test("the page shows 200 published events in order", async (t) => {
  const { server, proxy, context } = await stack(t);
  const page = await context.newPage();
  await page.goto(`${proxy.base}/e2e/follow.html?channel=feed`);
  await waitConnected(page);
  await waitSubscribed(server.base, "feed");
  for (let n = 1; n <= 200; n++) await publish(server.base, "feed", { n });
  await eventually(async () => (await received(page)).length >= 200, { message: "200 events" });
  assert.deepEqual(seqs(await received(page)), range(1, 200));
  assert.equal(await page.locator("#events li").count(), 200);
  assert.equal(await page.locator("#events li").last().textContent(), '#200 {"n":200}');
});

test("offline for several seconds, then everything arrives in order, once", async (t) => {
  const { server, proxy, context } = await stack(t);
  const page = await context.newPage();
  await page.goto(`${proxy.base}/e2e/follow.html?channel=offline`);
  await waitConnected(page, "websocket");
  await waitSubscribed(server.base, "offline");
  for (let n = 1; n <= 20; n++) await publish(server.base, "offline", { n });
  await eventually(async () => (await received(page)).length >= 20, { message: "first 20" });

  await context.setOffline(true);
  // Chromium's offline mode leaves open connections running: cut them at the proxy too.
  const cut = proxy.cutAll();
  assert.ok(cut >= 1, "a live connection was cut");
  for (let n = 21; n <= 60; n++) await publish(server.base, "offline", { n });
  await sleep(3000);
  assert.ok((await received(page)).length < 60, "nothing arrived while offline");
  await context.setOffline(false);

  await eventually(async () => (await received(page)).length >= 60, { message: "all 60 after coming back" });
  await sleep(300);
  assert.deepEqual(seqs(await received(page)), range(1, 60), "in order, none twice");
  assert.ok((await page.evaluate(() => window.client.reconnects)) >= 1, "the client reconnected");
});

test("blocked WebSockets fall back to SSE, then to long polling, and still deliver everything", async (t) => {
  const { server, proxy, context } = await stack(t);
  proxy.refuseWebSocket = true;
  const ssePage = await context.newPage();
  await ssePage.goto(`${proxy.base}/e2e/follow.html?channel=fallback`);
  await waitConnected(ssePage, "sse");

  proxy.refuseSse = true;
  const pollPage = await context.newPage();
  await pollPage.goto(`${proxy.base}/e2e/follow.html?channel=fallback`);
  await waitConnected(pollPage, "long-polling");

  for (let n = 1; n <= 30; n++) await publish(server.base, "fallback", { n });
  for (const page of [ssePage, pollPage]) {
    await eventually(async () => (await received(page)).length >= 30, { message: "30 events" });
    assert.deepEqual(seqs(await received(page)), range(1, 30));
  }
  assert.ok(proxy.refused >= 3, `the proxy refused ${proxy.refused} requests`);
});

test("a restarted in-memory server shows a reset and the page refetches", async (t) => {
  const server = await startServer();
  const proxy = await new Proxy(server.port).start();
  const context = await browser.newContext();
  let second;
  t.after(async () => {
    await context.close();
    await proxy.stop();
    await server.stop();
    await second?.stop();
  });
  const page = await context.newPage();
  await page.goto(`${proxy.base}/e2e/follow.html?channel=restart`);
  await waitConnected(page);
  await waitSubscribed(server.base, "restart");
  await publish(server.base, "restart", { n: 1 });
  await eventually(async () => (await received(page)).length === 1, { message: "first event" });

  await server.stop();
  second = await startServer();
  proxy.upstreamPort = second.port;
  proxy.cutAll();
  const resets = await eventually(async () => {
    const resets = await page.evaluate(() => window.resets);
    return resets.length > 0 && resets;
  }, { message: "a reset" });
  assert.equal(resets[0].reason, "epoch_changed");
  assert.ok((await page.evaluate(() => window.refetches)) >= 1, "the page refetched");
  await publish(second.base, "restart", { n: "after" });
  await eventually(async () => (await received(page)).some((event) => event.data.n === "after"), { message: "new event" });
});

function freePort() {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

test("with the Redis broker, a server restart resumes with no loss and no reset", async (t) => {
  const port = await freePort();
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "resync-e2e-redis-"));
  const redis = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory], { stdio: "ignore" });
  t.after(() => {
    redis.kill("SIGKILL");
    fs.rmSync(directory, { recursive: true, force: true });
  });
  await eventually(
    () => new Promise((resolve) => net.connect(port, "127.0.0.1").on("connect", function () { this.destroy(); resolve(true); }).on("error", () => resolve(false))),
    { message: "redis up" },
  );
  const redisArgs = ["--broker", "redis", "--redis-url", `redis://127.0.0.1:${port}/`];
  const first = await startServer(redisArgs);
  const proxy = await new Proxy(first.port).start();
  const context = await browser.newContext();
  let second;
  t.after(async () => {
    await context.close();
    await proxy.stop();
    await first.stop();
    await second?.stop();
  });
  const page = await context.newPage();
  await page.goto(`${proxy.base}/e2e/follow.html?channel=durable`);
  await waitConnected(page);
  await waitSubscribed(first.base, "durable");
  for (let n = 1; n <= 10; n++) await publish(first.base, "durable", { n });
  await eventually(async () => (await received(page)).length >= 10, { message: "first 10" });

  await first.stop();
  second = await startServer(redisArgs);
  for (let n = 11; n <= 30; n++) await publish(second.base, "durable", { n });
  proxy.upstreamPort = second.port;
  proxy.cutAll();
  await eventually(async () => (await received(page)).length >= 30, { message: "all 30" });
  await sleep(300);
  assert.deepEqual(seqs(await received(page)), range(1, 30));
  assert.deepEqual(await page.evaluate(() => window.resets), [], "no reset: history survived in redis");
});

test("bare EventSource resumes a multi-channel stream through Last-Event-ID", async (t) => {
  const { server, proxy, context } = await stack(t);
  const page = await context.newPage();
  await page.goto(`${proxy.base}/e2e/bare.html?channels=a,b`);
  await eventually(() => page.evaluate(() => window.opens >= 1), { message: "stream open" });
  for (let n = 1; n <= 10; n++) {
    await publish(server.base, "a", { n });
    await publish(server.base, "b", { n });
  }
  await eventually(async () => (await received(page)).length >= 20, { message: "first 20" });
  // Kill the stream on the server side, mid-stream, and keep publishing while it is down.
  assert.ok(proxy.cutAll() >= 1);
  for (let n = 11; n <= 20; n++) {
    await publish(server.base, "a", { n });
    await publish(server.base, "b", { n });
  }
  await eventually(async () => (await received(page)).length >= 40, { message: "all 40" });
  await sleep(300);
  const events = await received(page);
  for (const channel of ["a", "b"]) {
    assert.deepEqual(seqs(events.filter((event) => event.channel === channel)), range(1, 20), channel);
  }
  assert.ok((await page.evaluate(() => window.opens)) >= 2, "EventSource reconnected by itself");
});

test("an unmounted React component leaves no socket and schedules no reconnect", async (t) => {
  const { server, proxy, context } = await stack(t);
  const page = await context.newPage();
  await page.goto(`${proxy.base}/e2e/react.html`);
  await eventually(() => page.evaluate(() => window.lastState?.status === "connected"), { message: "connected" });
  await publish(server.base, "react-feed", { n: 1 });
  await eventually(async () => (await page.locator("#events li").count()) === 1, { message: "rendered event" });
  assert.equal((await channelInfo(server.base, "react-feed")).subscribers, 1);

  await page.evaluate(() => window.unmount());
  await eventually(async () => (await channelInfo(server.base, "react-feed")).subscribers === 0, { message: "unsubscribed" });
  // Cut whatever is left; a live client would now reconnect within its backoff (≤ 0.5 s).
  proxy.cutAll();
  const acceptedAfterUnmount = proxy.accepted;
  await sleep(2000);
  assert.equal(proxy.accepted, acceptedAfterUnmount, "no reconnect after unmount");
  assert.equal((await channelInfo(server.base, "react-feed")).subscribers, 0);
});

test("hooks under one ResyncProvider share one connection, and a channel change drops the old channel's events", async (t) => {
  const { server, proxy, context } = await stack(t);
  const page = await context.newPage();
  await page.goto(`${proxy.base}/e2e/react-provider.html`);
  await eventually(() => page.evaluate(() => window.lastState?.status === "connected"), { message: "connected" });
  await eventually(async () => (await channelInfo(server.base, "room-1")).subscribers === 1, { message: "switcher subscribed" });
  for (const channel of ["feed-a", "feed-b", "feed-c", "room-1"]) await publish(server.base, channel, { n: 1 });
  for (const channel of ["feed-a", "feed-b", "feed-c"]) {
    await eventually(async () => (await page.locator(`#feed-${channel} li`).count()) === 1, { message: `${channel} rendered` });
    assert.equal((await channelInfo(server.base, channel)).subscribers, 1, channel);
  }
  await eventually(async () => (await page.locator("#switcher li").allTextContents()).join() === "room-1#1", { message: "room-1 rendered" });
  assert.equal(proxy.upgrades, 1, "four hooks, one WebSocket");

  await page.evaluate(() => window.switchTo("room-2"));
  await eventually(async () => (await channelInfo(server.base, "room-2")).subscribers === 1, { message: "room-2 subscribed" });
  assert.equal(await page.locator("#switcher li").count(), 0, "room-1's events are gone with the switch");
  await publish(server.base, "room-1", { n: 2 });
  await publish(server.base, "room-2", { n: 1 });
  await eventually(async () => (await page.locator("#switcher li").allTextContents()).join() === "room-2#1", { message: "only room-2 rendered" });
  await eventually(async () => (await channelInfo(server.base, "room-1")).subscribers === 0, { message: "room-1 dropped" });
  assert.equal(proxy.upgrades, 1, "the switch reused the connection");
});

test("the demo page works and a screenshot is saved", async (t) => {
  const server = await startServer(["--demo", "true"]);
  const context = await browser.newContext({ viewport: { width: 1100, height: 640 } });
  t.after(async () => {
    await context.close();
    await server.stop();
  });
  const page = await context.newPage();
  await page.goto(`${server.base}/`);
  await eventually(async () => (await page.textContent("#state")).includes("connected"), { message: "demo connected" });
  await page.fill("#chat-input", "hello from the end-to-end test");
  await page.click("#chat-form button");
  await eventually(async () => (await page.textContent("#chat")).includes("hello from the end-to-end test"), { message: "chat echo" });
  await eventually(async () => (await page.locator("#feed li").count()) >= 1, { message: "a ticker event" });
  assert.equal(await page.textContent("#transport"), "websocket");

  // A new visitor sees the conversation so far.
  const visitor = await context.newPage();
  await visitor.goto(`${server.base}/`);
  await eventually(async () => (await visitor.textContent("#chat")).includes("hello from the end-to-end test"), { message: "history for a new visitor" });
  await visitor.close();

  // The promise, shown: cut the page's own connection while the server keeps publishing.
  const reconnectsBefore = Number(await page.textContent("#reconnects"));
  await page.click("#cut");
  await eventually(async () => (await page.textContent("#state")).includes("reconnecting"), { message: "offline" });
  for (let n = 1; n <= 3; n++) await publish(server.base, "demo:chat", { from: "server", text: `while you were away ${n}` });
  // Both channels resume (the ticker's missed ticks count too): at least the 3 messages.
  const missed = async () => Number((await page.textContent("#replayed")).match(/^(\d+) missed/)?.[1] ?? 0);
  await eventually(async () => (await missed()) >= 3, { message: "the replay count", timeout: 15000 });
  const chat = await page.locator("#chat li").allTextContents();
  const away = chat.filter((line) => line.includes("while you were away")).reverse();
  assert.deepEqual(away.map((line) => line.replace(/^#\d+/, "")), [1, 2, 3].map((n) => `server: while you were away ${n}`));
  assert.ok(Number(await page.textContent("#reconnects")) > reconnectsBefore, "the page reconnected");
  const directory = process.env.RESYNC_E2E_ARTIFACTS || path.join(os.tmpdir(), "resync-e2e");
  fs.mkdirSync(directory, { recursive: true });
  const file = path.join(directory, "demo.png");
  await page.screenshot({ path: file });
  assert.ok(fs.statSync(file).size > 10000, "screenshot written");
});

test("two pages of the demo see each other appear and disappear", async (t) => {
  const server = await startServer(["--demo", "true"]);
  const context = await browser.newContext();
  t.after(async () => {
    await context.close();
    await server.stop();
  });
  const online = (page) => page.evaluate(() => window.resyncDemo?.online ?? []);
  const nameOf = (page) => page.evaluate(() => window.resyncDemo.client && document.querySelector("#online").textContent);
  const first = await context.newPage();
  await first.goto(`${server.base}/`);
  await eventually(async () => (await online(first)).length === 1, { message: "the first page sees itself" });
  const [firstName] = await online(first);
  const second = await context.newPage();
  await second.goto(`${server.base}/`);
  await eventually(async () => (await online(second)).length === 2, { message: "the second page sees both" });
  await eventually(async () => (await online(first)).length === 2, { message: "the first page sees the second arrive" });
  assert.ok((await online(second)).includes(firstName), "the second page lists the first by its name");
  assert.ok((await nameOf(first)).includes(firstName), "and shows it");
  await second.close();
  await eventually(async () => (await online(first)).length === 1, { message: "the first page sees the second leave" });
  assert.deepEqual(await online(first), [firstName]);
});

test("a page refreshes its token in place across short expiries, on one WebSocket, losing nothing", async (t) => {
  const secret = "e2e-jwt-secret-long-enough-for-hs256-0123456789";
  const { server, proxy, context } = await stack(t, ["--jwt-secret", secret]);
  const page = await context.newPage();
  // Tokens of 2 s: the page asks for one before each expiry.
  await page.exposeFunction("mintToken", () =>
    signToken({ sub: "ann", exp: Math.floor(Date.now() / 1000) + 2, subscribe: ["feed"] }, secret),
  );
  await page.goto(`${proxy.base}/e2e/follow.html?channel=feed&transport=websocket&refresh=1`);
  await waitConnected(page, "websocket");
  await waitSubscribed(server.base, "feed");
  for (let n = 1; n <= 70; n++) {
    await publish(server.base, "feed", { n });
    await sleep(100);
  }
  await eventually(async () => (await received(page)).length >= 70, { message: "70 events" });
  assert.deepEqual(seqs(await received(page)), range(1, 70));
  const states = await page.evaluate(() => window.states.map((state) => state.status));
  assert.equal(states.filter((status) => status === "connected").length, 1, `one connection throughout: ${states}`);
  assert.ok(!states.includes("reconnecting"), `never reconnected: ${states}`);
  const minted = await page.evaluate(() => window.minted);
  assert.ok(minted >= 4, `the first token and at least 3 refreshes over 7 s of 2 s tokens (minted ${minted})`);
});
