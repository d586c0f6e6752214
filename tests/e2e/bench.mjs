// The app's benchmark page, driven in headless Chromium for each backend and model: `make bench` runs it after
// `saif bench`, so browser figures sit beside native ones from the same run. Prints one JSON line per run. The CPU
// path runs twice: on a cross-origin isolated page (the threaded worker) and on one that is not (one thread).
//   node bench.mjs [prompt_tokens] [decode_tokens] [runs]
import { serve, launch } from "./serve.mjs";

const [promptTokens = "32", decodeTokens = "16", runs = "3"] = process.argv.slice(2);
const isolated = await serve();
const plain = await serve({ isolated: false });
const browser = await launch();
try {
  // The CPU runs first: after a WebGPU run, SwiftShader's GPU process kept most of the 2 cores busy for minutes, and
  // the threaded CPU path decoded SmolLM2 at 19.1 tokens/s after it against 42.7 alone.
  for (const [backend, { base }] of [["cpu", isolated], ["cpu", plain], ["webgpu", isolated]]) {
    for (const model of ["smollm2-135m-instruct", "gemma-3-270m"]) {
      const page = await browser.newPage();
      await page.goto(`${base}?model=${model}&backend=${backend}&chat=0`);
      await page.locator("#model-card").waitFor({ timeout: 300_000 });
      const runsOn = await page.locator("#model-card tr", { hasText: "Runs on" }).locator("td").textContent();
      await page.click("#bench-panel summary");
      for (const [field, value] of [["Prompt tokens", promptTokens], ["Decoded tokens", decodeTokens], ["Runs", runs]]) {
        const input = page.locator("#bench-panel label", { hasText: field }).locator("input");
        await input.fill(value);
        await input.dispatchEvent("change");
      }
      await page.click("#run-bench");
      await page.locator("#bench-results").waitFor({ timeout: 1_800_000 });
      const rows = await page.locator("#bench-results tr").evaluateAll((trs) =>
        Object.fromEntries(trs.map((tr) => [tr.querySelector("th").textContent, tr.querySelector("td").textContent])));
      console.log(JSON.stringify({ model, backend, runsOn, ...rows }));
      await page.close();
    }
  }
} finally {
  await browser.close();
  isolated.server.close();
  plain.server.close();
}
