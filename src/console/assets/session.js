// Who is using the console: {open, signedIn, name, role, csrf}, loaded from /ui/session.

import { covers } from "./api.js";

export const session = { open: false, signedIn: false, name: "", role: "" };

/** Whether the session's role may do what needs `need` (the server checks again). */
export function may(need) {
  return covers(session.role, need);
}
