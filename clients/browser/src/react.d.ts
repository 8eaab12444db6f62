import type { ConnectionState, Member, ResyncClient, ResyncEvent, ResyncReset, TransportKind } from "./resync.js";

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
  /** The channel's members, when `presence` or `members: true` was asked for. */
  members: Member[];
}

/** Presence options of `useChannel`: appear with `presence`, and/or track `members`. */
export interface PresenceOptions {
  presence?: true | { info?: unknown };
  members?: boolean;
}

/** Follows `channel` on the provider's client. */
export function useChannel<T = unknown>(channel: string, options?: { keep?: number } & PresenceOptions): ChannelState<T>;
/** Follows `channel` with a client of its own. */
export function useChannel<T = unknown>(
  url: string,
  channel: string,
  options?: { transport?: "auto" | TransportKind; keep?: number; clientOptions?: object },
): ChannelState<T>;

/** Who is in `channel` on the provider's client: joins it (with `info`) and returns the
 * live member list. */
export function usePresence(channel: string, options?: { info?: unknown }): Member[];
