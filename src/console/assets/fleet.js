// Devices (with their reported firmware and task history) and groups.

import { api } from "./api.js";
import { h, show, when, alert } from "./dom.js";
import { may } from "./session.js";
import { pagedTable, query } from "./table.js";

const PAGE = 100;

function taskLink(t) {
  return t ? h("a", { href: `#/updates/${encodeURIComponent(t.fotaId)}` }, h("span", { class: `badge s-${t.status}`, "data-status": t.status }, t.status)) : "—";
}

export async function devices() {
  const filter = h("input", { id: "device-query", type: "search", placeholder: "tag.site == \"berlin\"", autocomplete: "off" });
  const status = h("div", { "aria-live": "polite" });
  const table = pagedTable(
    "devices",
    ["Device", "Firmware", "Tags", "Last seen", "Current task"],
    async (cursor) => {
      const page = await api("GET", `/v1/devices?${query({ filter: filter.value, cursor, limit: PAGE })}`);
      return { items: page.devices, next: page.next };
    },
    (d) => [
      h("a", { href: `#/devices/${encodeURIComponent(d.deviceId)}` }, d.deviceId),
      d.firmware.pkgVersion || d.firmware.firmwareVersion || "—",
      Object.entries(d.tags).map(([k, v]) => `${k}=${v}`).join(", "),
      when(d.lastSeen) || "never",
      taskLink(d.currentTask),
    ],
  );
  const form = h("form", { class: "toolbar", id: "device-filter-form" }, h("label", { for: "device-query" }, "Filter", filter), h("button", { type: "submit", class: "secondary" }, "Apply"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    table.reload();
  });
  show(h("h1", {}, "Devices"), form, status, table.el);
  await table.reload();
}

function labels(obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return h("span", { class: "muted" }, "none");
  return h("dl", { class: "facts" }, entries.map(([k, v]) => [h("dt", {}, k), h("dd", { class: "mono" }, v)]));
}

// A device's tasks, newest first, each linked to its page.
function taskTable(tasks) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { id: "device-tasks" },
      h("thead", {}, h("tr", {}, ["Task", "Firmware", "Status", "Created", "Finished"].map((c) => h("th", { scope: "col" }, c)))),
      h(
        "tbody",
        {},
        tasks.map((t) =>
          h(
            "tr",
            {},
            h("td", {}, h("a", { href: `#/updates/${encodeURIComponent(t.fotaId)}`, class: "mono" }, t.fotaId)),
            h("td", {}, t.name || ""),
            h("td", {}, t.reason ? `${t.status} (${t.reason})` : t.status),
            h("td", {}, when(t.createdAt)),
            h("td", {}, when(t.finishedAt) || "—"),
          ),
        ),
      ),
    ),
  );
}

export async function device(id) {
  const d = await api("GET", `/v1/devices/${encodeURIComponent(id)}`);
  const fw = d.firmware || {};
  const tasks = d.tasks || [];
  const parts = [
    h("h1", {}, d.deviceId),
    h(
      "dl",
      { class: "facts", id: "device-facts" },
      [
        ["Package", `${fw.pkgName || "—"} ${fw.pkgVersion || ""}`],
        ["Firmware version", fw.firmwareVersion || "—"],
        ["Protocols", (fw.protocols || []).join(", ") || "—"],
        ["Reported", when(fw.reportedAt) || "never"],
        ["Last seen", when(d.lastSeen) || "never"],
        ["Registered", when(d.createdAt)],
        ["Current task", taskLink(d.currentTask)],
        ["DTLS PSK identity", d.psk ? d.psk.identity : "—"],
      ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    ),
    h("h2", {}, "Tags"),
    labels(d.tags),
    h("h2", {}, "Attributes"),
    labels(d.attributes),
    h("h2", {}, "Tasks"),
    tasks.length ? taskTable(tasks) : h("p", { class: "muted", id: "device-no-tasks" }, "No updates for this device yet."),
  ];
  if (may("operator")) parts.push(h("p", {}, h("a", { href: `#/updates/new?deviceId=${encodeURIComponent(d.deviceId)}` }, "Schedule an update for this device")));
  show(...parts);
}

export async function groups() {
  const { groups } = await api("GET", "/v1/groups");
  const parts = [
    h("h1", {}, "Groups"),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "groups" },
        h("thead", {}, h("tr", {}, ["Group", "Members", "Description", "Updated"].map((c) => h("th", { scope: "col" }, c)))),
        h(
          "tbody",
          {},
          groups.map((g) =>
            h(
              "tr",
              {},
              h("td", {}, h("a", { href: `#/groups/${encodeURIComponent(g.name)}` }, g.name)),
              h("td", {}, g.filter ? h("span", { class: "mono" }, g.filter) : `${(g.devices || []).length} listed`),
              h("td", {}, g.description || ""),
              h("td", {}, when(g.updatedAt)),
            ),
          ),
        ),
      ),
    ),
  ];
  if (!groups.length) parts.push(h("p", { class: "muted" }, "No groups yet."));
  if (may("operator")) parts.push(groupForm());
  show(...parts);
}

function groupForm() {
  const name = h("input", { id: "group-name", required: true, pattern: "[A-Za-z0-9._\\-]{1,64}" });
  const filter = h("input", { id: "group-filter", placeholder: "tag.site == \"berlin\"" });
  const list = h("textarea", { id: "group-devices", rows: 3, placeholder: "dev-1 dev-2 (instead of a filter)" });
  const description = h("input", { id: "group-description" });
  const status = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "stack", id: "group-form" },
    h("h2", {}, "Create or replace a group"),
    h("label", { for: "group-name" }, "Name", name),
    h("label", { for: "group-filter" }, "Filter", filter),
    h("label", { for: "group-devices" }, "Or device ids", list),
    h("label", { for: "group-description" }, "Description", description),
    h("div", {}, h("button", { type: "submit" }, "Save")),
    status,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { description: description.value || null };
    if (filter.value) body.filter = filter.value;
    else body.devices = list.value.split(/[\s,]+/).filter(Boolean);
    try {
      await api("PUT", `/v1/groups/${encodeURIComponent(name.value)}`, body);
      location.hash = `#/groups/${encodeURIComponent(name.value)}`;
    } catch (e) {
      status.replaceChildren(alert(`${e.code}: ${e.message}`));
    }
  });
  return form;
}

export async function group(name) {
  const g = await api("GET", `/v1/groups/${encodeURIComponent(name)}`);
  const table = pagedTable(
    "group-devices",
    ["Device"],
    async (cursor) => {
      const page = await api("GET", `/v1/groups/${encodeURIComponent(name)}/devices?${query({ cursor, limit: PAGE })}`);
      return { items: page.devices, next: page.next };
    },
    (id) => [h("a", { href: `#/devices/${encodeURIComponent(id)}` }, id)],
  );
  const parts = [
    h("h1", {}, `Group ${g.name}`),
    h("p", {}, g.filter ? ["Filter: ", h("span", { class: "mono" }, g.filter)] : `${(g.devices || []).length} devices listed`),
    g.description ? h("p", { class: "muted" }, g.description) : null,
    h("h2", {}, "Members"),
    table.el,
  ];
  if (may("operator")) {
    const del = h("button", { type: "button", class: "danger", id: "delete-group" }, "Delete group");
    del.addEventListener("click", async () => {
      if (!window.confirm(`Delete group ${g.name}? Its devices stay.`)) return;
      await api("DELETE", `/v1/groups/${encodeURIComponent(g.name)}`);
      location.hash = "#/groups";
    });
    parts.push(h("p", {}, h("a", { href: `#/campaigns/new?group=${encodeURIComponent(g.name)}` }, "Start a campaign for this group")), del);
  }
  show(...parts);
  await table.reload();
}
