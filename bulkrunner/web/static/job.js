// The job page: refreshes every second while the job runs; cancel and retry buttons.
"use strict";

(() => {
  const { api, el, jsonText, badge, progress, timeEl, errorBlock, syncRows, poll, query,
          STATES, FINISHED } = window.bulkrunner;
  const REFRESH_MS = 1000;

  function itemRow(it) {
    let outcome = "";
    if (it.error) outcome = errorBlock(it.error);
    else if (it.result !== null && it.result !== undefined) {
      outcome = el("code", { class: "cell" }, jsonText(it.result, 200, 0));
    } else if (it.message) outcome = el("span", { class: "muted" }, it.message);
    return el("tr", {},
      el("td", { "data-label": "#" }, it.index),
      el("td", { "data-label": "State" }, badge(it.state)),
      el("td", { "data-label": "Attempts" }, it.attempts),
      el("td", { "data-label": "Params" }, el("code", { class: "cell" }, jsonText(it.params, 200, 0))),
      el("td", { "data-label": "Result", class: "outcome" }, outcome),
      el("td", { "data-label": "Started" }, timeEl(it.started_at)),
      el("td", { "data-label": "Finished" }, timeEl(it.finished_at)));
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

  document.addEventListener("DOMContentLoaded", () => {
    const root = document.getElementById("job");
    const { id, state, after, limit } = root.dataset;
    const field = (name) => root.querySelector(`[data-field="${name}"]`);
    const cancelBtn = document.getElementById("cancel");
    const retryBtn = document.getElementById("retry");
    const status = document.getElementById("action-status");
    const outcomeBox = document.getElementById("outcome");
    const tbody = root.querySelector(".items-table tbody");
    const empty = root.querySelector(".items .empty");
    const next = document.getElementById("items-next");
    let lastOutcome = null;
    let lastState = null;

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
      const finished = FINISHED.has(job.state);
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
          next.href = `/jobs/${id}` + query({ state, after: items.data.next });
        }
      }
      if (!j.ok) return true;
      return !showJob(j.data);  // stop polling once the job has finished
    }

    const poller = poll(refresh, REFRESH_MS);
    if (FINISHED.has(root.querySelector("[data-field=state] .badge").textContent.trim())) {
      poller.stop();
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

    cancelBtn.addEventListener("click", () => act(cancelBtn, "Cancel", "Cancelled."));
    retryBtn.addEventListener("click", () => act(retryBtn, "Retry", "Failed items queued again."));
  });
})();
