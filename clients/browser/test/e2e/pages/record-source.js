// What the deploy and outage tests watch of one EventSource (the browser's own in the page,
// the npm package's in node): opens, errors, real streams opened, events and resets.

/** Starts recording `source`; returns the record the tests read. */
export function recordSource(source) {
  const record = { source, opens: 0, errors: 0, subscribed: 0, events: [], resets: [] };
  source.onopen = () => { record.opens += 1; };
  source.onerror = () => { record.errors += 1; };
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    record.events.push({ channel: event.channel, epoch: event.epoch, seq: event.seq, data: event.data });
  };
  source.addEventListener("reset", (message) => record.resets.push(JSON.parse(message.data)));
  // The opening of a real stream (a "retry later" answer has none).
  source.addEventListener("subscribed", () => { record.subscribed += 1; });
  return record;
}

/** The records as plain data. */
export function summarize(records) {
  return records.map(({ source, opens, errors, subscribed, events, resets }) => ({
    readyState: source.readyState, opens, errors, subscribed, events, resets,
  }));
}
