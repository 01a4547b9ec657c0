// The WebSocket transport: one socket for the page, many runs over it. Events are routed
// to streams by request_id (until the start event names the message) and by message_id.
// Same handler contract as the SSE transport: onEvent, onRequestError, onDrop.

import { ApiError, randomId } from "./api.js";

const TERMINAL = new Set(["end", "error"]);
const PING_MS = 20000;
const SILENCE_MS = 45000;

class WsClient {
  constructor() {
    this.ws = null;
    this.opening = null;
    this.byRequest = new Map();
    this.byMessage = new Map();
    this.lastHeard = 0;
    this.pinger = null;
  }

  url() {
    return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
  }

  /** Resolve with an open socket, connecting if needed; reject if it cannot connect. */
  open() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) return Promise.resolve(this.ws);
    if (this.opening) return this.opening;
    this.opening = new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url());
      ws.onopen = () => {
        this.ws = ws;
        this.opening = null;
        this.lastHeard = Date.now();
        this.pinger = setInterval(() => this.ping(), PING_MS);
        resolve(ws);
      };
      ws.onmessage = (m) => {
        this.lastHeard = Date.now();
        this.dispatch(JSON.parse(m.data));
      };
      ws.onclose = () => {
        if (this.opening && this.ws !== ws) {
          this.opening = null;
          reject(new ApiError(0, "network", "The WebSocket could not connect."));
          return;
        }
        this.lost(ws);
      };
    });
    return this.opening;
  }

  ping() {
    if (!this.ws) return;
    if (Date.now() - this.lastHeard > SILENCE_MS) {
      this.ws.close(); // dead but not yet noticed by the browser
      this.lost(this.ws);
      return;
    }
    this.ws.send(JSON.stringify({ op: "ping" }));
  }

  lost(ws) {
    if (this.ws !== ws) return;
    clearInterval(this.pinger);
    this.ws = null;
    const streams = new Set([...this.byRequest.values(), ...this.byMessage.values()]);
    this.byRequest.clear();
    this.byMessage.clear();
    for (const s of streams) if (!s.closed) s.h.onDrop();
  }

  dispatch(ev) {
    if (ev.type === "pong") return;
    let s = ev.request_id ? this.byRequest.get(ev.request_id) : undefined;
    if (s && ev.type === "error" && ev.seq === undefined) {
      // about our request, not a run: a 409, a bad field, an unknown op
      this.forget(s);
      const { type, code, message, status, request_id: _, ...extra } = ev;
      s.h.onRequestError(new ApiError(status || 400, code, message, extra));
      return;
    }
    if (s && ev.type === "start") {
      s.mid = ev.message_id;
      this.byMessage.set(s.mid, s);
    }
    s = s || this.byMessage.get(ev.message_id);
    if (!s || s.closed) return; // a run this page no longer follows
    if (TERMINAL.has(ev.type)) this.forget(s);
    s.h.onEvent(ev);
  }

  forget(s) {
    this.byRequest.delete(s.requestId);
    if (s.mid && this.byMessage.get(s.mid) === s) this.byMessage.delete(s.mid);
  }

  /** Send an op and route its events to handlers h; returns {close()}. */
  request(op, fields, h, mid = null) {
    const s = { requestId: randomId(), mid, h, closed: false };
    s.close = () => {
      s.closed = true;
      this.forget(s);
    };
    this.byRequest.set(s.requestId, s);
    if (mid) this.byMessage.set(mid, s);
    this.open().then(
      (ws) => {
        if (!s.closed) ws.send(JSON.stringify({ op, request_id: s.requestId, ...fields }));
      },
      () => {
        this.forget(s);
        if (!s.closed) h.onDrop();
      },
    );
    return { close: () => s.close() };
  }
}

const client = new WsClient();

export const wsTransport = {
  name: "ws",
  send: (cid, body, h) => client.request("send", { conversation_id: cid, ...body }, h),
  regenerate: (cid, body, h) => client.request("regenerate", { conversation_id: cid, ...body }, h),
  continue: (cid, mid, h) =>
    client.request("continue", { conversation_id: cid, message_id: mid }, h, mid),
  resume: (cid, mid, after, h) => client.request("resume", { message_id: mid, after }, h, mid),
  cancel: async (cid, mid) => {
    const ws = await client.open();
    ws.send(JSON.stringify({ op: "cancel", message_id: mid }));
  },
};
