// The page of `sshq serve`: a live job table from the event stream, a job's
// log followed live, a kill button.  No build step, no dependencies.  Every
// value from the server is put in the page as text (textContent), never as
// HTML.  The token stays in this tab (sessionStorage) and travels only in the
// Authorization header: EventSource cannot send one, so the event stream is
// read with fetch().
"use strict";

const $ = (sel) => document.querySelector(sel);
const jobs = new Map();          // sshq id -> job object
let token = sessionStorage.getItem("sshq-token") || "";
let selected = null;             // sshq id shown in the detail panel
let streams = null;              // AbortController of the open streams
let logStream = null;            // AbortController of the followed log
const FINAL = new Set(["succeeded", "failed", "submit-failed"]);

function api(path, opts = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + token }, opts.headers || {});
  return fetch("/api/v1" + path, Object.assign({}, opts, { headers }));
}

function status(text) { $("#status").textContent = text; }

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleString();
}

function exitText(job) {
  if (job.signal) return "signal " + job.signal;
  if (job.exit_status !== null && job.exit_status !== undefined) return "exit " + job.exit_status;
  return "";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
}

function renderRow(job) {
  let tr = document.querySelector(`tr[data-id="${Number(job.id)}"]`);
  const fresh = !tr;
  if (fresh) {
    tr = document.createElement("tr");
    tr.dataset.id = String(Number(job.id));
    tr.addEventListener("click", () => select(Number(job.id)));
  }
  tr.replaceChildren();
  cell(tr, job.id);
  cell(tr, job.name);
  cell(tr, job.platform);
  cell(tr, job.job_id);
  cell(tr, job.state, "state state-" + String(job.state).replace(/[^a-z-]/g, ""));
  cell(tr, exitText(job), "exit");
  cell(tr, when(job.submit_time));
  cell(tr, when(job.start_time));
  cell(tr, when(job.exit_time));
  tr.classList.toggle("selected", selected === Number(job.id));
  if (fresh) $("#jobs tbody").prepend(tr);  // newest first
  $("#empty").hidden = jobs.size > 0;
}

function update(job) {
  jobs.set(Number(job.id), job);
  renderRow(job);
  if (selected === Number(job.id)) renderDetail(job);
}

function renderDetail(job) {
  $("#detail").hidden = false;
  $("#detail-id").textContent = String(job.id);
  $("#detail-name").textContent = job.name;
  const dl = $("#detail-fields");
  dl.replaceChildren();
  for (const key of ["state", "platform", "job_runner", "job_id", "host", "exit_status",
                     "signal", "submit_time", "start_time", "exit_time", "last_poll",
                     "work_dir", "job_log_dir", "message"]) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = job[key] === null || job[key] === undefined ? "" : String(job[key]);
    dd.dataset.field = key;
    dl.append(dt, dd);
  }
  $("#kill").hidden = FINAL.has(job.state);
}

async function followLog(id) {
  if (logStream) logStream.abort();
  logStream = new AbortController();
  const pre = $("#log");
  pre.textContent = "";
  try {
    const resp = await api(`/jobs/${id}/log/out?follow=true`, { signal: logStream.signal });
    if (!resp.ok) { pre.textContent = `(log: HTTP ${resp.status})`; return; }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pre.textContent += decoder.decode(value, { stream: true });
      pre.scrollTop = pre.scrollHeight;
    }
    pre.textContent += decoder.decode();
    pre.dataset.ended = "true";
  } catch (err) {
    if (err.name !== "AbortError") pre.textContent += `\n(log stream ended: ${err})`;
  }
}

function select(id) {
  selected = id;
  for (const tr of document.querySelectorAll("#jobs tbody tr")) {
    tr.classList.toggle("selected", Number(tr.dataset.id) === id);
  }
  const job = jobs.get(id);
  if (job) renderDetail(job);
  $("#log").dataset.ended = "";
  followLog(id);
}

async function kill() {
  const job = jobs.get(selected);
  if (!job) return;
  if (!confirm(`Kill job ${job.id} (${job.name}, ${job.platform} ${job.job_id})?`)) return;
  status(`killing job ${job.id}...`);
  const resp = await api(`/jobs/${job.id}`, { method: "DELETE" });
  if (resp.ok) { update(await resp.json()); status("connected"); }
  else status(`kill failed: HTTP ${resp.status}`);
}

// Server-sent events over fetch: "id:", "event:", "data:" lines, blank line ends one.
async function readEvents(after, signal) {
  let last = after;
  for (;;) {
    try {
      const resp = await api("/events", { signal, headers: { "Last-Event-ID": String(last) } });
      if (resp.status === 401) { status("token refused"); return; }
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      status("connected");
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "", id = null, data = [];
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl).replace(/\r$/, "");
          buf = buf.slice(nl + 1);
          if (line === "") {
            if (data.length) {
              update(JSON.parse(data.join("\n")));
              if (id !== null) last = id;
            }
            id = null; data = [];
          } else if (line.startsWith("id:")) id = Number(line.slice(3).trim());
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    } catch (err) {
      if (err.name === "AbortError") return;
      status("reconnecting...");
    }
    await new Promise((r) => setTimeout(r, 2000));  // then resume from `last`
  }
}

async function connect() {
  if (streams) streams.abort();
  streams = new AbortController();
  jobs.clear();
  $("#jobs tbody").replaceChildren();
  status("connecting...");
  const resp = await api("/jobs?limit=500");
  if (!resp.ok) { status(resp.status === 401 ? "token refused" : `HTTP ${resp.status}`); return; }
  const after = Number(resp.headers.get("Sshq-Last-Event-Id") || "0");
  for (const job of await resp.json()) update(job);
  $("#empty").hidden = jobs.size > 0;
  readEvents(after, streams.signal);
}

$("#login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("#token").value.trim();
  sessionStorage.setItem("sshq-token", token);
  connect();
});
$("#kill").addEventListener("click", kill);
if (token) { $("#token").value = token; connect(); }
