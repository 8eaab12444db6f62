// Issue 27, "state that outlives the connection": a page reload (or a link to the next page
// of a multi-page app) continues every channel from where the tab's previous page stood, on
// every transport, with each event once and nothing refetched; tabs and users keep their own
// positions; a position older than the history gets the typed reset.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { JWT_SECRET, channelInfo, eventually, launch, publish, signToken, stack } from "./helpers.js";

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, index) => from + index);

/**
 * What the tab's pages kept (in its sessionStorage, across reloads); empty while no page of
 * the test is open in it.
 */
async function kept(page) {
  try {
    return JSON.parse((await page.evaluate(() => sessionStorage.getItem("page-log"))) ?? "[]");
  } catch {
    return []; // navigating, or about:blank
  }
}

/** The seqs the page(s) of tab `name` were told on `channel`, in order. */
const seqsOf = (log, channel, name = "tab") =>
  log.filter((what) => what.kind === "event" && what.channel === channel && what.tab === name).map((what) => what.seq);

const loads = (log, name = "tab") => log.filter((what) => what.kind === "loaded" && what.tab === name).length;

const resets = (log) => log.filter((what) => what.kind === "reset").map(({ tab: name, channel, reason }) => ({ tab: name, channel, reason }));

async function waitFollowed(base, channels, subscribers = 1) {
  for (const channel of channels) {
    await eventually(async () => ((await channelInfo(base, channel)).subscribers ?? 0) === subscribers, {
      message: `${subscribers} subscriber(s) on ${channel}`,
    });
  }
}

/** Publishes `from..=to` to every channel, the channels taking turns. */
async function publishRange(base, channels, from, to) {
  for (let n = from; n <= to; n += 1) for (const channel of channels) await publish(base, channel, { n });
}

/** Waits until what `page`'s tab kept satisfies `check`, and returns it. */
async function keptWhen(page, check, message) {
  let log = [];
  await eventually(
    async () => {
      log = await kept(page);
      return check(log);
    },
    { timeout: 30000, message },
  ).catch((error) => {
    throw new Error(`${error.message}; kept ${JSON.stringify(log).slice(-2000)}`);
  });
  return log;
}

for (const transport of ["websocket", "sse", "long-polling"]) {
  test(`${transport}: reloads while a backend publishes lose nothing, repeat nothing and refetch nothing`, async (t) => {
    const { server, proxy, context } = await stack(browser, t);
    const channels = ["orders", "stock", "news"];
    const page = await context.newPage();
    const url = `${proxy.base}/e2e/reload.html?transport=${transport}&channels=${channels.join(",")}`;
    await page.goto(url);
    await waitFollowed(server.base, channels);
    await publishRange(server.base, channels, 1, 20);
    await keptWhen(page, (log) => channels.every((channel) => seqsOf(log, channel).length >= 20), "the first 20");

    // Two reloads while the backend keeps publishing.
    const publishing = publishRange(server.base, channels, 21, 120);
    for (const reload of [2, 3]) {
      const before = seqsOf(await kept(page), "news").length;
      await page.reload();
      await keptWhen(
        page,
        (log) => loads(log) === reload && (seqsOf(log, "news").length > before || seqsOf(log, "news").length >= 120),
        `events after reload ${reload}`,
      );
    }
    await publishing;

    // To another page and back: what was published while no page of the tab was open can
    // only arrive from the kept positions.
    await page.goto("about:blank");
    await publishRange(server.base, channels, 121, 130);
    await page.goto(url);
    const log = await keptWhen(
      page,
      (log) => channels.every((channel) => seqsOf(log, channel).length >= 130),
      "all 130 on every channel",
    );
    assert.equal(loads(log), 4, "the page was loaded four times");
    for (const channel of channels) assert.deepEqual(seqsOf(log, channel), range(1, 130), `${channel}: each event once, in order`);
    assert.deepEqual(resets(log), [], "nothing was refetched");
  });

  test(`${transport}: a position older than the history gets the typed reset after a reload`, async (t) => {
    const { server, proxy, context } = await stack(browser, t, ["--history-size", "5"]);
    const page = await context.newPage();
    const url = `${proxy.base}/e2e/reload.html?transport=${transport}&channels=feed`;
    await page.goto(url);
    await waitFollowed(server.base, ["feed"]);
    await publishRange(server.base, ["feed"], 1, 3);
    await keptWhen(page, (log) => seqsOf(log, "feed").length === 3, "the first 3");
    await page.goto("about:blank");
    await publishRange(server.base, ["feed"], 4, 20);
    await page.goto(url);
    let log = await keptWhen(page, (log) => resets(log).length > 0, "a reset");
    assert.deepEqual(resets(log), [{ tab: "tab", channel: "feed", reason: "truncated" }]);
    // Then live again, from the reset's position.
    await waitFollowed(server.base, ["feed"]);
    await publishRange(server.base, ["feed"], 21, 21);
    log = await keptWhen(page, (log) => seqsOf(log, "feed").includes(21), "live after the reset");
    assert.deepEqual(seqsOf(log, "feed"), [1, 2, 3, 21], "nothing of the lost stretch was made up");
  });
}

test("two tabs and two users on one origin keep their own positions", async (t) => {
  const { server, proxy, context } = await stack(browser, t, ["--jwt-secret", JWT_SECRET]);
  const exp = Math.floor(Date.now() / 1000) + 600;
  const token = (sub) => signToken({ sub, exp, subscribe: ["*"] });
  const pageUrl = (name, user) => `${proxy.base}/e2e/reload.html?channels=feed&tab=${name}&token=${token(user)}`;
  const first = await context.newPage();
  const second = await context.newPage();
  await first.goto(pageUrl("first", "ann"));
  await second.goto(pageUrl("second", "ann"));
  await waitFollowed(server.base, ["feed"], 2);
  await publishRange(server.base, ["feed"], 1, 5);
  await keptWhen(first, (log) => seqsOf(log, "feed", "first").length === 5, "the first tab got 1-5");
  await keptWhen(second, (log) => seqsOf(log, "feed", "second").length === 5, "the second tab got 1-5");
  // The first tab leaves at 5; the second sees 6 and 7, then leaves; 8 comes while neither is open.
  await first.goto("about:blank");
  await publishRange(server.base, ["feed"], 6, 7);
  await keptWhen(second, (log) => seqsOf(log, "feed", "second").length === 7, "the second tab got 6-7");
  await second.goto("about:blank");
  await publishRange(server.base, ["feed"], 8, 8);
  await first.goto(pageUrl("first", "ann"));
  await second.goto(pageUrl("second", "ann"));
  let firstLog = await keptWhen(first, (log) => seqsOf(log, "feed", "first").length === 8, "the first tab caught up");
  const secondLog = await keptWhen(second, (log) => seqsOf(log, "feed", "second").length === 8, "the second tab caught up");
  assert.deepEqual(seqsOf(firstLog, "feed", "first"), range(1, 8), "the first tab resumed at 5");
  assert.deepEqual(seqsOf(secondLog, "feed", "second"), range(1, 8), "the second tab resumed at 7");
  assert.equal(seqsOf(secondLog, "feed", "first").length, 0, "tabs keep their own storage");

  // Another user in the first tab does not take ann's position: bob starts from now.
  await first.goto("about:blank");
  await publishRange(server.base, ["feed"], 9, 10);
  await first.goto(pageUrl("bob", "bob"));
  await waitFollowed(server.base, ["feed"], 2);
  await publishRange(server.base, ["feed"], 11, 11);
  firstLog = await keptWhen(first, (log) => seqsOf(log, "feed", "bob").length >= 1, "bob's first event");
  assert.deepEqual(seqsOf(firstLog, "feed", "bob"), [11], "bob starts from now");
  // And ann, back in that tab, resumes from her own position (8).
  await first.goto(pageUrl("first", "ann"));
  firstLog = await keptWhen(first, (log) => seqsOf(log, "feed", "first").length === 11, "ann caught up");
  assert.deepEqual(seqsOf(firstLog, "feed", "first"), range(1, 11));
  assert.deepEqual(resets(firstLog), []);
});

test("React hooks keep what a page showed across reloads: every event once, no snapshot loaded again", async (t) => {
  const { server, proxy, context } = await stack(browser, t);
  const channels = ["feed-a", "feed-b", "totals"];
  const page = await context.newPage();
  const url = `${proxy.base}/e2e/react-reload.html`;
  const shown = () =>
    page
      .evaluate(() => ({
        a: [...document.querySelectorAll("#feed-a li")].map((item) => Number(item.textContent)),
        b: [...document.querySelectorAll("#feed-b li")].map((item) => Number(item.textContent)),
        totals: document.getElementById("totals")?.textContent ?? "",
        loads: Number(sessionStorage.getItem("page-loads")),
        snapshots: Number(sessionStorage.getItem("snapshots")),
      }))
      .catch(() => undefined);
  const showing = async (check, message) => {
    let last;
    await eventually(
      async () => {
        last = await shown();
        return last && check(last);
      },
      { timeout: 30000, message },
    ).catch((error) => {
      throw new Error(`${error.message}; shown ${JSON.stringify(last)}`);
    });
    return last;
  };
  await page.goto(url);
  await waitFollowed(server.base, channels);
  await showing((view) => view.totals === "", "the snapshot shown");
  await publishRange(server.base, channels, 1, 20);
  await showing((view) => view.a.length === 20 && view.b.length === 20, "the first 20");
  const publishing = publishRange(server.base, channels, 21, 80);
  for (const reload of [2, 3]) {
    const before = (await shown())?.a.length ?? 0;
    await page.reload();
    await showing((view) => view.loads === reload && (view.a.length > before || view.a.length >= 80), `events after reload ${reload}`);
  }
  await publishing;
  await page.goto("about:blank");
  await publishRange(server.base, channels, 81, 90);
  await page.goto(url);
  const view = await showing((view) => view.a.length >= 90 && view.b.length >= 90 && view.totals.split(",").length >= 90, "all 90");
  assert.equal(view.loads, 4);
  assert.deepEqual(view.a, range(1, 90), "feed-a: each event once, in order");
  assert.deepEqual(view.b, range(1, 90), "feed-b: each event once, in order");
  assert.equal(view.totals, range(1, 90).join(","), "the snapshot hook's state");
  assert.equal(view.snapshots, 1, "the snapshot was loaded once, by the first page");
  assert.deepEqual(
    await page.evaluate(() => [...document.querySelectorAll("ul")].map((list) => list.dataset.reset)),
    ["", ""],
    "no reset",
  );
});
