// What a new app meets when it adopts the browser package (issue 27, defects 1 and 4-8), in
// headless Chromium against the real server binary.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { Proxy, channelInfo, eventually, launch, publish, signToken, stack as sharedStack, startServer } from "./helpers.js";

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

const stack = (t, serverArgs = []) => sharedStack(browser, t, serverArgs);

/** Opens a test page and waits for its module to load. */
async function open(context, proxy, name) {
  const page = await context.newPage();
  await page.goto(`${proxy.base}/e2e/${name}`);
  await page.waitForFunction(() => window.ready === true);
  return page;
}

const text = (page, selector) => page.locator(selector).textContent({ timeout: 1000 }).catch(() => null);
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, index) => from + index);

test("defect 1: two hooks on one channel share one subscription", async (t) => {
  const { server, proxy, context } = await stack(t);
  const page = await open(context, proxy, "react-lab.html");
  await page.evaluate(() => {
    const React = window.React;
    const h = React.createElement;
    const { ResyncProvider, useChannel, usePresence } = window.hooks;
    // A feed, a badge beside it, and who is online: three hooks on "news".
    function Feed() {
      const { events } = useChannel("news");
      return h("ul", { id: "feed" }, events.map((event) => h("li", { key: event.seq }, String(event.data.n))));
    }
    function Badge() {
      const { events } = useChannel("news");
      return h("b", { id: "badge" }, String(events.length));
    }
    function Who() {
      const members = usePresence("news", { info: { name: "ann" } });
      return h("p", { id: "who" }, members.map((member) => member.info?.name).join(","));
    }
    function App() {
      const [badge, setBadge] = React.useState(true);
      window.setBadge = setBadge;
      return h(React.Fragment, null, h(Feed), badge ? h(Badge) : null, h(Who));
    }
    window.mount(h(ResyncProvider, { url: location.origin, options: { backoff: { initial: 100, max: 500 } } }, h(App)));
  });
  await eventually(
    async () => (await text(page, "#who")) === "ann" || (await page.evaluate(() => window.errors.length > 0)),
    { message: "the member list (or a crash)" },
  );
  assert.deepEqual(await page.evaluate(() => window.errors), [], "no hook threw");
  assert.equal((await channelInfo(server.base, "news")).subscribers, 1, "three hooks, one subscription");

  for (let n = 1; n <= 3; n++) await publish(server.base, "news", { n });
  await eventually(async () => (await page.locator("#feed li").count()) === 3 && (await text(page, "#badge")) === "3", {
    message: "both hooks show the 3 events",
  });
  // One hook leaves: the others keep the subscription, and presence stays.
  await page.evaluate(() => window.setBadge(false));
  await publish(server.base, "news", { n: 4 });
  await eventually(async () => (await page.locator("#feed li").count()) === 4, { message: "the 4th event" });
  assert.deepEqual(await page.locator("#feed li").allTextContents(), ["1", "2", "3", "4"]);
  assert.equal((await channelInfo(server.base, "news")).subscribers, 1);
  assert.equal(await text(page, "#who"), "ann");
  await page.evaluate(() => window.unmount());
  await eventually(async () => (await channelInfo(server.base, "news")).subscribers === 0, { message: "unsubscribed with the last hook" });
  assert.deepEqual(await page.evaluate(() => window.errors), []);
});

test("defect 1: two subscriptions of one channel on one client keep their own positions, on every transport", async (t) => {
  const { server, proxy, context } = await stack(t);
  const page = await open(context, proxy, "lib.html");
  for (const transport of ["websocket", "sse", "long-polling"]) {
    const channel = `positions-${transport}`;
    await page.evaluate(({ transport, channel }) => {
      const client = new window.resync.ResyncClient(location.origin, { transport, backoff: { initial: 100, max: 500 }, pollTimeout: 2 });
      const run = (window.run = { client, first: [], second: [] });
      run.firstSubscription = client.subscribe(channel, { onEvent: (event) => run.first.push(event.seq) });
    }, { transport, channel });
    // From now: its position is known once the server has answered the subscribe.
    await eventually(() => page.evaluate(() => window.run.firstSubscription.position() !== undefined), { message: `${transport}: subscribed` });
    const positions = [];
    for (let n = 1; n <= 5; n++) positions.push(await publish(server.base, channel, { n }));
    await eventually(() => page.evaluate(() => window.run.first.length === 5), { message: `${transport}: 5 events` });

    // A second subscription of the same channel, from event 2: it gets 3-5 replayed, the
    // first gets nothing twice.
    await page.evaluate(({ channel, since }) => {
      const run = window.run;
      run.secondSubscription = run.client.subscribe(channel, { since, onEvent: (event) => run.second.push(event.seq) });
    }, { channel, since: positions[1] });
    await eventually(() => page.evaluate(() => window.run.second.length === 3), { message: `${transport}: the replay` });
    await publish(server.base, channel, { n: 6 });
    await eventually(() => page.evaluate(() => window.run.first.length === 6 && window.run.second.length === 4), { message: `${transport}: event 6 to both` });
    // The first leaves; the second goes on.
    await page.evaluate(() => window.run.firstSubscription.unsubscribe());
    await publish(server.base, channel, { n: 7 });
    await eventually(() => page.evaluate(() => window.run.second.length === 5), { message: `${transport}: event 7` });
    const run = await page.evaluate(() => ({ first: window.run.first, second: window.run.second }));
    assert.deepEqual(run.first, range(1, 6), `${transport}: the first subscription`);
    assert.deepEqual(run.second, range(3, 7), `${transport}: the second subscription`);
    await page.evaluate(() => window.run.client.close());
  }
});

test("defect 4: after a fallback to SSE the client goes back to WebSocket, and says what SSE cannot do", async (t) => {
  const { server, proxy, context } = await stack(t, ["--anonymous-publish", "room"]);
  proxy.refuseWebSocket = true;
  const page = await open(context, proxy, "lib.html");
  await page.evaluate(() => {
    const client = new window.resync.ResyncClient(location.origin, { upgradeAfter: 500, backoff: { initial: 100, max: 500 } });
    Object.assign(window, { client, states: [], errors: [], received: [], members: [] });
    client.onState((state) => window.states.push(state));
    window.subscription = client.subscribe("room", {
      presence: { info: { name: "ann" } },
      onPresence: (members) => { window.members = members; },
      onError: (error) => window.errors.push({ name: error.name, code: error.code, message: error.message }),
      onEvent: (event) => window.received.push(event.seq),
    });
  });
  await eventually(() => page.evaluate(() => window.client.state.status === "connected"), { message: "connected" });
  const state = await page.evaluate(() => window.client.state);
  assert.equal(state.transport, "sse");
  assert.deepEqual(state.capabilities, { publish: false, presence: false }, "the state says what SSE cannot do");
  const refusal = await page.evaluate(() =>
    window.client.publish("room", { n: 0 }).then(() => null, (error) => ({ name: error.name, code: error.code, message: error.message })),
  );
  assert.equal(refusal?.name, "ResyncError", JSON.stringify(refusal));
  assert.equal(refusal.code, "publish_unavailable");
  const errors = await page.evaluate(() => window.errors);
  assert.ok(errors.some((error) => error.code === "presence_unavailable"), `presence says it is unavailable: ${JSON.stringify(errors)}`);

  await eventually(() => page.evaluate(() => window.subscription.position() !== undefined), { message: "subscribed over SSE" });
  for (let n = 1; n <= 5; n++) await publish(server.base, "room", { n });
  // The proxy lets WebSockets through again: the client moves over by itself, without a
  // reconnect, and loses nothing on the way.
  const statesBefore = await page.evaluate(() => window.states.length);
  proxy.refuseWebSocket = false;
  await eventually(() => page.evaluate(() => window.client.state.status === "connected" && window.client.state.transport === "websocket"), {
    message: "back on WebSocket",
    timeout: 15000,
  });
  for (let n = 6; n <= 10; n++) await publish(server.base, "room", { n });
  await eventually(() => page.evaluate(() => window.received.length >= 10), { message: "10 events" });
  assert.deepEqual(await page.evaluate(() => window.received), range(1, 10), "in order, none twice");
  const later = await page.evaluate((from) => window.states.slice(from).map((state) => state.status), statesBefore);
  assert.ok(!later.includes("reconnecting"), `no reconnect on the way: ${later}`);
  assert.deepEqual((await page.evaluate(() => window.client.state)).capabilities, { publish: true, presence: true });
  await eventually(() => page.evaluate(() => window.members.some((member) => member.info?.name === "ann")), { message: "presence over WebSocket" });
  const position = await page.evaluate(() => window.client.publish("room", { n: 11 }));
  assert.equal(position.seq, 11);
});

test("defect 5: a changed token on ResyncProvider takes effect", async (t) => {
  const secret = "e2e-jwt-secret-long-enough-for-hs256-0123456789";
  const { server, proxy, context } = await stack(t, ["--jwt-secret", secret]);
  const exp = Math.floor(Date.now() / 1000) + 600;
  const tokens = {
    ann: signToken({ sub: "ann", exp, subscribe: ["team"] }, secret),
    bob: signToken({ sub: "bob", exp, subscribe: ["team"] }, secret),
  };
  const page = await open(context, proxy, "react-lab.html");
  await page.evaluate((tokens) => {
    const React = window.React;
    const h = React.createElement;
    const { ResyncProvider, usePresence } = window.hooks;
    function Who() {
      return h("p", { id: "who" }, usePresence("team").map((member) => member.id).join(","));
    }
    function App() {
      // As an app does after a login: the token comes from its own state.
      const [token, setToken] = React.useState(tokens.ann);
      const [asProp, setAsProp] = React.useState(undefined);
      window.setToken = setToken;
      window.setTokenProp = setAsProp;
      return h(ResyncProvider, { url: location.origin, token: asProp, options: { token, backoff: { initial: 100, max: 500 } } }, h(Who));
    }
    window.mount(h(App));
  }, tokens);
  await eventually(async () => (await text(page, "#who")) === "ann", { message: "ann is online" });
  await page.evaluate((token) => window.setToken(token), tokens.bob);
  await eventually(async () => (await text(page, "#who")) === "bob", { message: "the page is bob's after the token changed" });
  // The `token` prop, when given, is the one used.
  await page.evaluate((token) => window.setTokenProp(token), tokens.ann);
  await eventually(async () => (await text(page, "#who")) === "ann", { message: "the token prop took effect" });
  assert.deepEqual(await page.evaluate(() => window.errors), []);
  assert.equal((await channelInfo(server.base, "team")).subscribers, 1, "one subscription: the old connection is gone");
});

test("defect 6: a client made with autoConnect: false connects on its first subscribe", async (t) => {
  const { server, proxy, context } = await stack(t);
  const page = await open(context, proxy, "lib.html");
  await page.evaluate(() => {
    const { ResyncClient } = window.resync;
    window.lazy = new ResyncClient(location.origin, { autoConnect: false });
    window.eager = new ResyncClient(location.origin);
  });
  await eventually(() => page.evaluate(() => window.eager.state.status === "connected"), { message: "the eager client connected" });
  assert.deepEqual(await page.evaluate(() => window.lazy.state), { status: "idle" });
  assert.equal(proxy.upgrades, 1, "only the eager client connected");
  await page.evaluate(() => {
    window.received = [];
    window.lazySubscription = window.lazy.subscribe("lazy", { onEvent: (event) => window.received.push(event.seq) });
  });
  await eventually(() => page.evaluate(() => window.lazySubscription.position() !== undefined), { message: "the lazy client subscribed" });
  await publish(server.base, "lazy", { n: 1 });
  await eventually(() => page.evaluate(() => window.received.length === 1), { message: "an event" });
  assert.equal(proxy.upgrades, 2);
});

test("defect 7: an outage retries only the last good transport, quietly, and the page is back at once on focus", async (t) => {
  let server = await startServer();
  const proxy = await new Proxy(server.port).start();
  const context = await browser.newContext();
  t.after(async () => {
    await context.close();
    await proxy.stop();
    await server.stop();
  });
  const page = await open(context, proxy, "lib.html");
  const consoleErrors = [];
  page.on("console", (message) => {
    if (message.type() === "error") consoleErrors.push(message.text());
  });
  // The default backoff; every random draw at its top, so the delays are the ceilings.
  await page.evaluate(() => {
    const client = new window.resync.ResyncClient(location.origin, { random: () => 0.999 });
    Object.assign(window, { client, states: [], received: [] });
    client.onState((state) => window.states.push(state));
    window.subscription = client.subscribe("outage", { onEvent: (event) => window.received.push(event.data.n) });
  });
  await eventually(() => page.evaluate(() => window.client.state.transport === "websocket" && window.subscription.position() !== undefined), {
    message: "subscribed over WebSocket",
  });

  // The server goes away for good: five reconnects (0.5 + 1 + 2 + 4 s of waiting).
  const requestsBefore = proxy.requests.length;
  const errorsBefore = consoleErrors.length;
  await server.stop();
  proxy.cutAll();
  await eventually(() => page.evaluate(() => window.client.reconnects >= 5), { message: "5 reconnects", timeout: 30000 });
  const outage = await page.evaluate(() => ({
    reconnects: window.client.reconnects,
    delays: window.states.filter((state) => state.status === "reconnecting").map((state) => state.delay),
  }));
  const requests = proxy.requests.slice(requestsBefore);
  const errors = consoleErrors.slice(errorsBefore);
  t.diagnostic(`outage: ${outage.reconnects} reconnects, delays ${outage.delays}, requests ${requests.join(", ")}, ${errors.length} console errors`);
  assert.ok(Math.max(...outage.delays) <= 5000, `the backoff is capped at 5 s: ${outage.delays}`);
  assert.deepEqual(requests.filter((request) => !request.startsWith("UPGRADE ") && !request.startsWith("GET /poll")), [], "nothing but WebSocket attempts and reachability checks");
  const upgrades = requests.filter((request) => request.startsWith("UPGRADE ")).length;
  assert.ok(upgrades <= outage.reconnects, `one WebSocket attempt per reconnect: ${requests}`);
  assert.ok(requests.length <= outage.reconnects + 2, `few requests: ${requests}`);
  assert.ok(errors.length <= requests.length, `at most one console error per failed request: ${errors.join("\n")}`);

  // The server is back; the page, in a 5 s wait, is told the window got focus.
  server = await startServer();
  proxy.upstreamPort = server.port;
  const back = Date.now();
  await page.evaluate(() => window.dispatchEvent(new Event("focus")));
  await eventually(() => page.evaluate(() => window.client.state.status === "connected"), { message: "back within 2 s of focus", timeout: 2000 });
  const returned = Date.now() - back;
  await eventually(() => page.evaluate(() => window.subscription.position()?.epoch), { message: "subscribed again" });
  await publish(server.base, "outage", { n: 2 });
  await eventually(() => page.evaluate(() => window.received.includes(2)), { message: "an event after the return" });

  // Again, with the page becoming visible.
  await server.stop();
  proxy.cutAll();
  await eventually(() => page.evaluate(() => window.client.state.status === "reconnecting" && window.client.state.delay >= 4000), {
    message: "a long wait",
  });
  server = await startServer();
  proxy.upstreamPort = server.port;
  await page.evaluate(() => document.dispatchEvent(new Event("visibilitychange")));
  await eventually(() => page.evaluate(() => window.client.state.status === "connected"), { message: "back within 2 s of becoming visible", timeout: 2000 });
  assert.ok(returned < 2000, `returned ${returned} ms after focus`);
  t.diagnostic(`back ${returned} ms after focus`);
});

test("defect 8: useChannel takes onEvent, onReset, enabled and a start position", async (t) => {
  const { server, proxy, context } = await stack(t);
  const positions = [];
  for (let n = 1; n <= 5; n++) positions.push(await publish(server.base, "options", { n }));
  const page = await open(context, proxy, "react-lab.html");
  await page.evaluate(({ since }) => {
    const React = window.React;
    const h = React.createElement;
    const { ResyncProvider, useChannel, useResyncState } = window.hooks;
    Object.assign(window, { seen: [], resets: [] });
    function Feed() {
      const [enabled, setEnabled] = React.useState(false);
      window.setEnabled = setEnabled;
      const { events } = useChannel("options", {
        enabled,
        since,
        onEvent: (event) => window.seen.push(event.seq),
      });
      return h("ul", { id: "feed" }, events.map((event) => h("li", { key: event.seq }, String(event.seq))));
    }
    function Stale() {
      // A position of an epoch the server does not have: it answers with a reset.
      useChannel("options", { since: { epoch: "gone", seq: 3 }, onReset: (reset) => window.resets.push(reset.reason) });
      return null;
    }
    function State() {
      return h("p", { id: "state" }, useResyncState().status);
    }
    window.mount(h(ResyncProvider, { url: location.origin, options: { backoff: { initial: 100, max: 500 } } }, h(State), h(Feed)));
    window.addStale = () => window.mount(h(ResyncProvider, { url: location.origin }, h(State), h(Stale)));
  }, { since: positions[1] });
  await eventually(async () => (await text(page, "#state")) === "connected", { message: "connected" });
  assert.equal((await channelInfo(server.base, "options")).subscribers, 0, "a disabled hook does not subscribe");
  await page.evaluate(() => window.setEnabled(true));
  await eventually(() => page.evaluate(() => window.seen.length === 3), { message: "events after the start position" });
  assert.deepEqual(await page.evaluate(() => window.seen), [3, 4, 5], "onEvent saw what followed event 2");
  assert.deepEqual(await page.locator("#feed li").allTextContents(), ["3", "4", "5"]);
  await publish(server.base, "options", { n: 6 });
  await eventually(() => page.evaluate(() => window.seen.length === 4), { message: "a live event" });
  await page.evaluate(() => window.setEnabled(false));
  await eventually(async () => (await channelInfo(server.base, "options")).subscribers === 0, { message: "disabled again: unsubscribed" });
  assert.equal(await page.locator("#feed li").count(), 0, "a disabled hook holds no events");

  await page.evaluate(() => window.addStale());
  await eventually(() => page.evaluate(() => window.resets.length === 1), { message: "onReset" });
  assert.deepEqual(await page.evaluate(() => window.resets), ["epoch_changed"]);
  assert.deepEqual(await page.evaluate(() => window.errors), []);
});

test("defect 8: useSnapshotChannel loads a snapshot, follows from its position, and loads again after a reset", async (t) => {
  let server = await startServer();
  const proxy = await new Proxy(server.port).start();
  const context = await browser.newContext();
  t.after(async () => {
    await context.close();
    await proxy.stop();
    await server.stop();
  });
  // The app's backend: the total of the published numbers, with the position it stands for.
  let snapshot;
  let fetches = 0;
  const page = await open(context, proxy, "react-lab.html");
  await page.exposeFunction("snapshotFromBackend", () => {
    fetches += 1;
    if (fetches === 1) throw new Error("backend busy");
    return snapshot;
  });
  const positions = [];
  for (let n = 1; n <= 5; n++) positions.push(await publish(server.base, "total", { n }));
  snapshot = { state: 15, position: positions[4] };
  // Published after the snapshot was taken: the hook must replay them from its position.
  for (let n = 6; n <= 8; n++) await publish(server.base, "total", { n });
  await page.evaluate(() => {
    const h = window.React.createElement;
    const { ResyncProvider, useSnapshotChannel } = window.hooks;
    window.views = [];
    function Total() {
      const view = useSnapshotChannel("total", {
        fetchSnapshot: () => window.snapshotFromBackend(),
        reduce: (total, event) => total + event.data.n,
      });
      window.views.push({ data: view.data, loading: view.loading, error: view.error ? String(view.error.message ?? view.error) : null });
      window.lastReset = view.lastReset;
      return h("p", { id: "total" }, view.loading ? "loading" : String(view.data));
    }
    window.mount(h(ResyncProvider, { url: location.origin, options: { backoff: { initial: 100, max: 500 } } }, h(Total)));
  });
  await eventually(async () => (await text(page, "#total")) === "36", { message: "15 + 6 + 7 + 8" });
  assert.equal(fetches, 2, "the failed fetch was tried again");
  assert.ok((await page.evaluate(() => window.views)).some((view) => view.error?.includes("backend busy")), "the failure was shown");
  await publish(server.base, "total", { n: 9 });
  await eventually(async () => (await text(page, "#total")) === "45", { message: "a live event applied" });

  // A restart of the in-memory server: the channel's history is gone, the hook is reset and
  // loads the snapshot again.
  await server.stop();
  server = await startServer();
  const first = await publish(server.base, "total", { n: 1000 });
  snapshot = { state: 2000, position: first };
  proxy.upstreamPort = server.port;
  proxy.cutAll();
  await eventually(async () => (await text(page, "#total")) === "2000", { message: "the new snapshot" });
  await publish(server.base, "total", { n: 5 });
  await eventually(async () => (await text(page, "#total")) === "2005", { message: "followed from the new snapshot" });
  assert.equal(fetches, 3);
  assert.equal((await page.evaluate(() => window.lastReset))?.reason, "epoch_changed");
  assert.deepEqual(await page.evaluate(() => window.errors), []);
});
