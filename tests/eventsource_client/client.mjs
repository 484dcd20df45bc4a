// EventSources of the npm `eventsource` package (the reference implementation for Node), run
// by tests/test_proxies.py and tests/test_fleet.py as real clients, one per URL, like the tabs
// of browsers: `node client.mjs LOCAL_ADDRESS URL [URL...]`.
// It prints one JSON line per thing that happens, `source` being the index of the URL, and
// never closes by itself: the library reconnects with Last-Event-ID on its own and, per
// WHATWG, stops for good on a non-200 (an "error" line with the status as "code" and
// readyState 2, CLOSED). The test trusts its CA through NODE_EXTRA_CA_CERTS.
import { EventSource } from "eventsource";
import { Agent, fetch } from "undici";

const [localAddress, ...urls] = process.argv.slice(2);
// The library's documented `fetch` option, only to connect from LOCAL_ADDRESS: the tests
// check that the proxies forward the address the client connected from.
const dispatcher = new Agent({ localAddress });

function print(line) {
  process.stdout.write(JSON.stringify(line) + "\n");
}

urls.forEach((url, source) => {
  const eventSource = new EventSource(url, {
    fetch: (input, init) => fetch(input, { ...init, dispatcher }),
  });
  eventSource.addEventListener("open", () => print({ source, type: "open" }));
  // The server's events: unnamed ones (data) and `reset` (the replay window lost some).
  for (const name of ["message", "reset"]) {
    eventSource.addEventListener(name, (event) =>
      print({ source, type: name, id: event.lastEventId, data: event.data }),
    );
  }
  // code: the status of a response that was not a 200 (undefined otherwise); message: why
  // a stream was cut or a request got no response (undefined when a stream simply ended).
  eventSource.addEventListener("error", (event) =>
    print({
      source,
      type: "error",
      code: event.code ?? null,
      message: event.message ?? null,
      readyState: eventSource.readyState,
    }),
  );
});
