"""Open a study's report.html in headless Chromium and check that it shows its tables and figures.

A copy of the page gets a small script that, once the page has loaded, counts the tables and
their rows and checks that every image decoded (``naturalWidth > 0``); Chromium's ``--dump-dom``
returns the page with that verdict, and ``--screenshot`` keeps a picture of the top of the page.
Exits 1 when a table or an image does not show.

    apt-get install -y chromium
    python scripts/check_report_html.py studies/seed-quick/report.html [--screenshot shot.png]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const tables = [...document.querySelectorAll("table")];
  const out = {
    tables: tables.length,
    rows: tables.map(t => t.querySelectorAll("tbody tr").length),
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    sizes: imgs.map(i => [i.naturalWidth, i.naturalHeight]),
    height: document.body.scrollHeight,
  };
  const pre = document.createElement("pre");
  pre.id = "report-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("chromium not found: apt-get install -y chromium")


def check(report: Path, screenshot: Path | None = None, timeout: int = 120) -> dict:
    """The probe's findings for ``report`` (tables, rows per table, images, broken images)."""
    browser = chromium()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "probe.html"
        page.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
        dom = subprocess.run(
            [browser, *flags, "--dump-dom", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if screenshot is not None:
            subprocess.run(
                [
                    browser,
                    *flags,
                    f"--screenshot={screenshot.resolve()}",
                    "--window-size=1200,1600",
                    report.resolve().as_uri(),
                ],
                capture_output=True,
                timeout=timeout,
                check=False,
            )
    match = re.search(r'<pre id="report-check">(.*?)</pre>', dom.stdout, re.S)
    if not match:
        raise SystemExit(f"chromium did not render {report}: {dom.stderr[-500:]}")
    return json.loads(match.group(1).replace("&quot;", '"'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None)
    args = parser.parse_args()
    found = check(args.report, args.screenshot)
    print(json.dumps(found))
    problems = []
    if found["tables"] == 0 or 0 in found["rows"]:
        problems.append(f"tables without rows: {found['rows']}")
    if found["images"] == 0:
        problems.append("no images")
    if found["broken"]:
        problems.append(f"images that did not decode: {found['broken']}")
    if problems:
        print("FAIL: " + "; ".join(problems))
        sys.exit(1)
    print(f"OK: {found['tables']} tables, {found['images']} images rendered")


if __name__ == "__main__":
    main()
