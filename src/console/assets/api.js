// The JSON API, as the console calls it: same origin, the session cookie, and the CSRF header
// on every change. Errors carry the API's stable code.

let csrf = "";

export function setCsrf(value) {
  csrf = value || "";
}

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function api(method, path, body) {
  const headers = {};
  if (method !== "GET" && method !== "HEAD") headers["X-Fwrepo-Csrf"] = csrf;
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (!r.ok) throw await failure(r.status, () => r.json());
  if (r.status === 204) return null;
  const type = r.headers.get("content-type") || "";
  return type.includes("json") ? r.json() : r.text();
}

/** The API's error from an answer's status and JSON body. */
export async function failure(status, json) {
  let e = {};
  try {
    e = (await json()).error || {};
  } catch {
    // not JSON
  }
  return new ApiError(status, e.code || `http-${status}`, e.message || `HTTP ${status}`);
}

/** The CSRF value for requests made outside api() (uploads with progress). */
export function csrfHeader() {
  return csrf;
}

const ORDER = { admin: ["admin", "publisher", "operator", "reader"], publisher: ["publisher", "reader"], operator: ["operator", "reader"], reader: ["reader"], gateway: [] };

/** Whether a holder of `have` may do what needs `need` (as the server's Role::covers). */
export function covers(have, need) {
  return (ORDER[have] || []).includes(need);
}
