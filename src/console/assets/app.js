// The console's shell: who is signed in, the navigation (only what the role may do), and the
// router over location.hash. Pages live in their own modules.

import { api, setCsrf } from "./api.js";
import { session, may } from "./session.js";
import { show, h, alert } from "./dom.js";
import * as firmware from "./firmware.js";
import * as upload from "./upload.js";
import * as updates from "./updates.js";
import * as tokens from "./tokens.js";
import * as fleet from "./fleet.js";
import * as campaigns from "./campaigns.js";
import * as schedules from "./schedules.js";
import * as health from "./health.js";
import * as signin from "./signin.js";

async function loadSession() {
  const s = await api("GET", "/ui/session");
  Object.assign(session, s);
  setCsrf(s.csrf);
  const who = document.getElementById("who");
  who.textContent = s.open ? "open mode (loopback, no tokens)" : s.signedIn ? `${s.name} (${s.role})` : "";
  document.getElementById("signout").hidden = !s.signedIn;
  for (const el of document.querySelectorAll("[data-needs]")) {
    el.hidden = !(s.open || s.signedIn) || !may(el.dataset.needs);
  }
}

const routes = [
  [/^#\/signin$/, () => signin.page(afterSignIn)],
  [/^#\/firmware\/([^/]+)$/, (m) => firmware.detail(decodeURIComponent(m[1]))],
  [/^#\/firmware$/, () => firmware.list()],
  [/^#\/upload$/, () => upload.page()],
  [/^#\/updates\/new(\?.*)?$/, () => updates.schedule()],
  [/^#\/updates\/([^/?]+)$/, (m) => updates.task(decodeURIComponent(m[1]))],
  [/^#\/updates(\?.*)?$/, () => updates.list()],
  [/^#\/tokens$/, () => tokens.page()],
  [/^#\/devices\/([^/?]+)$/, (m) => fleet.device(decodeURIComponent(m[1]))],
  [/^#\/devices$/, () => fleet.devices()],
  [/^#\/groups\/([^/?]+)$/, (m) => fleet.group(decodeURIComponent(m[1]))],
  [/^#\/groups$/, () => fleet.groups()],
  [/^#\/campaigns\/new(\?.*)?$/, () => campaigns.wizard()],
  [/^#\/campaigns\/([0-9a-f]{32})$/, (m) => campaigns.dashboard(m[1])],
  [/^#\/campaigns$/, () => campaigns.list()],
  [/^#\/schedules$/, () => schedules.page()],
  [/^#\/health$/, () => health.page()],
];

async function afterSignIn() {
  await loadSession();
  location.hash = "#/firmware";
}

async function render() {
  const hash = location.hash || "#/firmware";
  if (!session.open && !session.signedIn && hash !== "#/signin") {
    location.hash = "#/signin";
    return;
  }
  for (const a of document.querySelectorAll("#nav a")) {
    if (hash === a.getAttribute("href") || hash.startsWith(`${a.getAttribute("href")}/`) || hash.startsWith(`${a.getAttribute("href")}?`)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  for (const [re, page] of routes) {
    const m = hash.match(re);
    if (m) {
      try {
        await page(m);
      } catch (e) {
        if (e.status === 401) {
          await loadSession();
          location.hash = "#/signin";
          return;
        }
        show(h("h1", {}, "Something went wrong"), alert(`${e.code || "error"}: ${e.message}`));
      }
      return;
    }
  }
  show(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/firmware" }, "Back to the firmware")));
}

document.getElementById("signout").addEventListener("click", async () => {
  await api("DELETE", "/ui/session");
  await loadSession();
  location.hash = "#/signin";
});

window.addEventListener("hashchange", render);
await loadSession();
await render();
