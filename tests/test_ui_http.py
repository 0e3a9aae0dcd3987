"""`amused-tune ui --host 0.0.0.0` driven with a real HTTP client (httpx, no browser): the page reachable from other
machines asks for the password it printed, refuses every path outside the runs folder and the --data folders in one
line, checks uploads (not an image, a decompression bomb, a name with a folder) and writes nothing outside the runs
folder. Skipped without gradio."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ENV.pop("AMUSED_TUNE_UI_PASSWORD", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(root: Path, skip: Path) -> dict[str, float]:
    """Every file under `root` but those under `skip`, with its modification time."""
    return {str(p): p.stat().st_mtime for p in root.rglob("*") if p.is_file() and not p.is_relative_to(skip)}


@pytest.fixture
def page(tmp_path):
    """The page on 0.0.0.0 with its runs in tmp_path/runs and one data folder; yields (client, password, tmp)."""
    runs, photos = tmp_path / "runs", tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(photos / "x.png")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "secret.txt").write_text("not for the page")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "amused_tune.cli", "ui", "--runs", "runs", "--port", str(port),
                             "--host", "0.0.0.0", "--data", "photos"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    said = []
    start = time.monotonic()
    while not any(line.startswith("amused-tune ui: http") for line in said):
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "".join(said)
        said.append(line)
        assert time.monotonic() - start < 90, "".join(said)
    password = re.search(r"^login: any user name, password (\S+) ", "".join(said), re.M)
    assert password, "".join(said)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    while True:
        try:
            client.get("/")
            break
        except httpx.TransportError:
            assert time.monotonic() - start < 90
            time.sleep(0.3)
    yield client, password[1], tmp_path
    client.close()
    proc.terminate()
    proc.wait(timeout=20)


def call(client, api: str, data: list) -> list:
    """One event of the page's API, as the browser sends it; returns the handler's outputs."""
    posted = client.post(f"/gradio_api/call/{api}", json={"data": data})
    assert posted.status_code == 200, posted.text
    answer = client.get(f"/gradio_api/call/{api}/{posted.json()['event_id']}").text
    found = re.search(r"^event: (\w+)\ndata: (.*)$", answer, re.M)
    assert found and found[1] == "complete", answer
    import json

    return json.loads(found[2])


def upload(client, name: str, content: bytes) -> dict:
    sent = client.post("/gradio_api/upload", files=[("files", (name, content))])
    assert sent.status_code == 200, sent.text
    return {"path": sent.json()[0], "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def bomb(side: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_page_reachable_from_other_machines_asks_the_password_and_confines_every_path(page):
    client, password, tmp = page
    runs = tmp / "runs"
    before = tree(tmp, runs)
    # without the login: the page's data, its API, uploads and files are all refused
    for response in (client.get("/config"), client.post("/gradio_api/call/check", json={"data": []}),
                     client.post("/gradio_api/upload", files=[("files", ("x.png", b"x"))]),
                     client.get(f"/gradio_api/file={tmp / 'photos' / 'x.png'}")):
        assert response.status_code in (401, 403), (response.request.url, response.status_code)
    assert client.post("/login", data={"username": "me", "password": password + "x"}).status_code == 400
    assert client.post("/login", data={"username": "me", "password": password}).json() == {"success": True}
    assert client.get("/config").status_code == 200

    # every path it is given must be inside runs/ or photos/ (the recipe, data.path, output.dir, any override)
    form = ["quickstart", None, "", "", 2, "", ""]
    for index, value, said in (
            (2, str(tmp / "private"), f"--data.path={tmp / 'private'} is outside the runs folder or a data folder"),
            (2, "../" + tmp.name + "/private", "is outside the runs folder or a data folder"),
            (5, str(tmp / "elsewhere"), f"--output.dir={tmp / 'elsewhere'} is outside the runs folder {Path('runs')}"),
            (6, "--data.cache_dir=/tmp/c", "--data.cache_dir=/tmp/c is outside the runs folder"),
            (0, str(tmp / "private" / "secret.txt"), "recipe=" + str(tmp / "private" / "secret.txt"))):
        fields = list(form)
        fields[index] = value
        for api in ("check", "start"):
            out = call(client, api, fields)
            assert out[1].startswith("error: ") and said in out[1] and "\n" not in out[1], (api, value, out[1])
    inside = list(form)
    inside[2], inside[3] = "photos/x.png", "a red square in [v] style"
    command_line, lines, *_ = call(client, "check", inside)
    assert "--data.path=photos/x.png" in command_line and "--output.dir=runs/quickstart-lora" in command_line
    assert lines.startswith("1 sample in photos/x.png"), lines
    assert "is outside" in call(client, "compare", ["/etc", [], "", "a red circle", 0, 1, "", "", False, 1, 1])[1]
    assert client.get(f"/gradio_api/file={tmp / 'private' / 'secret.txt'}").status_code == 403

    # uploads: each refusal is one line and writes nothing; a good image lands in runs/uploads/NAME
    png = (tmp / "photos" / "x.png").read_bytes()
    for name, files, said in (
            ("style", [("notes.png", b"not an image")], "error: upload notes.png is not an image PIL can read"),
            ("style", [("bomb.png", bomb(30000))], "error: upload bomb.png: too many pixels to decode safely"),
            ("style", [("big.png", bomb(9000))], "error: upload big.png: 9000x9000 pixels is more than this page"),
            ("../../escape", [("x.png", png)], "error: upload folder name '../../escape' must be one plain name"),
            ("style", [("x.png", png), ("run.sh", b"echo")], "error: upload run.sh: not an image")):
        message, data_path = call(client, "upload", [name, [upload(client, n, c) for n, c in files]])
        assert message.startswith(said) and "\n" not in message, message
    assert not (runs / "uploads" / "style").exists()
    # a name with a folder in it reaches the page as its own name only, and lands inside the runs folder
    message, data_path = call(client, "upload", ["style", [upload(client, "../../evil.png", png)]])
    assert message.startswith("saved 1 file to") and Path(data_path) == (runs / "uploads" / "style" / "evil.png")
    assert (runs / "uploads" / "style" / "evil.png").read_bytes() == png

    # nothing the page was sent or did was written outside the runs folder
    assert tree(tmp, runs) == before
