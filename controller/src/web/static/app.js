// modi's web view: live updates without redrawing the page. A run page
// recolours one host cell per event and re-fetches its panel (state, gate,
// controls) when the run, a change or a gate changes; a host page appends
// its running step's output.
"use strict";

const ICONS = {
  success: "✔", backout_ok: "✔", skipped: "↷", failed: "✖", total_failure: "✖",
  partial_failure: "✖", backout_failed: "✖", lost: "✖", running: "▶",
  backing_out: "▶", awaiting_approval: "‖", paused: "‖", cancelled: "⊘",
  bailed_out: "⊘", queued: "⧗", retry_pending: "⧗", backout_pending: "⧗",
};

function label(state) {
  return (ICONS[state] || "·") + " " + state.replace(/_/g, " ");
}

function badge(state) {
  const span = document.createElement("span");
  span.className = "badge s-" + state;
  span.textContent = label(state);
  return span;
}

let refreshing = false;
let again = false;

async function refreshPanel(run) {
  if (refreshing) { again = true; return; }
  refreshing = true;
  try {
    const resp = await fetch("/runs/" + encodeURIComponent(run) + "/panel", { credentials: "same-origin" });
    if (resp.ok) {
      const holder = document.createElement("div");
      holder.innerHTML = await resp.text();
      const fresh = holder.querySelector("#panel");
      const old = document.getElementById("panel");
      if (fresh && old) { old.replaceWith(fresh); }
    }
  } finally {
    refreshing = false;
    if (again) { again = false; refreshPanel(run); }
  }
}

function followRun(run) {
  const events = new EventSource("/runs/" + encodeURIComponent(run) + "/events");
  events.onmessage = (message) => {
    const e = JSON.parse(message.data);
    if (e.k === "host") {
      const cell = document.getElementById("h-" + e.c + "-" + e.h);
      if (cell) {
        cell.className = "host s-" + e.s;
        cell.dataset.state = e.s;
        cell.title = cell.querySelector(".name").textContent + ": " + e.s;
        cell.querySelector(".st").textContent = label(e.s);
      }
    } else if (e.k === "change") {
      const holder = document.getElementById("cs-" + e.c);
      if (holder) { holder.replaceChildren(badge(e.s)); }
      refreshPanel(run);
    } else if (e.end) {
      // The run ended: one reload brings the failure reasons and the
      // final grid (once per run, never per event).
      events.close();
      location.reload();
    } else {
      refreshPanel(run);
    }
  };
}

function followHost(run, host) {
  const live = document.getElementById("live");
  if (!live) { return; }
  const url = "/runs/" + encodeURIComponent(run) + "/hosts/" + encodeURIComponent(host) + "/output";
  const events = new EventSource(url);
  events.onmessage = (message) => {
    const e = JSON.parse(message.data);
    let text = "";
    if (e.step) { text += "== " + e.step + "\n"; }
    text += e.stdout || "";
    if (e.stderr) { text += e.stderr.split("\n").filter((l) => l).map((l) => "stderr: " + l + "\n").join(""); }
    if (e.finished) { text += "-> " + e.outcome + "\n"; }
    live.append(document.createTextNode(text));
  };
}

// Plan: a chosen file fills the changeset box (read in the browser; the
// server sees only the text, as when pasted).
function uploadInto(input, textarea) {
  input.addEventListener("change", () => {
    const file = input.files && input.files[0];
    if (!file) { return; }
    file.text().then((text) => { textarea.value = text; });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const upload = document.getElementById("upload");
  const box = document.getElementById("changeset");
  if (upload && box) { uploadInto(upload, box); }
  const body = document.body.dataset;
  if (!body.run || body.live !== "1") { return; }
  if (body.host) { followHost(body.run, body.host); } else { followRun(body.run); }
});
