"""``GET /demo``: served with ``SSE_APP_ENV=dev`` only; its script opens the subscribe URL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import cast

import pytest
import pytest_twisted

from sse_twisted._demo import _PAGE, _SCRIPT
from tests.backends import Pki
from tests.browser import Browser
from tests.in_process_server import start_server


@pytest.mark.parametrize(("app_env", "status"), [("dev", 200), ("prod", 404)])
@pytest_twisted.ensureDeferred
async def test_the_demo_page_is_served_in_dev_only(
    tls_environ: dict[str, str], pki: Pki, app_env: str, status: int
) -> None:
    server = await start_server({**tls_environ, "SSE_APP_ENV": app_env})
    browser = Browser(pki.ca_certificate)
    try:
        response = await browser.get(server.base_url + "/demo")
        body = await browser.read_body(response)
    finally:
        await server.stop()
    assert response.code == status
    if status == 200:
        assert body == _PAGE
        assert response.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
        [policy] = response.headers.getRawHeaders(b"content-security-policy")
        assert b"default-src 'none'" in policy
        assert b"connect-src 'self'" in policy


def test_the_page_is_self_contained() -> None:
    page = _PAGE.decode()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "loads something"
    for name in ("topic", "userid", "token"):
        assert re.search(rf'<input name="{name}"[^>]*>', page)
    assert "Connect</button>" in page


def test_the_fields_start_with_the_demo_user_that_make_run_creates() -> None:
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    page = _PAGE.decode()
    for name in ("topic", "userid", "token"):
        [made] = re.findall(rf"^DEMO_{name.upper()} \?= (\S+)$", makefile, re.MULTILINE)
        assert re.search(rf'<input name="{name}"[^>]*value="{made}"', page)
    assert '<span id="state">not connected</span>' in page, "nothing tried yet"


def test_the_script_opens_the_subscribe_url_of_the_three_fields() -> None:
    assert (
        '"/subscribe/" + encodeURIComponent(topic) + "/" + encodeURIComponent(userid) +\n'
        '    "/" + encodeURIComponent(token)'
    ) in _SCRIPT
    assert 'new EventSource(subscribeUrl(value("topic"), value("userid"), value("token")))' in (
        _SCRIPT
    )


# A DOM and EventSource just large enough for the page's script, to run it under Node.
# argv: the page's query string and the fields' initial values, as JSON.
_NODE_HARNESS = """
const vm = require("vm");
const script = require("fs").readFileSync(0, "utf8");
const setup = JSON.parse(process.argv[1]);
function element(id) {
  const e = { id, textContent: "", className: "", disabled: true, listeners: {},
    children: [], elements: {},
    addEventListener(type, f) { this.listeners[type] = f; },
    prepend(child) { this.children.unshift(child); },
    append(...parts) { this.children.push(...parts); } };
  return e;
}
const nodes = { subscribe: element("subscribe"), state: element("state"),
  events: element("events"), disconnect: element("disconnect") };
nodes.state.textContent = "not connected";
for (const [name, value] of Object.entries(setup.fields)) {
  nodes.subscribe.elements[name] = { value };
}
const opened = [];
class EventSource {
  constructor(url) { this.url = url; this.readyState = 0; this.listeners = {};
    opened.push(this); }
  addEventListener(type, f) { this.listeners[type] = f; }
  close() { this.readyState = 2; }
}
EventSource.CONNECTING = 0; EventSource.OPEN = 1; EventSource.CLOSED = 2;
const document = { getElementById: (id) => nodes[id],
  createElement: () => element("li") };
vm.runInNewContext(script,
  { document, EventSource, URLSearchParams, location: { search: setup.search } });
const seen = [nodes.state.textContent];
if (opened.length === 0) {
  nodes.subscribe.elements.topic.value = "T2";
  nodes.subscribe.elements.userid.value = "U2";
  nodes.subscribe.elements.token.value = "K2";
  nodes.subscribe.listeners.submit({ preventDefault() {} });
  seen.push(nodes.state.textContent);
}
const source = opened[0];
source.readyState = 1; source.onopen(); seen.push(nodes.state.textContent);
source.onmessage({ lastEventId: "42", data: "{}" });
source.readyState = 0; source.onerror(); seen.push(nodes.state.textContent);
source.readyState = 2; source.onerror(); seen.push(nodes.state.textContent);
console.log(JSON.stringify({ urls: opened.map((s) => s.url), states: seen,
  first: nodes.events.children[0].children[0].textContent }));
"""


def _run_page_script(search: str, fields: dict[str, str]) -> dict[str, object]:
    setup = json.dumps({"search": search, "fields": fields})
    result = subprocess.run(
        ["node", "-e", _NODE_HARNESS, setup],
        input=_SCRIPT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return cast(dict[str, object], json.loads(result.stdout))


needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")


@needs_node
def test_under_node_the_page_connects_on_load_and_shows_each_connection_state() -> None:
    outcome = _run_page_script("", {"topic": " T ", "userid": "U", "token": "K/1"})
    assert outcome["urls"] == ["/subscribe/t/u/k%2F1"]
    assert outcome["states"] == ["connecting", "open", "reconnecting", "closed"]
    assert outcome["first"] == "message #42"


@needs_node
def test_under_node_the_query_string_replaces_the_fields_before_connecting() -> None:
    search = "?topic=T9&userid=U9&token=K9"
    outcome = _run_page_script(search, {"topic": "T", "userid": "U", "token": "K"})
    assert outcome["urls"] == ["/subscribe/t9/u9/k9"]


@needs_node
def test_under_node_empty_fields_wait_for_connect_without_showing_closed() -> None:
    outcome = _run_page_script("", {"topic": "", "userid": "", "token": ""})
    assert outcome["urls"] == ["/subscribe/t2/u2/k2"]
    assert outcome["states"] == ["not connected", "connecting", "open", "reconnecting", "closed"]
