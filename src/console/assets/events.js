// The service's event stream (server-sent events, the session cookie goes along): task and
// campaign transitions as they happen. EventSource reconnects by itself after a break.

/** Calls `onTask` with every task event matching `filter`; returns a function that stops. */
export function follow(filter, onTask, onCampaign) {
  const q = new URLSearchParams(filter);
  const source = new EventSource(`/v1/events?${q}`);
  source.addEventListener("task", (e) => onTask(JSON.parse(e.data)));
  if (onCampaign) source.addEventListener("campaign", (e) => onCampaign(JSON.parse(e.data)));
  return () => source.close();
}
