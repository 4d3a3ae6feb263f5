"""The screenshot of docs/serve.md: `pretune serve`'s page over the given runs, filled in and run in
Debian's headless chromium (Selenium through /usr/bin/chromedriver), saved as a PNG.

    python scripts/serve_screenshot.py RUN [RUN ...] --out docs/serve.png [--prompt TEXT] [--mask TEXT]
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/serve.png"))
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--mask", default="Washington is the [MASK] of the US.")
    ap.add_argument("--run-page", default=None, help="also shoot this run's curves page, to OUT-run.png")
    a = ap.parse_args()

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from pretune.serve.api import create_app
    from pretune.serve.runs import load_runs

    app = create_app(load_runs(a.runs))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for o in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(o)
    if os.geteuid() == 0:
        opts.add_argument("--no-sandbox")
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    wait = WebDriverWait(d, 300, poll_frequency=0.1)
    try:
        d.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda _: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")

        def fill(id_, text):
            e = d.find_element(By.ID, id_)
            e.clear()
            e.send_keys(text)
        if d.find_elements(By.CSS_SELECTOR, "#fm-run option"):
            fill("fm-text", a.mask)
            d.find_element(By.ID, "fm-go").click()
            wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#fm-out .cand"))
        if d.find_elements(By.CSS_SELECTOR, "#gen-run option"):
            fill("gen-prompt", a.prompt)
            fill("gen-max", "40")
            d.find_element(By.ID, "gen-go").click()
            wait.until(lambda _: d.find_element(By.ID, "gen-state").text.startswith("done"))
        if d.find_elements(By.CSS_SELECTOR, "#cls-run option"):
            d.find_element(By.ID, "cls-go").click()
            wait.until(lambda _: d.find_elements(By.ID, "cls-label"))
        if d.find_elements(By.CSS_SELECTOR, "#sim-run option"):
            d.find_element(By.ID, "sim-go").click()
            wait.until(lambda _: d.find_elements(By.ID, "sim-value"))
        d.find_element(By.ID, "cost-go").click()
        wait.until(lambda _: d.find_elements(By.ID, "cost-table"))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(a.out))
        print(f"-> {a.out}")
        if a.run_page:
            d.get(f"http://127.0.0.1:{port}/run/{a.run_page}")
            wait.until(lambda _: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
            out = a.out.with_name(a.out.stem + "-run.png")
            d.save_screenshot(str(out))
            print(f"-> {out}")
    finally:
        d.quit()
        srv.should_exit = True


if __name__ == "__main__":
    main()
