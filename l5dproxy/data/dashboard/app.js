// l5dproxy dashboard: polls /stats.json every second and renders it; the tap
// view streams /tap as Server-Sent Events. No framework, no build step.
"use strict";

const POLL_MS = 1000;
const TAP_ROWS = 100;

function text(value, digits) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number" && digits !== undefined) return value.toFixed(digits);
  return String(value);
}

function percent(rate) {
  return rate === null || rate === undefined ? "–" : (rate * 100).toFixed(1) + "%";
}

function cell(row, value, className) {
  const td = document.createElement("td");
  td.textContent = value;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function fill(tableId, items, render) {
  const body = document.querySelector("#" + tableId + " tbody");
  const rows = items.map((item) => {
    const tr = document.createElement("tr");
    render(tr, item);
    return tr;
  });
  body.replaceChildren(...rows);
}

function rateClass(rate) {
  if (rate === null || rate === undefined) return "";
  return rate >= 0.99 ? "ok" : rate >= 0.9 ? "warn" : "bad";
}

function figures(tr, item) {
  cell(tr, text(item.requests_total), "requests-total");
  cell(tr, text(item.requests_per_second, 1), "rps");
  cell(tr, percent(item.success_rate), "success " + rateClass(item.success_rate));
  cell(tr, text(item.latency_ms.p50, 1));
  cell(tr, text(item.latency_ms.p95, 1));
  cell(tr, text(item.latency_ms.p99, 1));
}

function render(stats) {
  document.getElementById("version").textContent = "v" + stats.version;
  fill("services", stats.services, (tr, s) => {
    tr.dataset.service = s.name;
    cell(tr, s.name, "text");
    figures(tr, s);
    cell(tr, text(s.pending));
    cell(tr, text(s.open_connections));
  });
  const endpoints = [];
  for (const s of stats.services) {
    for (const e of s.endpoints) endpoints.push([s.name, e]);
  }
  fill("endpoints", endpoints, (tr, [service, e]) => {
    cell(tr, service, "text");
    cell(tr, e.address, "text");
    cell(tr, e.state, "text " + (e.state === "ready" ? "ok" : e.state === "ejected" ? "bad" : "warn"));
    cell(tr, text(e.ewma_ms, 2));
    cell(tr, text(e.in_flight));
    cell(tr, text(e.weight));
    cell(tr, text(e.ejections));
  });
  fill("listeners", stats.listeners, (tr, l) => {
    tr.dataset.listener = l.name;
    cell(tr, l.name, "text");
    cell(tr, l.address, "text");
    cell(tr, l.service, "text");
    cell(tr, text(l.open_connections));
    figures(tr, l);
    const mix = Object.entries(l.detect).map(([p, n]) => p + " " + n).join(", ");
    cell(tr, mix || "–", "text");
  });
  fill("opaque", stats.opaque, (tr, o) => {
    cell(tr, o.service, "text");
    cell(tr, o.endpoint, "text");
    cell(tr, text(o.age_seconds, 0));
    cell(tr, text(o.expires_in_seconds, 0));
    cell(tr, text(o.hits));
  });
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/stats.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "muted";
  } catch (e) {
    status.textContent = "cannot reach the proxy (" + e.message + ")";
    status.className = "bad";
  }
  setTimeout(poll, POLL_MS);
}

let tap = null;

function tapRow(event) {
  const body = document.querySelector("#tap tbody");
  const tr = document.createElement("tr");
  if (event.error || event.status >= 500) tr.className = "error";
  cell(tr, new Date(event.time * 1000).toLocaleTimeString(), "text");
  cell(tr, event.method, "text");
  cell(tr, event.authority, "text");
  cell(tr, event.path, "text");
  cell(tr, event.service, "text");
  cell(tr, event.endpoint, "text");
  cell(tr, text(event.status));
  cell(tr, text(event.latency_ms, 1));
  cell(tr, text(event.request_bytes) + " / " + text(event.response_bytes));
  cell(tr, event.error || "", "text");
  body.prepend(tr);
  while (body.rows.length > TAP_ROWS) body.deleteRow(body.rows.length - 1);
}

function toggleTap(submit) {
  submit.preventDefault();
  const button = document.getElementById("tap-toggle");
  const status = document.getElementById("tap-status");
  if (tap) {
    tap.close();
    tap = null;
    button.textContent = "start tap";
    status.textContent = "stopped";
    return;
  }
  const query = new URLSearchParams();
  for (const input of document.querySelectorAll("#tap-form input")) {
    if (input.value.trim()) query.set(input.name, input.value.trim());
  }
  tap = new EventSource("/tap?" + query.toString());
  tap.addEventListener("end", (e) => tapRow(JSON.parse(e.data)));
  tap.addEventListener("dropped", (e) => {
    status.textContent = JSON.parse(e.data).dropped_total + " events lost (too many to show)";
  });
  tap.onopen = () => { status.textContent = "tapping"; };
  button.textContent = "stop tap";
}

document.getElementById("tap-form").addEventListener("submit", toggleTap);
poll();
