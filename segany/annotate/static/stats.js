// Statistics page: plain SVG plots of /api/stats.
"use strict";
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}
// values: numbers; kind "bar" or "dots"; labels under bars (optional)
function plot(id, values, kind, labels) {
  const W = 720, H = 200, L = 40, B = 24, root = document.getElementById(id);
  if (!values.length) { root.textContent = "no data yet"; return; }
  const svg = el("svg", { width: W, height: H }, root);
  const top = Math.max(...values) || 1, n = values.length, dx = (W - L - 10) / n;
  el("line", { x1: L, y1: H - B, x2: W - 5, y2: H - B, stroke: "#888" }, svg);
  el("line", { x1: L, y1: 5, x2: L, y2: H - B, stroke: "#888" }, svg);
  for (const f of [0, 0.5, 1]) {
    const t = el("text", { x: L - 4, y: H - B - f * (H - B - 10) + 4, "text-anchor": "end" }, svg);
    t.textContent = +(f * top).toFixed(1);
  }
  values.forEach((v, j) => {
    const x = L + j * dx, y = H - B - (v / top) * (H - B - 10);
    if (kind === "bar") el("rect", { x: x + 1, y, width: Math.max(1, dx - 2), height: H - B - y, fill: "#4a9" }, svg);
    else el("circle", { cx: x + dx / 2, cy: y, r: 3, fill: "#59f" }, svg);
    if (labels && n <= 30) {
      const t = el("text", { x: x + dx / 2, y: H - 8, "text-anchor": "middle" }, svg);
      t.textContent = labels[j];
    }
  });
}
function median(a) { const s = [...a].sort((x, y) => x - y); return s.length ? s[Math.floor(s.length / 2)] : NaN; }
(async () => {
  const r = await fetch("/api/stats"), d = await r.json();
  const manual = d.masks.filter((m) => m.source === "manual");
  const secs = manual.map((m) => m.seconds || 0), clicks = manual.map((m) => m.clicks || 0);
  const bySource = {};
  d.masks.forEach((m) => { bySource[m.source] = (bySource[m.source] || 0) + 1; });
  document.getElementById("summary").textContent =
    ` ${d.images.length} images, ${d.masks.length} masks (${Object.entries(bySource).map(([k, v]) => k + " " + v).join(", ")});` +
    ` manual: median ${median(secs).toFixed(1)} s and ${median(clicks)} clicks per mask`;
  plot("per-image", d.images.map((x) => x.masks), "bar", d.images.map((x) => x.key.replace(/\.[^.]*$/, "")));
  plot("seconds", secs, "dots");
  plot("clicks", clicks, "dots");
})();
