// The page: wires the conversation list, the thread, the composer, the provider picker,
// the transport switch and sign-in together. All model and user text reaches the DOM
// as text (textContent / Text nodes), never as markup.

import { api, conversationPath, messagePath, randomId } from "./api.js";
import { $ } from "./dom.js";
import { Live } from "./live.js";
import { Picker } from "./picker.js";
import { ConversationList } from "./sidebar.js";
import { SignIn } from "./signin.js";
import { sseTransport } from "./sse.js";
import { Thread } from "./thread.js";
import { wsTransport } from "./ws.js";

const TRANSPORTS = { sse: sseTransport, ws: wsTransport };
const TRANSPORT_KEY = "streamchat.transport";
const PHONE = window.matchMedia("(max-width: 760px)");

const ui = {
  scrim: $("scrim"),
  menu: $("menu"),
  newChat: $("new-chat"),
  transport: $("transport"),
  title: $("conv-title"),
  messages: $("messages"),
  thread: $("thread"),
  banner: $("banner"),
  bannerText: $("banner-text"),
  bannerClose: $("banner-close"),
  composer: $("composer"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
  editing: $("editing"),
};

const state = {
  conv: null, // the open conversation (without its messages), or null for a new chat
  live: null, // the Live following the open conversation's run
  editing: null, // the user item being edited
  choice: null, // {provider, model} picked before the conversation exists
  loadToken: 0, // the newest openConversation call; older answers are dropped
  stick: true, // follow the end of the thread while the user has not scrolled up
};

const activeId = () => (state.conv ? state.conv.id : null);

// ---- banner ----------------------------------------------------------------------------

function showBanner(text) {
  ui.bannerText.textContent = text;
  ui.banner.hidden = false;
}

function clearBanner() {
  ui.banner.hidden = true;
  ui.bannerText.textContent = "";
}

// ---- sidebar, picker, sign-in ----------------------------------------------------------------

const list = new ConversationList($("conversations"), {
  activeId,
  open(id) {
    closeSidebar();
    if (id !== activeId()) openConversation(id);
  },
  renamed(conv) {
    if (conv.id === activeId()) {
      state.conv = { ...state.conv, ...conv };
      renderTitle();
    }
  },
  deleted(id) {
    if (id === activeId()) newChat();
  },
  error: showBanner,
});

/** Reload the list; the first message names a conversation, so pick up its title. */
async function loadConversations() {
  await list.load();
  const current = state.conv && list.find(state.conv.id);
  if (current && current.title !== state.conv.title) {
    state.conv = { ...state.conv, title: current.title };
    renderTitle();
  }
}

const picker = new Picker($("model"), { error: showBanner });

function currentChoice() {
  const c = state.conv;
  if (c && c.provider) return { provider: c.provider, model: c.model };
  return state.choice || picker.defaultChoice();
}

async function pickModel() {
  const choice = picker.value();
  if (!state.conv) {
    state.choice = choice;
    return;
  }
  try {
    const updated = await api("PATCH", conversationPath(state.conv.id), choice);
    state.conv = { ...state.conv, ...updated };
  } catch (err) {
    showBanner(`Could not switch the model: ${err.message}`);
    picker.show(currentChoice());
  }
}

const signin = new SignIn(
  {
    panel: $("signin"),
    form: $("signin-form"),
    key: $("signin-key"),
    error: $("signin-error"),
    who: $("who"),
    whoName: $("who-name"),
    signout: $("signout"),
  },
  {
    signedIn: () => start(),
    signedOut(explicit) {
      // an expired session keeps the open conversation's address for after signing in
      if (explicit) newChat();
      detachLive();
      thread.clear();
      list.clear();
    },
  },
);

function transport() {
  return TRANSPORTS[ui.transport.value] || sseTransport;
}

// ---- thread ------------------------------------------------------------------------------

const thread = new Thread($("thread"), {
  regenerate: (answer) => regenerate(answer),
  continue: (answer) => continueAnswer(answer),
  edit: (item) => startEdit(item),
});

function refreshActions() {
  const live = Boolean(state.live);
  thread.refresh(live);
  ui.send.hidden = live;
  ui.stop.hidden = !live;
}

function scrollToEnd(force = false) {
  if (force || state.stick) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderTitle() {
  const title = state.conv && state.conv.title;
  ui.title.textContent = title || "New chat";
  document.title = title ? `${title} · streamchat` : "streamchat";
}

// ---- opening conversations -----------------------------------------------------------------

function setHash(cid) {
  const want = cid ? `#/c/${cid}` : "";
  if (location.hash !== want) history.replaceState(null, "", want || location.pathname);
}

function hashId() {
  const m = /^#\/c\/([0-9a-f]{32})$/.exec(location.hash);
  return m ? m[1] : null;
}

function detachLive() {
  if (state.live) {
    state.live.detach();
    state.live = null;
  }
}

function newChat() {
  state.loadToken++;
  detachLive();
  stopEdit();
  state.conv = null;
  setHash(null);
  renderTitle();
  thread.clear();
  picker.show(currentChoice());
  list.render();
  refreshActions();
  ui.input.focus();
}

async function openConversation(cid) {
  const token = ++state.loadToken;
  detachLive();
  let conv;
  try {
    conv = await api("GET", conversationPath(cid));
  } catch (err) {
    if (token !== state.loadToken) return;
    if (err.status === 404) {
      showBanner("That conversation no longer exists.");
      newChat();
    } else {
      showBanner(`Could not open the conversation: ${err.message}`);
    }
    return;
  }
  if (token !== state.loadToken) return;
  stopEdit();
  const { messages, live_message_id: liveMid, ...meta } = conv;
  state.conv = meta;
  setHash(cid);
  renderTitle();
  thread.clear();
  let liveAnswer = null;
  let stale = false;
  for (const m of messages) {
    if (m.role === "user") {
      thread.addUser(m);
    } else {
      const answer = thread.addAnswer(m);
      if (m.id === liveMid) liveAnswer = answer;
      else if (m.status === "streaming") stale = true;
    }
  }
  picker.show(currentChoice());
  list.render();
  state.stick = true;
  scrollToEnd(true);
  if (liveAnswer) {
    if (!liveAnswer.seq) liveAnswer.text = ""; // no cursor given: replay it all instead
    follow(liveAnswer, "resume");
  } else {
    refreshActions();
    if (stale) {
      // it finished between the server's two reads; look again shortly
      setTimeout(() => {
        if (activeId() === cid && !state.live) openConversation(cid);
      }, 1000);
    }
  }
}

// ---- runs --------------------------------------------------------------------------------

/** Follow a run for `answer`; kind is send | regenerate | continue | resume. */
function follow(answer, kind, payload = {}, ctx = {}) {
  const cid = state.conv.id;
  const live = new Live(transport(), cid, answer, {
    onStart(ev) {
      if (ctx.userItem && ev.user_message_id) ctx.userItem.id = ev.user_message_id;
      if (kind === "send") loadConversations(); // the first message titles the conversation
      refreshActions();
    },
    onFinish(l) {
      if (state.live === l) state.live = null;
      refreshActions();
      loadConversations();
      if (!answer.metrics && answer.status !== "failed") fillMetrics(cid, answer);
    },
    onRequestError(err, l) {
      if (state.live === l) state.live = null;
      if (kind === "send") {
        thread.remove(ctx.userItem);
        thread.remove(thread.itemOf(answer));
        if (!ui.input.value) ui.input.value = ctx.text || "";
        autosize();
      } else if (kind === "regenerate") {
        thread.remove(thread.itemOf(answer));
      } else {
        answer.setNote(`${kind === "continue" ? "Continue" : "Resume"} failed: ${err.message}`);
      }
      refreshActions();
      showBanner(err.message);
      // a run started elsewhere (another tab): show it
      if (err.code === "conflict" || kind === "regenerate") openConversation(cid);
    },
    onLost(l) {
      if (state.live === l) state.live = null;
      openConversation(cid);
    },
  });
  state.live = live;
  refreshActions();
  live.start(kind, payload);
}

/** A replayed answer carries no metrics; the stored message does. */
async function fillMetrics(cid, answer) {
  try {
    const conv = await api("GET", conversationPath(cid));
    const m = conv.messages.find((x) => x.id === answer.mid);
    if (m) answer.setMetrics(m.metrics, m.usage);
  } catch {
    // the numbers are a nicety
  }
}

async function send(text) {
  if (state.live || !text.trim()) return;
  clearBanner();
  const editing = state.editing;
  try {
    if (!state.conv) {
      state.conv = await api("POST", "/api/v1/conversations", currentChoice() || {});
      state.choice = null;
      setHash(state.conv.id);
      renderTitle();
    }
    if (editing) {
      // edit and resend: the message and everything after it go, then it is sent anew
      await api("DELETE", messagePath(state.conv.id, editing.id));
      thread.removeFrom(editing);
      stopEdit();
    }
  } catch (err) {
    showBanner(err.message);
    return;
  }
  ui.input.value = "";
  autosize();
  const userItem = thread.addUser({ content: text });
  const answer = thread.addAnswer({});
  state.stick = true;
  scrollToEnd(true);
  // client_message_id makes a resend after a dropped connection attach, not duplicate
  follow(answer, "send", { content: text, client_message_id: randomId() }, { userItem, text });
}

function regenerate(answer) {
  if (state.live || !state.conv) return;
  clearBanner();
  thread.remove(thread.itemOf(answer));
  const fresh = thread.addAnswer({});
  scrollToEnd(true);
  follow(fresh, "regenerate");
}

function continueAnswer(answer) {
  if (state.live || !state.conv || !answer.mid) return;
  clearBanner();
  follow(answer, "continue");
}

function stop() {
  if (state.live) state.live.stop();
}

function startEdit(item) {
  if (state.live) return;
  stopEdit();
  state.editing = item;
  item.el.classList.add("being-edited");
  ui.editing.hidden = false;
  ui.input.value = item.content;
  autosize();
  ui.input.focus();
}

function stopEdit() {
  if (!state.editing) return;
  state.editing.el.classList.remove("being-edited");
  state.editing = null;
  ui.editing.hidden = true;
}

// ---- composer, keys, layout ------------------------------------------------------------------

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  ui.scrim.hidden = true;
  ui.menu.setAttribute("aria-expanded", "false");
}

function toggleSidebar() {
  const open = !document.body.classList.contains("sidebar-open");
  document.body.classList.toggle("sidebar-open", open);
  ui.scrim.hidden = !open;
  ui.menu.setAttribute("aria-expanded", String(open));
}

function switchTransport() {
  localStorage.setItem(TRANSPORT_KEY, ui.transport.value);
  // carry on over the other transport from where we are
  if (state.live && state.live.answer.mid) {
    const answer = state.live.answer;
    detachLive();
    follow(answer, "resume");
  }
}

function wire() {
  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send(ui.input.value);
  });
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send(ui.input.value);
    }
  });
  ui.input.addEventListener("input", autosize);
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (state.live) {
      e.preventDefault();
      stop();
    } else if (state.editing) {
      stopEdit();
      ui.input.value = "";
      autosize();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", () => {
    closeSidebar();
    newChat();
  });
  ui.bannerClose.addEventListener("click", clearBanner);
  $("model").addEventListener("change", pickModel);
  const saved = localStorage.getItem(TRANSPORT_KEY);
  ui.transport.value = TRANSPORTS[saved] ? saved : "sse";
  ui.transport.addEventListener("change", switchTransport);
  ui.menu.addEventListener("click", toggleSidebar);
  ui.scrim.addEventListener("click", closeSidebar);
  PHONE.addEventListener("change", closeSidebar);
  ui.messages.addEventListener("scroll", () => {
    const m = ui.messages;
    state.stick = m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  });
  new MutationObserver(() => scrollToEnd()).observe(ui.thread, {
    childList: true,
    subtree: true,
    characterData: true,
  });
  window.addEventListener("hashchange", () => {
    const id = hashId();
    if (id && id !== activeId()) openConversation(id);
    else if (!id && state.conv) newChat();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState !== "visible") return;
    // a sleeping tab may have lost its connection without noticing
    if (state.live) state.live.check();
    thread.redraw();
  });
  window.addEventListener("online", () => state.live?.retryNow());
}

/** Load what the page shows (after signing in, when the server asks for it). */
async function start() {
  if ((await signin.check()) === null) {
    document.body.dataset.ready = "signin";
    return;
  }
  const providers = picker.load();
  const conversations = loadConversations();
  const id = hashId();
  await providers;
  if (id) await openConversation(id);
  else picker.show(currentChoice());
  await conversations;
  document.body.dataset.ready = "true";
  ui.input.focus();
}

wire();
refreshActions();
start();
