// React adapter for the resync browser client.
//
// Put one <ResyncProvider url=…> near the root: every hook under it shares its one client and
// so one connection (the protocol carries many channels per connection).
//
//   <ResyncProvider url="https://live.example.com"><App /></ResyncProvider>
//   const { events, state, lastReset } = useChannel("news");
//
// `useChannel(url, channel)` (a URL first) still works without a provider: that hook then has
// a client and a connection of its own.

import { createContext, createElement, useContext, useEffect, useRef, useState } from "react";
import { ResyncClient } from "./resync.js";

const ResyncContext = createContext(null);

/**
 * Shares one client (one connection) with every `useChannel` and `useResyncState` below it.
 * The client is made when the provider mounts, and closed (socket, timers, reconnects) when it
 * unmounts or its `url` or `transport` changes.
 * @param {{ url: string, options?: object, children?: any }} props
 */
export function ResyncProvider({ url, options, children }) {
  const [client, setClient] = useState(null);
  const transport = options?.transport ?? "auto";
  useEffect(() => {
    const shared = new ResyncClient(url, { ...(options || {}), transport });
    setClient(shared);
    return () => {
      shared.close();
      setClient(null);
    };
    // Rebuilt only when what it connects to changes.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [url, transport]);
  return createElement(ResyncContext.Provider, { value: client }, children);
}

/** The provider's client (`null` until it is made). */
export function useResyncClient() {
  return useContext(ResyncContext);
}

/** The provider's connection state, re-rendering on every change. */
export function useResyncState() {
  const client = useContext(ResyncContext);
  const [state, setState] = useState(() => client?.state ?? { status: "connecting" });
  useEffect(() => {
    if (!client) return undefined;
    setState(client.state);
    return client.onState(setState);
  }, [client]);
  return state;
}

/**
 * Follows `channel` while mounted: `useChannel(channel, options)` on the provider's client, or
 * `useChannel(url, channel, options)` with a client of its own. When the channel changes, the
 * previous channel's events are dropped and the new channel starts empty.
 * @param {string} first the channel (under a provider), or the server's base URL
 * @param {string | object} [second] options (under a provider), or the channel
 * @param {object} [third] options, after a URL and a channel
 *   `keep`: how many recent events to keep in state (default 100); `transport` and
 *   `clientOptions` only for a hook with its own client
 * @returns {{ events: any[], state: any, lastReset: any, client: ResyncClient | null }}
 */
export function useChannel(first, second, third) {
  const ownsClient = typeof second === "string";
  const url = ownsClient ? first : null;
  const channel = ownsClient ? second : first;
  const options = (ownsClient ? third : second) || {};
  const keep = options.keep ?? 100;
  const transport = options.transport ?? "auto";
  const shared = useContext(ResyncContext);
  const [own, setOwn] = useState(null);
  const [events, setEvents] = useState([]);
  const [lastReset, setLastReset] = useState(null);
  const [members, setMembers] = useState([]);
  const [state, setState] = useState({ status: "connecting" });
  // Presence: appear (`presence`), and/or track the member list (`members`).
  const presence = options.presence;
  const tracksMembers = Boolean(options.members || presence);
  const presenceKey = JSON.stringify(presence ?? null);
  const channelRef = useRef(channel);

  // A hook called with a URL has a client of its own, closed on unmount.
  useEffect(() => {
    if (!ownsClient) return undefined;
    const client = new ResyncClient(url, { ...(options.clientOptions || {}), transport });
    setOwn(client);
    return () => {
      client.close();
      setOwn(null);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [ownsClient, url, transport]);

  const client = ownsClient ? own : shared;

  useEffect(() => {
    if (!client) return undefined;
    setState(client.state);
    return client.onState(setState);
  }, [client]);

  useEffect(() => {
    channelRef.current = channel;
    // A new channel starts empty: the previous one's events are not this one's.
    setEvents([]);
    setLastReset(null);
    setMembers([]);
    if (!client) return undefined;
    const subscription = client.subscribe(channel, {
      presence,
      onPresence: tracksMembers
        ? (list) => {
          if (channelRef.current === channel) setMembers(list);
        }
        : undefined,
      onEvent: (event) => {
        if (channelRef.current !== channel) return;
        setEvents((previous) => [...previous, event].slice(-keep));
      },
      onReset: (reset) => {
        if (channelRef.current !== channel) return;
        setLastReset(reset);
        setEvents([]);
      },
    });
    return () => subscription.unsubscribe();
    // The presence options count by value.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [client, channel, keep, presenceKey, tracksMembers]);

  return { events, state, lastReset, client, members };
}

/**
 * Who is in `channel` on the provider's client: joins it (with `options.info`) and returns
 * the live member list (docs/presence.md).
 * @param {string} channel
 * @param {{ info?: any }} [options]
 * @returns {any[]}
 */
export function usePresence(channel, options = {}) {
  return useChannel(channel, { keep: 1, presence: options.info === undefined ? true : { info: options.info } }).members;
}
