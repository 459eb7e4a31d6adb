// Small SVG charts drawn node by node (presentation attributes, no inline styles, so the
// Content-Security-Policy holds): a stacked bar of counts and a line chart of a series.

const NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children.flat(Infinity)) if (c) el.append(c);
  return el;
}

/** Colours per task status, as the badges. */
export const COLOURS = {
  waiting: "#c3cbd3",
  pending: "#98a4b0",
  delivering: "#6aa7e8",
  downloading: "#3d8bd9",
  downloaded: "#1f6fbf",
  updating: "#0b5cad",
  succeeded: "#1a7f37",
  failed: "#b42318",
  cancelled: "#7a2e0e",
};

/**
 * One horizontal bar per row: `rows` is [[label, {status: count}]]. Each segment carries
 * data-status and data-count, and a title for those who hover.
 */
export function stackedBars(rows, order, { width = 1000, bar = 24, label = 90 } = {}) {
  const height = rows.length * (bar + 10) + 4;
  const total = Math.max(1, ...rows.map(([, c]) => order.reduce((s, k) => s + (c[k] || 0), 0)));
  const scale = (width - label - 50) / total;
  const g = rows.map(([name, counts], i) => {
    const y = 2 + i * (bar + 10);
    let x = label;
    const segments = order
      .filter((k) => counts[k])
      .map((k) => {
        const w = Math.max(1, counts[k] * scale);
        const r = svg("rect", { x, y, width: w, height: bar, fill: COLOURS[k] || "#888", "data-status": k, "data-count": counts[k] }, svg("title", {}, `${name}, ${k}: ${counts[k]}`));
        x += w;
        return r;
      });
    const sum = order.reduce((s, k) => s + (counts[k] || 0), 0);
    const text = (tx, anchor, content) => {
      const t = svg("text", { x: tx, y: y + bar * 0.7, "text-anchor": anchor, "font-size": 13, fill: "#1b1f24" });
      t.textContent = content;
      return t;
    };
    return svg("g", { "data-row": name }, text(label - 6, "end", name), segments, text(x + 6, "start", String(sum)));
  });
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img", "aria-label": "Counts per status" }, g);
}

/** A line chart of `points` ([t, value]) over the last `span` ms. */
export function line(points, { width = 1000, height = 150, span = 300000, colour = "#0b5cad", label = "" } = {}) {
  const now = Date.now();
  const max = Math.max(1, ...points.map(([, v]) => v));
  const x = (t) => ((t - (now - span)) / span) * (width - 40) + 40;
  const y = (v) => height - 18 - (v / max) * (height - 30);
  const d = points.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const top = svg("text", { x: 0, y: 12, "font-size": 11, fill: "#5c6670" });
  top.textContent = label ? `${label}, peak ${Math.round(max)}` : String(Math.round(max));
  const axis = svg("text", { x: 40, y: height - 2, "font-size": 11, fill: "#5c6670" });
  axis.textContent = `last ${Math.round(span / 60000)} min`;
  return svg(
    "svg",
    { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img", "aria-label": label },
    svg("line", { x1: 40, y1: height - 18, x2: width, y2: height - 18, stroke: "#d7dde3" }),
    points.length ? svg("path", { d, fill: "none", stroke: colour, "stroke-width": 2 }) : null,
    top,
    axis,
  );
}
