// lrp.mjs: run a model converted by lrp-onnx in onnxruntime-web and return each token's relevance.
// No DOM here: app.mjs draws; this module loads and runs.
//
//   const ort = await loadRuntime('wasm');                      // or 'webgpu'
//   const model = await openModel(ort, bytes, { backend: 'wasm', externalData: [{ path, data }] });
//   const result = await explain(ort, model, tokenizer, 'The capital of France is', { target: null });

// -- the ONNX file, read as protobuf without loading the graph ---------------------------------------
function varint(bytes, pos) {  // -> [value, position after it]
  let value = 0;
  for (let shift = 0; ; shift += 7) {
    if (pos >= bytes.length) throw new Error('not an ONNX model (truncated protobuf)');
    const byte = bytes[pos++];
    value += (byte & 0x7f) * 2 ** shift;
    if (byte < 0x80) return [value, pos];
  }
}

// the fields of one message: [{field, wire, value}] (value: a number, or a subarray of `bytes`)
function* fields(bytes, from = 0, to = bytes.length) {
  for (let pos = from; pos < to;) {
    const [tag, afterTag] = varint(bytes, pos);
    const field = Math.floor(tag / 8), wire = tag & 7;
    if (wire === 0) {
      const [value, next] = varint(bytes, afterTag);
      yield { field, wire, value };
      pos = next;
    } else if (wire === 2) {
      const [length, start] = varint(bytes, afterTag);
      if (start + length > to) throw new Error('not an ONNX model (a field runs past the end)');
      yield { field, wire, value: bytes.subarray(start, start + length) };
      pos = start + length;
    } else if (wire === 1) pos = afterTag + 8;
    else if (wire === 5) pos = afterTag + 4;
    else throw new Error(`not an ONNX model (protobuf wire type ${wire})`);
  }
}

const utf8 = new TextDecoder();

function stringPairs(entry) {  // StringStringEntryProto: key (1), value (2)
  const out = {};
  for (const { field, value } of fields(entry)) out[field] = utf8.decode(value);
  return [out[1], out[2]];
}

// {metadata: {key: value}, externalData: [location]} of a ModelProto: metadata_props (14), and the
// external_data (13) locations of the main graph's (7) initializers (5)
export function readModelInfo(bytes) {
  const metadata = {};
  const locations = new Set();
  for (const { field, wire, value } of fields(bytes)) {
    if (wire !== 2) continue;
    if (field === 14) {
      const [key, text] = stringPairs(value);
      metadata[key] = text;
    } else if (field === 7) {
      for (const g of fields(value)) {
        if (g.field !== 5 || g.wire !== 2) continue;
        for (const t of fields(g.value)) {
          if (t.field !== 13 || t.wire !== 2) continue;
          const [key, location] = stringPairs(t.value);
          if (key === 'location') locations.add(location);
        }
      }
    }
  }
  return { metadata, externalData: [...locations] };
}

// -- onnxruntime-web --------------------------------------------------------------------------------
// The build for the backend: the WASM one (CPU), or the one with WebGPU (and WASM) kernels.
export async function loadRuntime(backend) {
  const file = backend === 'webgpu' ? 'ort.webgpu.min.mjs' : 'ort.wasm.min.mjs';
  const ort = await import(new URL(`./node_modules/onnxruntime-web/dist/${file}`, import.meta.url).href);
  // threads need SharedArrayBuffer, i.e. a page served with COOP/COEP headers; otherwise one thread
  ort.env.wasm.numThreads = globalThis.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  return ort;
}

export async function webgpuAvailable() {
  try {
    return Boolean(globalThis.navigator?.gpu && await navigator.gpu.requestAdapter());
  } catch {
    return false;
  }
}

// A session on the converted model (bytes: Uint8Array). externalData: [{path, data}] as onnxruntime-web
// takes it (data: a URL, Blob or bytes), one per location the model names.
export async function openModel(ort, bytes, { backend = 'wasm', externalData = [] } = {}) {
  const info = readModelInfo(bytes);
  const json = info.metadata.lrp_onnx;
  if (json === undefined) throw new Error('the model was not converted by lrp-onnx (no lrp_onnx metadata)');
  const meta = JSON.parse(json);
  if (meta.seed_input) throw new Error('the model was converted with --seed-input; this page feeds targets, not seeds');
  if (meta.multi_target) throw new Error('the model was converted with --multi-target; this page explains one target');
  const given = new Set(externalData.map((e) => e.path));
  const missing = info.externalData.filter((location) => !given.has(location));
  if (missing.length) throw new Error(`the model keeps its weights in ${missing.join(', ')}: give that file too`);
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, {
      executionProviders: [backend],
      externalData: externalData.filter((e) => info.externalData.includes(e.path)),
      logSeverityLevel: 3,
    });
  } catch (error) {
    const message = String(error.message ?? error);
    if (/optional\(tensor/.test(message)) {  // onnxruntime-web 1.30's WebGPU build has no Optional types
      throw new Error(`this build of onnxruntime-web (${backend}) does not take optional inputs (lrp_target / ` +
        `lrp_position): use WASM, or a model whose lrp_target / lrp_position are plain int64 inputs (${message})`);
    }
    throw error;
  }
  return { session, meta, backend, externalData: info.externalData };
}

// The target as a token id from what the page's user chose: kind 'argmax' (null), 'index' (a class,
// dimension or token id) or 'token' (a vocabulary entry, e.g. 'ĠParis', or a text that is one token).
export function resolveTarget(tokenizer, kind, value) {
  if (kind === 'argmax') return null;
  const text = String(value ?? '');
  if (kind === 'index') {
    if (!/^\s*\d+\s*$/.test(text)) throw new Error(`target: '${text}' is not a non-negative integer`);
    return Number(text.trim());
  }
  if (kind !== 'token') throw new Error(`target: unknown kind '${kind}'`);
  if (tokenizer.tokenToId.has(text)) return tokenizer.tokenToId.get(text);
  const ids = tokenizer.encode(text, { addSpecialTokens: false }).ids;
  if (ids.length !== 1) {
    throw new Error(`target: '${text}' is ${ids.length} tokens, not one (give a vocabulary entry or a token id)`);
  }
  return ids[0];
}

function tokenFeeds(ort, inputNames, ids) {
  const n = ids.length;
  const tensor = (values) => new ort.Tensor('int64', BigInt64Array.from(values, BigInt), [1, n]);
  const feeds = {};
  for (const name of inputNames) {
    if (name === 'input_ids') feeds[name] = tensor(ids);
    else if (name === 'attention_mask') feeds[name] = tensor(ids.map(() => 1));
    else if (name === 'token_type_ids') feeds[name] = tensor(ids.map(() => 0));
    else if (name === 'position_ids') feeds[name] = tensor(ids.map((_, i) => i));
  }
  return feeds;
}

// Explain `text`: tokenize, run once, sum the relevance over the hidden axis.
// target: a token/class id or null (the argmax). The explained position is the last token.
// -> {ids, tokens, offsets, relevance (per token), relevanceFull (Float32Array), shape, target, logit,
//     vocabulary (whether the explained output is a vocabulary), top: [[id, score]] (5 best), milliseconds}
// tokenTarget: the target was given as a token, which only a vocabulary output can take.
export async function explain(ort, model, tokenizer, text, { target = null, tokenTarget = false } = {}) {
  const encoding = tokenizer.encode(text);
  if (encoding.ids.length === 0) throw new Error('the text has no tokens');
  const { session, meta } = model;
  const feeds = tokenFeeds(ort, session.inputNames, encoding.ids);
  // lrp_target / lrp_position are fed as plain int64 tensors: -1 is the argmax; the last token is explained
  const scalar = (value) => new ort.Tensor('int64', BigInt64Array.from([BigInt(value)]), [1]);
  if (session.inputNames.includes('lrp_target')) feeds.lrp_target = scalar(target ?? -1);
  else if (target !== null) throw new Error('the model has no input lrp_target: it explains one fixed output');
  if (session.inputNames.includes('lrp_position')) feeds.lrp_position = scalar(encoding.ids.length - 1);
  const missing = session.inputNames.filter((name) => !(name in feeds));
  if (missing.length) throw new Error(`cannot feed input(s) ${missing.join(', ')} from text`);

  const started = performance.now();
  const outputs = await session.run(feeds);
  const milliseconds = performance.now() - started;

  const relevance = outputs[meta.relevance_outputs[0]];
  if (relevance === undefined || relevance.type !== 'float32') {
    throw new Error(`the model has no float32 output ${meta.relevance_outputs[0]}`);
  }
  const data = await relevance.getData();
  const dims = relevance.dims;
  const n = encoding.ids.length;
  if (dims[0] !== 1 || dims[1] !== n) throw new Error(`relevance has shape [${dims}], not [1, ${n}, ...]`);
  const inner = data.length / n;
  const perToken = [];
  for (let t = 0; t < n; t++) {
    let sum = 0;
    for (let j = t * inner; j < (t + 1) * inner; j++) sum += data[j];
    perToken.push(sum);
  }
  const selected = outputs.lrp_selected_target ? Number((await outputs.lrp_selected_target.getData())[0]) : target;
  const logit = outputs.lrp_selected_logit ? (await outputs.lrp_selected_logit.getData())[0] : null;
  const scoresTensor = outputs[meta.explained_output] ?? outputs.lrp_logits_at_position;
  let vocabulary = false, top = [];
  if (scoresTensor) {
    const scores = await scoresTensor.getData();
    const size = scoresTensor.dims.at(-1);
    const rows = meta.input_limits?.inputs?.input_ids;
    // a vocabulary, so that a target is a token (as `lrp-onnx explain` decides): not a class or a dimension
    vocabulary = session.inputNames.includes('lrp_position') && (tokenizer.vocabSizes.has(size) || size === rows);
    // the scores at the explained position: [1, n, size], or [1, size] / [1, 1, size] (head at the position)
    const from = scoresTensor.dims.length === 3 && scoresTensor.dims[1] === n ? (n - 1) * size : 0;
    const row = scores.subarray(from, from + size);
    top = [...row.keys()].sort((a, b) => row[b] - row[a]).slice(0, 5).map((i) => [i, row[i]]);
  }
  for (const tensor of Object.values(outputs)) tensor.dispose?.();
  if (tokenTarget && !vocabulary) {  // as `lrp-onnx explain --target-token` refuses it
    throw new Error(`the explained output '${meta.explained_output}' is not a vocabulary: choose an index`);
  }
  if (selected !== null && selected < 0) {  // the graph flags a target (or position) out of range with -1
    const size = scoresTensor?.dims.at(-1);
    throw new Error(`target ${target} is out of range` + (size ? `: the explained output has ${size} values ` +
      `(0..${size - 1})` : ''));
  }
  if (logit !== null && !Number.isFinite(logit)) throw new Error(`the explained logit is ${logit}`);
  return {
    ids: encoding.ids, tokens: encoding.tokens, offsets: encoding.offsets,
    relevance: perToken, relevanceFull: Float32Array.from(data), shape: dims,
    target: selected, logit, vocabulary, top, milliseconds,
  };
}
