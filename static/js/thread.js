// The open conversation's messages, in order: user messages and answers, with the
// actions that belong to the last of each.

import { Answer } from "./answer.js";
import { button, el } from "./dom.js";

export class Thread {
  /** controls: regenerate(answer), continue(answer), edit(userItem) */
  constructor(root, controls) {
    this.root = root;
    this.controls = controls;
    this.items = []; // {role: "user", id, content, el, edit} | {role: "assistant", answer}
    this.empty();
  }

  empty() {
    const shown = this.root.querySelector(".empty");
    if (this.items.length) {
      shown?.remove();
    } else if (!shown) {
      const box = el("div", "empty");
      box.append(
        el("h2", null, "What can I help with?"),
        el("p", null, "Enter sends, Shift+Enter adds a line, Esc stops an answer."),
      );
      this.root.append(box);
    }
  }

  /** Add a user message (`m` as the API returns it, or {content} before it is sent). */
  addUser(m) {
    const item = { role: "user", id: m.id || null, content: m.content };
    item.el = el("article", "msg user");
    item.edit = button(
      "Edit",
      "btn small edit",
      () => this.controls.edit(item),
      "Edit and resend",
    );
    const actions = el("div", "actions");
    actions.append(item.edit);
    item.el.append(el("div", "bubble", m.content), actions);
    this.root.append(item.el);
    this.items.push(item);
    this.empty();
    return item;
  }

  /** Add an answer (`m` as the API returns it, or {} for a new one). */
  addAnswer(m) {
    const answer = new Answer(m, this.controls);
    this.root.append(answer.el);
    this.items.push({ role: "assistant", answer });
    this.empty();
    return answer;
  }

  itemOf(answer) {
    return this.items.find((x) => x.answer === answer);
  }

  remove(item) {
    if (!item) return;
    const i = this.items.indexOf(item);
    if (i >= 0) this.items.splice(i, 1);
    if (item.answer) item.answer.dispose();
    else item.el.remove();
    this.empty();
  }

  /** Remove `item` and everything after it. */
  removeFrom(item) {
    for (const x of this.items.slice(this.items.indexOf(item))) this.remove(x);
  }

  clear() {
    for (const item of this.items) item.answer?.dispose();
    this.items = [];
    this.root.replaceChildren();
    this.empty();
  }

  /** Only the last answer offers Regenerate/Retry/Continue, only the last message Edit. */
  refresh(live) {
    const lastAnswer = this.items.findLast((x) => x.role === "assistant");
    const lastUser = this.items.findLast((x) => x.role === "user");
    for (const item of this.items) {
      if (item.answer) {
        item.answer.setLast(item === lastAnswer, live);
      } else {
        // the last message's Edit keeps its place while unusable, so nothing jumps
        item.edit.hidden = item !== lastUser;
        item.edit.classList.toggle("invisible", live || !item.id);
      }
    }
  }

  /** Ask every answer to draw its current state (after the tab was hidden). */
  redraw() {
    for (const item of this.items) item.answer?.scheduleRender();
  }
}
