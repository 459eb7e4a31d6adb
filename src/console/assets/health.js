// Health: the service's own counters (/metrics), sampled while the page is open, as small
// charts of downloads and bytes served per interval over the last minutes.

import { api } from "./api.js";
import { h, show, bytes } from "./dom.js";
import { line } from "./chart.js";

const DOWNLOAD_ROUTES = new Set(["/fw/{name}", "/p/{fotaId}", "/p/{fotaId}/{token}", "/v1/firmware/{name}/content"]);
const EVERY = 2000;
const SPAN = 5 * 60 * 1000;

/** The figures the page draws, from the Prometheus text exposition. */
export function figures(text) {
  const out = { downloads: 0, bytes: 0, firmware: 0, stored: 0, requests: 0, errors: 0 };
  for (const l of text.split("\n")) {
    if (!l || l.startsWith("#")) continue;
    const m = l.match(/^([a-z_]+)(\{(.*)\})? ([0-9.e+]+)$/);
    if (!m) continue;
    const [, name, , labels = "", value] = m;
    const v = Number(value);
    if (name === "fwrepo_bytes_served_total") out.bytes = v;
    else if (name === "fwrepo_firmware_count") out.firmware = v;
    else if (name === "fwrepo_firmware_bytes") out.stored = v;
    else if (name === "fwrepo_http_requests_total") {
      const route = (labels.match(/route="([^"]*)"/) || [])[1];
      const status = Number((labels.match(/status="([0-9]+)"/) || [])[1]);
      out.requests += v;
      if (status >= 500) out.errors += v;
      if (DOWNLOAD_ROUTES.has(route) && (status === 200 || status === 206)) out.downloads += v;
    }
  }
  return out;
}

let timer = null;

export async function page() {
  if (timer) clearInterval(timer);
  const samples = [];
  const tiles = h("div", { class: "figures", id: "health-figures" });
  const downloads = h("div", { id: "downloads-chart" });
  const served = h("div", { id: "bytes-chart" });
  const up = h("p", { id: "healthz" });
  show(h("h1", {}, "Health"), up, tiles, h("h2", {}, "HTTP downloads per interval"), downloads, h("h2", {}, "Bytes served per interval (all transports)"), served);
  const here = location.hash;
  async function sample() {
    if (location.hash !== here) return clearInterval(timer);
    const [health, text] = await Promise.all([api("GET", "/healthz"), api("GET", "/metrics")]);
    const f = figures(text);
    samples.push([Date.now(), f]);
    while (samples.length && samples[0][0] < Date.now() - SPAN) samples.shift();
    up.replaceChildren(health.status === "ok" ? h("span", { class: "ok" }, "Service is up") : h("span", { class: "error" }, "Service reports a problem"));
    const tile = (label, value, id) => h("div", { class: "figure", id }, h("strong", {}, value), label);
    tiles.replaceChildren(
      tile("firmware images", String(f.firmware), "fig-firmware"),
      tile("stored", bytes(f.stored), "fig-stored"),
      tile("downloads since start", String(f.downloads), "fig-downloads"),
      tile("bytes served since start", bytes(f.bytes), "fig-bytes"),
      tile("server errors", String(f.errors), "fig-errors"),
    );
    const deltas = (key) => samples.slice(1).map(([t, s], i) => [t, Math.max(0, s[key] - samples[i][1][key])]);
    downloads.replaceChildren(line(deltas("downloads"), { span: SPAN, label: "downloads" }));
    served.replaceChildren(line(deltas("bytes"), { span: SPAN, label: "bytes", colour: "#1a7f37" }));
  }
  await sample();
  timer = setInterval(() => sample().catch(() => {}), EVERY);
}
