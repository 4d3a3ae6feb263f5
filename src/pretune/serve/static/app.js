// The pages of `pretune serve`: plain JavaScript over the JSON API (no library, nothing fetched
// from outside the server).
"use strict";
const pretune = (() => {
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

  async function post(path, body) {
    const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const d = await r.json();
    if (!r.ok) throw new Error(d.error || r.statusText);
    return d;
  }
  const fail = (el) => (e) => { el.innerHTML = `<span class="err">${esc(e.message)}</span>`; };
  const bars = (pairs) => pairs.map(([w, p]) =>
    `<div class="cand"><span class="bar" style="width:${Math.max(2, 200 * p)}px"></span>` +
    `<b class="tok">${esc(w)}</b> <span class="prob">${p.toFixed(3)}</span></div>`).join("");

  function fillMask() {
    const out = $("fm-out");
    out.textContent = "…";
    post("/api/fill-mask", {run: $("fm-run").value, text: $("fm-text").value, top_k: +$("fm-topk").value})
      .then((d) => { out.innerHTML = d.masks.map((m, i) => `<div class="mask"><i>[MASK] #${i + 1}</i>` +
        bars(m.map((c) => [c.token, c.probability])) + "</div>").join(""); })
      .catch(fail(out));
  }

  // Server-sent events over a POST: the body is read as it arrives, split at blank lines.
  async function generate() {
    const out = $("gen-out"), n = $("gen-events"), state = $("gen-state");
    out.textContent = $("gen-prompt").value; n.textContent = "0"; state.textContent = "generating";
    let count = 0;
    const body = {run: $("gen-run").value, prompt: $("gen-prompt").value, max_new_tokens: +$("gen-max").value,
      temperature: +$("gen-temp").value, top_k: +$("gen-topk").value, top_p: +$("gen-topp").value, seed: +$("gen-seed").value};
    try {
      const r = await fetch("/api/generate/stream", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      if (!r.ok) throw new Error((await r.json()).error);
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += dec.decode(value, {stream: true});
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i); buf = buf.slice(i + 2);
          const ev = (block.match(/^event: (.*)$/m) || [])[1], data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
          if (ev === "token") { out.textContent += data.text; n.textContent = String(++count); }
          else if (ev === "done") { out.textContent = body.prompt + data.text; state.textContent = `done: ${data.tokens} tokens`; }
          else if (ev === "error") throw new Error(data.error);
        }
      }
    } catch (e) { state.innerHTML = `<span class="err">${esc(e.message)}</span>`; }
  }

  function classify() {
    const out = $("cls-out");
    post("/api/classify", {run: $("cls-run").value, texts: [$("cls-text").value]})
      .then((d) => { const r = d.results[0]; out.innerHTML = `<b id="cls-label">${esc(r.label)}</b>` +
        bars(Object.entries(r.probabilities).sort((a, b) => b[1] - a[1])); })
      .catch(fail(out));
  }

  function similarity() {
    const out = $("sim-out");
    post("/api/similarity", {run: $("sim-run").value, a: $("sim-a").value, b: $("sim-b").value})
      .then((d) => { out.innerHTML = `cosine <b id="sim-value">${d.similarity.toFixed(4)}</b> <span class="meta">(${esc(d.pooling)} pooling)</span>`; })
      .catch(fail(out));
  }

  const si = (x, u = "") => { if (x == null) return "-"; for (const [f, p] of [[1e15, "P"], [1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]]) if (Math.abs(x) >= f) return (x / f).toPrecision(3) + " " + p + u; return x.toPrecision(3) + " " + u; };
  function cost() {
    const out = $("cost-out");
    const models = [...document.querySelectorAll("#cost-models input:checked")].map((e) => e.value);
    const price = $("cost-price").value.trim();
    post("/api/cost", {models, tokens: +$("cost-tokens").value, hardware: $("cost-hw").value, gpus: +$("cost-gpus").value,
      mfu: +$("cost-mfu").value, price: price ? +price : null})
      .then((d) => {
        const rows = [["parameters", (p) => si(p.params.total)], ["active / token", (p) => si(p.params.active)],
          ["training FLOPs", (p) => p.flops.total.toExponential(2)], ["PF-days", (p) => p.pf_days.toPrecision(3)],
          ["wall-clock days", (p) => p.wall_clock_days.toPrecision(3)], ["cost", (p) => p.usd == null ? "-" : "$" + si(p.usd)],
          ["energy", (p) => p.energy_kwh == null ? "-" : si(p.energy_kwh * 1e3, "Wh")],
          ["train states", (p) => si(p.memory_bytes.train_states, "B")]];
        out.innerHTML = `<div class="meta">${esc(d.hardware.label)}</div><table id="cost-table"><tr><th></th>` +
          d.plans.map((p) => `<th>${esc(p.model)}</th>`).join("") + "</tr>" +
          rows.map(([n, f]) => `<tr><td>${n}</td>` + d.plans.map((p) => `<td>${f(p)}</td>`).join("") + "</tr>").join("") + "</table>";
      }).catch(fail(out));
  }

  async function index() {
    const d = await (await fetch("/api/runs")).json();
    $("runs-line").textContent = d.runs.map((r) => `${r.name} (${r.kind})`).join(", ");
    for (const sec of document.querySelectorAll("section[data-cap]")) {
      const cap = sec.dataset.cap, can = d.runs.filter((r) => r.capabilities.includes(cap));
      sec.classList.toggle("off", can.length === 0);
      const sel = sec.querySelector("select");
      sel.innerHTML = can.map((r) => `<option>${esc(r.name)}</option>`).join("");
    }
    $("cost-models").innerHTML = d.cost_presets.map((p) => `<label><input type="checkbox" value="${esc(p)}" checked>${esc(p)}</label>`).join("") +
      d.runs.map((r) => `<label><input type="checkbox" value="${esc(r.name)}">${esc(r.name)}</label>`).join("");
    $("cost-hw").innerHTML = d.hardware.map((h) => `<option${h === "a100" ? " selected" : ""}>${esc(h)}</option>`).join("");
    $("run-links").innerHTML = d.runs.map((r) => `<li><a href="/run/${encodeURIComponent(r.name)}">${esc(r.name)}</a> ` +
      `<span class="meta">${esc(r.kind)}, ${r.layers} layers, d=${r.d_model}, window ${r.window}</span></li>`).join("");
    $("fm-go").onclick = fillMask; $("gen-go").onclick = generate; $("cls-go").onclick = classify;
    $("sim-go").onclick = similarity; $("cost-go").onclick = cost;
    document.body.dataset.ready = "1";
  }

  // One curve per canvas, y against step; redrawn whenever the metrics grow.
  function plot(canvas, pts, label) {
    const g = canvas.getContext("2d"), W = canvas.width, H = canvas.height, L = 60, B = 24;
    g.clearRect(0, 0, W, H);
    g.font = "11px sans-serif"; g.fillStyle = "#666";
    if (pts.length === 0) { g.fillText(`no ${label} logged`, L, H / 2); return; }
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 * 1.0001 + 1e-12);
    const X = (x) => L + (W - L - 10) * (x - x0) / (x1 - x0), Y = (y) => H - B - (H - B - 10) * (y - y0) / (y1 - y0);
    g.strokeStyle = "#ccc"; g.beginPath(); g.moveTo(L, 10); g.lineTo(L, H - B); g.lineTo(W - 10, H - B); g.stroke();
    g.fillText(y1.toPrecision(3), 2, 14); g.fillText(y0.toPrecision(3), 2, H - B); g.fillText(`step ${x0}`, L, H - 6);
    g.fillText(String(x1), W - 40, H - 6);
    g.strokeStyle = "#2b6cb0"; g.lineWidth = 1.5; g.beginPath();
    pts.forEach(([x, y], i) => (i ? g.lineTo(X(x), Y(y)) : g.moveTo(X(x), Y(y))));
    g.stroke();
  }

  async function runPage() {
    const name = decodeURIComponent(location.pathname.split("/").pop());
    $("run-name").textContent = name;
    let recs = [], last = -1, offset = 0;
    const tick = async () => {
      try {
        const r = await fetch(`/api/runs/${encodeURIComponent(name)}/metrics?offset=${offset}`);
        const d = await r.json();
        if (!r.ok) throw new Error(d.error);
        recs = recs.concat(d.records); offset = d.total;
        for (const m of d.records) if (typeof m.step === "number") last = Math.max(last, m.step);
        for (const k of ["loss", "lr", "tok_per_s", "mfu"])
          plot($("c-" + k), recs.filter((m) => typeof m[k] === "number" && typeof m.step === "number").map((m) => [m.step, m[k]]), k);
        $("run-state").textContent = `${recs.length} records, last step ${last} (refreshing every 2 s)`;
        document.body.dataset.ready = "1";
      } catch (e) { $("run-state").innerHTML = `<span class="err">${esc(e.message)}</span>`; }
    };
    await tick();
    setInterval(tick, 2000);
  }
  return {index, runPage};
})();
