// app.mjs: the page's controls. Query parameters fill them in: ?model=URL&tokenizer=URL&backend=wasm|webgpu
// &text=...&target=argmax|token|index&value=... (a model and a tokenizer given this way are loaded at once).
import { drawTokens } from './heatmap.mjs';
import { explain, loadRuntime, openModel, readModelInfo, resolveTarget, webgpuAvailable } from './lrp.mjs';
import { Tokenizer, tokenPieces } from './tokenizer.mjs';

const $ = (id) => document.getElementById(id);
const runtimes = {};
let state = null;  // {ort, model, tokenizer}

function setState(name, message, isError = false) {
  document.body.dataset.state = name;
  $('status').textContent = message;
  $('status').classList.toggle('error', isError);
}

// Python's repr() of a short string, as `lrp-onnx explain --html` labels a target token
function pyRepr(text) {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
  const body = [...text].map((c) => {
    if (c === '\\') return '\\\\';
    if (c === quote) return `\\${c}`;
    if (c === '\n') return '\\n';
    if (c === '\t') return '\\t';
    if (c === '\r') return '\\r';
    const code = c.codePointAt(0);
    return code < 0x20 || code === 0x7f ? `\\x${code.toString(16).padStart(2, '0')}` : c;
  }).join('');
  return quote + body + quote;
}

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function load() {
  const backend = $('backend').value;
  const files = [...$('files').files];
  setState('loading', `loading (${backend}) ...`);
  $('ask').disabled = true;
  const started = performance.now();
  try {
    let bytes, tokenizerJson, externalData = [], name;
    if (files.length) {  // local files: the .onnx model, its external data, tokenizer.json
      const modelFile = files.find((f) => f.name.endsWith('.onnx'));
      const tokenizerFile = files.find((f) => f.name.endsWith('.json'));
      if (!modelFile || !tokenizerFile) throw new Error('choose the .onnx model and its tokenizer.json (and its data files)');
      bytes = new Uint8Array(await modelFile.arrayBuffer());
      tokenizerJson = JSON.parse(await tokenizerFile.text());
      externalData = files.filter((f) => f !== modelFile && f !== tokenizerFile).map((f) => ({ path: f.name, data: f }));
      name = modelFile.name;
    } else {
      if (!$('model-url').value || !$('tokenizer-url').value) throw new Error('give the model and tokenizer URLs');
      const modelUrl = new URL($('model-url').value, location.href);
      const tokenizerUrl = new URL($('tokenizer-url').value, location.href);
      [bytes, tokenizerJson] = await Promise.all([
        fetchBytes(modelUrl), fetch(tokenizerUrl).then((r) => {
          if (!r.ok) throw new Error(`${tokenizerUrl}: HTTP ${r.status}`);
          return r.json();
        }),
      ]);
      // external data files lie beside the model, at the locations it names
      externalData = readModelInfo(bytes).externalData.map((path) => ({ path, data: new URL(path, modelUrl).href }));
      name = modelUrl.pathname.split('/').pop();
    }
    const tokenizer = Tokenizer.fromJSON(tokenizerJson);
    runtimes[backend] ??= await loadRuntime(backend);
    const ort = runtimes[backend];
    const size = bytes.length;
    const fetched = performance.now();
    const model = await openModel(ort, bytes, { backend, externalData });
    state = { ort, model, tokenizer };
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setState('ready', `${name} (${(size / 2 ** 20).toFixed(0)} MiB${model.externalData.length ? ' + external data' : ''}, ` +
      `rules ${model.meta.rules}${model.meta.relevance_only ? ', relevance only' : ''}) on ${backend}, ` +
      `loaded in ${seconds} s (session ${((performance.now() - fetched) / 1000).toFixed(1)} s); ` +
      `inputs: ${model.session.inputNames.join(', ')}`);
    $('ask').disabled = false;
  } catch (error) {
    state = null;
    setState('error', `could not load: ${error.message ?? error}`, true);
  }
}

async function run() {
  if (!state) return;
  const { ort, model, tokenizer } = state;
  const text = $('text').value;
  setState('running', 'explaining ...');
  try {
    const target = resolveTarget(tokenizer, $('target-kind').value, $('target-value').value);
    const result = await explain(ort, model, tokenizer, text, { target, tokenTarget: $('target-kind').value === 'token' });
    const label = (id) => (result.vocabulary ? pyRepr(tokenizer.decodeToken(id) ?? String(id)) : String(id));
    const sum = result.relevance.reduce((a, b) => a + b, 0);
    const pieces = tokenPieces(text, result.offsets, result.tokens);
    drawTokens($('heatmap'), {
      title: `explained: ${label(result.target)} (logit ${result.logit?.toFixed(3) ?? 'n/a'}), ` +
        `sum of relevance ${sum.toFixed(3)}`,
      pieces, relevance: result.relevance,
    });
    // the best scores at the explained position: a click explains that one
    const top = $('top');
    top.replaceChildren(`highest ${result.vocabulary ? 'tokens' : 'outputs'}: `);
    for (const [id, score] of result.top) {
      const button = document.createElement('button');
      button.textContent = `${label(id)} ${score.toFixed(2)}`;
      button.title = `explain ${result.vocabulary ? 'token' : 'index'} ${id}`;
      button.onclick = () => {
        $('target-kind').value = 'index';
        $('target-value').value = String(id);
        run();
      };
      top.append(button);
    }
    window.lrpResult = { ...result, relevanceFull: Array.from(result.relevanceFull), pieces, text };
    setState('done', `${result.ids.length} tokens explained in ${result.milliseconds.toFixed(0)} ms ` +
      `(${model.backend}, one session.run)`);
  } catch (error) {
    window.lrpResult = { error: String(error.message ?? error) };
    setState('error', String(error.message ?? error), true);
  }
}

async function main() {
  const params = new URLSearchParams(location.search);
  if (await webgpuAvailable()) {
    const option = $('backend').querySelector('option[value=webgpu]');
    option.disabled = false;
    option.textContent = 'WebGPU';
  }
  for (const [param, id] of [['model', 'model-url'], ['tokenizer', 'tokenizer-url'], ['text', 'text'],
    ['backend', 'backend'], ['target', 'target-kind'], ['value', 'target-value']]) {
    if (params.has(param)) $(id).value = params.get(param);
  }
  $('load').onclick = load;
  $('explain').onclick = run;
  $('text').onkeydown = (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) run();
  };
  // for scripts (tests): tokenization alone
  window.lrpTokenize = (text) => state?.tokenizer.encode(text);
  if (params.has('model') && params.has('tokenizer')) await load();
  else document.body.dataset.state = 'waiting';  // for a model and tokenizer given by hand
}

main();
