// Firmware: the list (search by prefix, paged by the API's cursor, never all loaded), and a
// record's page (digest, signature, URIs with copy buttons, MCUboot details, retention and
// description changes, delete).

import { api } from "./api.js";
import { h, show, bytes, when, alert } from "./dom.js";
import { may } from "./session.js";

const PAGE = 50;

export async function list() {
  const prefix = h("input", { id: "prefix", type: "search", placeholder: "acme.com-", autocomplete: "off" });
  const body = h("tbody");
  const more = h("button", { type: "button", class: "secondary", id: "more", hidden: true }, "Next page");
  const status = h("div", { "aria-live": "polite" });
  let cursor = null;
  let seq = 0;

  async function load(reset) {
    const mine = ++seq;
    const q = new URLSearchParams({ prefix: prefix.value, limit: String(PAGE) });
    if (!reset && cursor) q.set("cursor", cursor);
    try {
      const page = await api("GET", `/v1/firmware?${q}`);
      if (mine !== seq) return;
      if (reset) body.replaceChildren();
      for (const r of page.items) {
        body.append(
          h(
            "tr",
            {},
            h("td", {}, h("a", { href: `#/firmware/${encodeURIComponent(r.name)}` }, r.name)),
            h("td", {}, r.version || ""),
            h("td", {}, bytes(r.size)),
            h("td", {}, when(r.createdAt)),
            h("td", {}, r.expiresAt ? when(r.expiresAt) : "never"),
          ),
        );
      }
      cursor = page.nextCursor || null;
      more.hidden = !cursor;
      status.replaceChildren(body.children.length ? "" : h("p", { class: "muted" }, "No firmware matches."));
    } catch (e) {
      status.replaceChildren(alert(`${e.code}: ${e.message}`));
    }
  }

  let timer;
  prefix.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => load(true), 200);
  });
  more.addEventListener("click", () => load(false));
  show(
    h("h1", {}, "Firmware"),
    h(
      "div",
      { class: "toolbar" },
      h("label", { for: "prefix" }, "Name prefix", prefix),
      may("publisher") ? h("a", { href: "#/upload" }, "Upload firmware") : null,
    ),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { id: "firmware" },
        h("thead", {}, h("tr", {}, ["Name", "Version", "Size", "Created", "Expires"].map((t) => h("th", { scope: "col" }, t)))),
        body,
      ),
    ),
    status,
    more,
  );
  await load(true);
}

function copyButton(text, label) {
  const b = h("button", { type: "button", class: "secondary", "aria-label": label }, "Copy");
  b.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      b.textContent = "Copied";
    } catch {
      b.textContent = "Copy failed";
    }
    setTimeout(() => (b.textContent = "Copy"), 1500);
  });
  return b;
}

export async function detail(name) {
  const r = await api("GET", `/v1/firmware/${encodeURIComponent(name)}`);
  const facts = [
    ["Size", `${bytes(r.size)} (${r.size} bytes)`],
    ["Version", r.version || "—"],
    ["Description", r.description || "—"],
    ["SHA-256", h("span", { class: "mono", id: "sha256" }, r.sha256)],
    ["SHA-1", h("span", { class: "mono" }, r.sha1 || "—")],
    ["MD5", h("span", { class: "mono" }, r.md5 || "—")],
    ["Signature", h("span", { class: "mono", id: "signature" }, r.signature.value)],
    ["Key id", h("span", { class: "mono" }, r.signature.keyId)],
    ["Created", when(r.createdAt)],
    ["Retention", r.retention || "forever"],
    ["Expires", r.expiresAt ? when(r.expiresAt) : "never"],
    ["Format", r.format],
  ];
  const uris = Object.entries(r.uris).map(([scheme, uri]) =>
    h("li", { class: "row" }, h("span", { class: "mono" }, uri), copyButton(uri, `Copy the ${scheme} URI`)),
  );
  const parts = [
    h("h1", {}, r.name),
    h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("h2", {}, "Download URIs"),
    h("ul", { id: "uris" }, uris),
  ];
  if (r.mcuboot) {
    parts.push(
      h("h2", {}, "MCUboot"),
      h("dl", { class: "facts" }, Object.entries(r.mcuboot).map(([k, v]) => [h("dt", {}, k), h("dd", { class: "mono" }, String(v))])),
    );
  }
  if (may("publisher")) parts.push(changeForm(r));
  if (may("admin")) parts.push(deleteForm(r));
  show(...parts);
}

function changeForm(r) {
  const retention = h("input", { id: "retention", value: r.retention || "", placeholder: "30d (empty: forever)" });
  const description = h("input", { id: "description", value: r.description || "" });
  const status = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "stack", id: "change" },
    h("h2", {}, "Change"),
    h("label", { for: "retention" }, "Retention", retention),
    h("label", { for: "description" }, "Description", description),
    h("div", {}, h("button", { type: "submit" }, "Save")),
    status,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("PATCH", `/v1/firmware/${encodeURIComponent(r.name)}`, {
        retention: retention.value || null,
        description: description.value || null,
      });
      await detail(r.name);
    } catch (e) {
      status.replaceChildren(alert(`${e.code}: ${e.message}`));
    }
  });
  return form;
}

function deleteForm(r) {
  const status = h("div", { "aria-live": "polite" });
  const button = h("button", { type: "button", class: "danger", id: "delete" }, "Delete");
  button.addEventListener("click", async () => {
    if (!window.confirm(`Delete ${r.name}? Devices can no longer download it, and the name stays taken until it is gone.`)) return;
    try {
      await api("DELETE", `/v1/firmware/${encodeURIComponent(r.name)}`);
      location.hash = "#/firmware";
    } catch (e) {
      status.replaceChildren(alert(`${e.code}: ${e.message}`));
    }
  });
  return h("div", {}, h("h2", {}, "Delete"), button, status);
}
