// The sdsup demo page: prompt -> layout (generated, painted, uploaded, or a segmented photo) -> images.
// The layout lives here as class ids at the model's resolution (state.ids); painting writes ids, never
// colours, so what is sent is exactly what was painted. The server (sdsup/demo/server.py) checks everything.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,          // /api/info
  size: 0,
  ids: null,           // Uint8Array(size * size), row-major class ids
  colours: {},         // id -> [r, g, b]
  names: {},           // id -> class name
  current: 0,          // class the brush paints
  undo: [],            // earlier ids, newest last
  origin: null,        // where the layout came from: {kind, text, token?} ("generated" ones carry a token)
  edited: false,
  busy: false,
  lastPoint: null,
};
const UNDO_DEPTH = 40;

// ------------------------------------------------------------------------------------------- messages
function message(text, kind = "error") {
  const box = document.createElement("div");
  box.className = `message ${kind}`;
  const close = document.createElement("button");
  close.textContent = "\u00d7";
  close.title = "dismiss";
  close.onclick = () => box.remove();
  box.append(close, document.createTextNode(text));
  $("messages").prepend(box);
  while ($("messages").children.length > 6) $("messages").lastChild.remove();
  if (kind === "note") setTimeout(() => box.remove(), 30000);
}

// A new action makes earlier errors stale; notes (what an upload did) stay until dismissed or timed out.
function clearErrors() { $("messages").querySelectorAll(".error").forEach((box) => box.remove()); }

// ------------------------------------------------------------------------------------------- server
async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  let payload;
  try { payload = await response.json(); } catch (e) { throw new Error(`the server answered ${response.status}`); }
  if (!response.ok) throw new Error(payload.error || `the server answered ${response.status}`);
  return payload;
}

function toBase64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function fromBase64(text) {
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// A long call: buttons off, the progress indicator on (the server says what it is doing), errors to the page.
async function busy(task, fn) {
  if (state.busy) return;
  state.busy = true;
  clearErrors();
  document.querySelectorAll("button.primary, #btn-another, #upload-layout, #upload-photo")
    .forEach((b) => { b.disabled = true; });
  $("progress").hidden = false;
  const started = performance.now();
  const tick = async () => {
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    let phase = "";
    try { const s = await api("/api/status"); if (s.busy) phase = s.phase; } catch (e) { /* the call itself reports */ }
    if (state.busy) $("progress-text").textContent = `${task}: ${phase || "working"} (${seconds} s)`;
  };
  tick();
  const timer = setInterval(tick, 400);
  try {
    return await fn();
  } catch (e) {
    message(`${task}: ${e.message}`);
  } finally {
    clearInterval(timer);
    state.busy = false;
    $("progress").hidden = true;
    document.querySelectorAll("button.primary, #btn-another, #upload-layout, #upload-photo")
      .forEach((b) => { b.disabled = false; });
    applyCapabilities();
  }
}

// ------------------------------------------------------------------------------------------- layout
function render() {
  const canvas = $("layout-canvas");
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(state.size, state.size);
  for (let i = 0; i < state.ids.length; i++) {
    const c = state.colours[state.ids[i]] || [255, 0, 255];
    image.data[4 * i] = c[0]; image.data[4 * i + 1] = c[1]; image.data[4 * i + 2] = c[2]; image.data[4 * i + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  updateShares();
}

function updateShares() {
  const counts = new Map();
  for (const id of state.ids) counts.set(id, (counts.get(id) || 0) + 1);
  document.querySelectorAll("#class-picker .class-item").forEach((item) => {
    const n = counts.get(Number(item.dataset.id)) || 0;
    item.querySelector(".class-pct").textContent = n ? `${(100 * n / state.ids.length).toFixed(1)}%` : "";
    item.classList.toggle("absent", n === 0);
  });
}

function setLayout(ids, origin) {
  state.ids = ids;
  state.origin = origin;
  state.edited = false;
  render();
  showOrigin();
}

function showOrigin() {
  const o = state.origin;
  $("layout-origin").textContent = o ? `${o.text}${state.edited ? " \u00b7 edited" : ""}` : "";
  const command = o && o.command && !state.edited ? o.command : "";
  $("layout-command").hidden = !command;
  $("layout-command").textContent = command;
}

function pushUndo() {
  state.undo.push(state.ids.slice());
  if (state.undo.length > UNDO_DEPTH) state.undo.shift();
}

function markEdited() {
  if (!state.edited) { state.edited = true; showOrigin(); }
}

function pixelAt(event) {
  const canvas = $("layout-canvas");
  const box = canvas.getBoundingClientRect();  // includes the border; the map fills the content box
  const x = Math.floor((event.clientX - box.left - canvas.clientLeft) / canvas.clientWidth * state.size);
  const y = Math.floor((event.clientY - box.top - canvas.clientTop) / canvas.clientHeight * state.size);
  return [Math.min(Math.max(x, 0), state.size - 1), Math.min(Math.max(y, 0), state.size - 1)];
}

function tool() { return document.querySelector("input[name=tool]:checked").value; }

function paintValue() { return tool() === "eraser" ? state.info.ignore_id : state.current; }

function stamp(cx, cy, value) {
  const r = Number($("brush-size").value);
  for (let dy = -r; dy <= r; dy++) {
    for (let dx = -r; dx <= r; dx++) {
      const x = cx + dx, y = cy + dy;
      if (x < 0 || y < 0 || x >= state.size || y >= state.size || dx * dx + dy * dy > r * r + r) continue;
      state.ids[y * state.size + x] = value;
    }
  }
}

// A stroke is continuous however fast the pointer moves: stamps along the segment between two events.
function paintSegment(from, to, value) {
  const steps = Math.max(Math.abs(to[0] - from[0]), Math.abs(to[1] - from[1]), 1);
  for (let s = 0; s <= steps; s++) {
    const x = Math.round(from[0] + (to[0] - from[0]) * s / steps);
    const y = Math.round(from[1] + (to[1] - from[1]) * s / steps);
    stamp(x, y, value);
  }
}

function floodFill(x, y, value) {
  const size = state.size, ids = state.ids, target = ids[y * size + x];
  if (target === value) return;
  const stack = [y * size + x];
  while (stack.length) {
    const i = stack.pop();
    if (ids[i] !== target) continue;
    ids[i] = value;
    const px = i % size, py = (i - px) / size;
    if (px > 0) stack.push(i - 1);
    if (px < size - 1) stack.push(i + 1);
    if (py > 0) stack.push(i - size);
    if (py < size - 1) stack.push(i + size);
  }
}

function onPointerDown(event) {
  if (!state.ids || event.button !== 0) return;
  event.preventDefault();
  $("layout-canvas").setPointerCapture(event.pointerId);
  pushUndo();
  const p = pixelAt(event);
  if (tool() === "fill") {
    floodFill(p[0], p[1], state.current);
    state.lastPoint = null;
  } else {
    paintSegment(p, p, paintValue());
    state.lastPoint = p;
  }
  markEdited();
  render();
}

function onPointerMove(event) {
  if (!state.ids) return;
  const p = pixelAt(event);
  const id = state.ids[p[1] * state.size + p[0]];
  $("hover").textContent = `(${p[0]}, ${p[1]}): ${state.names[id] || id}`;
  if (state.lastPoint) {
    paintSegment(state.lastPoint, p, paintValue());
    state.lastPoint = p;
    render();
  }
}

function onPointerUp() { state.lastPoint = null; }

function selectClass(id) {
  state.current = id;
  document.querySelectorAll("#class-picker .class-item").forEach((item) => {
    item.classList.toggle("selected", Number(item.dataset.id) === id);
  });
  if (tool() === "eraser") $("tool-brush").checked = true;
}

function buildClassPicker() {
  const picker = $("class-picker");
  picker.replaceChildren();
  for (const c of state.info.classes) {
    if (c.id === state.info.ignore_id) continue;  // the eraser paints ignore
    const item = document.createElement("button");
    item.className = "class-item";
    item.dataset.id = c.id;
    item.title = `paint ${c.name} (${c.colour})`;
    item.innerHTML = `<span class="swatch" style="background:${c.colour}"></span><span class="class-name"></span>` +
      `<span class="class-pct"></span>`;
    item.querySelector(".class-name").textContent = c.name;
    item.onclick = () => selectClass(c.id);
    picker.append(item);
  }
  selectClass(state.info.classes[0].id);
  // Real datasets have up to 150+ classes (ADE20K, COCO-Stuff): a filter finds one by name.
  const filter = $("class-filter");
  filter.hidden = state.info.classes.length <= 24;
  filter.oninput = () => {
    const text = filter.value.trim().toLowerCase();
    picker.querySelectorAll(".class-item").forEach((item) => {
      item.hidden = text !== "" && !item.querySelector(".class-name").textContent.toLowerCase().includes(text);
    });
  };
}

function legendChips(target, ids) {
  target.replaceChildren();
  for (const c of state.info.classes) {
    if (!ids.has(c.id)) continue;
    const chip = document.createElement("span");
    chip.className = "class-item";
    chip.innerHTML = `<span class="swatch" style="background:${c.colour}"></span><span class="class-name"></span>`;
    chip.querySelector(".class-name").textContent = c.name;
    target.append(chip);
  }
}

// ------------------------------------------------------------------------------------------- actions
function prompt() { return $("prompt").value.trim(); }

function layoutRequest() {
  return {prompt: prompt(), mode: $("layout-mode").value, seed: Number($("layout-seed").value),
          steps: Number($("layout-steps").value), temperature: Number($("layout-temperature").value),
          guidance: Number($("layout-guidance").value)};
}

async function generateLayout() {
  if (!prompt()) { message("the prompt is empty: describe the image first"); $("prompt").focus(); return; }
  await busy("layout", async () => {
    const request = layoutRequest();
    const got = await api("/api/layout", request);
    pushUndo();
    const how = request.mode === "map" ? "most probable map" : `sampled, seed ${request.seed}`;
    setLayout(fromBase64(got.ids), {kind: "generated", token: got.token, command: got.command,
                                    text: `drawn by the layout model (${how}): ${got.classes.join(", ")}`});
  });
}

async function anotherLayout() {
  $("layout-mode").value = "sample";  // the most probable map does not change with the seed
  $("layout-seed").value = Number($("layout-seed").value) + 1;
  await generateLayout();
}

async function uploadLayout() {
  const file = $("upload-layout").files[0];
  if (!file) return;
  await busy("layout upload", async () => {
    const got = await api("/api/upload_layout",
                          {filename: file.name, data: await readFile(file), snap: $("snap").checked});
    pushUndo();
    setLayout(fromBase64(got.ids), {kind: "uploaded", text: `uploaded ${file.name}: ${got.classes.join(", ")}`});
    got.notes.forEach((n) => message(n, "note"));
  });
  $("upload-layout").value = "";
}

async function uploadPhoto() {
  const file = $("upload-photo").files[0];
  if (!file) return;
  await busy("photo", async () => {
    const got = await api("/api/photo", {filename: file.name, data: await readFile(file)});
    pushUndo();
    $("photo-preview").src = got.photo;
    $("photo-preview").hidden = false;
    setLayout(fromBase64(got.ids), {kind: "photo",
                                    text: `the evaluation segmenter's map of ${file.name}: ${got.classes.join(", ")}`});
    got.notes.forEach((n) => message(n, "note"));
  });
  $("upload-photo").value = "";
}

async function saveLayout(which) {
  await busy("save layout", async () => {
    const got = await api("/api/export_layout", {ids: toBase64(state.ids)});
    const link = document.createElement("a");
    link.href = `${got[which]}?download=1`;
    link.download = which === "npy" ? "layout.npy" : "layout.png";
    document.body.append(link);
    link.click();
    link.remove();
  });
}

function imageBox(src, caption, pixelated, className) {
  const figure = document.createElement("figure");
  const link = document.createElement("a");  // full size in a new tab
  link.href = src;
  link.target = "_blank";
  const img = document.createElement("img");
  img.src = src;
  img.alt = caption;
  img.className = className + (pixelated ? " pixelated" : "");
  link.append(img);
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  figure.append(link, cap);
  return figure;
}

function waitForImages(root) {
  return Promise.all([...root.querySelectorAll("img")].map((img) => img.complete ? Promise.resolve() :
    new Promise((resolve) => { img.onload = resolve; img.onerror = resolve; })));
}

async function generate() {
  if (!prompt()) { message("the prompt is empty: describe the image first"); $("prompt").focus(); return; }
  const clicked = performance.now();
  await busy("generate", async () => {
    const origin = state.origin;
    const got = await api("/api/generate", {
      prompt: prompt(), layout: toBase64(state.ids), seed: Number($("seed").value), num_samples: Number($("num").value),
      steps: Number($("steps").value), guidance: Number($("guidance").value), solver: $("solver").value,
      layout_token: origin && origin.kind === "generated" && !state.edited ? origin.token : null});
    showResults(got);
    await waitForImages($("results"));
    const shown = (performance.now() - clicked) / 1000;
    $("timing").textContent =
      `Generate \u2192 images shown: ${shown.toFixed(2)} s (models ${got.seconds.toFixed(2)} s)`;
    $("timing").dataset.seconds = shown.toFixed(3);
  });
}

function showResults(got) {
  const results = $("results");
  results.replaceChildren();
  const pixelated = state.size <= 128;
  const seen = new Set();
  got.results.forEach((r, i) => {
    const card = document.createElement("div");
    card.className = "result";
    card.dataset.index = i;
    const panels = document.createElement("div");
    panels.className = "panels";
    if (got.files.png) {
      const caption = got.conditioned ? "layout asked for" : "your layout (not used: no conditioner)";
      panels.append(imageBox(got.files.png, caption, pixelated, "asked"));
    }
    panels.append(imageBox(r.image, `image ${i}`, pixelated, "image"));
    if (r.reading) panels.append(imageBox(r.reading, "segmenter's reading", pixelated, "reading"));
    card.append(panels);
    const score = document.createElement("div");
    score.className = "score";
    if (r.agreement && r.agreement.miou !== null) {
      const ious = Object.entries(r.agreement.per_class_iou).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(", ");
      score.innerHTML = `mIoU <b class="miou"></b> <span class="meta">(reading vs layout; pixel accuracy ` +
        `${(100 * r.agreement.pixel_accuracy).toFixed(0)}%)</span>`;
      score.querySelector(".miou").textContent = r.agreement.miou.toFixed(3);
      score.title = `IoU per class: ${ious}`;
      Object.keys(r.agreement.per_class_iou).forEach((name) => seen.add(name));
    } else if (!r.reading) {
      score.innerHTML = '<span class="meta">no evaluation segmenter in this workdir: no reading</span>';
    }
    const link = document.createElement("a");
    link.href = `${r.image}?download=1`;
    link.textContent = `download image_${i}.png`;
    link.className = "meta";
    score.append(" ", link);
    card.append(score);
    results.append(card);
  });
  const ids = new Set(state.info.classes.filter((c) => seen.has(c.name)).map((c) => c.id));
  legendChips($("result-legend"), ids);
  const downloads = $("downloads");
  downloads.replaceChildren();
  const links = [["npy", "layout.npy (ids)"], ["png", "layout.png (palette)"], ["legend", "layout with legend"],
                 ["all", "everything (.zip)"]];
  for (const [key, text] of links) {
    if (!got.files[key]) continue;
    const a = document.createElement("a");
    a.href = key === "all" ? got.files[key] : `${got.files[key]}?download=1`;
    a.textContent = text;
    a.id = `download-${key}`;
    downloads.append(a);
  }
  $("command-box").hidden = false;
  $("command").textContent = got.command;
  $("layout-command-box").hidden = !got.layout_command;
  $("layout-command-run").textContent = got.layout_command || "";
}

// ------------------------------------------------------------------------------------------- start
function applyCapabilities() {
  const caps = state.info ? state.info.capabilities : {};
  $("btn-layout").disabled = state.busy || !caps.layout;
  $("btn-another").disabled = state.busy || !caps.layout;
  $("upload-photo").disabled = state.busy || !caps.segmenter;
}

async function pollWarmup() {
  try {
    const s = await api("/api/status");
    const parts = s.warmup.map((w) => {
      const mark = w.state.startsWith("ready") ? "\u2713" : w.state.startsWith("failed") ? "\u2717" : "\u2026";
      return `${w.name} ${mark} ${w.state}`;
    });
    $("warmup").textContent = parts.length ? `Warm-up: ${parts.join(" \u00b7 ")}` : "";
    const pending = s.warmup.some((w) => w.state === "waiting" || w.state === "compiling");
    $("warmup").dataset.done = pending ? "no" : "yes";
    if (pending) setTimeout(pollWarmup, 1000);
  } catch (e) {
    setTimeout(pollWarmup, 3000);
  }
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (e) {
    message(`cannot load the workdir's description: ${e.message}`);
    return;
  }
  const info = state.info;
  state.size = info.size;
  for (const c of info.classes) {
    state.colours[c.id] = [1, 3, 5].map((k) => parseInt(c.colour.slice(k, k + 2), 16));
    state.names[c.id] = c.name;
  }
  const caps = info.capabilities;
  const has = (ok, name) => `${name} ${ok ? "\u2713" : "\u2717"}`;
  $("workdir").textContent = `${info.workdir} \u00b7 ${info.dataset}, ${info.size}x${info.size} \u00b7 ` +
    [has(caps.layout, "text \u2192 layout"), has(caps.conditioner, "layout \u2192 image"),
     has(caps.segmenter, "evaluation segmenter")].join(" \u00b7 ") +
    (info.segmenter_real_miou !== null ? ` (its mIoU on real images ${info.segmenter_real_miou.toFixed(2)})` : "") +
    ` \u00b7 files in ${info.out}`;
  for (const n of info.notices) {
    const box = document.createElement("div");
    box.className = "notice";
    box.textContent = n;
    $("notices").append(box);
  }
  const canvas = $("layout-canvas");
  canvas.width = canvas.height = info.size;
  $("brush-size").max = Math.max(1, Math.floor(info.size / 4));
  const d = info.defaults;
  $("steps").value = d.steps; $("guidance").value = d.guidance;
  $("seed").value = d.seed; $("num").value = d.num_samples;
  $("num").max = info.limits.num_samples;
  $("layout-steps").value = d.layout_steps; $("layout-temperature").value = d.layout_temperature;
  $("layout-guidance").value = d.layout_guidance;
  for (const s of info.solvers) {
    const option = document.createElement("option");
    option.value = option.textContent = s;
    $("solver").append(option);
  }
  $("solver").value = d.solver;
  for (const example of info.examples) {
    const chip = document.createElement("button");
    chip.textContent = example;
    chip.onclick = () => { $("prompt").value = example; };
    $("examples").append(chip);
  }
  buildClassPicker();
  setLayout(new Uint8Array(info.size * info.size).fill(info.ignore_id),
            {kind: "empty", text: caps.layout ? "empty: generate a layout from the prompt, or paint one" :
                                                "empty: paint a layout or upload one"});
  applyCapabilities();
  $("layout-mode").disabled = !caps.layout;

  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", onPointerUp);
  canvas.addEventListener("pointerleave", () => { $("hover").innerHTML = "&nbsp;"; });
  $("brush-size").oninput = () => { $("brush-size-value").textContent = `${$("brush-size").value} px`; };
  $("btn-layout").onclick = generateLayout;
  $("btn-another").onclick = anotherLayout;
  $("btn-generate").onclick = generate;
  $("btn-undo").onclick = () => { if (state.undo.length) { state.ids = state.undo.pop(); markEdited(); render(); } };
  $("btn-clear").onclick = () => { pushUndo(); state.ids.fill(info.ignore_id); markEdited(); render(); };
  $("upload-layout").onchange = uploadLayout;
  $("upload-photo").onchange = uploadPhoto;
  $("btn-save-npy").onclick = () => saveLayout("npy");
  $("btn-save-png").onclick = () => saveLayout("png");
  $("btn-copy").onclick = () => navigator.clipboard && navigator.clipboard.writeText($("command").textContent);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generateLayout();
  });
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "z" && document.activeElement !== $("prompt")) {
      e.preventDefault(); $("btn-undo").click();
    }
  });
  document.body.dataset.ready = "yes";
  pollWarmup();
}

window.sdsupDemo = state;  // for tests and the browser console
start();
