// The document Q&A page: upload and library, ask with a streamed answer, citations, source panel.
// Plain ES module, no dependencies. Talks to /health, /v1/documents*, /v1/chunks and /v1/rag/query.
// Text from the server is only ever inserted as text (textContent / text nodes), never as HTML.

const KEY_STORAGE = "rag.apiKey";
const POLL_MS = 400;

const $ = (id) => document.getElementById(id);

// -- API -------------------------------------------------------------------------------------------

function authHeaders(extra = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    message = body?.error?.message || message;
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) askForKey(message);
  return new ApiError(response.status, message);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// Server-sent events from a fetch response: yields {event, data} with data parsed as JSON.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      let event = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// -- small helpers ---------------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...present(children));
  return node;
}

// Children to insert, without the null/false left by `condition && el(...)`.
function present(children) {
  return children.filter((c) => c !== null && c !== undefined && c !== false && c !== "");
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

const relativeTime = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
function formatAgo(iso) {
  const seconds = (Date.parse(iso) - Date.now()) / 1000;
  if (!Number.isFinite(seconds)) return "";
  const units = [["day", 86400], ["hour", 3600], ["minute", 60]];
  for (const [unit, size] of units) {
    if (Math.abs(seconds) >= size) return relativeTime.format(Math.round(seconds / size), unit);
  }
  return "just now";
}

function formatSeconds(s) {
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

function baseName(path) {
  return path.split(/[\\/]/).pop() || path;
}

function plural(n, one, many = `${one}s`) {
  return `${n} ${n === 1 ? one : many}`;
}

let toastTimer;
function toast(message) {
  const box = $("toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, 6000);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- API key ---------------------------------------------------------------------------------------

function askForKey(message) {
  const details = $("key-settings");
  details.open = true;
  $("api-key").focus();
  toast(`${message.charAt(0).toUpperCase()}${message.slice(1)}: enter the server's API key.`);
}

function setUpKey() {
  const input = $("api-key");
  input.value = localStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    $("key-settings").open = false;
    toast(key ? "API key saved." : "API key removed.");
    refreshAll();
  });
  $("key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    input.value = "";
    toast("API key removed.");
  });
}

// -- server status ---------------------------------------------------------------------------------

async function loadStatus() {
  const status = $("server-status");
  try {
    const health = await (await fetch("/health")).json();
    const parts = [`Model: ${health.chat_models?.[0] ?? "none"}`];
    if (health.embedding_model) parts.push(`Embedder: ${baseName(health.embedding_model)}`);
    parts.push(health.reranker ? `Reranker: ${baseName(health.reranker)}` : "No reranker");
    status.textContent = parts.join(" · ");
    status.dataset.state = "ok";
    const rerank = $("rerank");
    rerank.disabled = !health.reranker;
    rerank.closest("label").title = health.reranker ? "" : "This server has no reranker loaded";
  } catch {
    status.textContent = "Server unreachable";
    status.dataset.state = "error";
  }
}

// -- library ---------------------------------------------------------------------------------------

const KIND_LABELS = { pdf: "PDF", markdown: "MD", text: "TXT", html: "HTML", docx: "DOCX" };

async function refreshLibrary() {
  const list = $("documents");
  const summary = $("library-summary");
  let library;
  try {
    library = await api("/v1/documents");
  } catch (error) {
    summary.textContent = `Could not load the library: ${error.message}`;
    return;
  }
  list.replaceChildren();
  if (!library.data.length) {
    summary.textContent = "No documents yet. Upload some to start asking questions.";
    return;
  }
  summary.textContent =
    `${plural(library.num_documents, "document")} · ${plural(library.num_chunks, "chunk")}`;
  for (const doc of library.data) list.append(documentItem(doc));
}

function documentItem(doc) {
  const name = doc.uploaded ? doc.name : doc.path;
  const meta = [plural(doc.num_chunks, "chunk"), formatBytes(doc.size), formatAgo(doc.ingested_at)];
  return el("li", { class: "document", "data-document-id": doc.id },
    el("span", { class: `kind kind-${doc.kind}`, "aria-hidden": "true", text: KIND_LABELS[doc.kind] ?? doc.kind }),
    el("div", { class: "document-text" },
      el("span", { class: "document-name", title: doc.path, text: name }),
      el("span", { class: "document-meta", text: meta.filter(Boolean).join(" · ") })),
    el("div", { class: "document-actions" },
      el("button", {
        type: "button", class: "button small ghost", text: "View",
        "aria-label": `View the chunks of ${name}`,
        onclick: (event) => showDocument(doc.id, null, event.currentTarget),
      }),
      el("button", {
        type: "button", class: "button small danger", text: "Delete",
        "aria-label": `Delete ${name}`,
        onclick: () => deleteDocument(doc, name),
      })));
}

async function deleteDocument(doc, name) {
  if (!confirm(`Delete “${name}” and its ${plural(doc.num_chunks, "chunk")} from the index?`)) return;
  try {
    await api(`/v1/documents/${doc.id}`, { method: "DELETE" });
    toast(`Deleted ${name}.`);
  } catch (error) {
    toast(`Could not delete ${name}: ${error.message}`);
  }
  await refreshLibrary();
  $("library-title").focus();
}

// -- upload ----------------------------------------------------------------------------------------

const FILE_STATUS = {
  queued: "waiting", added: "added", updated: "updated", unchanged: "unchanged",
  failed: "failed", rejected: "not supported",
};

function renderJob(card, job) {
  const done = job.status === "done" || job.status === "failed";
  const total = Math.max(job.num_files, 1);
  card.dataset.status = job.status;
  const title = done
    ? (job.status === "failed" ? "Upload failed" : `Ingested ${plural(job.num_files_done, "file")}`)
    : `Ingesting ${job.num_files_done} of ${plural(job.num_files, "file")}…`;
  const items = job.files.map((file) => {
    const reason = file.error ? file.error.message : null;
    const chunks = file.num_chunks ? ` · ${plural(file.num_chunks, "chunk")}` : "";
    return el("li", { class: `job-file status-${file.status}` },
      el("span", { class: "job-file-name", text: file.name }),
      el("span", { class: "job-file-status", text: `${FILE_STATUS[file.status] ?? file.status}${chunks}` }),
      reason && el("span", { class: "job-file-reason", text: reason }));
  });
  card.replaceChildren(...present([
    el("div", { class: "job-head" },
      el("strong", { text: title }),
      el("span", { class: "job-chunks", text: plural(job.num_chunks, "chunk") + " embedded" })),
    el("progress", {
      max: total, value: done ? total : job.num_files_done,
      "aria-label": "Ingest progress",
    }),
    job.error && el("p", { class: "job-error", text: job.error }),
    el("ul", { class: "job-files" }, ...items),
    done && el("button", {
      type: "button", class: "button small ghost job-dismiss", text: "Dismiss",
      "aria-label": "Dismiss this upload report", onclick: () => card.remove(),
    })]));
}

async function uploadFiles(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const card = el("div", { class: "job", "data-status": "uploading" },
    el("strong", { text: `Uploading ${plural(files.length, "file")}…` }));
  $("jobs").prepend(card);
  let job;
  try {
    job = await api("/v1/documents", { method: "POST", body: form });
    renderJob(card, job);
    while (job.status === "queued" || job.status === "running") {
      await sleep(POLL_MS);
      job = await api(`/v1/documents/jobs/${job.id}`);
      renderJob(card, job);
    }
  } catch (error) {
    card.dataset.status = "failed";
    card.replaceChildren(el("strong", { text: "Upload failed" }),
      el("p", { class: "job-error", text: error.message }),
      el("button", { type: "button", class: "button small ghost", text: "Dismiss", onclick: () => card.remove() }));
  }
  await refreshLibrary();
}

function setUpUpload() {
  const input = $("file-input");
  const zone = $("dropzone");
  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = "";  // choosing the same file again fires change again
    uploadFiles(files);
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    uploadFiles([...event.dataTransfer.files]);
  });
  // A file dropped beside the zone would navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

// -- the answer ------------------------------------------------------------------------------------

const CITATION = /\[(\d+(?:\s*,\s*\d+)*)\]/g;
const OPEN_CITATION = /\[[\d,\s]*$/;  // a "[1, " at the end may still become a citation

// Renders streamed text; [n] for a known source becomes a button as soon as it is complete.
class AnswerView {
  constructor(node) {
    this.node = node;
    this.pending = "";
    this.citations = new Map();
  }

  reset() {
    this.node.replaceChildren();
    this.pending = "";
    this.citations = new Map();
  }

  setCitations(citations) {
    this.citations = new Map(citations.map((c) => [c.number, c]));
  }

  append(text) {
    this.pending += text;
    const open = this.pending.match(OPEN_CITATION);
    const hold = open && open[0].length <= 16 ? open[0].length : 0;
    this.render(this.pending.slice(0, this.pending.length - hold));
    this.pending = this.pending.slice(this.pending.length - hold);
  }

  finish() {
    this.render(this.pending);
    this.pending = "";
  }

  render(text) {
    let last = 0;
    for (const match of text.matchAll(CITATION)) {
      const numbers = match[1].split(",").map((n) => Number(n.trim()));
      if (!numbers.every((n) => this.citations.has(n))) continue;
      this.text(text.slice(last, match.index));
      for (const n of numbers) this.node.append(citeButton(this.citations.get(n)));
      last = match.index + match[0].length;
    }
    this.text(text.slice(last));
  }

  text(text) {
    if (!text) return;
    const tail = this.node.lastChild;
    if (tail && tail.nodeType === Node.TEXT_NODE) tail.appendData(text);
    else this.node.append(document.createTextNode(text));
  }
}

function describeSource(citation) {
  const parts = [baseName(citation.source)];  // the title often repeats as the first heading
  if (citation.page != null) parts.push(`page ${citation.page}`);
  if (citation.heading) parts.push(citation.heading);
  return parts.join(" · ");
}

function citeButton(citation) {
  return el("button", {
    type: "button", class: "cite", text: String(citation.number),
    "aria-label": `Source ${citation.number}: ${describeSource(citation)}`,
    "data-citation": citation.number,
    onclick: (event) => showCitation(citation, event.currentTarget),
  });
}

function renderSources(citations) {
  const list = $("sources");
  list.replaceChildren();
  $("sources-title").hidden = !citations.length;
  for (const citation of citations) {
    list.append(el("li", { class: "source" },
      el("button", {
        type: "button", class: "source-button", "data-citation": citation.number,
        onclick: (event) => showCitation(citation, event.currentTarget),
      },
      el("span", { class: "cite", "aria-hidden": "true", text: String(citation.number) }),
      el("span", { class: "source-text" },
        el("span", { class: "source-name", text: describeSource(citation) }),
        el("span", { class: "source-snippet", text: citation.snippet })))));
  }
}

function renderTimings(t) {
  const parts = [`Retrieval ${formatSeconds(t.retrieve_s)}`];
  if (t.rerank_s > 0) parts.push(`Rerank ${formatSeconds(t.rerank_s)}`);
  if (t.num_prompt_tokens > 0) {
    const cached = t.num_cached_tokens ? `, ${t.num_cached_tokens} cached` : "";
    parts.push(`Prefill ${formatSeconds(t.prefill_s)} (${plural(t.num_prompt_tokens, "token")}${cached})`);
    const rate = t.decode_s > 0 ? `, ${(t.num_completion_tokens / t.decode_s).toFixed(1)} tok/s` : "";
    parts.push(`Decode ${formatSeconds(t.decode_s)} (${plural(t.num_completion_tokens, "token")}${rate})`);
  }
  $("timings").textContent = parts.join(" · ");
}

const FINISH_NOTES = {
  stop: "",
  length: "Cut off at the length limit",
  cancelled: "Stopped",
  not_found: "Not in your documents",
};

let asking = null;  // the AbortController of the question being answered

function setState(text, kind = "") {
  const badge = $("answer-state");
  badge.textContent = text;
  badge.dataset.kind = kind;
}

async function ask(question) {
  asking?.abort();
  const controller = new AbortController();
  asking = controller;
  const answer = new AnswerView($("answer"));
  answer.reset();
  renderSources([]);
  $("timings").textContent = "";
  $("result").hidden = false;
  $("ask-empty").hidden = true;
  $("answer").setAttribute("aria-busy", "true");
  $("stop-button").hidden = false;
  setState("Searching…", "busy");
  const body = {
    question,
    top_k: Number($("top-k").value) || 5,
    mode: $("mode").value,
    rerank: $("rerank").checked,
    stream: true,
  };
  try {
    const response = await fetch("/v1/rag/query", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw await errorOf(response);
    for await (const { event, data } of sseEvents(response)) {
      if (event === "sources") {
        answer.setCitations(data.citations);
        renderSources(data.citations);
        setState("Writing…", "busy");
      } else if (event === "delta") {
        answer.append(data.text);
      } else if (event === "done") {
        answer.finish();
        renderTimings(data.timings);
        setState(FINISH_NOTES[data.finish_reason] ?? data.finish_reason, data.finish_reason);
      } else if (event === "error") {
        throw new ApiError(500, data.error?.message ?? "the answer failed");
      }
    }
  } catch (error) {
    answer.finish();
    if (error.name === "AbortError") {
      setState("Stopped", "cancelled");
    } else {
      setState("Error", "error");
      $("answer").append(el("p", { class: "answer-error", text: error.message }));
    }
  } finally {
    if (asking === controller) {
      asking = null;
      $("stop-button").hidden = true;
    }
    $("answer").removeAttribute("aria-busy");
  }
}

function setUpAsk() {
  const form = $("ask-form");
  const question = $("question");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = question.value.trim();
    if (!text) {
      question.focus();
      return;
    }
    ask(text);
  });
  question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.ctrlKey && !event.altKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  $("stop-button").addEventListener("click", () => {
    asking?.abort();
    question.focus();
  });
}

// -- the source panel ------------------------------------------------------------------------------

let panelReturnFocus = null;

function openPanel(title, meta, body, opener) {
  const panel = $("chunk-panel");
  $("chunk-title").textContent = title;
  $("chunk-meta").replaceChildren(...meta.flatMap(([term, value]) =>
    value == null || value === "" ? [] : [el("dt", { text: term }), el("dd", { text: String(value) })]));
  $("chunk-body").replaceChildren(...body);
  if (opener) panelReturnFocus = opener;
  panel.hidden = false;
  document.body.classList.add("panel-open");
  panel.focus();
}

function closePanel() {
  const panel = $("chunk-panel");
  if (panel.hidden) return;
  panel.hidden = true;
  document.body.classList.remove("panel-open");
  panelReturnFocus?.focus();
  panelReturnFocus = null;
}

function chunkText(text) {
  return el("blockquote", { class: "chunk-text", text });
}

function showCitation(citation, opener) {
  const more = el("button", {
    type: "button", class: "button small", text: "Show the whole document",
    onclick: async () => {
      try {
        const chunk = await api(`/v1/chunks/${citation.chunk_id}`);
        showDocument(chunk.document_id, chunk.id, null);
      } catch (error) {
        toast(error.status === 404 ? "That passage is no longer in the index." : error.message);
      }
    },
  });
  openPanel(`Source ${citation.number}`, [
    ["Document", citation.source],
    ["Title", citation.title],
    ["Page", citation.page],
    ["Section", citation.heading],
    ["Chunk", `#${citation.chunk_id}`],
  ], [chunkText(citation.text), more], opener);
}

async function showDocument(documentId, highlightChunkId, opener) {
  let listing;
  try {
    listing = await api(`/v1/documents/${documentId}/chunks`);
  } catch (error) {
    toast(`Could not load the document: ${error.message}`);
    return;
  }
  const doc = listing.document;
  const items = listing.data.map((chunk) => {
    const where = [chunk.page != null ? `page ${chunk.page}` : null, chunk.heading].filter(Boolean).join(" · ");
    return el("li", {
      class: chunk.id === highlightChunkId ? "doc-chunk highlighted" : "doc-chunk",
      id: `chunk-${chunk.id}`,
    },
    el("span", { class: "doc-chunk-head", text: `Chunk ${chunk.ordinal + 1}${where ? ` · ${where}` : ""}` }),
    chunkText(chunk.text));
  });
  openPanel(doc.title || doc.name, [
    ["Document", doc.path],
    ["Chunks", doc.num_chunks],
    ["Size", formatBytes(doc.size)],
  ], [el("ol", { class: "doc-chunks" }, ...items)], opener);
  if (highlightChunkId != null) $(`chunk-${highlightChunkId}`)?.scrollIntoView({ block: "center" });
}

function setUpPanel() {
  $("chunk-close").addEventListener("click", closePanel);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closePanel();
  });
}

// -- start -----------------------------------------------------------------------------------------

function refreshAll() {
  loadStatus();
  refreshLibrary();
}

setUpKey();
setUpUpload();
setUpAsk();
setUpPanel();
$("library-refresh").addEventListener("click", refreshLibrary);
refreshAll();
