// Issue 29, defect 1: a user command (the application's `unsubscribe` and `disconnect`, sent
// through the HTTP API) means the same on every transport of the browser client, in headless
// Chromium against the real server binary.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { API_KEY, JWT_SECRET, channelInfo, eventually, launch, publish, signToken, stack as sharedStack } from "./helpers.js";

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

const SECRET = JWT_SECRET;

async function command(base, user, name, body) {
  const response = await fetch(`${base}/api/users/${user}/${name}`, {
    method: "POST",
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  assert.ok(response.ok, `${name}: ${response.status} ${await response.text()}`);
}

for (const transport of ["websocket", "sse", "long-polling"]) {
  test(`defect 1 (${transport}): unsubscribe ends one subscription, disconnect without reconnect ends the client`, async (t) => {
    const { server, proxy, context } = await sharedStack(browser, t, ["--jwt-secret", SECRET]);
    const exp = Math.floor(Date.now() / 1000) + 600;
    const token = signToken({ sub: "cal", exp, subscribe: ["*"] });
    const page = await context.newPage();
    await page.goto(`${proxy.base}/e2e/lib.html`);
    await page.waitForFunction(() => window.ready === true);
    await page.evaluate(
      ({ transport, token }) => {
        const { ResyncClient } = window.resync;
        window.errors = [];
        window.received = [];
        window.states = [];
        window.client = new ResyncClient(location.origin, { transport, token, backoff: { initial: 100, max: 500 } });
        window.client.onState((state) => window.states.push(state.status));
        for (const channel of ["a", "b"]) {
          window.client.subscribe(channel, {
            onEvent: (event) => window.received.push(`${channel}:${event.seq}`),
            onError: (error) => window.errors.push(`${channel}:${error.code}`),
          });
        }
      },
      { transport, token },
    );
    await eventually(() => page.evaluate(() => window.client.state.status === "connected"), { message: "connected" });
    // Both channels deliver.
    await publish(server.base, "a", { n: 1 });
    await publish(server.base, "b", { n: 1 });
    await eventually(() => page.evaluate(() => window.received.includes("a:1") && window.received.includes("b:1")), {
      message: "an event on each channel",
    });

    await command(server.base, "cal", "unsubscribe", { channel: "a" });
    await eventually(() => page.evaluate(() => window.errors.includes("a:unsubscribed")), {
      message: "the page is told the subscription to a ended",
    });
    // The other channel goes on; the ended one is not taken up again.
    await publish(server.base, "a", { n: 2 });
    await publish(server.base, "b", { n: 2 });
    await eventually(() => page.evaluate(() => window.received.includes("b:2")), { message: "b goes on" });
    assert.ok(!(await page.evaluate(() => window.received.includes("a:2"))), "a is not followed any more");

    await command(server.base, "cal", "disconnect", { reason: "account suspended", reconnect: false });
    await eventually(() => page.evaluate(() => window.client.state.status === "closed"), {
      message: "the client is closed",
    });
    const state = await page.evaluate(() => window.client.state);
    assert.match(state.reason, /account suspended|4005/, JSON.stringify(state));
    // It stays closed: a publish the server delivers to nobody, a marker client of another
    // user that does receive it, and by then no request of the closed client.
    const marker = signToken({ sub: "dan", exp, subscribe: ["*"] });
    await page.evaluate(
      ({ transport, marker }) => {
        const { ResyncClient } = window.resync;
        window.markerSeen = false;
        window.marker = new ResyncClient(location.origin, { transport, token: marker });
        window.marker.subscribe("b", { onEvent: () => (window.markerSeen = true) });
      },
      { transport, marker },
    );
    await eventually(() => page.evaluate(() => window.marker.state.status === "connected"), { message: "the marker connected" });
    await eventually(async () => (await channelInfo(server.base, "b")).subscribers >= 1 || transport === "long-polling", {
      message: "the marker follows b",
    });
    await publish(server.base, "b", { n: 3 });
    await eventually(() => page.evaluate(() => window.markerSeen), { message: "the marker saw b:3" });
    assert.equal(await page.evaluate(() => window.client.state.status), "closed");
    assert.ok(!(await page.evaluate(() => window.received.includes("b:3"))), "the closed client received nothing more");
    const states = await page.evaluate(() => window.states);
    assert.equal(states.at(-1), "closed", states.join(","));
    assert.ok(!states.slice(states.lastIndexOf("connected") + 1).includes("reconnecting"), `no reconnect after the disconnect: ${states.join(",")}`);
    assert.deepEqual(await page.evaluate(() => window.errors), ["a:unsubscribed"]);
  });
}
