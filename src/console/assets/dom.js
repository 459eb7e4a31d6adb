// Building the DOM node by node, never from markup: text is always text, so nothing the API returns can
// become markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** Replaces the page's content and moves focus to it (for keyboard and screen readers). Skips what
 * `h` skips (a part left out as null, false or undefined), which replaceChildren would print. */
export function show(...children) {
  const main = document.getElementById("main");
  main.replaceChildren(...children.flat(Infinity).filter((c) => c !== undefined && c !== null && c !== false));
  main.focus({ preventScroll: true });
  window.scrollTo(0, 0);
}

export function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u += 1;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(1)} ${units[u]}`;
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

export function alert(message) {
  return h("p", { class: "error", role: "alert" }, message);
}
