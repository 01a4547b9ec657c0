// The SSE transport: fetch POST for new runs (reading the body stream frame by frame),
// EventSource on GET .../messages/{mid}/stream?after=<seq> to resume.
//
// Every stream reports to handlers {onEvent(ev), onRequestError(err), onDrop()}:
// onDrop means the connection ended before a terminal event; the caller resumes.

import { api, conversationPath, errorFromResponse, messagePath, signedOut } from "./api.js";

const TERMINAL = new Set(["end", "error"]);
// The server sends a comment ping every 15 s; this much silence means a dead connection.
const SILENCE_MS = 45000;

/** Parse an SSE byte stream, calling onFrame({id, data}) per event; resolves at EOF. */
export async function readFrames(body, onFrame, onBytes) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let data = [];
  let id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    onBytes();
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + (buf[nl] === "\r" && buf[nl + 1] === "\n" ? 2 : 1));
      if (line === "") {
        if (data.length) onFrame({ id, data: data.join("\n") });
        data = [];
        id = null;
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "id") id = value;
      }
    }
  }
}

function postStream(url, body, h) {
  const ctrl = new AbortController();
  let closed = false;
  let terminal = false;
  let timer = null;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => ctrl.abort(), SILENCE_MS);
  };
  (async () => {
    let resp;
    try {
      arm();
      resp = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(body),
        signal: ctrl.signal,
      });
    } catch {
      clearTimeout(timer);
      if (!closed) h.onDrop();
      return;
    }
    if (!resp.ok) {
      clearTimeout(timer);
      const err = await errorFromResponse(resp);
      if (resp.status === 401) signedOut();
      if (!closed) h.onRequestError(err);
      return;
    }
    try {
      await readFrames(
        resp.body,
        (frame) => {
          if (closed) return;
          const ev = JSON.parse(frame.data);
          if (TERMINAL.has(ev.type)) terminal = true;
          h.onEvent(ev);
        },
        arm,
      );
    } catch {
      // a network error or our abort: handled below
    }
    clearTimeout(timer);
    if (!closed && !terminal) h.onDrop();
  })();
  return {
    close() {
      closed = true;
      clearTimeout(timer);
      ctrl.abort();
    },
  };
}

function resumeStream(url, h) {
  const es = new EventSource(url);
  let closed = false;
  es.onmessage = (m) => {
    if (closed) return;
    const ev = JSON.parse(m.data);
    if (TERMINAL.has(ev.type)) {
      // EventSource would reconnect after the server ends the stream: stop it here
      closed = true;
      es.close();
    }
    h.onEvent(ev);
  };
  es.onerror = () => {
    // The browser would reconnect on its own after ~3 s (or give up on an HTTP error);
    // instead hand over to the caller, which resumes from its last applied seq with its
    // own backoff and shows that it is reconnecting.
    if (closed) return;
    closed = true;
    es.close();
    h.onDrop();
  };
  return {
    close() {
      closed = true;
      es.close();
    },
  };
}

export const sseTransport = {
  name: "sse",
  send: (cid, body, h) => postStream(`${conversationPath(cid)}/stream`, body, h),
  regenerate: (cid, body, h) => postStream(`${conversationPath(cid)}/regenerate`, body, h),
  continue: (cid, mid, h) => postStream(`${messagePath(cid, mid)}/continue`, {}, h),
  resume: (cid, mid, after, h) => resumeStream(`${messagePath(cid, mid)}/stream?after=${after}`, h),
  cancel: (cid, mid) => api("POST", `${messagePath(cid, mid)}/cancel`),
};
