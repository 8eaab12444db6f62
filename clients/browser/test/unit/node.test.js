// The package outside a browser: server rendering, module-scope clients in Node, and hooks
// used where they cannot work. Real React (react-dom/server) and real Node processes; nothing
// is mocked. (The react-server condition needs React 19: test/e2e/install.test.js checks it
// in the app it builds.)

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { createElement as h } from "react";
import { renderToString } from "react-dom/server";
import * as hooks from "../../src/react.js";

const packageDirectory = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const clientUrl = pathToFileURL(path.join(packageDirectory, "src", "resync.js")).href;

/** Runs an ES module snippet in a fresh Node process. */
function node(args, source, options = {}) {
  return spawnSync(process.execPath, [...args, "--input-type=module", "-e", source], {
    cwd: packageDirectory,
    encoding: "utf8",
    timeout: 20000,
    ...options,
  });
}

test("defect 5: a hook without a ResyncProvider throws a clear error", () => {
  const uses = {
    useChannel: () => hooks.useChannel("news"),
    usePresence: () => hooks.usePresence("news"),
    useResyncState: () => hooks.useResyncState(),
    useResyncClient: () => hooks.useResyncClient(),
  };
  for (const [name, use] of Object.entries(uses)) {
    function Component() {
      use();
      return null;
    }
    assert.throws(() => renderToString(h(Component)), new RegExp(`${name}.*<ResyncProvider>`), name);
  }
  // With a URL first, useChannel has a client of its own and needs no provider.
  function Own() {
    const { state } = hooks.useChannel("http://127.0.0.1:9", "news");
    return h("p", null, state.status);
  }
  assert.doesNotThrow(() => renderToString(h(Own)));
});

test("defect 6: a client made at module scope in Node neither crashes nor connects", () => {
  const run = node([], `
    import { ResyncClient } from ${JSON.stringify(clientUrl)};
    const client = new ResyncClient("http://127.0.0.1:9");
    setImmediate(() => {
      console.log(JSON.stringify(client.state));
      process.exit(0);
    });
  `);
  assert.equal(run.status, 0, `the process failed: ${run.stderr}`);
  assert.deepEqual(JSON.parse(run.stdout), { status: "idle" });
});

test("defect 6: the React module is marked \"use client\"", () => {
  const source = fs.readFileSync(path.join(packageDirectory, "src", "react.js"), "utf8");
  // A directive is the first statement: only comments and blank lines may come before it.
  const start = source.replace(/^(\s+|\/\/[^\n]*|\/\*[\s\S]*?\*\/)*/, "");
  assert.match(start, /^"use client";/);
});

test("server rendering: a provider and its hooks render their initial state and connect nowhere", () => {
  function Feed() {
    const { events, state } = hooks.useChannel("news");
    const members = hooks.usePresence("news");
    const total = hooks.useSnapshotChannel("news", {
      fetchSnapshot: () => Promise.reject(new Error("not on the server")),
      reduce: (sum, event) => sum + event.data,
    });
    return h("p", null, `${hooks.useResyncState().status} ${state.status} ${events.length} ${members.length} ${total.loading}`);
  }
  const html = renderToString(h(hooks.ResyncProvider, { url: "http://127.0.0.1:9" }, h(Feed)));
  assert.equal(html, "<p>idle idle 0 0 true</p>");
});
