// Types for react.js, the React hooks of the resync browser client.

import type { ReactElement, ReactNode } from "react";
import type {
  ClientOptions,
  ConnectionState,
  Member,
  Position,
  ResyncClient,
  ResyncError,
  ResyncEvent,
  ResyncReset,
  TransportKind,
} from "./resync.js";

export interface ResyncProviderProps {
  /** The server's base URL. A change makes a new client (and connection). */
  url: string;
  /** The token to connect with; a change takes effect at once (it wins over `options.token`). */
  token?: string;
  /** The client's options. `transport` changes make a new client; `token` changes reconnect. */
  options?: ClientOptions;
  children?: ReactNode;
}

/** Shares one client (one connection) with every hook below it. */
export function ResyncProvider(props: ResyncProviderProps): ReactElement;

/** The provider's client: `null` until it is made, and while server rendering. Throws without a provider. */
export function useResyncClient(): ResyncClient | null;

/** The provider's connection state (narrow on `status`). Throws without a provider. */
export function useResyncState(): ConnectionState;

export interface ChannelOptions<T = unknown> {
  /** How many recent events to keep in `events`. Default 100. */
  keep?: number;
  /** Start after this position (events after it are replayed first); read when the subscription starts. */
  since?: Position;
  /** False: follow nothing, hold no events. Default true. */
  enabled?: boolean;
  /** Called for each event (the latest function passed: it need not be stable). */
  onEvent?: (event: ResyncEvent<T>) => void;
  /** Called when history could not be replayed: refetch what you show. */
  onReset?: (reset: ResyncReset) => void;
  /** Called when the subscription fails, or asks for presence where there is none. */
  onError?: (error: ResyncError) => void;
  /** Appear among the channel's members, with `info` (WebSocket). */
  presence?: true | { info?: unknown };
  /** Track the member list in `members` (WebSocket). */
  members?: boolean;
  /**
   * Keep `events` in the tab's `sessionStorage` (with the client's `resume`), so the next
   * page of the tab starts with them and continues after the last one; too large to keep
   * comes back as `lastReset` with reason `not_kept`. Default true.
   */
  resume?: boolean;
}

export interface ChannelState<T = unknown> {
  events: ResyncEvent<T>[];
  state: ConnectionState;
  lastReset: ResyncReset | null;
  client: ResyncClient | null;
  /** The channel's members, when `presence` or `members: true` was asked for. */
  members: Member[];
  /** The last error of the subscription (`presence_unavailable` on SSE or long polling), or null. */
  error: ResyncError | null;
}

/** Presence options of `useChannel`: appear with `presence`, and/or track `members`. */
export type PresenceOptions = Pick<ChannelOptions, "presence" | "members">;

/** Follows `channel` on the provider's client. */
export function useChannel<T = unknown>(channel: string, options?: ChannelOptions<T>): ChannelState<T>;
/** Follows `channel` with a client of its own (no provider needed). */
export function useChannel<T = unknown>(
  url: string,
  channel: string,
  options?: ChannelOptions<T> & { transport?: "auto" | TransportKind; clientOptions?: ClientOptions },
): ChannelState<T>;

/**
 * Who is in `channel` on the provider's client: joins it (with `info`) and returns the live
 * member list. Presence needs a WebSocket: elsewhere the list is empty, `onError` gets
 * `presence_unavailable`, and `useResyncState()` says `capabilities.presence: false`.
 */
export function usePresence<I = unknown>(
  channel: string,
  options?: { info?: I; enabled?: boolean; onError?: (error: ResyncError) => void },
): Member<I>[];

export interface SnapshotOptions<S, T = unknown> {
  /** Your backend's state of the channel, with the position it stands for. */
  fetchSnapshot: () => Promise<{ state: S; position: Position }>;
  /** Applies an event to the state: a pure function. */
  reduce: (state: S, event: ResyncEvent<T>) => S;
  /** False: load and follow nothing. Default true. */
  enabled?: boolean;
  /**
   * Keep `data` and its position in the tab's `sessionStorage` (with the client's `resume`),
   * so the next page of the tab starts from them with no fetch. Default true.
   */
  resume?: boolean;
}

/** `loading` until the first snapshot; then `data`, kept while a new snapshot loads. */
export type SnapshotView<S> = (
  | { loading: true; data: undefined }
  | { loading: false; data: S }
) & {
  /** The last failure to load a snapshot (it is tried again), or a subscription error; null once loaded. */
  error: unknown;
  /** The reset that made the last snapshot necessary, if any. */
  lastReset: ResyncReset | null;
  state: ConnectionState;
};

/** Snapshot, then follow: load, apply each later event, load again after every reset. */
export function useSnapshotChannel<S, T = unknown>(channel: string, options: SnapshotOptions<S, T>): SnapshotView<S>;

export interface KeyedView<T = unknown> {
  /** Each key's latest value. */
  values: Map<string, T>;
  /** Until the channel's state has come. */
  loading: boolean;
  /** The channel's history restarted (the map was rebuilt from the new state). */
  lastReset: ResyncReset | null;
  error: ResyncError | null;
  state: ConnectionState;
}

/** A keyed channel as a map of each key's latest value, on the provider's client. */
export function useKeyedChannel<T = unknown>(
  channel: string,
  options?: { enabled?: boolean; onReset?: (reset: ResyncReset) => void; onError?: (error: ResyncError) => void },
): KeyedView<T>;
