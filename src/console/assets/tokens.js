// Access tokens, for admins: the list (never the secrets), create (the token is shown once),
// revoke.

import { api } from "./api.js";
import { h, show, when, alert } from "./dom.js";

const ROLES = ["reader", "publisher", "operator", "admin", "gateway"];

export async function page() {
  const { tokens } = await api("GET", "/v1/tokens");
  const status = h("div", { "aria-live": "polite", id: "token-status" });
  const rows = tokens.map((t) => {
    const revoke = h("button", { type: "button", class: "danger", "aria-label": `Revoke ${t.name}` }, "Revoke");
    revoke.addEventListener("click", async () => {
      if (!window.confirm(`Revoke ${t.name}? Whatever uses it stops working at once.`)) return;
      try {
        await api("DELETE", `/v1/tokens/${encodeURIComponent(t.id)}`);
        await page();
      } catch (e) {
        status.replaceChildren(alert(`${e.code}: ${e.message}`));
      }
    });
    return h("tr", {}, h("td", {}, t.name), h("td", {}, t.role), h("td", { class: "mono" }, t.id), h("td", {}, when(t.createdAt)), h("td", {}, revoke));
  });
  const name = h("input", { id: "token-name", required: true, pattern: "[A-Za-z0-9._@\\-]{1,64}", autocomplete: "off" });
  const role = h("select", { id: "token-role" }, ROLES.map((r) => h("option", { value: r }, r)));
  const form = h(
    "form",
    { class: "stack", id: "token-form" },
    h("h2", {}, "Create a token"),
    h("label", { for: "token-name" }, "Name", name),
    h("label", { for: "token-role" }, "Role", role),
    h("div", {}, h("button", { type: "submit" }, "Create")),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const t = await api("POST", "/v1/tokens", { name: name.value, role: role.value });
      await page();
      document.getElementById("token-status").replaceChildren(
        h("p", { class: "ok" }, `Token ${t.name} (${t.role}), shown this once: `, h("span", { class: "mono", id: "new-token" }, t.token)),
      );
    } catch (e) {
      status.replaceChildren(alert(`${e.code}: ${e.message}`));
    }
  });
  show(
    h("h1", {}, "Access tokens"),
    h(
      "div",
      { class: "table-wrap" },
      h("table", { id: "tokens" }, h("thead", {}, h("tr", {}, ["Name", "Role", "Id", "Created", ""].map((c) => h("th", { scope: "col" }, c)))), h("tbody", {}, rows)),
    ),
    status,
    form,
  );
}
