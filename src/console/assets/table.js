// A table filled a page at a time from the API's cursor (never everything at once), with a
// "Next page" button while there is more.

import { h, alert } from "./dom.js";

/**
 * `columns`: header texts; `fetchPage(cursor)`: resolves to {items, next}; `row(item)`: the
 * cells of one item. Returns {el, reload}.
 */
export function pagedTable(id, columns, fetchPage, row) {
  const body = h("tbody");
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "Next page");
  const info = h("div", { "aria-live": "polite" });
  let cursor = null;
  let seq = 0;
  async function load(reset) {
    const mine = ++seq;
    try {
      const page = await fetchPage(reset ? null : cursor);
      if (mine !== seq) return;
      if (reset) body.replaceChildren();
      for (const item of page.items) body.append(h("tr", {}, row(item).map((c) => h("td", {}, c))));
      cursor = page.next || null;
      more.hidden = !cursor;
      info.replaceChildren(body.children.length ? "" : h("p", { class: "muted" }, "Nothing here yet."));
    } catch (e) {
      info.replaceChildren(alert(`${e.code}: ${e.message}`));
    }
  }
  more.addEventListener("click", () => load(false));
  const el = h(
    "div",
    {},
    h("div", { class: "table-wrap" }, h("table", { id }, h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))), body)),
    info,
    more,
  );
  return { el, reload: () => load(true) };
}

/** A page's query string, for cursors and filters. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
  return q.toString();
}
