/* Stamen's run dashboard: renders /api/state and /api/history, live over /api/events.
   Data from the server is only ever set as text (textContent), never parsed as HTML. */
(function () {
  "use strict";
  var token = new URLSearchParams(location.search).get("token");
  function api(path) { return token ? path + "?token=" + encodeURIComponent(token) : path; }
  function $(id) { return document.getElementById(id); }
  function text(id, value) { var el = $(id); if (el.textContent !== String(value)) el.textContent = String(value); }

  var last = null;       // the last state snapshot
  var receivedAt = 0;    // when it came (browser clock, seconds)
  var historyVersion = -1;
  var charts = {};       // name -> {plot, box}
  var COLORS = ["#2d6cdf", "#e07b24", "#2f9e62", "#8e44ad", "#d64541", "#16a2b8"];

  function ago(seconds) {
    if (seconds == null) return "–";
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s ago";
    return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min ago";
  }
  function duration(seconds) {
    if (seconds == null) return "–";
    seconds = Math.max(0, Math.round(seconds));
    var h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + s + "s";
  }
  function serverNow() { return last ? last.now + (Date.now() / 1000 - receivedAt) : 0; }
  function clockTime(t) { return t == null ? "–" : new Date(t * 1000).toLocaleTimeString(); }

  function renderState(state) {
    last = state; receivedAt = Date.now() / 1000;
    var run = state.run, round = state.round;
    var status = $("run-status");
    status.dataset.status = run.status; text("run-status", run.status);
    text("strategy", run.strategy ? run.strategy : "");
    text("round", round ? round.round : (state.rounds_done || "–"));
    text("round-total", run.num_rounds == null ? "–" : run.num_rounds);
    if (state.waiting && !round) {
      text("phase", "waiting for nodes: " + state.waiting.connected + "/" + state.waiting.needed);
    } else if (round) {
      text("phase", round.phase + (round.ended ? " done in " + round.ended.seconds.toFixed(2) + " s" : " in progress"));
    } else {
      text("phase", "not started");
    }
    var expected = round ? round.expected : 0, ok = round ? round.results : 0, bad = round ? round.failures : 0;
    text("results", ok + bad); text("expected", expected); text("round-failures", bad);
    $("bar-ok").style.width = expected ? (100 * ok / expected) + "%" : "0";
    $("bar-failed").style.width = expected ? (100 * bad / expected) + "%" : "0";
    text("node-count", state.nodes.connected);
    text("nodes-joined", state.nodes.joined_total); text("nodes-left", state.nodes.left_total);
    text("run-reason", run.status === "failed" && run.reason ? run.reason : (run.status === "completed" ? "completed" : ""));
    renderFailures(round);
    renderNodes(state.nodes);
    tick();
  }

  function renderFailures(round) {
    var box = $("failures-box"), list = $("failures");
    if (!round || !round.failed.length) { box.hidden = true; return; }
    box.hidden = false;
    text("failures-round", round.round + " (" + round.phase + ")");
    list.textContent = "";
    round.failed.forEach(function (f) {
      var li = document.createElement("li");
      var code = document.createElement("code"); code.textContent = f.id;
      li.appendChild(code); li.appendChild(document.createTextNode(": " + (f.reason || "failed")));
      list.appendChild(li);
    });
  }

  function cell(row, value, cls) {
    var td = document.createElement("td"); td.textContent = value; if (cls) td.className = cls; row.appendChild(td); return td;
  }
  function renderNodes(nodes) {
    var body = $("nodes").tBodies[0];
    body.textContent = "";
    nodes.list.forEach(function (n) {
      var tr = document.createElement("tr");
      tr.dataset.node = n.id; tr.dataset.status = n.status; tr.dataset.outcome = n.outcome || "";
      if (n.status !== "connected") tr.className = "left";
      cell(tr, n.id, "id"); cell(tr, n.transport); cell(tr, n.peer);
      cell(tr, clockTime(n.connected_since));
      cell(tr, "", "heard").dataset.t = n.last_heard;
      var status = document.createElement("span");
      status.className = n.status === "connected" ? "badge ok" : "badge left";
      status.textContent = n.status;
      if (n.left_reason) status.title = n.left_reason;
      cell(tr, "").appendChild(status);
      var outcome = cell(tr, "", "outcome");
      var badge = document.createElement("span");
      if (n.outcome === "failed") {
        badge.className = "badge failed"; badge.textContent = "failed in round " + n.failed_round;
      } else if (n.outcome === "ok") {
        badge.className = "badge ok"; badge.textContent = "ok in round " + n.last_round;
      } else {
        badge.className = "badge left"; badge.textContent = "no reply yet";
      }
      outcome.appendChild(badge);
      var failures = cell(tr, n.failures ? String(n.failures) : "0");
      if (n.last_failure) {
        failures.className = "reason"; failures.textContent = n.failures + " · last: " + n.last_failure;
      }
      body.appendChild(tr);
    });
    var more = $("nodes-more");
    var hidden = nodes.connected - nodes.list.filter(function (n) { return n.status === "connected"; }).length;
    more.hidden = hidden <= 0;
    if (hidden > 0) more.textContent = hidden + " more connected node(s) not listed.";
  }

  function tick() {
    if (!last) return;
    var now = serverNow();
    var cells = document.querySelectorAll("#nodes td.heard");
    for (var i = 0; i < cells.length; i++) cells[i].textContent = ago(now - Number(cells[i].dataset.t));
    var run = last.run;
    if (run.started_at != null) text("elapsed", duration(run.seconds != null ? run.seconds : now - run.started_at));
  }

  /* --- charts ----------------------------------------------------------------------- */

  function chartSpecs(rounds) {
    var specs = { loss: { title: "Loss", series: {} } }, order = ["loss"];
    function add(chart, title, series, round, value) {
      if (typeof value !== "number") return;
      if (!specs[chart]) { if (order.length >= 9) return; specs[chart] = { title: title, series: {} }; order.push(chart); }
      (specs[chart].series[series] = specs[chart].series[series] || {})[round] = value;
    }
    rounds.forEach(function (r) {
      ["fit", "evaluate"].forEach(function (phase) {
        var p = r[phase]; if (!p) return;
        add("loss", "Loss", phase + " loss", r.round, p.loss);
        Object.keys(p.metrics).forEach(function (name) { add("m:" + name, name, phase, r.round, p.metrics[name]); });
      });
    });
    return order.map(function (key) { return { key: key, spec: specs[key] }; });
  }

  function renderHistory(history) {
    historyVersion = history.history_version;
    var specs = chartSpecs(history.rounds);
    var any = false;
    specs.forEach(function (item) {
      var names = Object.keys(item.spec.series);
      if (!names.length) return;
      any = true;
      var xs = [];
      history.rounds.forEach(function (r) {
        if (names.some(function (n) { return item.spec.series[n][r.round] !== undefined; })) xs.push(r.round);
      });
      var data = [xs].concat(names.map(function (n) { return xs.map(function (x) { var v = item.spec.series[n][x]; return v === undefined ? null : v; }); }));
      drawChart(item.key, item.spec.title, names, data);
    });
    $("charts-empty").hidden = any;
    resizeCharts();  // a new chart reflows the grid: every chart takes its cell's width
  }

  function resizeCharts() {
    Object.keys(charts).forEach(function (k) {
      var c = charts[k], width = Math.max(300, c.box.clientWidth);
      if (c.plot.width !== width) c.plot.setSize({ width: width, height: 220 });
    });
  }

  function drawChart(key, title, names, data) {
    var entry = charts[key];
    var signature = names.join("|");
    if (entry && entry.signature !== signature) { entry.plot.destroy(); entry.box.remove(); entry = null; }
    if (!entry) {
      var box = document.createElement("div"); box.className = "chart"; box.dataset.chart = key;
      var h3 = document.createElement("h3"); h3.textContent = title; box.appendChild(h3);
      $("charts").appendChild(box);
      var width = Math.max(300, box.clientWidth || 420);
      var opts = {
        width: width, height: 220,
        scales: { x: { time: false } },
        axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }, { size: 60 }],
        series: [{ label: "round" }].concat(names.map(function (n, i) {
          return { label: n, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { show: true, size: 6 } };
        })),
      };
      entry = { plot: new uPlot(opts, data, box), box: box, signature: signature };
      charts[key] = entry;
    } else {
      entry.plot.setData(data);
    }
    entry.box.dataset.points = String(data[0].length);
  }

  window.addEventListener("resize", resizeCharts);

  /* --- updates: server-sent events, or polling when they are unavailable ----------- */

  function fetchJSON(path) {
    return fetch(api(path), { cache: "no-store" }).then(function (r) {
      if (!r.ok) throw new Error(r.status + " " + r.statusText);
      return r.json();
    });
  }
  function setLive(on, label) { var el = $("live"); el.className = on ? "live on" : "live"; el.textContent = label; }

  var pollTimer = null;
  function poll() {
    fetchJSON("/api/state").then(function (state) {
      renderState(state); setLive(true, "polling");
      if (state.history_version !== historyVersion) return fetchJSON("/api/history").then(renderHistory);
    }).catch(function (e) { setLive(false, "server unreachable (" + e.message + ")"); });
  }
  function startPolling() { if (!pollTimer) { poll(); pollTimer = setInterval(poll, 2000); } }

  function start() {
    if (!window.EventSource) { startPolling(); return; }
    var source = new EventSource(api("/api/events"));
    var failures = 0;
    source.addEventListener("open", function () { failures = 0; setLive(true, "live"); });
    source.addEventListener("state", function (e) { renderState(JSON.parse(e.data)); });
    source.addEventListener("history", function (e) { renderHistory(JSON.parse(e.data)); });
    source.addEventListener("end", function () { source.close(); setLive(false, "server stopped"); });
    source.addEventListener("error", function () {
      // Refused (e.g. 503: too many streams) closes the source; the browser retries a
      // broken stream by itself, up to three times here before polling instead.
      failures += 1;
      if (source.readyState === EventSource.CLOSED || failures >= 3) {
        source.close(); setLive(false, "polling"); startPolling();
      } else {
        setLive(false, "reconnecting…");
      }
    });
  }

  setInterval(tick, 1000);
  fetchJSON("/api/state").then(renderState).catch(function () {});
  fetchJSON("/api/history").then(renderHistory).catch(function () {});
  start();
})();
