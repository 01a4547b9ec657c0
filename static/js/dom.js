// DOM helpers shared by the page's modules: elements are built and filled with text,
// never parsed from strings.

export const $ = (id) => document.getElementById(id);

/** A new element with an optional class and text (set as textContent). */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A type=button button. */
export function button(label, className, onClick, title) {
  const b = el("button", className, label);
  b.type = "button";
  if (title) {
    b.title = title;
    b.setAttribute("aria-label", title);
  }
  b.addEventListener("click", onClick);
  return b;
}

/** Copy text to the clipboard (the async API where allowed, else a hidden textarea). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = el("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

/** Show `label` on a button for a moment. */
export function flashLabel(target, label, ms = 1200) {
  const old = target.dataset.label || target.textContent;
  target.dataset.label = old;
  target.textContent = label;
  setTimeout(() => {
    target.textContent = old;
  }, ms);
}
