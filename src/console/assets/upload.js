// Upload from a file picker. The browser streams the file from disk (XMLHttpRequest with the
// File as body), so a large image never sits in the page's memory; upload progress drives
// the bar.

import { csrfHeader, failure } from "./api.js";
import { h, show, alert, bytes } from "./dom.js";

const MCUBOOT = [
  ["headerSize", "Header size", "0x200"],
  ["padHeader", "Pad header (true/false)", "true"],
  ["align", "Alignment", "4"],
  ["slotSize", "Slot size", ""],
  ["pad", "Pad to slot (true/false)", ""],
  ["confirm", "Confirm (true/false)", ""],
  ["securityCounter", "Security counter (auto or a number)", ""],
  ["hash", "Hash (sha256, sha512, pure)", ""],
];

function field(id, label, attrs = {}) {
  const input = h("input", { id, name: id, ...attrs });
  return [h("label", { for: id }, label, input), input];
}

export function page() {
  const file = h("input", { id: "file", name: "file", type: "file", required: true });
  const [nameLabel, name] = field("name", "Name (global identifier)", { required: true, placeholder: "acme.com-7f3a9c", pattern: "[A-Za-z0-9._~\\-]+" });
  const [versionLabel, version] = field("version", "Version", { placeholder: "1.2.3" });
  const [descLabel, description] = field("description", "Description");
  const [retLabel, retention] = field("retention", "Retention (empty: forever)", { placeholder: "30d" });
  const format = h("select", { id: "format", name: "format" }, h("option", { value: "raw" }, "raw (stored as sent)"), h("option", { value: "mcuboot" }, "mcuboot (built and signed here)"));
  const options = MCUBOOT.map(([id, label, placeholder]) => field(id, label, { placeholder }));
  const mcuboot = h("fieldset", { id: "mcuboot", hidden: true }, h("legend", {}, "MCUboot options"), options.map(([l]) => l));
  format.addEventListener("change", () => (mcuboot.hidden = format.value !== "mcuboot"));
  const bar = h("progress", { id: "progress", max: 100, value: 0, hidden: true, "aria-label": "Upload progress" });
  const status = h("div", { id: "upload-status", "aria-live": "polite" });
  const submit = h("button", { type: "submit" }, "Upload");
  file.addEventListener("change", () => {
    if (file.files[0] && !name.value) name.value = file.files[0].name.replace(/[^A-Za-z0-9._~-]/g, "-");
  });
  const form = h(
    "form",
    { class: "stack", id: "upload" },
    h("label", { for: "file" }, "Image file", file),
    nameLabel,
    versionLabel,
    descLabel,
    retLabel,
    h("label", { for: "format" }, "Format", format),
    mcuboot,
    h("div", {}, submit),
    bar,
    status,
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = file.files[0];
    if (!f) return;
    const q = new URLSearchParams();
    for (const [k, el] of [["version", version], ["description", description], ["retention", retention]]) {
      if (el.value) q.set(k, el.value);
    }
    if (format.value === "mcuboot") {
      q.set("format", "mcuboot");
      MCUBOOT.forEach(([id], i) => {
        if (options[i][1].value) q.set(id, options[i][1].value);
      });
    }
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", `/v1/firmware/${encodeURIComponent(name.value)}?${q}`);
    xhr.setRequestHeader("X-Fwrepo-Csrf", csrfHeader());
    xhr.setRequestHeader("Content-Type", f.type || "application/octet-stream");
    bar.hidden = false;
    bar.value = 0;
    submit.disabled = true;
    status.replaceChildren(`Uploading ${bytes(f.size)}…`);
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) {
        bar.value = Math.round((e.loaded / e.total) * 100);
        status.replaceChildren(`Uploading: ${bytes(e.loaded)} of ${bytes(e.total)}`);
      }
    });
    xhr.addEventListener("load", async () => {
      submit.disabled = false;
      if (xhr.status === 201 || xhr.status === 200) {
        bar.value = 100;
        const r = JSON.parse(xhr.responseText);
        location.hash = `#/firmware/${encodeURIComponent(r.name)}`;
      } else {
        const e = await failure(xhr.status, async () => JSON.parse(xhr.responseText));
        status.replaceChildren(alert(`${e.code}: ${e.message}`));
      }
    });
    xhr.addEventListener("error", () => {
      submit.disabled = false;
      status.replaceChildren(alert("The upload broke off (network error)."));
    });
    xhr.send(f);
  });
  show(h("h1", {}, "Upload firmware"), form);
}
