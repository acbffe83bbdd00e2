"""Drives the web terminal page of `bhatti share` in headless Chromium over
the DevTools protocol (Debian's `chromium`, no WebDriver).

Opens the share URL, types `echo $((6*7))`, waits for `42` on the screen,
saves a screenshot, then revokes the share through the API and checks that
the open page is disconnected and that a reload is refused. Prints one JSON
line: what it saw. Exits non-zero when a step times out.

Usage: share_page.py --url SHARE_URL --api API_URL --sandbox ID
       --screenshot PNG   (the API key comes from $BHATTI_TOKEN)
"""

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from websockets.sync.client import connect

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--metrics-recording-only",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication",
    # The page is at an IP literal; no host name resolves, so the browser
    # itself cannot reach any service outside this machine either.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--window-size=1000,650",
    "--remote-debugging-port=0",
]


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium on PATH (scripts/setup.sh installs Debian's `chromium`)")


class Page:
    """One page target: commands with ids, events kept in order."""

    def __init__(self, ws_url):
        self.ws = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=30)
        self.next_id = 0
        self.events = []

    def send(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def pump(self, seconds):
        """Collects events for up to `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                msg = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                return
            if "method" in msg:
                self.events.append(msg)

    def eval(self, expr):
        r = self.send("Runtime.evaluate", expression=expr, returnByValue=True)
        return r.get("result", {}).get("value")

    def wait_for(self, expr, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expr)
            if value:
                return value
            self.pump(0.2)
        status = self.eval("document.getElementById('status').textContent")
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}; status: {status!r}")


def screen_text(page):
    return page.eval("(document.querySelector('.xterm-rows') || {}).innerText || ''") or ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--api", required=True)
    ap.add_argument("--sandbox", required=True)
    ap.add_argument("--screenshot", required=True)
    args = ap.parse_args()
    key = os.environ["BHATTI_TOKEN"]
    origin = urllib.parse.urlsplit(args.api)
    origin = f"{origin.scheme}://{origin.netloc}"
    ws_origin = origin.replace("http://", "ws://", 1).replace("https://", "wss://", 1)

    profile = tempfile.mkdtemp(prefix="bhatti-chromium-")
    proc = subprocess.Popen(
        [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = {}
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = open(port_file).read().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        target = next(t for t in targets if t["type"] == "page")
        page = Page(target["webSocketDebuggerUrl"])
        for domain in ("Network", "Page", "Log", "Runtime"):
            page.send(f"{domain}.enable")
        page.send("Page.navigate", url=args.url)
        page.wait_for("document.body && document.body.dataset.state === 'connected'", 60,
                      "the terminal to connect")
        page.eval("document.querySelector('.xterm-helper-textarea').focus()")
        page.send("Input.insertText", text="echo $((6*7))")
        for kind in ("keyDown", "keyUp"):
            page.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                      text="\r" if kind == "keyDown" else "")
        deadline = time.monotonic() + 30
        saw_42 = False
        while time.monotonic() < deadline and not saw_42:
            saw_42 = any(line.strip() == "42" for line in screen_text(page).splitlines())
            page.pump(0.2)
        report["saw_42"] = saw_42
        report["screen"] = screen_text(page)
        shot = page.send("Page.captureScreenshot", format="png")
        with open(args.screenshot, "wb") as f:
            f.write(base64.b64decode(shot["data"]))

        # Revoke through the API: the open page must be disconnected.
        req = urllib.request.Request(f"{args.api}/sandboxes/{args.sandbox}/share",
                                     method="DELETE", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req) as resp:
            report["revoke_status"] = resp.status
        page.wait_for("['error', 'closed'].includes(document.body.dataset.state)", 15,
                      "the page to be disconnected")
        report["revoked_page_state"] = page.eval("document.body.dataset.state")
        report["revoked_page_status"] = page.eval("document.getElementById('status').textContent")
        page.send("Page.reload")
        page.wait_for("document.body && document.body.dataset.state === 'error'", 30,
                      "the reloaded page to be refused")
        report["reload_status"] = page.eval("document.getElementById('status').textContent")
        page.pump(0.5)

        urls = []
        for ev in page.events:
            if ev["method"] == "Network.requestWillBeSent":
                urls.append(ev["params"]["request"]["url"])
            elif ev["method"] == "Network.webSocketCreated":
                urls.append(ev["params"]["url"])
        report["requests"] = sorted(set(urls))
        report["third_party_requests"] = sorted(
            {u for u in urls if not (u.startswith(origin + "/") or u.startswith(ws_origin + "/"))})
        logs = [ev["params"]["entry"]["text"] for ev in page.events
                if ev["method"] == "Log.entryAdded"]
        logs += [" ".join(str(a.get("value", "")) for a in ev["params"]["args"])
                 for ev in page.events if ev["method"] == "Runtime.consoleAPICalled"]
        report["console"] = logs
        report["csp_violations"] = [t for t in logs if "Content Security Policy" in t]
        page.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
        print(json.dumps(report))
    ok = report.get("saw_42") and not report.get("third_party_requests") \
        and not report.get("csp_violations")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
