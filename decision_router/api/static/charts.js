// Inline SVG charts for the ops view. No library, no network asset: every chart is built
// with createElementNS, and every mark carries its number in data-* attributes, so the
// page (and its tests) can read what was drawn.

const NS = "http://www.w3.org/2000/svg";

function svg(width, height) {
  const root = document.createElementNS(NS, "svg");
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("role", "img");
  return root;
}

function el(name, attrs, parent, text) {
  const node = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

// Cut a drawn label to `width` (user units) with an ellipsis if it is longer, the whole text
// then in its tooltip (<title>). Measured, so it needs the label drawn in a visible page.
function fitLabel(text, width) {
  const whole = text.textContent;
  if (text.getComputedTextLength() <= width) return;
  let fits = 0, over = whole.length;  // the longest prefix that fits with its ellipsis, by halving
  while (over - fits > 1) {
    const mid = (fits + over) >> 1;
    text.textContent = `${whole.slice(0, mid)}…`;
    if (text.getComputedTextLength() <= width) fits = mid; else over = mid;
  }
  text.textContent = `${whole.slice(0, fits)}…`;
  el("title", {}, text, whole);
}

function empty(container, text) {
  const p = document.createElement("p");
  p.className = "empty";
  p.textContent = text;
  container.replaceChildren(p);
}

export function pct(value, digits = 0) {
  return value === null || value === undefined ? "n/a" : `${(value * 100).toFixed(digits)}%`;
}

function pp(value) {
  const sign = value > 0 ? "+" : value < 0 ? "−" : "";
  return `${sign}${Math.abs(value * 100).toFixed(1)} pp`;
}

const STEPS = [
  ["routed", "routed"],
  ["acknowledged", "acknowledged"],
  ["intervened", "intervened"],
  ["success", "successes"],
];

// Per rule, four horizontal bars relative to the rule's routed count.
export function funnel(container, rows) {
  if (!rows.length) return empty(container, "No routed alerts in this period.");
  const labelW = 110, barW = 300, valueW = 110, rowH = 16, gap = 4, titleH = 18, blockGap = 14;
  const blockH = titleH + STEPS.length * (rowH + gap);
  const root = svg(labelW + barW + valueW, rows.length * (blockH + blockGap));
  rows.forEach((row, i) => {
    const g = el("g", { transform: `translate(0 ${i * (blockH + blockGap)})`, "data-rule": row.rule, class: "funnel-rule" }, root);
    el("text", { x: 0, y: 13, class: "label" }, g, row.rule);
    STEPS.forEach(([step, key], j) => {
      const value = row[key];
      const y = titleH + j * (rowH + gap);
      const width = row.routed ? (value / row.routed) * barW : 0;
      el("text", { x: 0, y: y + 12 }, g, step);
      el("rect", {
        x: labelW, y, width: Math.max(width, 0.5), height: rowH, class: `bar step-${step}`,
        "data-rule": row.rule, "data-step": step, "data-value": value,
      }, g);
      const share = j === 0 ? "" : ` (${pct(value / row.routed)})`;
      el("text", { x: labelW + barW + 6, y: y + 12, class: "value" }, g, `${value}${share}`);
    });
  });
  container.replaceChildren(root);
}

// Per rule, a bar from 0 to the uplift with its 95% interval as an error bar; a rule whose
// groups are too small reads "not enough data" rather than a number.
export function uplift(container, rows, minN) {
  if (!rows.length) return empty(container, "No routed alerts in this period.");
  // valueW holds the widest value text: "−20.0 pp [−30.0 pp, −10.0 pp]".
  const labelW = 150, plotW = 200, valueW = 215, rowH = 34, top = 22;
  const known = rows.filter((r) => r.uplift !== null);
  let lo = Math.min(-0.1, ...known.map((r) => r.ci_low));
  let hi = Math.max(0.1, ...known.map((r) => r.ci_high));
  const pad = (hi - lo) * 0.05;
  lo -= pad; hi += pad;
  const x = (v) => labelW + ((v - lo) / (hi - lo)) * plotW;
  const root = svg(labelW + plotW + valueW, top + rows.length * rowH + 6);
  const labels = [];
  el("line", { x1: x(0), x2: x(0), y1: top - 4, y2: top + rows.length * rowH, class: "axis" }, root);
  el("text", { x: x(0), y: 10, "text-anchor": "middle" }, root, "0");
  el("text", { x: labelW, y: 10 }, root, pp(lo));
  el("text", { x: labelW + plotW, y: 10, "text-anchor": "end" }, root, pp(hi));
  rows.forEach((row, i) => {
    const y = top + i * rowH;
    const g = el("g", {
      class: "uplift-rule", "data-rule": row.rule, "data-uplift": row.uplift ?? "",
      "data-ci-low": row.ci_low ?? "", "data-ci-high": row.ci_high ?? "",
      "data-treated-n": row.treated_n, "data-control-n": row.control_n,
    }, root);
    labels.push(el("text", { x: 0, y: y + 15, class: "label" }, g, row.rule));
    if (row.uplift === null) {
      const why = row.has_control
        ? `not enough data (treated ${row.treated_n}, control ${row.control_n}; need ${minN} each)`
        : "no control group";
      el("text", { x: labelW + 4, y: y + 15, class: "nodata" }, g, why);
      return;
    }
    const x0 = x(0), x1 = x(row.uplift);
    el("rect", {
      x: Math.min(x0, x1), y: y + 4, width: Math.max(Math.abs(x1 - x0), 1), height: rowH - 12,
      class: `bar ${row.uplift >= 0 ? "uplift-pos" : "uplift-neg"}`,
    }, g);
    const mid = y + rowH / 2 - 2;
    el("line", { x1: x(row.ci_low), x2: x(row.ci_high), y1: mid, y2: mid, class: "ci" }, g);
    for (const v of [row.ci_low, row.ci_high]) el("line", { x1: x(v), x2: x(v), y1: mid - 6, y2: mid + 6, class: "ci" }, g);
    el("text", { x: labelW + plotW + 6, y: y + 15, class: "value" }, g,
      `${pp(row.uplift)} [${pp(row.ci_low)}, ${pp(row.ci_high)}]`);
  });
  container.replaceChildren(root);
  // A long rule name (key-account-churn-visibility) ran into its "no control group" or its bar.
  for (const label of labels) fitLabel(label, labelW - 8);
}

// Vertical bars, one per time bucket.
export function histogram(container, data) {
  if (!data.acted) {
    return empty(container, `No interventions recorded in this period (${data.not_acted} routed alerts not acted on).`);
  }
  const left = 30, plotH = 150, bottom = 34, top = 16, barW = 56, gap = 12;
  const max = Math.max(...data.buckets.map((b) => b.count));
  const width = left + data.buckets.length * (barW + gap);
  const root = svg(width, top + plotH + bottom);
  el("line", { x1: left - 4, x2: width, y1: top + plotH, y2: top + plotH, class: "axis" }, root);
  data.buckets.forEach((bucket, i) => {
    const h = max ? (bucket.count / max) * plotH : 0;
    const x = left + i * (barW + gap);
    el("rect", {
      x, y: top + plotH - h, width: barW, height: Math.max(h, 0.5), class: "bar tta",
      "data-bucket": bucket.label, "data-count": bucket.count,
    }, root);
    el("text", { x: x + barW / 2, y: top + plotH - h - 3, "text-anchor": "middle", class: "value" }, root, bucket.count);
    el("text", { x: x + barW / 2, y: top + plotH + 14, "text-anchor": "middle" }, root, bucket.label);
  });
  el("text", { x: left, y: top + plotH + 30 }, root,
    `${data.acted} acted on; ${data.not_acted} routed alerts without an intervention yet`);
  container.replaceChildren(root);
}

// Stacked bars per day, one colour per reason, with a legend.
export function rejections(container, data) {
  if (!data.total) return empty(container, "No rejections in this period.");
  const left = 30, plotH = 140, top = 16, bottom = 22, legendH = 18;
  const n = data.days.length;
  const step = Math.max(6, Math.min(60, 900 / n));
  const barW = Math.max(3, step * 0.7);
  const totals = data.days.map((_, d) => data.reasons.reduce((sum, r) => sum + data.counts[r][d], 0));
  const max = Math.max(...totals);
  const width = Math.max(left + n * step + 10, 420);
  const root = svg(width, top + plotH + bottom + legendH * Math.ceil(data.reasons.length / 4));
  el("line", { x1: left - 4, x2: width, y1: top + plotH, y2: top + plotH, class: "axis" }, root);
  const labelEvery = Math.ceil(n / 12);
  data.days.forEach((day, d) => {
    const x = left + d * step;
    let y = top + plotH;
    data.reasons.forEach((reason, r) => {
      const count = data.counts[reason][d];
      if (!count) return;
      const h = (count / max) * plotH;
      y -= h;
      const rect = el("rect", {
        x, y, width: barW, height: h, class: `bar reason-${r % 8}`,
        "data-day": day, "data-reason": reason, "data-count": count,
      }, root);
      el("title", {}, rect, `${day}: ${count} ${reason}`);
    });
    if (totals[d]) el("text", { x: x + barW / 2, y: y - 3, "text-anchor": "middle", class: "value" }, root, totals[d]);
    if (d % labelEvery === 0) el("text", { x, y: top + plotH + 14 }, root, day.slice(5));
  });
  data.reasons.forEach((reason, r) => {
    const x = left + (r % 4) * 150, y = top + plotH + bottom + Math.floor(r / 4) * legendH;
    el("rect", { x, y: y + 2, width: 10, height: 10, class: `reason-${r % 8}` }, root);
    const total = data.counts[reason].reduce((a, b) => a + b, 0);
    el("text", { x: x + 14, y: y + 11, class: "legend", "data-reason": reason, "data-total": total }, root,
      `${reason} (${total})`);
  });
  container.replaceChildren(root);
}
