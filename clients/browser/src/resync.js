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
/**
 * @typedef {{ status: "connecting", transport: TransportKind }
 *   | { status: "connected", transport: TransportKind }
 *   | { status: "reconnecting", attempt: number, delay: number }
 *   | { status: "closed", reason: string }} ConnectionState
 */

/** Backoff defaults: full jitter, 0.5 s initial ceiling, doubling, 20 s cap, reset after 10 s up. */
export const DEFAULT_BACKOFF = Object.freeze({ initial: 500, max: 20000, resetAfter: 10000, soon: 1000 });

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

const ORDER = ["websocket", "sse", "long-polling"];

/** A connection to a resync server, shared by every subscription. */
export class ResyncClient {
  /**
   * @param {string} url the server's base URL (http or https), with the mount prefix if any
   * @param {{
   *   transport?: "auto" | TransportKind,
   *   token?: string,
   *   getToken?: () => Promise<string>,
   *   backoff?: Partial<typeof DEFAULT_BACKOFF>,
   *   heartbeatGrace?: number,
   *   sseIdleTimeout?: number,
   *   pollTimeout?: number,
   *   connectTimeout?: number,
   *   random?: () => number,
   * }} [options]
   */
  constructor(url, options = {}) {
    this.baseUrl = url.endsWith("/") ? url : `${url}/`;
    this.options = {
      transport: "auto",
      heartbeatGrace: 10000,
      sseIdleTimeout: 40000,
      pollTimeout: 25,
      connectTimeout: 10000,
      random: Math.random,
      ...options,
      backoff: { ...DEFAULT_BACKOFF, ...(options.backoff || {}) },
    };
    this.token = options.token;
    /** @type {Map<string, { position?: Position, handlers: any }>} */
    this.channels = new Map();
    /** @type {ConnectionState} */
    this.state = { status: "connecting", transport: this.order()[0] };
    this.listeners = new Set();
    this.attempt = 0;
    this.remembered = undefined;
    this.session = undefined;
    this.timer = undefined;
    this.closed = false;
    this.nextId = 1;
    this.pending = new Map();
    this.reconnects = 0;
    this.onOnline = () => this.reconnectNow();
    if (typeof window !== "undefined") window.addEventListener("online", this.onOnline);
    queueMicrotask(() => this.connect());
  }

  /** The transports to try, in order. */
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
   * Follows `channel`. Events arrive in order, each once, across reconnects.
   * @param {string} channel
   * @param {{
   *   since?: Position,
   *   onEvent?: (event: ResyncEvent) => void,
   *   onReset?: (reset: ResyncReset) => void,
   *   onError?: (error: { code: string, message: string }) => void,
   *   presence?: true | { info?: any },
   *   onPresence?: (members: Member[]) => void,
   * }} [handlers]
   *   `presence`: appear among the channel's members (with `info`); `onPresence`: be told the
   *   member list whenever it changes (over WebSocket: the list after each subscribe, then
   *   every join and leave; docs/presence.md).
   * @returns {{ channel: string, position: () => Position | undefined, unsubscribe: () => void }}
   */
  subscribe(channel, handlers = {}) {
    if (this.channels.has(channel)) throw new Error(`already subscribed to ${channel}`);
    this.channels.set(channel, { position: handlers.since, handlers, members: new Map() });
    this.session?.channelsChanged();
    return {
      channel,
      position: () => this.channels.get(channel)?.position,
      unsubscribe: () => {
        if (this.channels.delete(channel)) this.session?.channelsChanged();
      },
    };
  }

  /**
   * Loads a snapshot, follows the channel from its position, and loads a new snapshot on
   * every reset.
   * @template S
   * @param {string} channel
   * @param {() => Promise<{ state: S, position: Position }>} fetchSnapshot
   * @param {{ onSnapshot: (state: S, reset?: ResyncReset) => void, onEvent: (event: ResyncEvent) => void }} handlers
   */
  subscribeWithSnapshot(channel, fetchSnapshot, handlers) {
    let subscription;
    let stopped = false;
    const start = async (reset) => {
      subscription?.unsubscribe();
      const { state, position } = await fetchSnapshot();
      if (stopped) return;
      handlers.onSnapshot(state, reset);
      subscription = this.subscribe(channel, {
        since: position,
        onEvent: handlers.onEvent,
        onReset: (next) => start(next),
      });
    };
    start(undefined);
    return {
      unsubscribe: () => {
        stopped = true;
        subscription?.unsubscribe();
      },
    };
  }

  /**
   * Publishes over the WebSocket (the server must allow it). Resolves to the stored position.
   * @param {string} channel
   * @param {any} data
   * @param {{ idempotencyKey?: string }} [options]
   * @returns {Promise<Position>}
   */
  publish(channel, data, options = {}) {
    if (!this.session || this.session.kind !== "websocket" || this.state.status !== "connected") {
      return Promise.reject(new Error("publishing needs a connected websocket"));
    }
    const id = this.nextId++;
    const frame = { type: "publish", id, channel, data };
    if (options.idempotencyKey) frame.idempotency_key = options.idempotencyKey;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.session.send(frame);
    });
  }

  /** Stops everything: closes the connection (1000), cancels timers, never reconnects. */
  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (typeof window !== "undefined") window.removeEventListener("online", this.onOnline);
    this.session?.close();
    this.session = undefined;
    for (const { reject } of this.pending.values()) reject(new Error("client closed"));
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
    const session = this.session;
    // Forgotten first, so its end is not taken for a failure to react to.
    this.session = undefined;
    session?.close();
    this.reconnects += 1;
    this.setState({ status: "reconnecting", attempt: this.attempt, delay: ms });
    this.timer = setTimeout(() => this.connect(), ms);
  }

  /** Reconnects at once (the browser came back online). */
  reconnectNow() {
    if (this.closed) return;
    if (this.state.status === "reconnecting") {
      clearTimeout(this.timer);
      this.attempt = 0;
      this.connect();
    }
  }

  // ---- internals ----

  deliver(event) {
    const entry = this.channels.get(event.channel);
    if (!entry || isDuplicate(entry.position, event)) return;
    entry.position = { epoch: event.epoch, seq: event.seq };
    entry.handlers.onEvent?.(event);
  }

  reset(reset) {
    const entry = this.channels.get(reset.channel);
    if (!entry) return;
    entry.position = reset.position;
    entry.handlers.onReset?.(reset);
  }

  fresh(channel, position) {
    const entry = this.channels.get(channel);
    if (entry && !entry.position) entry.position = position;
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
    }
    if (change.join) entry.members.set(change.join.id, change.join);
    if (change.leave) entry.members.delete(change.leave.id);
    entry.handlers.onPresence?.([...entry.members.values()]);
  }

  recovery(channel, recovery) {
    if (recovery.outcome === "fresh") this.fresh(channel, recovery.position);
    if (recovery.outcome === "reset") this.reset({ channel, reason: recovery.reason, position: recovery.position });
    this.channels.get(channel)?.handlers.onRecovery?.(recovery);
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
    if (this.token) params.push(["token", this.token]);
    return params;
  }

  async connect(index = 0) {
    if (this.closed) return;
    const order = this.order();
    if (index >= order.length) return this.scheduleReconnect("backoff");
    const kind = order[index];
    if (kind !== "websocket" && this.channels.size === 0) {
      // SSE and polling need a channel; wait for one.
      this.session = { kind: "idle", channelsChanged: () => this.connect(), close() {}, send() {} };
      return;
    }
    this.setState({ status: "connecting", transport: kind });
    const Session = kind === "websocket" ? WebSocketSession : kind === "sse" ? SseSession : PollSession;
    const session = new Session(this, (outcome) => this.sessionEnded(session, index, outcome));
    this.session = session;
    session.start();
  }

  connected(session) {
    if (session !== this.session) return;
    this.connectedAt = Date.now();
    if (this.options.transport === "auto") this.remembered = session.kind;
    this.setState({ status: "connected", transport: session.kind });
  }

  /** @param {{ type: "refused" | "lost" | "closed" | "resubscribe" | "unauthorized", code?: number, retry?: number }} outcome */
  async sessionEnded(session, index, outcome) {
    if (session !== this.session || this.closed) return;
    this.session = undefined;
    for (const { reject } of this.pending.values()) reject(new Error("connection lost before the reply"));
    this.pending.clear();
    if (this.connectedAt && Date.now() - this.connectedAt >= this.options.backoff.resetAfter) this.attempt = 0;
    this.connectedAt = undefined;
    switch (outcome.type) {
      case "refused":
        return this.connect(index + 1);
      case "resubscribe":
        return this.connect(0);
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
    this.timer = setTimeout(() => this.connect(), delay);
  }
}

class WebSocketSession {
  constructor(client, ended) {
    this.kind = "websocket";
    this.client = client;
    this.ended = ended;
    this.subscribed = new Set();
    this.requests = new Map();
  }

  start() {
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
          const entry = client.channels.get(frame.channel);
          client.channels.delete(frame.channel);
          entry?.handlers.onError?.({ code: "unsubscribed", reason: frame.reason, message: `the server ended the subscription (${frame.reason})` });
        }
        break;
      case "event":
        client.deliver(frame);
        break;
      case "subscribed": {
        client.recovery(frame.channel, frame.recovery);
        // The list, once subscribed: the joins and leaves that follow change it.
        if (client.channels.get(frame.channel)?.handlers.onPresence) {
          this.send({ type: "presence", id: client.nextId++, channel: frame.channel });
        }
        break;
      }
      case "presence":
        client.presence(frame.channel, { members: frame.members, more: frame.more === true });
        break;
      case "join":
        client.presence(frame.channel, { join: frame.member });
        break;
      case "leave":
        client.presence(frame.channel, { leave: frame.member });
        break;
      case "reset":
        client.reset(frame);
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
          pending.reject(Object.assign(new Error(frame.message), { code: frame.code }));
        } else if (this.requests.has(frame.id)) {
          const channel = this.requests.get(frame.id);
          this.subscribed.delete(channel);
          client.channels.get(channel)?.handlers.onError?.({ code: frame.code, message: frame.message });
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

  channelsChanged() {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN || this.client.state.status !== "connected") return;
    for (const [channel, entry] of this.client.channels) {
      if (this.subscribed.has(channel)) continue;
      this.subscribed.add(channel);
      const id = this.client.nextId++;
      this.requests.set(id, channel);
      const frame = { type: "subscribe", id, channel };
      if (entry.position) frame.since = entry.position;
      const { presence, onPresence } = entry.handlers;
      if (presence) frame.presence = presence === true ? {} : { info: presence.info };
      if (onPresence) frame.join_leave = true;
      this.send(frame);
    }
    for (const channel of [...this.subscribed]) {
      if (this.client.channels.has(channel)) continue;
      this.subscribed.delete(channel);
      this.send({ type: "unsubscribe", id: this.client.nextId++, channel });
    }
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
    this.socket.onclose = null;
    this.socket.onmessage = null;
    try {
      this.socket.close();
    } catch {
      // already closed
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
    source.addEventListener("ping", heard);
    // The application ended a subscription, or the whole connection (docs/auth.md).
    source.addEventListener("unsubscribed", (message) => {
      heard();
      const { channel, reason } = JSON.parse(message.data);
      const entry = client.channels.get(channel);
      client.channels.delete(channel);
      entry?.handlers.onError?.({ code: "unsubscribed", reason, message: `the server ended the subscription (${reason})` });
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
      for (const event of reply.events) client.deliver(event);
      for (const [channel, position] of parseCursor(reply.cursor)) client.fresh(channel, position);
    }
  }

  channelsChanged() {
    // Poll again at once with the new channel set.
    this.restarting = true;
    this.controller?.abort();
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
