"use client";
// React adapter for the resync browser client.
//
// Put one <ResyncProvider url=…> near the root: every hook under it shares its one client and
// so one connection (the protocol carries many channels per connection), and any number of
// hooks may follow the same channel (the client follows it once for them).
//
//   <ResyncProvider url="https://live.example.com"><App /></ResyncProvider>
//   const { events, state, lastReset } = useChannel("news");
//
// `useChannel(url, channel)` (a URL first) still works without a provider: that hook then has
// a client and a connection of its own.
//
// The module only reads React when a component renders, so it also imports where React has
// no hooks (the `react-server` condition of server components); the hooks themselves run in
// client components, hence the "use client" above.

import * as React from "react";
import { ResyncClient } from "./resync.js";

const IDLE = Object.freeze({ status: "idle" });

let context;
/** The context, made on first use (not at import: see above). */
function resyncContext() {
  if (!context) {
    if (typeof React.createContext !== "function") {
      throw new Error("@resync/client/react runs in client components (\"use client\"), not in server components");
    }
    context = React.createContext(null);
  }
  return context;
}

function missingProvider(hook) {
  return new Error(
    `${hook}() needs a <ResyncProvider> above it in the tree` +
      (hook === "useChannel" ? " (or a URL first: useChannel(url, channel) has a client of its own)" : ""),
  );
}

/** The provider's client, or a clear error when there is no provider. */
function useProvided(hook) {
  const provided = React.useContext(resyncContext());
  if (!provided) throw missingProvider(hook);
  return provided.client;
}

/**
 * Shares one client (one connection) with every hook below it. The client is made when the
 * provider mounts, and closed (socket, timers, reconnects) when it unmounts or its `url` or
 * `options.transport` changes. A new `token` (or `options.token`) takes effect at once: the
 * client reconnects with it, and every channel resumes from its position.
 * @param {{ url: string, token?: string, options?: object, children?: any }} props
 */
export function ResyncProvider({ url, token, options, children }) {
  const [client, setClient] = React.useState(null);
  const transport = options?.transport ?? "auto";
  const currentToken = token ?? options?.token;
  const latest = React.useRef({ options, token: currentToken });
  latest.current = { options, token: currentToken };
  React.useEffect(() => {
    const { options: initial, token: initialToken } = latest.current;
    const shared = new ResyncClient(url, {
      ...(initial || {}),
      transport,
      token: initialToken,
      // The latest function the app passed, whenever the client needs a token.
      getToken: initial?.getToken ? () => (latest.current.options?.getToken ?? initial.getToken)() : undefined,
    });
    setClient(shared);
    return () => {
      shared.close();
      setClient(null);
    };
    // Rebuilt only when what it connects to changes.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [url, transport]);
  React.useEffect(() => {
    client?.setToken(currentToken);
  }, [client, currentToken]);
  const value = React.useMemo(() => ({ client }), [client]);
  return React.createElement(resyncContext().Provider, { value }, children);
}

/** The provider's client (`null` until it is made, and while server rendering). */
export function useResyncClient() {
  return useProvided("useResyncClient");
}

/** A client's connection state, re-rendering on every change; `idle` without a client. */
function useClientState(client) {
  const [state, setState] = React.useState(() => client?.state ?? IDLE);
  React.useEffect(() => {
    if (!client) {
      setState(IDLE);
      return undefined;
    }
    setState(client.state);
    return client.onState(setState);
  }, [client]);
  return client ? state : IDLE;
}

/** The provider's connection state, re-rendering on every change. */
export function useResyncState() {
  return useClientState(useProvided("useResyncState"));
}

/**
 * Follows `channel` while mounted: `useChannel(channel, options)` on the provider's client, or
 * `useChannel(url, channel, options)` with a client of its own. When the channel changes, the
 * previous channel's events are dropped and the new channel starts empty.
 * @param {string} first the channel (under a provider), or the server's base URL
 * @param {string | object} [second] options (under a provider), or the channel
 * @param {object} [third] options, after a URL and a channel
 *   `keep`: how many recent events to keep in state (default 100); `onEvent`, `onReset`,
 *   `onError`: called for each (the latest functions passed; they need not be stable);
 *   `enabled` (default true): false follows nothing and holds no events; `since`: a position to
 *   start after (read when the subscription starts); `presence`, `members`: appear, and track
 *   the member list; `transport` and `clientOptions` only for a hook with its own client;
 *   `resume` (default true, with the client's `resume`): keep the events in the tab's
 *   `sessionStorage`, so the next page of the tab (a reload) starts with them and continues
 *   from the last one. Events too large to keep come back as `lastReset` with reason
 *   `not_kept` (refetch what you show).
 * @returns {{ events: any[], state: any, lastReset: any, client: ResyncClient | null, members: any[], error: any }}
 */
export function useChannel(first, second, third) {
  const ownsClient = typeof second === "string";
  const url = ownsClient ? first : null;
  const channel = ownsClient ? second : first;
  const options = (ownsClient ? third : second) || {};
  const transport = options.transport ?? "auto";
  const enabled = options.enabled ?? true;
  const provided = React.useContext(resyncContext());
  if (!ownsClient && !provided) throw missingProvider("useChannel");
  const [own, setOwn] = React.useState(null);
  const [events, setEvents] = React.useState([]);
  const [lastReset, setLastReset] = React.useState(null);
  const [members, setMembers] = React.useState([]);
  const [error, setError] = React.useState(null);
  // Presence: appear (`presence`), and/or track the member list (`members`).
  const presence = options.presence;
  const tracksMembers = Boolean(options.members || presence);
  const presenceKey = JSON.stringify(presence ?? null);
  const latest = React.useRef(options);
  latest.current = options;

  // A hook called with a URL has a client of its own, closed on unmount.
  React.useEffect(() => {
    if (!ownsClient) return undefined;
    const client = new ResyncClient(url, { ...(latest.current.clientOptions || {}), transport });
    setOwn(client);
    return () => {
      client.close();
      setOwn(null);
    };
  }, [ownsClient, url, transport]);

  const client = ownsClient ? own : provided.client;
  const state = useClientState(client);

  React.useEffect(() => {
    // A new channel starts empty: the previous one's events are not this one's.
    setEvents([]);
    setLastReset(null);
    setMembers([]);
    setError(null);
    if (!client || !enabled) return undefined;
    let live = true;
    const keep = latest.current.keep ?? 100;
    // What an earlier page of the tab showed, and where it stood.
    const store = latest.current.resume === false || latest.current.since ? undefined : client.positions;
    const name = `useChannel:${channel}:${keep}`;
    const kept = store?.getKept(name);
    let list = Array.isArray(kept?.value) ? kept.value : [];
    setEvents(list);
    if (kept && kept.value === null) setLastReset({ channel, reason: "not_kept", position: kept.position });
    const subscription = client.subscribe(channel, {
      // From the kept events on; without them, from now (the list starts empty).
      since: latest.current.since ?? kept?.position,
      resume: kept ? undefined : false,
      presence,
      onPresence: tracksMembers
        ? (list) => {
          if (!live) return;
          setMembers(list);
          setError((previous) => (previous?.code === "presence_unavailable" ? null : previous));
        }
        : undefined,
      onEvent: (event) => {
        if (!live) return;
        list = [...list, event].slice(-keep);
        setEvents(list);
        store?.setKept(name, list, event);
        latest.current.onEvent?.(event);
      },
      onReset: (reset) => {
        if (!live) return;
        list = [];
        setLastReset(reset);
        setEvents(list);
        store?.setKept(name, list, reset.position);
        latest.current.onReset?.(reset);
      },
      onRecovery: () => {
        // Subscribed (again): an earlier refusal is over.
        if (live) setError((previous) => (previous && previous.code !== "presence_unavailable" ? null : previous));
      },
      onError: (problem) => {
        if (!live) return;
        setError(problem);
        latest.current.onError?.(problem);
      },
    });
    return () => {
      live = false;
      subscription.unsubscribe();
    };
    // The presence options count by value; the callbacks and `since` are read when needed.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [client, channel, enabled, presenceKey, tracksMembers]);

  return { events, state, lastReset, client, members, error };
}

/**
 * Who is in `channel` on the provider's client: joins it (with `options.info`) and returns
 * the live member list (docs/presence.md). Presence needs a WebSocket: on SSE or long polling
 * the list stays empty, `useResyncState().capabilities.presence` is false and
 * `options.onError` gets a `presence_unavailable` error.
 * @param {string} channel
 * @param {{ info?: any, enabled?: boolean, onError?: (error: any) => void }} [options]
 * @returns {any[]}
 */
export function usePresence(channel, options = {}) {
  useProvided("usePresence");
  return useChannel(channel, {
    keep: 1,
    enabled: options.enabled,
    onError: options.onError,
    presence: options.info === undefined ? true : { info: options.info },
  }).members;
}

/**
 * A keyed channel as a map of each key's latest value (docs/protocol.md, section 14), on the
 * provider's client: the channel's state when mounted, then every change. A page that comes
 * back (a reload, a reconnect past the history) reads the state again: no refetch of yours.
 * @param {string} channel
 * @param {{ enabled?: boolean, onReset?: (reset: any) => void, onError?: (error: any) => void }} [options]
 * @returns {{ values: Map<string, any>, loading: boolean, lastReset: any, error: any, state: any }}
 */
export function useKeyedChannel(channel, options = {}) {
  const client = useProvided("useKeyedChannel");
  const state = useClientState(client);
  const enabled = options.enabled ?? true;
  const latest = React.useRef(options);
  latest.current = options;
  const [view, setView] = React.useState(() => ({ values: new Map(), loading: true, lastReset: null, error: null }));
  React.useEffect(() => {
    setView({ values: new Map(), loading: true, lastReset: null, error: null });
    if (!client || !enabled) return undefined;
    let live = true;
    const keyed = client.subscribeKeyed(channel, {
      onChange: (values) => {
        if (live) setView((previous) => ({ ...previous, values, loading: false, error: null }));
      },
      onReset: (reset) => {
        if (!live) return;
        setView((previous) => ({ ...previous, lastReset: reset }));
        latest.current.onReset?.(reset);
      },
      onError: (error) => {
        if (!live) return;
        setView((previous) => ({ ...previous, error }));
        latest.current.onError?.(error);
      },
    });
    return () => {
      live = false;
      keyed.unsubscribe();
    };
  }, [client, channel, enabled]);
  return { ...view, state };
}

const LOADING = Object.freeze({ data: undefined, loading: true, error: null, lastReset: null });

/**
 * Snapshot, then follow: loads the channel's state with `fetchSnapshot` (your backend's
 * `{ state, position }`), applies every later event with `reduce(state, event)` (a pure
 * function), and loads a new snapshot after every reset. A failed load is tried again after
 * the client's backoff (with `error` set meanwhile, and the last `data` kept). With the
 * client's `resume` (and `resume` here, default true), `data` and its position are kept in the
 * tab's `sessionStorage` (when JSON can hold them), so the next page of the tab (a reload)
 * starts from them and fetches nothing, unless a reset says it must.
 * @param {string} channel
 * @param {{ fetchSnapshot: () => Promise<{ state: any, position: any }>, reduce: (state: any, event: any) => any, enabled?: boolean, resume?: boolean }} options
 * @returns {{ data: any, loading: boolean, error: unknown, lastReset: any, state: any }}
 */
export function useSnapshotChannel(channel, options) {
  const client = useProvided("useSnapshotChannel");
  const state = useClientState(client);
  const enabled = options.enabled ?? true;
  const latest = React.useRef(options);
  latest.current = options;
  const [view, setView] = React.useState(LOADING);
  React.useEffect(() => {
    setView(LOADING);
    if (!client || !enabled) return undefined;
    let live = true;
    const store = latest.current.resume === false ? undefined : client.positions;
    const name = `useSnapshotChannel:${channel}`;
    // The state and where it stands, as this hook last had them (kept for the next page).
    let data;
    let loaded = false;
    const subscription = client.subscribeWithSnapshot(channel, () => latest.current.fetchSnapshot(), {
      restore: () => {
        const kept = store?.getKept(name);
        return kept && kept.value !== null ? { state: kept.value.data, position: kept.position } : undefined;
      },
      onSnapshot: (snapshot, reset, position) => {
        if (!live) return;
        data = snapshot;
        loaded = true;
        if (position) store?.setKept(name, { data }, position);
        setView((previous) => ({ data, loading: false, error: null, lastReset: reset ?? previous.lastReset }));
      },
      onEvent: (event) => {
        if (!live || !loaded) return;
        data = latest.current.reduce(data, event);
        store?.setKept(name, { data }, event);
        setView((previous) => ({ ...previous, data }));
      },
      onFetchError: (error) => {
        if (live) setView((previous) => ({ ...previous, error }));
      },
      onError: (error) => {
        if (live) setView((previous) => ({ ...previous, error }));
      },
    });
    return () => {
      live = false;
      subscription.unsubscribe();
    };
  }, [client, channel, enabled]);
  return { ...view, state };
}
