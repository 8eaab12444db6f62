// Types for resync.js, the dependency-free resync browser client.

export interface Position {
  epoch: string;
  seq: number;
}

export interface ResyncEvent<T = unknown> {
  type?: "event";
  channel: string;
  epoch: string;
  seq: number;
  /** On a keyed channel: the key the event sets (`null` data deletes it). */
  key?: string;
  data: T;
}

/** One key's latest event in a keyed channel's state; `data` null: the key was deleted. */
export interface StateEntry<T = unknown> {
  key: string;
  seq: number;
  data: T | null;
}

/** A page of a keyed channel's state (docs/protocol.md, section 14). */
export interface StatePage<T = unknown> {
  channel: string;
  entries: StateEntry<T>[];
  /** Where the events after the state start. */
  position: Position;
  /** More pages follow. */
  more: boolean;
}

export type ResetReason =
  | "epoch_changed"
  | "truncated"
  | "too_far_behind"
  | "position_ahead"
  | "bad_cursor"
  /** The React hooks: what the previous page of the tab showed was too large to keep. */
  | "not_kept"
  | (string & {});

export type Recovery =
  | { outcome: "fresh"; position: Position }
  | { outcome: "replayed"; count: number }
  | { outcome: "up_to_date" }
  | { outcome: "reset"; reason: string; position: Position };

export interface ResyncReset {
  channel: string;
  reason: ResetReason;
  position: Position;
}

export type TransportKind = "websocket" | "sse" | "long-polling";

/** What the current transport can do besides following channels (WebSocket: both). */
export interface Capabilities {
  /** `publish()` works (WebSocket only). */
  publish: boolean;
  /** Presence (`presence`, `onPresence`, `usePresence`) works (WebSocket only). */
  presence: boolean;
}

/** Narrow on `status`: each state has its own fields. */
export type ConnectionState =
  /** Not connecting yet: `autoConnect: false`, outside a browser, or before a provider's client is made. */
  | { status: "idle" }
  | { status: "connecting"; transport: TransportKind }
  | { status: "connected"; transport: TransportKind; capabilities: Capabilities }
  | { status: "reconnecting"; attempt: number; delay: number }
  | { status: "closed"; reason: string };

/** The codes of `ResyncError`: the server's (docs/protocol.md) and the client's own. */
export type ResyncErrorCode =
  | "publish_unavailable"
  | "presence_unavailable"
  | "not_connected"
  | "closed"
  | "connection_lost"
  | "unsubscribed"
  | "unauthorized"
  | "key_mismatch"
  | "keyed_state_full"
  | "forbidden"
  | "invalid_channel"
  | "unknown_channel"
  | "too_many_channels"
  | "rate_limited"
  | "unavailable"
  | (string & {});

/** An error with a `code` to match on. */
export class ResyncError extends Error {
  constructor(code: ResyncErrorCode, message: string, details?: { transport?: TransportKind; reason?: string });
  readonly name: "ResyncError";
  readonly code: ResyncErrorCode;
  /** For `publish_unavailable` and `presence_unavailable`: the transport that cannot. */
  readonly transport?: TransportKind;
  /** For `unsubscribed`: `permission` (a refreshed token no longer allows it) or `server`. */
  readonly reason?: "permission" | "server" | (string & {});
}

export interface BackoffConfig {
  /** Ceiling of the first delay, ms. Default 500. */
  initial: number;
  /** Largest ceiling, ms. Default 5000. */
  max: number;
  /** A connection up this long resets the attempt count, ms. Default 10000. */
  resetAfter: number;
  /** Ceiling of the random delay after "reconnect soon" close codes, ms. Default 1000. */
  soon: number;
}

export const DEFAULT_BACKOFF: Readonly<BackoffConfig>;

export function backoffDelay(attempt: number, config?: Pick<BackoffConfig, "initial" | "max">, random?: () => number): number;
export function closeAdvice(code: number): "stop" | "backoff" | "backoff-drop-message" | "soon" | "refresh-token";
export function parseCursor(text: string): Map<string, Position>;
export function formatCursor(positions: Map<string, Position>): string;
export function isDuplicate(last: Position | undefined, event: { epoch: string; seq: number }): boolean;
/** Whether a subscription at `position` missed events by a reset to `resetPosition`. */
export function resetConcerns(position: Position | undefined, resetPosition: Position): boolean;

export interface ClientOptions {
  /** Default "auto": WebSocket, then SSE, then long polling. */
  transport?: "auto" | TransportKind;
  /** Sent as the `token` query parameter (browsers cannot set headers on WebSocket/EventSource). */
  token?: string;
  /**
   * Called for a fresh token when the server refuses the current one, and, over WebSocket,
   * ahead of the token's expiry to refresh it in place (the connection stays open).
   */
  getToken?: () => Promise<string>;
  /**
   * Connect as soon as the client is made. Default: true in a browser; false elsewhere (server
   * rendering, Node). When false the client stays `idle` until its first `subscribe` or `connect()`.
   */
  autoConnect?: boolean;
  /**
   * On SSE or long polling (a WebSocket was refused), try WebSocket again after about this long,
   * ms; it takes over without a gap if it opens. Doubles while it fails, at most 5 minutes.
   * Default 30000; 0 never.
   */
  upgradeAfter?: number;
  backoff?: Partial<BackoffConfig>;
  /** Extra silence tolerated past the server's ping interval, ms. Default 10000. */
  heartbeatGrace?: number;
  /** Silence after which an SSE stream counts as dead, ms. Default 40000. */
  sseIdleTimeout?: number;
  /** Long-poll wait, seconds. Default 25. */
  pollTimeout?: number;
  /** Time allowed to open a connection, ms. Default 10000. */
  connectTimeout?: number;
  /** Random source in [0, 1), for reproducible tests. */
  random?: () => number;
  /**
   * Keep each channel's position in the tab's `sessionStorage` as events arrive, so the next
   * page of the tab (a reload, a link) follows a channel subscribed without `since` from where
   * this one stood: the missed events arrive, or a typed reset. Scoped by server URL and
   * token subject. Default true where `sessionStorage` exists; false starts every page from now.
   */
  resume?: boolean | ResumeOptions;
}

export interface ResumeOptions {
  /** Default: the page's `sessionStorage`. */
  storage?: PositionStorage;
  /** Positions older than this (ms) are not offered. Default 3600000 (1 hour). */
  maxAge?: number;
  /** Channels kept per server and user (the most recently moved). Default 256. */
  maxChannels?: number;
  /** Records (server × user) kept in the storage. Default 8. */
  maxScopes?: number;
  /** Kept page states (`setKept`) in the storage. Default 64. */
  maxKept?: number;
  /** Bytes of one kept page state (as JSON); a larger one is kept as "not kept". Default 262144. */
  maxKeptBytes?: number;
}

/** What `PositionStore` needs of a storage: `sessionStorage` has it. */
export interface PositionStorage {
  readonly length: number;
  key(index: number): string | null;
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export const DEFAULT_RESUME: Readonly<Required<Omit<ResumeOptions, "storage">>>;

/** Who a token speaks for, to scope kept positions: `sub:<sub>` of a JWT, a digest otherwise. */
export function tokenSubject(token: string | undefined): string;

/** Channel positions kept for the next page of a tab (what `resume` uses). */
export class PositionStore {
  constructor(storage: PositionStorage, scope: string, options?: Omit<ResumeOptions, "storage">, now?: () => number);
  get(channel: string): Position | undefined;
  set(channel: string, position: Position): void;
  delete(channel: string): void;
  /**
   * State kept under `name` by an earlier page of the tab, with the position it stands for;
   * `value` is null when it was too large to keep (refetch).
   */
  getKept<V = unknown>(name: string): { value: V | null; position: Position } | undefined;
  /** Keeps `value` under `name`, standing for `position` (what the React hooks use). */
  setKept(name: string, value: unknown, position: Position): void;
  /** Writes now (the client does on `pagehide` and when the page is hidden). */
  flush(): void;
  /** Forgets everything kept for this server and user (call it when the user signs out). */
  clear(): void;
}

export interface SubscribeHandlers<T = unknown> {
  /** Resume after this position (events after it are replayed first). */
  since?: Position;
  onEvent?: (event: ResyncEvent<T>) => void;
  /** History could not be replayed: refetch your state. */
  onReset?: (reset: ResyncReset) => void;
  /** How each (re)subscription started: fresh, replayed (with the count), up to date, reset. */
  onRecovery?: (recovery: Recovery) => void;
  /**
   * A subscription failed (the server's code), the server ended it (`unsubscribed`, with
   * `reason`), or it asks for presence on a transport without it (`presence_unavailable`).
   */
  onError?: (error: ResyncError) => void;
  /** Appear among the channel's members, with `info` (WebSocket; docs/presence.md). */
  presence?: true | { info?: unknown };
  /** The member list, after each subscribe and on every join and leave (WebSocket). */
  onPresence?: (members: Member[]) => void;
  /** Without `since`: false starts from now instead of where the tab's previous page stood. */
  resume?: boolean;
  /** On a keyed channel: start from its state (`onState` pages), not from now. */
  state?: boolean;
  /** A page of a keyed channel's state: when asked with `state`, or when history no longer reaches back. */
  onState?: (page: StatePage<T>) => void;
}

export interface KeyedHandlers<T = unknown> {
  /** The values (key to data) once the state is whole and after each change, with the keys that changed. */
  onChange: (values: Map<string, T>, changed: string[]) => void;
  /** The channel's history restarted: the map starts over from the new state. */
  onReset?: (reset: ResyncReset) => void;
  onError?: (error: ResyncError) => void;
}

/** One member of a channel: an identity, however many connections it has. */
export interface Member<I = unknown> {
  /** The token's subject, or `anon:<connection id>`. */
  id: string;
  info?: I;
}

export interface SnapshotHandlers<S, T = unknown> {
  /** A snapshot to replace your state with (and the position it stands for): the first, and again after every reset. */
  onSnapshot: (state: S, reset?: ResyncReset, position?: Position) => void;
  /** The next event after the snapshot: apply it. */
  onEvent: (event: ResyncEvent<T>) => void;
  /** Loading a snapshot failed; it is tried again in `retryIn` ms. Keep the state you have. */
  onFetchError?: (error: unknown, retryIn: number) => void;
  onError?: (error: ResyncError) => void;
  /**
   * The state an earlier page kept, with the position of the last event applied to it: it is
   * followed from there with no fetch (a reset then fetches as usual).
   */
  restore?: () => { state: S; position: Position } | undefined;
}

export interface Subscription {
  channel: string;
  position(): Position | undefined;
  unsubscribe(): void;
}

export class ResyncClient {
  constructor(url: string, options?: ClientOptions);
  readonly state: ConnectionState;
  /** Where the client keeps positions for the next page of the tab (`resume`); undefined when off. */
  readonly positions: PositionStore | undefined;
  /** How many times the client scheduled a reconnect. */
  readonly reconnects: number;
  /** Starts connecting, if it has not (`autoConnect: false`, or outside a browser). */
  connect(): void;
  onState(listener: (state: ConnectionState) => void): () => void;
  /**
   * Follows `channel`. Any number of subscriptions may follow one channel: the connection
   * follows it once, each keeps its own position.
   */
  subscribe<T = unknown>(channel: string, handlers?: SubscribeHandlers<T>): Subscription;
  /** Follows a keyed channel as a map of each key's latest value (docs/protocol.md, section 14). */
  subscribeKeyed<T = unknown>(channel: string, handlers: KeyedHandlers<T>): { values(): Map<string, T>; unsubscribe(): void };
  subscribeWithSnapshot<S, T = unknown>(
    channel: string,
    fetchSnapshot: () => Promise<{ state: S; position: Position }>,
    handlers: SnapshotHandlers<S, T>,
  ): { unsubscribe(): void };
  /** Rejects with a `ResyncError`: `publish_unavailable` on SSE or long polling, `not_connected`. */
  publish(channel: string, data: unknown, options?: { idempotencyKey?: string }): Promise<Position>;
  /** Reconnects at once with a new token (every channel resumes from its position). */
  setToken(token: string | undefined): void;
  reconnectNow(): void;
  /** Drops the connection, stays away for `ms`, then reconnects and resumes (demos, tests). */
  disconnectFor(ms: number): void;
  close(): void;
}
