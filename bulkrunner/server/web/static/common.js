// Shared helpers for the bulkrunner pages: API calls, DOM building, polling, time display.
"use strict";

window.bulkrunner = (() => {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";
  // Where the page and its API live: "" on the server's own, "/bulkrunner" (say) when a
  // Flask app mounts them under a prefix. Every path below is taken from here.
  const rootMeta = document.querySelector('meta[name="bulkrunner-root"]');
  const root = rootMeta ? rootMeta.content : "";
  const STATES = ["queued", "running", "succeeded", "failed", "cancelled"];
  const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

  const UNREACHABLE = { error: { code: "unreachable",
    message: "The server cannot be reached. Is bulkrunner still running?", details: {} } };

  /**
   * Show (or hide) the page's "server unreachable" notice: every API call says whether the
   * server answered, so a page that polls shows when what it shows is no longer current.
   */
  function reachable(yes) {
    const notice = document.getElementById("unreachable");
    if (notice && notice.hidden !== yes) notice.hidden = yes;
    document.body.classList.toggle("offline", !yes);
  }

  /**
   * fetch() with the page's session cookie; null when the server cannot be reached. A 401
   * sends the user to log in.
   */
  async function send(path, init) {
    let resp;
    try {
      resp = await fetch(root + path, { ...init, credentials: "same-origin" });
    } catch (e) {
      return null;
    }
    if (resp.status === 401) {
      const next = location.pathname + location.search;
      location.assign(root + "/login?next=" + encodeURIComponent(next));
    }
    return resp;
  }

  /**
   * GET a plain-text endpoint; resolves to {ok, status, body (ArrayBuffer), headers}, or for
   * an error to {ok: false, status, error: {message, ...}} as the JSON API gives it.
   */
  async function getBytes(path) {
    const resp = await send(path, { method: "GET", headers: { Accept: "text/plain" },
                                     cache: "no-store" });
    reachable(resp !== null);
    if (resp === null) return { ok: false, status: 0, error: UNREACHABLE.error };
    if (!resp.ok) {
      let error = { code: "bad_response", message: `The server answered ${resp.status}.` };
      try {
        const data = await resp.json();
        if (data && data.error) error = data.error;
      } catch (e) { /* not JSON: keep the generic message */ }
      return { ok: false, status: resp.status, error };
    }
    return { ok: true, status: resp.status, body: await resp.arrayBuffer(), headers: resp.headers };
  }

  /** Call the JSON API; resolves to {ok, status, data}. A 401 sends the user to log in. */
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
    let payload;
    if (body instanceof FormData) {
      payload = body;
    } else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    const resp = await send(path, { method, headers, body: payload });
    reachable(resp !== null);
    if (resp === null) return { ok: false, status: 0, data: UNREACHABLE };
    let data = null;
    try {
      data = await resp.json();
    } catch (e) {
      data = { error: { code: "bad_response", message: `The server answered ${resp.status}.`,
                        details: {} } };
    }
    return { ok: resp.ok, status: resp.status, data };
  }

  /** Build an element: el("a", {href: "/"}, "text", child...). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  /** A value as JSON text (strings as they are), cut at `limit` characters. */
  function jsonText(value, limit = 10000, indent = 2) {
    const text = typeof value === "string" ? value : JSON.stringify(value, null, indent);
    return text.length <= limit ? text : `${text.slice(0, limit)}… (${text.length} characters)`;
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  /** An ISO time as local "YYYY-MM-DD HH:MM:SS". */
  function localTime(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return iso;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function timeEl(iso) {
    if (!iso) return "—";
    return el("time", { datetime: iso, title: iso }, localTime(iso));
  }

  /** Show every server-rendered <time> in local time. */
  function localizeTimes(root) {
    for (const t of root.querySelectorAll("time[datetime]")) {
      t.textContent = localTime(t.getAttribute("datetime"));
      t.title = t.getAttribute("datetime");
    }
  }

  function badge(state) {
    return el("span", { class: `badge state-${state}` }, state);
  }

  function progress(job) {
    const c = job.items;
    if (job.state === "cancelled" && c.total) {
      // What ran, not what finished: cancelled items did not run.
      const ran = c.succeeded + c.failed;
      return el("span", { class: "progress" },
        el("progress", { max: "1", value: String(ran / c.total),
                         "aria-label": `${ran} of ${c.total} items ran` }),
        el("span", { class: "progress-text" }, `${ran} of ${c.total} ran`));
    }
    const pct = Math.floor((job.progress || 0) * 100);
    return el("span", { class: "progress" },
      el("progress", { max: "1", value: String(job.progress || 0), "aria-label": `Progress ${pct}%` }),
      el("span", { class: "progress-text" },
        c.total > 1 ? `${pct}% · ${c.succeeded + c.failed + c.cancelled} of ${c.total}` : `${pct}%`));
  }

  /** A value for a narrow cell: an object as "key: value" lines (nested values as JSON). */
  function keyValues(value, limit = 200) {
    if (value !== null && typeof value === "object" && !Array.isArray(value) &&
        Object.keys(value).length) {
      return el("dl", { class: "kv" }, ...Object.entries(value).map(([k, v]) =>
        el("div", {}, el("dt", {}, `${k}:`), " ",
           el("dd", {}, el("code", { class: "cell" }, jsonText(v, limit, 0))))));
    }
    return el("code", { class: "cell" }, jsonText(value, limit, 0));
  }

  /** An error as its type and message, with the traceback folded. */
  function errorBlock(error) {
    const frag = document.createDocumentFragment();
    frag.append(el("p", { class: "error-line" }, el("strong", {}, error.type || "Error"),
      ": ", jsonText(error.message || "", 2000)));
    if (error.traceback) {
      frag.append(el("details", { class: "traceback" }, el("summary", {}, "Traceback"),
        el("pre", {}, error.traceback)));
    }
    return frag;
  }

  /**
   * Make `tbody` show one row per record, reusing rows whose record did not change (so an
   * opened traceback stays open while the page polls).
   */
  function syncRows(tbody, records, key, render) {
    const old = new Map();
    for (const tr of tbody.rows) old.set(tr.dataset.key, tr);
    const rows = records.map((r) => {
      const sig = JSON.stringify(r);
      const k = String(key(r));
      const prev = old.get(k);
      if (prev && prev.dataset.sig === sig) return prev;
      const tr = render(r);
      if (prev) {
        // Keep a traceback the user opened open across refreshes.
        const opened = prev.querySelectorAll("details[open]").length;
        if (opened) for (const d of tr.querySelectorAll("details")) d.open = true;
      }
      tr.dataset.key = k;
      tr.dataset.sig = sig;
      return tr;
    });
    tbody.replaceChildren(...rows);
  }

  /**
   * Call `fn` every `ms` milliseconds while the tab is visible, one call at a time; stop
   * when it returns false. Returns {stop(), now()}.
   */
  function poll(fn, ms) {
    let timer = null;
    let stopped = false;
    let busy = false;
    async function tick() {
      timer = null;
      if (stopped) return;
      if (document.hidden) { schedule(); return; }
      busy = true;
      let again = true;
      try {
        again = (await fn()) !== false;
      } catch (e) {
        console.error("bulkrunner: refresh failed", e);
      } finally {
        busy = false;
      }
      if (again) schedule(); else halt();
    }
    function schedule() { if (!stopped && timer === null) timer = setTimeout(tick, ms); }
    function onVisible() {
      if (!document.hidden && !stopped && !busy) { clearTimeout(timer); timer = null; tick(); }
    }
    function halt() {
      stopped = true;
      clearTimeout(timer);
      timer = null;
      document.removeEventListener("visibilitychange", onVisible);
    }
    document.addEventListener("visibilitychange", onVisible);
    schedule();
    return {
      stop: halt,
      now() {
        if (stopped) document.addEventListener("visibilitychange", onVisible);
        stopped = false;
        clearTimeout(timer);
        timer = null;
        if (!busy) tick(); else schedule();
      },
    };
  }

  /** Query string from an object, leaving out empty values. */
  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) q.set(k, v);
    const s = q.toString();
    return s ? `?${s}` : "";
  }

  document.addEventListener("DOMContentLoaded", () => localizeTimes(document));

  return { api, getBytes, el, jsonText, keyValues, timeEl, localizeTimes, badge, progress, errorBlock,
           syncRows, poll, query, root, STATES, FINISHED };
})();
