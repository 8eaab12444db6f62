// A new React + TypeScript app adopts the package the way clients/browser/README.md says
// (issue 27, defects 2 and 3): a fresh Vite app in a temporary directory, the README's own
// install lines run as written, a strict `tsc --noEmit` of a TSX file that uses the types (and
// lines that must not compile), `vite build`, and the built page in Chromium against the
// server. Needs the npm registry (the app's own react, vite and typescript).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { channelInfo, eventually, launch, publish, stack } from "./helpers.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const packageDirectory = path.resolve(here, "..", "..");
const repository = path.resolve(packageDirectory, "..", "..");

/** What a new app has before it adds resync: `npm create vite@latest -- --template react-ts`. */
const appPackage = {
  name: "adopter",
  private: true,
  version: "0.0.0",
  type: "module",
  scripts: { build: "tsc --noEmit -p . && vite build" },
  dependencies: { react: "19.3.1", "react-dom": "19.3.1" },
  devDependencies: { "@types/react": "19.3.3", "@types/react-dom": "19.3.0", typescript: "7.0.2", vite: "8.4.1" },
};

/** The template's tsconfig.app.json, strict, and checking the libraries' types too. */
const tsconfig = {
  compilerOptions: {
    target: "ES2022",
    useDefineForClassFields: true,
    lib: ["ES2022", "DOM", "DOM.Iterable"],
    module: "ESNext",
    types: ["vite/client"],
    skipLibCheck: false,
    moduleResolution: "bundler",
    allowImportingTsExtensions: true,
    verbatimModuleSyntax: true,
    moduleDetection: "force",
    noEmit: true,
    jsx: "react-jsx",
    strict: true,
    noUnusedLocals: true,
    noUnusedParameters: true,
    erasableSyntaxOnly: true,
    noFallthroughCasesInSwitch: true,
    noUncheckedSideEffectImports: true,
  },
  include: ["src"],
};

const indexHtml = `<!doctype html>
<html lang="en"><head><meta charset="UTF-8"><link rel="icon" href="data:,"><title>adopter</title></head>
<body><div id="root"></div><script type="module" src="/src/main.tsx"></script></body></html>
`;

// Every `@ts-expect-error` line must fail to compile: if it starts compiling, tsc fails.
const mainTsx = `import { StrictMode, useState } from "react";
import { createRoot } from "react-dom/client";
import { ResyncClient, ResyncError, type ConnectionState, type Position } from "@resync/client";
import { ResyncProvider, useChannel, useKeyedChannel, usePresence, useResyncState, useSnapshotChannel } from "@resync/client/react";
import { invalidateOnReset } from "@resync/client/tanstack";

interface News {
  n: number;
  text: string;
}

function Feed() {
  const [last, setLast] = useState<number | null>(null);
  const { events, error } = useChannel<News>("news", { keep: 50, onEvent: (event) => setLast(event.data.n) });
  // @ts-expect-error the payload has a type: it has no title
  void events[0]?.data.title;
  return (
    <div>
      <p id="last">{last ?? "-"}</p>
      <ul id="events">{events.map((event) => <li key={event.seq}>{event.data.text}</li>)}</ul>
      {error ? <p id="error">{error.code}</p> : null}
    </div>
  );
}

function describe(state: ConnectionState): string {
  switch (state.status) {
    case "idle":
      return "idle";
    case "connecting":
      return \`connecting \${state.transport}\`;
    case "connected":
      return \`connected \${state.transport}\${state.capabilities.publish ? " publish" : ""}\`;
    case "reconnecting":
      return \`reconnecting \${state.attempt} \${state.delay}\`;
    case "closed":
      return \`closed \${state.reason}\`;
    default: {
      const unknown: never = state;
      return unknown;
    }
  }
}

function State() {
  const state = useResyncState();
  // @ts-expect-error attempt is there only once narrowed to "reconnecting"
  void state.attempt;
  return <p id="state">{describe(state)}</p>;
}

function Who() {
  const members = usePresence<{ name: string }>("news", { info: { name: "ann" } });
  return <p id="who">{members.map((member) => member.info?.name ?? member.id).join(",")}</p>;
}

/** Never rendered: a keyed channel as a typed map. */
export function Prices() {
  const { values, loading } = useKeyedChannel<number>("prices:fx");
  return <p>{loading ? "…" : values.get("eur-usd")?.toFixed(4)}</p>;
}

/** Never rendered: how the rest of the API type-checks. */
export function Total({ since }: { since: Position }) {
  const { data, loading } = useSnapshotChannel<number, News>("news", {
    fetchSnapshot: async () => ({ state: 0, position: since }),
    reduce: (total, event) => total + event.data.n,
  });
  // @ts-expect-error a misspelt option is an error, not a silent no-op
  const typo = <ResyncProvider url="http://localhost" options={{ transprot: "sse" }}><p /></ResyncProvider>;
  void typo;
  return <p>{loading ? "…" : data.toFixed(0)}</p>;
}

export async function typedClient(): Promise<string> {
  const client = new ResyncClient("http://localhost", { autoConnect: false, upgradeAfter: 30000, resume: { maxAge: 60000 } });
  const queryClient = { invalidateQueries: (filters: { queryKey: readonly unknown[] }) => filters.queryKey.length };
  invalidateOnReset<News>(client, queryClient, "news", ["news"], { onEvent: (event) => void event.data.n });
  // @ts-expect-error the resume options are checked too
  void new ResyncClient("http://localhost", { resume: { maxAgeMs: 1 } });
  client.positions?.clear();
  client.subscribe<News>("news", { onEvent: (event) => console.log(event.data.text.toUpperCase()) });
  try {
    const position = await client.publish("news", { n: 1, text: "hi" });
    return \`\${position.epoch}:\${position.seq}\`;
  } catch (error) {
    return error instanceof ResyncError ? error.code : "other";
  }
}

createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <ResyncProvider url={location.origin} options={{ backoff: { initial: 100, max: 1000 } }}>
      <State />
      <Feed />
      <Who />
    </ResyncProvider>
  </StrictMode>,
);
`;

/** The README's install lines: its first `sh` block, with the checkout's real path. */
function readmeInstallLines() {
  const readme = fs.readFileSync(path.join(packageDirectory, "README.md"), "utf8");
  const block = readme.match(/```sh\n([\s\S]*?)```/);
  assert.ok(block, "the README has an sh block");
  return block[1]
    .split("\n")
    .map((line) => line.replace(/\s+#.*$/, "").trim())
    .filter((line) => line && !line.startsWith("#"))
    .map((line) => line.replaceAll("/path/to/resync", repository));
}

/** Runs a shell command in `cwd`; resolves with its exit code and output. */
function run(command, cwd, timeout = 150000) {
  return new Promise((resolve) => {
    const child = spawn("sh", ["-c", command], {
      cwd,
      env: { ...process.env, npm_config_audit: "false", npm_config_fund: "false", npm_config_update_notifier: "false" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    child.stdout.on("data", (chunk) => (output += chunk));
    child.stderr.on("data", (chunk) => (output += chunk));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeout);
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, output });
    });
  });
}

let app;
let browser;
before(async () => {
  app = fs.mkdtempSync(path.join(os.tmpdir(), "resync-adopter-"));
  fs.mkdirSync(path.join(app, "src"));
  fs.writeFileSync(path.join(app, "package.json"), JSON.stringify(appPackage, null, 2));
  fs.writeFileSync(path.join(app, "tsconfig.json"), JSON.stringify(tsconfig, null, 2));
  fs.writeFileSync(path.join(app, "index.html"), indexHtml);
  fs.writeFileSync(path.join(app, "src", "main.tsx"), mainTsx);
  browser = await launch();
});
after(async () => {
  await browser?.close();
  if (app) fs.rmSync(app, { recursive: true, force: true });
});

test("defect 2: the README's install lines install the package into a fresh Vite + React + TypeScript app", async () => {
  for (const line of readmeInstallLines()) {
    const result = await run(line, app);
    assert.equal(result.code, 0, `\`${line}\` failed:\n${result.output}`);
  }
  const installed = path.join(app, "node_modules", "@resync", "client");
  assert.ok(!fs.lstatSync(installed).isSymbolicLink(), "a copy, not a link: a link resolves react from the checkout");
  assert.ok(fs.existsSync(path.join(installed, "src", "react.js")));
  // The app's CI installs from its lockfile: the same copy again.
  fs.rmSync(path.join(app, "node_modules"), { recursive: true });
  const ci = await run("npm ci", app);
  assert.equal(ci.code, 0, `npm ci failed:\n${ci.output}`);
  assert.ok(!fs.lstatSync(installed).isSymbolicLink(), "npm ci copies it too");
});

test("defect 6: in the app, the React module imports under the react-server condition (React 19)", async () => {
  // What a server-components bundler does with the package: react resolves to its server
  // build, which has no createContext and no hooks.
  const script = 'const hooks = await import("@resync/client/react"); console.log(Object.keys(hooks).join(","));';
  const result = await run(`node --conditions=react-server --input-type=module -e '${script}'`, app, 30000);
  assert.equal(result.code, 0, `the import failed:\n${result.output}`);
  assert.match(result.output, /ResyncProvider/);
});

test("defect 3: a strict TSX app type-checks against the package's types", async () => {
  const result = await run("node_modules/.bin/tsc --noEmit -p .", app, 60000);
  assert.equal(result.code, 0, `tsc failed:\n${result.output}`);
});

test("defect 2: the app builds with vite and follows a channel live in Chromium", async (t) => {
  const build = await run("node_modules/.bin/vite build --base /app/", app, 60000);
  assert.equal(build.code, 0, `vite build failed:\n${build.output}`);
  const { server, proxy, context } = await stack(browser, t);
  proxy.appDirectory = path.join(app, "dist");
  const page = await context.newPage();
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  await page.goto(`${proxy.base}/app/index.html`);
  await eventually(async () => (await page.textContent("#state").catch(() => "")) === "connected websocket publish", { message: "connected" });
  await eventually(async () => (await page.textContent("#who")) === "ann", { message: "presence beside the feed" });
  await eventually(async () => (await channelInfo(server.base, "news")).subscribers === 1, { message: "subscribed" });
  await publish(server.base, "news", { n: 7, text: "hello" });
  await eventually(async () => (await page.locator("#events li").allTextContents()).join() === "hello", { message: "the live event" });
  assert.equal(await page.textContent("#last"), "7", "onEvent ran");
  assert.deepEqual(pageErrors, []);
});
