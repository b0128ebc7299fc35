"""Start-up benchmark: `gptmini serve` from process start to a 200 from `GET /health`, beside
`python -c "import torch"` on the same machine, in the same run (issue 28, item 6: ratio ≤ 1.5).

Each repeat runs every measurement once, in turn (interleaved, so a noisy neighbour hits them all alike);
the table shows medians of the repeats and each one's ratio to `import torch`. Servers listen on a free
loopback port and are stopped with SIGTERM (SIGKILL after 10 s).

    python scripts/bench_startup.py                                  # the default checkpoint, 5 repeats
    python scripts/bench_startup.py --quantize int8 --repeats 9      # also a row with --quantize int8
    python scripts/bench_startup.py --tree before=/work/main --tree after=.   # two source trees, one run

`--tree NAME=PATH` runs `gptmini serve` with PYTHONPATH=PATH (its rows are named NAME); without it the
gptmini first on the present PYTHONPATH runs.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gptmini_command() -> list[str]:
    """The `gptmini` console script beside this Python (no pyenv shim in front), else `python -m gptmini`."""
    script = Path(sys.executable).with_name("gptmini")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gptmini"]


def time_import_torch() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - start


def health_status(port: int) -> int | None:
    """The status of GET /health, or None while nothing answers on the port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def time_serve(args: list[str], env: dict[str, str], timeout: float) -> float:
    """Seconds from starting `gptmini serve …` until /health answers 200."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*gptmini_command(), "serve", *args, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            while time.perf_counter() - start < timeout:
                if health_status(port) == 200:
                    return time.perf_counter() - start
                if proc.poll() is not None:
                    break
                time.sleep(0.005)  # polling granularity: a few ms against seconds measured
        finally:
            stop(proc)
        log.seek(0)
        tail = log.read().decode(errors="replace")[-2000:]
    raise SystemExit(f"gptmini serve {' '.join(args)} never answered 200 on /health:\n{tail}")


def cases(ns: argparse.Namespace) -> list[tuple[str, list[str], dict[str, str]]]:
    """(row name, serve arguments, environment) for every serve measurement."""
    trees = [t.split("=", 1) for t in ns.tree] or [("gptmini", None)]
    out = []
    for name, tree in trees:
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = str(Path(tree).resolve())
        for quantize in ["none", *ns.quantize]:
            label = f"{name} serve" + ("" if quantize == "none" else f" --quantize {quantize}")
            args = ["-c", str(ns.checkpoint), "--quantize", quantize, "--device", ns.device]
            out.append((label, args, env))
    return out


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", "-c", type=Path, default=ROOT / "checkpoints" / "default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--quantize", action="append", default=[], help="also time `--quantize Q` (repeatable)"
    )
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH: gptmini from PATH")
    parser.add_argument("--device", default="auto", help="gptmini serve --device (auto: cuda > mps > cpu)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one start may take")
    ns = parser.parse_args()
    runs = cases(ns)
    # One untimed start first: it builds the native kernels into the cache if they are not there yet.
    time_serve(runs[0][1], runs[0][2], ns.timeout)
    times: dict[str, list[float]] = {"python -c 'import torch'": []}
    times.update({name: [] for name, _, _ in runs})
    for _ in range(ns.repeats):
        times["python -c 'import torch'"].append(time_import_torch())
        for name, args, env in runs:
            times[name].append(time_serve(args, env, ns.timeout))
    base = statistics.median(times["python -c 'import torch'"])
    print(
        f"start-up, {machine()}; medians of {ns.repeats}, interleaved; checkpoint {ns.checkpoint}, "
        f"--device {ns.device}\n"
    )
    print("| | median s | min s | max s | ÷ import torch |")
    print("|---|---:|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {max(values):.3f} | {median / base:.2f}× |")


if __name__ == "__main__":
    main()
