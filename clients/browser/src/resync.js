// resync browser client: follow channels over WebSocket, SSE or long polling, and never miss
// an event. No dependencies, no build step: import it as an ES module.
//
//   import { ResyncClient } from "/client/resync.js";
//   const client = new ResyncClient("http://127.0.0.1:8080");
//   client.subscribe("news", {
//     onEvent: (event) => render(event),            // {channel, epoch, seq, data}
//     onReset: (reset) => refetchEverything(reset), // history could not be replayed
//   });
//
// The wire protocol is docs/protocol.md of the resync repository.

/** @typedef {{ epoch: string, seq: number }} Position */
/** @typedef {{ channel: string, epoch: string, seq: number, data: any }} ResyncEvent */
/** @typedef {{ channel: string, reason: string, position: Position }} ResyncReset */
/** @typedef {"websocket" | "sse" | "long-polling"} TransportKind */
/** @typedef {{ publish: boolean, presence: boolean }} Capabilities */
/**
 * @typedef {{ status: "idle" }
 *   | { status: "connecting", transport: TransportKind }
 *   | { status: "connected", transport: TransportKind, capabilities: Capabilities }
 *   | { status: "reconnecting", attempt: number, delay: number }
 *   | { status: "closed", reason: string }} ConnectionState
 */

/**
 * Backoff defaults: full jitter, 0.5 s initial ceiling, doubling, 5 s cap, reset after 10 s up.
 * The cap is lower than the Rust client's 20 s: a page is in front of a person, who should see
 * it come back within seconds of the server (docs/decisions.md, "Browser client and demo").
 */
export const DEFAULT_BACKOFF = Object.freeze({ initial: 500, max: 5000, resetAfter: 10000, soon: 1000 });

/** The longest random wait before reconnecting when the page comes back (online, focus, shown). */
const WAKE_JITTER = 500;
/** Failed attempts of a transport that worked before, before checking for a blocked transport. */
const FALLBACK_AFTER = 3;
/** The longest wait between two tries to move from SSE or long polling back to WebSocket. */
const UPGRADE_MAX = 300000;

/** What each transport can do besides following channels. */
const CAPABILITIES = {
  websocket: { publish: true, presence: true },
  sse: { publish: false, presence: false },
  "long-polling": { publish: false, presence: false },
};

/**
 * An error with a `code` to match on: the server's error codes (docs/protocol.md), and the
 * client's own: `publish_unavailable` and `presence_unavailable` (the connection is on a
 * transport that cannot do it), `not_connected`, `closed`, `connection_lost`, `unsubscribed`.
 */
export class ResyncError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {object} [details] e.g. `transport`, `reason`
   */
  constructor(code, message, details = {}) {
    super(message);
    this.name = "ResyncError";
    this.code = code;
    Object.assign(this, details);
  }
}

/**
 * The delay before reconnect attempt `attempt` (from 0): a random time in
 * [0, min(max, initial * 2^attempt)] ("full jitter"), so a crowd that lost its connections at
 * once reconnects spread evenly over the window.
 * @param {number} attempt
 * @param {{ initial: number, max: number }} [config]
 * @param {() => number} [random] a source in [0, 1), e.g. a seeded one in tests
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, config = DEFAULT_BACKOFF, random = Math.random) {
  const ceiling = Math.min(config.max, config.initial * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * (ceiling + 1));
}

/**
 * What to do after the server closed a WebSocket with `code` (docs/protocol.md, close codes).
 * @param {number} code
 * @returns {"stop" | "backoff" | "backoff-drop-message" | "soon" | "refresh-token"}
 */
export function closeAdvice(code) {
  if (code === 1000 || code === 1002) return "stop";
  if (code === 1009) return "backoff-drop-message";
  if (code === 1012) return "soon";
  if (code >= 4000 && code <= 4099) return "stop";
  if (code >= 4100 && code <= 4199) return "backoff";
  if (code >= 4200 && code <= 4299) return "soon";
  if (code >= 4300 && code <= 4399) return "refresh-token";
  return "backoff";
}

/**
 * Parses a cursor (`channel:epoch:seq,…`) into a Map of channel to position.
 * @param {string} text
 * @returns {Map<string, Position>}
 */
export function parseCursor(text) {
  const positions = new Map();
  if (!text) return positions;
  for (const entry of text.split(",")) {
    const seqAt = entry.lastIndexOf(":");
    const epochAt = entry.lastIndexOf(":", seqAt - 1);
    if (seqAt < 0 || epochAt <= 0) throw new Error(`bad cursor entry ${JSON.stringify(entry)}`);
    const channel = entry.slice(0, epochAt);
    const epoch = entry.slice(epochAt + 1, seqAt);
    const seqText = entry.slice(seqAt + 1);
    if (!/^[0-9]+$/.test(seqText) || !/^[A-Za-z0-9]{1,32}$/.test(epoch)) {
      throw new Error(`bad cursor entry ${JSON.stringify(entry)}`);
    }
    if (positions.has(channel)) throw new Error(`channel ${channel} appears twice`);
    positions.set(channel, { epoch, seq: Number(seqText) });
  }
  return positions;
}

/**
 * Formats positions as a cursor.
 * @param {Map<string, Position>} positions
 * @returns {string}
 */
export function formatCursor(positions) {
  return [...positions].map(([channel, position]) => `${channel}:${position.epoch}:${position.seq}`).join(",");
}

/**
 * Whether `event` was already handed out, given the channel's last position.
 * @param {Position | undefined} last
 * @param {{ epoch: string, seq: number }} event
 */
export function isDuplicate(last, event) {
  return last !== undefined && last.epoch === event.epoch && event.seq <= last.seq;
}

/**
 * Whether a subscription at `position` must be told of `reset`: unless it already stands at
 * or past the reset's position in the same epoch (another subscription of the channel asked
 * for history it had no need of), the events between are lost to it.
 * @param {Position | undefined} position
 * @param {Position} resetPosition
 */
export function resetConcerns(position, resetPosition) {
  return !(position !== undefined && position.epoch === resetPosition.epoch && position.seq >= resetPosition.seq);
}

/** Whether following from `since` needs history before `position` (another epoch counts). */
function isBefore(since, position) {
  return position === undefined || since.epoch !== position.epoch || since.seq < position.seq;
}

/** Defaults of the positions kept across page loads (`resume`). */
export const DEFAULT_RESUME = Object.freeze({ maxAge: 3600000, maxChannels: 256, maxScopes: 8, maxKept: 64, maxKeptBytes: 256 * 1024 });

/** Where kept positions live in the storage: one record per server and user. */
const RESUME_PREFIX = "resync.positions:";
/** Where kept page state lives (`setKept`): one record per server, user and name. */
const KEPT_PREFIX = "resync.kept:";

/** The longest a kept position waits to be written (it is also written when the page hides). */
const RESUME_WRITE_DELAY = 250;

/**
 * Who a token speaks for, for scoping kept positions: a JWT's `sub`, otherwise a digest of the
 * token (never the token itself), or "anonymous".
 * @param {string | undefined} token
 */
export function tokenSubject(token) {
  if (!token) return "anonymous";
  const parts = token.split(".");
  if (parts.length === 3 && typeof atob === "function") {
    try {
      const payload = JSON.parse(atob(parts[1].replace(/-/g, "+").replace(/_/g, "/")));
      if (typeof payload?.sub === "string") return `sub:${payload.sub}`;
    } catch {
      // Not a JWT after all: the digest below.
    }
  }
  // FNV-1a, 32 bits: tells tokens apart without keeping one.
  let hash = 0x811c9dc5;
  for (let index = 0; index < token.length; index += 1) {
    hash ^= token.charCodeAt(index);
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return `token:${hash.toString(16)}`;
}

/**
 * Channel positions kept in a page's `sessionStorage` (or any storage with `getItem`,
 * `setItem`, `removeItem`, `key` and `length`), so that the next page of the same tab (a
 * reload, a link in a multi-page app) follows each channel from where this one stood. One
 * record per server URL and token subject: two servers or two users never take each other's
 * positions, and `sessionStorage` is the tab's own. Bounded: positions older than `maxAge` are
 * not offered, a record keeps at most `maxChannels` channels (the most recently moved), and
 * the storage at most `maxScopes` records. A storage that fails (full, blocked) keeps nothing
 * and breaks nothing.
 *
 * Beside the positions it keeps named page state with the position it stands for
 * (`setKept`: the React hooks keep their events and snapshots this way), at most
 * `maxKeptBytes` each (a larger one is kept as "not kept", so the next page knows to
 * refetch) and `maxKept` records in the storage.
 */
export class PositionStore {
  /**
   * @param {{ getItem(key: string): string | null, setItem(key: string, value: string): void, removeItem(key: string): void, key(index: number): string | null, length: number }} storage
   * @param {string} scope e.g. the server URL and the token subject
   * @param {Partial<typeof DEFAULT_RESUME>} [options]
   * @param {() => number} [now]
   */
  constructor(storage, scope, options = {}, now = Date.now) {
    this.storage = storage;
    this.scope = scope;
    this.key = RESUME_PREFIX + scope;
    this.options = { ...DEFAULT_RESUME, ...options };
    this.now = now;
    this.timer = undefined;
    /** @type {Map<string, [string, number, number]>} channel to [epoch, seq, when] */
    this.channels = new Map();
    /** Channels the page stopped following: dropped at the next write, unless followed again. */
    this.leaving = new Set();
    /** @type {Map<string, { value: any, position: Position, at: number }>} kept state by name, not yet written */
    this.dirty = new Map();
    try {
      const record = JSON.parse(storage.getItem(this.key) ?? "null");
      for (const [channel, kept] of Object.entries(record?.channels ?? {})) {
        const [epoch, seq, at] = Array.isArray(kept) ? kept : [];
        if (typeof epoch === "string" && Number.isSafeInteger(seq) && seq >= 0 && Number.isFinite(at)) {
          this.channels.set(channel, [epoch, seq, at]);
        }
      }
    } catch {
      // Unreadable: start with nothing.
    }
  }

  /**
   * The position kept for `channel`, unless it is older than `maxAge`.
   * @param {string} channel
   * @returns {Position | undefined}
   */
  get(channel) {
    const kept = this.channels.get(channel);
    if (!kept || this.now() - kept[2] > this.options.maxAge) return undefined;
    return { epoch: kept[0], seq: kept[1] };
  }

  /** Keeps `position` for `channel` (written soon, and when the page hides). */
  set(channel, position) {
    this.leaving.delete(channel);
    this.channels.delete(channel);
    this.channels.set(channel, [position.epoch, position.seq, this.now()]);
    this.schedule();
  }

  /**
   * Forgets `channel` (the page stopped following it) at the next write: a subscription
   * taken up again before it (React's StrictMode mounts twice) still finds its position.
   */
  delete(channel) {
    if (this.channels.has(channel)) {
      this.leaving.add(channel);
      this.schedule();
    }
  }

  /**
   * The state kept under `name` by an earlier page of the tab (or this one), with the position
   * it stands for; `value` is `null` when it was too large to keep (refetch). `undefined`
   * when nothing is kept, or it is older than `maxAge`.
   * @param {string} name
   * @returns {{ value: any, position: Position } | undefined}
   */
  getKept(name) {
    let kept = this.dirty.get(name);
    if (!kept) {
      try {
        kept = JSON.parse(this.storage.getItem(this.keptKey(name)) ?? "null") ?? undefined;
      } catch {
        kept = undefined;
      }
    }
    const position = kept?.position;
    if (!kept || !(this.now() - kept.at <= this.options.maxAge)) return undefined;
    if (typeof position?.epoch !== "string" || !Number.isSafeInteger(position?.seq) || position.seq < 0) return undefined;
    return { value: kept.value ?? null, position: { epoch: position.epoch, seq: position.seq } };
  }

  /** Keeps `value` under `name`, standing for `position` (written soon, and when the page hides). */
  setKept(name, value, position) {
    this.dirty.set(name, { value, position: { epoch: position.epoch, seq: position.seq }, at: this.now() });
    this.schedule();
  }

  keptKey(name) {
    return `${KEPT_PREFIX}${this.scope}#${name}`;
  }

  schedule() {
    if (this.timer === undefined) this.timer = setTimeout(() => this.flush(), RESUME_WRITE_DELAY);
  }

  /** Writes what is kept now. */
  flush() {
    clearTimeout(this.timer);
    this.timer = undefined;
    for (const channel of this.leaving) this.channels.delete(channel);
    this.leaving.clear();
    // The most recently moved channels are kept (a Map iterates in insertion order).
    while (this.channels.size > this.options.maxChannels) this.channels.delete(this.channels.keys().next().value);
    const at = this.now();
    const dirty = this.dirty;
    this.dirty = new Map();
    try {
      for (const [name, kept] of dirty) {
        let record = JSON.stringify(kept);
        // Too large to keep: the next page is told to refetch rather than given a part.
        if (record.length > this.options.maxKeptBytes) record = JSON.stringify({ ...kept, value: null });
        this.storage.setItem(this.keptKey(name), record);
      }
      if (dirty.size > 0) this.prune(KEPT_PREFIX, this.options.maxKept);
      if (this.channels.size === 0) {
        this.storage.removeItem(this.key);
        return;
      }
      this.storage.setItem(this.key, JSON.stringify({ at, channels: Object.fromEntries(this.channels) }));
      this.prune(RESUME_PREFIX, this.options.maxScopes);
    } catch {
      // Full or blocked: the next page starts from now, as without `resume`.
    }
  }

  /**
   * Forgets everything kept for this scope (positions and kept state), e.g. when its user
   * signs out: the channel names a user followed stay in the tab otherwise, until pruned.
   */
  clear() {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.channels.clear();
    this.leaving.clear();
    this.dirty.clear();
    try {
      const prefix = this.keptKey("");
      const keys = [];
      for (let index = 0; index < this.storage.length; index += 1) {
        const key = this.storage.key(index);
        if (key === this.key || key?.startsWith(prefix)) keys.push(key);
      }
      for (const key of keys) this.storage.removeItem(key);
    } catch {
      // Blocked: nothing was kept either.
    }
  }

  /** Removes the oldest records under `prefix` past `most`. */
  prune(prefix, most) {
    const records = [];
    for (let index = 0; index < this.storage.length; index += 1) {
      const key = this.storage.key(index);
      if (!key?.startsWith(prefix)) continue;
      let at = 0;
      try {
        at = JSON.parse(this.storage.getItem(key) ?? "null")?.at ?? 0;
      } catch {
        // Unreadable: the oldest.
      }
      records.push({ key, at });
    }
    records.sort((a, b) => b.at - a.at);
    for (const { key } of records.slice(most)) this.storage.removeItem(key);
  }
}

/** The page's `sessionStorage`, when it has one it may use. */
function sessionStorageOrNothing() {
  try {
    return typeof sessionStorage === "undefined" ? undefined : sessionStorage;
  } catch {
    // Blocked (a sandboxed frame, storage disabled): no resume.
    return undefined;
  }
}

const ORDER = ["websocket", "sse", "long-polling"];
const IDLE = Object.freeze({ status: "idle" });

const wantsPresence = (handlers) => Boolean(handlers.presence || handlers.onPresence);

/**
 * What a channel asks of the server for all its subscriptions together: to appear (with the
 * first subscription's `info`) and to hear joins and leaves.
 */
function wireOptions(entry) {
  let presence;
  let joinLeave = false;
  let state = false;
  for (const { handlers } of entry.listeners) {
    if (handlers.presence && presence === undefined) presence = handlers.presence === true ? {} : { info: handlers.presence.info };
    if (handlers.onPresence) joinLeave = true;
    if (handlers.state) state = true;
  }
  return { presence, joinLeave, state };
}

/** Whether a channel asks the server for its state: a keyed subscription with no position yet. */
const wantsState = (entry) => entry.wire.state && (!entry.position || entry.stateWanted === true);

const sameWire = (a, b) => JSON.stringify(a) === JSON.stringify(b);

/** A connection to a resync server, shared by every subscription. */
export class ResyncClient {
  /**
   * @param {string} url the server's base URL (http or https), with the mount prefix if any
   * @param {{
   *   transport?: "auto" | TransportKind,
   *   token?: string,
   *   getToken?: () => Promise<string>,
   *   autoConnect?: boolean,
   *   upgradeAfter?: number,
   *   backoff?: Partial<typeof DEFAULT_BACKOFF>,
   *   heartbeatGrace?: number,
   *   sseIdleTimeout?: number,
   *   pollTimeout?: number,
   *   connectTimeout?: number,
   *   random?: () => number,
   *   resume?: boolean | { storage?: Storage, maxAge?: number, maxChannels?: number, maxScopes?: number },
   * }} [options]
   *   `autoConnect`: connect when made (the default in a browser); `false`, or outside a
   *   browser (server rendering, Node): stay `idle` until the first `subscribe` or `connect()`.
   *   `upgradeAfter`: when on SSE or long polling, try WebSocket again after about this long
   *   (ms, default 30000, doubling while it fails, at most 5 minutes; 0 never).
   *   `resume` (default true where `sessionStorage` exists): keep each channel's position in
   *   the tab's `sessionStorage` as events arrive, and on the next page of the tab (a reload,
   *   a link) follow a channel subscribed without `since` from there: the events missed
   *   between the pages arrive, or a typed reset. Scoped by server URL and token subject;
   *   positions older than `maxAge` (1 hour) are not offered. `false` starts every page from
   *   now.
   */
  constructor(url, options = {}) {
    this.baseUrl = url.endsWith("/") ? url : `${url}/`;
    this.options = {
      transport: "auto",
      heartbeatGrace: 10000,
      sseIdleTimeout: 40000,
      pollTimeout: 25,
      connectTimeout: 10000,
      upgradeAfter: 30000,
      random: Math.random,
      ...options,
      backoff: { ...DEFAULT_BACKOFF, ...(options.backoff || {}) },
    };
    this.token = options.token;
    this.positions = this.positionStore();
    /**
     * One entry per channel: the position the connection follows it from, and every
     * subscription of it, each with its own position.
     * @type {Map<string, { position?: Position, listeners: Set<{ handlers: any, position?: Position }>, members: Map<string, any>, membersKnown: boolean, wire: any }>}
     */
    this.channels = new Map();
    /** @type {ConnectionState} */
    this.state = IDLE;
    this.listeners = new Set();
    this.attempt = 0;
    this.failures = 0;
    this.remembered = undefined;
    this.session = undefined;
    this.timer = undefined;
    this.started = false;
    this.closed = false;
    this.nextId = 1;
    this.pending = new Map();
    this.reconnects = 0;
    this.upgradeTries = 0;
    this.onWake = (event) => {
      if (event?.type === "visibilitychange" && document.visibilityState !== "visible") {
        // A hidden page may be frozen or discarded next: what it stands at is written now.
        this.positions?.flush();
        return;
      }
      this.wake();
    };
    this.onHide = () => this.positions?.flush();
    if (options.autoConnect ?? (typeof window !== "undefined")) this.connect();
  }

  /** Starts connecting, if the client has not yet (see `autoConnect`). */
  connect() {
    if (this.started || this.closed) return;
    this.started = true;
    if (typeof window !== "undefined" && window.addEventListener) {
      window.addEventListener("online", this.onWake);
      window.addEventListener("focus", this.onWake);
      window.addEventListener("pagehide", this.onHide);
    }
    if (typeof document !== "undefined" && document.addEventListener) document.addEventListener("visibilitychange", this.onWake);
    this.setState({ status: "connecting", transport: this.order()[0] });
    queueMicrotask(() => this.open());
  }

  /** Where this client keeps its positions for the next page (`resume`), for its token. */
  positionStore() {
    const resume = this.options.resume ?? true;
    if (resume === false) return undefined;
    const storage = resume === true ? sessionStorageOrNothing() : (resume.storage ?? sessionStorageOrNothing());
    if (!storage) return undefined;
    // Encoded, so no subject's scope is a prefix of another's (`clear()` matches by prefix).
    return new PositionStore(storage, `${this.baseUrl}#${encodeURIComponent(tokenSubject(this.token))}`, resume === true ? {} : resume);
  }

  /** The transports to try, in order: the last one that worked first. */
  order() {
    if (this.options.transport !== "auto") return [this.options.transport];
    if (!this.remembered) return ORDER;
    return [this.remembered, ...ORDER.filter((kind) => kind !== this.remembered)];
  }

  /**
   * Observes the connection state; returns a function that stops observing.
   * @param {(state: ConnectionState) => void} listener
   */
  onState(listener) {
    this.listeners.add(listener);
    listener(this.state);
    return () => this.listeners.delete(listener);
  }

  setState(state) {
    this.state = state;
    for (const listener of this.listeners) listener(state);
  }

  /**
   * Follows `channel`. Events arrive in order, each once, across reconnects. A channel may be
   * followed by any number of subscriptions: the connection follows it once, and each
   * subscription keeps its own position (one `since` further back makes the connection
   * replay from there; the others do not see those events twice).
   * @param {string} channel
   * @param {{
   *   since?: Position,
   *   onEvent?: (event: ResyncEvent) => void,
   *   onReset?: (reset: ResyncReset) => void,
   *   onRecovery?: (recovery: any) => void,
   *   onError?: (error: ResyncError) => void,
   *   presence?: true | { info?: any },
   *   onPresence?: (members: Member[]) => void,
   *   resume?: boolean,
   * }} [handlers]
   *   `presence`: appear among the channel's members (with `info`); `onPresence`: be told the
   *   member list whenever it changes (over WebSocket: the list after each subscribe, then
   *   every join and leave; docs/presence.md). On SSE and long polling, neither: `onError`
   *   gets a `presence_unavailable` error, and the client moves to WebSocket when it can.
   *   Without `since`, a channel the previous page of this tab followed continues from where
   *   that page stood (the client's `resume`); `resume: false` starts from now.
   * @returns {{ channel: string, position: () => Position | undefined, unsubscribe: () => void }}
   */
  subscribe(channel, handlers = {}) {
    let entry = this.channels.get(channel);
    // A new page of the tab takes up where the previous one stood.
    const since = handlers.since ?? (!entry && handlers.resume !== false ? this.positions?.get(channel) : undefined);
    const listener = { handlers, position: since };
    if (!entry) {
      entry = { position: since, listeners: new Set([listener]), members: new Map(), membersKnown: false };
      entry.wire = wireOptions(entry);
      this.channels.set(channel, entry);
      this.session?.channelsChanged();
    } else {
      const before = entry.wire;
      entry.listeners.add(listener);
      entry.wire = wireOptions(entry);
      let rewind = false;
      // A keyed subscription joining a channel already followed: the connection asks for the
      // state again, for it (the others skip what they have).
      if (handlers.state) {
        entry.stateWanted = true;
        rewind = true;
      }
      if (handlers.since && isBefore(handlers.since, entry.position)) {
        entry.position = handlers.since;
        rewind = true;
      }
      // Without `since`, from now: from where the channel is followed.
      if (!listener.position && entry.position && !rewind) listener.position = entry.position;
      if (rewind || this.presenceChanged(before, entry.wire)) {
        this.session?.resubscribe(channel);
      } else if (handlers.onPresence && entry.membersKnown) {
        queueMicrotask(() => {
          if (entry.listeners.has(listener)) handlers.onPresence([...entry.members.values()]);
        });
      }
    }
    if (wantsPresence(handlers) && this.state.status === "connected" && !this.state.capabilities.presence) {
      const transport = this.state.transport;
      queueMicrotask(() => {
        if (entry.listeners.has(listener)) handlers.onError?.(presenceUnavailable(transport));
      });
    }
    this.connect();
    return {
      channel,
      position: () => listener.position,
      unsubscribe: () => this.unsubscribe(channel, entry, listener),
    };
  }

  unsubscribe(channel, entry, listener) {
    if (!entry.listeners.delete(listener) || this.channels.get(channel) !== entry) return;
    if (entry.listeners.size === 0) {
      this.channels.delete(channel);
      this.positions?.delete(channel);
      this.session?.channelsChanged();
      return;
    }
    const before = entry.wire;
    entry.wire = wireOptions(entry);
    if (this.presenceChanged(before, entry.wire)) this.session?.resubscribe(channel);
  }

  /** Whether the connection must subscribe again for new presence options (WebSocket only has presence). */
  presenceChanged(before, after) {
    return this.session?.kind === "websocket" && !sameWire(before, after);
  }

  /**
   * Follows a keyed channel as a map of its keys' latest values (docs/protocol.md, section
   * 14): the channel's state first, then every change, applied by the rule that keeps each
   * key's latest value with nothing missed and nothing applied twice. A client the history
   * no longer reaches gets the state again (no refetch of yours); a reset (the channel's
   * history restarted) starts over from the state too, and is told to `onReset`.
   * @param {string} channel
   * @param {{
   *   onChange: (values: Map<string, any>, changed: string[]) => void,
   *   onReset?: (reset: ResyncReset) => void,
   *   onError?: (error: ResyncError) => void,
   * }} handlers `onChange` gets the values (key to data) after the state is whole and after
   *   each change, with the keys that changed.
   * @returns {{ values: () => Map<string, any>, unsubscribe: () => void }}
   */
  subscribeKeyed(channel, handlers) {
    /** @type {Map<string, { seq: number, data: any }>} data `null`: deleted (kept for the seq) */
    let held = new Map();
    let building;
    let lastKey;
    let subscription;
    let stopped = false;
    const values = () => new Map([...held].filter(([, kept]) => kept.data !== null).map(([key, kept]) => [key, kept.data]));
    const start = () => {
      subscription = this.subscribe(channel, {
        state: true,
        resume: false,
        onRecovery: (recovery) => {
          // A state starts (again, after a cut halfway): from nothing.
          if (recovery.outcome === "state") building = undefined;
        },
        onState: (page) => {
          // A page that does not go on after the last key read starts a new state (long
          // polling carries no recovery: a cut halfway shows this way).
          if (building && page.entries.length > 0 && lastKey !== undefined && page.entries[0].key <= lastKey) building = undefined;
          building ??= new Map();
          for (const entry of page.entries) building.set(entry.key, { seq: entry.seq, data: entry.data });
          lastKey = page.entries.length > 0 ? page.entries[page.entries.length - 1].key : lastKey;
          if (page.more) return;
          lastKey = undefined;
          const changed = [...new Set([...held.keys(), ...building.keys()])];
          held = building;
          building = undefined;
          handlers.onChange(values(), changed);
        },
        onEvent: (event) => {
          if (event.key === undefined || building) return;
          const kept = held.get(event.key);
          if (kept && kept.seq >= event.seq) return; // already in the state
          held.set(event.key, { seq: event.seq, data: event.data });
          handlers.onChange(values(), [event.key]);
        },
        onReset: (reset) => {
          handlers.onReset?.(reset);
          // Another history: its state, from the start.
          subscription.unsubscribe();
          building = undefined;
          if (!stopped) queueMicrotask(() => !stopped && start());
        },
        onError: handlers.onError,
      });
    };
    start();
    return {
      values,
      unsubscribe: () => {
        stopped = true;
        subscription.unsubscribe();
      },
    };
  }

  /**
   * Loads a snapshot, follows the channel from its position, and loads a new snapshot on
   * every reset. A failed load is tried again after the client's backoff (`onFetchError`
   * says so; keep the state you have until the next `onSnapshot`), and so is a reload after a
   * snapshot that met a reset before any event (a snapshot from a server being replaced).
   * @template S
   * @param {string} channel
   * @param {() => Promise<{ state: S, position: Position }>} fetchSnapshot
   * @param {{
   *   onSnapshot: (state: S, reset?: ResyncReset, position?: Position) => void,
   *   onEvent: (event: ResyncEvent) => void,
   *   onFetchError?: (error: unknown, retryIn: number) => void,
   *   onError?: (error: ResyncError) => void,
   *   restore?: () => { state: S, position: Position } | undefined,
   * }} handlers
   *   `restore`: the state this page kept from an earlier page (e.g. in `sessionStorage`,
   *   with the position of the last event it applied): followed from that position with no
   *   fetch; a reset then loads a snapshot as usual.
   */
  subscribeWithSnapshot(channel, fetchSnapshot, handlers) {
    let subscription;
    let stopped = false;
    let timer;
    let failures = 0;
    const later = (reset) => {
      const wait = backoffDelay(failures++, this.options.backoff, this.options.random);
      timer = setTimeout(() => start(reset), wait);
      return wait;
    };
    let kept;
    try {
      kept = handlers.restore?.();
    } catch {
      kept = undefined;
    }
    const start = async (reset) => {
      if (stopped) return;
      let snapshot;
      try {
        snapshot = kept ?? (await fetchSnapshot());
        kept = undefined;
      } catch (error) {
        if (stopped) return;
        handlers.onFetchError?.(error, later(reset));
        return;
      }
      if (stopped) return;
      handlers.onSnapshot(snapshot.state, reset, snapshot.position);
      let followed = false;
      // Follow from exactly the snapshot's position: nothing between is lost.
      const current = this.subscribe(channel, {
        since: snapshot.position,
        onEvent: (event) => {
          followed = true;
          failures = 0;
          handlers.onEvent(event);
        },
        onReset: (next) => {
          current.unsubscribe();
          if (followed) start(next);
          else later(next); // the snapshot was stale on arrival: wait before the next one
        },
        onError: handlers.onError,
      });
      subscription = current;
    };
    start(undefined);
    return {
      unsubscribe: () => {
        stopped = true;
        clearTimeout(timer);
        subscription?.unsubscribe();
      },
    };
  }

  /**
   * Publishes over the WebSocket (the server must allow it). Resolves to the stored position.
   * Rejects with a `ResyncError`: `publish_unavailable` on SSE or long polling (they carry
   * nothing to the server; `state.capabilities.publish` says so), `not_connected` otherwise.
   * @param {string} channel
   * @param {any} data
   * @param {{ idempotencyKey?: string }} [options]
   * @returns {Promise<Position>}
   */
  publish(channel, data, options = {}) {
    if (this.state.status === "connected" && !this.state.capabilities.publish) {
      const transport = this.state.transport;
      return Promise.reject(
        new ResyncError("publish_unavailable", `publishing needs a WebSocket; this connection is on ${transport}`, { transport }),
      );
    }
    if (!this.session || this.session.kind !== "websocket" || this.state.status !== "connected") {
      return Promise.reject(new ResyncError("not_connected", `publishing needs a connected WebSocket (the client is ${this.state.status})`));
    }
    const id = this.nextId++;
    const frame = { type: "publish", id, channel, data };
    if (options.idempotencyKey) frame.idempotency_key = options.idempotencyKey;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.session.send(frame);
    });
  }

  /**
   * Uses `token` from now on: the client reconnects with it at once (a new user, new
   * permissions), and every channel resumes from its position. For a token that is only
   * renewed, prefer `getToken`, which refreshes it in place over WebSocket.
   * @param {string | undefined} token
   */
  setToken(token) {
    if (token === this.token) return;
    this.token = token;
    // Another user's positions are kept apart: the channels followed now go on from where
    // they stand, under the new subject's record.
    this.positions?.flush();
    this.positions = this.positionStore();
    for (const [channel, entry] of this.channels) if (entry.position) this.positions?.set(channel, entry.position);
    if (!this.started || this.closed) return;
    clearTimeout(this.timer);
    this.cancelUpgrade();
    const session = this.session;
    this.session = undefined;
    session?.close();
    this.failPending("reconnected with a new token");
    this.open();
  }

  /** Stops everything: closes the connection (1000), cancels timers, never reconnects. */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.cancelUpgrade();
    if (typeof window !== "undefined" && window.removeEventListener) {
      window.removeEventListener("online", this.onWake);
      window.removeEventListener("focus", this.onWake);
      window.removeEventListener("pagehide", this.onHide);
    }
    this.positions?.flush();
    if (typeof document !== "undefined" && document.removeEventListener) document.removeEventListener("visibilitychange", this.onWake);
    this.session?.close();
    this.session = undefined;
    for (const { reject } of this.pending.values()) reject(new ResyncError("closed", "client closed"));
    this.pending.clear();
    this.setState({ status: "closed", reason: "closed by the application" });
  }

  /**
   * Drops the connection as a network cut would, stays away for `ms`, then reconnects and
   * resumes every channel from its position: for demos and tests of the catch-up.
   * @param {number} ms
   */
  disconnectFor(ms) {
    if (this.closed) return;
    clearTimeout(this.timer);
    this.cancelUpgrade();
    const session = this.session;
    // Forgotten first, so its end is not taken for a failure to react to.
    this.session = undefined;
    session?.close();
    this.reconnects += 1;
    this.setState({ status: "reconnecting", attempt: this.attempt, delay: ms });
    this.timer = setTimeout(() => this.open(), ms);
  }

  /** Reconnects at once, if the client is waiting to. */
  reconnectNow() {
    if (this.closed) return;
    if (this.state.status === "reconnecting") {
      clearTimeout(this.timer);
      this.attempt = 0;
      this.open();
    }
  }

  // ---- internals ----

  /**
   * The page came back (online, focus, shown): a client waiting to reconnect does it now,
   * after a random moment of at most half a second, so that pages woken together spread out.
   */
  wake() {
    if (this.closed || this.state.status !== "reconnecting") return;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), Math.floor(this.options.random() * WAKE_JITTER));
  }

  deliver(event) {
    const entry = this.channels.get(event.channel);
    if (!entry || isDuplicate(entry.position, event)) return;
    const position = { epoch: event.epoch, seq: event.seq };
    entry.position = position;
    this.positions?.set(event.channel, position);
    for (const listener of [...entry.listeners]) {
      if (isDuplicate(listener.position, event)) continue;
      listener.position = position;
      listener.handlers.onEvent?.(event);
    }
  }

  /**
   * A page of a keyed channel's state (docs/protocol.md, section 14): handed to every
   * subscription of the channel; with the last page the channel stands at the state's position.
   */
  keyedState(frame) {
    const entry = this.channels.get(frame.channel);
    if (!entry) return;
    const page = { channel: frame.channel, entries: frame.entries, position: frame.position, more: frame.more === true };
    if (!page.more) {
      // The connection follows from the older of its position and the state's.
      if (!entry.position || !isBefore(entry.position, frame.position)) entry.position = frame.position;
      entry.stateWanted = false;
      this.positions?.set(frame.channel, entry.position);
    }
    for (const listener of [...entry.listeners]) {
      // The state's readers stand at its position; the others keep their place (the server
      // replays from the older of the two: they miss nothing).
      if (!page.more && (listener.position === undefined || (listener.handlers.onState && isBefore(listener.position, frame.position)))) {
        listener.position = frame.position;
      }
      listener.handlers.onState?.(page);
    }
  }

  reset(reset) {
    const entry = this.channels.get(reset.channel);
    if (!entry) return;
    entry.position = reset.position;
    this.positions?.set(reset.channel, reset.position);
    for (const listener of [...entry.listeners]) {
      if (!resetConcerns(listener.position, reset.position)) continue;
      listener.position = reset.position;
      listener.handlers.onReset?.(reset);
    }
  }

  fresh(channel, position) {
    const entry = this.channels.get(channel);
    if (!entry) return;
    if (!entry.position) {
      entry.position = position;
      this.positions?.set(channel, position);
    }
    for (const listener of entry.listeners) if (!listener.position) listener.position = position;
  }

  /** Replaces (`members`) or changes (`join`, `leave`) a channel's member list. A long list
   * comes in pages (`more` on every page but the last): it replaces the list once whole. */
  presence(channel, change) {
    const entry = this.channels.get(channel);
    if (!entry) return;
    if (change.members) {
      const pages = (entry.memberPages ??= []);
      pages.push(...change.members);
      if (change.more) return;
      entry.memberPages = undefined;
      entry.members = new Map(pages.map((member) => [member.id, member]));
      entry.membersKnown = true;
    }
    if (change.join) entry.members.set(change.join.id, change.join);
    if (change.leave) entry.members.delete(change.leave.id);
    const members = [...entry.members.values()];
    for (const listener of [...entry.listeners]) listener.handlers.onPresence?.(members);
  }

  recovery(channel, recovery) {
    if (recovery.outcome === "fresh") this.fresh(channel, recovery.position);
    if (recovery.outcome === "reset") this.reset({ channel, reason: recovery.reason, position: recovery.position });
    for (const listener of [...(this.channels.get(channel)?.listeners ?? [])]) listener.handlers.onRecovery?.(recovery);
  }

  /** Tells every subscription of `channel` (all channels without one) of `error`. */
  fail(channel, error) {
    const entries = channel === undefined ? [...this.channels.values()] : [this.channels.get(channel)];
    for (const entry of entries) for (const listener of [...(entry?.listeners ?? [])]) listener.handlers.onError?.(error);
  }

  /** The server ended a channel's subscription by itself: tell the page, do not take it up again. */
  ended(channel, reason) {
    const entry = this.channels.get(channel);
    this.channels.delete(channel);
    this.positions?.delete(channel);
    for (const listener of [...(entry?.listeners ?? [])]) {
      listener.handlers.onError?.(new ResyncError("unsubscribed", `the server ended the subscription (${reason})`, { reason }));
    }
  }

  cursor() {
    const positions = new Map();
    for (const [channel, entry] of this.channels) if (entry.position) positions.set(channel, entry.position);
    return formatCursor(positions);
  }

  url(path, params) {
    const url = new URL(path, this.baseUrl);
    for (const [name, value] of params) url.searchParams.append(name, value);
    return url;
  }

  channelParams() {
    const params = [...this.channels.keys()].map((channel) => ["channel", channel]);
    const cursor = this.cursor();
    if (cursor) params.push(["cursor", cursor]);
    // The keyed channels that want their state, by name (also where the cursor names them).
    const state = [...this.channels].filter(([, entry]) => wantsState(entry)).map(([channel]) => channel);
    if (state.length > 0) params.push(["state", state.join(",")]);
    if (this.token) params.push(["token", this.token]);
    return params;
  }

  failPending(why) {
    for (const { reject } of this.pending.values()) reject(new ResyncError("connection_lost", why));
    this.pending.clear();
  }

  /**
   * One connection attempt, on the `index`th transport of `order()`. `walking`: the server
   * answered, so a transport that does not open is refused on the way (a proxy), and the
   * next one is tried at once.
   */
  open(index = 0, walking = false) {
    if (this.closed) return;
    clearTimeout(this.timer);
    const order = this.order();
    if (index >= order.length) return this.scheduleReconnect("backoff");
    const kind = order[index];
    if (kind !== "websocket" && this.channels.size === 0) {
      // SSE and polling need a channel; wait for one.
      const idle = () => this.open(index, walking);
      this.session = { kind: "idle", channelsChanged: idle, resubscribe: idle, close() {}, send() {} };
      return;
    }
    this.setState({ status: "connecting", transport: kind });
    const Session = kind === "websocket" ? WebSocketSession : kind === "sse" ? SseSession : PollSession;
    const session = new Session(this, (outcome) => this.sessionEnded(session, index, walking, outcome));
    this.session = session;
    session.start();
  }

  connected(session) {
    if (session.probe) return this.upgraded(session);
    if (session !== this.session) return;
    this.connectedAt = Date.now();
    this.failures = 0;
    if (this.options.transport === "auto") this.remembered = session.kind;
    this.setState({ status: "connected", transport: session.kind, capabilities: { ...CAPABILITIES[session.kind] } });
    if (session.kind !== "websocket") {
      for (const entry of this.channels.values()) {
        for (const listener of [...entry.listeners]) {
          if (wantsPresence(listener.handlers)) listener.handlers.onError?.(presenceUnavailable(session.kind));
        }
      }
      this.planUpgrade();
    }
  }

  /** On SSE or long polling: plans a try of WebSocket, which replaces the connection if it opens. */
  planUpgrade() {
    clearTimeout(this.upgradeTimer);
    const after = this.options.upgradeAfter;
    if (this.options.transport !== "auto" || !(after > 0) || typeof WebSocket === "undefined") return;
    const ceiling = Math.min(after * 2 ** Math.min(this.upgradeTries, 20), Math.max(after, UPGRADE_MAX));
    const delay = Math.floor(ceiling * (0.5 + 0.5 * this.options.random()));
    this.upgradeTimer = setTimeout(() => this.tryUpgrade(), delay);
  }

  tryUpgrade() {
    if (this.closed || this.probe || this.state.status !== "connected" || this.session?.kind === "websocket") return;
    const probe = new WebSocketSession(this, (outcome) => {
      if (probe === this.session) return this.sessionEnded(probe, 0, false, outcome);
      if (probe !== this.probe) return;
      this.probe = undefined;
      this.upgradeTries += 1;
      this.planUpgrade();
    });
    probe.probe = true;
    this.probe = probe;
    probe.start();
  }

  /** The WebSocket tried beside SSE or long polling opened: it takes over, from the positions. */
  upgraded(probe) {
    if (probe !== this.probe || this.closed || this.state.status !== "connected") {
      probe.close();
      return;
    }
    this.probe = undefined;
    probe.probe = false;
    this.upgradeTries = 0;
    const previous = this.session;
    this.session = probe;
    previous?.close();
    this.connected(probe);
  }

  cancelUpgrade() {
    clearTimeout(this.upgradeTimer);
    this.probe?.close();
    this.probe = undefined;
  }

  /** @param {{ type: "refused" | "lost" | "closed" | "resubscribe" | "unauthorized", code?: number, retry?: number }} outcome */
  async sessionEnded(session, index, walking, outcome) {
    if (session !== this.session || this.closed) return;
    this.session = undefined;
    this.cancelUpgrade();
    this.failPending("connection lost before the reply");
    if (this.connectedAt && Date.now() - this.connectedAt >= this.options.backoff.resetAfter) this.attempt = 0;
    this.connectedAt = undefined;
    switch (outcome.type) {
      case "refused":
        return this.refused(index, walking);
      case "resubscribe":
        return this.open(0);
      case "unauthorized":
        return this.refreshThen("backoff");
      case "closed": {
        const advice = closeAdvice(outcome.code ?? 1006);
        if (advice === "stop") {
          this.closed = true;
          const why = outcome.reason ? `: ${outcome.reason}` : "";
          this.setState({ status: "closed", reason: `server closed with ${outcome.code}${why}` });
          return;
        }
        if (advice === "refresh-token") return this.refreshThen("soon");
        return this.scheduleReconnect(advice === "soon" ? "soon" : "backoff");
      }
      default:
        return this.scheduleReconnect(outcome.retry !== undefined ? "retry" : "backoff", outcome.retry);
    }
  }

  /**
   * A transport did not open. When the server is down, every transport fails alike: trying
   * the others only adds failed requests (and console errors). So the client tries the
   * transport that worked last, again, with backoff; only when it has failed a few times in
   * a row (at once, before anything worked) does it ask whether the server answers HTTP at
   * all, and if it does (a proxy refuses that transport), it goes on to the next transport.
   */
  async refused(index, walking) {
    const order = this.order();
    if (index + 1 >= order.length) return this.scheduleReconnect("backoff");
    if (walking) return this.open(index + 1, true);
    this.failures += 1;
    if (this.failures < (this.remembered ? FALLBACK_AFTER : 1)) return this.scheduleReconnect("backoff");
    this.failures = 0;
    const reachable = await this.reachable();
    if (this.closed || this.session || this.state.status !== "connecting") return; // something else took over meanwhile
    if (reachable) return this.open(index + 1, true);
    this.scheduleReconnect("backoff");
  }

  /** Whether the server answers HTTP (any status below 500). */
  async reachable() {
    if (typeof fetch === "undefined") return true;
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), this.options.connectTimeout);
    try {
      const response = await fetch(this.url("poll", [["timeout", "0"]]), { cache: "no-store", signal: controller.signal });
      return response.status < 500;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  async refreshThen(kind) {
    if (this.options.getToken) {
      try {
        this.token = await this.options.getToken();
      } catch (error) {
        this.closed = true;
        this.setState({ status: "closed", reason: `token refresh failed: ${error}` });
        return;
      }
    }
    this.scheduleReconnect(kind);
  }

  scheduleReconnect(kind, retry) {
    if (this.closed) return;
    const random = this.options.random;
    let delay;
    if (kind === "soon") delay = Math.floor(random() * this.options.backoff.soon);
    else if (kind === "retry") delay = retry + Math.floor(random() * this.options.backoff.soon);
    else delay = backoffDelay(this.attempt++, this.options.backoff, random);
    this.reconnects += 1;
    this.setState({ status: "reconnecting", attempt: this.attempt, delay });
    this.timer = setTimeout(() => this.open(), delay);
  }
}

function presenceUnavailable(transport) {
  return new ResyncError(
    "presence_unavailable",
    `presence needs a WebSocket; this connection is on ${transport} (the client moves to a WebSocket when it can)`,
    { transport },
  );
}

class WebSocketSession {
  constructor(client, ended) {
    this.kind = "websocket";
    this.client = client;
    this.ended = ended;
    this.subscribed = new Set();
    this.requests = new Map();
    /**
     * The channels whose latest subscribe is not yet answered, with its id. Their frames
     * until the answer belong to an earlier subscription of the channel (a resubscribe from
     * another position or with other presence options): the new one brings them again.
     */
    this.awaiting = new Map();
  }

  start() {
    if (typeof WebSocket === "undefined") {
      // Not in this runtime (Node before 22): as if refused, so the next transport is tried.
      queueMicrotask(() => this.finish({ type: "refused" }));
      return;
    }
    const url = this.client.url("ws", this.client.token ? [["token", this.client.token]] : []);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    let opened = false;
    this.socket = new WebSocket(url);
    this.lastHeard = Date.now();
    this.connectTimer = setTimeout(() => this.finish({ type: opened ? "lost" : "refused" }), this.client.options.connectTimeout);
    this.socket.onopen = () => {
      opened = true;
    };
    this.socket.onmessage = (message) => {
      this.lastHeard = Date.now();
      this.onFrame(JSON.parse(message.data));
    };
    this.socket.onclose = (close) => {
      // A socket that never opened was refused or blocked on the way: let the next transport try.
      if (!opened) return this.finish({ type: "refused" });
      this.finish(close.code === 1006 ? { type: "lost" } : { type: "closed", code: close.code, reason: close.reason });
    };
  }

  onFrame(frame) {
    const client = this.client;
    switch (frame.type) {
      case "connected": {
        clearTimeout(this.connectTimer);
        const silence = frame.ping_interval_ms + client.options.heartbeatGrace;
        this.watchdog = setInterval(() => {
          if (Date.now() - this.lastHeard > silence) this.finish({ type: "lost" });
        }, 1000);
        client.connected(this);
        this.channelsChanged();
        this.scheduleRefresh(frame.expires_at);
        break;
      }
      case "refreshed":
        if (frame.id === this.refreshId) {
          this.refreshId = undefined;
          this.scheduleRefresh(frame.expires_at);
        }
        break;
      case "unsubscribed":
        // The server ended the subscription by itself (a refreshed token no longer allows
        // it, or the application unsubscribed the user): tell the page, do not take it up again.
        if (frame.reason) {
          this.subscribed.delete(frame.channel);
          this.awaiting.delete(frame.channel);
          client.ended(frame.channel, frame.reason);
        }
        break;
      case "event":
        if (!this.awaiting.has(frame.channel)) client.deliver(frame);
        break;
      case "subscribed": {
        // An answer to a subscribe that a later one replaced: that one's answer follows.
        if (this.awaiting.get(frame.channel) !== frame.id) break;
        this.awaiting.delete(frame.channel);
        client.recovery(frame.channel, frame.recovery);
        // The list, once subscribed: the joins and leaves that follow change it.
        if (client.channels.get(frame.channel)?.wire.joinLeave) {
          this.send({ type: "presence", id: client.nextId++, channel: frame.channel });
        }
        break;
      }
      case "presence":
        if (!this.awaiting.has(frame.channel)) client.presence(frame.channel, { members: frame.members, more: frame.more === true });
        break;
      case "join":
        if (!this.awaiting.has(frame.channel)) client.presence(frame.channel, { join: frame.member });
        break;
      case "leave":
        if (!this.awaiting.has(frame.channel)) client.presence(frame.channel, { leave: frame.member });
        break;
      case "reset":
        if (!this.awaiting.has(frame.channel)) client.reset(frame);
        break;
      case "state":
        if (!this.awaiting.has(frame.channel)) client.keyedState(frame);
        break;
      case "published": {
        const pending = client.pending.get(frame.id);
        client.pending.delete(frame.id);
        pending?.resolve(frame.position);
        break;
      }
      case "error": {
        const pending = client.pending.get(frame.id);
        if (frame.id !== undefined && frame.id === this.refreshId) {
          // The new token was refused: this connection lasts until its token expires (4300),
          // and the reconnect asks getToken again.
          this.refreshId = undefined;
        } else if (pending) {
          client.pending.delete(frame.id);
          pending.reject(new ResyncError(frame.code, frame.message));
        } else if (this.requests.has(frame.id)) {
          const channel = this.requests.get(frame.id);
          this.requests.delete(frame.id);
          if (this.awaiting.get(channel) === frame.id) {
            this.subscribed.delete(channel);
            this.awaiting.delete(channel);
            client.fail(channel, new ResyncError(frame.code, frame.message));
          }
        }
        break;
      }
      case "ping":
        this.send({ type: "pong" });
        break;
      default:
        break;
    }
  }

  ready() {
    return this.socket?.readyState === WebSocket.OPEN && this.client.session === this && this.client.state.status === "connected";
  }

  channelsChanged() {
    if (!this.ready()) return;
    for (const [channel, entry] of this.client.channels) {
      if (this.subscribed.has(channel)) continue;
      this.subscribed.add(channel);
      const id = this.client.nextId++;
      this.requests.set(id, channel);
      this.awaiting.set(channel, id);
      const frame = { type: "subscribe", id, channel };
      if (entry.position) frame.since = entry.position;
      if (entry.wire.presence) frame.presence = entry.wire.presence;
      if (entry.wire.joinLeave) frame.join_leave = true;
      if (wantsState(entry)) frame.state = true;
      this.send(frame);
    }
    for (const channel of [...this.subscribed]) {
      if (this.client.channels.has(channel)) continue;
      this.subscribed.delete(channel);
      this.awaiting.delete(channel);
      this.send({ type: "unsubscribe", id: this.client.nextId++, channel });
    }
  }

  /** Subscribes to `channel` again, from its position and with its presence options now. */
  resubscribe(channel) {
    if (!this.ready()) return;
    if (this.subscribed.delete(channel)) this.send({ type: "unsubscribe", id: this.client.nextId++, channel });
    this.channelsChanged();
  }

  send(frame) {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(frame));
  }

  /**
   * Plans the in-place refresh of a token expiring at `expiresAt` (Unix seconds): when 15-25%
   * of its time is left (at most a minute ahead), jittered so that clients whose tokens were
   * issued together do not refresh together. Only with `getToken`.
   */
  scheduleRefresh(expiresAt) {
    clearTimeout(this.refreshTimer);
    if (expiresAt === undefined || !this.client.options.getToken) return;
    const remaining = Math.max(0, expiresAt * 1000 - Date.now());
    const lead = Math.min(remaining * (0.15 + 0.1 * this.client.options.random()), 60_000);
    this.refreshTimer = setTimeout(() => this.refresh(), remaining - lead);
  }

  async refresh() {
    let token;
    try {
      token = await this.client.options.getToken();
    } catch {
      return; // the connection lasts until its token expires; the reconnect tries again
    }
    if (this.done) return;
    this.client.token = token;
    this.refreshId = this.client.nextId++;
    this.send({ type: "refresh", id: this.refreshId, token });
  }

  finish(outcome) {
    if (this.done) return;
    this.done = true;
    clearTimeout(this.connectTimer);
    clearTimeout(this.refreshTimer);
    clearInterval(this.watchdog);
    if (this.socket) {
      this.socket.onclose = null;
      this.socket.onmessage = null;
      try {
        this.socket.close();
      } catch {
        // already closed
      }
    }
    this.ended(outcome);
  }

  close() {
    this.done = true;
    clearTimeout(this.connectTimer);
    clearTimeout(this.refreshTimer);
    clearInterval(this.watchdog);
    if (this.socket) {
      this.socket.onclose = null;
      this.socket.onmessage = null;
      this.socket.close(1000, "done");
    }
  }
}

class SseSession {
  constructor(client, ended) {
    this.kind = "sse";
    this.client = client;
    this.ended = ended;
  }

  start() {
    const client = this.client;
    if (typeof EventSource === "undefined") {
      queueMicrotask(() => this.finish({ type: "refused" }));
      return;
    }
    this.following = [...client.channels.keys()].join(",");
    const source = new EventSource(client.url("sse", client.channelParams()));
    this.source = source;
    let opened = false;
    this.lastHeard = Date.now();
    this.connectTimer = setTimeout(() => this.finish({ type: opened ? "lost" : "refused" }), client.options.connectTimeout);
    const heard = () => {
      this.lastHeard = Date.now();
    };
    source.addEventListener("subscribed", (message) => {
      heard();
      opened = true;
      clearTimeout(this.connectTimer);
      const { channels } = JSON.parse(message.data);
      for (const [channel, recovery] of Object.entries(channels)) client.recovery(channel, recovery);
      client.connected(this);
      this.watchdog = setInterval(() => {
        if (Date.now() - this.lastHeard > client.options.sseIdleTimeout) this.finish({ type: "lost" });
      }, 1000);
    });
    source.onmessage = (message) => {
      heard();
      client.deliver(JSON.parse(message.data));
    };
    source.addEventListener("reset", (message) => {
      heard();
      client.reset(JSON.parse(message.data));
    });
    source.addEventListener("state", (message) => {
      heard();
      client.keyedState(JSON.parse(message.data));
    });
    source.addEventListener("ping", heard);
    // The application ended a subscription, or the whole connection (docs/auth.md).
    source.addEventListener("unsubscribed", (message) => {
      heard();
      const { channel, reason } = JSON.parse(message.data);
      client.ended(channel, reason);
      this.channelsChanged();
    });
    source.addEventListener("disconnect", (message) => {
      const { reason, reconnect } = JSON.parse(message.data);
      if (reconnect) return this.finish({ type: "closed", code: 4203 });
      this.finish({ type: "closed", code: 4005, reason });
    });
    // EventSource would reconnect by itself with a stale URL; this client manages positions and
    // backoff itself, so it closes and reconnects on its own terms.
    source.onerror = () => this.finish(opened ? { type: "lost", retry: 1000 } : { type: "refused" });
  }

  channelsChanged() {
    const now = [...this.client.channels.keys()].join(",");
    if (now !== this.following) this.finish({ type: "resubscribe" });
  }

  /** A stream's channels and positions are fixed by its URL: open another. */
  resubscribe() {
    this.finish({ type: "resubscribe" });
  }

  send() {}

  finish(outcome) {
    if (this.done) return;
    this.close();
    this.ended(outcome);
  }

  close() {
    this.done = true;
    clearTimeout(this.connectTimer);
    clearInterval(this.watchdog);
    this.source?.close();
  }
}

class PollSession {
  constructor(client, ended) {
    this.kind = "long-polling";
    this.client = client;
    this.ended = ended;
  }

  start() {
    this.loop(false);
  }

  async loop(connected) {
    const client = this.client;
    while (!this.done) {
      const params = client.channelParams();
      params.push(["timeout", String(client.options.pollTimeout)]);
      // A keyed channel's state that the last reply held in part goes on where it stopped.
      if (this.stateAfter?.length) params.push(["state_after", this.stateAfter.join(",")]);
      this.controller = new AbortController();
      const deadline = setTimeout(
        () => this.controller.abort(),
        client.options.pollTimeout * 1000 + client.options.connectTimeout,
      );
      let reply;
      try {
        const response = await fetch(client.url("poll", params), { signal: this.controller.signal, cache: "no-store" });
        if (response.status === 401) return this.finish({ type: "unauthorized" });
        if (!response.ok) return this.finish({ type: connected ? "lost" : response.status >= 500 ? "lost" : "refused" });
        reply = await response.json();
      } catch {
        if (this.restarting) {
          this.restarting = false;
          continue;
        }
        return this.finish({ type: connected ? "lost" : "refused" });
      } finally {
        clearTimeout(deadline);
      }
      if (this.done) return;
      if (!connected) {
        connected = true;
        client.connected(this);
      }
      for (const reset of reply.resets) client.reset(reset);
      for (const frame of reply.events) {
        if (frame.type === "state") client.keyedState(frame);
        else client.deliver(frame);
      }
      this.stateAfter = reply.state_after ?? [];
      for (const [channel, position] of parseCursor(reply.cursor)) client.fresh(channel, position);
      // The application ended a subscription, or the whole connection (docs/auth.md): the
      // same meaning as on SSE and WebSocket.
      for (const { channel, reason } of reply.unsubscribed ?? []) client.ended(channel, reason);
      if (reply.disconnect) {
        const { reason, reconnect } = reply.disconnect;
        if (reconnect) return this.finish({ type: "closed", code: 4203 });
        return this.finish({ type: "closed", code: 4005, reason });
      }
    }
  }

  channelsChanged() {
    // Poll again at once with the new channel set.
    this.restarting = true;
    this.controller?.abort();
  }

  /** The next poll carries the channel's position: poll again at once. */
  resubscribe() {
    this.channelsChanged();
  }

  send() {}

  finish(outcome) {
    if (this.done) return;
    this.close();
    this.ended(outcome);
  }

  close() {
    this.done = true;
    this.controller?.abort();
  }
}
