// The page of `rlhf label`: rank answers sampled from the policy, and chat with it.
// Every text from the server (prompts, answers, messages) is shown with textContent, never parsed
// as HTML, so a prompt that contains markup shows as the text it is.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// A team's page (served beyond localhost) names its labeler in every request; the server's token
// travels in a cookie it set when the page was opened with the link.
const team = {on: false, labeler: null};

async function api(path, body) {
  if (team.on && body === undefined) {
    path += `${path.includes("?") ? "&" : "?"}labeler=${encodeURIComponent(team.labeler || "")}`;
  } else if (team.on) {
    body = {...body, labeler: team.labeler};
  }
  const options = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function percent(value) {
  return `${Math.round(value * 100)}%`;
}

// ---- Rank -------------------------------------------------------------------------------------
// order: answer indices placed so far, best first; tied: indices that share the place of the
// answer above them. Together they give the groups the server records.
const rank = {item: null, order: [], tied: new Set(), busy: false, scores: null};

function groups() {
  const result = [];
  for (const index of rank.order) {
    if (rank.tied.has(index) && result.length) result[result.length - 1].push(index);
    else result.push([index]);
  }
  return result;
}

function answerCount() {
  return rank.item && !rank.item.done ? rank.item.answers.length : 0;
}

function locked() {
  return rank.busy || rank.scores !== null || !answerCount();
}

function place(index, before) {
  if (locked()) return;
  rank.order = rank.order.filter((other) => other !== index);
  rank.tied.delete(index);  // a moved answer starts a place of its own
  const at = before === undefined ? -1 : rank.order.indexOf(before);
  if (at < 0) rank.order.push(index);
  else rank.order.splice(at, 0, index);
  renderBoard();
}

function unplace(index) {
  if (locked()) return;
  rank.order = rank.order.filter((other) => other !== index);
  rank.tied.delete(index);
  renderBoard();
}

function toggleTie(index) {
  if (locked() || rank.order.indexOf(index) < 1) return;
  if (rank.tied.has(index)) rank.tied.delete(index);
  else rank.tied.add(index);
  renderBoard();
}

function renderPrompt(prompt) {
  const box = $("prompt");
  box.replaceChildren();
  if (typeof prompt === "string") {
    box.textContent = prompt;
    return;
  }
  for (const message of prompt) {
    const turn = el("div", "turn");
    turn.append(el("span", "role", `${message.role}:`), el("span", "text", message.content));
    box.append(turn);
  }
}

function card(index) {
  const item = el("li", "card");
  item.draggable = !locked();
  item.dataset.index = index;
  item.addEventListener("dragstart", (event) => {
    event.dataTransfer.setData("text/plain", String(index));
    event.dataTransfer.effectAllowed = "move";
    item.classList.add("dragging");
  });
  item.addEventListener("dragend", () => item.classList.remove("dragging"));
  return item;
}

function renderBoard() {
  const answers = answerCount() ? rank.item.answers : [];
  const pool = $("pool");
  pool.replaceChildren();
  answers.forEach((text, index) => {
    if (rank.order.includes(index)) return;
    const item = card(index);
    item.append(el("span", "key", String(index + 1)), el("div", "text", text));
    item.addEventListener("dblclick", () => place(index));
    pool.append(item);
  });

  const ranked = $("ranked");
  ranked.replaceChildren();
  groups().forEach((group, position) => {
    group.forEach((index, member) => {
      const item = card(index);
      if (member > 0) item.classList.add("tied");
      item.append(el("span", "place", `${member > 0 ? "=" : ""}${position + 1}.`),
                  el("span", "key", String(index + 1)), el("div", "text", answers[index]));
      item.append(sideOf(index));
      ranked.append(item);
    });
  });

  const complete = answers.length >= 2 && rank.order.length === answers.length;
  $("submit").disabled = locked() || !complete;
  $("tie").disabled = locked() || rank.order.length < 2;
  $("undo").disabled = locked() || rank.order.length === 0;
  const decided = rank.busy || rank.scores !== null || !rank.item || rank.item.done;
  $("skip").disabled = decided;
  $("flag").disabled = decided;
}

function sideOf(index) {
  const side = el("div", "side");
  if (rank.scores !== null) {
    const score = rank.scores[index];
    side.append(el("span", "score", `RM ${score >= 0 ? "+" : ""}${score.toFixed(3)}`));
    return side;
  }
  const position = rank.order.indexOf(index);
  if (position > 0) {
    const label = el("label");
    const box = el("input", "tie-box");
    box.type = "checkbox";
    box.checked = rank.tied.has(index);
    box.addEventListener("change", () => toggleTie(index));
    label.append(box, " tie with above");
    side.append(label);
  }
  const remove = el("button", "remove", "×");
  remove.type = "button";
  remove.title = "back to the answers";
  remove.addEventListener("click", () => unplace(index));
  side.append(remove);
  return side;
}

function dropTarget(zone, onDrop) {
  zone.addEventListener("dragover", (event) => {
    if (locked()) return;
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const index = Number(event.dataTransfer.getData("text/plain"));
    if (Number.isInteger(index) && index >= 0 && index < answerCount()) onDrop(index, event);
  });
}

function dropOnRanking(index, event) {
  // Dropped on a placed answer: it goes before that one, or after it if dropped on its lower half.
  const target = event.target.closest && event.target.closest("#ranked .card");
  if (!target || Number(target.dataset.index) === index) return place(index);
  const over = Number(target.dataset.index);
  const box = target.getBoundingClientRect();
  if (event.clientY < box.top + box.height / 2) return place(index, over);
  const after = rank.order[rank.order.indexOf(over) + 1];
  return after === undefined || after === index ? place(index) : place(index, after);
}

// `shown` is 1 while the next prompt is on screen, 0 while the one just decided still is.
function showProgress(counts, shown = 1) {
  const done = counts.total - counts.remaining;
  const position = counts.remaining || !shown ? `Prompt ${done + shown} of ${counts.total}`
    : `${counts.total} prompts`;
  const who = team.on ? `${team.labeler} · ` : "";
  $("progress").textContent = `${who}${position} · ${counts.ranked} ranked · ` +
    `${counts.skipped} skipped · ` +
    `${counts.flagged} flagged · ${counts.chat_pairs} chat pairs`;
}

async function loadNext() {
  rank.item = null;
  $("prompt").replaceChildren();
  rank.order = [];
  rank.tied.clear();
  rank.scores = null;
  rank.busy = true;
  $("result").hidden = true;
  $("flag-note").value = "";
  $("status").textContent = "Sampling answers…";
  renderBoard();
  try {
    rank.item = await api("/api/next");
    $("status").textContent = "";
  } catch (error) {
    $("status").textContent = `Could not load the next prompt: ${error.message}`;
    return;
  } finally {
    rank.busy = false;
  }
  showProgress(rank.item.counts);
  const done = rank.item.done;
  $("finished").hidden = !done;
  $("prompt-box").hidden = done;
  $("board").hidden = done;
  $("actions").hidden = done;
  if (done) {
    const counts = rank.item.counts;
    $("finished-counts").textContent = `${counts.ranked} ranked, ${counts.skipped} skipped, ` +
      `${counts.flagged} flagged. Train on them with: ` +
      `rlhf run reward data.train_files=[${outFile}]`;
  } else {
    renderPrompt(rank.item.prompt);
  }
  $("sparse").hidden = done || rank.item.answers.length >= 2;
  $("sparse").textContent = done || !rank.item.problem ? sparseNote
    : `No answers to rank: ${rank.item.problem}. Skip this prompt or flag it.`;
  renderBoard();
}

async function submitRanking() {
  if ($("submit").disabled) return;
  rank.busy = true;
  renderBoard();
  try {
    const result = await api("/api/rank", {index: rank.item.index, ranking: groups()});
    showProgress(result.counts, 0);
    if (team.on) showTeam(await api("/api/stats"));
    $("status").textContent = `Recorded in ${result.record_ms.toFixed(1)} ms.`;
    if (result.scores) {
      rank.scores = result.scores;
      $("agreement").textContent = agreementText(result.agreement);
      $("result").hidden = false;
    } else {
      rank.busy = false;
      return loadNext();
    }
  } catch (error) {
    $("status").textContent = `Not recorded: ${error.message}`;
    rank.busy = false;
    return loadNext();
  }
  rank.busy = false;
  renderBoard();
}

function agreementText(agreement) {
  const part = (summary) => `${+(summary.accuracy * summary.pairs).toFixed(1)} of ` +
    `${summary.pairs} ` +
    `pairs (${percent(summary.accuracy)})`;
  const here = agreement.this.accuracy === null ? "You tied every answer: no pair to compare."
    : `The reward model orders ${part(agreement.this)} as you did.`;
  const overall = agreement.overall;
  const sofar = overall.accuracy === null ? "" : ` So far: ${part(overall)} over ` +
    `${overall.prompts} ranked prompt${overall.prompts === 1 ? "" : "s"}.`;
  return here + sofar;
}

async function setAside(action) {
  if ($(action === "flagged" ? "flag" : "skip").disabled) return;
  rank.busy = true;
  renderBoard();
  try {
    await api("/api/set-aside", {index: rank.item.index, action, note: $("flag-note").value});
    $("status").textContent = action === "flagged" ? "Flagged." : "Skipped.";
  } catch (error) {
    $("status").textContent = `Not recorded: ${error.message}`;
  }
  rank.busy = false;
  return loadNext();
}

function undo() {
  if (rank.order.length) unplace(rank.order[rank.order.length - 1]);
}

function onRankKey(event) {
  const key = event.key;
  if (key >= "1" && key <= "9") {
    const index = Number(key) - 1;
    if (index < answerCount() && !rank.order.includes(index)) place(index);
  } else if (key === "Enter") {
    if (rank.scores !== null) loadNext();
    else submitRanking();
  } else if (key === "Backspace") {
    undo();
  } else if (key === "t" || key === "T") {
    if (rank.order.length >= 2) toggleTie(rank.order[rank.order.length - 1]);
  } else if (key === "s" || key === "S") {
    setAside("skipped");
  } else if (key === "f" || key === "F") {
    setAside("flagged");
  } else {
    return;
  }
  event.preventDefault();
}

// ---- Chat -------------------------------------------------------------------------------------
// A turn is {role: "user", content} or {role: "assistant", candidates: [{text, down}], shown,
// kept}: the answers sampled for that place in the conversation and the one on screen.
const chat = {turns: [], busy: false};

function historyBefore(turnIndex) {
  return chat.turns.slice(0, turnIndex).map((turn) => turn.role === "user"
    ? {role: "user", content: turn.content}
    : {role: "assistant", content: turn.candidates[turn.shown].text});
}

function lastAssistant() {
  const turn = chat.turns[chat.turns.length - 1];
  return turn && turn.role === "assistant" ? turn : null;
}

function tool(label, className, title, onClick) {
  const button = el("button", className, label);
  button.type = "button";
  button.title = title;
  button.disabled = chat.busy;
  button.addEventListener("click", onClick);
  return button;
}

function renderChat() {
  const list = $("messages");
  list.replaceChildren();
  chat.turns.forEach((turn) => {
    const box = el("div", `message ${turn.role}`);
    if (turn.role === "user") {
      box.append(el("div", "text", turn.content));
    } else {
      const answer = turn.candidates[turn.shown];
      box.append(el("div", "text", answer.text || (chat.busy ? "…" : "(empty answer)")));
      if (turn === lastAssistant()) box.append(toolsOf(turn));
    }
    list.append(box);
  });
  $("send").disabled = chat.busy;
  $("new-chat").disabled = chat.busy;
}

function toolsOf(turn) {
  const tools = el("div", "tools");
  const count = turn.candidates.length;
  if (count > 1 && turn.kept) {
    tools.append(el("span", "which", `answer ${turn.shown + 1} of ${count}`));
  } else if (count > 1) {
    tools.append(tool("‹", "prev", "previous answer", () => flip(turn, -1)),
                 el("span", "which", `${turn.shown + 1}/${count}`),
                 tool("›", "next", "next answer", () => flip(turn, 1)));
  }
  if (turn.kept) {
    const pairs = turn.saved ? ` · ${turn.saved} pair${turn.saved === 1 ? "" : "s"} saved` : "";
    tools.append(el("span", "saved", `kept${pairs}`));
    return tools;
  }
  const down = tool("👎 Bad", "down", "a bad answer: sample another", thumbsDown);
  if (turn.candidates[turn.shown].down) down.classList.add("pressed");
  tools.append(tool("👍 Keep", "up", "keep this answer", keepLast), down,
               tool("↻ Regenerate", "regenerate", "sample another answer", regenerate));
  return tools;
}

function flip(turn, step) {
  if (chat.busy || turn.kept) return;
  turn.shown = (turn.shown + step + turn.candidates.length) % turn.candidates.length;
  renderChat();
}

async function generateInto(turn) {
  const messages = historyBefore(chat.turns.indexOf(turn));
  const candidate = {text: "", down: false};
  turn.candidates.push(candidate);
  turn.shown = turn.candidates.length - 1;
  chat.busy = true;
  $("chat-status").textContent = "";
  renderChat();
  try {
    const response = await fetch("/api/chat", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({messages})});
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      throw new Error(data.error || `${response.status} ${response.statusText}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      candidate.text += decoder.decode(value, {stream: true});
      renderChat();
    }
    candidate.text = candidate.text.trim();
  } catch (error) {
    turn.candidates.pop();
    turn.shown = Math.max(0, turn.candidates.length - 1);
    $("chat-status").textContent = `No answer: ${error.message}`;
  }
  chat.busy = false;
  if (!turn.candidates.length) chat.turns.splice(chat.turns.indexOf(turn) - 1, 2);
  renderChat();
}

// Keeping the shown answer (thumbs up, or going on from it) turns the other answers of its turn
// into pairwise rows: kept answer chosen, each other one rejected. A thumbed-down answer is never
// chosen.
async function keepLast() {
  const turn = lastAssistant();
  if (!turn || turn.kept || chat.busy) return;
  turn.kept = true;
  const chosen = turn.candidates[turn.shown];
  const rejected = turn.candidates.filter((other) => other !== chosen).map((other) => other.text);
  if (!chosen.down && chosen.text && rejected.length) {
    try {
      const result = await api("/api/chat/feedback", {
        messages: historyBefore(chat.turns.indexOf(turn)), chosen: chosen.text, rejected});
      turn.saved = result.saved;
      showProgress(result.counts, rank.scores === null ? 1 : 0);
    } catch (error) {
      $("chat-status").textContent = `Feedback not saved: ${error.message}`;
    }
  }
  renderChat();
}

async function regenerate() {
  const turn = lastAssistant();
  if (turn && !turn.kept && !chat.busy) await generateInto(turn);
}

async function thumbsDown() {
  const turn = lastAssistant();
  if (!turn || turn.kept || chat.busy) return;
  turn.candidates[turn.shown].down = true;
  await generateInto(turn);
}

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value;
  if (chat.busy || !text.trim()) return;
  await keepLast();
  $("chat-input").value = "";
  chat.turns.push({role: "user", content: text});
  const turn = {role: "assistant", candidates: [], shown: 0, kept: false, saved: 0};
  chat.turns.push(turn);
  await generateInto(turn);
}

async function newChat() {
  if (chat.busy) return;
  await keepLast();
  chat.turns = [];
  $("chat-status").textContent = "New conversation.";
  renderChat();
}

// ---- Team -------------------------------------------------------------------------------------
function showTeam(stats) {
  const between = stats.labelers;
  $("team").textContent = !between || between.agreement === null
    ? "Labelers agree: no prompt ranked by two labelers yet"
    : `Labelers agree on ${percent(between.agreement)} of ${between.pairs} answer pairs ` +
      `(${between.prompts} prompt${between.prompts === 1 ? "" : "s"} ranked by several)`;
}

// The labeler's name, asked once and remembered by this browser.
function askName() {
  return new Promise((resolve) => {
    $("who").hidden = false;
    $("labeler-name").value = localStorage.getItem("rlhf-labeler") || "";
    $("labeler-name").focus();
    $("who").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = $("labeler-name").value.trim();
      if (!name) return;
      localStorage.setItem("rlhf-labeler", name);
      $("who").hidden = true;
      resolve(name);
    });
  });
}

// ---- Page -------------------------------------------------------------------------------------
let outFile = "OUT";
const sparseNote = document.getElementById("sparse").textContent;

function showTab(name) {
  $("rank-view").hidden = name !== "rank";
  $("chat-view").hidden = name !== "chat";
  $("tab-rank").classList.toggle("active", name === "rank");
  $("tab-chat").classList.toggle("active", name === "chat");
  if (name === "chat") $("chat-input").focus();
}

function onKey(event) {
  const target = event.target;
  if (event.ctrlKey || event.metaKey || event.altKey || $("rank-view").hidden) return;
  if (target.id === "flag-note") {
    if (event.key === "Enter") {
      event.preventDefault();
      setAside("flagged");
    }
    return;
  }
  if (target.tagName === "INPUT" && target.type === "text" || target.tagName === "TEXTAREA") return;
  onRankKey(event);  // also on a focused button: the keys mean the same everywhere on the page
}

async function start() {
  $("tab-rank").addEventListener("click", () => showTab("rank"));
  $("tab-chat").addEventListener("click", () => showTab("chat"));
  $("submit").addEventListener("click", submitRanking);
  $("tie").addEventListener("click", () => toggleTie(rank.order[rank.order.length - 1]));
  $("undo").addEventListener("click", undo);
  $("skip").addEventListener("click", () => setAside("skipped"));
  $("flag").addEventListener("click", () => setAside("flagged"));
  $("next").addEventListener("click", loadNext);
  dropTarget($("ranked"), dropOnRanking);
  dropTarget($("pool"), (index) => unplace(index));
  document.addEventListener("keydown", onKey);
  $("chat-form").addEventListener("submit", send);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  $("new-chat").addEventListener("click", newChat);
  if (new URLSearchParams(location.search).has("token")) {
    history.replaceState(null, "", location.pathname);  // the cookie holds it now
  }
  try {
    const stats = await api("/api/stats");
    outFile = stats.out;
    if (stats.team) {
      team.on = true;
      team.labeler = await askName();
      showTeam(stats);
    }
    $("models").textContent = `policy ${stats.policy}` +
      (stats.reward ? ` · reward ${stats.reward}` : "") +
      ` · K ${stats.k} · temperature ${stats.temperature}` +
      ` · writing ${stats.out}`;
  } catch (error) {
    $("status").textContent = `The server does not answer: ${error.message}`;
  }
  await loadNext();
}

start();
