// Updates (FOTA tasks): the list filtered by status and device, live from the event stream,
// with a progress bar per download; scheduling with every option of the seed payload; a
// task's page with its history as a timeline, and cancel.

import { api } from "./api.js";
import { h, show, bytes, when, alert } from "./dom.js";
import { may } from "./session.js";
import { follow } from "./events.js";

const PAGE = 100;
const POLL_AT_ONCE = 10;
const STATUSES = ["pending", "delivering", "downloading", "downloaded", "updating", "succeeded", "failed", "cancelled"];
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

/** A task's download progress: bytes served against the image's size. */
function progressBar(t) {
  const size = t.progress && t.progress.size;
  const served = (t.progress && t.progress.bytesServed) || 0;
  const bar = h("progress", { max: size || 1, value: Math.min(served, size || 0), "aria-label": `Download progress of ${t.fotaId}` });
  const text = h("span", { class: "muted" }, size ? `${bytes(served)} of ${bytes(size)}` : "");
  return { el: h("div", { class: "progress" }, bar, text), bar, text };
}

function statusBadge(status, reason) {
  return h("span", { class: `badge s-${status}`, "data-status": status }, reason ? `${status} (${reason})` : status);
}

/** Follows tasks on the page: status from the event stream, bytes by asking while they download. */
class Live {
  constructor() {
    this.rows = new Map();
    this.stop = follow({}, (ev) => this.event(ev));
    this.timer = setInterval(() => this.poll(), 1000);
  }

  add(t, cells) {
    this.rows.set(t.fotaId, { task: t, ...cells });
  }

  event(ev) {
    const row = this.rows.get(ev.fotaId);
    if (!row) return;
    row.task.status = ev.status;
    row.task.reason = ev.reason;
    row.status.replaceChildren(statusBadge(ev.status, ev.reason));
    if (ev.bytesServed !== undefined) this.bytes(row, ev.bytesServed);
    if (row.cancel) row.cancel.hidden = FINAL.has(ev.status);
  }

  bytes(row, served) {
    const size = row.task.progress.size;
    row.progress.bar.value = Math.min(served, size || 0);
    row.progress.text.textContent = size ? `${bytes(served)} of ${bytes(size)}` : "";
  }

  async poll() {
    if (!document.getElementById("tasks")) return this.close();
    // At most a few tasks a tick, in turn, so a page of busy tasks costs the server little.
    const busy = [...this.rows].filter(([, row]) => !FINAL.has(row.task.status) && row.task.status !== "pending");
    this.turn = (this.turn || 0) % Math.max(1, busy.length);
    const now = busy.slice(this.turn, this.turn + POLL_AT_ONCE);
    this.turn += POLL_AT_ONCE;
    for (const [id, row] of now) {
      try {
        const t = await api("GET", `/v1/fota/${encodeURIComponent(id)}`);
        row.task = t;
        row.status.replaceChildren(statusBadge(t.status, t.reason));
        this.bytes(row, t.progress.bytesServed);
      } catch {
        // the next tick asks again
      }
    }
  }

  close() {
    clearInterval(this.timer);
    this.stop();
  }
}

let live = null;

export async function list() {
  if (live) live.close();
  unwatch();
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const status = h(
    "select",
    { id: "status-filter" },
    h("option", { value: "" }, "any"),
    STATUSES.map((s) => h("option", { value: s, selected: params.get("status") === s }, s)),
  );
  const device = h("input", { id: "device-filter", type: "search", value: params.get("deviceId") || "", autocomplete: "off" });
  const body = h("tbody");
  const more = h("button", { type: "button", class: "secondary", id: "more", hidden: true }, "Next page");
  const info = h("div", { "aria-live": "polite" });
  live = new Live();
  let cursor = null;

  async function load(reset) {
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (status.value) q.set("status", status.value);
    if (device.value) q.set("deviceId", device.value);
    if (!reset && cursor) q.set("cursor", cursor);
    try {
      const page = await api("GET", `/v1/fota?${q}`);
      if (reset) {
        body.replaceChildren();
        live.rows.clear();
      }
      for (const t of page.tasks) {
        const cells = { status: h("td", {}, statusBadge(t.status, t.reason)), progress: progressBar(t) };
        if (may("operator") && !FINAL.has(t.status)) cells.cancel = cancelButton(t.fotaId, () => {});
        body.append(
          h(
            "tr",
            { "data-fota-id": t.fotaId },
            h("td", {}, h("a", { href: `#/updates/${encodeURIComponent(t.fotaId)}` }, t.fotaId)),
            h("td", {}, t.deviceId),
            h("td", {}, h("a", { href: `#/firmware/${encodeURIComponent(t.name)}` }, t.name)),
            cells.status,
            h("td", {}, cells.progress.el),
            h("td", {}, when(t.createdAt)),
            h("td", {}, cells.cancel || ""),
          ),
        );
        live.add(t, cells);
      }
      cursor = page.next || null;
      more.hidden = !cursor;
      info.replaceChildren(body.children.length ? "" : h("p", { class: "muted" }, "No tasks match."));
    } catch (e) {
      info.replaceChildren(alert(`${e.code}: ${e.message}`));
    }
  }

  const apply = () => load(true);
  status.addEventListener("change", apply);
  let timer;
  device.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(apply, 250);
  });
  more.addEventListener("click", () => load(false));
  show(
    h("h1", {}, "Updates"),
    h(
      "div",
      { class: "toolbar" },
      h("label", { for: "status-filter" }, "Status", status),
      h("label", { for: "device-filter" }, "Device", device),
      may("operator") ? h("a", { href: "#/updates/new", id: "schedule-link" }, "Schedule an update") : null,
    ),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "tasks" },
        h("thead", {}, h("tr", {}, ["Task", "Device", "Firmware", "Status", "Download", "Created", ""].map((t) => h("th", { scope: "col" }, t)))),
        body,
      ),
    ),
    info,
    more,
  );
  await load(true);
}

function cancelButton(fotaId, done) {
  const b = h("button", { type: "button", class: "danger", "data-cancel": fotaId, "aria-label": `Cancel ${fotaId}` }, "Cancel");
  b.addEventListener("click", async () => {
    if (!window.confirm(`Cancel task ${fotaId}?`)) return;
    b.disabled = true;
    try {
      await api("POST", `/v1/fota/${encodeURIComponent(fotaId)}/cancel`);
      b.hidden = true;
      await done();
    } catch (e) {
      b.disabled = false;
      b.replaceWith(alert(`${e.code}: ${e.message}`));
    }
  });
  return b;
}

// Every option of the seed's schedule payload, with the defaults the API applies.
const CHOICES = {
  protocolType: ["COAP", "COAPS", "COAP_TCP", "COAPS_TCP", "HTTP", "HTTPS"],
  imageDeliveryMethod: ["pull", "push"],
  upgradeStrategy: ["WithoutObservations", "ObservationTrigger", "ObservationBased", "SendBased"],
};
const FLAGS = [
  ["useQuota", "Count against the quota"],
  ["useCachedData", "Use cached data (succeed at once if the device already runs it)"],
  ["resumeAfterDownlinkFailure", "Resume after a downlink failure"],
  ["issueDeviceToken", "Issue a device token"],
];

export async function schedule() {
  if (live) live.close();
  unwatch();
  const input = (id, attrs = {}) => h("input", { id, name: id, ...attrs });
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const device = input("deviceId", { required: true, placeholder: "urn:dev:os:0001", autocomplete: "off", value: params.get("deviceId") || "" });
  const name = input("fw-name", { required: true, placeholder: "acme.com-7f3a9c", autocomplete: "off" });
  const url = input("firmwareUrl", { type: "url", placeholder: "https://… (imported when the name is not stored)" });
  const timeout = input("timeout", { placeholder: "1200s" });
  const retention = input("retentionPeriod", { placeholder: "none" });
  const description = input("task-description");
  const scheduleName = input("schedule", { placeholder: "always", list: "schedule-names" });
  const names = h("datalist", { id: "schedule-names" });
  const selects = Object.fromEntries(
    Object.entries(CHOICES).map(([id, values]) => [id, h("select", { id, name: id }, values.map((v) => h("option", { value: v }, v)))]),
  );
  const flags = Object.fromEntries(FLAGS.map(([id]) => [id, input(id, { type: "checkbox" })]));
  const status = h("div", { "aria-live": "polite", id: "schedule-status" });
  const form = h(
    "form",
    { class: "stack", id: "schedule-form" },
    h("label", { for: "deviceId" }, "Device id", device),
    h("label", { for: "fw-name" }, "Firmware name", name),
    h("label", { for: "firmwareUrl" }, "Firmware URL", url),
    h("label", { for: "protocolType" }, "Protocol", selects.protocolType),
    h("label", { for: "imageDeliveryMethod" }, "Delivery method", selects.imageDeliveryMethod),
    h("label", { for: "upgradeStrategy" }, "Upgrade strategy", selects.upgradeStrategy),
    h("label", { for: "timeout" }, "Timeout", timeout),
    h("label", { for: "schedule" }, "Schedule (maintenance windows)", scheduleName, names),
    h("label", { for: "retentionPeriod" }, "Retention of an imported image", retention),
    h("label", { for: "task-description" }, "Description", description),
    h("fieldset", {}, h("legend", {}, "Options"), FLAGS.map(([id, label]) => h("label", { class: "inline", for: id }, flags[id], label))),
    h("div", {}, h("button", { type: "submit" }, "Schedule")),
    status,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { name: name.value };
    for (const [k, el] of [["firmwareUrl", url], ["timeout", timeout], ["retentionPeriod", retention], ["description", description], ["schedule", scheduleName]]) {
      if (el.value) body[k] = el.value;
    }
    for (const [k, el] of Object.entries(selects)) body[k] = el.value;
    for (const [k, el] of Object.entries(flags)) body[k] = el.checked;
    try {
      const t = await api("POST", `/v1/devices/${encodeURIComponent(device.value)}/fota`, body);
      const parts = [h("p", { class: "ok" }, "Scheduled ", h("a", { href: `#/updates/${encodeURIComponent(t.fotaId)}` }, t.fotaId), ".")];
      if (t.deviceToken) parts.push(h("p", {}, "Device token (shown once): ", h("span", { class: "mono", id: "device-token" }, t.deviceToken)));
      status.replaceChildren(...parts);
      if (!t.deviceToken) location.hash = `#/updates/${encodeURIComponent(t.fotaId)}`;
    } catch (e) {
      status.replaceChildren(alert(`${e.code}: ${e.message}`));
    }
  });
  show(h("h1", {}, "Schedule an update"), form);
  try {
    const s = await api("GET", "/v1/schedules");
    for (const item of s.schedules || s.items || []) names.append(h("option", { value: item.name }));
  } catch {
    // the field still takes any name
  }
}

/** What follows the task page: its event stream and its tick. */
let watching = null;

function unwatch() {
  if (watching) {
    watching.stop();
    clearInterval(watching.tick);
    watching = null;
  }
}

export async function task(fotaId) {
  if (live) live.close();
  unwatch();
  const path = `/v1/fota/${encodeURIComponent(fotaId)}`;
  let t = await api("GET", path);
  let progress = draw(t);
  if (FINAL.has(t.status)) return;
  // Redrawn on the task's transitions; the tick shows the bytes served and catches a
  // transition made while the stream was connecting.
  const here = location.hash;
  const redraw = async () => {
    if (location.hash !== here) return unwatch();
    t = await api("GET", path);
    progress = draw(t);
    if (FINAL.has(t.status)) unwatch();
  };
  watching = {
    stop: follow({ fotaId: t.fotaId }, () => redraw().catch(() => {})),
    tick: setInterval(async () => {
      if (location.hash !== here) return unwatch();
      try {
        const now = await api("GET", path);
        if (now.history.length !== t.history.length) return redraw();
        progress.bar.value = Math.min(now.progress.bytesServed, now.progress.size || 0);
        progress.text.textContent = now.progress.size ? `${bytes(now.progress.bytesServed)} of ${bytes(now.progress.size)}` : "";
      } catch {
        // asked again next tick
      }
    }, 1000),
  };
}

/** Draws a task's page; returns its progress bar. */
function draw(t) {
  const progress = progressBar(t);
  const facts = [
    ["Device", h("a", { href: `#/updates?deviceId=${encodeURIComponent(t.deviceId)}` }, t.deviceId)],
    ["Firmware", h("a", { href: `#/firmware/${encodeURIComponent(t.name)}` }, t.name)],
    ["Status", h("span", { id: "task-status" }, statusBadge(t.status, t.reason))],
    ["Download", progress.el],
    ["Package URI", h("span", { class: "mono" }, t.packageUri)],
    ["LwM2M state / result", `${t.state} / ${t.updateResult}`],
    ["Created", when(t.createdAt)],
    ["Started", when(t.startedAt) || "—"],
    ["Deadline", when(t.deadline) || "—"],
    ["Finished", when(t.finishedAt) || "—"],
    ["Note", t.note || "—"],
  ];
  const timeline = h(
    "ol",
    { class: "timeline", id: "history" },
    t.history.map((e) =>
      h("li", {}, h("time", { datetime: e.at }, when(e.at)), " ", statusBadge(e.status, e.reason), e.detail ? h("div", { class: "muted" }, e.detail) : null),
    ),
  );
  const parts = [
    h("h1", {}, `Task ${t.fotaId}`),
    h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("h2", {}, "History"),
    timeline,
    h("h2", {}, "Options"),
    h("dl", { class: "facts" }, Object.entries(t.options || {}).map(([k, v]) => [h("dt", {}, k), h("dd", { class: "mono" }, JSON.stringify(v))])),
  ];
  if (may("operator") && !FINAL.has(t.status)) parts.push(h("div", { class: "row" }, cancelButton(t.fotaId, () => task(t.fotaId))));
  show(...parts);
  return progress;
}
