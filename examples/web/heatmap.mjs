// heatmap.mjs: tokens coloured by relevance, as `lrp-onnx explain --html` draws them (lrp_onnx/run/heatmap.py):
// red = positive, blue = negative, white = none, normalized per text by its largest |relevance|.

function roundHalfEven(x) {  // Python's round()
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// [r, g, b] for value/peak in [-1, 1]: white at 0, red at +1, blue at -1
export function relevanceColor(value, peak) {
  const x = peak <= 0 ? 0 : Math.min(1, Math.max(-1, value / peak));
  const fade = roundHalfEven(255 * (1 - Math.abs(x)));
  return x >= 0 ? [255, fade, fade] : [fade, fade, 255];
}

// Python's format(x, '+.4g')
export function formatSigned(x, digits = 4) {
  if (Number.isNaN(x)) return 'nan';
  if (!Number.isFinite(x)) return x > 0 ? '+inf' : '-inf';
  const sign = x < 0 || Object.is(x, -0) ? '-' : '+';
  const a = Math.abs(x);
  if (a === 0) return `${sign}0`;
  const [mantissa, exponentText] = a.toExponential(digits - 1).split('e');
  const exponent = Number(exponentText);
  if (exponent < -4 || exponent >= digits) {
    const m = mantissa.includes('.') ? mantissa.replace(/\.?0+$/, '') : mantissa;
    return `${sign}${m}e${exponent < 0 ? '-' : '+'}${String(Math.abs(exponent)).padStart(2, '0')}`;
  }
  let fixed = a.toFixed(Math.max(0, digits - 1 - exponent));
  if (fixed.includes('.')) fixed = fixed.replace(/\.?0+$/, '');
  return `${sign}${fixed}`;
}

// One heatmap row into `container` (a DOM element): a title line and the coloured tokens.
export function drawTokens(container, { title, pieces, relevance }) {
  const doc = container.ownerDocument;
  const peak = relevance.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  const head = doc.createElement('p');
  head.className = 'h';
  head.textContent = title;
  const line = doc.createElement('p');
  line.className = 'x';
  pieces.forEach((piece, i) => {
    const [r, g, b] = relevanceColor(relevance[i], peak);
    const span = doc.createElement('span');
    span.className = 't';
    span.style.background = `rgb(${r},${g},${b})`;
    span.title = formatSigned(relevance[i]);
    span.textContent = piece;
    line.append(span);
  });
  container.replaceChildren(head, line);
}
