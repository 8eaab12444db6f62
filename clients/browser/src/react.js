// React adapter for the resync browser client: `useChannel` follows a channel while the
// component is mounted, and stops everything (socket, timers, reconnects) when it unmounts.
//
//   const { events, state, lastReset } = useChannel("http://127.0.0.1:8080", "news");

import { useEffect, useRef, useState } from "react";
import { ResyncClient } from "./resync.js";

/**
 * Follows `channel` with its own client while mounted.
 * @param {string} url the server's base URL
 * @param {string} channel
 * @param {{ transport?: "auto" | "websocket" | "sse" | "long-polling", keep?: number, clientOptions?: object }} [options]
 *   `keep`: how many recent events to keep in state (default 100)
 * @returns {{ events: any[], state: any, lastReset: any, client: ResyncClient | null }}
 */
export function useChannel(url, channel, options = {}) {
  const keep = options.keep ?? 100;
  const [events, setEvents] = useState([]);
  const [state, setState] = useState({ status: "connecting" });
  const [lastReset, setLastReset] = useState(null);
  const clientRef = useRef(null);
  const transport = options.transport ?? "auto";

  useEffect(() => {
    const client = new ResyncClient(url, { ...(options.clientOptions || {}), transport });
    clientRef.current = client;
    const stopState = client.onState(setState);
    client.subscribe(channel, {
      onEvent: (event) => setEvents((previous) => [...previous, event].slice(-keep)),
      onReset: (reset) => {
        setLastReset(reset);
        setEvents([]);
      },
    });
    return () => {
      stopState();
      client.close();
      clientRef.current = null;
    };
    // The client is rebuilt only when what it connects to changes.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [url, channel, transport, keep]);

  return { events, state, lastReset, client: clientRef.current };
}
