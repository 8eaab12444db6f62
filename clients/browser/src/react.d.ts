import type { ConnectionState, ResyncClient, ResyncEvent, ResyncReset, TransportKind } from "./resync.js";

export function useChannel<T = unknown>(
  url: string,
  channel: string,
  options?: { transport?: "auto" | TransportKind; keep?: number; clientOptions?: object },
): {
  events: ResyncEvent<T>[];
  state: ConnectionState | { status: "connecting" };
  lastReset: ResyncReset | null;
  client: ResyncClient | null;
};
