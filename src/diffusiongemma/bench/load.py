"""A bounded load test of a running server: N concurrent streaming clients send a fixed number of chat
requests; each request either completes or is cleanly rejected (HTTP 429 with an OpenAI error object).
With `--faults F`, a fraction F of the requests misbehave (seeded): half hang up after their first chunk,
half send a malformed body and must get a 4xx OpenAI error object; none may ever get a 5xx.

    python -m diffusiongemma.bench.load --url http://127.0.0.1:8000 --clients 16 --requests 48 [--faults 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

BAD = [b'{"messages": "hi"}', b'{"messages": [{"role": "user", "content": 5}]}', b"{not json",
       b'{"messages": [{"role": "user", "content": "x"}], "max_denoising_steps": 1000000000}',
       b'{"messages": [{"role": "user", "content": "\\ud800"}]}', b'{"messages":' + b"[" * 2000 + b"]" * 2000 + b"}",
       b'{"messages": [{"role": "user", "content": "x"}], "tools": 5, "tool_choice": "none"}']
PROMPTS = ["Sort these numbers: 42 7 19 3", "Reverse the list: apple pear fig", "What is 12 + 30?",
           "How many times does cat appear? cat dog cat", "Weather in Oslo?", "Continue the text:\nTo be, or not"]


async def _bad(client: httpx.AsyncClient, url: str, i: int, out: dict) -> None:
    r = await client.post(url + "/v1/chat/completions", content=BAD[i % len(BAD)],
                          headers={"content-type": "application/json"})
    ok = 400 <= r.status_code < 500 and set(r.json().get("error", {})) == {"message", "type", "param", "code"}
    out["bad_rejected" if ok else "errors"] += 1
    out["server_errors"] += r.status_code >= 500


async def _one(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int, out: dict,
               kind: str = "good") -> None:
    if kind == "bad":
        return await _bad(client, url, i, out)
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "stream": True,
            "max_tokens": max_tokens, "seed": i, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code == 429:
                err = json.loads(await r.aread())
                out["rejected"] += 1 if err.get("error", {}).get("code") == "rate_limit_exceeded" else 0
                out["errors"] += 0 if err.get("error", {}).get("code") == "rate_limit_exceeded" else 1
                return
            if r.status_code != 200:
                out["errors"] += 1
                out["server_errors"] += r.status_code >= 500
                out["error_bodies"].append((await r.aread()).decode()[:200])
                return
            if kind == "disconnect":  # hang up after the first chunk: the server must free the request
                async for _ in r.aiter_lines():
                    break
                out["disconnected"] += 1
                return
            first, tokens, done = None, 0, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                j = json.loads(data)
                if "error" in j:
                    out["errors"] += 1
                    return
                if first is None and any(c.get("delta", {}).get("content") for c in j.get("choices", [])):
                    first = time.perf_counter() - t0
                if j.get("usage"):
                    tokens = j["usage"]["completion_tokens"]
            if not done:
                out["errors"] += 1
                return
            out["completed"] += 1
            out["latency"].append(time.perf_counter() - t0)
            out["ttft"].append(first if first is not None else time.perf_counter() - t0)
            out["tokens"] += tokens
    except httpx.HTTPError as e:
        out["errors"] += 1
        out["error_bodies"].append(repr(e)[:200])


async def load_test(url: str, clients: int = 16, requests: int = 48, max_tokens: int = 64, faults: float = 0.0,
                    seed: int = 0) -> dict:
    out = {"completed": 0, "rejected": 0, "errors": 0, "latency": [], "ttft": [], "tokens": 0, "error_bodies": [],
           "good": 0, "disconnected": 0, "bad_rejected": 0, "server_errors": 0}
    rng = random.Random(seed)
    kinds = [("disconnect" if rng.random() < 0.5 else "bad") if rng.random() < faults else "good"
             for _ in range(requests)]
    out["good"] = kinds.count("good")
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)

        async def worker():
            while not queue.empty():
                i = queue.get_nowait()
                await _one(client, url, model, i, max_tokens, out, kinds[i])

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        wall = time.perf_counter() - t0
    lat = sorted(out.pop("latency"))
    ttft = sorted(out.pop("ttft"))
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    out.update({"clients": clients, "requests": requests, "wall_s": wall, "tokens_per_s": out["tokens"] / wall,
                "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95), "ttft_p50_s": pct(ttft, 0.5),
                "latency_mean_s": statistics.mean(lat) if lat else None})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--faults", type=float, default=0.0, help="fraction of requests that hang up or send bad bodies")
    a = ap.parse_args(argv)
    print(json.dumps(asyncio.run(load_test(a.url, a.clients, a.requests, a.max_tokens, a.faults))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
