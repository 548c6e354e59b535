"""The web demo under load: concurrent gradio_client clients against `python -m t2i.demo` on loopback.

    python experiments/bench_demo.py --ckpt logs/quickstart/gpt/checkpoints/last.ckpt
    python experiments/bench_demo.py --ckpt GPT.ckpt --clients 8 --requests 5 --samples 4 --rounds 2 --no-unbatched
    python experiments/bench_demo.py --ckpt GPT.ckpt --memory     # one request at the page's limits: its peak memory

Starts the demo on a free port of 127.0.0.1 (device=cpu), warms it with one request, then per round
`--clients` clients (threads, each its own gradio_client.Client) send `--requests` requests each, one
after another, all with the same settings (so the demo may batch them) and their own prompt and seed.
Every answer is checked: the number of images, and each image a PNG on disk; an exception or a
missing answer counts as lost. The server's memory (RSS of its process tree, from /proc) is sampled
every 0.1 s: idle before the first round, peak during each round, after each round. Reported per
round: throughput (requests/s, images/s), latency percentiles (p50, p90, p99, max; from sending to
the answer, queueing included), the requests per model batch (from the demo's notes) and memory.
With the unbatched comparison (default) the same load runs again against a second server with
queue.max_batch=1. A load that loses requests exits with status 1.

`--memory`: the peak memory of the largest request the page takes (conf/demo.yaml's limits.max_samples
images, limits.max_rerank candidates each, guidance 3), sampled in process by the demo's Engine, in a
fresh subprocess per `--batch-sizes` value (sampling.batch_size; "all" = every sequence in one batch, as
before sampling batches bounded sequences): the process's peak RSS above its RSS once the model is loaded
(Linux: /proc/self/clear_refs resets the peak), beside the KV cache the formula in docs/demo.md gives.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, MB."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
        todo += children.get(p, [])
    return total / 1024


class Server:
    def __init__(self, ckpt: str, overrides: list[str], run_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = open(run_dir / "server.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "t2i.demo", f"ckpt={ckpt}", f"port={self.port}", "device=cpu",
             f"hydra.run.dir={run_dir}", *overrides], cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=5)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("the demo did not start:\n" + (run_dir / "server.log").read_text()[-3000:])
                time.sleep(0.5)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class MemorySampler:
    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def load_round(url: str, prompts: list[str], args, round_index: int) -> dict:
    from gradio_client import Client

    latencies, lost, wrong, batches = [], [], [], []
    lock = threading.Lock()

    def client(c: int):
        api = Client(url, verbose=False)
        for r in range(args.requests):
            prompt = prompts[(c * args.requests + r) % len(prompts)]
            seed = round_index * 10_000 + c * 100 + r
            start = time.perf_counter()
            try:
                gallery, note, files = api.predict(prompt, args.samples, args.guidance, args.temperature, args.top_k,
                                                   1.0, seed, False, 1, api_name="/generate")
            except Exception as error:  # counted, reported
                with lock:
                    lost.append(f"client {c} request {r}: {error}")
                continue
            elapsed = time.perf_counter() - start
            ok = (len(gallery) == args.samples and len(files) == 2
                  and all(Path(entry["image"]).read_bytes()[:4] == b"\x89PNG" for entry in gallery)
                  and f"seed {seed}" in note)
            found = re.search(r"in a batch of (\d+) requests", note)
            with lock:
                latencies.append(elapsed)
                batches.append(int(found.group(1)) if found else 1)
                if not ok:
                    wrong.append(f"client {c} request {r}: {len(gallery)} images")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=args.timeout)
    wall = time.perf_counter() - start
    answered = len(latencies)
    sent = args.clients * args.requests
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {"sent": sent, "answered": answered, "lost": sent - answered, "wrong": len(wrong), "wall_s": wall,
            "req_s": answered / wall, "img_s": answered * args.samples / wall,
            "p50": np.percentile(lat, 50), "p90": np.percentile(lat, 90), "p99": np.percentile(lat, 99),
            "max": lat.max(), "per_batch": float(np.mean(batches)) if batches else float("nan"),
            "errors": (lost + wrong)[:5]}


def run_server(label: str, ckpt: str, overrides: list[str], prompts: list[str], args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        server = Server(ckpt, overrides, Path(tmp))
        try:
            from gradio_client import Client

            Client(server.url, verbose=False).predict(prompts[0], args.samples, args.guidance, args.temperature,
                                                      args.top_k, 1.0, 0, False, 1, api_name="/generate")  # warm-up
            idle = tree_rss_mb(server.process.pid)
            rows = []
            for round_index in range(args.rounds):
                with MemorySampler(server.process.pid) as memory:
                    row = load_round(server.url, prompts, args, round_index)
                row.update(label=label, round=round_index + 1, rss_idle=idle, rss_peak=memory.peak,
                           rss_after=tree_rss_mb(server.process.pid))
                rows.append(row)
                print(f"{label} round {round_index + 1}: {row['answered']}/{row['sent']} answered, "
                      f"{row['req_s']:.2f} req/s", flush=True)
        finally:
            server.stop()
    return rows


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_probe(ckpt: str, batch_size: str) -> None:
    """One request at the page's limits in this process; prints its peak RSS above the loaded model (MB)."""
    import torch
    from omegaconf import OmegaConf

    from t2i.demo.engine import Engine, Job
    from t2i.demo.settings import Settings
    from t2i.scorers import CaptionScorer
    from t2i.sampling import T2IPipeline

    limits = OmegaConf.load(REPO / "conf" / "demo.yaml").limits
    pipeline = T2IPipeline.from_checkpoint(ckpt, step="eager")  # the eager step's memory (docs/demo.md's figures)
    scorer, _ = CaptionScorer.for_pipeline(pipeline, None)
    rerank = limits.max_rerank if scorer is not None else 1
    sequences = limits.max_samples * rerank
    size = sequences if batch_size == "all" else int(batch_size)
    engine = Engine(pipeline, scorer, batch_size=size, start=False)
    engine.sample([Job("warm-up", 0, Settings(samples=1, guidance_scale=3.0))])
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the present RSS
    before = _status_mb("VmRSS")
    job = Job("画面左上角有一个红色的小圆形", 0, Settings(limits.max_samples, 3.0, 1.0, 0, 1.0, rerank))
    engine.sample([job])
    cfg = pipeline.gpt.cfg
    rows = 2 * min(size, sequences)  # guidance: both halves
    cache = rows * 2 * cfg.n_layer * cfg.block_size * cfg.n_embd * pipeline.gpt.tok_emb.weight.element_size() / 2 ** 20
    print(f"RESULT {sequences} {size} {rows} {_status_mb('VmHWM') - before:.1f} {cache:.1f} {torch.get_num_threads()}")


def memory_table(args) -> int:
    print(f"the page's largest request on {args.ckpt} (guidance 3), peak RSS above the loaded model:\n")
    print("| sampling.batch_size | sequences | KV-cache rows | KV cache (formula) MB | peak RSS above idle MB |")
    print("|---|---|---|---|---|")
    for size in args.batch_sizes:
        out = subprocess.run([sys.executable, __file__, "--ckpt", args.ckpt, "--memory-probe", size], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        sequences, _, rows, peak, cache, _ = out.split("RESULT ")[1].split()
        print(f"| {size} | {sequences} | {rows} | {cache} | {peak} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a GPT checkpoint (e.g. the quickstart's)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5, help="per client, one after another")
    parser.add_argument("--samples", type=int, default=4, help="images per request")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="load rounds on one server (memory must not grow)")
    parser.add_argument("--max-batch", type=int, default=4, help="queue.max_batch of the batched server")
    parser.add_argument("--no-unbatched", action="store_true", help="skip the queue.max_batch=1 comparison")
    parser.add_argument("--prompts", default=str(REPO / "experiments" / "prompts" / "shapes.txt"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the clients")
    parser.add_argument("--memory", action="store_true", help="the peak memory of the page's largest request instead")
    parser.add_argument("--batch-sizes", nargs="+", default=["16", "all"], help="--memory: sampling.batch_size values")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # one --memory measurement, in a fresh process
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe(args.ckpt, args.memory_probe)
        return 0
    if args.memory:
        return memory_table(args)
    prompts = [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    common = [f"sampling.samples_per_prompt={args.samples}", f"queue.size={max(32, 2 * args.clients)}"]
    rows = run_server(f"max_batch={args.max_batch}", args.ckpt, [*common, f"queue.max_batch={args.max_batch}"],
                      prompts, args)
    if not args.no_unbatched:
        rows += run_server("max_batch=1", args.ckpt, [*common, "queue.max_batch=1"], prompts, args)
    print(f"\n{args.clients} clients x {args.requests} requests, {args.samples} images each, guidance {args.guidance}, "
          f"top-k {args.top_k}; {os.cpu_count()} CPUs; checkpoint {args.ckpt}\n")
    print("| server | round | answered | lost | wrong | req/s | images/s | p50 s | p90 s | p99 s | max s "
          "| requests/batch | RSS idle MB | RSS peak MB | RSS after MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['round']} | {r['answered']}/{r['sent']} | {r['lost']} | {r['wrong']} | "
              f"{r['req_s']:.2f} | {r['img_s']:.1f} | {r['p50']:.2f} | {r['p90']:.2f} | {r['p99']:.2f} | "
              f"{r['max']:.2f} | {r['per_batch']:.2f} | {r['rss_idle']:.0f} | {r['rss_peak']:.0f} | {r['rss_after']:.0f} |")
    errors = [e for r in rows for e in r["errors"]]
    for error in errors:
        print("error:", error)
    return 1 if any(r["lost"] or r["wrong"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
