// TanStack Query with resync: a query's data is refetched when its channel resets (the
// history no longer reaches back, the server lost it), so "refetch everything on a reset" is
// one line. No dependency: any object with TanStack Query's `invalidateQueries` works.
//
//   import { invalidateOnReset } from "@resync/client/tanstack";
//   invalidateOnReset(client, queryClient, "todos", ["todos"]);
//
// Events themselves are the app's to apply (`onEvent`: `queryClient.setQueryData(...)`), or
// `invalidateOn: "every-event"` refetches on each (simple, and costly on a busy channel).

/**
 * Follows `channel` on `client` and invalidates `queryKey` in `queryClient` on every reset
 * (and on every event with `invalidateOn: "every-event"`).
 * @param {import("./resync.js").ResyncClient} client
 * @param {{ invalidateQueries(filters: { queryKey: readonly unknown[] }): unknown }} queryClient
 * @param {string} channel
 * @param {readonly unknown[]} queryKey
 * @param {{ onEvent?: (event: any) => void, invalidateOn?: "reset" | "every-event" }} [options]
 * @returns {{ unsubscribe: () => void }}
 */
export function invalidateOnReset(client, queryClient, channel, queryKey, options = {}) {
  const invalidate = () => queryClient.invalidateQueries({ queryKey });
  const subscription = client.subscribe(channel, {
    // From now: the query's own fetch is the state; what changes after it is applied or refetched.
    resume: false,
    onEvent: (event) => {
      options.onEvent?.(event);
      if (options.invalidateOn === "every-event") invalidate();
    },
    onReset: invalidate,
  });
  return { unsubscribe: () => subscription.unsubscribe() };
}
