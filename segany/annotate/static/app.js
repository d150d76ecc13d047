// segany annotate: the page. Plain JS, no build step. The server is the truth for stored masks;
// the page holds only the prompt being drawn (points, box, choice, brush strokes on the draft).
"use strict";
const $ = (id) => document.getElementById(id);
const COLORS = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [245, 130, 48], [145, 30, 180], [70, 240, 240],
  [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255], [170, 110, 40]];
const S = {
  n: 0, i: 0, w: 0, h: 0, masks: [], selected: null, mode: "points",
  points: [], box: null, dragFrom: null, draft: null, scores: [], choice: 0, strokes: [], brushR: 12,
  started: null, clicks: 0, pendingBrush: [], busy: false,
};
const startIndex = Number(new URLSearchParams(location.search).get("image") || 0);

async function api(method, path, body) {
  const opt = { method, headers: {} };
  if (body !== undefined) { opt.body = JSON.stringify(body); opt.headers["Content-Type"] = "application/json"; }
  const r = await fetch(path, opt);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${r.status}: ${JSON.stringify(data.detail || data)}`);
  return data;
}
const status = (t) => { $("status").textContent = t; };

function decodeRuns(runs, n) {  // row-major runs, background first -> Uint8Array(n)
  const m = new Uint8Array(n); let p = 0, on = 0;
  for (const r of runs) { if (on) m.fill(1, p, p + r); p += r; on ^= 1; }
  return m;
}

async function refreshProgress() {
  const d = await api("GET", "/api/images");
  S.n = d.images.length;
  $("progress").textContent = `image ${S.i + 1}/${S.n} · ${d.done} annotated · ${S.masks.length} masks here`;
}

async function openImage(i) {
  if (i < 0 || (S.n && i >= S.n)) return;
  status("loading image " + i + " …");
  S.i = i; clearPrompt(); S.selected = null;
  const img = new Image();
  img.src = `/api/images/${i}/image`;
  await img.decode();
  const d = await api("GET", `/api/images/${i}`);  // computes the embedding, prefetches the next
  S.w = d.width; S.h = d.height;
  for (const id of ["image", "overlay"]) { $(id).width = S.w; $(id).height = S.h; }
  $("image").getContext("2d").drawImage(img, 0, 0);
  setMasks(d.masks);
  history.replaceState(null, "", `?image=${i}`);
  status(`${d.key}: ${S.w}x${S.h}`);
  await refreshProgress();
  document.body.dataset.ready = String(i);  // for the browser test
}

function setMasks(list) {
  S.masks = list.map((m) => ({ ...m, bits: decodeRuns(m.runs, S.w * S.h) }));
  draw();
}
async function reloadMasks() {
  const d = await api("GET", `/api/images/${S.i}`);
  setMasks(d.masks);
  await refreshProgress();
}

function clearPrompt() {
  S.points = []; S.box = null; S.draft = null; S.scores = []; S.choice = 0; S.strokes = [];
  S.started = null; S.clicks = 0; $("choices").innerHTML = ""; draw();
}

function draw() {
  const ctx = $("overlay").getContext("2d");
  if (!S.w) return;
  const im = ctx.createImageData(S.w, S.h), px = im.data;
  const paint = (bits, [r, g, b], a) => {
    for (let k = 0; k < bits.length; k++) if (bits[k]) {
      const o = 4 * k; px[o] = r; px[o + 1] = g; px[o + 2] = b; px[o + 3] = a;
    }
  };
  S.masks.forEach((m, j) => paint(m.bits, COLORS[j % COLORS.length], m.id === S.selected ? 200 : 110));
  if (S.draft) paint(S.draft, [30, 144, 255], 150);
  ctx.putImageData(im, 0, 0);
  const r = Math.max(4, Math.round(Math.max(S.w, S.h) / 150));
  for (const [x, y, l] of S.points) {
    ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fillStyle = l ? "#0f0" : "#f00"; ctx.fill(); ctx.lineWidth = 2; ctx.strokeStyle = "#fff"; ctx.stroke();
  }
  if (S.box) {
    ctx.lineWidth = Math.max(2, r / 2); ctx.strokeStyle = "#ff0";
    ctx.strokeRect(S.box[0], S.box[1], S.box[2] - S.box[0], S.box[3] - S.box[1]);
  }
}

function toImage(ev) {
  const c = $("overlay"), rect = c.getBoundingClientRect();
  const x = (ev.clientX - rect.left) * (S.w / rect.width), y = (ev.clientY - rect.top) * (S.h / rect.height);
  return [Math.min(Math.max(x, 0), S.w - 1), Math.min(Math.max(y, 0), S.h - 1)];
}

async function decode() {
  if (!S.points.length && !S.box) { S.draft = null; draw(); return; }
  const t0 = performance.now();
  const d = await api("POST", `/api/images/${S.i}/decode`, { points: S.points, box: S.box, multimask: true });
  S.scores = d.scores; S.draftRuns = d.masks;
  S.choice = d.masks.length > 1 ? d.scores.indexOf(Math.max(...d.scores)) : 0;
  S.strokes = [];
  showChoices();
  pick(S.choice);
  status(`mask in ${(performance.now() - t0).toFixed(0)} ms`);
}

function showChoices() {
  const el = $("choices"); el.innerHTML = "";
  if (S.scores.length < 2) return;
  S.scores.forEach((s, j) => {
    const b = document.createElement("button");
    b.className = "choice" + (j === S.choice ? " active" : "");
    b.textContent = `${j + 1}: ${s.toFixed(2)}`; b.title = `mask ${j + 1} of 3 (key ${j + 1})`;
    b.onclick = () => pick(j); el.appendChild(b);
  });
}
function pick(j) {
  if (!S.draftRuns || j >= S.draftRuns.length) return;
  S.choice = j; S.strokes = [];
  S.draft = decodeRuns(S.draftRuns[j], S.w * S.h);
  [...document.querySelectorAll("button.choice")].forEach((b, k) => b.classList.toggle("active", k === j));
  draw();
}

function disk(bits, x, y, r, value) {
  const x0 = Math.max(0, Math.floor(x - r)), x1 = Math.min(S.w - 1, Math.ceil(x + r));
  const y0 = Math.max(0, Math.floor(y - r)), y1 = Math.min(S.h - 1, Math.ceil(y + r));
  for (let yy = y0; yy <= y1; yy++) for (let xx = x0; xx <= x1; xx++)
    if ((xx - x) ** 2 + (yy - y) ** 2 <= r * r) bits[yy * S.w + xx] = value;
}

function brushAt(ev) {
  const [x, y] = toImage(ev).map(Math.round), erase = S.mode === "eraser";
  const stroke = { x, y, r: S.brushR, erase };
  if (S.draft) { disk(S.draft, x, y, S.brushR, erase ? 0 : 1); S.strokes.push(stroke); }
  else if (S.selected !== null) {
    const m = S.masks.find((m) => m.id === S.selected);
    if (m) { disk(m.bits, x, y, S.brushR, erase ? 0 : 1); S.pendingBrush.push(stroke); }
  } else { status("brush: select a stored mask (s) or start a mask with a click first"); return; }
  draw();
}

function setMode(m) {
  S.mode = m;
  document.querySelectorAll("button.mode").forEach((b) => b.classList.toggle("active", b.dataset.mode === m));
}

const ov = $("overlay");
ov.addEventListener("contextmenu", (e) => e.preventDefault());
ov.addEventListener("mousedown", (ev) => {
  if (S.busy) return;
  S.started = S.started || performance.now();
  if (S.mode === "box") S.dragFrom = toImage(ev);
  else if (S.mode === "brush" || S.mode === "eraser") { S.dragFrom = true; S.clicks++; brushAt(ev); }
});
ov.addEventListener("mousemove", (ev) => {
  if (!S.dragFrom) return;
  if (S.mode === "box") {
    const [x, y] = toImage(ev), [a, b] = S.dragFrom;
    S.box = [Math.min(a, x), Math.min(b, y), Math.max(a, x) + 1, Math.max(b, y) + 1]; draw();
  } else brushAt(ev);
});
ov.addEventListener("mouseup", async (ev) => {
  const from = S.dragFrom; S.dragFrom = null;
  try {
    if (S.mode === "points") {
      const [x, y] = toImage(ev);
      S.points.push([x, y, ev.button === 2 || ev.shiftKey ? 0 : 1]); S.clicks++;
      await decode();
    } else if (S.mode === "box" && from) {
      if (S.box && S.box[2] - S.box[0] > 2 && S.box[3] - S.box[1] > 2) { S.clicks++; await decode(); }
    } else if ((S.mode === "brush" || S.mode === "eraser") && S.pendingBrush.length) {
      const strokes = S.pendingBrush; S.pendingBrush = [];
      await api("POST", `/api/images/${S.i}/masks/${S.selected}/brush`,
        { strokes, seconds: (performance.now() - S.started) / 1000 });
      S.started = null; await reloadMasks(); status("mask fixed");
    } else if (S.mode === "select") {
      const [x, y] = toImage(ev).map(Math.floor), k = y * S.w + x;
      const hit = [...S.masks].reverse().find((m) => m.bits[k]);
      S.selected = hit ? hit.id : null; S.started = null; draw();
      status(hit ? `selected mask ${hit.id} (${hit.source}${hit.label ? ", " + hit.label : ""})` : "no mask here");
    }
  } catch (e) { status(String(e)); }
});

async function accept() {
  if (!S.draft) { status("nothing to accept: click an object first"); return; }
  const body = { points: S.points, box: S.box, multimask: true, choice: S.choice, strokes: S.strokes,
    label: $("label").value || null, seconds: (performance.now() - (S.started || performance.now())) / 1000,
    clicks: S.clicks };
  const a = await api("POST", `/api/images/${S.i}/accept`, body);
  clearPrompt(); await reloadMasks(); status(`stored mask ${a.id} (${a.seconds} s, ${a.clicks} clicks)`);
}
async function undo() {
  if (S.points.length || S.box) {
    if (S.points.length) S.points.pop(); else S.box = null;
    await decode(); return;
  }
  await api("POST", `/api/images/${S.i}/undo`); await reloadMasks(); status("undone");
}
async function del() {
  if (S.selected === null) { status("select a mask first (s, then click it)"); return; }
  await api("POST", `/api/images/${S.i}/masks/${S.selected}/delete`);
  S.selected = null; await reloadMasks(); status("deleted");
}
async function reloadModel() {
  status("loading the checkpoint …");
  const d = await api("POST", "/api/model/reload");
  status("model: " + d.model); await openImage(S.i);
}

const safe = (f) => async (...a) => { try { await f(...a); } catch (e) { status(String(e)); } };
$("prev").onclick = safe(() => openImage(S.i - 1));
$("next").onclick = safe(() => openImage(S.i + 1));
$("accept").onclick = safe(accept);
$("undo").onclick = safe(undo);
$("delete").onclick = safe(del);
$("clear").onclick = () => clearPrompt();
$("reload").onclick = safe(reloadModel);
document.querySelectorAll("button.mode").forEach((b) => { b.onclick = () => setMode(b.dataset.mode); });

const KEYS = {
  Enter: accept, a: accept, z: undo, Delete: del, d: del, Escape: clearPrompt,
  n: () => openImage(S.i + 1), ArrowRight: () => openImage(S.i + 1),
  p: () => openImage(S.i - 1), ArrowLeft: () => openImage(S.i - 1),
  q: () => setMode("points"), x: () => setMode("box"), b: () => setMode("brush"), e: () => setMode("eraser"),
  s: () => setMode("select"), 1: () => pick(0), 2: () => pick(1), 3: () => pick(2),
  "[": () => { S.brushR = Math.max(1, Math.round(S.brushR / 1.5)); status("brush radius " + S.brushR); },
  "]": () => { S.brushR = Math.round(S.brushR * 1.5) + 1; status("brush radius " + S.brushR); },
};
document.addEventListener("keydown", (ev) => {
  if (ev.target.tagName === "INPUT") { if (ev.key === "Enter") safe(accept)(); return; }
  const f = KEYS[ev.key];
  if (f) { ev.preventDefault(); safe(f)(); }
});

setMode("points");
safe(async () => { const info = await api("GET", "/api/info"); S.n = info.images;
  document.title = `segany annotate · ${info.model}`; await openImage(Math.min(startIndex, S.n - 1)); })();
