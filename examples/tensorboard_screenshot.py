"""Screenshot TensorBoard's pages for a run, in a real headless browser (Chromium).

    python examples/tensorboard_screenshot.py                        # runs the digits demo first
    python examples/tensorboard_screenshot.py --logdir runs/digits   # an existing run directory

It starts `tensorboard --logdir LOGDIR` on a free local port, waits until it
answers, and has headless Chromium load the Time Series (scalars) page and
the HParams page, each saved as a PNG under `--out`. TensorBoard is asked to
draw its charts as SVG (`?forceSVG=true`): its WebGL charts stay blank in a
headless browser. What it checks is what
a user sees: the `train/` and `val/` groups open with their curves, the
learning rate, and the run's hyper-parameters with its final metrics; look
at the PNGs.

Needs Chromium (`apt-get install chromium`, or `--browser PATH`) and the
`tensorboard` package. Not part of the test suite: it needs a browser and
takes about a minute.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
# forceSVG: TensorBoard draws its charts as SVG (its WebGL charts stay blank in headless Chromium).
# Each page: (URL from the server's root, window size): the HParams table is wide and short.
PAGES = {
    "scalars": ("?forceSVG=true#timeseries", "1400,1500"),
    "hparams": ("?forceSVG=true#hparams", "2400,500"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"TensorBoard did not answer at {url} within {seconds} s"
                ) from None
            time.sleep(0.5)


def screenshot(browser: str, url: str, out: Path, size: str, budget_ms: int) -> None:
    """Load `url` in headless Chromium, let its scripts run `budget_ms`, save a PNG at `out`."""
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # running as root in a container
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={size}",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={out}",
        url,
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    if not out.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot at {out}")


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--logdir", default=None, help="TensorBoard's --logdir (None: run the digits demo first)"
    )
    parser.add_argument("--out", default="examples/screenshots", help="where the PNGs go")
    parser.add_argument("--browser", default=None, help="Chromium's path (None: look it up)")
    parser.add_argument("--wait-ms", type=int, default=20000, help="script time per page")
    args = parser.parse_args(argv)

    browser = args.browser or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )
    if browser is None:
        parser.error("no Chromium found: `apt-get install chromium`, or pass --browser PATH")
    logdir = args.logdir
    if logdir is None:
        logdir = tempfile.mkdtemp(prefix="lightfunc-demo-")
        sys.path.insert(0, str(HERE))
        import digits

        digits.main(["--run-dir", logdir])

    port = free_port()
    tensorboard = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    server = subprocess.Popen(
        [*tensorboard, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_until_up(base, seconds=60)
        for name, (page, size) in PAGES.items():
            path = out / f"tensorboard_{name}.png"
            screenshot(browser, base + page, path, size, args.wait_ms)
            written.append(path)
            print(f"wrote {path}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return written


if __name__ == "__main__":
    main()
