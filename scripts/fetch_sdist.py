"""Downloads a package's source distribution the way pip finds it: from the package's page on the simple index
(PEP 503; pip's configured index-url, else PyPI's), checking the sha256 the link carries.

usage: fetch_sdist.py NAME VERSION OUT
"""
import hashlib
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request


def index_url():
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        try:
            url = subprocess.run(["pip", "config", "get", "global.index-url"], capture_output=True, text=True).stdout
        except OSError:
            url = ""
    return (url.strip() or "https://pypi.org/simple").rstrip("/") + "/"


def main(name, version, out):
    normalized = re.sub(r"[-_.]+", "-", name).lower()
    page_url = urllib.parse.urljoin(index_url(), normalized + "/")
    page = urllib.request.urlopen(page_url, timeout=60).read().decode()
    wanted = f"{re.sub(r'[-.]+', '_', normalized)}-{version}.tar.gz"
    for href in re.findall(r'href="([^"]+)"', page):
        href = href.replace("&amp;", "&")
        url, _, fragment = href.partition("#")
        if urllib.parse.unquote(url.rsplit("/", 1)[-1]) != wanted:
            continue
        data = urllib.request.urlopen(urllib.parse.urljoin(page_url, url), timeout=300).read()
        algorithm, _, digest = fragment.partition("=")
        if algorithm and algorithm in hashlib.algorithms_available and hashlib.new(algorithm, data).hexdigest() != digest:
            sys.exit(f"fetch_sdist: {wanted}: the {algorithm} does not match the index's")
        with open(out, "wb") as f:
            f.write(data)
        print(f"fetch_sdist: {wanted} ({len(data)} bytes) from {page_url}")
        return
    sys.exit(f"fetch_sdist: {page_url} lists no {wanted}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
