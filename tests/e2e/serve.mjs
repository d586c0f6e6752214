// The static server and browser the end-to-end tests share: dist/ served on a free port with the headers a static
// host should send (COOP and COEP, which make the page cross-origin isolated so that the engine's worker may
// share memory with its threads; `isolated: false` leaves them out, as a host that cannot send them), and the
// system's Chromium with WebGPU on SwiftShader, driven by playwright-core.
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, "../..");
export const dist = path.join(root, "dist");
const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".css": "text/css", ".json": "application/json" };

/** The headers that make a page cross-origin isolated (README: what a static host must send for threads). */
export const isolation = { "cross-origin-opener-policy": "same-origin", "cross-origin-embedder-policy": "require-corp" };

/** Serves dist/ on 127.0.0.1, cross-origin isolated unless `isolated` is false, answering 404 for the files named
 * in `missing` (a host that lost one); returns { server, base }. */
export async function serve({ isolated = true, missing = [] } = {}) {
  if (!fs.existsSync(path.join(dist, "index.html"))) throw new Error("dist/ is missing: run `make build` first");
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    const file = path.join(dist, decodeURIComponent(url.pathname === "/" ? "/index.html" : url.pathname));
    if (!file.startsWith(dist) || !fs.existsSync(file) || fs.statSync(file).isDirectory() ||
        missing.includes(path.basename(file))) {
      res.writeHead(404, { "content-type": "text/plain" });
      return res.end("not found");
    }
    // As static hosts do: the file's date, and 304 Not Modified when the browser's copy is current, so that a
    // returning visitor's browser reuses its HTTP cache (and V8 the compiled WebAssembly it keeps with it).
    const stat = fs.statSync(file);
    const modified = stat.mtime.toUTCString();
    if (req.headers["if-modified-since"] === modified) {
      res.writeHead(304, { "last-modified": modified, ...(isolated ? isolation : {}) });
      return res.end();
    }
    res.writeHead(200, {
      "content-type": types[path.extname(file)] ?? "application/octet-stream",
      "content-length": stat.size,
      "last-modified": modified,
      "cache-control": "no-cache",
      ...(isolated ? isolation : {}),
    });
    fs.createReadStream(file).pipe(res);
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  return { server, base: `http://127.0.0.1:${server.address().port}/` };
}

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--enable-unsafe-webgpu", "--disable-background-networking", "--disable-component-update",
      "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"],
  });
}
