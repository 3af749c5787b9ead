/*
 * RoomSocket: a WebSocket to a Rooms server that stays connected.
 * Served by every Rooms server at /_rooms/client.js:
 *
 *   <script src="/_rooms/client.js"></script>
 *   <script>
 *     let lastSeq = 0;
 *     const socket = new RoomSocket("/api/room/lobby/websocket", {
 *       // the first frame of every connection: here a join that resumes after what we saw
 *       hello: () => JSON.stringify({ name: "alice", after: lastSeq }),
 *       heartbeat: { message: "ping", reply: "pong" },   // the room class's auto_reply
 *     });
 *     socket.addEventListener("message", (event) => console.log(event.data));
 *     socket.addEventListener("statechange", (event) => console.log(event.detail.state));
 *     socket.send("hello");   // sent now, or queued until the next connection
 *   </script>
 *
 * What it does:
 * - Reconnects after any close or error, after a delay drawn uniformly from
 *   [0, min(maxDelay, minDelay * 2^attempt)) ("full jitter"), so that thousands of clients
 *   dropped at once (a server restart: close code 1012) do not return at once. The attempt
 *   count resets when a connection receives its first message (the server accepted us).
 * - Does not reconnect after a close that says retrying is pointless (1002, 1003, 1007,
 *   1008, 1009, 1010, or 4400-4499: use those codes from a room to turn a client away);
 *   override with `shouldReconnect(closeEvent)`.
 * - Sends `hello()` first on every connection, then what was queued while disconnected.
 *   The queue is bounded (`maxQueued`, 100): past it `send` returns false and drops nothing
 *   already queued.
 * - Heartbeat (optional): after `interval` ms without any message it sends `message`; if
 *   nothing at all arrives within `timeout` ms it treats the connection as dead and replaces
 *   it (browsers keep half-dead sockets "open" for minutes). Replies equal to `reply` are not
 *   dispatched. When the tab becomes visible again it checks at once.
 * - Waits while the browser is offline and connects as soon as it is back online.
 *
 * State (`socket.state`, and the "statechange" event's detail.state):
 *   "connecting" -> "open" -> ("waiting" | "offline") -> "connecting" ... and "closed" (for good).
 * Events: "open", "message" (MessageEvent), "close" (detail: {code, reason, wasClean} of
 * the socket that closed), "statechange" (detail: {state, retryIn: ms or undefined}).
 */
(function (global) {
  "use strict";

  const NO_RETRY = new Set([1002, 1003, 1007, 1008, 1009, 1010]);

  const DEFAULTS = {
    hello: null,              // () => string | string[] | null
    protocols: undefined,     // WebSocket subprotocols
    minDelay: 500,            // ms
    maxDelay: 15000,          // ms
    connectTimeout: 10000,    // ms for the WebSocket to open
    maxQueued: 100,           // messages kept while disconnected
    heartbeat: null,          // { message, reply, interval: 25000, timeout: 10000 }
    shouldReconnect: (event) => !NO_RETRY.has(event.code) && !(event.code >= 4400 && event.code <= 4499),
    binaryType: "arraybuffer",
  };

  function absoluteUrl(url) {
    const resolved = new URL(url, global.location ? global.location.href : undefined);
    if (resolved.protocol === "http:") resolved.protocol = "ws:";
    if (resolved.protocol === "https:") resolved.protocol = "wss:";
    return resolved.href;
  }

  class RoomSocket extends EventTarget {
    constructor(url, options = {}) {
      super();
      this.url = absoluteUrl(url);
      this.options = { ...DEFAULTS, ...options };
      if (this.options.heartbeat) {
        this.options.heartbeat = { interval: 25000, timeout: 10000, ...this.options.heartbeat };
      }
      this.state = "connecting";
      this.attempt = 0;
      this._queue = [];
      this._ws = null;
      this._timers = {};
      this._onOnline = () => { if (this.state === "offline" || this.state === "waiting") this.reconnect(); };
      this._onVisible = () => { if (!global.document.hidden) this._probe(); };
      global.addEventListener?.("online", this._onOnline);
      global.document?.addEventListener("visibilitychange", this._onVisible);
      // After the caller's code has run, so listeners added right after `new` see everything.
      queueMicrotask(() => { if (this.state !== "closed") this._connect(); });
    }

    /** Messages waiting for the next connection. */
    get queued() { return this._queue.length; }

    /** Send now if connected, else queue (bounded). False if it could not be kept. */
    send(data) {
      if (this.state === "closed") return false;
      if (this._ws && this._ws.readyState === WebSocket.OPEN) {
        this._ws.send(data);
        return true;
      }
      if (this._queue.length >= this.options.maxQueued) return false;
      this._queue.push(data);
      return true;
    }

    /** Drop the current connection (if any) and connect again now, backoff reset. */
    reconnect() {
      if (this.state === "closed") return;
      this.attempt = 0;
      this._abandon(4000, "reconnect");
      this._connect();
    }

    /** Close for good: no more reconnects. Queued messages are discarded. */
    close(code = 1000, reason = "") {
      if (this.state === "closed") return;
      this._abandon(code, reason);
      this._queue = [];
      global.removeEventListener?.("online", this._onOnline);
      global.document?.removeEventListener("visibilitychange", this._onVisible);
      this._setState("closed");
    }

    // -- internals ------------------------------------------------------------------------

    _setState(state, retryIn) {
      this.state = state;
      this.dispatchEvent(new CustomEvent("statechange", { detail: { state, retryIn } }));
    }

    _clear(...names) {
      for (const name of names.length ? names : Object.keys(this._timers)) {
        clearTimeout(this._timers[name]);
        delete this._timers[name];
      }
    }

    _connect() {
      this._clear();
      if (global.navigator && global.navigator.onLine === false) {
        this._setState("offline");
        return;
      }
      let ws;
      try {
        ws = new WebSocket(this.url, this.options.protocols);
      } catch (error) {   // e.g. a malformed URL: retrying would not help
        console.error("RoomSocket:", error);
        this.close();
        return;
      }
      ws.binaryType = this.options.binaryType;
      this._ws = ws;
      this._heard = false;
      this._setState("connecting");
      this._timers.connect = setTimeout(() => this._lost(ws, { code: 4008, reason: "connect timeout", wasClean: false }), this.options.connectTimeout);
      ws.onopen = () => this._opened(ws);
      ws.onmessage = (event) => this._received(ws, event);
      ws.onclose = (event) => this._lost(ws, event);
      ws.onerror = () => {};   // always followed by close
    }

    _opened(ws) {
      if (ws !== this._ws) return;
      this._clear("connect");
      const hello = this.options.hello ? this.options.hello() : null;
      for (const frame of hello == null ? [] : [].concat(hello)) ws.send(frame);
      const queue = this._queue;
      this._queue = [];
      for (const data of queue) ws.send(data);
      this._setState("open");
      this.dispatchEvent(new Event("open"));
      this._armHeartbeat();
    }

    _received(ws, event) {
      if (ws !== this._ws) return;
      if (!this._heard) { this._heard = true; this.attempt = 0; }
      this._armHeartbeat();
      const beat = this.options.heartbeat;
      if (beat && beat.reply !== undefined && event.data === beat.reply) return;
      this.dispatchEvent(new MessageEvent("message", { data: event.data }));
    }

    _armHeartbeat() {
      const beat = this.options.heartbeat;
      if (!beat) return;
      this._clear("beat", "dead");
      this._timers.beat = setTimeout(() => this._probe(), beat.interval);
    }

    // Send a heartbeat now; if nothing comes back in time, the connection is dead.
    _probe() {
      const beat = this.options.heartbeat, ws = this._ws;
      if (!beat || !ws || ws.readyState !== WebSocket.OPEN || this._timers.dead) return;
      ws.send(beat.message);
      this._timers.dead = setTimeout(() => this._lost(ws, { code: 4001, reason: "heartbeat timeout", wasClean: false }), beat.timeout);
    }

    _abandon(code, reason) {
      this._clear();
      const ws = this._ws;
      this._ws = null;
      if (!ws) return;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(code, reason); } catch { ws.close(); }
    }

    _lost(ws, event) {
      if (ws !== this._ws) return;
      this._abandon(1000, "");
      const { code, reason, wasClean } = event;
      this.dispatchEvent(new CustomEvent("close", { detail: { code, reason, wasClean } }));
      if (this.state === "closed") return;   // closed by a "close" listener
      if (!this.options.shouldReconnect(event)) {
        this.close();
        return;
      }
      if (global.navigator && global.navigator.onLine === false) {
        this._setState("offline");
        return;
      }
      const ceiling = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** this.attempt);
      const delay = Math.random() * ceiling;
      this.attempt++;
      this._timers.retry = setTimeout(() => this._connect(), delay);
      this._setState("waiting", delay);
    }
  }

  global.RoomSocket = RoomSocket;
})(typeof window !== "undefined" ? window : globalThis);
