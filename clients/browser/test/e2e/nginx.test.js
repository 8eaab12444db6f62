// The deployment of examples/nginx-cluster, run from its own nginx.conf (ports filled in):
// nginx from the distribution's package, round robin with no sticky sessions, in front of two
// resync instances on a Redis Cluster of three primaries with a replica each. Chromium's own
// EventSource and the browser client on WebSocket and on long polling follow one channel
// through nginx while both instances are restarted one after the other (SIGTERM, then a new
// process on the same port) and a backend publishes through nginx: every client gets every
// event once, in order, and no reset. Each restart is proved (the process exited) and every
// client is seen to reconnect.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { API_KEY, eventually, freePort, launch, startRedisCluster, startServer } from "./helpers.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const exampleConfig = path.join(here, "../../../../examples/nginx-cluster/nginx.conf");
const EVENTS_PER_PHASE = 30;

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

/** The example's nginx on `port` in front of `upstreams`; the test pages served beside. */
async function startNginx(port, upstreams) {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "resync-e2e-nginx-"));
  fs.chmodSync(directory, 0o755);
  const edits = [
    ["listen 127.0.0.1:8080;", `listen 127.0.0.1:${port};`],
    ["server 127.0.0.1:8081 ", `server 127.0.0.1:${upstreams[0]} `],
    ["server 127.0.0.1:8082 ", `server 127.0.0.1:${upstreams[1]} `],
    // The test's pages, from the same origin (the test's only addition).
    [
      "        location / {",
      `        location /e2e/ {\n            alias ${path.join(here, "pages")}/;\n            types { text/html html; text/javascript js; }\n        }\n\n        location / {`,
    ],
  ];
  let config = fs.readFileSync(exampleConfig, "utf8");
  for (const [from, to] of edits) {
    assert.ok(config.includes(from), `the example's nginx.conf has ${JSON.stringify(from)}`);
    config = config.replace(from, to);
  }
  fs.writeFileSync(path.join(directory, "nginx.conf"), config);
  const binary = process.env.NGINX || (fs.existsSync("/usr/sbin/nginx") ? "/usr/sbin/nginx" : "nginx");
  const global = process.getuid?.() === 0 ? "daemon off; user root;" : "daemon off;";
  const child = spawn(binary, ["-p", directory, "-c", path.join(directory, "nginx.conf"), "-g", global], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const base = `http://127.0.0.1:${port}`;
  await eventually(
    () => fetch(`${base}/e2e/sources.html`).then((response) => response.ok, () => false),
    { message: "nginx serving" },
  );
  return {
    base,
    stop: async () => {
      child.kill("SIGTERM");
      await exited;
      fs.rmSync(directory, { recursive: true, force: true });
    },
  };
}

/** Publishes `value` through nginx, again until an instance takes it (a backend's retry). */
async function publish(base, value) {
  return eventually(
    async () => {
      const response = await fetch(`${base}/api/publish`, {
        method: "POST",
        headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
        body: JSON.stringify({ channel: "orders", data: value, idempotency_key: `value-${value}` }),
      }).catch(() => undefined);
      return response?.ok && (await response.json()).position;
    },
    { interval: 50, message: `value ${value} published` },
  );
}

async function ready(base) {
  await eventually(() => fetch(`${base}/readyz`).then((response) => response.ok, () => false), {
    message: `${base} ready`,
  });
}

test("clients of every transport through nginx lose nothing across a rolling restart of both instances", async (t) => {
  const cluster = await startRedisCluster();
  const ports = [await freePort(), await freePort()];
  const serverArgs = (port) => [
    "--listen", `127.0.0.1:${port}`,
    "--broker", "redis",
    "--redis-cluster-nodes", cluster.seeds,
    "--trusted-proxies", "127.0.0.1",
  ];
  const instances = [await startServer(serverArgs(ports[0])), await startServer(serverArgs(ports[1]))];
  await Promise.all(instances.map((instance) => ready(instance.base)));
  const nginx = await startNginx(await freePort(), ports);
  const contexts = [];
  t.after(async () => {
    await Promise.all(contexts.map((context) => context.close()));
    await nginx.stop();
    await Promise.all(instances.map((instance) => instance.stop()));
    await cluster.stop();
  });

  // One browser context per page: Chromium opens at most 6 connections per host and profile.
  const open = async (page) => {
    const context = await browser.newContext();
    contexts.push(context);
    const tab = await context.newPage();
    await tab.goto(`${nginx.base}/e2e/${page}`);
    return tab;
  };
  const native = await open("sources.html?channels=orders&count=2");
  const websocket = await open("follow.html?channel=orders&transport=websocket");
  const polling = await open("follow.html?channel=orders&transport=long-polling");
  const clients = async () => {
    const sources = await native.evaluate(() => window.summary());
    const followers = await Promise.all(
      [websocket, polling].map((tab) =>
        tab.evaluate(() => ({
          events: window.received,
          resets: window.resets,
          connects: window.states.filter((state) => state.status === "connected").length,
        })),
      ),
    );
    return [
      ...sources.map((source, index) => ({
        label: `EventSource ${index} (state ${source.readyState}, ${source.opens} opens, ${source.errors} errors)`,
        events: source.events,
        resets: source.resets,
        connects: source.subscribed,
      })),
      { label: "websocket", ...followers[0] },
      { label: "long-polling", ...followers[1] },
    ];
  };
  await eventually(async () => (await clients()).every((client) => client.connects >= 1), {
    message: "every client connected",
  });

  let value = 0;
  const publishPhase = async () => {
    for (let index = 0; index < EVENTS_PER_PHASE; index++) await publish(nginx.base, ++value);
  };
  await publishPhase();
  for (const which of [0, 1]) {
    // A rolling restart: the instance drains and exits while the backend keeps publishing.
    const publishing = publishPhase();
    const exit = await instances[which].terminate();
    assert.equal(exit.code, 0, `instance ${which} drained and exited`);
    instances[which] = await startServer(serverArgs(ports[which]));
    await ready(instances[which].base);
    await publishing;
  }

  const total = value;
  let last;
  const seen = await eventually(
    async () => {
      const all = await clients();
      last = all.map((client) => `${client.label}: ${client.events.length} events, ${client.resets.length} resets, ${client.connects} connections`);
      return all.every((client) => client.events.length >= total) && all;
    },
    { timeout: 60000, message: `every client has all ${total} events` },
  ).catch((error) => {
    throw new Error(`${error.message}: ${last.join("; ")}`);
  });
  for (const client of seen) {
    assert.deepEqual(
      client.events.map((event) => event.data),
      Array.from({ length: total }, (_, index) => index + 1),
      `${client.label}: every event once, in order`,
    );
    const seqs = client.events.map((event) => event.seq);
    assert.ok(seqs.every((seq, index) => index === 0 || seq === seqs[index - 1] + 1), `${client.label}: no gap in seqs`);
    assert.equal(new Set(client.events.map((event) => event.epoch)).size, 1, `${client.label}: one epoch`);
    assert.deepEqual(client.resets, [], `${client.label}: no reset`);
    // Both instances restarted, so every stream had to come back at least once (a long poll
    // is a new request each time, through whichever instance nginx picks).
    if (client.label !== "long-polling") {
      assert.ok(client.connects >= 2, `${client.label} reconnected (${client.connects} connections)`);
    }
  }
});
