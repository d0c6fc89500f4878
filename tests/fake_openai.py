"""A scripted OpenAI-compatible HTTP server on 127.0.0.1 (real sockets, run in a thread) for judge tests.

Each request pops the next mode from ``script`` (then ``default`` forever):
  "ok"           200 with top_logprobs from ``dist`` (token -> probability)
  "nologprobs"   200 with ``logprobs: null`` and the text ``text``
  "429" / "500"  that status (429 carries Retry-After: 0)
  "slow"         sleeps ``slow_s`` seconds, then answers like "ok" (trips a client timeout)
  "400logprobs"  400 "logprobs is not supported" when the body asks for logprobs, else like "nologprobs"
  "401"          401 invalid key
  "nochoices"    200 with a JSON body that has no ``choices`` (a broken proxy)
  "nonumber"     200 with top_logprobs that hold no number token
  "nanlogprob"   200 whose top_logprobs carry a NaN logprob
  "nonumbertext" 200 without logprobs whose text holds no number
  "echo401" / "echo400" / "echo500"  that status with a body echoing the request's headers
                 (Authorization included) and, after them, an ``sk-...`` string and a Bearer token
``rules``: {substring: mode}: a request whose prompt contains the substring gets that mode instead
(one broken answer among good ones).
Every request's headers and JSON body are recorded in ``requests``.
"""
from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, dist=None, text="85", script=(), default="ok", slow_s=1.0, rules=None):
        self.dist = dict(dist or {"80": 0.5, "90": 0.3, "Hello": 0.2})
        self.text = text
        self.script = list(script)
        self.default = default
        self.slow_s = slow_s
        self.rules = dict(rules or {})
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n) or b"{}")
                with fake._lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    mode = fake.script.pop(0) if fake.script else fake.default
                    prompt = json.dumps(body.get("messages", ""))
                    mode = next((m for sub, m in fake.rules.items() if sub in prompt), mode)
                fake._respond(self, mode, body, dict(self.headers))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _send(self, h, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()  # NaN goes out as the literal NaN (Python's json reads it)
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def _completion(self, body: dict, with_logprobs: bool, dist: dict | None = None, text: str | None = None) -> dict:
        dist = self.dist if dist is None else dist
        top = [{"token": t, "logprob": math.log(p) if p == p else p, "bytes": None} for t, p in dist.items()]
        best = max(dist, key=lambda t: dist[t] if dist[t] == dist[t] else -1.0)
        lp = {"content": [{"token": best, "logprob": top[0]["logprob"], "top_logprobs": top}]}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model"),
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant",
                                         "content": best if with_logprobs else (self.text if text is None else text)},
                             "logprobs": lp if with_logprobs else None}]}

    def _respond(self, h, mode: str, body: dict, headers: dict | None = None) -> None:
        if mode == "nochoices":
            self._send(h, 200, {"id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model")})
        elif mode == "nonumber":
            self._send(h, 200, self._completion(body, True, {"The": 0.6, "I": 0.3, "Hello": 0.1}))
        elif mode == "nanlogprob":
            self._send(h, 200, self._completion(body, True, {"80": float("nan"), "90": 0.3}))
        elif mode == "nonumbertext":
            self._send(h, 200, self._completion(body, False, text="I would rather not say."))
        elif mode.startswith("echo"):  # a server (or proxy) that puts the request headers into its error
            self._send(h, int(mode[4:]), {"echo": headers, "error": {"message": "bad request; "
                       "seen tokens sk-live-ABCDEFGHIJKLMNOP0123 and Bearer opaque.token-XYZ_123"}})
        elif mode == "ok":
            self._send(h, 200, self._completion(body, body.get("logprobs", False)))
        elif mode == "nologprobs":
            self._send(h, 200, self._completion(body, False))
        elif mode == "429":
            self._send(h, 429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
        elif mode == "500":
            self._send(h, 500, {"error": {"message": "boom"}})
        elif mode == "slow":
            time.sleep(self.slow_s)
            self._send(h, 200, self._completion(body, True))
        elif mode == "400logprobs":
            if body.get("logprobs"):
                self._send(h, 400, {"error": {"message": "logprobs is not supported for this model"}})
            else:
                self._send(h, 200, self._completion(body, False))
        elif mode == "401":
            self._send(h, 401, {"error": {"message": "invalid api key"}})
        else:
            raise ValueError(mode)
