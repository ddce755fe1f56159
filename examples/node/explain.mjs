#!/usr/bin/env node
// explain.mjs: run a model converted by lrp-onnx with onnxruntime-node; print each token's relevance.
//
//   node explain.mjs MODEL.lrp.onnx --ids 101,2023,2003,102 [--mask 1,1,1,1] [--position P] [--target T]
//                    [--provider cuda|cpu]
//   -> {"target":2,"logit":3.1,"relevance":[per-token sums],"shape":[1,4,384]}
//
// Install: ONNXRUNTIME_NODE_INSTALL=skip npm install   (the variable skips downloading CUDA libraries)
// Errors: one line on stderr, exit code 2.
import fs from 'node:fs';
import ort from 'onnxruntime-node';

const USAGE = 'usage: node explain.mjs MODEL.lrp.onnx --ids 1,2,3 [--mask 1,1,1] [--position P] [--target T] ' +
  '[--provider cuda|cpu]';

function parseInts(flag, text) {
  const values = text.split(',').map((item) => {
    if (!/^\s*-?\d+\s*$/.test(item)) throw new Error(`${flag}: '${item}' is not an integer`);
    return BigInt(item.trim());
  });
  return values;
}

function parseArgs(argv) {
  const args = { provider: 'cpu' };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (!flag.startsWith('--')) {
      if (args.model !== undefined) throw new Error(`unexpected argument '${flag}'`);
      args.model = flag;
      continue;
    }
    if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
    const value = argv[++i];
    if (['--ids', '--mask', '--target', '--position'].includes(flag)) args[flag.slice(2)] = parseInts(flag, value);
    else if (flag === '--provider' && ['cpu', 'cuda'].includes(value)) args.provider = value;
    else throw new Error(`unknown option ${flag} ${value}`);
  }
  if (args.model === undefined || args.ids === undefined) throw new Error(USAGE);
  args.mask ??= args.ids.map(() => 1n);
  if (args.mask.length !== args.ids.length) throw new Error('--mask must have as many values as --ids');
  if ((args.target?.length ?? 1) > 1 || (args.position?.length ?? 1) > 1) {
    throw new Error('--target and --position take one value (one sequence per run)');
  }
  return args;
}

// The model's metadata_props (ModelProto field 14), read from the protobuf without loading the graph:
// onnxruntime-node does not expose custom metadata.
function readMetadata(path) {
  const fd = fs.openSync(path, 'r');
  const read = (pos, length) => {
    const buffer = Buffer.alloc(length);
    return buffer.subarray(0, fs.readSync(fd, buffer, 0, length, pos));
  };
  const varint = (bytes, pos) => {  // [value, position after it]
    let value = 0;
    for (let shift = 0; ; shift += 7) {
      if (pos >= bytes.length) throw new Error(`${path}: not an ONNX model`);
      const byte = bytes[pos++];
      value += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) return [value, pos];
    }
  };
  const metadata = {};
  try {
    const size = fs.fstatSync(fd).size;
    for (let pos = 0; pos < size;) {  // top-level fields: tag, then a varint or a length and bytes
      const head = read(pos, 20);
      const [tag, afterTag] = varint(head, 0);
      if ((tag & 7) === 0) {
        pos += varint(head, afterTag)[1];
        continue;
      }
      if ((tag & 7) !== 2) throw new Error(`${path}: not an ONNX model`);
      const [length, start] = varint(head, afterTag);
      if (tag >> 3 === 14) {  // StringStringEntryProto: key (1), value (2)
        const entry = read(pos + start, length);
        const strings = {};
        for (let p = 0; p < entry.length;) {
          const [field, afterField] = varint(entry, p);
          const [n, begin] = varint(entry, afterField);
          strings[field >> 3] = entry.toString('utf8', begin, begin + n);
          p = begin + n;
        }
        metadata[strings[1]] = strings[2];
      }
      pos += start + length;
    }
  } finally {
    fs.closeSync(fd);
  }
  return metadata;
}

async function openSession(path, provider) {
  const options = { logSeverityLevel: 2 };  // warnings and errors (loading a converted model prints nothing)
  if (provider === 'cuda') {
    try {
      return await ort.InferenceSession.create(path, { logSeverityLevel: 4, executionProviders: ['cuda', 'cpu'] });
    } catch {
      process.stderr.write('note: onnxruntime-node has no CUDA provider here; running on CPU\n');
    }
  }
  return ort.InferenceSession.create(path, { ...options, executionProviders: ['cpu'] });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (!fs.existsSync(args.model)) throw new Error(`${args.model}: no such file`);
  const json = readMetadata(args.model).lrp_onnx;
  if (json === undefined) throw new Error(`${args.model}: not converted by lrp-onnx (no lrp_onnx metadata)`);
  const meta = JSON.parse(json);
  if (meta.seed_input) throw new Error(`${args.model}: converted with --seed-input; this example feeds targets, not seeds`);
  const session = await openSession(args.model, args.provider);

  const n = args.ids.length;
  const tokens = (values) => new ort.Tensor('int64', BigInt64Array.from(values), [1, n]);
  let seen = -1n;
  const positions = args.mask.map((m) => (seen += m !== 0n ? 1n : 0n));  // cumsum(mask) - 1
  // lrp_target / lrp_position are plain int64 inputs (convert's default form): fed -1 (the default:
  // argmax, last position) unless given. onnxruntime-node must be fed every input it lists, so an
  // optional input (convert --inputs optional) gets the same.
  const feeds = {};
  for (const name of session.inputNames) {
    if (name === 'input_ids') feeds[name] = tokens(args.ids);
    else if (name === 'attention_mask') feeds[name] = tokens(args.mask);
    else if (name === 'token_type_ids') feeds[name] = tokens(args.ids.map(() => 0n));
    else if (name === 'position_ids') feeds[name] = tokens(positions);
    else if (name === 'lrp_target') feeds[name] = new ort.Tensor('int64', [args.target?.[0] ?? -1n], [1]);
    else if (name === 'lrp_position') feeds[name] = new ort.Tensor('int64', [args.position?.[0] ?? -1n], [1]);
    else throw new Error(`${args.model}: cannot feed input '${name}' from --ids/--mask`);
  }
  for (const [flag, name] of [['target', 'lrp_target'], ['position', 'lrp_position']]) {
    if (args[flag] !== undefined && !(name in feeds)) {  // no sequence axis, or an initializer-backed default
      throw new Error(`--${flag}: the model has no input ${name} that onnxruntime-node can feed`);
    }
  }
  const outputs = await session.run(feeds, { logSeverityLevel: 4 });  // a failing run is reported once, below

  const relevance = outputs[meta.relevance_outputs[0]];
  if (relevance.type !== 'float32') throw new Error(`${meta.relevance_outputs[0]} is not float32`);
  const inner = relevance.dims.length >= 3 ? relevance.dims.at(-1) : 1;
  const sums = [];
  for (let i = 0; i < relevance.data.length; i += inner) {
    let sum = 0;
    for (let j = i; j < i + inner; j++) sum += relevance.data[j];
    sums.push(sum);
  }
  const target = outputs.lrp_selected_target;
  const logit = outputs.lrp_selected_logit;
  console.log(JSON.stringify({
    target: target ? Number(target.data[0]) : null,
    logit: logit ? logit.data[0] : null,
    relevance: sums,
    shape: relevance.dims,
  }));
}

main().catch((error) => {
  process.stderr.write(`explain.mjs: ${String(error.message ?? error).replace(/\s*\n\s*/g, ' ')}\n`);
  process.exit(2);
});
