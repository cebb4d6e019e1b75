// The dashboard page: log in with a token (kept in sessionStorage, this tab only), then the
// ops view (ops/admin tokens) or the owner view (owner tokens). Every read and action goes
// through the JSON API with "Authorization: Bearer"; nothing is loaded from elsewhere.

import * as charts from "./charts.js";

const TOKEN_KEY = "decision-router-token";
const $ = (id) => document.getElementById(id);

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function detailText(body, status) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  return `HTTP ${status}`;
}

async function api(path, { method = "GET", body, key } = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (key !== undefined) headers["Idempotency-Key"] = key;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new HttpError(response.status, detailText(data, response.status));
  return data;
}

function say(text) {
  $("message").textContent = text || "";
  $("message").hidden = !text;
}

function show(view) {
  for (const id of ["login", "ops", "owner"]) $(id).hidden = id !== view;
  $("logout").hidden = view === "login";
  $("who").hidden = view === "login";
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  show("login");
  say(message);
  $("token").value = "";
  $("token").focus();
}

// A failed call: a token that stopped working sends the user back to the login form.
function failed(error) {
  if (error instanceof HttpError && error.status === 401) return logout("The token was not accepted; log in again.");
  say(error.message);
}

// --- ops view ------------------------------------------------------------------------

function fillSelect(select, values, chosen, allLabel) {
  const options = [new Option(allLabel, "")].concat(values.map((v) => new Option(v, v)));
  select.replaceChildren(...options);
  select.value = chosen || "";
}

function opsQuery() {
  const params = new URLSearchParams();
  const days = $("f-days").value;
  if (days === "custom") {
    if ($("f-since").value) params.set("since", $("f-since").value);
    if ($("f-until").value) params.set("until", $("f-until").value);
  } else if (days) {
    params.set("days", days);
  }
  if ($("f-model").value) params.set("model", $("f-model").value);
  if ($("f-rule").value) params.set("rule", $("f-rule").value);
  return params.toString();
}

function slaTable(rows) {
  const body = $("sla").tBodies[0];
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = 5;
    td.className = "muted";
    td.textContent = "No open alerts.";
    tr.appendChild(td);
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    tr.dataset.owner = row.owner;
    for (const key of ["owner", "open", "overdue", "escalated", "breached"]) {
      const td = document.createElement("td");
      td.textContent = row[key];
      td.dataset.col = key;
      if (key !== "owner" && key !== "open" && row[key] > 0) td.className = "hot";
      tr.appendChild(td);
    }
    return tr;
  }));
}

async function loadOps() {
  document.body.dataset.loaded = "busy";
  const query = opsQuery();
  const data = await api(`/v1/dashboard/ops${query ? `?${query}` : ""}`);
  say("");
  fillSelect($("f-model"), data.filters.models, data.filters.model, "all models");
  fillSelect($("f-rule"), data.filters.rules, data.filters.rule, "all rules");
  const { since, until } = data.window;
  $("window").textContent = `Alerts created ${since ? `since ${since.slice(0, 16).replace("T", " ")} UTC` : "at any time"}`
    + `${until ? ` until ${until.slice(0, 16).replace("T", " ")} UTC` : ""}.`;
  charts.funnel($("funnel"), data.funnel);
  charts.uplift($("uplift"), data.uplift, data.min_n);
  charts.histogram($("time-to-act"), data.time_to_act);
  slaTable(data.sla);
  charts.rejections($("rejections"), data.rejections);
  document.body.dataset.loaded = "ops";
}

// --- owner view ----------------------------------------------------------------------

function when(iso) {
  return iso ? `${iso.slice(0, 16).replace("T", " ")} UTC` : "—";
}

function node(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  Object.assign(element, props);
  element.append(...children);
  return element;
}

function button(text, action, alertId, disabled, extra = {}) {
  const b = node("button", { type: "button", textContent: text, disabled }, );
  b.dataset.action = action;
  b.dataset.alert = alertId;
  Object.assign(b.dataset, extra);
  return b;
}

// `me`: the caller's owner id. An alert escalated to the caller is someone else's: the card says whose.
function alertCard(alert, me) {
  const li = node("li", { className: `alert priority-${alert.priority}` });
  li.dataset.alert = alert.alert_id;
  li.append(node("h3", { textContent: `${alert.entity_type} ${alert.entity_id}` }));
  if (alert.escalated_to_me) {
    li.classList.add("escalated-to-me");
    li.dataset.owner = alert.owner;
    li.append(node("p", {
      className: "escalated-note",
      textContent: `escalated to you from ${alert.escalated_from}, level ${alert.escalated_to_me_level}`
        + (alert.owner !== alert.escalated_from && alert.escalated_to_me_level === 1 ? ` (now ${alert.owner}'s)` : ""),
    }));
  }
  li.append(node("div", {
    className: "meta",
    textContent: `${alert.rule} · ${alert.priority} · ${alert.model} score ${alert.score.toFixed(2)} · created ${when(alert.created_at)}`,
  }));
  const dl = node("dl");
  // The deadline pending now (a reassigned alert's fresh one); the first one once none is (breached).
  const ackState = alert.acknowledged_at
    ? `acknowledged ${when(alert.acknowledged_at)}` : `by ${when(alert.ack_due_at || alert.ack_by)}`;
  const actState = alert.intervened_at
    ? `${alert.intervention || "intervened"} ${when(alert.intervened_at)}` : `by ${when(alert.act_due_at || alert.act_by)}`;
  dl.append(node("dt", { textContent: "acknowledge" }),
    node("dd", { textContent: ackState + (alert.ack_overdue ? " — overdue" : ""), className: alert.ack_overdue ? "overdue" : "" }));
  dl.append(node("dt", { textContent: "act" }),
    node("dd", { textContent: actState + (alert.act_overdue ? " — overdue" : ""), className: alert.act_overdue ? "overdue" : "" }));
  if (alert.escalation_level) {
    // escalated_to is cleared by a reassignment: then say nothing of where it is now.
    const holder = alert.escalated_to === me ? "you" : alert.escalated_to;
    dl.append(node("dt", { textContent: "escalated" }),
      node("dd", { textContent: `${alert.escalation_level}×${holder ? ` (now with ${holder})` : ""}`,
        className: "overdue" }));
  }
  for (const [key, value] of Object.entries(alert.context || {})) {
    dl.append(node("dt", { textContent: key.replace(/^(context|features|lookup)\./, "") }),
      node("dd", { textContent: Array.isArray(value) ? value.join(", ") : String(value) }));
  }
  if (alert.missing_context && alert.missing_context.length) {
    dl.append(node("dt", { textContent: "missing" }), node("dd", { textContent: alert.missing_context.join(", ") }));
  }
  li.append(dl);
  const note = node("input", { type: "text", placeholder: "What did you do? (e.g. exec call, discount)", maxLength: 200 });
  note.dataset.note = alert.alert_id;
  note.disabled = Boolean(alert.intervened_at);
  li.append(node("div", { className: "actions" },
    button("Acknowledge", "ack", alert.alert_id, Boolean(alert.acknowledged_at)),
    note,
    button("Record intervention", "intervene", alert.alert_id, Boolean(alert.intervened_at)),
    button("Outcome: success", "outcome", alert.alert_id, false, { result: "success" }),
    button("Outcome: failure", "outcome", alert.alert_id, false, { result: "failure" }),
  ));
  return li;
}

async function loadOwner() {
  document.body.dataset.loaded = "busy";
  const data = await api("/v1/dashboard/owner");
  const list = $("alerts");
  list.replaceChildren(...data.alerts.map((alert) => alertCard(alert, data.owner)));
  const n = data.alerts.length;
  const escalated = data.alerts.filter((alert) => alert.escalated_to_me).length;
  const ofWhich = escalated ? ` (${escalated} escalated to you)` : "";
  $("owner-status").textContent = n
    ? `${n} open alert${n === 1 ? "" : "s"}${ofWhich}, nearest deadline first.` : "No open alerts.";
  document.body.dataset.loaded = "owner";
}

// getRandomValues, not randomUUID: the page may be served over plain HTTP on a LAN address.
function requestKey() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function act(target) {
  const { action, alert: alertId, result } = target.dataset;
  const path = `/v1/alerts/${encodeURIComponent(alertId)}/${action}`;
  let body;
  if (action === "intervene") {
    const text = document.querySelector(`input[data-note="${CSS.escape(alertId)}"]`).value.trim();
    body = text ? { action: text } : {};
  } else if (action === "outcome") {
    body = { result };
  }
  // One key per click until it succeeds: if an answer is lost and the owner clicks again, the
  // server applies the action once.
  target.dataset.key ||= requestKey();
  target.disabled = true;
  document.body.dataset.loaded = "busy";
  try {
    await api(path, { method: "POST", body, key: target.dataset.key });
    say("");
    await loadOwner();
    $("owner-status").textContent += ` Recorded: ${action}${result ? ` (${result})` : ""} on ${alertId}.`;
  } catch (error) {
    target.disabled = false;
    document.body.dataset.loaded = "owner";
    failed(error);
  }
}

// --- start -----------------------------------------------------------------------------

async function start() {
  if (!token()) return logout("");
  let me;
  try {
    me = await api("/v1/whoami");
  } catch (error) {
    return error instanceof HttpError && error.status === 401 ? logout("The token was not accepted.") : failed(error);
  }
  $("who").textContent = me.owner ? `${me.role}: ${me.owner}` : me.role;
  say("");
  if (me.role === "ops" || me.role === "admin") {
    show("ops");
    return loadOps().catch(failed);
  }
  if (me.role === "owner") {
    show("owner");
    return loadOwner().catch(failed);
  }
  logout(`A ${me.role} token cannot use the dashboard; use an ops, admin or owner token.`);
}

function wire() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    start();
  });
  $("logout").addEventListener("click", () => logout(""));
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    loadOps().catch(failed);
  });
  $("f-days").addEventListener("change", () => {
    const custom = $("f-days").value === "custom";
    for (const label of document.querySelectorAll(".filters .custom")) label.hidden = !custom;
  });
  $("alerts").addEventListener("click", (event) => {
    const target = event.target.closest("button[data-action]");
    if (target && !target.disabled) act(target);
  });
}

wire();
start();
