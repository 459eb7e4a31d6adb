// Campaigns: the list, a wizard that builds the request step by step, and a dashboard whose
// chart moves with the event stream (counts per status and per wave, the threshold figures,
// and the actions the campaign's state and the role allow).

import { api } from "./api.js";
import { h, show, when, alert } from "./dom.js";
import { may } from "./session.js";
import { pagedTable, query } from "./table.js";
import { follow } from "./events.js";
import { stackedBars } from "./chart.js";

const ORDER = ["succeeded", "updating", "downloaded", "downloading", "delivering", "pending", "waiting", "failed", "cancelled"];

function stateBadge(state) {
  return h("span", { class: `badge c-${state}`, "data-state": state }, state);
}

export async function list() {
  const table = pagedTable(
    "campaigns",
    ["Campaign", "Firmware", "State", "Created"],
    async (cursor) => {
      const page = await api("GET", `/v1/campaigns?${query({ cursor, limit: 100 })}`);
      return { items: page.campaigns, next: page.next };
    },
    (c) => [h("a", { href: `#/campaigns/${c.campaignId}` }, c.name || c.campaignId), c.firmware, stateBadge(c.state), when(c.createdAt)],
  );
  show(h("h1", {}, "Campaigns"), may("operator") ? h("p", {}, h("a", { href: "#/campaigns/new", id: "new-campaign" }, "New campaign")) : null, table.el);
  await table.reload();
}

// The wizard: four steps, each a fieldset; Back and Next move between them, the last creates.
export function wizard() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const input = (id, attrs = {}) => h("input", { id, name: id, ...attrs });
  const f = {
    name: input("c-name", { placeholder: "Spring rollout" }),
    firmware: input("c-firmware", { required: true, placeholder: "acme.com-7f3a9c" }),
    targetKind: h("select", { id: "c-target-kind" }, ["group", "filter", "devices"].map((k) => h("option", { value: k }, k))),
    target: input("c-target", { required: true, value: params.get("group") || "", placeholder: "group name, a filter, or device ids" }),
    waves: input("c-waves", { value: "10%, 50%, 100%", placeholder: "10%, 50%, 100% or 5, 100%" }),
    pause: input("c-pause", { type: "checkbox" }),
    share: input("c-share", { type: "number", min: 0, max: 1, step: "0.01", placeholder: "0.1" }),
    minFinished: input("c-min-finished", { type: "number", min: 0, placeholder: "20" }),
    rate: input("c-rate", { type: "number", min: 1, placeholder: "devices per minute" }),
    protocol: h("select", { id: "c-protocol" }, ["COAP", "COAPS", "COAP_TCP", "COAPS_TCP", "HTTP", "HTTPS"].map((p) => h("option", { value: p }, p))),
    timeout: input("c-timeout", { placeholder: "1200s" }),
    schedule: input("c-schedule", { placeholder: "always" }),
    approval: input("c-approval", { type: "checkbox" }),
    late: input("c-late", { type: "checkbox" }),
  };
  const row = (id, label, el) => h("label", { for: id }, label, el);
  const check = (id, label, el) => h("label", { class: "inline", for: id }, el, label);
  const steps = [
    h("fieldset", { "data-step": 1 }, h("legend", {}, "1. What and whom"), row("c-name", "Name", f.name), row("c-firmware", "Firmware name", f.firmware), row("c-target-kind", "Target", f.targetKind), row("c-target", "Group, filter or device ids", f.target)),
    h("fieldset", { "data-step": 2 }, h("legend", {}, "2. Waves"), row("c-waves", "Wave sizes (percent or count, the last takes the rest)", f.waves), check("c-pause", "Pause for a person after each wave but the last", f.pause), row("c-rate", "Rate limit", f.rate)),
    h("fieldset", { "data-step": 3 }, h("legend", {}, "3. Safety and delivery"), row("c-share", "Abort when this share fails", f.share), row("c-min-finished", "…once this many finished", f.minFinished), row("c-protocol", "Protocol", f.protocol), row("c-timeout", "Timeout per device", f.timeout), row("c-schedule", "Schedule", f.schedule), check("c-approval", "Require an admin's approval", f.approval), check("c-late", "Include devices that join the target later", f.late)),
  ];
  const review = h("pre", { class: "mono", id: "c-review" });
  steps.push(h("fieldset", { "data-step": 4 }, h("legend", {}, "4. Review"), review));
  const status = h("div", { "aria-live": "polite" });
  const back = h("button", { type: "button", class: "secondary", id: "c-back" }, "Back");
  const next = h("button", { type: "button", id: "c-next" }, "Next");
  const create = h("button", { type: "submit", id: "c-create" }, "Create campaign");
  let at = 0;

  function request() {
    const body = { firmware: f.firmware.value, options: { protocolType: f.protocol.value } };
    if (f.name.value) body.name = f.name.value;
    const kind = f.targetKind.value;
    body.target = kind === "devices" ? { devices: f.target.value.split(/[\s,]+/).filter(Boolean) } : { [kind]: f.target.value };
    body.waves = f.waves.value
      .split(",")
      .map((w) => w.trim())
      .filter(Boolean)
      .map((w) => (w.endsWith("%") ? { percent: Number(w.slice(0, -1)) } : { count: Number(w) }))
      // A pause after the last wave would hold a finished campaign: every wave but the last.
      .map((w, i, all) => (f.pause.checked && i < all.length - 1 ? { ...w, pause: true } : w));
    if (f.share.value) body.errorThreshold = { share: Number(f.share.value), ...(f.minFinished.value ? { minFinished: Number(f.minFinished.value) } : {}) };
    if (f.rate.value) body.rate = Number(f.rate.value);
    if (f.timeout.value) body.options.timeout = f.timeout.value;
    if (f.schedule.value) body.options.schedule = f.schedule.value;
    if (f.approval.checked) body.requireApproval = true;
    if (f.late.checked) body.includeLateJoiners = true;
    return body;
  }

  function go(i) {
    at = i;
    steps.forEach((s, j) => (s.hidden = j !== i));
    back.hidden = i === 0;
    next.hidden = i === steps.length - 1;
    create.hidden = i !== steps.length - 1;
    if (i === steps.length - 1) review.textContent = JSON.stringify(request(), null, 2);
    const first = steps[i].querySelector("input, select");
    if (first) first.focus();
  }
  back.addEventListener("click", () => go(at - 1));
  next.addEventListener("click", () => {
    const invalid = [...steps[at].querySelectorAll("input, select")].find((el) => !el.checkValidity());
    if (invalid) return invalid.reportValidity();
    go(at + 1);
  });
  const form = h("form", { class: "stack", id: "campaign-form", novalidate: true }, steps, h("div", { class: "row" }, back, next, create), status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const c = await api("POST", "/v1/campaigns", request());
      location.hash = `#/campaigns/${c.campaignId}`;
    } catch (e) {
      status.replaceChildren(alert(`${e.code}: ${e.message}`));
    }
  });
  show(h("h1", {}, "New campaign"), form);
  go(0);
}

// What each state allows, and who may do it.
const ACTIONS = [
  ["approve", "Approve", "admin", ["draft"]],
  ["start", "Start", "operator", ["draft", "approved"]],
  ["pause", "Pause", "operator", ["running"]],
  ["resume", "Resume", "operator", ["paused"]],
  ["stop", "Stop", "operator", ["draft", "approved", "running", "paused"]],
  ["retry-failed", "Retry failed", "operator", ["running", "paused", "finished"]],
];

let stopFollowing = null;

export async function dashboard(id) {
  if (stopFollowing) stopFollowing();
  const here = location.hash;
  const chart = h("div", { id: "campaign-chart" });
  const facts = h("dl", { class: "facts", id: "campaign-facts" });
  const actions = h("div", { class: "row", id: "campaign-actions" });
  const waves = h("div", { id: "campaign-waves" });
  const title = h("h1", {});
  const status = h("div", { "aria-live": "polite" });
  const legend = h("ul", { class: "legend" }, ORDER.map((k) => h("li", { "data-legend": k }, h("span", { class: `swatch sw-${k}` }), k)));
  show(title, facts, h("h2", {}, "Devices per status"), chart, legend, h("h2", {}, "Waves"), waves, actions, status);

  let pending = null;
  async function draw() {
    const c = await api("GET", `/v1/campaigns/${id}`);
    title.replaceChildren(`Campaign ${c.name || c.campaignId} `, stateBadge(c.state));
    const d = c.decision;
    const entries = [
      ["Firmware", h("a", { href: `#/firmware/${encodeURIComponent(c.firmware)}` }, c.firmware)],
      ["State", c.reason ? `${c.state} (${c.reason})` : c.state],
      ["Devices", String(c.devices)],
      ["Wave", `${c.currentWave} of ${c.waves.length}`],
      ["Error threshold", c.errorThreshold ? `${Math.round(c.errorThreshold.share * 100)}% failed, after ${c.errorThreshold.minFinished ?? 0} finished` : "none"],
      ["Failed so far", d ? `${d.failed} of ${d.finished} finished (${(d.failedShare * 100).toFixed(1)}%)` : "—"],
      ["Failure reasons", Object.entries(c.failureReasons || {}).map(([k, v]) => `${k}: ${v}`).join(", ") || "none"],
    ];
    facts.replaceChildren(...entries.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    chart.replaceChildren(stackedBars([["all", c.counts]], ORDER));
    waves.replaceChildren(stackedBars(c.waves.map((w) => [`wave ${w.wave}`, w.counts]), ORDER));
    actions.replaceChildren(
      ...ACTIONS.filter(([, , role, states]) => may(role) && states.includes(c.state)).map(([verb, label]) => {
        const b = h("button", { type: "button", class: verb === "stop" ? "danger" : "", "data-action": verb }, label);
        b.addEventListener("click", async () => {
          if (verb === "stop" && !window.confirm("Stop this campaign? Devices not yet started will not be.")) return;
          try {
            await api("POST", `/v1/campaigns/${id}/${verb}`);
            await draw();
          } catch (e) {
            status.replaceChildren(alert(`${e.code}: ${e.message}`));
          }
        });
        return b;
      }),
    );
  }
  // Many events can arrive together: redraw at most every 300 ms.
  const soon = () => {
    if (location.hash !== here) return stopFollowing && stopFollowing();
    if (pending) return;
    pending = setTimeout(async () => {
      pending = null;
      try {
        await draw();
      } catch {
        // the next event or tick draws again
      }
    }, 300);
  };
  const stop = follow({ campaignId: id }, soon, soon);
  // The stream reports transitions; a tick catches what happened while it connected.
  const tick = setInterval(soon, 5000);
  stopFollowing = () => {
    stop();
    clearInterval(tick);
    stopFollowing = null;
  };
  await draw();
}
