// The conversation list: newest first (the server's order), open, rename in place,
// delete after a second click.

import { api, conversationPath } from "./api.js";
import { button, el } from "./dom.js";

const CONFIRM_MS = 4000;

export class ConversationList {
  /** hooks: activeId(), open(id), renamed(conversation), deleted(id), error(text) */
  constructor(root, hooks) {
    this.root = root;
    this.hooks = hooks;
    this.items = [];
  }

  /** Fetch the list and draw it; resolves to the list (unchanged on failure). */
  async load() {
    try {
      const data = await api("GET", "/api/v1/conversations?limit=200");
      this.items = data.conversations;
    } catch (err) {
      this.hooks.error(`Could not load conversations: ${err.message}`);
      return this.items;
    }
    this.render();
    return this.items;
  }

  find(id) {
    return this.items.find((c) => c.id === id);
  }

  clear() {
    this.items = [];
    this.render();
  }

  render() {
    const active = this.hooks.activeId();
    const rows = this.items.map((c) => {
      const li = el("li", "conv");
      li.dataset.id = c.id;
      if (c.id === active) li.classList.add("active");
      const title = c.title || "New chat";
      const open = button(title, "conv-open", () => this.hooks.open(c.id));
      open.title = title;
      const rename = button("✎", "btn icon rename", () => this.rename(li, c), "Rename");
      const del = button("✕", "btn icon delete", () => this.remove(li, del, c), "Delete");
      li.append(open, rename, del);
      return li;
    });
    if (!rows.length) rows.push(el("li", "conv-empty", "No conversations yet."));
    this.root.replaceChildren(...rows);
  }

  rename(li, c) {
    const input = el("input", "rename-input");
    input.value = c.title || "";
    input.maxLength = 200;
    input.setAttribute("aria-label", "New title");
    li.replaceChildren(input);
    input.focus();
    input.select();
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      const title = input.value.trim();
      if (save && title && title !== c.title) {
        try {
          this.hooks.renamed(await api("PATCH", conversationPath(c.id), { title }));
        } catch (err) {
          this.hooks.error(`Could not rename: ${err.message}`);
        }
      }
      this.load();
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") finish(true);
      else if (e.key === "Escape") finish(false);
    });
    input.addEventListener("blur", () => finish(true));
  }

  remove(li, del, c) {
    if (!li.classList.contains("confirm")) {
      li.classList.add("confirm");
      del.textContent = "Delete?";
      setTimeout(() => {
        li.classList.remove("confirm");
        del.textContent = "✕";
      }, CONFIRM_MS);
      return;
    }
    api("DELETE", conversationPath(c.id)).then(
      () => {
        this.hooks.deleted(c.id);
        this.load();
      },
      (err) => this.hooks.error(`Could not delete: ${err.message}`),
    );
  }
}
