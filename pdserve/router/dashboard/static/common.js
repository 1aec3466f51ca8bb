// pdserve dashboard: colours and formatting helpers (the same <script> as dashboard.js, which follows).
"use strict";
const PART_COLORS = { queue: "#f0a020", prefill: "#2f6fde", transfer: "#d9468f", delivery: "#12a38a" };
const ROLE_COLORS = { prefill: "#2f6fde", decode: "#0f9d76", mixed: "#7c4dcc" };
const EVENT_COLORS = {
  worker_lost: "#d64545", worker_left: "#e08a00", worker_draining: "#e08a00", worker_registered: "#1f8a5b",
  worker_replaced: "#1f8a5b", migration: "#6d4bc7", retry: "#6d4bc7", request_failed: "#d64545",
  kv_timeout: "#e08a00", fallback_prefill: "#6d4bc7", router_started: "#3b4654",
  worker_starting: "#e08a00", worker_restarting: "#e08a00", worker_flipping: "#6d4bc7", worker_flipped: "#6d4bc7",
  worker_failed: "#d64545", scaled: "#2f6fde",
};
const STATE_COLORS = {
  ready: "#1f8a5b", draining: "#e08a00", starting: "#e08a00", restarting: "#e08a00", flipping: "#6d4bc7",
  failed: "#d64545", lost: "#d64545", left: "#7d8996",
};

function esc(value) {
  return String(value).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const d = digits === undefined ? (Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : 2) : digits;
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: 0 });
}
function bytes(value) {
  if (!value) return "0 B";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let v = value, i = 0;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
  return fmt(v, v >= 100 ? 0 : 1) + " " + units[i];
}
function clock(t) {
  const d = new Date(t * 1000);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((n) => String(n).padStart(2, "0")).join(":");
}
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
function $(id) { return document.getElementById(id); }

function eventText(e) {
  const bits = [e.kind.replace(/_/g, " ")];
  if (e.worker) bits.push(e.worker);
  if (e.role) bits.push(`(${e.role})`);
  if (e.count) bits.push(`×${e.count}`);
  if (e.detail) bits.push(e.detail);
  return bits.join(" ");
}


function partsBar(b, scale) {
  if (!b) return "";
  let x = 0;
  const out = [];
  for (const p of ["queue", "prefill", "transfer", "delivery"]) {
    const w = 120 * (b[p + "_s"] / scale);
    if (w > 0) out.push(`<rect x="${x}" y="1" width="${w}" height="10" fill="${PART_COLORS[p]}"><title>${p} ${fmt(1e3 * b[p + "_s"])} ms</title></rect>`);
    x += w;
  }
  return `<svg width="122" height="12" style="display:inline-block;vertical-align:middle">${out.join("")}</svg>`;
}
