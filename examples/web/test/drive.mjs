#!/usr/bin/env node
// drive.mjs: open the page in headless Chromium (puppeteer-core, Debian's /usr/bin/chromium), explain texts
// through its controls and print what it computed as JSON. The page must be served already.
//
//   node test/drive.mjs SPEC.json   (SPEC: {"url": "http://127.0.0.1:PORT/index.html?model=...&tokenizer=...",
//       "runs": [{"text": "...", "target": "argmax|token|index", "value": "..."}], "tokenize": ["..."],
//       "screenshot": "out.png", "screenshotRun": 0, "chromium": "/usr/bin/chromium", "timeoutMs": 90000,
//       "files": [local files for the page's file input, instead of ?model=&tokenizer=]})
//   -> {"load": status line, "runs": [page results], "tokenized": [{ids, tokens, offsets}], "console": [...]}
// Errors: one line on stderr, exit code 2.
import fs from 'node:fs';
import puppeteer from 'puppeteer-core';

async function main() {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const executablePath = spec.chromium ?? process.env.CHROMIUM ?? '/usr/bin/chromium';
  if (!fs.existsSync(executablePath)) throw new Error(`${executablePath}: no Chromium (run tools/install_browser.sh)`);
  const timeout = spec.timeoutMs ?? 90000;
  const browser = await puppeteer.launch({
    executablePath, headless: true, timeout,
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--no-first-run', ...(spec.chromiumArgs ?? [])],
  });
  const log = [];
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(timeout);
    page.on('console', (m) => log.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => log.push(`pageerror: ${e.message}`));
    await page.setViewport({ width: 1000, height: 500 });  // fullPage grows it to the content
    await page.goto(spec.url, { waitUntil: 'load' });
    const settled = (states) => page.waitForFunction(
      (s) => s.includes(document.body.dataset.state), { timeout, polling: 100 }, states);
    if (spec.files) {  // local files through the file input, then Load
      await settled(['waiting']);
      await (await page.$('#files')).uploadFile(...spec.files);
      await page.click('#load');
    }
    await settled(['ready', 'error']);
    const load = await page.$eval('#status', (e) => e.textContent);
    if (await page.$eval('body', (b) => b.dataset.state) === 'error') throw new Error(`page: ${load}`);
    const tokenized = await page.evaluate((texts) => texts.map((t) => window.lrpTokenize(t)), spec.tokenize ?? []);
    const runs = [];
    for (const [i, run] of (spec.runs ?? []).entries()) {
      await page.$eval('#text', (e, v) => { e.value = v; }, run.text);
      await page.select('#target-kind', run.target ?? 'argmax');
      await page.$eval('#target-value', (e, v) => { e.value = v; }, String(run.value ?? ''));
      await page.evaluate(() => { document.body.dataset.state = 'submitted'; });
      await page.click('#explain');
      await settled(['done', 'error']);
      const result = await page.evaluate(() => window.lrpResult);
      result.status = await page.$eval('#status', (e) => e.textContent);
      result.title = await page.$eval('#heatmap p.h', (e) => e.textContent).catch(() => null);
      result.colors = await page.$$eval('#heatmap span.t', (spans) => spans.map((s) => s.style.background));
      runs.push(result);
      if (spec.screenshot && (spec.screenshotRun ?? 0) === i) {
        await page.screenshot({ path: spec.screenshot, fullPage: true });
      }
    }
    console.log(JSON.stringify({ load, runs, tokenized, console: log }));
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  process.stderr.write(`drive.mjs: ${String(error.message ?? error).replace(/\s*\n\s*/g, ' ')}\n`);
  process.exit(2);
});
