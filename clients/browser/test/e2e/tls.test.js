// The browser client over wss:// and https:// (SSE, long polling) against the reference
// server terminating TLS itself, with a certificate made in the test that this Chromium is
// told to trust (by its public key's hash: nothing is installed system-wide).

import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { API_KEY, eventually, launch, startServer } from "./helpers.js";

function testCertificate() {
  const directory = fs.mkdtempSync(path.join(os.tmpdir(), "resync-e2e-tls-"));
  const cert = path.join(directory, "cert.pem");
  const key = path.join(directory, "key.pem");
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
  ], { stdio: "ignore" });
  const spki = new crypto.X509Certificate(fs.readFileSync(cert)).publicKey.export({ type: "spki", format: "der" });
  const spkiHash = crypto.createHash("sha256").update(spki).digest("base64");
  return { directory, cert, key, spkiHash };
}

test("the browser client follows over wss:// and https:// from a server serving TLS", async (t) => {
  const certificate = testCertificate();
  const server = await startServer(["--tls-cert", certificate.cert, "--tls-key", certificate.key]);
  const browser = await launch([`--ignore-certificate-errors-spki-list=${certificate.spkiHash}`]);
  t.after(async () => {
    await browser.close();
    await server.stop();
    fs.rmSync(certificate.directory, { recursive: true, force: true });
  });
  assert.ok(server.base.startsWith("https://"), server.base);
  const page = await (await browser.newContext()).newPage();
  await page.goto(`${server.base}/help`);
  assert.equal(await page.evaluate(() => location.protocol), "https:");
  for (const transport of ["websocket", "sse", "long-polling"]) {
    await page.evaluate(async ({ transport }) => {
      const { ResyncClient } = await import("/client/resync.js");
      window.client?.close();
      window.got = [];
      window.client = new ResyncClient(location.origin, { transport, pollTimeout: 3, connectTimeout: 3000 });
      window.client.subscribe(`tls-${transport}`, { onEvent: (event) => window.got.push(event) });
    }, { transport });
    await eventually(
      () => page.evaluate((wanted) => window.client.state.status === "connected" && window.client.state.transport === wanted, transport),
      { message: `connected over ${transport}` },
    );
    // Published from the page, same origin over https, until the subscriber has it.
    await eventually(async () => {
      await page.evaluate(async ({ transport, key }) => {
        await fetch("/api/publish", {
          method: "POST",
          headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
          body: JSON.stringify({ channel: `tls-${transport}`, data: { over: "tls" } }),
        });
      }, { transport, key: API_KEY });
      return page.evaluate(() => window.got.length > 0);
    }, { message: `an event over ${transport}`, interval: 300 });
    const first = await page.evaluate(() => window.got[0]);
    assert.equal(first.channel, `tls-${transport}`);
    assert.deepEqual(first.data, { over: "tls" });
    const connectedUrl = await page.evaluate(() => window.client.state.transport);
    assert.equal(connectedUrl, transport);
  }
});
