"""A local stand-in for the Anthropic Messages API and the OpenAI Chat Completions API, on 127.0.0.1.

It speaks the subset the SDKs use (POST /v1/messages, POST /v1/chat/completions) and "answers" the synthetic
needle question by looking the fact up in the prompt, so a run scores what the prompt still contains. Faults are
scripted: `mode` is one of
  ok                  every request answered
  429-once            the first request of every prompt gets 429 with Retry-After, the next one is answered
  500                 every request gets 500
  malformed           every answer is a 200 with a body that is not JSON
  slow                every request waits `delay` seconds before answering (a timeout if longer than the client's)
  fail-first          every request for the first `fail_first` distinct prompts gets 500; the others are answered
It records every request (path, headers, body) for the tests.

    python tests/api_server.py --port 8765 --mode ok     # for a manual run of the CLI against it
"""
from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer(prompt: str) -> str:
    q = re.findall(r"What is the special magic number for (\w+)\?", prompt)
    if q:
        m = re.search(rf"The special magic number for {q[-1]} is (\d+)\.", prompt)
        if m:
            return f" {m.group(1)}."
    return " I do not know."


class FakeAPI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str = "ok", delay: float = 2.0, port: int = 0, fail_first: int = 2):
        super().__init__(("127.0.0.1", port), Handler)
        self.mode, self.delay, self.fail_first = mode, delay, fail_first
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        self.failing: set[str] = set()
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "FakeAPI":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None, ctype="application/json"):
        self._done()   # before the answer goes out: once the client has it, its next request may arrive first
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        srv: FakeAPI = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        prompt = "".join(m["content"] if isinstance(m["content"], str) else
                         "".join(b.get("text", "") for b in m["content"]) for m in body.get("messages", []))
        with srv.lock:
            srv.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
            n = srv.seen.get(prompt, 0)
            srv.seen[prompt] = n + 1
            if srv.mode == "fail-first" and n == 0 and len(srv.failing) < srv.fail_first:
                srv.failing.add(prompt)
            srv.inflight += 1
            srv.max_inflight = max(srv.max_inflight, srv.inflight)
            self._in_flight = True
        try:
            self._answer(srv, body, prompt, n)
        finally:
            self._done()

    def _done(self):
        """This request no longer counts as in flight (once)."""
        srv: FakeAPI = self.server
        with srv.lock:
            if getattr(self, "_in_flight", False):
                srv.inflight -= 1
                self._in_flight = False

    def _answer(self, srv, body, prompt, n):
        err = lambda status, msg, hdr=None: self._send(  # noqa: E731
            status, json.dumps({"type": "error", "error": {"type": "api_error", "message": msg}}).encode(), hdr)
        if srv.mode == "429-once" and n == 0:
            return err(429, "rate limited", {"Retry-After": "0.05"})
        if srv.mode == "500":
            return err(500, "internal error")
        if srv.mode == "fail-first" and prompt in srv.failing:
            return err(500, "internal error")
        if srv.mode == "malformed":
            return self._send(200, b"{not json", ctype="application/json")
        if srv.mode == "slow":
            time.sleep(srv.delay)
        text = answer(prompt)
        n_in, n_out = len(prompt.split()), len(text.split())
        model = body.get("model", "")
        if self.path.endswith("/messages"):
            out = {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": n_in, "output_tokens": n_out}}
        elif self.path.endswith("/chat/completions"):
            out = {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}
        else:
            return err(404, f"no route {self.path}")
        self._send(200, json.dumps(out).encode())


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--mode", default="ok")
    a = p.parse_args()
    srv = FakeAPI(a.mode, port=a.port)
    print(f"fake API on {srv.url} (mode {a.mode})", flush=True)
    srv.serve_forever()
