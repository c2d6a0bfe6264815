"""Server counters and latency histograms, rendered in Prometheus' text exposition format."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float):
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def render(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{edge:g}"}} {count}' for edge, count in zip(self.buckets, self.counts)]
        return lines + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}",
                        f"{name}_count {self.n}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = defaultdict(int)  # (endpoint, status code) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.rejected_queue_full = 0
        self.cancelled = 0
        self.ttft = Histogram()  # seconds from request to first text
        self.itl = Histogram()  # seconds between text pieces of one stream
        self.latency = Histogram()  # seconds from request to last byte
        # speculative decoding (serve --speculate), summed over requests that ran it
        self.spec = {"requests": 0, "drafted": 0, "accepted": 0, "verify_steps": 0, "tokens": 0, "turned_off": 0}

    def count_request(self, endpoint: str, status: int):
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def count_tokens(self, prompt: int, completion: int):
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def count_speculative(self, stats):
        """Add one request's llmlab.engine.speculative.SpeculativeStats."""
        with self.lock:
            self.spec["requests"] += 1
            for name in ("drafted", "accepted", "verify_steps", "tokens", "turned_off"):
                self.spec[name] += getattr(stats, name)

    def observe(self, histogram: str, value: float):
        with self.lock:
            getattr(self, histogram).observe(value)

    def render(self, queue_depth: int, busy_rows: int, max_batch: int) -> str:
        out = ["# HELP llmlab_requests_total Requests answered, by endpoint and HTTP status.",
               "# TYPE llmlab_requests_total counter"]
        with self.lock:
            for (endpoint, status), count in sorted(self.requests.items()):
                out.append(f'llmlab_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
            scalars = [
                ("llmlab_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens),
                ("llmlab_completion_tokens_total", "counter", "Tokens generated.", self.completion_tokens),
                ("llmlab_rejected_queue_full_total", "counter", "Requests refused with 429.",
                 self.rejected_queue_full),
                ("llmlab_cancelled_total", "counter", "Generations stopped because the client went away.",
                 self.cancelled),
                ("llmlab_queue_depth", "gauge", "Requests waiting for a batch row.", queue_depth),
                ("llmlab_busy_rows", "gauge", "Batch rows generating now.", busy_rows),
                ("llmlab_max_batch", "gauge", "Batch rows in all.", max_batch),
            ]
            spec = self.spec
            scalars += [
                ("llmlab_speculative_requests_total", "counter", "Requests decoded speculatively.", spec["requests"]),
                ("llmlab_speculative_drafted_tokens_total", "counter", "Draft tokens proposed.", spec["drafted"]),
                ("llmlab_speculative_accepted_tokens_total", "counter", "Draft tokens kept.", spec["accepted"]),
                ("llmlab_speculative_verify_steps_total", "counter", "Target forwards of speculative requests.",
                 spec["verify_steps"]),
                ("llmlab_speculative_turned_off_total", "counter",
                 "Speculative requests that fell back to plain decoding (drafting did not pay).", spec["turned_off"]),
                ("llmlab_speculative_acceptance_rate", "gauge", "Draft tokens kept per draft token proposed.",
                 round(spec["accepted"] / spec["drafted"], 6) if spec["drafted"] else 0),
                ("llmlab_speculative_tokens_per_step", "gauge", "Tokens decided per target forward.",
                 round(spec["tokens"] / spec["verify_steps"], 6) if spec["verify_steps"] else 0),
            ]
            for name, kind, help_, value in scalars:
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
            for name, hist, help_ in [("llmlab_time_to_first_token_seconds", self.ttft, "Time to first token."),
                                      ("llmlab_inter_token_latency_seconds", self.itl, "Time between streamed pieces."),
                                      ("llmlab_request_latency_seconds", self.latency, "Whole request time.")]:
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] + hist.render(name)
        return "\n".join(out) + "\n"
