// pdserve dashboard: polls the router's /pdserve/dashboard/data once a second and draws
// everything as hand-written SVG (no library, no network access but this router).
(function () {
  const DATA_URL = "/pdserve/dashboard/data";
  const POLL_MS = 1000;
  const WINDOW_S = 300; // the charts show the last five minutes
  const MAX_EVENTS = 200;
  const MAX_TRACES = 40;
  const state = {
    seq: { samples: 0, events: 0, traces: 0 }, samples: [], events: [], traces: [], latest: null,
    selected: null, updates: 0, failures: 0,
  };

  // Drop ?key= from the address bar: the router has put it in a cookie for the data requests.
  if (window.location.search.indexOf("key=") >= 0) {
    window.history.replaceState(null, "", window.location.pathname);
  }

  // ---------------------------------------------------------------- data feed

  async function poll() {
    const q = `?samples_after=${state.seq.samples}&events_after=${state.seq.events}&traces_after=${state.seq.traces}`;
    try {
      const reply = await fetch(DATA_URL + q, { cache: "no-store", credentials: "same-origin" });
      if (!reply.ok) throw new Error("HTTP " + reply.status);
      merge(await reply.json());
      state.failures = 0;
      setConn("live", "live");
    } catch (err) {
      state.failures += 1;
      setConn(state.failures > 2 ? "error" : "stale", "no data: " + (err && err.message ? err.message : err));
    }
    window.setTimeout(poll, POLL_MS);
  }

  function setConn(kind, text) {
    const el = $("conn");
    el.dataset.state = kind;
    el.textContent = text;
  }

  function merge(data) {
    state.latest = data;
    state.seq = data.seq;
    state.samples = state.samples.concat(data.samples).filter((s) => s.t >= data.now - WINDOW_S - 5);
    state.events = state.events.concat(data.events).slice(-MAX_EVENTS);
    state.traces = state.traces.concat(data.traces).slice(-MAX_TRACES);
    state.updates += 1;
    draw();
    document.body.dataset.updates = String(state.updates);
  }

  // ---------------------------------------------------------------- drawing

  function draw() {
    const d = state.latest;
    drawHeader(d);
    drawDeployment(d);
    drawCharts(d);
    drawTraces();
    drawEvents();
    drawTimeline();
    $("footer").textContent =
      `router ${d.router.control_endpoint} · sample every ${d.router.interval_s} s over ${d.router.window_s} s windows · ` +
      `sampling ${fmt(d.router.last_tick_ms, 2)} ms/tick · data ${fmt(d.router.last_data_ms, 2)} ms · updated ${clock(d.now)}`;
  }

  function drawHeader(d) {
    const r = d.router, t = r.totals, http = t.http || {};
    $("model").textContent = r.model + (r.draining ? " · draining" : "");
    const last = state.samples.length ? state.samples[state.samples.length - 1] : {};
    const stats = [
      ["stat-inflight", fmt(r.inflight, 0), "in flight"],
      ["stat-rate", fmt(last.req_s), "req/s"],
      ["stat-tokens-s", fmt(last.tok_s, 0), "tok/s"],
      ["stat-finished", fmt(t.finished || 0, 0), "finished"],
      ["stat-errors", fmt((t.error || 0) + (t.rejected || 0), 0), "errors"],
      ["stat-429", fmt(http["429"] || 0, 0), "429s"],
      ["stat-503", fmt(http["503"] || 0, 0), "503s"],
      ["stat-tokens", fmt(t.tokens || 0, 0), "tokens"],
      ["stat-kv", bytes(t.kv_bytes || 0), "KV moved"],
      ["stat-migrations", fmt(r.recovery.num_migrations, 0), "migrations"],
    ];
    $("stats").innerHTML = stats.map(([id, v, l]) => `<div class="stat"><b id="${id}">${esc(v)}</b><span>${l}</span></div>`).join("");
  }

  // The deployment: router → pools (prefill, decode, mixed) → KV flows P → D.
  function drawDeployment(d) {
    const el = $("deployment");
    const width = Math.max(el.clientWidth, 700);
    const roles = ["prefill", "decode", "mixed"].filter((r) => d.workers.some((w) => w.role === r) || d.pools[r]);
    const cardW = 250, cardH = 96, gapY = 12, top = 34, routerW = 150;
    const columns = Math.max(roles.length, 1);
    const colGap = (width - routerW - 40 - columns * cardW) / columns;
    const colX = {};
    roles.forEach((role, i) => { colX[role] = routerW + 40 + colGap * (i + 0.5) + i * cardW; });
    const byRole = {};
    roles.forEach((role) => { byRole[role] = d.workers.filter((w) => w.role === role); });
    const rows = Math.max(1, ...roles.map((r) => byRole[r].length));
    const height = top + rows * (cardH + gapY) + 8;
    const pos = {};
    roles.forEach((role) => byRole[role].forEach((w, i) => { pos[w.id] = { x: colX[role], y: top + i * (cardH + gapY) }; }));
    const parts = [];
    parts.push(`<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="11" markerHeight="11" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#d9468f"/></marker></defs>`);
    // router box
    const ry = top + Math.max(0, (rows * (cardH + gapY) - gapY) / 2 - 50);
    const r = d.router;
    parts.push(`<g class="router" data-role="router"><rect x="8" y="${ry}" width="${routerW}" height="100" rx="8" fill="#3b4654"/>` +
      `<text x="20" y="${ry + 22}" class="title" style="fill:#fff">router</text>` +
      `<text x="20" y="${ry + 42}" class="small" style="fill:#d5dee8">${fmt(r.inflight, 0)} in flight</text>` +
      `<text x="20" y="${ry + 60}" class="small" style="fill:#d5dee8">${fmt(r.admitted, 0)} admitted${r.max_inflight ? " / " + fmt(r.max_inflight, 0) : ""}</text>` +
      `<text x="20" y="${ry + 78}" class="small" style="fill:#d5dee8">${r.draining ? "draining" : "accepting"}</text></g>`);
    // pool headers
    roles.forEach((role) => {
      const pool = d.pools[role] || { actual: byRole[role].length, target: null };
      const count = pool.target !== null && pool.target !== undefined ? `${pool.actual} / ${pool.target} target` : `${pool.actual}`;
      parts.push(`<text x="${colX[role]}" y="18" class="pool" style="fill:${ROLE_COLORS[role]}">${role} pool · ${esc(count)}</text>`);
    });
    // router → worker links (the router's assigned requests)
    d.workers.forEach((w) => {
      const p = pos[w.id];
      if (!p || w.state === "lost" || w.state === "left") return;
      if (w.role === "decode" && roles.indexOf("prefill") >= 0) return; // reached through the prefill column
      parts.push(`<path d="M${8 + routerW},${ry + 50} C${8 + routerW + 40},${ry + 50} ${p.x - 40},${p.y + cardH / 2} ${p.x},${p.y + cardH / 2}" fill="none" stroke="#c3ccd6" stroke-width="1.5"/>`);
    });
    // KV flows P → D
    const maxFlow = Math.max(1, ...d.flows.map((f) => f.bytes_s));
    d.flows.forEach((f) => {
      const a = pos[f.src], b = pos[f.dst];
      if (!a || !b) return;
      const w = 1.5 + 5 * Math.sqrt(f.bytes_s / maxFlow);
      const gone = d.workers.some((x) => (x.id === f.src || x.id === f.dst) && (x.state === "lost" || x.state === "left"));
      const x1 = a.x + cardW, y1 = a.y + cardH / 2, x2 = b.x - 4, y2 = b.y + cardH / 2;
      const mx = (x1 + x2) / 2;
      parts.push(`<g class="flow" data-src="${esc(f.src)}" data-dst="${esc(f.dst)}"><path d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}" fill="none" stroke="#d9468f" stroke-opacity="${gone ? 0.25 : 0.75}" stroke-width="${w}" marker-end="url(#arrow)"/>` +
        `<text x="${mx}" y="${(y1 + y2) / 2 - 6}" text-anchor="middle" class="small" style="fill:#a8326c">${esc(bytes(f.bytes_s))}/s KV</text>` +
        `<title>${esc(f.src)} → ${esc(f.dst)}: ${esc(bytes(f.bytes_s))}/s over the last ${d.router.window_s} s, ${f.requests} request(s)</title></g>`);
    });
    d.workers.forEach((w) => { if (pos[w.id]) parts.push(workerCard(w, pos[w.id].x, pos[w.id].y, cardW, cardH)); });
    if (!d.workers.length) parts.push(`<text x="${routerW + 60}" y="${top + 40}" class="title">no workers registered</text>`);
    el.innerHTML = `<svg viewBox="0 0 ${width} ${height}" height="${height}">${parts.join("")}</svg>`;
    const serving = d.workers.filter((w) => w.state === "ready").length;
    $("deploy-hint").textContent = `${serving} workers serving` + (r.supervised ? ` · supervised (${r.launcher || "local"})` : "");
  }

  function workerCard(w, x, y, cw, ch) {
    const gone = w.state === "lost" || w.state === "left" || w.state === "failed";
    const color = ROLE_COLORS[w.role] || "#666";
    const stateColor = STATE_COLORS[w.state] || "#7d8996";
    const total = w.kv_total || 0;
    const barW = cw - 24;
    const usedW = total ? barW * (w.kv_used / total) : 0;
    const cachedW = total ? barW * Math.min(w.kv_cached, w.kv_free) / total : 0;
    const place = [w.host, w.pid ? "pid " + w.pid : null, w.node ? "node " + w.node.slice(0, 8) : null,
      w.restarts ? `${w.restarts} restart${w.restarts > 1 ? "s" : ""}` : null,
      w.slot_state && w.slot_state !== w.state ? "supervisor: " + w.slot_state : null].filter(Boolean).join(" · ");
    const queue = w.role === "decode" ? `wait KV ${w.waiting_kv}` : `held ${w.held}`;
    const ago = gone && w.gone_unix_s ? ` ${fmt(state.latest.now - w.gone_unix_s, 0)} s ago` : "";
    return `<g class="worker ${esc(w.state)}" data-worker="${esc(w.id)}" data-state="${esc(w.state)}" data-role="${esc(w.role)}">` +
      `<rect class="box" x="${x}" y="${y}" width="${cw}" height="${ch}" rx="7" fill="#fff" stroke="${color}" stroke-width="1.5"/>` +
      `<rect x="${x}" y="${y}" width="5" height="${ch}" rx="2" fill="${color}"/>` +
      `<text x="${x + 12}" y="${y + 18}" class="title">${esc(w.id)}</text>` +
      `<rect x="${x + cw - 78}" y="${y + 6}" width="70" height="17" rx="8" fill="${stateColor}"/>` +
      `<text x="${x + cw - 43}" y="${y + 18}" text-anchor="middle" style="fill:#fff;font-size:11px" class="state">${esc(w.state)}</text>` +
      `<text x="${x + 12}" y="${y + 35}" class="small">${esc(place)}${esc(ago)}</text>` +
      `<text x="${x + 12}" y="${y + 53}" class="small"><tspan class="running" style="font-weight:600;fill:#1f2933">${w.running}</tspan> running · ` +
      `<tspan class="waiting" style="font-weight:600;fill:#1f2933">${w.waiting}</tspan> waiting · ${queue} · ${w.assigned} assigned</text>` +
      `<rect x="${x + 12}" y="${y + 62}" width="${barW}" height="9" rx="3" fill="#e9edf2"/>` +
      `<rect x="${x + 12}" y="${y + 62}" width="${usedW}" height="9" rx="3" fill="${color}"/>` +
      `<rect x="${x + 12 + usedW}" y="${y + 62}" width="${cachedW}" height="9" fill="${color}" fill-opacity=".3"/>` +
      `<text x="${x + 12}" y="${y + 88}" class="small kv">KV ${w.kv_used}/${total} used · ${w.kv_cached} cached · ${w.kv_free} free</text>` +
      `<title>${esc(w.id)} (${esc(w.role)}, ${esc(w.state)}): heartbeat ${fmt(w.heartbeat_age_s, 1)} s ago; metrics port ${w.metrics_port}</title></g>`;
  }

  // ---------------------------------------------------------------- time charts

  const CHARTS = [
    { id: "chart-rate", title: "Requests / s", series: [{ key: "req_s", label: "finished", color: "#2f6fde" }] },
    { id: "chart-tokens", title: "Tokens / s delivered", series: [{ key: "tok_s", label: "tokens", color: "#0f9d76" }] },
    { id: "chart-errors", title: "Errors, 429s and 503s (per sample)", bars: true, series: [
      { key: "errors", label: "errors", color: "#d64545" }, { key: "http_429", label: "429", color: "#f0a020" },
      { key: "http_503", label: "503", color: "#7d4bc7" }] },
    { id: "chart-ttft", title: "TTFT (ms)", slo: "ttft_ms", series: [
      { key: "ttft_p50_ms", label: "p50", color: "#2f6fde" }, { key: "ttft_p99_ms", label: "p99", color: "#9db8ec" }] },
    { id: "chart-itl", title: "ITL (ms)", slo: "itl_ms", series: [
      { key: "itl_p50_ms", label: "p50", color: "#0f9d76" }, { key: "itl_p99_ms", label: "p99", color: "#8fd1bf" }] },
    { id: "chart-breakdown", title: "TTFT breakdown (mean ms)", stacked: true, series: ["queue", "prefill", "transfer", "delivery"].map(
      (p) => ({ key: p, label: p, color: PART_COLORS[p], get: (s) => (s.ttft_parts_ms ? s.ttft_parts_ms[p] : null) })) },
    // One series per placement reason seen (KV-aware routing: where each prompt was computed, and why).
    { id: "chart-routing", title: "Routing decisions by reason (per sample)", bars: true, dynamic: "placements", series: [] },
  ];
  const REASON_COLORS = ["#2f6fde", "#0f9d76", "#f0a020", "#d9468f", "#7c4dcc", "#12a38a", "#3b4654", "#d64545"];

  function routingSeries(chart) {
    const seen = chart.series.map((sr) => sr.key);
    for (const s of state.samples) {
      for (const reason of Object.keys(s.placements || {})) {
        if (seen.indexOf(reason) < 0) {
          seen.push(reason);
          chart.series.push({ key: reason, label: reason.replace(/_/g, " "), color: REASON_COLORS[(seen.length - 1) % REASON_COLORS.length],
            get: (x) => (x.placements ? x.placements[reason] || 0 : 0) });
        }
      }
    }
  }

  function ensureCharts() {
    const root = $("charts");
    if (root.children.length) return;
    root.innerHTML = CHARTS.map((c) => `<div class="card" id="${c.id}"><h2>${esc(c.title)}</h2><div class="legend"></div><div class="plot"></div></div>`).join("");
  }

  function drawCharts(d) {
    ensureCharts();
    // Five minutes at most; at least one, starting where the samples start.
    const t1 = d.now, first = state.samples.length ? state.samples[0].t : t1;
    const t0 = Math.max(t1 - WINDOW_S, Math.min(first, t1 - 60));
    for (const c of CHARTS) {
      if (c.dynamic) routingSeries(c);
      const box = $(c.id);
      const get = (sr) => sr.get || ((s) => s[sr.key]);
      const last = state.samples.length ? state.samples[state.samples.length - 1] : null;
      const slo = c.slo ? d.router.slo[c.slo] : null;
      box.querySelector(".legend").innerHTML = c.series.map((sr) =>
        `<span><i style="background:${sr.color}"></i>${esc(sr.label)}<span class="val">${last ? fmt(get(sr)(last)) : "–"}</span></span>`).join("") +
        (slo ? `<span><i style="background:#d64545"></i>SLO<span class="val">${fmt(slo)}</span></span>` : "");
      box.querySelector(".plot").innerHTML = timeChart(box.querySelector(".plot").clientWidth, 150, t0, t1, c, get, slo);
    }
  }

  function timeChart(width, height, t0, t1, c, get, slo) {
    width = Math.max(width, 200);
    const m = { l: 44, r: 8, t: 8, b: 20 };
    const w = width - m.l - m.r, h = height - m.t - m.b;
    const samples = state.samples.filter((s) => s.t >= t0);
    let ymax = 0;
    for (const s of samples) {
      let sum = 0;
      for (const sr of c.series) {
        const v = get(sr)(s);
        if (v === null || v === undefined) continue;
        if (c.stacked || c.bars) sum += v; else ymax = Math.max(ymax, v);
      }
      ymax = Math.max(ymax, sum);
    }
    if (slo) ymax = Math.max(ymax, slo * 1.1);
    ymax = niceMax(ymax * 1.05);
    const X = (t) => m.l + (w * (t - t0)) / (t1 - t0);
    const Y = (v) => m.t + h - (h * v) / ymax;
    const out = [];
    for (let i = 0; i <= 4; i++) {
      const v = (ymax * i) / 4, y = Y(v);
      out.push(`<line class="grid" x1="${m.l}" x2="${m.l + w}" y1="${y}" y2="${y}"/><text x="${m.l - 5}" y="${y + 3.5}" text-anchor="end">${fmt(v)}</text>`);
    }
    for (let k = 0; k <= 5; k++) {
      const t = t0 + (k * (t1 - t0)) / 5, x = X(t);
      out.push(`<line class="axis" x1="${x}" x2="${x}" y1="${m.t + h}" y2="${m.t + h + 4}"/><text x="${x}" y="${height - 4}" text-anchor="${k === 0 ? "start" : k === 5 ? "end" : "middle"}">${clock(t)}</text>`);
    }
    out.push(`<line class="axis" x1="${m.l}" x2="${m.l + w}" y1="${m.t + h}" y2="${m.t + h}"/>`);
    for (const e of state.events) {
      if (e.t < t0 || e.kind === "router_started") continue;
      const x = X(e.t);
      out.push(`<line class="event" x1="${x}" x2="${x}" y1="${m.t}" y2="${m.t + h}" stroke="${EVENT_COLORS[e.kind] || "#888"}"><title>${esc(clock(e.t) + " " + eventText(e))}</title></line>`);
    }
    const dt = state.latest.router.interval_s || 1;
    if (c.bars) {
      const bw = Math.max(1.5, (w * dt) / (t1 - t0) - 0.5);
      for (const s of samples) {
        let base = 0;
        for (const sr of c.series) {
          const v = get(sr)(s);
          if (!v) continue;
          out.push(`<rect x="${X(s.t) - bw}" y="${Y(base + v)}" width="${bw}" height="${Y(base) - Y(base + v)}" fill="${sr.color}"><title>${clock(s.t)} ${esc(sr.label)}: ${v}</title></rect>`);
          base += v;
        }
      }
    } else if (c.stacked) {
      const tops = samples.map(() => 0);
      for (const sr of c.series) {
        const lower = tops.slice();
        const segs = [];
        let seg = [];
        samples.forEach((s, i) => {
          const v = get(sr)(s);
          if (v === null || v === undefined) { if (seg.length) segs.push(seg); seg = []; return; }
          tops[i] = lower[i] + v;
          seg.push(i);
        });
        if (seg.length) segs.push(seg);
        for (const g of segs) {
          const up = g.map((i) => `${X(samples[i].t)},${Y(tops[i])}`);
          const down = g.slice().reverse().map((i) => `${X(samples[i].t)},${Y(lower[i])}`);
          out.push(`<polygon points="${up.concat(down).join(" ")}" fill="${sr.color}" fill-opacity=".8" stroke="${sr.color}" stroke-width=".5"/>`);
        }
      }
    } else {
      for (const sr of c.series) {
        let seg = [];
        const flush = () => {
          if (seg.length === 1) out.push(`<circle cx="${seg[0][0]}" cy="${seg[0][1]}" r="2" fill="${sr.color}"/>`);
          if (seg.length > 1) out.push(`<polyline points="${seg.map((p) => p.join(",")).join(" ")}" fill="none" stroke="${sr.color}" stroke-width="1.8" stroke-linejoin="round"/>`);
          seg = [];
        };
        for (const s of samples) {
          const v = get(sr)(s);
          if (v === null || v === undefined) { flush(); continue; }
          seg.push([X(s.t).toFixed(1), Y(v).toFixed(1)]);
        }
        flush();
      }
    }
    if (slo) out.push(`<line class="slo" x1="${m.l}" x2="${m.l + w}" y1="${Y(slo)}" y2="${Y(slo)}"><title>SLO ${fmt(slo)} ms</title></line>`);
    return `<svg viewBox="0 0 ${width} ${height}" height="${height}">${out.join("")}</svg>`;
  }

  // ---------------------------------------------------------------- events and traces

  function drawEvents() {
    const rows = state.events.slice().reverse().map((e) =>
      `<tr class="event-row" data-kind="${esc(e.kind)}"><td>${clock(e.t)}</td><td><span class="badge ${esc(e.kind)}">${esc(e.kind.replace(/_/g, " "))}</span></td>` +
      `<td>${esc(e.worker || "")}</td><td>${esc([e.role, e.pid ? "pid " + e.pid : null, e.host, e.count ? "×" + e.count : null, e.detail].filter(Boolean).join(" · "))}</td></tr>`);
    $("events").innerHTML = `<table><thead><tr><th>time</th><th>event</th><th>worker</th><th></th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
  }

  function drawTraces() {
    const list = state.traces.slice().reverse();
    const scale = Math.max(1e-6, ...list.map((t) => t.ttft_s || 0));
    const rows = list.map((t) => {
      const arrived = t.arrived_unix_s;
      const routed = t.events.filter((e) => e.event === "routed").pop() || {};
      return `<tr class="trace${state.selected === t.request_id ? " selected" : ""}" data-id="${esc(t.request_id)}"><td>${clock(arrived)}</td>` +
        `<td title="${esc(t.request_id)}">${esc(t.request_id.slice(0, 22))}</td><td><span class="badge ${esc(t.outcome || "")}">${esc(t.outcome || "?")}</span></td>` +
        `<td>${fmt(t.ttft_s === null ? null : 1e3 * t.ttft_s)}</td><td>${partsBar(t.ttft_breakdown, scale)}</td><td>${t.num_tokens}</td>` +
        `<td>${fmt(t.e2e_s === null ? null : 1e3 * t.e2e_s, 0)}</td><td>${t.attempts}</td>` +
        `<td>${esc(routed.reason ? routed.reason.replace(/_/g, " ") : "")}</td></tr>`;
    });
    $("traces").innerHTML = `<table><thead><tr><th>arrived</th><th>request</th><th>outcome</th><th>TTFT ms</th><th>queue · prefill · transfer · delivery</th><th>tokens</th><th>E2E ms</th><th>attempts</th><th>routing</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
  }

  $("traces").addEventListener("click", (ev) => {
    const row = ev.target.closest("tr.trace");
    if (!row) return;
    state.selected = row.dataset.id;
    drawTraces();
    drawTimeline();
  });

  // One request's lifecycle: its phases as bars on a time axis, then every event.
  function drawTimeline() {
    const t = state.traces.find((x) => x.request_id === state.selected);
    if (!t) {
      if (!state.selected) $("timeline").innerHTML = `<div class="muted">Pick a request above.</div>`;
      return;
    }
    $("timeline-id").textContent = `${t.request_id} · ${t.outcome} · ${t.attempts} attempt(s)`;
    const at = {};
    for (const e of t.events) if (!(e.event in at)) at[e.event] = e.t_s;
    const end = t.e2e_s || Math.max(...t.events.map((e) => e.t_s)) || 1e-3;
    const phases = [
      ["queue", 0, at.prefill_start !== undefined ? at.prefill_start : at.routed, PART_COLORS.queue],
      ["prefill", at.prefill_start, at.prefill_end, PART_COLORS.prefill],
      ["KV transfer", at.kv_transfer_start, at.kv_transfer_end, PART_COLORS.transfer],
      ["first token → client", at.first_token, at.first_token_delivered, PART_COLORS.delivery],
      ["decode", at.first_token_delivered, at.finished !== undefined ? at.finished : end, "#0f9d76"],
    ].filter((p) => p[1] !== undefined && p[2] !== undefined);
    const width = Math.max($("timeline").clientWidth, 500), rowH = 22, m = { l: 150, r: 70, t: 6 };
    const height = m.t + phases.length * rowH + 24;
    const X = (s) => m.l + ((width - m.l - m.r) * s) / end;
    const out = [];
    phases.forEach(([name, a, b, color], i) => {
      const y = m.t + i * rowH;
      const w = Math.max(X(b) - X(a), 1.5);
      out.push(`<text x="${m.l - 8}" y="${y + 14}" text-anchor="end">${esc(name)}</text><rect x="${X(a)}" y="${y + 3}" width="${w}" height="14" rx="3" fill="${color}"/>` +
        `<text x="${X(a) + w + 5}" y="${y + 14}">${fmt(1e3 * (b - a))} ms</text>`);
    });
    const yAxis = m.t + phases.length * rowH + 4;
    out.push(`<line class="axis" x1="${m.l}" x2="${width - m.r}" y1="${yAxis}" y2="${yAxis}"/>`);
    for (let k = 0; k <= 4; k++) {
      const s = (end * k) / 4;
      out.push(`<text x="${X(s)}" y="${yAxis + 14}" text-anchor="middle">${fmt(1e3 * s)} ms</text>`);
    }
    for (const e of t.events) out.push(`<line x1="${X(e.t_s)}" x2="${X(e.t_s)}" y1="${m.t}" y2="${yAxis}" stroke="#9aa5b1" stroke-width=".6"><title>${esc(e.event)} at ${fmt(1e3 * e.t_s)} ms</title></line>`);
    const b = t.ttft_breakdown;
    const summary = b ? `TTFT ${fmt(1e3 * b.ttft_s)} ms = queue ${fmt(1e3 * b.queue_s)} + prefill ${fmt(1e3 * b.prefill_s)} + transfer ${fmt(1e3 * b.transfer_s)} + delivery ${fmt(1e3 * b.delivery_s)} ms` : "no first token";
    const events = t.events.map((e) => {
      const extra = Object.keys(e).filter((k) => k !== "event" && k !== "t_s" && e[k] !== null).map((k) => `${k}=${e[k]}`).join(" ");
      return `<tr><td>${fmt(1e3 * e.t_s, 3)} ms</td><td>${esc(e.event)}</td><td>${esc(extra)}</td></tr>`;
    });
    $("timeline").innerHTML = `<div class="muted">${esc(summary)} · ${t.num_tokens} tokens · E2E ${fmt(1e3 * end)} ms</div>` +
      `<svg viewBox="0 0 ${width} ${height}" height="${height}">${out.join("")}</svg>` +
      `<table class="tl-table"><thead><tr><th>t</th><th>event</th><th>details</th></tr></thead><tbody>${events.join("")}</tbody></table>`;
  }

  window.addEventListener("resize", () => { if (state.latest) draw(); });
  poll();
})();
