// Shared pieces of the end-to-end tests: the real server binary, a TCP proxy the tests
// control (and which also serves the test pages, so everything is same-origin), and Chromium.

import { spawn } from "node:child_process";
import crypto from "node:crypto";
import { createInterface } from "node:readline";
import net from "node:net";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
export const API_KEY = "e2e-api-key-0123456789";
/** The JWT secret of the tests that start a server with `--jwt-secret`. */
export const JWT_SECRET = "e2e-jwt-secret-long-enough-for-hs256-0123456789";

/** An HS256 token, as an app's backend signs one. */
export function signToken(claims, secret = JWT_SECRET) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const input = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${input}.${crypto.createHmac("sha256", secret).update(input).digest("base64url")}`;
}

/** The data directories made here, removed when the test process exits. */
const dataDirectories = [];
process.on("exit", () => {
  for (const directory of dataDirectories) fs.rmSync(directory, { recursive: true, force: true });
});

/** A new empty directory for the disk broker's data (the default broker). */
export function dataDirectory() {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "resync-e2e-data-"));
  dataDirectories.push(directory);
  return directory;
}

/**
 * Starts the resync-server binary; resolves once it listens. On the default (disk) broker
 * each server gets an empty data directory of its own unless `args` name one (a deploy's
 * next process names its predecessor's).
 */
export async function startServer(args = []) {
  const binary = process.env.RESYNC_SERVER_BIN;
  if (!binary) throw new Error("set RESYNC_SERVER_BIN (cargo xtask e2e does)");
  const defaults = (flag, value) => (args.includes(flag) ? [] : [flag, value]);
  const dataDir = args.includes("--data-dir") ? args[args.indexOf("--data-dir") + 1] : dataDirectory();
  const child = spawn(
    binary,
    [
      ...defaults("--listen", "127.0.0.1:0"),
      "--api-key",
      API_KEY,
      ...defaults("--shutdown-spread-ms", "100"),
      ...defaults("--data-dir", dataDir),
      ...args,
    ],
    { env: { ...process.env, RESYNC_LOG: "warn" }, stdio: ["ignore", "pipe", "inherit"] },
  );
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  const line = await new Promise((resolve, reject) => {
    const lines = createInterface({ input: child.stdout });
    lines.once("line", resolve);
    child.once("exit", (code) => reject(new Error(`server exited with ${code}`)));
  });
  const base = line.replace("listening on ", "").trim();
  const port = Number(new URL(base).port);
  return {
    base,
    port,
    dataDir,
    exited,
    /** SIGTERM, as a deploy sends: resolves with the exit once the process has drained. */
    terminate: () => {
      child.kill("SIGTERM");
      return exited;
    },
    stop: () =>
      new Promise((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        child.once("exit", resolve);
        child.kill("SIGKILL");
      }),
  };
}

/** A free TCP port on 127.0.0.1. */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

async function waitForPort(port) {
  await eventually(
    () =>
      new Promise((resolve) => {
        const socket = net.connect(port, "127.0.0.1");
        socket.once("connect", () => { socket.destroy(); resolve(true); });
        socket.once("error", () => resolve(false));
      }),
    { message: `port ${port} open` },
  );
}

/** A redis-server of the test's own on a free port, which the test kills and starts again. */
export async function startRedis() {
  const port = await freePort();
  let child;
  const launchRedis = async () => {
    child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
    await waitForPort(port);
  };
  await launchRedis();
  const kill = () =>
    new Promise((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) return resolve();
      child.once("exit", resolve);
      child.kill("SIGKILL");
    });
  return { url: `redis://127.0.0.1:${port}/`, port, kill, restart: launchRedis, get running() { return child.exitCode === null && child.signalCode === null; } };
}

/** Runs `redis-cli` against `port`; resolves with what it printed. */
function redisCli(port, args) {
  return new Promise((resolve) => {
    const child = spawn("redis-cli", ["-h", "127.0.0.1", "-p", String(port), ...args], { stdio: ["ignore", "pipe", "ignore"] });
    let output = "";
    child.stdout.on("data", (chunk) => { output += chunk; });
    child.once("exit", () => resolve(output));
  });
}

/** A free port whose cluster-bus port (+10000) is free too. */
async function freeClusterPort() {
  for (;;) {
    const port = await freePort();
    if (port >= 55536) continue;
    const bus = net.createServer();
    const free = await new Promise((resolve) => {
      bus.once("error", () => resolve(false));
      bus.listen(port + 10000, "127.0.0.1", () => resolve(true));
    });
    if (free) {
      await new Promise((resolve) => bus.close(resolve));
      return port;
    }
  }
}

/**
 * A Redis Cluster of the test's own: three primaries with a replica each on free ports,
 * joined by `redis-cli --cluster create`; resolves once every node says the cluster is ok.
 */
export async function startRedisCluster() {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "resync-e2e-cluster-"));
  dataDirectories.push(directory);
  const nodes = [];
  const clashes = (port) => nodes.some((node) => [port, port + 10000, port - 10000].includes(node.port));
  for (let index = 0; index < 6; index++) {
    let port = await freeClusterPort();
    while (clashes(port)) port = await freeClusterPort();
    const dir = path.join(directory, String(port));
    fs.mkdirSync(dir);
    const child = spawn(
      "redis-server",
      ["--port", String(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", "1000", "--save", "", "--appendonly", "no", "--dir", dir],
      { stdio: "ignore" },
    );
    nodes.push({ port, child });
    await waitForPort(port);
  }
  await new Promise((resolve, reject) => {
    const create = spawn(
      "redis-cli",
      ["--cluster", "create", ...nodes.map(({ port }) => `127.0.0.1:${port}`), "--cluster-replicas", "1", "--cluster-yes"],
      { stdio: "ignore" },
    );
    create.once("exit", (code) => (code === 0 ? resolve() : reject(new Error(`redis-cli --cluster create exited with ${code}`))));
  });
  await eventually(
    async () => {
      const infos = await Promise.all(nodes.map(({ port }) => redisCli(port, ["cluster", "info"])));
      return infos.every((info) => info.includes("cluster_state:ok") && info.includes("cluster_slots_ok:16384"));
    },
    { timeout: 60000, message: "a healthy redis cluster" },
  );
  const stop = () =>
    Promise.all(
      nodes.map(
        ({ child }) =>
          new Promise((resolve) => {
            if (child.exitCode !== null || child.signalCode !== null) return resolve();
            child.once("exit", resolve);
            child.kill("SIGKILL");
          }),
      ),
    );
  return { seeds: nodes.map(({ port }) => `redis://127.0.0.1:${port}/`).join(","), stop };
}

/** A server with a proxy in front and a browser context, torn down after the test `t`. */
export async function stack(browser, t, serverArgs = []) {
  const server = await startServer(serverArgs);
  const proxy = await new Proxy(server.port).start();
  const context = await browser.newContext();
  t.after(async () => {
    await context.close();
    await proxy.stop();
    await server.stop();
  });
  return { server, proxy, context };
}

/** Publishes through the HTTP API. */
export async function publish(base, channel, data) {
  const response = await fetch(`${base}/api/publish`, {
    method: "POST",
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: JSON.stringify({ channel, data }),
  });
  if (!response.ok) throw new Error(`publish failed: ${response.status} ${await response.text()}`);
  return (await response.json()).position;
}

export async function channelInfo(base, channel) {
  const response = await fetch(`${base}/api/channels/${channel}`, { headers: { authorization: `Bearer ${API_KEY}` } });
  return response.json();
}

/** The test pages, served by the proxy at /e2e/<name>. */
function page(name) {
  const file = path.join(here, "pages", name);
  return fs.existsSync(file) ? fs.readFileSync(file) : undefined;
}

/** Rewrites a request head to ask the server to close the connection after its response. */
function withConnectionClose(head) {
  const end = head.indexOf("\r\n\r\n");
  const lines = head.subarray(0, end).toString("latin1").split("\r\n").filter((line) => !/^connection:/i.test(line));
  lines.push("Connection: close");
  return Buffer.concat([Buffer.from(lines.join("\r\n") + "\r\n\r\n", "latin1"), head.subarray(end + 4)]);
}

const reactFiles = {
  "/e2e/react.js": "react/umd/react.development.js",
  "/e2e/react-dom.js": "react-dom/umd/react-dom.development.js",
};

/**
 * The client's files as this checkout has them. The server compiles the same files in
 * (`include_str!`), so in CI, where the binary is built from this tree, they are identical;
 * served from the tree, the tests follow the source without waiting for a rebuild.
 */
const clientFiles = {
  "/client/resync.js": "resync.js",
  "/client/react.js": "react.js",
};

/**
 * A TCP proxy in front of the server: it counts and cuts connections, refuses WebSocket
 * upgrades or SSE requests like a restrictive proxy, and serves the test pages.
 */
export class Proxy {
  constructor(upstreamPort) {
    this.upstreamPort = upstreamPort;
    this.sockets = new Set();
    this.accepted = 0;
    this.cut = 0;
    this.refused = 0;
    this.upgrades = 0;
    this.refuseWebSocket = false;
    this.refuseSse = false;
    /** Every request's method and path, in order: `GET /sse`, `UPGRADE /ws`, … */
    this.requests = [];
    /** A directory served at `/app/` (a built application), if any. */
    this.appDirectory = undefined;
  }

  async start() {
    this.server = net.createServer((client) => this.handle(client));
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", resolve));
    this.port = this.server.address().port;
    this.base = `http://127.0.0.1:${this.port}`;
    return this;
  }

  handle(client) {
    this.accepted += 1;
    this.sockets.add(client);
    client.on("close", () => this.sockets.delete(client));
    client.on("error", () => {});
    let head = Buffer.alloc(0);
    const onData = (chunk) => {
      head = Buffer.concat([head, chunk]);
      if (!head.includes("\r\n\r\n")) return;
      client.off("data", onData);
      client.pause();
      this.route(client, head);
    };
    client.on("data", onData);
  }

  route(client, head) {
    const text = head.toString("latin1");
    const requestLine = text.split("\r\n")[0];
    const target = requestLine.split(" ")[1] || "/";
    const lower = text.toLowerCase();
    const pathname = target.split("?")[0];
    const respond = (status, type, body) => {
      client.end(
        Buffer.concat([
          Buffer.from(`HTTP/1.1 ${status}\r\ncontent-type: ${type}\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n`),
          body,
        ]),
      );
    };
    this.requests.push(`${lower.includes("upgrade: websocket") ? "UPGRADE" : requestLine.split(" ")[0]} ${pathname}`);
    if (clientFiles[pathname]) {
      return respond("200 OK", "text/javascript", fs.readFileSync(path.join(here, "..", "..", "src", clientFiles[pathname])));
    }
    if (this.appDirectory && pathname.startsWith("/app/")) {
      const file = path.join(this.appDirectory, path.normalize(pathname.slice(5) || "index.html"));
      if (!file.startsWith(this.appDirectory) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
        return respond("404 Not Found", "text/plain", Buffer.from("no such file"));
      }
      const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };
      return respond("200 OK", types[path.extname(file)] || "application/octet-stream", fs.readFileSync(file));
    }
    if (reactFiles[pathname]) {
      const file = path.join(here, "..", "..", "node_modules", reactFiles[pathname]);
      return respond("200 OK", "text/javascript", fs.readFileSync(file));
    }
    if (pathname.startsWith("/e2e/")) {
      const body = page(pathname.slice(5));
      if (body) return respond("200 OK", pathname.endsWith(".js") ? "text/javascript" : "text/html", body);
      return respond("404 Not Found", "text/plain", Buffer.from("no such page"));
    }
    if ((this.refuseWebSocket && lower.includes("upgrade: websocket")) || (this.refuseSse && pathname.endsWith("/sse"))) {
      this.refused += 1;
      return respond("403 Forbidden", "text/plain", Buffer.from("blocked by proxy"));
    }
    // One request per connection (except WebSocket upgrades), so that the proxy sees every
    // request: otherwise a kept-alive connection would carry later requests past it.
    if (lower.includes("upgrade: websocket")) this.upgrades += 1;
    else head = withConnectionClose(head);
    const upstream = net.connect(this.upstreamPort, "127.0.0.1");
    this.sockets.add(upstream);
    upstream.on("close", () => {
      this.sockets.delete(upstream);
      client.destroy();
    });
    client.on("close", () => upstream.destroy());
    upstream.on("error", () => client.destroy());
    upstream.write(head);
    client.pipe(upstream);
    upstream.pipe(client);
    client.resume();
  }

  /** Destroys every open connection; returns how many client connections were cut. */
  cutAll() {
    let cut = 0;
    for (const socket of [...this.sockets]) {
      socket.destroy();
      cut += 1;
    }
    this.cut += cut;
    return cut;
  }

  get open() {
    return this.sockets.size;
  }

  async stop() {
    this.cutAll();
    await new Promise((resolve) => this.server.close(resolve));
  }
}

export async function launch(extraArgs = []) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      ...extraArgs,
      "--no-sandbox",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
    ],
  });
}

/** Polls `check` until it returns a truthy value or the timeout passes. */
export async function eventually(check, { timeout = 20000, interval = 100, message = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    last = await check();
    if (last) return last;
    await new Promise((resolve) => setTimeout(resolve, interval));
  }
  throw new Error(`timed out waiting for ${message} (last: ${JSON.stringify(last)})`);
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
