// The job page: refreshes every second while the job runs; cancel and retry buttons; each
// item's captured output in a dialog that follows it while the item runs.
"use strict";

(() => {
  const { api, getBytes, el, jsonText, keyValues, badge, progress, timeEl, errorBlock, syncRows, poll,
          query, root, STATES, FINISHED } = window.bulkrunner;
  const REFRESH_MS = 1000;
  const prefix = root;  // the URL prefix (in the page's handler `root` is its element)
  // A phone's narrow screen, where each item is a card (the style sheet's breakpoint):
  // fewer items a page there, so a page is not a long scroll.
  const NARROW = window.matchMedia("(max-width: 640px)");
  const PACE_MS = 2000;
  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    return node;
  }

  function duration(s) {
    if (s < 1) return "under a second";
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  /** "3.2 items/s (limit 5/s) · about 12 s left" from the job's pace. */
  function paceLine(p) {
    let text = p.rate === null ? "No items finished here lately" : `${p.rate.toPrecision(3)} items/s`;
    if (p.rate_limit) text += ` (limit ${p.rate_limit})`;
    if (p.eta_seconds !== null && p.left > 0) {
      text += p.eta_seconds < 1 ? " · under a second left" : ` · about ${duration(p.eta_seconds)} left`;
    }
    return text;
  }

  /**
   * Draws items finished per interval as bars in `chart` (an inline SVG, 600 × 80 units),
   * with the task's rate limit as a dashed line when it has one.
   */
  function drawPace(chart, p) {
    const W = 600, H = 80;
    const bars = p.history.slice(-120);
    const limit = p.limit_per_second ? p.limit_per_second * p.interval : 0;
    const top = Math.max(1, limit, ...bars.map((b) => b.finished));
    const nodes = [];
    const w = W / Math.max(bars.length, 30);
    bars.forEach((b, i) => {
      const h = (b.finished / top) * (H - 4);
      const rect = svg("rect", { x: (i * w).toFixed(1), y: (H - h).toFixed(1),
                                 width: Math.max(w - 1, 1).toFixed(1), height: h.toFixed(1),
                                 class: "pace-bar" });
      const title = svg("title", {});
      title.textContent = `${b.finished} finished in ${p.interval} s from ${b.t}`;
      rect.append(title);
      nodes.push(rect);
    });
    if (limit) {
      const y = (H - (limit / top) * (H - 4)).toFixed(1);
      nodes.push(svg("line", { x1: 0, x2: W, y1: y, y2: y, class: "pace-limit" }));
    }
    chart.replaceChildren(...nodes);
  }
  const LOG_MS = 1000;

  function logButton(index) {
    return el("button", { type: "button", class: "secondary small", "data-log-item": index,
                          "aria-haspopup": "dialog", "aria-label": `Log of item ${index}` },
              "Log");
  }

  function workerCell(worker) {
    return worker ? el("code", { class: "cell" }, worker) : el("span", { class: "muted" }, "—");
  }

  /**
   * An item's attempts across retries, its running one included (as the server's
   * models.attempts_in_all counts them): `attempts` is the current try's only, and each
   * earlier try's count is the `attempt` of its last error in `errors`.
   */
  function attemptsInAll(it) {
    const attempts = it.attempts || 0;
    const errors = it.errors || [];
    const mine = attempts - (it.state === "succeeded" ? 1 : 0);  // this try's failures
    let total = 0, last = 0;
    for (const e of errors.slice(0, Math.max(errors.length - mine, 0))) {
      const n = e && e.attempt;
      if (!Number.isInteger(n)) continue;
      if (n <= last) total += last;  // a new try began
      last = n;
    }
    return total + last + attempts + (it.state === "running" ? 1 : 0);
  }

  /** "2", "2 (running)", "1 (3 in all)": as the CLI's `items` words them. */
  function attemptsText(it) {
    const running = it.state === "running";
    const n = (it.attempts || 0) + (running ? 1 : 0);
    const total = attemptsInAll(it);
    const notes = [...(running ? ["running"] : []), ...(total !== n ? [`${total} in all`] : [])];
    return notes.length ? `${n} (${notes.join("; ")})` : String(n);
  }

  function byteCount(n) {
    if (n < 1024) return n === 1 ? "1 byte" : `${n} bytes`;
    return `${(n / 1024).toFixed(1)} KiB`;
  }

  function itemRow(it) {
    let outcome = "";
    if (it.error) outcome = errorBlock(it.error);
    else if (it.result !== null && it.result !== undefined) {
      outcome = keyValues(it.result);
    } else if (it.message) outcome = el("span", { class: "muted" }, it.message);
    return el("tr", {},
      el("td", { "data-label": "#" }, it.index),
      el("td", { "data-label": "State" }, badge(it.state)),
      el("td", { "data-label": "Attempts" }, attemptsText(it)),
      el("td", { "data-label": "Worker", class: "worker" }, workerCell(it.worker)),
      el("td", { "data-label": "Params" }, keyValues(it.params)),
      el("td", { "data-label": "Result", class: "outcome" }, outcome),
      el("td", { "data-label": "Started" }, timeEl(it.started_at)),
      el("td", { "data-label": "Finished" }, timeEl(it.finished_at)),
      el("td", { "data-label": "Log" }, logButton(it.index)));
  }

  /**
   * The log dialog of job `jobId`: open(index) shows what item `index` printed so far and,
   * while the item is queued or running, asks for new text every second (from the byte
   * offset the server gave last) until the item has finished or the dialog is closed.
   */
  function logViewer(jobId, tbody) {
    const dialog = document.getElementById("log");
    const part = (name) => dialog.querySelector(`[data-log="${name}"]`);
    const text = part("text");
    const status = part("status");
    let view = null;  // the item shown: {index, after, decoder, poller}

    const sizeNote = part("size");

    // The status line is a live region: it changes with the item's state only, while the
    // byte count beside it (not announced) grows as the log does.
    function describe(state, size) {
      if (state === "queued") return "Waiting for the item to start…";
      if (state === "running") return "Following the log while the item runs";
      return size ? `Item ${state}` : `Item ${state} · it printed nothing`;
    }

    function say(message) {
      if (status.textContent !== message) status.textContent = message;
    }

    async function more(v) {
      const path = `/api/v1/jobs/${jobId}/items/${v.index}/log` + query({ after: v.after || "" });
      const res = await getBytes(path);
      if (v !== view) return false;  // closed, or showing another item now
      if (!res.ok) {
        say(`The log cannot be read: ${res.error.message}`);
        return res.status === 0 || res.status >= 500;  // try again unless the item is gone
      }
      const state = res.headers.get("X-Item-State") || "";
      const size = Number.parseInt(res.headers.get("X-Log-Size"), 10);
      const finished = FINISHED.has(state);
      if (Number.isFinite(size) && size < v.after) {  // not this log any more: start over
        text.replaceChildren();
        v.after = 0;
        v.decoder = new TextDecoder("utf-8");
        return true;
      }
      // Offsets count bytes: a character cut between two answers is completed by the next.
      const chunk = v.decoder.decode(res.body, { stream: !finished });
      v.after = Number.isFinite(size) ? size : v.after + res.body.byteLength;
      if (chunk) {
        const atEnd = text.scrollHeight - text.scrollTop - text.clientHeight < 32;
        text.append(chunk);  // text only: the output is never parsed as HTML
        if (atEnd) text.scrollTop = text.scrollHeight;
      }
      say(describe(state, v.after));
      sizeNote.textContent = v.after ? `· ${byteCount(v.after)}` : "";
      dialog.dataset.state = state;
      return !finished;
    }

    function stop() {
      if (view) view.poller.stop();
      view = null;
    }

    function open(index) {
      stop();
      text.replaceChildren();
      part("index").textContent = index;
      part("raw").href = `${root}/api/v1/jobs/${jobId}/items/${index}/log`;
      say("Loading…");
      sizeNote.textContent = "";
      delete dialog.dataset.state;
      const v = { index, after: 0, decoder: new TextDecoder("utf-8"), poller: null };
      view = v;
      v.poller = poll(() => more(v), LOG_MS);
      v.poller.now();
      if (!dialog.open) dialog.showModal();
    }

    dialog.addEventListener("close", () => {
      const index = view ? view.index : null;
      stop();
      // The row may have been redrawn while the dialog was open (the browser then leaves
      // the focus in the closed dialog): focus the row's new button.
      const active = document.activeElement;
      if (index !== null && (!active || active === document.body || dialog.contains(active))) {
        const button = tbody.querySelector(`button[data-log-item="${index}"]`);
        if (button) button.focus();
      }
    });
    // A click on the backdrop (outside the dialog's box) closes it too.
    dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });
    tbody.addEventListener("click", (e) => {
      const button = e.target.closest("button[data-log-item]");
      if (button) open(Number(button.dataset.logItem));
    });
    return { open };
  }

  function outcome(job) {
    if (job.error) {
      return [el("h2", {}, "Error"), el("div", { class: "error-box" }, errorBlock(job.error))];
    }
    if (job.result !== null && job.result !== undefined) {
      return [el("h2", {}, "Result"), el("pre", { class: "result" }, jsonText(job.result))];
    }
    return [];
  }

  /** What the retry button re-queues, by what there is: "failed", "cancelled" or both. */
  function retryWhat(c) {
    if (c.failed && c.cancelled) return "Failed and cancelled items";
    return c.cancelled ? "Cancelled items" : "Failed items";
  }

  function failureItem(f) {
    return el("li", {}, el("span", { class: "failure-count" }, `${f.count} ×`), " ",
      // <bdi>: a right-to-left control in the message cannot reorder the text after it.
      el("strong", {}, f.type), ": ", el("bdi", {}, jsonText(f.message || "", 300)), " ",
      el("span", { class: "muted" }, `(first: item ${f.first_index})`));
  }

  document.addEventListener("DOMContentLoaded", () => {
    const root = document.getElementById("job");
    const { id, state, after } = root.dataset;
    const limit = NARROW.matches && root.dataset.narrowLimit ? root.dataset.narrowLimit
      : root.dataset.limit;
    const field = (name) => root.querySelector(`[data-field="${name}"]`);
    const cancelBtn = document.getElementById("cancel");
    const retryBtn = document.getElementById("retry");
    const pauseBtn = document.getElementById("pause");
    const WAITING = JSON.parse(root.dataset.waitingWords || "{}");
    const paceBox = document.getElementById("pace");
    const status = document.getElementById("action-status");
    const outcomeBox = document.getElementById("outcome");
    const tbody = root.querySelector(".items-table tbody");
    const empty = root.querySelector(".items .empty");
    const next = document.getElementById("items-next");
    let lastOutcome = null;
    let lastFailures = null;
    let counts = null;  // the job's item counts as last shown
    const failuresBox = document.getElementById("failures");
    let lastState = null;
    logViewer(id, tbody);

    // The server drew a wide screen's page of items: on a narrow one keep the first
    // `limit` rows, and the next page goes on after the last of them.
    const keep = Number.parseInt(limit, 10);
    if (tbody.rows.length > keep) {
      while (tbody.rows.length > keep) tbody.rows[keep].remove();
      next.hidden = false;
      next.href = `${prefix}/jobs/${id}` + query({ state, after: tbody.rows[keep - 1].dataset.key });
    }

    document.getElementById("items-state").addEventListener("change", (e) => {
      e.target.form.requestSubmit();
    });

    function showJob(job) {
      if (job.state !== lastState) field("state").replaceChildren(badge(job.state));
      lastState = job.state;
      field("progress").replaceChildren(progress(job));
      field("message").textContent = job.message || "";
      field("started_at").replaceChildren(timeEl(job.started_at));
      field("finished_at").replaceChildren(timeEl(job.finished_at));
      for (const s of ["total", ...STATES]) {
        root.querySelector(`[data-count="${s}"]`).textContent = job.items[s];
      }
      const sig = JSON.stringify([job.result, job.error]);
      if (sig !== lastOutcome) {
        const opened = outcomeBox.querySelector("details[open]") !== null;
        outcomeBox.replaceChildren(...outcome(job));
        if (opened) for (const d of outcomeBox.querySelectorAll("details")) d.open = true;
        outcomeBox.hidden = !outcomeBox.hasChildNodes();
        lastOutcome = sig;
      }
      const failures = job.failures || [];
      const fsig = JSON.stringify(failures);
      if (fsig !== lastFailures) {
        failuresBox.querySelector("ul").replaceChildren(...failures.map(failureItem));
        failuresBox.hidden = failures.length === 0;
        lastFailures = fsig;
      }
      counts = job.items;
      const label = `Retry ${retryWhat(job.items).toLowerCase()}`;
      if (retryBtn.textContent !== label) retryBtn.textContent = label;
      const finished = FINISHED.has(job.state);
      const waiting = field("waiting");
      const words = job.waiting ? (WAITING[job.waiting] || job.waiting) : "";
      if (waiting.textContent !== words && !(words && waiting.textContent.startsWith(words))) {
        waiting.textContent = words;
      }
      waiting.hidden = !job.waiting;
      const paused = job.state === "paused";
      pauseBtn.dataset.paused = String(paused);
      pauseBtn.textContent = paused ? "Resume job" : "Pause job";
      pauseBtn.disabled = finished;
      if (finished) paceBox.hidden = true;
      cancelBtn.disabled = finished;
      retryBtn.disabled = !finished || !(job.items.failed || job.items.cancelled);
      return finished;
    }

    async function refresh() {
      const [j, items] = await Promise.all([
        api("GET", `/api/v1/jobs/${id}`),
        api("GET", `/api/v1/jobs/${id}/items` + query({ state, after, limit })),
      ]);
      if (items.ok) {
        syncRows(tbody, items.data.items, (it) => it.index, itemRow);
        empty.hidden = items.data.items.length > 0;
        next.hidden = items.data.next === null;
        if (items.data.next !== null) {
          next.href = `${prefix}/jobs/${id}` + query({ state, after: items.data.next });
        }
      }
      if (!j.ok) return true;
      return !showJob(j.data);  // stop polling once the job has finished
    }

    const poller = poll(refresh, REFRESH_MS);
    async function refreshPace() {
      const res = await api("GET", `/api/v1/jobs/${id}/pace`);
      if (!res.ok) return true;
      const p = res.data;
      paceBox.querySelector("[data-pace=line]").textContent = paceLine(p);
      drawPace(paceBox.querySelector("[data-pace=chart]"), p);
      return !FINISHED.has(p.state);
    }
    const pacer = poll(refreshPace, PACE_MS);
    pacer.now();
    if (FINISHED.has(root.querySelector("[data-field=state] .badge").textContent.trim())) {
      poller.stop();
      pacer.stop();
    }

    async function act(button, verb, done) {
      button.disabled = true;
      status.textContent = `${verb}…`;
      const res = await api("POST", `/api/v1/jobs/${id}/${verb.toLowerCase()}`);
      if (res.ok) {
        status.textContent = done;
        showJob(res.data);
      } else {
        status.textContent = res.data.error ? res.data.error.message : `${verb} failed.`;
        button.disabled = false;
      }
      poller.now();
    }

    function countsNow() {
      if (counts) return counts;
      const c = {};
      for (const s of ["total", ...STATES]) {
        c[s] = Number.parseInt(root.querySelector(`[data-count="${s}"]`).textContent, 10) || 0;
      }
      return c;
    }

    cancelBtn.addEventListener("click", () => {
      const c = countsNow();
      const left = c.queued + c.running;
      if (left > 0) {
        const what = left === 1 ? "1 item has" : `${left} items have`;
        const ok = window.confirm(`Cancel this job? ${what} not finished yet (of ${c.total}) ` +
          "and will not run; running items are stopped.");
        if (!ok) {
          status.textContent = "Not cancelled.";
          return;
        }
      }
      act(cancelBtn, "Cancel", "Cancelled.");
    });
    pauseBtn.addEventListener("click", () => {
      if (pauseBtn.dataset.paused === "true") act(pauseBtn, "Resume", "Resumed.");
      else act(pauseBtn, "Pause", "Paused: queued items wait; running ones finish.");
    });
    retryBtn.addEventListener("click", () => {
      act(retryBtn, "Retry", `${retryWhat(countsNow())} queued again.`);
    });
  });
})();
