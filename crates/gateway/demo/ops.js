// flowgate ops view: polls /demo/ops.json once a second and shows it.
"use strict";

(() => {
  const flowId = new URLSearchParams(location.search).get("flow") || "demo";
  const $ = (id) => document.getElementById(id);
  const fmt = (n) => (n == null ? "–" : n >= 100 ? n.toFixed(0) : n.toFixed(1));
  let lastOk = 0;

  $("flow").textContent = flowId;
  $("canvas-link").href = `./?flow=${encodeURIComponent(flowId)}`;

  /** Fills a two-column table from {name: rate}, busiest first. */
  function rateRows(tbody, rates) {
    const rows = Object.entries(rates || {}).sort((a, b) => b[1] - a[1]);
    tbody.replaceChildren(
      ...rows.map(([name, rate]) => {
        const tr = document.createElement("tr");
        const td1 = document.createElement("td");
        td1.textContent = name;
        const td2 = document.createElement("td");
        td2.className = "num";
        td2.textContent = fmt(rate);
        tr.append(td1, td2);
        return tr;
      }),
    );
  }

  function show(o) {
    $("node").textContent = o.node;
    $("engine").textContent = o.draining ? `${o.engine} (draining)` : o.engine;
    $("connections").textContent = String(o.connections);
    $("rooms").textContent = String(o.rooms);
    $("events-in").textContent = fmt(o.rates?.eventsInPerSec ?? null);
    $("deliveries").textContent = fmt(o.rates?.deliveriesPerSec ?? null);
    $("refused").textContent = String(Object.values(o.refusals || {}).reduce((a, b) => a + b, 0));
    rateRows($("in-table"), o.rates?.eventsIn);
    rateRows($("out-table"), o.rates?.deliveries);

    const p = o.flow.presence;
    const body = $("presence");
    if (p.error) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 4;
      td.className = "stale";
      td.textContent = `presence unavailable: ${p.error}`;
      tr.append(td);
      body.replaceChildren(tr);
      return;
    }
    $("presence-count").textContent = String(p.sessions.length);
    body.replaceChildren(
      ...p.sessions.map((s) => {
        const tr = document.createElement("tr");
        for (const text of [s.userId, s.userName, s.socketId, s.joinedAt]) {
          const td = document.createElement("td");
          td.textContent = text;
          tr.append(td);
        }
        tr.firstChild.style.borderLeft = `4px solid ${s.userColor}`;
        return tr;
      }),
    );
  }

  async function poll() {
    try {
      const res = await fetch(`ops.json?flow=${encodeURIComponent(flowId)}`, { cache: "no-store" });
      const body = await res.json();
      if (!res.ok) throw new Error(body.error?.message || res.status);
      show(body);
      lastOk = Date.now();
      $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      $("updated").classList.remove("stale");
    } catch (e) {
      $("updated").textContent = `no answer: ${e.message}` + (lastOk ? ` (last ${new Date(lastOk).toLocaleTimeString()})` : "");
      $("updated").classList.add("stale");
    } finally {
      setTimeout(poll, 1000);
    }
  }
  poll();
})();
