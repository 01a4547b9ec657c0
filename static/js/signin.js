// Signing in when the server runs with auth.mode = api_key: the key is exchanged for an
// HttpOnly, SameSite=Strict session cookie, which fetch, EventSource and the WebSocket
// all send. The page never stores the key.

import { SESSION, api } from "./api.js";

export class SignIn {
  /** ui: {panel, form, key, error, who, whoName, signout}; hooks: signedIn(), signedOut(explicit) */
  constructor(ui, hooks) {
    this.ui = ui;
    this.hooks = hooks;
    ui.form.addEventListener("submit", (e) => this.submit(e));
    ui.signout.addEventListener("click", () => this.signOut());
    window.addEventListener("streamchat:signed-out", () => {
      if (ui.panel.hidden) this.show("Your session has ended; sign in again.");
    });
  }

  /** The session, or null when the user must sign in (the form is then shown). */
  async check() {
    let session;
    try {
      session = await api("GET", SESSION);
    } catch (err) {
      if (err.status !== 401) return {}; // an older server or a blip: carry on
      this.show();
      return null;
    }
    this.showSession(session);
    return session;
  }

  show(message, explicit = false) {
    this.hooks.signedOut(explicit);
    this.ui.panel.hidden = false;
    this.ui.error.hidden = !message;
    this.ui.error.textContent = message || "";
    this.ui.key.focus();
  }

  showSession(session) {
    const named = session && session.mode && session.mode !== "none";
    this.ui.who.hidden = !named;
    this.ui.whoName.textContent = named ? `Signed in as ${session.user_id}` : "";
  }

  async submit(e) {
    e.preventDefault();
    const key = this.ui.key.value.trim();
    if (!key) return;
    try {
      await api("POST", SESSION, { key });
    } catch (err) {
      this.ui.error.textContent = err.message;
      this.ui.error.hidden = false;
      return;
    }
    this.ui.key.value = "";
    this.ui.panel.hidden = true;
    this.hooks.signedIn();
  }

  async signOut() {
    try {
      await api("DELETE", SESSION);
    } catch {
      // signed out here either way
    }
    this.showSession(null);
    this.show("", true);
  }
}
