// The task form: reads each field by its param type, submits through the API, and shows a
// 422's field errors beside the fields they name.
"use strict";

(() => {
  const { api, el, root } = window.bulkrunner;
  const OPTIONS = { priority: "int", max_attempts: "int", timeout: "float", key: "str",
                    delay: "float", run_after: "time" };

  class FieldError extends Error {}

  /** The JSON value of one param's control, or undefined to leave the param out. */
  function readParam(box) {
    const { kind, type } = box.dataset;
    const required = box.dataset.required === "true";
    const def = JSON.parse(box.dataset.default);
    const input = box.querySelector("input, select, textarea");
    const raw = input.value;
    switch (kind) {
      case "select":
        return raw === "" ? undefined : JSON.parse(raw);
      case "checkbox":
        return !input.checked && def === null && !required ? undefined : input.checked;
      case "number":
        if (input.validity.badInput) throw new FieldError("must be a number");
        return raw.trim() === "" ? undefined : Number(raw);
      case "json":
        if (raw.trim() === "") return undefined;
        try {
          return JSON.parse(raw);
        } catch (e) {
          throw new FieldError(`is not valid JSON; write it like ${input.placeholder}`);
        }
      default:
        if (type === "any") {
          if (raw.trim() === "") return undefined;
          try { return JSON.parse(raw); } catch (e) { return raw; }
        }
        return raw === "" && (required || def === null) ? undefined : raw;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const form = document.getElementById("submit-form");
    const formError = document.getElementById("form-error");
    const status = document.getElementById("submit-status");
    const button = document.getElementById("submit");
    const fileInput = document.getElementById("items-file");
    const itemsError = document.getElementById("err-items");

    function clearErrors() {
      formError.hidden = true;
      formError.replaceChildren();
      for (const p of form.querySelectorAll(".field-error")) { p.hidden = true; p.replaceChildren(); }
      for (const i of form.querySelectorAll("[aria-invalid]")) i.removeAttribute("aria-invalid");
    }

    /** Show `message` beside the control with id `controlId` (its error node is `errId`). */
    function markField(controlId, errId, message) {
      const err = document.getElementById(errId);
      const control = document.getElementById(controlId);
      if (!err || !control) return false;
      if (err.childNodes.length) err.append(el("br"));
      err.append(message);
      err.hidden = false;
      control.setAttribute("aria-invalid", "true");
      return true;
    }

    function markItems(label, message) {
      if (!itemsError.querySelector("ul")) itemsError.append(el("ul"));
      itemsError.querySelector("ul").append(el("li", {}, label ? `${label}: ${message}` : message));
      itemsError.hidden = false;
      fileInput.setAttribute("aria-invalid", "true");
    }

    function showGeneral(message) {
      formError.append(el("p", {}, message));
      formError.hidden = false;
    }

    /**
     * Put each `error.details.fields` entry beside the field it names. A problem of the
     * items file is shown as the server names it ("row 3 (item 1), n: …"), as the CLI
     * prints it.
     */
    function showFieldErrors(fields) {
      for (const [name, message] of Object.entries(fields)) {
        const param = /^params\.(.+)$/.exec(name);
        const row = /^(?:(?:row|line|item) \d+|items\[\d+\])(?:$|[ ,.:])/.test(name);
        if (param && markField(`p-${param[1]}`, `err-p-${param[1]}`, message)) continue;
        if (param && markField("opt-extra", "err-opt-extra", `${param[1]}: ${message}`)) {
          document.getElementById("advanced").open = true;
          continue;
        }
        if (name in OPTIONS && markField(`opt-${name}`, `err-opt-${name}`, message)) {
          document.getElementById("advanced").open = true;
          continue;
        }
        if (row) { markItems(name, message); continue; }
        if (name === "items") { markItems("", message); continue; }
        showGeneral(`${name}: ${message}`);
      }
    }

    function focusFirstError() {
      const first = form.querySelector("[aria-invalid=true]") || formError;
      if (first === formError) formError.tabIndex = -1;
      first.focus();
    }

    /** The submission from the form: {params, options}; marks local problems. */
    function collect() {
      const params = {};
      const options = {};
      let bad = false;
      for (const box of form.querySelectorAll("[data-param]")) {
        const name = box.dataset.param;
        try {
          const v = readParam(box);
          if (v !== undefined) params[name] = v;
        } catch (e) {
          if (!(e instanceof FieldError)) throw e;
          markField(`p-${name}`, `err-p-${name}`, e.message);
          bad = true;
        }
      }
      for (const [name, type] of Object.entries(OPTIONS)) {
        const input = document.getElementById(`opt-${name}`);
        if (input.validity.badInput) {
          markField(input.id, `err-opt-${name}`, "must be a number");
          document.getElementById("advanced").open = true;
          bad = true;
        } else if (input.value.trim() !== "" && type === "time") {
          // A local date and time from the picker, sent with its zone (as UTC).
          const when = new Date(input.value);
          if (Number.isNaN(when.getTime())) {
            markField(input.id, `err-opt-${name}`, "must be a date and time");
            document.getElementById("advanced").open = true;
            bad = true;
          } else {
            options[name] = when.toISOString();
          }
        } else if (input.value.trim() !== "") {
          options[name] = type === "str" ? input.value : Number(input.value);
        }
      }
      const extra = document.getElementById("opt-extra");
      if (extra.value.trim() !== "") {
        let more = null;
        try { more = JSON.parse(extra.value); } catch (e) { more = null; }
        if (more === null || typeof more !== "object" || Array.isArray(more)) {
          markField(extra.id, "err-opt-extra", 'must be a JSON object, like {"name": "value"}');
          document.getElementById("advanced").open = true;
          bad = true;
        } else {
          for (const [k, v] of Object.entries(more)) if (!(k in params)) params[k] = v;
        }
      }
      return bad ? null : { params, options };
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearErrors();
      const got = collect();
      if (got === null) { focusFirstError(); return; }
      const task = form.dataset.task;
      let body;
      const file = fileInput.files[0];
      if (file) {
        body = new FormData();
        body.append("task", task);
        body.append("params", JSON.stringify(got.params));
        for (const [k, v] of Object.entries(got.options)) body.append(k, String(v));
        body.append("items", file, file.name);
      } else {
        body = { task, params: got.params, ...got.options };
      }
      button.disabled = true;
      status.textContent = "Submitting…";
      const res = await api("POST", "/api/v1/jobs", body);
      if (res.ok) {
        status.textContent = "Started. Opening the job…";
        location.assign(`${root}/jobs/${res.data.id}`);
        return;
      }
      button.disabled = false;
      status.textContent = "";
      const error = res.data.error || { message: `The server answered ${res.status}.`, details: {} };
      if (res.status === 422 && error.details && error.details.fields) {
        showGeneral("The job was not started: fix the marked fields and submit again.");
        showFieldErrors(error.details.fields);
      } else {
        showGeneral(error.message);
      }
      focusFirstError();
    });
  });
})();
