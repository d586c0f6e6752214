// The app's benchmark page, driven in headless Chromium for each backend and model: `make bench` runs it after
// `saif bench`, so browser figures sit beside native ones from the same run. Prints one JSON line per run.
//   node bench.mjs [prompt_tokens] [decode_tokens] [runs]
import { serve, launch } from "./serve.mjs";

const [promptTokens = "32", decodeTokens = "16", runs = "3"] = process.argv.slice(2);
const { server, base } = await serve();
const browser = await launch();
try {
  for (const model of ["smollm2-135m-instruct", "gemma-3-270m"]) {
    for (const backend of ["webgpu", "cpu"]) {
      const page = await browser.newPage();
      await page.goto(`${base}?model=${model}&backend=${backend}&chat=0`);
      await page.locator("#model-card").waitFor({ timeout: 300_000 });
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
      console.log(JSON.stringify({ model, backend, ...rows }));
      await page.close();
    }
  }
} finally {
  await browser.close();
  server.close();
}
