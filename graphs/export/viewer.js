/* circuitexplain circuit viewer: plain JS + SVG, no libraries, works offline.
 * Reads the graph from <script id="circuit-data">: {graph, columns, nodes: [{id, col, row, attrs, site?, label?}],
 * edges: [{id, source, target, input, score, in_circuit}] (one per scored input), edge_attrs: {"u->v": attrs},
 * sites?: [{site, column, hook, sae, ...}] (feature circuits: one column per SAE site, framed)}. */
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("circuit-data").textContent);
  // a divergence (kl) rises when a supporting unit is ablated; other metrics drop
  var LOWER_IS_BETTER = (DATA.graph || {}).metric === "kl";
  var SVGNS = "http://www.w3.org/2000/svg";
  var COL_W = 200, MIN_COL_W = 135, MAX_COL_W = 200, MIN_SCALE = 0.55, ROW_H = 58, NODE_W = 96, NODE_H = 36, PAD_X = 80, PAD_TOP = 64, PAD_BOTTOM = 36;
  var PORT = { q: -11, k: 0, v: 11 };
  var COLOURS = { supports: "#2166ac", opposes: "#b2182b", neutral: "#9e9e9e" };
  var FILL = DATA.fill || {};
  var svg = document.getElementById("graph");
  var tooltip = document.getElementById("tooltip");
  var slider = document.getElementById("threshold");
  var sliderValue = document.getElementById("threshold-value");
  var circuitOnly = document.getElementById("circuit-only");
  var counts = document.getElementById("counts");

  var nodeById = {};
  DATA.nodes.forEach(function (n) { nodeById[n.id] = n; });
  var maxAbs = DATA.edges.reduce(function (m, e) {
    return e.score === null ? m : Math.max(m, Math.abs(e.score));
  }, 0);
  var hasCircuit = DATA.nodes.some(function (n) { return n.in_circuit; }) ||
    DATA.edges.some(function (e) { return e.in_circuit; });
  var view = null, baseView = null, current = null;
  var MAX_EDGES = 1500;  // initial threshold shows at most this many edges; the slider can go lower

  function fmt(v) {
    if (typeof v === "number") {
      if (Number.isInteger(v)) return String(v);
      var a = Math.abs(v);
      return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : String(parseFloat(v.toPrecision(4)));
    }
    return String(v);
  }

  function el(name, attrs, parent) {
    var node = document.createElementNS(SVGNS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(node);
    return node;
  }

  function colour(e) {
    if (!e.in_circuit) return COLOURS.neutral;
    if (e.score === null || e.score === 0) return COLOURS.neutral;
    return (LOWER_IS_BETTER ? e.score > 0 : e.score < 0) ? COLOURS.supports : COLOURS.opposes;
  }

  function width(e) {
    if (e.score === null || maxAbs <= 0) return 1;
    return 0.8 + 6.2 * Math.abs(e.score) / maxAbs;
  }

  function header() {
    var g = DATA.graph;
    var title = (g.task || "circuit") + " circuit \u2014 " + (g.method || "?") + " on " + (g.model || "?");
    document.getElementById("title").textContent = title;
    var chips = document.getElementById("attrs");
    Object.keys(g).forEach(function (k) {
      if (k === "task" || k === "model" || k === "method") return;
      var chip = document.createElement("span");
      chip.className = "chip";
      var b = document.createElement("b");
      b.textContent = k;
      chip.appendChild(b);
      chip.appendChild(document.createTextNode(fmt(g[k])));
      chips.appendChild(chip);
    });
  }

  function showTooltip(evt, heading, rows) {
    tooltip.textContent = "";
    var h = document.createElement("h2");
    h.textContent = heading;
    tooltip.appendChild(h);
    var table = document.createElement("table");
    rows.forEach(function (r) {
      var tr = document.createElement("tr");
      var a = document.createElement("td"), b = document.createElement("td");
      a.textContent = r[0];
      b.textContent = fmt(r[1]);
      tr.appendChild(a);
      tr.appendChild(b);
      table.appendChild(tr);
    });
    tooltip.appendChild(table);
    tooltip.hidden = false;
    moveTooltip(evt);
  }

  function moveTooltip(evt) {
    var x = evt.clientX + 14, y = evt.clientY + 14;
    var r = tooltip.getBoundingClientRect();
    if (x + r.width > window.innerWidth - 8) x = evt.clientX - r.width - 14;
    if (y + r.height > window.innerHeight - 8) y = evt.clientY - r.height - 14;
    tooltip.style.left = Math.max(4, x) + "px";
    tooltip.style.top = Math.max(4, y) + "px";
  }

  function hideTooltip() { tooltip.hidden = true; }

  function attrRows(obj) {
    return Object.keys(obj).map(function (k) { return [k, obj[k]]; });
  }

  function focus(ids) {
    if (!ids) { svg.classList.remove("focus"); }
    else { svg.classList.add("focus"); }
    svg.querySelectorAll(".hl").forEach(function (x) { x.classList.remove("hl"); });
    (ids || []).forEach(function (sel) {
      svg.querySelectorAll(sel).forEach(function (x) { x.classList.add("hl"); });
    });
  }

  function cssId(s) { return s.replace(/["\\]/g, "\\$&"); }

  function render() {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var only = circuitOnly.checked;
    var nodes = DATA.nodes.filter(function (n) { return !only || n.in_circuit; });
    var shown = {};
    nodes.forEach(function (n) { shown[n.id] = true; });
    var edges = DATA.edges.filter(function (e) {
      return shown[e.source] && shown[e.target] && (!only || e.in_circuit);
    });
    // layout: visible columns left to right, each column's nodes centred vertically
    var cols = {};
    nodes.forEach(function (n) { (cols[n.col] = cols[n.col] || []).push(n); });
    var colKeys = Object.keys(cols).map(Number).sort(function (a, b) { return a - b; });
    // columns as wide as the window allows, between MIN_COL_W and MAX_COL_W
    var avail = svg.getBoundingClientRect().width || 1200;
    COL_W = Math.max(MIN_COL_W, Math.min(MAX_COL_W, (avail - 2 * PAD_X) / Math.max(colKeys.length - 1, 1)));
    var tallest = colKeys.reduce(function (m, c) { return Math.max(m, cols[c].length); }, 1);
    var midY = PAD_TOP + (tallest - 1) * ROW_H / 2;
    var pos = {};
    colKeys.forEach(function (c, i) {
      var list = cols[c].sort(function (a, b) { return a.row - b.row; });
      list.forEach(function (n, j) {
        pos[n.id] = { x: PAD_X + i * COL_W, y: midY + (j - (list.length - 1) / 2) * ROW_H };
      });
      var x = PAD_X + i * COL_W;
      el("line", { x1: x, x2: x, y1: PAD_TOP - 22, y2: PAD_TOP + (tallest - 1) * ROW_H + NODE_H / 2 + 6,
        "class": "col-guide" }, svg);
      var label = el("text", { x: x, y: PAD_TOP - 34, "class": "col-label" }, svg);
      label.textContent = (DATA.columns && DATA.columns[c]) || ("column " + c);
    });
    // free horizontal lanes of each column (between, above and below its nodes) for edges that skip it
    var lanes = colKeys.map(function (c, i) {
      var ys = cols[c].map(function (n) { return pos[n.id].y; });
      var free = [ys[0] - ROW_H / 2, ys[ys.length - 1] + ROW_H / 2];
      for (var j = 1; j < ys.length; j++) free.push((ys[j - 1] + ys[j]) / 2);
      return { x: PAD_X + i * COL_W, free: free };
    });
    var colIndex = {};
    colKeys.forEach(function (c, i) { colIndex[c] = i; });
    nodes.forEach(function (n) { pos[n.id].ci = colIndex[n.col]; });
    var totalW = PAD_X * 2 + Math.max(colKeys.length - 1, 0) * COL_W;
    var totalH = PAD_TOP + (tallest - 1) * ROW_H + NODE_H / 2 + PAD_BOTTOM;
    baseView = { x: 0, y: 0, w: Math.max(totalW, 300), h: Math.max(totalH, 200) };
    if (!view) view = startView();
    setView();
    if (!nodes.length) {
      var empty = el("text", { x: 150, y: 100, id: "empty", "text-anchor": "middle" }, svg);
      empty.textContent = "nothing to show";
    }
    // feature circuits: a frame around each SAE site's visible nodes (one column per site)
    var boxes = {}, siteOrder = [];
    nodes.forEach(function (n) {
      if (!n.site) return;
      var p = pos[n.id], b = boxes[n.site];
      if (!b) { b = boxes[n.site] = { x: p.x, y0: p.y, y1: p.y, n: 0 }; siteOrder.push(n.site); }
      b.y0 = Math.min(b.y0, p.y); b.y1 = Math.max(b.y1, p.y); b.n += 1;
    });
    var groupLayer = el("g", { "class": "site-groups" }, svg);
    siteOrder.forEach(function (s) {
      var b = boxes[s];
      el("rect", { x: b.x - NODE_W / 2 - 8, y: b.y0 - NODE_H / 2 - 8, width: NODE_W + 16,
        height: b.y1 - b.y0 + NODE_H + 16, rx: 12, "class": "site-group", "data-site": s, "data-count": b.n },
        groupLayer);
    });
    var edgeLayer = el("g", { "class": "edges" }, svg);
    var nodeLayer = el("g", { "class": "nodes" }, svg);
    // strongest edges drawn last (on top)
    edges.sort(function (a, b) { return Math.abs(a.score || 0) - Math.abs(b.score || 0); });
    current = { edges: edges, pos: pos, lanes: lanes, layer: edgeLayer, raised: false };
    var t = parseFloat(slider.value) || 0;
    var passing = edges.filter(function (e) { return passes(e, t); }).length;
    if (passing > MAX_EDGES) {  // too many to draw quickly: start from the MAX_EDGES strongest
      slider.value = String(Math.abs(edges[edges.length - MAX_EDGES].score || 0));
      current.raised = true;
    }
    var receivesSplit = {};
    edges.forEach(function (e) { if (e.input) receivesSplit[e.target] = true; });
    nodes.forEach(function (n) {
      var p = pos[n.id];
      var g = el("g", { "class": "node " + (n.in_circuit ? "in" : "out"), "data-id": n.id,
        "data-kind": n.attrs.kind, transform: "translate(" + p.x + "," + p.y + ")" }, nodeLayer);
      if (n.site) g.setAttribute("data-site", n.site);
      el("rect", { x: -NODE_W / 2, y: -NODE_H / 2, width: NODE_W, height: NODE_H, rx: 9,
        fill: FILL[n.attrs.kind] || "#eee" }, g);
      var hasScore = typeof n.attrs.score === "number";
      var label = el("text", { x: 0, y: hasScore ? -7 : 0 }, g);
      label.textContent = n.label || n.id;
      if (hasScore) {
        var sc = el("text", { x: 0, y: 9, "class": "score" }, g);
        sc.textContent = fmt(n.attrs.score);
      }
      if (receivesSplit[n.id]) {
        ["q", "k", "v"].forEach(function (x) {
          var t = el("text", { x: -NODE_W / 2 + 4, y: PORT[x], "class": "port" }, g);
          t.textContent = x;
        });
      }
      g.addEventListener("mouseenter", function (evt) {
        showTooltip(evt, n.id, attrRows(n.attrs));
        var sel = ['.node[data-id="' + cssId(n.id) + '"]'];
        current.drawn.forEach(function (e) {
          if (e.source === n.id || e.target === n.id) {
            sel.push('.edge-group[data-id="' + cssId(e.id) + '"]');
            sel.push('.node[data-id="' + cssId(e.source === n.id ? e.target : e.source) + '"]');
          }
        });
        focus(sel);
      });
      g.addEventListener("mousemove", moveTooltip);
      g.addEventListener("mouseleave", function () { hideTooltip(); focus(null); });
    });
    drawEdges();
  }

  function drawEdge(e) {
    var d = route(e, current.pos, current.lanes);
    var g = el("g", { "class": "edge-group", "data-id": e.id, "data-source": e.source, "data-target": e.target,
      "data-score": e.score === null ? "" : e.score }, current.layer);
    el("path", { d: d, "class": "edge " + (e.in_circuit ? "in" : "out"), stroke: colour(e),
      "stroke-width": width(e).toFixed(2) }, g);
    var hit = el("path", { d: d, "class": "edge-hit", "stroke-width": Math.max(8, width(e) + 4) }, g);
    hit.addEventListener("mouseenter", function (evt) {
      var rows = [["sender", e.source], ["receiver", e.target]];
      if (e.input) rows.push(["input", e.input]);
      rows.push(["score", e.score === null ? "not scored" : e.score], ["in circuit", e.in_circuit]);
      var attrs = DATA.edge_attrs[e.source + "->" + e.target] || {};
      showTooltip(evt, e.id, rows.concat(attrRows(attrs).filter(function (r) {
        return r[0] !== "score" && r[0] !== "in_circuit";
      }).map(function (r) { return ["edge " + r[0], r[1]]; })));
      focus(['.edge-group[data-id="' + cssId(e.id) + '"]', '.node[data-id="' + cssId(e.source) + '"]',
        '.node[data-id="' + cssId(e.target) + '"]']);
    });
    hit.addEventListener("mousemove", moveTooltip);
    hit.addEventListener("mouseleave", function () { hideTooltip(); focus(null); });
  }

  function passes(e, t) { return e.score === null ? t <= 0 : Math.abs(e.score) >= t; }

  // Only edges at or above the threshold become SVG elements, so huge graphs stay responsive.
  function drawEdges() {
    var t = parseFloat(slider.value) || 0;
    sliderValue.textContent = fmt(t);
    while (current.layer.firstChild) current.layer.removeChild(current.layer.firstChild);
    current.drawn = current.edges.filter(function (e) { return passes(e, t); });
    current.drawn.forEach(drawEdge);
    var touched = {};
    current.drawn.forEach(function (e) { touched[e.source] = true; touched[e.target] = true; });
    var nodes = svg.querySelectorAll(".node");
    nodes.forEach(function (g) {
      g.classList.toggle("isolated", current.edges.length > 0 && !touched[g.getAttribute("data-id")]);
    });
    counts.textContent = nodes.length + " nodes, " + current.drawn.length + " of " + current.edges.length +
      " edges shown" + (current.raised ? " (min |score| raised to draw at most " + MAX_EDGES + ")" : "");
    current.raised = false;
    document.body.setAttribute("data-rendered-nodes", String(nodes.length));
    document.body.setAttribute("data-visible-edges", String(current.drawn.length));
  }

  var pending = false;
  function onSlider() {
    if (pending) return;
    pending = true;
    window.requestAnimationFrame(function () { pending = false; drawEdges(); });
  }

  // A smooth path from the sender's right side to the receiver's (q/k/v) port on its left side; an
  // edge that skips columns passes each skipped column through the free lane nearest its straight line.
  function route(e, pos, lanes) {
    var s = pos[e.source], t = pos[e.target];
    var pts = [{ x: s.x + NODE_W / 2, y: s.y }];
    var x2 = t.x - NODE_W / 2 - 2, y2 = t.y + (PORT[e.input] || 0);
    for (var i = s.ci + 1; i < t.ci; i++) {
      var lane = lanes[i];
      var want = s.y + (y2 - s.y) * (lane.x - s.x) / (t.x - s.x);
      var best = lane.free.reduce(function (b, y) { return Math.abs(y - want) < Math.abs(b - want) ? y : b; });
      pts.push({ x: lane.x - NODE_W / 2, y: best }, { x: lane.x + NODE_W / 2, y: best });
    }
    pts.push({ x: x2, y: y2 });
    var d = "M" + pts[0].x.toFixed(1) + "," + pts[0].y.toFixed(1);
    for (var k = 1; k < pts.length; k++) {
      var a = pts[k - 1], b = pts[k];
      if (a.y === b.y && k % 2 === 0) { d += " L" + b.x.toFixed(1) + "," + b.y.toFixed(1); continue; }
      var dx = Math.max(20, (b.x - a.x) / 2);
      d += " C" + (a.x + dx).toFixed(1) + "," + a.y.toFixed(1) + " " + (b.x - dx).toFixed(1) + "," +
        b.y.toFixed(1) + " " + b.x.toFixed(1) + "," + b.y.toFixed(1);
    }
    return d;
  }

  // The whole graph if it fits at a readable scale, else its left part at MIN_SCALE (drag to pan).
  function startView() {
    var r = svg.getBoundingClientRect();
    if (!r.width || !r.height) return Object.assign({}, baseView);
    var fit = Math.min(r.width / baseView.w, r.height / baseView.h);
    if (fit >= MIN_SCALE) return Object.assign({}, baseView);
    return { x: 0, y: 0, w: r.width / MIN_SCALE, h: r.height / MIN_SCALE };
  }

  function setView() {
    svg.setAttribute("viewBox", [view.x, view.y, view.w, view.h].join(" "));
    svg.setAttribute("preserveAspectRatio", "xMidYMin meet");
  }

  function svgPoint(evt) {
    var r = svg.getBoundingClientRect();
    var s = Math.max(view.w / r.width, view.h / r.height);
    var ox = view.x + (view.w - r.width * s) / 2, oy = view.y;  // preserveAspectRatio xMidYMin meet
    return { x: ox + (evt.clientX - r.left) * s, y: oy + (evt.clientY - r.top) * s, s: s };
  }

  svg.addEventListener("wheel", function (evt) {
    evt.preventDefault();
    var p = svgPoint(evt);
    var k = evt.deltaY < 0 ? 0.85 : 1 / 0.85;
    view = { x: p.x - (p.x - view.x) * k, y: p.y - (p.y - view.y) * k, w: view.w * k, h: view.h * k };
    setView();
  }, { passive: false });
  var drag = null;
  svg.addEventListener("mousedown", function (evt) {
    if (evt.button !== 0) return;
    drag = { x: evt.clientX, y: evt.clientY, view: Object.assign({}, view), s: svgPoint(evt).s };
    svg.classList.add("panning");
  });
  window.addEventListener("mousemove", function (evt) {
    if (!drag) return;
    view.x = drag.view.x - (evt.clientX - drag.x) * drag.s;
    view.y = drag.view.y - (evt.clientY - drag.y) * drag.s;
    setView();
  });
  window.addEventListener("mouseup", function () { drag = null; svg.classList.remove("panning"); });
  function resetView() { view = Object.assign({}, baseView); setView(); }  // fit everything
  svg.addEventListener("dblclick", resetView);
  document.getElementById("reset-view").addEventListener("click", resetView);

  slider.max = String(maxAbs > 0 ? maxAbs : 1);
  slider.step = "any";
  slider.disabled = maxAbs <= 0;
  slider.addEventListener("input", onSlider);
  circuitOnly.checked = hasCircuit && !/(^|[#&])all\b/.test(location.hash.slice(1));
  circuitOnly.disabled = !hasCircuit;
  circuitOnly.addEventListener("change", function () { view = null; render(); });
  header();
  render();

  document.body.setAttribute("data-ready", "true");
})();
