"""Helpers for fuzz_api.sh: a canary client that must keep succeeding while the API is fuzzed, and a HAR summary.

    python benchmarks/fuzz_canary.py canary URL KEY OUT.json   # runs until SIGTERM, then writes its counts
    python benchmarks/fuzz_canary.py summary HAR CANARY.json   # prints the table; exit 1 on any 5xx or spread
"""
from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter

import httpx

CANARY = {"prompt": "Shall I compare thee to a summer's day?", "max_tokens": 16, "temperature": 0, "ignore_eos": True,
          "stream": True}


def canary(url: str, key: str, out_path: str) -> None:
    """Valid greedy streams, back to back: each must end with [DONE] and the same text as the first."""
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    headers = {"Authorization": f"Bearer {key}"}
    reference, counts, failures = None, Counter(), []
    while not stop:
        try:
            text, done, error = "", False, None
            with httpx.stream("POST", url + "/v1/completions", json=CANARY, headers=headers, timeout=60) as r:
                if r.status_code != 200:
                    error = f"status {r.status_code}"
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            error = event["error"].get("code") or "error event"
                        elif event.get("choices"):
                            text += event["choices"][0].get("text", "")
            reference = text if reference is None and error is None else reference
            if error is None and (not done or text != reference):
                error = "incomplete" if not done else "different text"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        counts["failed" if error else "ok"] += 1
        if error:
            failures.append(error)
        time.sleep(0.05)
    with open(out_path, "w") as f:
        json.dump({"ok": counts["ok"], "failed": counts["failed"], "failures": failures[:20]}, f)


def summary(har_path: str, canary_path: str) -> int:
    with open(har_path) as f:
        entries = json.load(f)["log"]["entries"]
    statuses = Counter(e["response"]["status"] for e in entries)
    by_class = Counter(f"{s // 100}xx" if s else "no response" for s in statuses.elements())
    server_errors = [(e["request"]["method"], e["request"]["url"], e["response"]["status"]) for e in entries
                     if e["response"]["status"] >= 500]
    with open(canary_path) as f:
        spread = json.load(f)
    print(f"generated requests: {len(entries)}")
    print("by status class:   " + ", ".join(f"{k} {v}" for k, v in sorted(by_class.items())))
    print("by status:         " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    print(f"5xx responses:     {len(server_errors)}")
    for method, url, status in server_errors[:10]:
        print(f"  {status} {method} {url}")
    print(f"canary requests:   {spread['ok'] + spread['failed']} (failed: {spread['failed']} {spread['failures']})")
    print(f"failures that spread to other requests: {spread['failed']}")
    return 1 if server_errors or spread["failed"] or len(entries) < 1000 else 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "canary":
        canary(*args)
    else:
        sys.exit(summary(*args))
