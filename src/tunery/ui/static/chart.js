// A small line chart on <canvas>: several series of {x, y} points, auto-scaled axes, a legend.
// No library: the dashboard has no build step and no third-party downloads.
export const COLORS = ["#2457c5", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a"];

export class LineChart {
  constructor(canvas, { xLabel = "step", yLabel = "", yRange = null } = {}) {
    this.canvas = canvas;
    this.yRange = yRange; // fixed [lo, hi] (accuracy) instead of the data's extent
    this.xLabel = xLabel; this.yLabel = yLabel;
    this.series = new Map(); // name -> [{x, y}]
    this.observer = new ResizeObserver(() => this.draw());
    this.observer.observe(canvas);
  }

  add(name, x, y) {
    if (y === null || y === undefined || !Number.isFinite(y)) return;
    if (!this.series.has(name)) this.series.set(name, []);
    const pts = this.series.get(name);
    const at = pts.findIndex((p) => p.x === x);
    if (at >= 0) pts[at] = { x, y }; else pts.push({ x, y });
    pts.sort((a, b) => a.x - b.x);
    this.scheduleDraw();
  }

  get points() { let n = 0; for (const s of this.series.values()) n += s.length; return n; }

  scheduleDraw() {
    if (this.pending) return;
    this.pending = requestAnimationFrame(() => { this.pending = null; this.draw(); });
  }

  draw() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    if (!w || !h) return;
    c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const all = [...this.series.values()].flat();
    c.dataset.points = String(all.length);
    const summary = [...this.series.entries()]
      .map(([name, pts]) => pts.length ? `${name}: ${pts.length} points, last ${fmt(pts.at(-1).y)}` : "")
      .filter(Boolean).join("; ");
    c.setAttribute("aria-label", `${this.yLabel} by ${this.xLabel}. ${summary || "No data yet."}`);
    g.font = "12px system-ui, sans-serif";
    g.fillStyle = "#5d6370";
    if (!all.length) { g.fillText("Waiting for the first logged step…", 16, h / 2); return; }
    const pad = { l: 52, r: 12, t: 10, b: 30 };
    let [x0, x1] = extent(all.map((p) => p.x));
    let [y0, y1] = this.yRange || extent(all.map((p) => p.y));
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
    const sx = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
    const sy = (y) => h - pad.b - ((y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
    g.strokeStyle = "#e3e5ea"; g.lineWidth = 1;
    for (const t of ticks(y0, y1, 5)) {
      g.beginPath(); g.moveTo(pad.l, sy(t)); g.lineTo(w - pad.r, sy(t)); g.stroke();
      g.fillText(fmt(t), 4, sy(t) + 4);
    }
    for (const t of ticks(x0, x1, 6)) g.fillText(fmt(t), sx(t) - 8, h - pad.b + 16);
    g.fillText(this.xLabel, w - pad.r - 30, h - 2);
    let i = 0;
    for (const pts of this.series.values()) {
      g.strokeStyle = COLORS[i % COLORS.length]; g.fillStyle = g.strokeStyle; g.lineWidth = 2;
      g.beginPath();
      pts.forEach((p, k) => (k ? g.lineTo(sx(p.x), sy(p.y)) : g.moveTo(sx(p.x), sy(p.y))));
      g.stroke();
      if (pts.length < 40) for (const p of pts) { g.beginPath(); g.arc(sx(p.x), sy(p.y), 2.5, 0, 7); g.fill(); }
      i++;
    }
  }

  legend() {
    return [...this.series.keys()].map((name, i) => ({ name, color: COLORS[i % COLORS.length] }));
  }
}

function extent(values) { return [Math.min(...values), Math.max(...values)]; }

function ticks(lo, hi, n) {
  const step = niceStep((hi - lo) / n);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
  return out;
}

function niceStep(raw) {
  const p = 10 ** Math.floor(Math.log10(raw || 1));
  const f = raw / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
}

export function fmt(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 1 ? v.toFixed(3) : a >= 0.001 ? v.toFixed(4) : v.toExponential(2);
}
