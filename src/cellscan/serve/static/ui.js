// cellscan pages: the API key kept for this tab (sessionStorage), verdicts, rollback, upload, heatmap controls.
"use strict";
(function () {
  const KEY = "cellscan-api-key";
  const $ = (sel) => document.querySelector(sel);
  const status = (text) => { const s = $("#status"); if (s) s.textContent = text; };
  const showKey = () => { const k = $("#key-state"); if (k) k.textContent = sessionStorage.getItem(KEY) ? "set for this tab" : "not set"; };
  function askKey() {
    const key = window.prompt("API key (kept in this browser tab only)");
    if (key) sessionStorage.setItem(KEY, key.trim());
    showKey();
    return sessionStorage.getItem(KEY);
  }
  async function send(url, body) {
    const key = sessionStorage.getItem(KEY) || askKey();
    if (!key) { status("an API key is needed for this action"); return null; }
    const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json", "X-API-Key": key },
                                 body: JSON.stringify(body) });
    const data = await r.json().catch(() => ({ error: "HTTP " + r.status }));
    if (r.status === 401 || r.status === 403) sessionStorage.removeItem(KEY);
    showKey();
    if (!r.ok) { status("refused: " + (data.error || r.status)); return null; }
    return data;
  }
  document.addEventListener("DOMContentLoaded", () => {
    showKey();
    const set = $("#key-set"); if (set) set.addEventListener("click", askKey);
    const clear = $("#key-clear"); if (clear) clear.addEventListener("click", () => { sessionStorage.removeItem(KEY); showKey(); });
    // heatmap overlay: toggle and opacity
    const heat = $("#heat-img"), on = $("#heat-on"), op = $("#heat-opacity");
    if (heat && on && op) {
      const apply = () => { heat.style.display = on.checked ? "" : "none"; heat.style.opacity = op.value / 100; };
      on.addEventListener("change", apply); op.addEventListener("input", apply); apply();
    }
    document.querySelectorAll("button.verdict").forEach((b) => b.addEventListener("click", async () => {
      const buttons = document.querySelectorAll("button.verdict");
      buttons.forEach((x) => { x.disabled = true; });  // one verdict per click, until the answer comes
      status("recording " + b.dataset.verdict + " ...");
      const data = await send("/ui/scans/" + b.dataset.scan + "/verdict", { verdict: b.dataset.verdict });
      if (!data) { buttons.forEach((x) => { x.disabled = false; }); return; }
      let text = data.verdict + " by " + data.by;
      if (data.stored) text += " · stored as " + data.stored;
      if (data.job_id) text += " · job " + data.job_id;
      if (data.note) text += " · " + data.note;
      $("#review").textContent = text;
      document.querySelectorAll("button.verdict").forEach((x) => { x.disabled = true; });
      status("recorded");
    }));
    document.querySelectorAll("button.rollback").forEach((b) => b.addEventListener("click", async () => {
      status("rolling back to version " + b.dataset.version + " ...");
      const data = await send("/rollback", { version: Number(b.dataset.version) });
      if (!data) return;
      $("#serving").textContent = data.serving;
      status("champion: version " + data.champion + ", serving " + data.serving);
      window.setTimeout(() => window.location.reload(), 600);
    }));
    const form = $("#upload-form");
    if (form) form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const files = $("#upload-files").files;
      if (!files.length) { status("choose one or more images"); return; }
      const fd = new FormData();
      for (const f of files) fd.append("images", f, f.name);
      fd.append("heatmap", "true");
      status("scoring " + files.length + " image(s) ...");
      const r = await fetch("/predict", { method: "POST", body: fd });
      const data = await r.json();
      const out = $("#results"); out.textContent = "";
      if (!r.ok) { status("refused: " + data.error); return; }
      data.forEach((res, i) => {
        const div = document.createElement("div"); div.className = "result";
        const title = document.createElement("p");
        if (res.error) { title.textContent = files[i].name + ": " + res.error; div.append(title); out.append(div); return; }
        title.innerHTML = "";
        const badge = document.createElement("span");
        badge.className = "badge " + (res.is_anomaly ? "anomaly" : "normal");
        badge.textContent = res.is_anomaly ? "anomaly" : "normal";
        title.append(files[i].name + " ", badge,
          " score " + res.anomaly_score.toFixed(4) + " / threshold " + res.threshold.toFixed(4) + " · v" + res.model_version);
        const img = document.createElement("img");
        img.className = "heatmap"; img.alt = "heatmap of " + files[i].name;
        img.src = "data:image/png;base64," + res.heatmap_png;
        div.append(title, img); out.append(div);
      });
      status("scored " + data.length + " image(s)");
    });
  });
})();
