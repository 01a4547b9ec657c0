// JSON calls to /api/v1 with the server's error shape turned into ApiError.

export class ApiError extends Error {
  /** status 0 means the server could not be reached. */
  constructor(status, code, message, extra = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.extra = extra;
  }
}

/** Build an ApiError from a non-2xx response (JSON error body or not). */
export async function errorFromResponse(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    // not JSON (a proxy's error page, say)
  }
  const e = body && body.error;
  if (e && typeof e.message === "string") {
    const { code, message, ...extra } = e;
    return new ApiError(resp.status, code || "error", message, extra);
  }
  return new ApiError(resp.status, "error", `The server answered ${resp.status}.`);
}

export const SESSION = "/api/v1/session";

/** Tell the page its session is gone (a 401 anywhere): it shows the sign-in form. */
export function signedOut() {
  window.dispatchEvent(new Event("streamchat:signed-out"));
}

/** Call the API; resolves to the parsed JSON (null for 204), rejects with ApiError. */
export async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch {
    throw new ApiError(0, "network", "The server cannot be reached.");
  }
  if (!resp.ok) {
    const err = await errorFromResponse(resp);
    if (resp.status === 401 && path !== SESSION) signedOut();
    throw err;
  }
  if (resp.status === 204) return null;
  return resp.json();
}

export const conversationPath = (cid) => `/api/v1/conversations/${encodeURIComponent(cid)}`;
export const messagePath = (cid, mid) =>
  `${conversationPath(cid)}/messages/${encodeURIComponent(mid)}`;

/** A random id for client_message_id / request_id. */
export function randomId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
