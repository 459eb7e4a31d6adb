// Maintenance schedules as a weekly grid in their time zone; operators define their own.

import { api } from "./api.js";
import { h, show, alert } from "./dom.js";
import { may } from "./session.js";

const DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

const minutes = (hhmm) => Number(hhmm.slice(0, 2)) * 60 + Number(hhmm.slice(3, 5));

/** Which hours of the week a schedule's windows open (a window past midnight runs on; no
 * windows at all is always open). */
function openHours(windows) {
  const open = new Set();
  if (!windows.length) for (let i = 0; i < 7 * 24; i++) open.add(i);
  for (const w of windows) {
    const start = minutes(w.start);
    let end = minutes(w.end);
    if (end <= start) end += 24 * 60;
    for (const day of w.days) {
      const base = DAYS.indexOf(day) * 24 * 60;
      for (let m = start; m < end; m += 60) open.add(Math.floor(((base + m) % (7 * 24 * 60)) / 60));
    }
  }
  return open;
}

function grid(s) {
  const open = openHours(s.windows);
  const hours = [...Array(24).keys()];
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "week", "data-schedule": s.name, "aria-label": `${s.name}: open hours per day, ${s.timeZone}` },
      h("thead", {}, h("tr", {}, h("th", {}, ""), hours.map((hr) => h("th", { scope: "col" }, hr % 3 === 0 ? String(hr) : "")))),
      h(
        "tbody",
        {},
        DAYS.map((d, i) =>
          h(
            "tr",
            {},
            h("th", { scope: "row" }, d),
            hours.map((hr) => {
              const on = open.has(i * 24 + hr);
              return h("td", { class: on ? "open" : "", title: `${d} ${hr}:00 ${on ? "open" : "closed"}` });
            }),
          ),
        ),
      ),
    ),
  );
}

export async function page() {
  const { schedules } = await api("GET", "/v1/schedules");
  const parts = [h("h1", {}, "Schedules")];
  for (const s of schedules) {
    parts.push(
      h("h2", {}, s.name, " ", h("span", { class: "muted" }, `(${s.timeZone}${s.builtIn ? ", built in" : ""})`)),
      grid(s),
      h("p", { class: "muted mono" }, s.windows.map((w) => `${w.days.join(",")} ${w.start}-${w.end}`).join("; ") || "always open"),
    );
  }
  if (may("operator")) parts.push(form());
  show(...parts);
}

function form() {
  const name = h("input", { id: "s-name", required: true, pattern: "[A-Za-z0-9._\\-]{1,64}" });
  const zone = h("input", { id: "s-zone", value: Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC" });
  const windows = h("textarea", { id: "s-windows", rows: 4, placeholder: "mon,tue,wed,thu,fri 22:00-06:00\nsat,sun 00:00-24:00" });
  const status = h("div", { "aria-live": "polite" });
  const f = h(
    "form",
    { class: "stack", id: "schedule-editor" },
    h("h2", {}, "Define a schedule"),
    h("label", { for: "s-name" }, "Name", name),
    h("label", { for: "s-zone" }, "Time zone (IANA)", zone),
    h("label", { for: "s-windows" }, "Windows, one per line: days start-end", windows),
    h("div", {}, h("button", { type: "submit" }, "Save")),
    status,
  );
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const parsed = windows.value
      .split("\n")
      .map((l) => l.trim())
      .filter(Boolean)
      .map((l) => {
        const [days, span] = l.split(/\s+/);
        const [start, end] = (span || "").split("-");
        return { days: days.split(","), start, end };
      });
    try {
      await api("PUT", `/v1/schedules/${encodeURIComponent(name.value)}`, { timeZone: zone.value, windows: parsed });
      await page();
    } catch (e) {
      status.replaceChildren(alert(`${e.code}: ${e.message}`));
    }
  });
  return f;
}
