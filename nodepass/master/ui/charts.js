// Rates drawn as SVG by this page's own code.  Each chart also says what it drew in
// data-* attributes (points, last values, the scale), for people's tools and for tests.

import { rate } from "./format.js";

const NS = "http://www.w3.org/2000/svg";

function element(name, attributes = {}) {
  const node = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  return node;
}

function clear(svg) {
  for (const child of [...svg.childNodes]) {
    if (child.nodeName !== "title") child.remove();
  }
}

function path(points, x, y) {
  return points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`)
    .join("");
}

// A scale whose top is a round number above ``max``.
function niceTop(max) {
  if (max <= 0) return 1024;
  const step = 10 ** Math.floor(Math.log10(max));
  for (const m of [1, 2, 5, 10]) {
    if (m * step >= max) return m * step;
  }
  return 10 * step;
}

// ``series``: [{t: ms, in: bytes/s, out: bytes/s}], oldest first.
export function drawRates(svg, series, { window = 3600e3, now = Date.now() } = {}) {
  // drawn in the chart's own pixels, so that its text keeps its size on any screen
  const width = Math.max(200, Math.round(svg.clientWidth || 600));
  const height = Math.max(80, Math.round(svg.clientHeight || 160));
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const left = 64;
  const bottom = height - 18;
  const recent = series.filter((p) => p.t >= now - window);
  const max = niceTop(Math.max(0, ...recent.map((p) => Math.max(p.in, p.out))));
  const x = (t) => left + ((t - (now - window)) / window) * (width - left - 4);
  const y = (v) => bottom - (v / max) * (bottom - 16);
  clear(svg);
  svg.append(element("line", { x1: left, y1: bottom, x2: width - 4, y2: bottom,
                                class: "axis" }));
  for (const fraction of [0.5, 1]) {
    svg.append(element("line", { x1: left, y1: y(max * fraction), x2: width - 4,
                                  y2: y(max * fraction), class: "grid" }));
    const label = element("text", { x: left - 6, y: y(max * fraction) + 4, class: "label",
                                     "text-anchor": "end" });
    label.textContent = rate(max * fraction);
    svg.append(label);
  }
  const minutes = window / 60e3;
  for (const [ago, anchor] of [[minutes, "start"], [minutes / 2, "middle"], [0, "end"]]) {
    const label = element("text", { x: x(now - ago * 60e3), y: height - 4, class: "label",
                                     "text-anchor": anchor });
    label.textContent = ago ? `−${ago >= 1 ? Math.round(ago) : ago.toFixed(1)} min` : "now";
    svg.append(label);
  }
  for (const side of ["in", "out"]) {
    const points = recent.map((p) => ({ t: p.t, v: p[side] }));
    if (points.length) {
      svg.append(element("path", { d: path(points, x, y), class: `line line-${side}` }));
    }
  }
  const last = recent[recent.length - 1] || { in: 0, out: 0 };
  svg.dataset.points = String(recent.length);
  svg.dataset.lastIn = String(Math.round(last.in));
  svg.dataset.lastOut = String(Math.round(last.out));
  svg.dataset.peak = String(Math.round(Math.max(0, ...recent.map((p) => p.in + p.out))));
  svg.dataset.scale = String(max);
}

// A row's small chart: in + out over its last ``count`` points.
export function sparkline(svg, series, count = 60) {
  const recent = series.slice(-count);
  const values = recent.map((p) => p.in + p.out);
  const max = Math.max(1, ...values);
  clear(svg);
  if (values.length > 1) {
    const x = (i) => (i / (values.length - 1)) * 78 + 1;
    const y = (v) => 19 - (v / max) * 17;
    svg.append(element("path", {
      d: values.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(""),
      class: "spark",
    }));
  }
  svg.dataset.last = String(Math.round(values[values.length - 1] || 0));
}

export function newSparkline() {
  return element("svg", { viewBox: "0 0 80 20", width: 80, height: 20, class: "sparkline",
                          "aria-hidden": "true" });
}
