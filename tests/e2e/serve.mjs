// The static server and browser the end-to-end tests share: dist/ served on a free port with the headers a static
// host should send (COOP/COEP are not needed yet; the page works without cross-origin isolation), and the
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

/** Serves dist/ on 127.0.0.1; returns { server, base }. */
export async function serve() {
  if (!fs.existsSync(path.join(dist, "index.html"))) throw new Error("dist/ is missing: run `make build` first");
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    const file = path.join(dist, decodeURIComponent(url.pathname === "/" ? "/index.html" : url.pathname));
    if (!file.startsWith(dist) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
      res.writeHead(404, { "content-type": "text/plain" });
      return res.end("not found");
    }
    // As static hosts do: the file's date, and 304 Not Modified when the browser's copy is current, so that a
    // returning visitor's browser reuses its HTTP cache (and V8 the compiled WebAssembly it keeps with it).
    const stat = fs.statSync(file);
    const modified = stat.mtime.toUTCString();
    if (req.headers["if-modified-since"] === modified) {
      res.writeHead(304, { "last-modified": modified });
      return res.end();
    }
    res.writeHead(200, {
      "content-type": types[path.extname(file)] ?? "application/octet-stream",
      "content-length": stat.size,
      "last-modified": modified,
      "cache-control": "no-cache",
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
