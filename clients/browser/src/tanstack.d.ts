import type { ResyncClient, ResyncEvent } from "./resync.js";

/** What `invalidateOnReset` needs of a TanStack Query `QueryClient`. */
export interface InvalidatingQueryClient {
  invalidateQueries(filters: { queryKey: readonly unknown[] }): unknown;
}

export interface InvalidateOptions<T = unknown> {
  /** Each event of the channel (apply it with `queryClient.setQueryData`, say). */
  onEvent?: (event: ResyncEvent<T>) => void;
  /** "reset" (default): invalidate on resets only; "every-event": on each event too. */
  invalidateOn?: "reset" | "every-event";
}

/** Follows `channel` and invalidates `queryKey` on every reset of it. */
export function invalidateOnReset<T = unknown>(
  client: ResyncClient,
  queryClient: InvalidatingQueryClient,
  channel: string,
  queryKey: readonly unknown[],
  options?: InvalidateOptions<T>,
): { unsubscribe(): void };
