"""``GET /demo`` (``SSE_APP_ENV=dev`` only): one self-contained page to watch a stream live.

No CDN and no build step: the page is this module's text. Its inline script and style are
allowed by hash in a strict Content-Security-Policy, so the page can load nothing else.
"""

from __future__ import annotations

import base64
import hashlib

from twisted.web.resource import Resource
from twisted.web.server import Request

__all__ = ["DemoPage"]

_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 2rem auto; max-width: 52rem; }
label { display: block; margin: .4rem 0; }
input { font: 14px monospace; width: 24rem; }
#state { font-weight: bold; }
#state.open { color: #17803d; } #state.reconnecting { color: #b26b00; }
#state.closed { color: #b3261e; }
ol { font: 13px monospace; padding-left: 0; list-style: none; }
li { border-bottom: 1px solid #ddd; padding: .3rem 0; white-space: pre-wrap; }
li .id { color: #555; margin-right: 1rem; }
"""

_SCRIPT = """
"use strict";
const form = document.getElementById("subscribe");
const state = document.getElementById("state");
const events = document.getElementById("events");
const stop = document.getElementById("disconnect");
let source = null;

function subscribeUrl(topic, userid, token) {
  return "/subscribe/" + encodeURIComponent(topic) + "/" + encodeURIComponent(userid) +
    "/" + encodeURIComponent(token);
}

function show(name) {
  state.textContent = name;
  state.className = name;
}

function record(kind, event) {
  const item = document.createElement("li");
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = kind + " #" + (event.lastEventId || "-");
  item.append(id, event.data);
  events.prepend(item);
}

function connect() {
  if (source) source.close();
  const value = (name) => form.elements[name].value.trim().toLowerCase();
  source = new EventSource(subscribeUrl(value("topic"), value("userid"), value("token")));
  show("connecting");
  source.onopen = () => show("open");
  // EventSource retries by itself (CONNECTING); it gives up for good (CLOSED) on an
  // answer that is not a 200 event stream, such as 403 for an unknown token.
  source.onerror = () =>
    show(source.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
  source.onmessage = (event) => record("message", event);
  source.addEventListener("reset", (event) => record("reset", event));
  stop.disabled = false;
}

form.addEventListener("submit", (submitted) => {
  submitted.preventDefault();
  connect();
});

// ?topic=&userid=&token= replace the fields' values (the demo user of `make run`).
const given = new URLSearchParams(location.search);
const fields = ["topic", "userid", "token"];
for (const name of fields) {
  if (given.get(name)) form.elements[name].value = given.get(name);
}
if (fields.every((name) => form.elements[name].value.trim())) connect();

stop.addEventListener("click", () => {
  if (source) source.close();
  show("closed");
  stop.disabled = true;
});
"""

_BODY = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sse-twisted demo</title>
<style>{style}</style>
</head>
<body>
<h1>sse-twisted demo</h1>
<p>The page opens a stream as a browser would, for the demo user that <code>make run</code>
creates; publish a message for it with <code>make publish</code> (another user:
<code>make publish USERID=&hellip;</code>, or the RabbitMQ management UI).</p>
<form id="subscribe" autocomplete="off">
  <label>topic <input name="topic" required placeholder="v4 UUID" value="{topic}"></label>
  <label>userid <input name="userid" required placeholder="v4 UUID" value="{userid}"></label>
  <label>token <input name="token" required placeholder="v4 UUID" value="{token}"></label>
  <button type="submit">Connect</button>
  <button type="button" id="disconnect" disabled>Disconnect</button>
</form>
<p>State: <span id="state">not connected</span></p>
<ol id="events"></ol>
<script>{script}</script>
</body>
</html>
"""


def _source_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


# The demo subscriber `make run` creates (the Makefile's DEMO_TOPIC, DEMO_USERID and
# DEMO_TOKEN): the page starts with it and connects at once.
DEMO_TOPIC = "7a1f4c2e-9d3b-4f6a-8e2c-5b0d1a7c3e94"
DEMO_USERID = "0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10"
DEMO_TOKEN = "3c9d2f7e-1b4a-4e8d-a6c5-7f0e2b9d4c31"

_PAGE = _BODY.format(
    style=_STYLE, script=_SCRIPT, topic=DEMO_TOPIC, userid=DEMO_USERID, token=DEMO_TOKEN
).encode("utf-8")
_POLICY = (
    f"default-src 'none'; script-src {_source_hash(_SCRIPT)}; style-src {_source_hash(_STYLE)}; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
).encode("ascii")


class DemoPage(Resource):
    """The demo page: topic, userid and token fields, Connect, and the events as they come.

    The fields start with the demo user of ``make run`` (or ``?topic=&userid=&token=``) and
    the page connects on load.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        """The page, with a CSP that allows only its own inline script and style."""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", _POLICY)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return _PAGE
