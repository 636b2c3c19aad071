// fluidcloud dashboard: one script, no framework, nothing loaded from elsewhere.
// It reads the service's REST API (the same as any client) and renders with
// the DOM; the step graph and charts are SVG built as escaped strings, which
// keeps a 10,000-step plan fast. The same script renders the report page that
// `fluidcloud report ID --html FILE` writes (data in #report-data, no API).
"use strict";
(() => {
  const doc = document;
  const app = doc.getElementById("app");

  // ---------------------------------------------------------------- helpers
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ESC[c]);

  function h(tag, attrs, ...kids) {
    const e = doc.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "text") e.textContent = v;
      else if (k === "html") e.innerHTML = v; // only for strings built with esc()
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const k of kids.flat()) {
      if (k != null && k !== false) e.append(k instanceof Node ? k : String(k));
    }
    return e;
  }

  // Like replaceChildren, but as h() takes children: nested arrays, no nulls.
  const fill = (el, ...kids) => el.replaceChildren(...kids.flat(2).filter((k) => k != null && k !== false));

  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  const fmt = {
    bytes(n) {
      if (n == null || !isFinite(n)) return "–";
      let v = n, u = 0;
      while (v >= 1024 && u < UNITS.length - 1) { v /= 1024; u++; }
      return u === 0 ? `${Math.round(n)} B` : `${v.toFixed(1)} ${UNITS[u]}`;
    },
    secs(s) {
      if (s == null || !isFinite(s)) return "–";
      if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
      const m = Math.floor(s / 60), r = Math.round(s - m * 60);
      return m < 60 ? `${m} min ${r} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
    },
    rate(b) { return b > 0 ? `${fmt.bytes(b)}/s` : "–"; },
  };

  // Every state is shown as a word with a sign, not by colour alone.
  const STATE_TEXT = {
    pending: "◦ pending", running: "▶ running", succeeded: "✓ succeeded", failed: "✗ failed",
    "retry-wait": "↻ retrying", skipped: "– skipped", cancelled: "■ cancelled",
    "rolled-back": "↺ rolled back", "rolling-back": "↺ rolling back", queued: "… queued",
    interrupted: "⏸ interrupted", "rollback-failed": "✗ rollback failed", planned: "◦ planned",
  };
  const stateText = (s) => STATE_TEXT[s] || s;
  const badge = (s) => h("span", { class: `badge ${s}`, "data-state": s }, stateText(s));
  const announce = (text) => { const a = doc.getElementById("announce"); if (a) a.textContent = text; };

  // ---------------------------------------------------------------- API
  class ApiError extends Error {
    constructor(status, problem) {
      super((problem && problem.detail) || `HTTP ${status}`);
      this.status = status;
      this.problem = problem || {};
    }
  }

  async function api(method, path, body) {
    const headers = { "x-fluidcloud-ui": "1" };
    if (body !== undefined) headers["content-type"] = "application/json";
    const r = await fetch(path, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (r.status === 204) return null;
    const text = await r.text();
    let v = null;
    try { v = JSON.parse(text); } catch { v = null; }
    if (!r.ok) {
      if (r.status === 401) showLogin(path === "/version" ? null : "Your session has ended: log in again.");
      throw new ApiError(r.status, v || { detail: text });
    }
    return v;
  }

  function problemText(e) {
    const p = (e && e.problem) || {};
    let t = p.detail || (e && e.message) || String(e);
    if (Array.isArray(p.errors) && p.errors.length) {
      t += ` (${p.errors.map((x) => `${x.pointer}: ${x.detail}`).join("; ")})`;
    }
    return t;
  }
  const errorBox = (e) => h("p", { class: "error", role: "alert" }, problemText(e));

  // ---------------------------------------------------------------- routing
  let cleanup = null;
  let authOn = false;

  function setNav(page) {
    for (const a of doc.querySelectorAll(".top nav a")) {
      if (a.getAttribute("href") === `#/${page}`) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
  }

  async function route() {
    if (cleanup) { cleanup(); cleanup = null; }
    const parts = (location.hash || "#/relocations").slice(2).split("/");
    const page = parts[0] || "relocations";
    const id = parts[1] ? decodeURIComponent(parts[1]) : null;
    setNav(page);
    try {
      if (page === "sites") await viewSites();
      else if (page === "plan") await viewPlan();
      else if (page === "relocations" && id) await viewRelocation(id);
      else await viewRelocations();
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) fill(app, errorBox(e));
    }
  }

  // ---------------------------------------------------------------- login
  function showLogin(message) {
    if (cleanup) { cleanup(); cleanup = null; }
    const logout = doc.getElementById("logout");
    if (logout) logout.hidden = true;
    const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "current-password", required: true });
    const form = h("form", { class: "card login", "aria-labelledby": "login-title" },
      h("h1", { id: "login-title" }, "Log in"),
      h("p", { class: "muted" }, "Paste the bearer token this service was started with ($FLUIDCLOUD_TOKEN). It is exchanged for a session cookie and not kept in the page."),
      h("p", {}, h("label", { for: "token" }, "Token"), " ", input),
      h("div", { class: "buttons" }, h("button", { class: "primary", type: "submit" }, "Log in")),
      message ? h("p", { class: "error", role: "alert" }, message) : null);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const r = await fetch("/ui/login", {
        method: "POST", credentials: "same-origin",
        headers: { "content-type": "application/json", "x-fluidcloud-ui": "1" },
        body: JSON.stringify({ token: input.value }),
      });
      if (r.ok) {
        if (logout) logout.hidden = !authOn;
        if (!location.hash || location.hash === "#/login") location.hash = "#/relocations";
        route();
      } else {
        showLogin(r.status === 401 ? "The token is not valid." : `Logging in failed (HTTP ${r.status}).`);
      }
    });
    fill(app, form);
    input.focus();
  }

  // ---------------------------------------------------------------- sites
  const R_KM = 6371;
  function distanceKm(a, b) {
    const rad = Math.PI / 180;
    const dLat = (b.latitude - a.latitude) * rad, dLon = (b.longitude - a.longitude) * rad;
    const x = Math.sin(dLat / 2) ** 2 + Math.cos(a.latitude * rad) * Math.cos(b.latitude * rad) * Math.sin(dLon / 2) ** 2;
    return 2 * R_KM * Math.asin(Math.min(1, Math.sqrt(x)));
  }
  // The broker's estimate: 1 ms + distance × 2 × 1.5 route stretch / (200 km/ms in fibre).
  const estimatedRtt = (a, b) => 1 + (distanceKm(a, b) * 2 * 1.5) / 200;

  function mapSvg(sites) {
    // Equirectangular, zoomed to the sites with a margin; drawn here, no tiles.
    const lon = sites.map((s) => s.location.longitude), lat = sites.map((s) => s.location.latitude);
    let x0 = Math.min(...lon) - 10, x1 = Math.max(...lon) + 10;
    let y0 = Math.min(...lat) - 6, y1 = Math.max(...lat) + 6;
    if (!sites.length) { x0 = -180; x1 = 180; y0 = -90; y1 = 90; }
    if (x1 - x0 < 40) { const c = (x0 + x1) / 2; x0 = c - 20; x1 = c + 20; }
    if (y1 - y0 < 20) { const c = (y0 + y1) / 2; y0 = c - 10; y1 = c + 10; }
    const W = 760;
    const minLat = (240 * (x1 - x0)) / W;
    if (y1 - y0 < minLat) { const c = (y0 + y1) / 2; y0 = c - minLat / 2; y1 = c + minLat / 2; }
    const H = Math.round((W * (y1 - y0)) / (x1 - x0));
    const X = (lo) => ((lo - x0) / (x1 - x0)) * W, Y = (la) => ((y1 - la) / (y1 - y0)) * H;
    let grid = "";
    for (let g = Math.ceil(x0 / 10) * 10; g <= x1; g += 10) grid += `M${X(g).toFixed(1)} 0V${H}`;
    for (let g = Math.ceil(y0 / 10) * 10; g <= y1; g += 10) grid += `M0 ${Y(g).toFixed(1)}H${W}`;
    let links = "";
    for (let i = 0; i < sites.length; i++) {
      for (let j = i + 1; j < sites.length; j++) {
        const a = sites[i].location, b = sites[j].location;
        links += `<line x1="${X(a.longitude)}" y1="${Y(a.latitude)}" x2="${X(b.longitude)}" y2="${Y(b.latitude)}" stroke="#b8c2d3" stroke-dasharray="3 3"><title>${esc(sites[i].name)} ↔ ${esc(sites[j].name)}: ~${estimatedRtt(a, b).toFixed(1)} ms (estimated)</title></line>`;
      }
    }
    // Labels: to the right of their dot, or to the left near the right
    // edge, moved down past labels already placed, with a leader line.
    const placed = [];
    const dots = sites.map((s) => ({ s, x: X(s.location.longitude), y: Y(s.location.latitude) }))
      .sort((a, b) => a.y - b.y)
      .map(({ s, x, y }) => {
        const text = `${s.name} (${s.jurisdiction})`;
        const w = text.length * 6.6, left = x > W - w - 20;
        const lx = left ? x - 10 - w : x + 10;
        let ly = y + 4;
        while (placed.some((p) => Math.abs(p.y - ly) < 14 && lx < p.x + p.w && p.x < lx + w)) ly += 14;
        placed.push({ x: lx, y: ly, w });
        const leader = Math.abs(ly - 4 - y) > 1
          ? `<line x1="${x.toFixed(1)}" y1="${y.toFixed(1)}" x2="${(left ? lx + w : lx).toFixed(1)}" y2="${(ly - 4).toFixed(1)}" stroke="#5b6472"/>` : "";
        return `<g class="site" data-site="${esc(s.name)}">${leader}<circle cx="${x.toFixed(1)}" cy="${y.toFixed(1)}" r="6"><title>${esc(s.name)}: ${esc(s.location.region)}, ${esc(s.jurisdiction)}</title></circle>`
          + `<text x="${lx.toFixed(1)}" y="${ly.toFixed(1)}">${esc(text)}</text></g>`;
      }).join("");
    return `<svg class="map" viewBox="0 0 ${W} ${H}" width="100%" role="img" aria-label="Map of ${sites.length} sites by latitude and longitude">`
      + `<rect class="land" width="${W}" height="${H}"/><path class="grid" d="${grid}"/>${links}${dots}</svg>`;
  }

  function capacityText(c) {
    const parts = [];
    if (c.vcpus != null) parts.push(`${c.vcpus} vCPU`);
    if (c.memory_mib != null) parts.push(fmt.bytes(c.memory_mib * 1048576));
    if (c.storage_gib != null) parts.push(`${c.storage_gib} GiB disk`);
    return parts.join(", ") || "unbounded";
  }

  async function viewSites() {
    const sites = await api("GET", "/sites");
    const rows = sites.map((s) => h("tr", { "data-site": s.name },
      h("th", { scope: "row" }, s.name), h("td", {}, s.kind), h("td", {}, s.location.region),
      h("td", {}, s.jurisdiction),
      h("td", { class: "num" }, `${s.location.latitude.toFixed(2)}, ${s.location.longitude.toFixed(2)}`),
      h("td", {}, capacityText(s.capacity)),
      h("td", {}, `${s.cost.vcpu_hour} ${s.cost.currency}/vCPU·h, ${s.cost.memory_gib_hour}/GiB·h, ${s.cost.storage_gib_month}/GiB·month`),
      h("td", { class: "num" }, s.rtt_ms == null ? "no answer" : `${s.rtt_ms.toFixed(s.rtt_ms < 10 ? 2 : 1)} ms`),
      h("td", {}, (s.capabilities || []).join(", ") || "none")));
    const matrix = h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "from \\ to"), sites.map((s) => h("th", { class: "num", scope: "col" }, s.name)))),
      h("tbody", {}, sites.map((a) => h("tr", {}, h("th", { scope: "row" }, a.name),
        sites.map((b) => h("td", { class: "num" }, a === b ? "–" : `${estimatedRtt(a.location, b.location).toFixed(1)} ms`))))));
    fill(app, 
      h("h1", {}, "Sites"),
      h("div", { class: "card", html: mapSvg(sites) }),
      h("div", { class: "card" }, h("table", { "aria-label": "Sites" },
        h("thead", {}, h("tr", {}, ["Site", "Kind", "Region", "Jurisdiction", "Lat, lon", "Capacity", "Cost", "Measured RTT", "Capabilities"]
          .map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, rows)),
      h("p", { class: "muted" }, "Measured RTT: the round trip of the site's health check from this service, when it started.")),
      h("h2", {}, "Estimated round trips between sites"),
      h("div", { class: "card" }, matrix,
        h("p", { class: "muted" }, "From distance: 1 ms + distance × 2 × 1.5 / (200 km/ms), as the broker estimates when no figure is measured.")));
  }

  // ---------------------------------------------------------------- step graph
  // Steps in any order with `depends_on`; columns by longest path from a root.
  function layers(steps) {
    const index = new Map(steps.map((s, i) => [s.id, i]));
    const indeg = new Array(steps.length).fill(0);
    const next = steps.map(() => []);
    steps.forEach((s, i) => (s.depends_on || []).forEach((d) => {
      const j = index.get(d);
      if (j !== undefined) { indeg[i]++; next[j].push(i); }
    }));
    const depth = new Array(steps.length).fill(0);
    const order = [];
    const queue = [];
    indeg.forEach((d, i) => { if (d === 0) queue.push(i); });
    for (let q = 0; q < queue.length; q++) {
      const i = queue[q];
      order.push(i);
      for (const j of next[i]) {
        depth[j] = Math.max(depth[j], depth[i] + 1);
        if (--indeg[j] === 0) queue.push(j);
      }
    }
    return { index, depth, order };
  }

  // The longest path by estimated seconds: the steps that decide the duration.
  function criticalPath(steps, lay) {
    const best = new Array(steps.length).fill(0), prev = new Array(steps.length).fill(-1);
    let end = -1;
    for (const i of lay.order) {
      const s = steps[i];
      let from = 0;
      for (const d of s.depends_on || []) {
        const j = lay.index.get(d);
        if (j !== undefined && best[j] > from) { from = best[j]; prev[i] = j; }
      }
      best[i] = from + ((s.estimate && s.estimate.seconds) || 0);
      if (end < 0 || best[i] > best[end]) end = i;
    }
    const on = new Set();
    for (let i = end; i >= 0 && best[i] > 0; i = prev[i]) on.add(steps[i].id);
    return on;
  }

  const NODE_W = 200, NODE_H = 44, GAP_X = 46, GAP_Y = 10;
  function dagSvg(steps, critical) {
    const lay = layers(steps);
    const rows = [];
    const pos = new Array(steps.length);
    steps.forEach((s, i) => {
      const c = lay.depth[i];
      rows[c] = (rows[c] || 0) + 1;
      pos[i] = [8 + c * (NODE_W + GAP_X), 8 + (rows[c] - 1) * (NODE_H + GAP_Y)];
    });
    const W = 16 + rows.length * (NODE_W + GAP_X), H = 16 + Math.max(1, ...rows) * (NODE_H + GAP_Y);
    const edges = [];
    steps.forEach((s, i) => (s.depends_on || []).forEach((d) => {
      const j = lay.index.get(d);
      if (j === undefined) return;
      const [x1, y1] = pos[j], [x2, y2] = pos[i];
      const a = x1 + NODE_W, b = y1 + NODE_H / 2, c = y2 + NODE_H / 2, m = (a + x2) / 2;
      edges.push(`M${a} ${b}C${m} ${b} ${m} ${c} ${x2} ${c}`);
    }));
    const nodes = steps.map((s, i) => {
      const [x, y] = pos[i];
      const state = s.state || "pending";
      const crit = critical && critical.has(s.id);
      const label = s.id.length > 30 ? `${s.id.slice(0, 29)}…` : s.id;
      const est = s.estimate ? ` · ${fmt.secs(s.estimate.seconds)}` : "";
      return `<g class="node st-${esc(state)}${crit ? " critical" : ""}" data-step="${esc(s.id)}" transform="translate(${x} ${y})">`
        + `<title>${esc(s.id)}: ${esc(s.migrator)} at ${esc(s.site)}${crit ? " (critical path)" : ""}</title>`
        + `<rect width="${NODE_W}" height="${NODE_H}" rx="5"/><text x="8" y="17">${esc(label)}</text>`
        + `<text class="state" x="8" y="34">${esc(stateText(state))}${crit ? " · critical" : ""}${esc(est)}</text></g>`;
    }).join("");
    return `<svg class="dag" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img" aria-label="Step graph of ${steps.length} steps">`
      + `<path class="edges" d="${edges.join("")}"/>${nodes}</svg>`;
  }

  function setNodeState(root, step, state) {
    const g = root.querySelector(`g[data-step="${CSS.escape(step)}"]`);
    if (!g) return;
    g.setAttribute("class", g.getAttribute("class").replace(/st-[a-z-]+/, `st-${state}`));
    const t = g.querySelector("text.state");
    if (t) t.textContent = stateText(state) + (g.classList.contains("critical") ? " · critical" : "");
  }

  // ---------------------------------------------------------------- match and plan
  async function viewPlan() {
    const sites = await api("GET", "/sites");
    const opts = (extra) => [...extra, ...sites.map((s) => s.name)].map((n) => h("option", { value: n }, n));
    const from = h("select", { id: "from", name: "from" }, opts([]));
    const to = h("select", { id: "to", name: "to" }, opts(["auto"]));
    const service = h("input", { id: "service", name: "service", placeholder: "the only service on the source site" });
    const constraints = h("textarea", { id: "constraints", name: "constraints", rows: 2, placeholder: "jurisdiction(*; EU)" });
    const buckets = h("select", { id: "buckets", name: "buckets" }, h("option", { value: "copy" }, "copy"), h("option", { value: "repoint" }, "repoint"));
    const out = h("div", { id: "plan-output", "aria-live": "polite" });
    let planned = null;
    const request = () => ({
      from: from.value, to: to.value, service: service.value.trim() || null,
      constraints: constraints.value.split("\n").map((c) => c.trim()).filter(Boolean),
      buckets: buckets.value,
    });
    const start = h("button", { class: "primary", type: "button", id: "start", disabled: true }, "Start relocation");
    const busy = async (fn) => {
      out.replaceChildren(h("p", { class: "muted" }, "Working…"));
      try { await fn(); } catch (e) { out.replaceChildren(errorBox(e)); }
    };
    const matchBtn = h("button", { class: "secondary", type: "button", id: "match" }, "Match sites");
    matchBtn.addEventListener("click", () => busy(async () => {
      const r = request();
      const placement = await api("POST", "/match", {
        service: r.service, request: { source: r.from, constraints: r.constraints },
      });
      out.replaceChildren(matchView(placement));
    }));
    const planBtn = h("button", { class: "primary", type: "button", id: "plan" }, "Plan");
    planBtn.addEventListener("click", () => busy(async () => {
      const t0 = performance.now();
      const doc2 = await api("POST", "/plan", request());
      planned = request();
      out.replaceChildren(planView(doc2));
      start.disabled = false;
      out.dataset.renderMs = String(Math.round(performance.now() - t0));
    }));
    start.addEventListener("click", () => busy(async () => {
      if (!planned || !window.confirm(`Relocate ${planned.service || "the service"} from ${planned.from} to ${planned.to} now? The source is stopped at cut-over.`)) {
        out.replaceChildren(h("p", { class: "muted" }, "Not started."));
        return;
      }
      const v = await api("POST", "/relocations", planned);
      location.hash = `#/relocations/${encodeURIComponent(v.id)}`;
    }));
    fill(app, 
      h("h1", {}, "Match and plan"),
      h("form", { class: "card grid", onsubmit: (e) => e.preventDefault() },
        h("label", { for: "from" }, "Source site"), from,
        h("label", { for: "service" }, "Service"), service,
        h("label", { for: "to" }, "Target"), to,
        h("label", { for: "constraints" }, "Constraints (one per line, for auto)"), constraints,
        h("label", { for: "buckets" }, "Buckets"), buckets),
      h("div", { class: "buttons" }, matchBtn, planBtn, start),
      out);
  }

  function matchView(p) {
    const scoreText = (s) => `${s.total.toFixed(2)} (latency ${s.latency_ms.toFixed(1)} ms${s.latency_measured ? " measured" : ""}, ${s.cost_month.toFixed(2)}/month, move ${fmt.secs(s.time_s)})`;
    return h("div", { class: "card", id: "match-output" },
      h("h2", {}, `Placement${p.optimal ? " (proven optimal)" : ""}`),
      p.assignments.map((a) => h("div", {},
        h("h3", {}, `${a.unit.kind} ${a.unit.name} → `, h("strong", { "data-chosen": a.site }, a.site)),
        h("p", {}, "Score ", scoreText(a.score), a.chain.length ? `; via ${a.chain.map((c) => c.migrator).join(" → ")}` : ""),
        h("table", { "aria-label": `Other sites for ${a.unit.name}` },
          h("thead", {}, h("tr", {}, ["Site", "Verdict", "Why"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, a.alternatives.map((x) => h("tr", { "data-site": x.site },
            h("td", {}, x.site),
            h("td", {}, x.verdict === "rejected" ? "✗ rejected" : `+${x.delta.toFixed(2)} worse`),
            h("td", {}, x.verdict === "rejected" ? `${x.constraint}: ${x.reason}` : `mainly ${x.mainly}`))))))));
  }

  function planView(d) {
    const r = d.relocation, plan = d.plan;
    const critical = criticalPath(plan.steps, layers(plan.steps));
    const big = plan.steps.length > 400;
    return h("div", { id: "plan-view" },
      h("div", { class: "card figures" },
        fig("Relocation", r.id), fig("Service", r.service), fig("To", [...new Set(Object.values(r.assignments || {}))].join(", ") || "–"),
        fig("Bytes to move", fmt.bytes(r.bytes_to_move)), fig("Critical path", fmt.secs(plan.critical_path_seconds)),
        fig("Steps", String(plan.steps.length))),
      h("h2", {}, "Steps"),
      h("div", { class: "scroll", html: dagSvg(plan.steps, critical) }),
      big ? h("p", { class: "muted" }, `The step table is left out for ${plan.steps.length} steps; the graph shows them all.`)
        : h("table", { "aria-label": "Planned steps" },
          h("thead", {}, h("tr", {}, ["Step", "Migrator", "Site", "After", "Bytes", "Estimate", "Critical"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, plan.steps.map((s) => h("tr", {},
            h("td", { class: "mono" }, s.id), h("td", {}, s.migrator), h("td", {}, s.site),
            h("td", { class: "mono" }, (s.depends_on || []).join(", ")),
            h("td", { class: "num" }, s.estimate ? fmt.bytes(Math.max(s.estimate.bytes_read, s.estimate.bytes_sent, s.estimate.bytes_written)) : "–"),
            h("td", { class: "num" }, s.estimate ? fmt.secs(s.estimate.seconds) : s.note || "–"),
            h("td", {}, critical.has(s.id) ? "yes" : ""))))));
  }

  const fig = (k, v) => h("div", {}, h("div", { class: "v" }, v), h("div", { class: "k" }, k));

  // ---------------------------------------------------------------- relocations
  async function viewRelocations() {
    const list = await api("GET", "/relocations");
    const table = h("table", { "aria-label": "Relocations" },
      h("thead", {}, h("tr", {}, ["Relocation", "Service", "From", "To", "Status", "Written", "To move"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, list.slice().reverse().map((v) => h("tr", { "data-id": v.id },
        h("td", {}, h("a", { href: `#/relocations/${encodeURIComponent(v.id)}` }, v.id)),
        h("td", {}, v.service), h("td", {}, v.from), h("td", {}, v.targets.join(", ")),
        h("td", {}, badge(v.status)),
        h("td", { class: "num" }, fmt.bytes(v.bytes_written)), h("td", { class: "num" }, fmt.bytes(v.bytes_to_move))))));
    fill(app, h("h1", {}, "Relocations"),
      list.length ? h("div", { class: "card" }, table)
        : h("p", { class: "card" }, "No relocation yet. ", h("a", { href: "#/plan" }, "Plan one.")));
    if (list.some((v) => ["queued", "running", "rolling-back"].includes(v.status))) {
      const t = setTimeout(route, 2000);
      cleanup = () => clearTimeout(t);
    }
  }

  const ACTIVE = ["queued", "running", "rolling-back"];

  async function viewRelocation(id) {
    const path = `/relocations/${encodeURIComponent(id)}`;
    let v = await api("GET", path);
    const steps = new Map(v.steps.map((s) => [s.id, { ...s, done: 0, total: null, rate: 0 }]));
    const samples = [];
    const t0 = Date.now();
    const status = h("span", { id: "status" }, badge(v.status));
    const eta = h("div", { class: "v", id: "eta" }, "–"), rate = h("div", { class: "v", id: "rate" }, "–");
    const written = h("div", { class: "v", id: "written" }, fmt.bytes(v.bytes_written));
    const dag = h("div", { class: "scroll", id: "dag", html: dagSvg([...steps.values()]) });
    const chart = h("div", { id: "throughput" });
    const progressRows = new Map();
    const table = h("table", { "aria-label": "Step progress" },
      h("thead", {}, h("tr", {}, ["Step", "Migrator", "Site", "State", "Progress", "Processed", "Rate"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, [...steps.values()].map((s) => {
        const bar = h("progress", { max: 1, value: s.state === "succeeded" ? 1 : 0, "aria-label": `${s.id} progress` });
        const row = h("tr", { "data-step": s.id },
          h("td", { class: "mono" }, s.id), h("td", {}, s.migrator), h("td", {}, s.site),
          h("td", { class: "state" }, badge(s.state)), h("td", {}, bar),
          h("td", { class: "num bytes" }, fmt.bytes(s.bytes_written)), h("td", { class: "num rate" }, "–"));
        progressRows.set(s.id, { row, bar });
        return row;
      })));
    const buttons = h("div", { class: "buttons" });
    const report = h("div", { id: "report" });
    fill(app, 
      h("h1", {}, `Relocation ${v.id} `, status),
      h("p", {}, `${v.service}: ${v.from} → ${v.targets.join(", ")}`),
      h("div", { class: "card figures" }, fig("Bytes to move", fmt.bytes(v.bytes_to_move)),
        h("div", {}, written, h("div", { class: "k" }, "Processed")),
        h("div", {}, rate, h("div", { class: "k" }, "Throughput now")),
        h("div", {}, eta, h("div", { class: "k" }, "ETA of the running transfers"))),
      buttons, h("h2", {}, "Steps"), dag,
      h("div", {}, ACTIVE.includes(v.status) ? [h("h2", {}, "Throughput"), chart] : null),
      h("h2", {}, "Progress"), h("div", { class: "card" }, table), report);

    const drawButtons = () => {
      const active = ACTIVE.includes(v.status);
      const act = (label, cls, what, ask, enabled) => {
        const b = h("button", { class: cls, type: "button", "data-action": what, disabled: !enabled }, label);
        b.addEventListener("click", async () => {
          if (!window.confirm(ask)) return;
          try { await api("POST", `${path}/${what}`); route(); } catch (e) { buttons.append(errorBox(e)); }
        });
        return b;
      };
      buttons.replaceChildren(
        act("Cancel", "danger", "cancel", `Cancel relocation ${v.id}? Running steps stop at a safe point; resume continues later.`, active),
        act("Resume", "primary", "resume", `Resume relocation ${v.id}?`, ["cancelled", "failed", "interrupted"].includes(v.status)),
        act("Roll back", "danger", "rollback", `Roll back relocation ${v.id}? The target is cleaned and the source restarted.`, !active && !["rolled-back", "succeeded"].includes(v.status)));
    };
    // Processed: per step, what it wrote or, while it runs, how far its
    // progress got (guest bytes, holes included). The ETA is when the
    // slowest running transfer ends at its current rate (steps run in
    // parallel).
    const refresh = () => {
      let done = 0, now = 0, left = 0;
      for (const s of steps.values()) {
        done += Math.max(s.bytes_written, s.done);
        if (s.state === "running") {
          now += s.rate || 0;
          if (s.total && s.rate > 0) left = Math.max(left, (s.total - s.done) / s.rate);
        }
        const p = progressRows.get(s.id);
        if (!p) continue;
        p.row.querySelector("td.state").replaceChildren(badge(s.state));
        p.bar.value = s.state === "succeeded" ? 1 : s.total ? Math.min(1, s.done / s.total) : 0;
        p.row.querySelector("td.bytes").textContent = fmt.bytes(Math.max(s.bytes_written, s.done));
        p.row.querySelector("td.rate").textContent = s.state === "running" ? fmt.rate(s.rate) : "–";
      }
      written.textContent = fmt.bytes(done);
      rate.textContent = fmt.rate(now);
      eta.textContent = !ACTIVE.includes(v.status) ? "ended" : left > 0 ? fmt.secs(left) : "–";
      return now;
    };
    const setState = (id2, state) => {
      const s = steps.get(id2);
      if (!s) return;
      s.state = state;
      setNodeState(dag, id2, state);
    };
    drawButtons();
    refresh();
    chart.innerHTML = chartSvg(samples);
    if (!ACTIVE.includes(v.status)) {
      if (v.report) renderReport(v.report, report);
      return;
    }
    const es = new EventSource(`${path}/events`);
    const on = (name, fn) => es.addEventListener(name, (ev) => { try { fn(JSON.parse(ev.data)); } catch { /* a malformed event changes nothing */ } });
    on("state", (nv) => {
      v = nv;
      for (const s of nv.steps) {
        const mine = steps.get(s.id);
        if (mine) { mine.bytes_written = s.bytes_written; setState(s.id, s.state); }
      }
      status.replaceChildren(badge(v.status));
      drawButtons();
      refresh();
    });
    on("step-started", (e) => { setState(e.step, "running"); refresh(); });
    on("step-progress", (e) => {
      const s = steps.get(e.step);
      if (s) { s.done = e.done; s.total = e.total; s.rate = e.rate; }
      refresh();
    });
    on("step-retrying", (e) => { setState(e.step, "retry-wait"); refresh(); });
    on("step-finished", (e) => {
      const s = steps.get(e.step);
      if (s) { s.bytes_written = Math.max(s.bytes_written, e.bytes); s.rate = 0; }
      setState(e.step, e.state);
      refresh();
    });
    on("step-rolled-back", (e) => { setState(e.step, "rolled-back"); refresh(); });
    on("end", (nv) => {
      es.close();
      announce(`Relocation ${nv.id} ${nv.status}`);
      route();
    });
    const timer = setInterval(() => {
      samples.push([(Date.now() - t0) / 1000, refresh()]);
      if (samples.length > 600) samples.shift();
      chart.innerHTML = chartSvg(samples);
    }, 1000);
    cleanup = () => { es.close(); clearInterval(timer); };
  }

  function chartSvg(samples) {
    const W = 760, H = 140, L = 70, B = 20;
    const tMax = Math.max(10, ...samples.map((s) => s[0]));
    const rMax = Math.max(1, ...samples.map((s) => s[1]));
    const pts = samples.map(([t, r]) => `${(L + (t / tMax) * (W - L - 8)).toFixed(1)},${(H - B - (r / rMax) * (H - B - 10)).toFixed(1)}`).join(" ");
    return `<svg class="chart" viewBox="0 0 ${W} ${H}" width="100%" role="img" aria-label="Throughput over time, up to ${esc(fmt.rate(rMax))}">`
      + `<line class="axis" x1="${L}" y1="${H - B}" x2="${W}" y2="${H - B}"/><line class="axis" x1="${L}" y1="4" x2="${L}" y2="${H - B}"/>`
      + `<text x="4" y="14">${esc(fmt.rate(rMax))}</text><text x="4" y="${H - B}">0</text>`
      + `<text x="${W - 60}" y="${H - 4}">${esc(fmt.secs(tMax))}</text>`
      + (samples.length ? `<polyline points="${pts}"/>` : `<text x="${L + 10}" y="${H / 2}">no samples yet</text>`) + "</svg>";
  }

  // ---------------------------------------------------------------- report
  function ganttSvg(rep) {
    const steps = rep.steps;
    const ends = steps.map((s) => (s.start || 0) + (s.seconds || 0));
    const T = Math.max(rep.seconds || 0, ...ends, 0.001);
    const L = 230, W = 980, ROW = 20, TOP = 26;
    const H = TOP + steps.length * ROW + 24;
    const X = (t) => L + (t / T) * (W - L - 10);
    const tick = niceStep(T / 8);
    let axis = `<line class="axis" x1="${L}" y1="${H - 20}" x2="${W - 10}" y2="${H - 20}"/>`;
    for (let t = 0; t <= T + 1e-9; t += tick) {
      axis += `<line class="axis" x1="${X(t).toFixed(1)}" y1="${H - 20}" x2="${X(t).toFixed(1)}" y2="${H - 15}"/><text x="${X(t).toFixed(1)}" y="${H - 4}" text-anchor="middle">${esc(fmt.secs(t))}</text>`;
    }
    let down = "";
    if (rep.downtime_seconds != null && rep.downtime_start != null) {
      const x0 = X(rep.downtime_start), x1 = X(rep.downtime_start + rep.downtime_seconds);
      down = `<g id="downtime"><rect class="down" x="${x0.toFixed(1)}" y="${TOP - 6}" width="${Math.max(2, x1 - x0).toFixed(1)}" height="${steps.length * ROW + 6}"><title>downtime ${esc(fmt.secs(rep.downtime_seconds))}</title></rect>`
        + `<text x="${x0.toFixed(1)}" y="14" fill="#b3261e">downtime ${esc(fmt.secs(rep.downtime_seconds))}</text></g>`;
    }
    const bars = steps.map((s, i) => {
      const y = TOP + i * ROW;
      const known = ["succeeded", "failed", "cancelled"].includes(s.state) ? `st-${s.state}` : "other";
      const label = `<text x="4" y="${y + 13}">${esc(s.id.length > 34 ? `${s.id.slice(0, 33)}…` : s.id)}</text>`;
      if (s.start == null) return `${label}<text x="${L + 4}" y="${y + 13}" fill="#5b6472">${esc(stateText(s.state))} (did not run)</text>`;
      const x0 = X(s.start), w = Math.max(2, X(s.start + (s.seconds || 0)) - x0);
      return `${label}<rect class="bar ${known}" data-step="${esc(s.id)}" x="${x0.toFixed(1)}" y="${y + 3}" width="${w.toFixed(1)}" height="${ROW - 6}"><title>${esc(s.id)}: ${esc(stateText(s.state))}, ${esc(fmt.secs(s.seconds))} from ${esc(fmt.secs(s.start))}</title></rect>`
        + `<text x="${(x0 + w + 4).toFixed(1)}" y="${y + 13}" fill="#5b6472">${esc(fmt.secs(s.seconds))}</text>`;
    }).join("");
    return `<svg class="gantt" id="gantt" viewBox="0 0 ${W} ${H}" width="100%" role="img" aria-label="Gantt chart of ${steps.length} steps over ${esc(fmt.secs(T))}${rep.downtime_seconds != null ? `, downtime ${esc(fmt.secs(rep.downtime_seconds))}` : ""}">${down}${bars}${axis}</svg>`;
  }

  function niceStep(x) {
    const p = 10 ** Math.floor(Math.log10(Math.max(x, 1e-3)));
    for (const m of [1, 2, 5, 10]) if (m * p >= x) return m * p;
    return 10 * p;
  }

  function diffPre(text) {
    return h("pre", { class: "diff" }, text.split("\n").map((l) => h("span", {
      class: l.startsWith("+") && !l.startsWith("+++") ? "add" : l.startsWith("-") && !l.startsWith("---") ? "del" : null,
    }, `${l}\n`)));
  }

  function renderReport(rep, into) {
    const outputs = rep.steps.flatMap((s) => s.outputs.filter((o) => o.checksum).map((o) => ({ step: s.id, ...o })));
    fill(into, 
      h("h2", {}, "Report"),
      h("div", { class: "card figures", id: "report-figures" },
        h("div", {}, h("div", { class: "v" }, badge(rep.status)), h("div", { class: "k" }, "Status")),
        fig("Total time", fmt.secs(rep.seconds)),
        h("div", {}, h("div", { class: "v", id: "downtime-figure" }, rep.downtime_seconds == null ? "–" : fmt.secs(rep.downtime_seconds)), h("div", { class: "k" }, "Downtime")),
        fig("Read", fmt.bytes(rep.bytes_read)), fig("Written", fmt.bytes(rep.bytes_written)),
        fig("Final delta", `${rep.final_delta.disks_tracked} tracked, ${rep.final_delta.disks_rehashed} re-hashed`)),
      rep.downtime_stages.length ? h("p", {}, "Downtime: ", rep.downtime_stages.map((d) => `${d.stage} ${fmt.secs(d.seconds)}`).join(", ")) : null,
      h("h3", {}, "Time line"),
      h("div", { class: "card", html: ganttSvg(rep) }),
      h("h3", {}, "Steps"),
      h("table", { "aria-label": "Steps of the report" },
        h("thead", {}, h("tr", {}, ["Step", "Migrator", "Site", "State", "Attempts", "Time", "Written", "Throughput"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, rep.steps.map((s) => h("tr", { "data-step": s.id },
          h("td", { class: "mono" }, s.id), h("td", {}, s.migrator), h("td", {}, s.site), h("td", {}, badge(s.state)),
          h("td", { class: "num" }, String(s.attempts)), h("td", { class: "num" }, fmt.secs(s.seconds)),
          h("td", { class: "num" }, fmt.bytes(s.bytes_written)), h("td", { class: "num" }, fmt.rate(s.throughput)))))),
      h("h3", {}, "Checksums that proved each copy"),
      outputs.length ? h("table", { "aria-label": "Checksums" },
        h("thead", {}, h("tr", {}, ["Step", "Output", "Site", "Where", "Size", "Checksum"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, outputs.map((o) => h("tr", {}, h("td", { class: "mono" }, o.step), h("td", {}, o.name), h("td", {}, o.site),
          h("td", { class: "mono" }, o.locator), h("td", { class: "num" }, fmt.bytes(o.size)), h("td", { class: "mono" }, o.checksum)))))
        : h("p", { class: "muted" }, "No step recorded a checksum."),
      h("h3", {}, "Endpoint map"),
      rep.endpoint_map.length ? h("table", { "aria-label": "Endpoint map" },
        h("thead", {}, h("tr", {}, ["Kind", "Old", "New", "Because"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, rep.endpoint_map.map((c) => h("tr", {}, h("td", {}, c.kind), h("td", { class: "mono" }, c.old),
          h("td", { class: "mono" }, c.new), h("td", {}, c.because)))))
        : h("p", { class: "muted" }, "Nothing was rewritten."),
      h("h3", {}, "Config files"),
      h("div", { id: "config-diffs" }, rep.config.length ? rep.config.map((c) => h("div", {}, h("p", { class: "mono" }, `${c.source} → ${c.target}`),
        c.diff ? diffPre(c.diff) : h("p", { class: "muted" }, "unchanged")))
        : h("p", { class: "muted" }, "No config file.")),
      h("div", {}, rep.warnings && rep.warnings.length ? [h("h3", {}, "Warnings"), h("ul", {}, rep.warnings.map((w) => h("li", {}, w)))] : null));
  }

  // ---------------------------------------------------------------- start
  const data = doc.getElementById("report-data");
  if (data) {
    // The self-contained report page: no API, no navigation.
    const rep = JSON.parse(data.textContent);
    fill(app, h("h1", {}, `Relocation ${rep.id}: ${rep.service}, ${rep.from} → ${rep.targets.join(", ")}`));
    const body = h("div", {});
    app.append(body);
    renderReport(rep, body);
    return;
  }
  window.addEventListener("hashchange", route);
  const logout = doc.getElementById("logout");
  logout.addEventListener("click", async () => {
    await fetch("/ui/logout", { method: "POST", credentials: "same-origin", headers: { "x-fluidcloud-ui": "1" } });
    showLogin("Logged out.");
  });
  fetch("/ui/session", { credentials: "same-origin" }).then((r) => r.json()).then((s) => {
    authOn = !!s.auth;
    logout.hidden = !authOn || !s.logged_in;
    if (authOn && !s.logged_in) showLogin(null);
    else route();
  }).catch((e) => fill(app, errorBox(e)));
})();
