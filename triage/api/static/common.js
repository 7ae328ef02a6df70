/*
  What the worklist (/) and the admin page (/admin) share: building elements as text, never as
  HTML; the token, kept in this browser under "triage.token" (so one sign-in serves both pages);
  the sign-in form; and api(), a JSON call with the bearer token. Each page loads this script
  before its own, which finds these names in the global scope.
*/
"use strict";

const TOKEN_KEY = "triage.token";

const byId = (id) => document.getElementById(id);

/** An element with attributes and children; strings become text nodes, never markup. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function storageGet(key) {
  try { return window.localStorage.getItem(key); } catch (_) { return null; }
}
function storageSet(key, value) {
  try {
    if (value === null) window.localStorage.removeItem(key);
    else window.localStorage.setItem(key, value);
  } catch (_) { /* private mode: the token lives as long as the page */ }
}
let memoryToken = null;
const getToken = () => storageGet(TOKEN_KEY) || memoryToken;
function setToken(token) { memoryToken = token; storageSet(TOKEN_KEY, token); }

/** The sign-in form (#signin-form, its #token field and #signin-error): a token typed there is
    kept and ``signedIn`` runs; an empty one is refused. */
function onSignIn(signedIn) {
  byId("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = byId("token").value.trim();
    if (!token) {
      byId("signin-error").textContent = "Enter a token.";
      byId("token").focus();
      return;
    }
    setToken(token);
    signedIn();
  });
}

// ---- the API ---------------------------------------------------------------------------

class AuthError extends Error {}
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** A JSON call with the bearer token; ``options.json`` is sent as the JSON body. */
async function api(path, options) {
  const token = getToken();
  if (!token) throw new AuthError("no token");
  const { json, ...rest } = options || {};
  const headers = { Authorization: `Bearer ${token}`, Accept: "application/json" };
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    ...rest,
    headers,
    body: json !== undefined ? JSON.stringify(json) : rest.body,
    cache: "no-store",
  });
  if (response.status === 401) throw new AuthError("token not accepted");
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : response.statusText;
    throw new ApiError(response.status, detail || `HTTP ${response.status}`);
  }
  return body;
}
