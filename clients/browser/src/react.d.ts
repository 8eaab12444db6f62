import type { ConnectionState, ResyncClient, ResyncEvent, ResyncReset, TransportKind } from "./resync.js";

export interface ResyncProviderProps {
  url: string;
  options?: { transport?: "auto" | TransportKind } & Record<string, unknown>;
  children?: unknown;
}

/** Shares one client (one connection) with every hook below it. */
export function ResyncProvider(props: ResyncProviderProps): unknown;

/** The provider's client, `null` until it is made. */
export function useResyncClient(): ResyncClient | null;

/** The provider's connection state. */
export function useResyncState(): ConnectionState | { status: "connecting" };

export interface ChannelState<T> {
  events: ResyncEvent<T>[];
  state: ConnectionState | { status: "connecting" };
  lastReset: ResyncReset | null;
  client: ResyncClient | null;
}

/** Follows `channel` on the provider's client. */
export function useChannel<T = unknown>(channel: string, options?: { keep?: number }): ChannelState<T>;
/** Follows `channel` with a client of its own. */
export function useChannel<T = unknown>(
  url: string,
  channel: string,
  options?: { transport?: "auto" | TransportKind; keep?: number; clientOptions?: object },
): ChannelState<T>;
