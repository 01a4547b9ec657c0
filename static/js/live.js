// Keeps one answer attached to its run on the server until a terminal event, across
// dropped connections (resume from the last applied seq, with backoff), tab sleeps and
// transport switches. Re-attaching is always safe: the answer ignores events it has.

const MAX_BACKOFF_MS = 10000;
const STALE_MS = 5000;

export class Live {
  /**
   * hooks: onStart(ev), onFinish(live), onRequestError(err, live), onLost(live)
   * (onLost: the connection dropped before the run said who it is; reload and re-attach).
   */
  constructor(transport, cid, answer, hooks) {
    this.transport = transport;
    this.cid = cid;
    this.answer = answer;
    this.hooks = hooks;
    this.stream = null;
    this.kind = null;
    this.payload = null;
    this.done = false;
    this.stopRequested = false;
    this.attempt = 0;
    this.retryTimer = null;
    this.lastEvent = Date.now();
  }

  /** Start: kind is send | regenerate | continue | resume. */
  start(kind, payload = {}) {
    this.kind = kind;
    this.payload = payload;
    if (kind !== "resume") this.answer.begin();
    this.open(kind);
  }

  handlers() {
    // each stream gets its own handlers, so a replaced stream cannot act on this Live
    const h = {
      onEvent: (ev) => {
        if (this.stream === null || this.stream.h !== h) return;
        this.onEvent(ev);
      },
      onRequestError: (err) => {
        if (this.stream === null || this.stream.h !== h) return;
        this.onRequestError(err);
      },
      onDrop: () => {
        if (this.stream === null || this.stream.h !== h) return;
        this.onDrop();
      },
    };
    return h;
  }

  open(kind) {
    if (this.done) return;
    const h = this.handlers();
    const t = this.transport;
    let s;
    if (kind === "send") s = t.send(this.cid, this.payload, h);
    else if (kind === "regenerate") s = t.regenerate(this.cid, this.payload, h);
    else if (kind === "continue") s = t.continue(this.cid, this.answer.mid, h);
    else s = t.resume(this.cid, this.answer.mid, this.answer.seq, h);
    this.stream = { s, h };
  }

  closeStream() {
    if (this.stream) {
      this.stream.s.close();
      this.stream = null;
    }
  }

  onEvent(ev) {
    this.lastEvent = Date.now();
    this.attempt = 0;
    const hadMid = this.answer.mid;
    const result = this.answer.apply(ev);
    if (result === "gap") {
      this.restart();
      return;
    }
    if (ev.type === "start" && result === "ok") {
      if (this.stopRequested && !hadMid) this.stop();
      this.hooks.onStart(ev);
    }
    if ((ev.type === "end" || ev.type === "error") && result === "ok") this.finish();
  }

  onRequestError(err) {
    this.closeStream();
    if (err.code === "duplicate" && err.extra.message_id) {
      // our retried send had already started a run that has finished: show it
      this.answer.mid = err.extra.message_id;
      this.answer.seq = 0;
      this.open("resume");
      return;
    }
    this.done = true;
    this.answer.setReconnecting(false);
    this.hooks.onRequestError(err, this);
  }

  onDrop() {
    this.closeStream();
    if (this.done) return;
    this.answer.setReconnecting(true);
    const delay = Math.min(MAX_BACKOFF_MS, 400 * 2 ** this.attempt) * (0.75 + Math.random() / 2);
    this.attempt += 1;
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.reattach(), delay);
  }

  reattach() {
    this.retryTimer = null;
    if (this.done) return;
    if (this.answer.mid) {
      this.open("resume");
    } else if (this.kind === "send") {
      // the same client_message_id: the server attaches us to the run it already started
      this.open("send");
    } else {
      this.done = true;
      this.hooks.onLost(this);
    }
  }

  /** Reconnect now (the network is back, the tab woke up). */
  retryNow() {
    if (this.retryTimer) {
      clearTimeout(this.retryTimer);
      this.attempt = 0;
      this.reattach();
    }
  }

  /** Drop the current connection and resume from the last applied seq. */
  restart() {
    if (this.done || !this.answer.mid) return;
    this.closeStream();
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.open("resume");
  }

  /** The tab became visible: a connection silent for a while may be dead, so resume. */
  check() {
    if (this.retryTimer) this.retryNow();
    else if (Date.now() - this.lastEvent > STALE_MS) this.restart();
  }

  /** Ask the server to stop the run; the terminal event arrives on the stream. */
  stop() {
    this.stopRequested = true;
    if (!this.answer.mid || this.done) return;
    this.transport.cancel(this.cid, this.answer.mid).catch((err) => {
      this.answer.setNote(`Could not stop: ${err.message}`);
    });
  }

  finish() {
    this.done = true;
    this.closeStream();
    clearTimeout(this.retryTimer);
    this.answer.setReconnecting(false);
    this.hooks.onFinish(this);
  }

  /** Stop following (switching conversations); the run goes on on the server. */
  detach() {
    this.done = true;
    this.closeStream();
    clearTimeout(this.retryTimer);
  }
}
