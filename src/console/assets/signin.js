// Sign in with an access token: the server checks it and sets an HttpOnly session cookie;
// the token itself is not kept by the page.

import { api } from "./api.js";
import { h, show, alert } from "./dom.js";

export function page(done) {
  const status = h("div", { "aria-live": "polite" });
  const token = h("input", { id: "token", name: "token", type: "password", autocomplete: "off", required: true });
  const form = h(
    "form",
    { class: "stack", id: "signin" },
    h("label", { for: "token" }, "Access token", token),
    h("div", {}, h("button", { type: "submit" }, "Sign in")),
    status,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    status.replaceChildren();
    try {
      await api("POST", "/ui/session", { token: token.value });
      token.value = "";
      await done();
    } catch (e) {
      status.replaceChildren(alert(e.code === "invalid-token" ? "That token is not valid." : `${e.code}: ${e.message}`));
    }
  });
  show(h("h1", {}, "Sign in"), h("p", { class: "muted" }, "Use a token from `fwrepo token create`."), form);
  token.focus();
}
