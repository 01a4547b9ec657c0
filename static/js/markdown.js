// Markdown to DOM nodes. Nothing here parses HTML: every piece of model text becomes a
// Text node or an element's textContent, so model output can never inject markup, and
// the only attribute taken from it is a link's href after a scheme check.

import { copyText, el, flashLabel } from "./dom.js";

const ALLOWED_SCHEMES = new Set(["http:", "https:", "mailto:"]);

/** The href to use for a link target, or null when it is not http(s)/mailto. */
export function safeHref(raw) {
  const s = String(raw).trim();
  if (!/^(https?:\/\/|mailto:)/i.test(s)) return null;
  let url;
  try {
    url = new URL(s);
  } catch {
    return null;
  }
  return ALLOWED_SCHEMES.has(url.protocol) ? url.href : null;
}

function link(href, parent) {
  const a = el("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  parent.append(a);
  return a;
}

// ---- blocks --------------------------------------------------------------------------

const FENCE_RE = /^( {0,3})(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$/;
const HEADING_RE = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const HR_RE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE_RE = /^ {0,3}> ?/;
const ITEM_RE = /^( *)([-*+]|\d{1,9}[.)])([ \t]+|$)(.*)$/;
const TABLE_SEP_RE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

function isBlank(line) {
  return /^\s*$/.test(line);
}

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  const cells = [];
  let cur = "";
  for (let i = 0; i < s.length; i++) {
    if (s[i] === "\\" && s[i + 1] === "|") {
      cur += "|";
      i++;
    } else if (s[i] === "|") {
      cells.push(cur.trim());
      cur = "";
    } else {
      cur += s[i];
    }
  }
  cells.push(cur.trim());
  return cells;
}

function isTableStart(lines, i) {
  return (
    lines[i].includes("|") &&
    i + 1 < lines.length &&
    lines[i + 1].includes("-") &&
    TABLE_SEP_RE.test(lines[i + 1]) &&
    (lines[i + 1].includes("|") || splitRow(lines[i]).length === 1)
  );
}

function startsBlock(lines, i) {
  const line = lines[i];
  if (FENCE_RE.test(line) || HEADING_RE.test(line) || HR_RE.test(line) || QUOTE_RE.test(line)) {
    return true;
  }
  const m = ITEM_RE.exec(line);
  // like CommonMark, only a bullet or "1." list may interrupt a paragraph
  if (m && m[4].trim() && (/[-*+]/.test(m[2]) || /^1[.)]$/.test(m[2]))) return true;
  return isTableStart(lines, i);
}

function codeBlock(code, lang, open) {
  const wrap = el("div", "codeblock");
  const bar = el("div", "codebar");
  bar.append(el("span", "lang", lang || "code"));
  const button = el("button", "btn small copy", "Copy");
  button.type = "button";
  button.addEventListener("click", () => {
    copyText(code).then(
      () => flashLabel(button, "Copied"),
      () => flashLabel(button, "Copy failed"),
    );
  });
  bar.append(button);
  const pre = el("pre");
  const c = el("code", null, code);
  const safeLang = lang.replace(/[^\w+#.-]/g, "").slice(0, 30);
  if (safeLang) c.className = `language-${safeLang}`;
  if (open) wrap.classList.add("open");
  pre.append(c);
  wrap.append(bar, pre);
  return wrap;
}

function table(lines, i, parent) {
  const head = splitRow(lines[i]);
  const aligns = splitRow(lines[i + 1]).map((c) =>
    c.startsWith(":") && c.endsWith(":")
      ? "center"
      : c.endsWith(":")
        ? "right"
        : c.startsWith(":")
          ? "left"
          : "",
  );
  const wrap = el("div", "table-wrap");
  const t = el("table");
  const thead = el("thead");
  const hr = el("tr");
  head.forEach((cell, k) => {
    const th = el("th", aligns[k] ? `align-${aligns[k]}` : null);
    inline(cell, th);
    hr.append(th);
  });
  thead.append(hr);
  t.append(thead);
  const tbody = el("tbody");
  let j = i + 2;
  while (j < lines.length && !isBlank(lines[j]) && lines[j].includes("|")) {
    const tr = el("tr");
    const cells = splitRow(lines[j]);
    for (let k = 0; k < head.length; k++) {
      const td = el("td", aligns[k] ? `align-${aligns[k]}` : null);
      inline(cells[k] ?? "", td);
      tr.append(td);
    }
    tbody.append(tr);
    j++;
  }
  t.append(tbody);
  wrap.append(t);
  parent.append(wrap);
  return j;
}

function list(lines, i, parent) {
  const first = ITEM_RE.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered) {
    const start = parseInt(first[2], 10);
    if (start !== 1) node.start = start;
  }
  let j = i;
  while (j < lines.length) {
    const m = ITEM_RE.exec(lines[j]);
    if (!m || m[1].length > indent + 1 || m[1].length < indent) break;
    if (/\d/.test(m[2]) !== ordered) break;
    // content of an item: its first line and every following line indented past the marker
    const contentIndent = m[1].length + m[2].length + Math.max(1, Math.min(m[3].length, 4));
    const body = [m[4]];
    j++;
    while (j < lines.length) {
      const line = lines[j];
      if (isBlank(line)) {
        let k = j;
        while (k < lines.length && isBlank(lines[k])) k++;
        if (k < lines.length && /^ */.exec(lines[k])[0].length >= contentIndent) {
          for (; j < k; j++) body.push("");
          continue;
        }
        const next = k < lines.length ? ITEM_RE.exec(lines[k]) : null;
        if (next && next[1].length === indent && /\d/.test(next[2]) === ordered) {
          j = k; // loose list: the blank lines only separate items
        }
        break;
      }
      const lead = /^ */.exec(line)[0].length;
      if (lead >= contentIndent) {
        body.push(line.slice(contentIndent));
      } else if (lead > indent && ITEM_RE.test(line)) {
        body.push(line.slice(Math.min(lead, contentIndent)));
      } else if (!ITEM_RE.test(line) && !startsBlock(lines, j)) {
        body.push(line.trimStart()); // a lazy continuation line
      } else {
        break;
      }
      j++;
    }
    const li = el("li");
    blocks(body, li, true);
    node.append(li);
  }
  parent.append(node);
  return j;
}

function blocks(lines, parent, tight = false) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) {
      i++;
      continue;
    }
    let m = FENCE_RE.exec(line);
    if (m) {
      const fence = m[2];
      const lang = m[3] || "";
      const pad = m[1].length;
      const close = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}[ \\t]*$`);
      const body = [];
      i++;
      while (i < lines.length && !close.test(lines[i])) {
        body.push(lines[i].replace(new RegExp(`^ {0,${pad}}`), ""));
        i++;
      }
      const open = i >= lines.length;
      if (!open) i++;
      parent.append(codeBlock(body.join("\n"), lang, open));
      continue;
    }
    m = HEADING_RE.exec(line);
    if (m) {
      const h = el(`h${m[1].length}`);
      inline(m[2] || "", h);
      parent.append(h);
      i++;
      continue;
    }
    if (HR_RE.test(line)) {
      parent.append(el("hr"));
      i++;
      continue;
    }
    if (QUOTE_RE.test(line)) {
      const body = [];
      while (i < lines.length && !isBlank(lines[i])) {
        body.push(lines[i].replace(QUOTE_RE, ""));
        i++;
      }
      const q = el("blockquote");
      blocks(body, q);
      parent.append(q);
      continue;
    }
    if (ITEM_RE.test(line) && ITEM_RE.exec(line)[4].trim() !== "") {
      i = list(lines, i, parent);
      continue;
    }
    if (isTableStart(lines, i)) {
      i = table(lines, i, parent);
      continue;
    }
    const para = [line.replace(/^\s+/, "")];
    i++;
    while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines, i)) {
      para.push(lines[i].replace(/^\s+/, ""));
      i++;
    }
    const p = el(tight && parent.childNodes.length === 0 ? "span" : "p");
    if (p.tagName === "SPAN") p.className = "tight";
    inline(para.join("\n").replace(/\s+$/, ""), p);
    parent.append(p);
  }
}

// ---- inline --------------------------------------------------------------------------

const PUNCT_RE = /[!-/:-@[-`{-~]/;
const URL_RE = /^https?:\/\/[^\s<>"'`{}|\\^]+/i;
const WORD_RE = /[\p{L}\p{N}]/u;

// [text](url "title"): returns {text, url, end} or null
function parseLink(src, i) {
  if (src[i] !== "[") return null;
  let depth = 0;
  let j = i;
  for (; j < src.length; j++) {
    const c = src[j];
    if (c === "\\") {
      j++;
    } else if (c === "`") {
      const run = /^`+/.exec(src.slice(j))[0];
      const close = src.indexOf(run, j + run.length);
      if (close > 0) j = close + run.length - 1;
    } else if (c === "[") {
      depth++;
    } else if (c === "]") {
      depth--;
      if (depth === 0) break;
    }
  }
  if (j >= src.length || src[j + 1] !== "(") return null;
  const text = src.slice(i + 1, j);
  let k = j + 2;
  let parens = 1;
  let dest = "";
  while (k < src.length && /\s/.test(src[k]) && src[k] !== "\n") k++;
  if (src[k] === "<") {
    const close = src.indexOf(">", k);
    if (close < 0) return null;
    dest = src.slice(k + 1, close);
    k = close + 1;
  } else {
    const start = k;
    for (; k < src.length; k++) {
      const c = src[k];
      if (c === "\\") {
        k++;
      } else if (c === "(") {
        parens++;
      } else if (c === ")") {
        parens--;
        if (parens === 0) break;
      } else if (/\s/.test(c)) {
        break;
      }
    }
    dest = src.slice(start, k);
  }
  // an optional title, then the closing parenthesis
  const rest = /^(?:\s+(?:"[^"]*"|'[^']*'|\([^)]*\)))?\s*\)/.exec(src.slice(k));
  if (!rest) return null;
  return { text, url: dest, end: k + rest[0].length };
}

function findCloser(src, from, delim) {
  const ch = delim[0];
  for (let j = from; j < src.length; j++) {
    const c = src[j];
    if (c === "\\") {
      j++;
      continue;
    }
    if (c === "`") {
      const run = /^`+/.exec(src.slice(j))[0];
      const close = src.indexOf(run, j + run.length);
      if (close > 0) j = close + run.length - 1;
      continue;
    }
    if (c !== ch) continue;
    const run = new RegExp(`^\\${ch}+`).exec(src.slice(j))[0];
    if (run.length === delim.length && !/\s/.test(src[j - 1] || " ")) {
      if (ch === "_" && WORD_RE.test(src[j + run.length] || "")) {
        j += run.length - 1;
        continue;
      }
      return j;
    }
    j += run.length - 1; // a longer or shorter run belongs to another span
  }
  return -1;
}

function inline(src, parent, inLink = false) {
  let buf = "";
  const flush = () => {
    if (buf) {
      parent.append(document.createTextNode(buf));
      buf = "";
    }
  };
  let i = 0;
  while (i < src.length) {
    const c = src[i];
    if (c === "\\" && i + 1 < src.length && PUNCT_RE.test(src[i + 1])) {
      buf += src[i + 1];
      i += 2;
      continue;
    }
    if (c === "\n") {
      flush();
      parent.append(el("br"));
      i++;
      continue;
    }
    if (c === "`") {
      const run = /^`+/.exec(src.slice(i))[0];
      const close = src.indexOf(run, i + run.length);
      // the closing run must be exactly as long
      if (close > 0 && src[close + run.length] !== "`") {
        let code = src.slice(i + run.length, close).replace(/\n/g, " ");
        if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1);
        flush();
        parent.append(el("code", null, code));
        i = close + run.length;
      } else {
        buf += run;
        i += run.length;
      }
      continue;
    }
    if ((c === "[" || (c === "!" && src[i + 1] === "[")) && !inLink) {
      const at = c === "!" ? i + 1 : i;
      const found = parseLink(src, at);
      if (found) {
        flush();
        const href = safeHref(found.url);
        // images are shown as links: loading them would send a request off the page
        const label = c === "!" ? found.text || found.url : found.text;
        if (href) {
          inline(label, link(href, parent), true);
        } else {
          const span = el("span", "unsafe-link");
          span.title = "link removed";
          inline(label, span, true);
          parent.append(span);
        }
        i = found.end;
        continue;
      }
    }
    if (c === "<" && !inLink) {
      const m = /^<((?:https?:\/\/|mailto:)[^\s<>]+)>/i.exec(src.slice(i));
      const href = m && safeHref(m[1]);
      if (href) {
        flush();
        link(href, parent).textContent = m[1];
        i += m[0].length;
        continue;
      }
    }
    if ((c === "h" || c === "H") && !inLink && !WORD_RE.test(src[i - 1] || " ")) {
      const m = URL_RE.exec(src.slice(i));
      if (m) {
        let url = m[0];
        // trailing punctuation ends the sentence, not the URL (balanced ")" stays)
        while (/[.,;:!?*_~)]$/.test(url)) {
          if (url.endsWith(")") && url.split("(").length >= url.split(")").length) break;
          url = url.slice(0, -1);
        }
        const href = safeHref(url);
        if (href) {
          flush();
          link(href, parent).textContent = url;
          i += url.length;
          continue;
        }
      }
    }
    if (c === "*" || c === "_" || c === "~") {
      const run = new RegExp(`^\\${c}+`).exec(src.slice(i))[0];
      const n = Math.min(run.length, 3);
      const prev = src[i - 1] || " ";
      const next = src[i + run.length] || " ";
      const opens =
        !/\s/.test(next) &&
        (c !== "_" || !WORD_RE.test(prev)) &&
        (c !== "~" || run.length === 2) &&
        run.length <= 3;
      if (opens) {
        const close = findCloser(src, i + n, c.repeat(n));
        if (close > i + n) {
          flush();
          const inner = src.slice(i + n, close);
          let target;
          if (c === "~") {
            target = el("del");
            parent.append(target);
          } else if (n === 3) {
            const strong = el("strong");
            target = el("em");
            strong.append(target);
            parent.append(strong);
          } else {
            target = el(n === 2 ? "strong" : "em");
            parent.append(target);
          }
          inline(inner, target, inLink);
          i = close + n;
          continue;
        }
      }
      buf += run;
      i += run.length;
      continue;
    }
    buf += c;
    i++;
  }
  flush();
}

/** Render markdown `text` into `root`, replacing what was there. */
export function renderMarkdown(text, root) {
  const frag = document.createDocumentFragment();
  blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), frag);
  root.replaceChildren(frag);
}
