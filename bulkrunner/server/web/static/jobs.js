// The jobs list: filters apply on change; the current page refreshes every 2 seconds.
"use strict";

(() => {
  const { api, el, badge, progress, timeEl, syncRows, poll, query, root } = window.bulkrunner;
  const REFRESH_MS = 2000;

  function row(job) {
    const c = job.items;
    return el("tr", {},
      el("td", { "data-label": "Job" },
        el("a", { href: `${root}/jobs/${job.id}` }, el("code", {}, job.id.slice(0, 8)))),
      el("td", { "data-label": "Task" }, job.task),
      el("td", { "data-label": "State" }, badge(job.state)),
      el("td", { "data-label": "Progress" }, progress(job)),
      el("td", { "data-label": "Message", class: "message" }, job.message || ""),
      el("td", { "data-label": "Created" }, timeEl(job.created_at)));
  }

  document.addEventListener("DOMContentLoaded", () => {
    const box = document.getElementById("jobs-list");
    const form = document.getElementById("filters");
    for (const select of form.querySelectorAll("select")) {
      select.addEventListener("change", () => form.requestSubmit());
    }
    const tbody = box.querySelector("tbody");
    const empty = box.querySelector(".empty");
    const older = document.getElementById("older");
    const { state, task, before, limit } = box.dataset;

    poll(async () => {
      const res = await api("GET", "/api/v1/jobs" + query({ state, task, before, limit }));
      if (!res.ok) return true;
      syncRows(tbody, res.data.jobs, (j) => j.id, row);
      empty.hidden = res.data.jobs.length > 0;
      older.hidden = res.data.next === null;
      if (res.data.next !== null) older.href = `${root}/` + query({ state, task, before: res.data.next });
      return true;
    }, REFRESH_MS);
  });
})();
