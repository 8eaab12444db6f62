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
  data: T;
}

export type ResetReason =
  | "epoch_changed"
  | "truncated"
  | "too_far_behind"
  | "position_ahead"
  | "bad_cursor"
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

export type ConnectionState =
  | { status: "connecting"; transport: TransportKind }
  | { status: "connected"; transport: TransportKind }
  | { status: "reconnecting"; attempt: number; delay: number }
  | { status: "closed"; reason: string };

export interface BackoffConfig {
  /** Ceiling of the first delay, ms. Default 500. */
  initial: number;
  /** Largest ceiling, ms. Default 20000. */
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
}

export interface SubscribeHandlers<T = unknown> {
  /** Resume after this position (events after it are replayed first). */
  since?: Position;
  onEvent?: (event: ResyncEvent<T>) => void;
  /** History could not be replayed: refetch your state. */
  onReset?: (reset: ResyncReset) => void;
  /** How each (re)subscription started: fresh, replayed (with the count), up to date, reset. */
  onRecovery?: (recovery: Recovery) => void;
  /** A subscription failed, or the server ended it (`code` "unsubscribed", with `reason`). */
  onError?: (error: { code: string; message: string; reason?: "permission" | "server" }) => void;
  /** Appear among the channel's members, with `info` (WebSocket; docs/presence.md). */
  presence?: true | { info?: unknown };
  /** The member list, after each subscribe and on every join and leave (WebSocket). */
  onPresence?: (members: Member[]) => void;
}

/** One member of a channel: an identity, however many connections it has. */
export interface Member {
  /** The token's subject, or `anon:<connection id>`. */
  id: string;
  info?: unknown;
}

export interface Subscription {
  channel: string;
  position(): Position | undefined;
  unsubscribe(): void;
}

export class ResyncClient {
  constructor(url: string, options?: ClientOptions);
  readonly state: ConnectionState;
  /** How many times the client scheduled a reconnect. */
  readonly reconnects: number;
  onState(listener: (state: ConnectionState) => void): () => void;
  subscribe<T = unknown>(channel: string, handlers?: SubscribeHandlers<T>): Subscription;
  subscribeWithSnapshot<S, T = unknown>(
    channel: string,
    fetchSnapshot: () => Promise<{ state: S; position: Position }>,
    handlers: { onSnapshot: (state: S, reset?: ResyncReset) => void; onEvent: (event: ResyncEvent<T>) => void },
  ): { unsubscribe(): void };
  publish(channel: string, data: unknown, options?: { idempotencyKey?: string }): Promise<Position>;
  reconnectNow(): void;
  /** Drops the connection, stays away for `ms`, then reconnects and resumes (demos, tests). */
  disconnectFor(ms: number): void;
  close(): void;
}
