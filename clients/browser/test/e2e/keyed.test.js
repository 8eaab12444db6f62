// Issue 27, keyed channels in the browser: a page follows a keyed channel as a map
// (subscribeKeyed); one that opens after the history has moved on, or comes back after a
// long time away, gets the latest value of every key from the channel's state, on every
// transport, with no reset and no refetch; deletes are honoured.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { API_KEY, channelInfo, eventually, launch, stack } from "./helpers.js";

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

/** A config making the `prices` namespace keyed. */
function keyedConfig() {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "resync-e2e-keyed-"));
  const file = path.join(directory, "resync.toml");
  fs.writeFileSync(file, "[namespaces.prices]\nkeyed = true\n");
  process.on("exit", () => fs.rmSync(directory, { recursive: true, force: true }));
  return file;
}

async function publishKeyed(base, channel, key, data) {
  const response = await fetch(`${base}/api/publish`, {
    method: "POST",
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: JSON.stringify({ channel, key, data }),
  });
  if (!response.ok) throw new Error(`publish failed: ${response.status} ${await response.text()}`);
}

/** Publishes `count` changes over `keys` keys (every seventh a delete), and returns the model. */
async function churn(base, channel, model, from, count, keys) {
  for (let n = from; n < from + count; n += 1) {
    const key = `k${n % keys}`;
    if (n % 7 === 0) {
      await publishKeyed(base, channel, key, null);
      delete model[key];
    } else {
      await publishKeyed(base, channel, key, { n });
      model[key] = { n };
    }
  }
  return model;
}

/** What the page shows, its keys sorted (a map keeps the order keys came in). */
const shown = (page) =>
  page
    .evaluate(() => ({
      values: Object.fromEntries(Object.entries(window.values).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))),
      resets: window.resets,
    }))
    .catch(() => undefined);

for (const transport of ["websocket", "sse", "long-polling"]) {
  test(`${transport}: a keyed channel's latest values reach a late page and one away past the history, with no reset`, async (t) => {
    const { server, proxy, context } = await stack(browser, t, ["--broker", "memory", "--history-size", "20", "--config", keyedConfig()]);
    const channel = `prices:${transport}`;
    // Published before any page: 300 changes over 120 keys, far past a 20-event history.
    const model = await churn(server.base, channel, {}, 1, 300, 120);
    const page = await context.newPage();
    const url = `${proxy.base}/e2e/keyed.html?transport=${transport}&channel=${channel}`;
    await page.goto(url);
    await eventually(async () => JSON.stringify((await shown(page))?.values) === JSON.stringify(sorted(model)), {
      message: "the late page shows every key's latest value",
    }).catch(async (error) => {
      throw new Error(`${error.message}: ${JSON.stringify(await shown(page)).slice(0, 400)}`);
    });
    // Live changes.
    await churn(server.base, channel, model, 301, 10, 120);
    await eventually(async () => JSON.stringify((await shown(page))?.values) === JSON.stringify(sorted(model)), {
      message: "live changes",
    });
    // Away while 200 more changes go by (ten times the history), then back.
    await page.goto("about:blank");
    await eventually(async () => (await channelInfo(server.base, channel)).subscribers === 0, { message: "the page left" });
    await churn(server.base, channel, model, 311, 200, 120);
    await page.goto(url);
    await eventually(async () => JSON.stringify((await shown(page))?.values) === JSON.stringify(sorted(model)), {
      message: "back: every key's latest value",
    });
    assert.equal((await shown(page)).resets, 0, "no reset");
  });
}

/** The model with its keys in the order the page's map shows them (key order, as the state). */
function sorted(model) {
  return Object.fromEntries(Object.entries(model).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}
