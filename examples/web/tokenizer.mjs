// tokenizer.mjs: a Hugging Face tokenizer.json in the browser (or Node), with character offsets.
//
//   const tok = Tokenizer.fromJSON(await (await fetch('tokenizer.json')).json());
//   tok.encode('The capital of France is')  // -> {ids, tokens, offsets: [[start, end]] in UTF-16 units}
//
// What it reads is what the two model families of this project need, written after the Rust
// `tokenizers` crate (so ids and offsets are the Python package's):
//   normalizers:     BertNormalizer, Lowercase, StripAccents, NFC/NFD/NFKC/NFKD, Sequence, null
//   pre-tokenizers:  BertPreTokenizer, ByteLevel, Digits, Whitespace, WhitespaceSplit, Sequence, null
//   models:          WordPiece, BPE (merges as "a b" strings or [a, b] pairs), WordLevel
//   post-processors: TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel, Sequence, null
//   decoders:        ByteLevel, WordPiece (to show a target token as text)
// plus added tokens (special or not) matched in the raw text. Anything else is refused by name when the
// file is read, so a tokenizer never encodes silently differently from the Python package.
// Truncation and padding are ignored (as `lrp-onnx explain --text` does).

const WHITESPACE = /[\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]/u;  // Unicode White_Space
const CONTROL = /\p{C}/u;  // Cc, Cf, Cs, Co, Cn
const NONSPACING_MARK = /\p{Mn}/u;
const PUNCTUATION = /[!-/:-@[-`{-~]|\p{P}/u;  // ASCII punctuation or a Unicode P* category
const NUMERIC = /\p{N}/u;
const WORD = /[\p{L}\p{N}_]/u;
// GPT-2's pre-tokenizer pattern (the ByteLevel pre-tokenizer's use_regex)
const BYTE_LEVEL_PATTERN = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;
const WHITESPACE_PATTERN = /\w+|[^\w\s]+/gu;  // the Whitespace pre-tokenizer

function isChinese(cp) {
  return (cp >= 0x4e00 && cp <= 0x9fff) || (cp >= 0x3400 && cp <= 0x4dbf) || (cp >= 0x20000 && cp <= 0x2a6df) ||
    (cp >= 0x2a700 && cp <= 0x2b73f) || (cp >= 0x2b740 && cp <= 0x2b81f) || (cp >= 0x2b920 && cp <= 0x2ceaf) ||
    (cp >= 0xf900 && cp <= 0xfaff) || (cp >= 0x2f800 && cp <= 0x2fa1f);
}

// GPT-2's table from bytes to printable characters (ByteLevel), and back
const BYTE_TO_CHAR = (() => {
  const table = new Array(256);
  const printable = (b) => (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  let extra = 0;
  for (let b = 0; b < 256; b++) table[b] = String.fromCodePoint(printable(b) ? b : 256 + extra++);
  return table;
})();
const CHAR_TO_BYTE = new Map(BYTE_TO_CHAR.map((c, b) => [c, b]));

export class TokenizerError extends Error {}

// Text being tokenized: one entry per code point, each with the span [start, end) of the original
// text (UTF-16 units) that it came from.
class Piece {
  constructor(chars, spans) {
    this.chars = chars;
    this.spans = spans;
  }

  static of(text, offset = 0) {
    const chars = [], spans = [];
    let at = offset;
    for (const c of text) {
      chars.push(c);
      spans.push([at, at + c.length]);
      at += c.length;
    }
    return new Piece(chars, spans);
  }

  get text() {
    return this.chars.join('');
  }

  // each character replaced by zero or more characters that keep its span
  map(fn) {
    const chars = [], spans = [];
    this.chars.forEach((c, i) => {
      for (const out of fn(c, i)) {
        chars.push(out);
        spans.push(this.spans[i]);
      }
    });
    return new Piece(chars, spans);
  }

  slice(from, to) {
    return new Piece(this.chars.slice(from, to), this.spans.slice(from, to));
  }

  span(from = 0, to = this.chars.length) {  // the original text covered by chars [from, to)
    if (to <= from) return [0, 0];
    let start = Infinity, end = -Infinity;
    for (let i = from; i < to; i++) {
      start = Math.min(start, this.spans[i][0]);
      end = Math.max(end, this.spans[i][1]);
    }
    return [start, end];
  }

  // split where `test(char)` holds: the matching chars are 'removed' or 'isolated', or with 'contiguous'
  // runs of matching chars isolated together
  splitOn(test, behavior) {
    const out = [];
    let from = 0;
    for (let i = 0; i < this.chars.length; i++) {
      if (!test(this.chars[i])) continue;
      if (i > from) out.push(this.slice(from, i));
      if (behavior === 'isolated') out.push(this.slice(i, i + 1));
      else if (behavior === 'contiguous') {
        let j = i + 1;
        while (j < this.chars.length && test(this.chars[j])) j++;
        out.push(this.slice(i, j));
        i = j - 1;
      }
      from = i + 1;
    }
    if (from < this.chars.length) out.push(this.slice(from));
    return out;
  }

  // split into the matches of a global regex and the text between them (which is kept too)
  splitMatches(pattern, keepGaps = true) {
    const text = this.text;
    const unitToChar = [];  // UTF-16 index -> char index
    this.chars.forEach((c, i) => {
      for (let k = 0; k < c.length; k++) unitToChar.push(i);
    });
    unitToChar.push(this.chars.length);
    const out = [];
    let last = 0;
    for (const m of text.matchAll(pattern)) {
      if (m[0].length === 0) continue;
      const from = unitToChar[m.index], to = unitToChar[m.index + m[0].length];
      if (keepGaps && from > last) out.push(this.slice(last, from));
      out.push(this.slice(from, to));
      last = to;
    }
    if (keepGaps && last < this.chars.length) out.push(this.slice(last));
    return out;
  }
}

function unsupported(kind, spec) {
  return new TokenizerError(`tokenizer.json: ${kind} '${spec?.type ?? JSON.stringify(spec)}' is not supported by this page`);
}

// -- normalizers: Piece -> Piece --------------------------------------------------------------------
function normalizer(spec) {
  if (spec == null) return (p) => p;
  switch (spec.type) {
    case 'Sequence': {
      const steps = spec.normalizers.map(normalizer);
      return (p) => steps.reduce((q, step) => step(q), p);
    }
    case 'Lowercase':
      return (p) => p.map((c) => [...c.toLowerCase()]);
    case 'StripAccents':
      return (p) => p.map((c) => (NONSPACING_MARK.test(c) ? [] : [c]));
    case 'NFC': case 'NFD': case 'NFKC': case 'NFKD':
      return (p) => p.map((c) => [...c.normalize(spec.type)]);
    case 'BertNormalizer': {
      const stripAccents = spec.strip_accents ?? spec.lowercase;
      return (p) => {
        if (spec.clean_text) {
          p = p.map((c) => {
            if (c === '\t' || c === '\n' || c === '\r') return [' '];
            if (c === '\0' || c === '\ufffd' || CONTROL.test(c)) return [];
            return [WHITESPACE.test(c) ? ' ' : c];
          });
        }
        if (spec.handle_chinese_chars) p = p.map((c) => (isChinese(c.codePointAt(0)) ? [' ', c, ' '] : [c]));
        if (stripAccents) p = p.map((c) => [...c.normalize('NFD')].filter((d) => !NONSPACING_MARK.test(d)));
        if (spec.lowercase) p = p.map((c) => [...c.toLowerCase()]);
        return p;
      };
    }
    default:
      throw unsupported('normalizer', spec);
  }
}

// -- pre-tokenizers: [Piece] -> [Piece] -------------------------------------------------------------
function preTokenizer(spec) {
  if (spec == null) return (pieces) => pieces;
  const each = (fn) => (pieces) => pieces.flatMap(fn);
  switch (spec.type) {
    case 'Sequence': {
      const steps = spec.pretokenizers.map(preTokenizer);
      return (pieces) => steps.reduce((q, step) => step(q), pieces);
    }
    case 'BertPreTokenizer':
      return each((p) => p.splitOn((c) => WHITESPACE.test(c), 'removed')
        .flatMap((q) => q.splitOn((c) => PUNCTUATION.test(c), 'isolated')));
    case 'WhitespaceSplit':
      return each((p) => p.splitOn((c) => WHITESPACE.test(c), 'removed'));
    case 'Whitespace':
      return each((p) => p.splitMatches(WHITESPACE_PATTERN, false));
    case 'Digits':
      return each((p) => p.splitOn((c) => NUMERIC.test(c), spec.individual_digits ? 'isolated' : 'contiguous'));
    case 'ByteLevel':
      return each((p) => {
        if (spec.add_prefix_space && !p.text.startsWith(' ')) {
          p = new Piece([' ', ...p.chars], [[p.spans[0]?.[0] ?? 0, p.spans[0]?.[0] ?? 0], ...p.spans]);
        }
        const parts = spec.use_regex === false ? [p] : p.splitMatches(BYTE_LEVEL_PATTERN);
        const encoder = new TextEncoder();
        return parts.map((q) => q.map((c) => [...encoder.encode(c)].map((b) => BYTE_TO_CHAR[b])));
      });
    default:
      throw unsupported('pre-tokenizer', spec);
  }
}

// -- models: Piece -> [{id, token, from, to}] (char indices into the piece) ---------------------------
function tokenModel(spec) {
  const vocab = new Map(Object.entries(spec.vocab));
  const lookup = (token) => vocab.get(token);
  switch (spec.type) {
    case 'WordLevel':
      return {
        vocab,
        tokenize(p) {
          const text = p.text;
          const id = lookup(text) ?? lookup(spec.unk_token);
          if (id === undefined) throw new TokenizerError(`'${text}' is not in the vocabulary and there is no unk_token`);
          return [{ id, token: vocab.has(text) ? text : spec.unk_token, from: 0, to: p.chars.length }];
        },
      };
    case 'WordPiece': {
      const prefix = spec.continuing_subword_prefix ?? '##';
      const limit = spec.max_input_chars_per_word ?? 100;
      const unk = () => {
        const id = lookup(spec.unk_token);
        if (id === undefined) throw new TokenizerError(`the unk_token '${spec.unk_token}' is not in the vocabulary`);
        return id;
      };
      return {
        vocab,
        tokenize(p) {
          const n = p.chars.length;
          if (n > limit) return [{ id: unk(), token: spec.unk_token, from: 0, to: n }];
          const out = [];
          for (let start = 0; start < n;) {
            let found = null;
            for (let end = n; end > start; end--) {
              const token = (start > 0 ? prefix : '') + p.chars.slice(start, end).join('');
              if (vocab.has(token)) {
                found = { id: vocab.get(token), token, from: start, to: end };
                break;
              }
            }
            if (found === null) return [{ id: unk(), token: spec.unk_token, from: 0, to: n }];
            out.push(found);
            start = found.to;
          }
          return out;
        },
      };
    }
    case 'BPE': {
      if (spec.dropout) throw new TokenizerError('tokenizer.json: BPE dropout is not supported by this page');
      const ranks = new Map();
      spec.merges.forEach((merge, rank) => {
        const [a, b] = Array.isArray(merge) ? merge : merge.split(' ');
        ranks.set(`${a} ${b}`, rank);
      });
      const prefix = spec.continuing_subword_prefix ?? '';
      const suffix = spec.end_of_word_suffix ?? '';
      return {
        vocab,
        tokenize(p) {
          const n = p.chars.length;
          const word = p.text;
          if (spec.ignore_merges && vocab.has(word)) return [{ id: vocab.get(word), token: word, from: 0, to: n }];
          // symbols: [text, from, to]; an unknown char becomes unk (fused with its unknown neighbours)
          let symbols = p.chars.map((c, i) => {
            let s = i > 0 ? prefix + c : c;
            if (i === n - 1) s += suffix;
            return [s, i, i + 1];
          });
          for (;;) {
            let best = Infinity, at = -1;
            for (let i = 0; i + 1 < symbols.length; i++) {
              const rank = ranks.get(`${symbols[i][0]} ${symbols[i + 1][0]}`);
              if (rank !== undefined && rank < best) {
                best = rank;
                at = i;
              }
            }
            if (at < 0) break;
            const [a, b] = [symbols[at], symbols[at + 1]];
            const joined = a[0] + (prefix && b[0].startsWith(prefix) ? b[0].slice(prefix.length) : b[0]);
            symbols.splice(at, 2, [joined, a[1], b[2]]);
          }
          const out = [];
          for (const [s, from, to] of symbols) {
            if (vocab.has(s)) {
              out.push({ id: vocab.get(s), token: s, from, to });
              continue;
            }
            const id = spec.unk_token == null ? undefined : lookup(spec.unk_token);
            if (id === undefined) throw new TokenizerError(`'${s}' is not in the vocabulary and there is no unk_token`);
            const previous = out.at(-1);
            if (spec.fuse_unk && previous?.unknown) previous.to = to;
            else out.push({ id, token: spec.unk_token, from, to, unknown: true });
          }
          return out;
        },
      };
    }
    default:
      throw unsupported('model', spec);
  }
}

// -- post-processors: encoding -> encoding (single sequence) ----------------------------------------
function postProcessor(spec, idOf) {
  if (spec == null) return (e) => e;
  const special = (token, id) => ({ ids: [id ?? idOf(token)], tokens: [token], offsets: [[0, 0]] });
  const wrap = (before, e, after) => ({
    ids: [...before.ids, ...e.ids, ...after.ids],
    tokens: [...before.tokens, ...e.tokens, ...after.tokens],
    offsets: [...before.offsets, ...e.offsets, ...after.offsets],
  });
  const none = { ids: [], tokens: [], offsets: [] };
  switch (spec.type) {
    case 'Sequence': {
      const steps = spec.processors.map((s) => postProcessor(s, idOf));
      return (e) => steps.reduce((q, step) => step(q), e);
    }
    case 'ByteLevel':  // trim_offsets only moves offsets past leading spaces: the pieces drawn are the same
      return (e) => e;
    case 'BertProcessing':
    case 'RobertaProcessing':
      return (e) => wrap(special(spec.cls[0], spec.cls[1]), e, special(spec.sep[0], spec.sep[1]));
    case 'TemplateProcessing':
      return (e) => {
        let out = none;
        for (const item of spec.single) {
          if (item.Sequence) out = wrap(out, e, none);
          else {
            const entry = spec.special_tokens[item.SpecialToken.id];
            if (!entry) throw new TokenizerError(`TemplateProcessing: no special token '${item.SpecialToken.id}'`);
            out = wrap(out, { ids: entry.ids, tokens: entry.tokens, offsets: entry.ids.map(() => [0, 0]) }, none);
          }
        }
        return out;
      };
    default:
      throw unsupported('post-processor', spec);
  }
}

export class Tokenizer {
  constructor(json) {
    this.json = json;
    this.normalize = normalizer(json.normalizer);
    this.preTokenize = preTokenizer(json.pre_tokenizer);
    this.model = tokenModel(json.model);
    this.added = (json.added_tokens ?? []).slice().sort((a, b) => b.content.length - a.content.length);
    this.idToToken = new Map([...this.model.vocab].map(([token, id]) => [id, token]));
    for (const t of json.added_tokens ?? []) this.idToToken.set(t.id, t.content);
    this.tokenToId = new Map(this.model.vocab);
    for (const t of json.added_tokens ?? []) this.tokenToId.set(t.content, t.id);
    this.postProcess = postProcessor(json.post_processor, (token) => {
      if (!this.tokenToId.has(token)) throw new TokenizerError(`post-processor: '${token}' is not in the vocabulary`);
      return this.tokenToId.get(token);
    });
    const decoder = json.decoder?.type;
    this.decoderType = decoder === 'Sequence' ? json.decoder.decoders.map((d) => d.type).find((t) => t === 'ByteLevel')
      : decoder;
    this.vocabSizes = new Set([this.model.vocab.size, this.idToToken.size]);
  }

  static fromJSON(json) {
    if (typeof json !== 'object' || json === null || typeof json.model !== 'object') {
      throw new TokenizerError('not a tokenizers JSON file (no "model")');
    }
    return new Tokenizer(json);
  }

  // the text split at added tokens: [{text, start, added}] (added: the added token's entry)
  splitAdded(text) {
    const out = [];
    let from = 0;
    for (let i = 0; i < text.length;) {
      const hit = this.added.find((t) => t.content.length > 0 && text.startsWith(t.content, i) &&
        (!t.single_word || ((i === 0 || !WORD.test(text[i - 1])) &&
                            !WORD.test(text[i + t.content.length] ?? ' '))));
      if (!hit) {
        i += 1;
        continue;
      }
      let start = i, end = i + hit.content.length;
      if (hit.lstrip) while (start > from && WHITESPACE.test(text[start - 1])) start--;
      if (hit.rstrip) while (end < text.length && WHITESPACE.test(text[end])) end++;
      if (start > from) out.push({ text: text.slice(from, start), start: from });
      out.push({ text: text.slice(i, i + hit.content.length), start: i, added: hit });
      from = i = end;
    }
    if (from < text.length) out.push({ text: text.slice(from), start: from });
    return out;
  }

  // -> {ids, tokens, offsets}; offsets index the text in UTF-16 units, [0, 0] for added special tokens
  encode(text, { addSpecialTokens = true } = {}) {
    const e = { ids: [], tokens: [], offsets: [] };
    for (const segment of this.splitAdded(text)) {
      if (segment.added) {
        e.ids.push(segment.added.id);
        e.tokens.push(segment.added.content);
        e.offsets.push([segment.start, segment.start + segment.text.length]);
        continue;
      }
      const normalized = this.normalize(Piece.of(segment.text, segment.start));
      for (const piece of this.preTokenize([normalized])) {
        if (piece.chars.length === 0) continue;
        for (const t of this.model.tokenize(piece)) {
          e.ids.push(t.id);
          e.tokens.push(t.token);
          e.offsets.push(piece.span(t.from, t.to));
        }
      }
    }
    return addSpecialTokens ? this.postProcess(e) : e;
  }

  // a token id as text (to label a target): ByteLevel's characters back to bytes, WordPiece's prefix dropped
  decodeToken(id) {
    const token = this.idToToken.get(id);
    if (token === undefined) return undefined;
    if (this.decoderType === 'ByteLevel' && [...token].every((c) => CHAR_TO_BYTE.has(c))) {
      return new TextDecoder().decode(Uint8Array.from([...token].map((c) => CHAR_TO_BYTE.get(c))));
    }
    if (this.decoderType === 'WordPiece') {
      const prefix = this.json.decoder.prefix ?? '##';
      return token.startsWith(prefix) ? token.slice(prefix.length) : token;
    }
    return token;
  }
}

// The text of each token with the whitespace before it (lrp_onnx.run.heatmap.token_pieces): special tokens,
// which have empty offsets, show as their token string set apart by a space.
export function tokenPieces(text, offsets, tokens) {
  const pieces = [];
  let end = 0;
  offsets.forEach(([start, stop], i) => {
    if (stop <= start) {
      pieces.push(pieces.length === 0 ? `${tokens[i]} ` : ` ${tokens[i]}`);
      return;
    }
    const gap = start >= end ? text.slice(end, start) : '';
    pieces.push(gap + text.slice(start, stop));
    end = Math.max(end, stop);
  });
  return pieces;
}
