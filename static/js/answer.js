// One assistant answer: its state (text, seq, status, metrics) and its DOM.
// Events are applied in seq order; an event at or below the last applied seq is a
// duplicate (a resume overlapping what we have) and is ignored.

import { button as makeButton, copyText, el, flashLabel } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

const button = (label, className, onClick, title) =>
  makeButton(label, `btn small ${className}`, onClick, title);

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** The metrics line: time to first token, tokens/s, token counts. */
export function metricsText(metrics, usage) {
  const parts = [];
  if (metrics && metrics.ttft_ms != null) parts.push(`TTFT ${formatMs(metrics.ttft_ms)}`);
  if (metrics && metrics.tokens_per_s != null) {
    parts.push(`${metrics.tokens_per_s.toFixed(1)} tok/s`);
  }
  if (usage) {
    const { prompt_tokens: p, completion_tokens: c } = usage;
    if (p != null && c != null) parts.push(`${p} prompt + ${c} completion tokens`);
    else if (c != null) parts.push(`${c} completion tokens`);
  }
  return parts.join(" · ");
}

export class Answer {
  /** `m` is a message as GET /conversations/{id} returns it (or {} for a new answer). */
  constructor(m, controls) {
    this.controls = controls;
    this.mid = m.id || null;
    this.seq = m.seq || 0;
    this.text = m.content || "";
    this.reasoning = m.reasoning || "";
    this.status = m.status || "streaming";
    this.error = m.error || null;
    this.usage = m.usage || null;
    this.metrics = m.metrics || null;
    this.provider = m.provider || null;
    this.model = m.model || null;
    this.startedAt = m.created_at ? m.created_at * 1000 : Date.now();
    this.awaitingFirst = this.status === "streaming" && !this.text && !this.reasoning;
    this.note = null; // server status message (retrying, fallback) or a client problem
    this.reconnecting = false;
    this.isLast = false;
    this.live = false;
    this.renderedText = null;
    this.frame = 0;
    this.ticker = null;
    this.build();
    this.render(true);
  }

  build() {
    this.el = el("article", "msg assistant");
    this.reasoningEl = el("details", "reasoning");
    this.reasoningEl.append(el("summary", null, "Reasoning"));
    this.reasoningBody = el("div", "reasoning-body");
    this.reasoningEl.append(this.reasoningBody);
    this.body = el("div", "md");
    this.meta = el("div", "meta");
    this.statusEl = el("span", "status");
    this.metricsEl = el("span", "metrics");
    this.actions = el("span", "actions");
    this.meta.append(this.statusEl, this.metricsEl, this.actions);
    this.el.append(this.reasoningEl, this.body, this.meta);
  }

  /** Start of a new run for this answer (send, regenerate, continue): reset the cursor. */
  begin() {
    this.seq = 0;
    this.status = "streaming";
    this.error = null;
    this.note = null;
    this.metrics = null;
    this.startedAt = Date.now();
    this.awaitingFirst = true;
    this.scheduleRender();
  }

  get displayStatus() {
    if (this.status === "streaming") return this.awaitingFirst ? "waiting" : "streaming";
    return this.status;
  }

  /** Apply one run event; returns "gap" if events are missing before it. */
  apply(ev) {
    if (ev.type === "start") {
      if (ev.replay) {
        // a finished message replayed in full: replace, never append
        this.text = "";
        this.reasoning = "";
      } else if (ev.seq <= this.seq) {
        return "dup";
      }
      this.mid = ev.message_id;
      this.seq = ev.seq;
      this.provider = ev.provider || this.provider;
      this.model = ev.model || this.model;
      this.scheduleRender();
      return "ok";
    }
    if (typeof ev.seq === "number") {
      if (ev.seq <= this.seq) return "dup";
      if (ev.seq > this.seq + 1) return "gap";
      this.seq = ev.seq;
    }
    this.reconnecting = false;
    switch (ev.type) {
      case "chunk":
        this.text += ev.content;
        this.awaitingFirst = false;
        this.note = null;
        break;
      case "reasoning":
        this.reasoning += ev.content;
        this.awaitingFirst = false;
        break;
      case "status":
        if (ev.state === "waiting") {
          // the server's count is the true one (this page may have been reloaded)
          if (typeof ev.waited === "number") this.startedAt = Date.now() - ev.waited * 1000;
          break;
        }
        this.note = ev.message || null;
        if (ev.state === "fallback") {
          this.provider = ev.to || this.provider;
          this.model = ev.model || this.model;
        }
        break;
      case "end":
        this.status = ev.status === "cancelled" ? "cancelled" : "complete";
        if (ev.usage) this.usage = ev.usage;
        if (ev.metrics) this.metrics = ev.metrics;
        this.note = null;
        break;
      case "error":
        this.status = ["interrupted", "cancelled"].includes(ev.status) ? ev.status : "failed";
        this.error = { code: ev.code, message: ev.message };
        this.note = null;
        break;
      default:
        break;
    }
    this.scheduleRender();
    return "ok";
  }

  /** Metrics and token counts from the stored message (a replay carries none). */
  setMetrics(metrics, usage) {
    this.metrics = metrics;
    this.usage = usage;
    this.actionsKey = null;
    this.renderMeta(this.displayStatus);
  }

  setReconnecting(on) {
    this.reconnecting = on;
    this.scheduleRender();
  }

  setNote(text) {
    this.note = text;
    this.scheduleRender();
  }

  scheduleRender() {
    if (this.frame) return;
    const run = () => {
      this.frame = 0;
      this.render();
    };
    // a hidden tab gets no animation frames; render soon anyway so the DOM stays true
    this.frameIsTimer = document.hidden;
    this.frame = this.frameIsTimer ? setTimeout(run, 100) : requestAnimationFrame(run);
  }

  render(force = false) {
    if (force || this.renderedText !== this.text) {
      renderMarkdown(this.text, this.body);
      this.renderedText = this.text;
    }
    if (this.reasoning) {
      this.reasoningEl.hidden = false;
      this.reasoningBody.textContent = this.reasoning;
    } else {
      this.reasoningEl.hidden = true;
    }
    const status = this.displayStatus;
    this.el.dataset.status = status;
    if (this.mid) this.el.dataset.messageId = this.mid;
    this.renderMeta(status);
    const ticking = status === "waiting";
    if (ticking && !this.ticker) {
      this.ticker = setInterval(() => this.renderMeta(this.displayStatus), 250);
    } else if (!ticking && this.ticker) {
      clearInterval(this.ticker);
      this.ticker = null;
    }
  }

  renderMeta(status) {
    let label = "";
    if (this.reconnecting && (status === "waiting" || status === "streaming")) {
      label = "Connection lost, reconnecting…";
    } else if (status === "waiting") {
      const secs = Math.max(0, Math.floor((Date.now() - this.startedAt) / 1000));
      label = `Waiting for the first token… ${secs} s`;
      if (this.note) label += ` · ${this.note}`;
    } else if (status === "streaming") {
      label = this.note ? `Streaming… · ${this.note}` : "Streaming…";
    } else if (status === "cancelled") {
      label = "Stopped";
    } else if (status === "failed") {
      label = `Failed: ${this.error ? this.error.message : "the answer did not finish."}`;
    } else if (status === "interrupted") {
      label = `Interrupted: ${this.error ? this.error.message : "the answer did not finish."}`;
    } else if (this.note) {
      label = this.note;
    }
    if (status === "complete" && this.note) label = this.note;
    this.statusEl.textContent = label;
    this.statusEl.className = `status ${status}`;
    const done = status !== "waiting" && status !== "streaming";
    const who = [this.provider, this.model].filter(Boolean).join(" / ");
    const m = done ? metricsText(this.metrics, this.usage) : "";
    this.metricsEl.textContent = [m, done ? who : ""].filter(Boolean).join(" · ");
    this.renderActions(status, done);
  }

  renderActions(status, done) {
    const key = `${status}|${done}|${this.isLast}|${this.live}|${Boolean(this.text)}`;
    if (this.actionsKey === key) return;
    this.actionsKey = key;
    const list = [];
    const c = this.controls;
    if (done && this.text) {
      const copy = button("Copy", "copy-answer", () => {
        copyText(this.text).then(
          () => flashLabel(copy, "Copied"),
          () => flashLabel(copy, "Copy failed"),
        );
      });
      list.push(copy);
    }
    if (done && this.isLast && !this.live) {
      if (status === "failed") list.push(button("Retry", "retry", () => c.regenerate(this)));
      // the server carries on from the saved text (interrupted, stopped or failed)
      if (status === "interrupted" || (this.text && ["cancelled", "failed"].includes(status))) {
        list.push(
          button("Continue", "continue", () => c.continue(this), "Carry on from where it stopped"),
        );
      }
      if (status !== "failed") {
        list.push(
          button("Regenerate", "regenerate", () => c.regenerate(this), "Answer the last message again"),
        );
      }
    }
    this.actions.replaceChildren(...list);
  }

  setLast(isLast, live) {
    this.isLast = isLast;
    this.live = live;
    this.renderMeta(this.displayStatus);
  }

  dispose() {
    if (this.ticker) clearInterval(this.ticker);
    if (this.frame && this.frameIsTimer) clearTimeout(this.frame);
    else if (this.frame) cancelAnimationFrame(this.frame);
    this.el.remove();
  }
}
