"""The HTML viewer in headless Chromium: every node is rendered, and the controls work.

Needs Debian's ``chromium`` (and ``chromium-driver`` + pip ``selenium`` for the interaction test).
Skipped with a reason when they are absent locally; a failure when env ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from graphs.circuit import edge_inputs, node_ids
from graphs.export import viewer
from graphs.ops import prune
from graphs.testing import induction_graph

pytestmark = pytest.mark.browser

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]


def chromium() -> str:
    exe = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (apt-get install -y chromium chromium-driver)")
        pytest.skip("chromium is not installed (apt-get install -y chromium chromium-driver)")
    return exe


class Rendered(HTMLParser):
    """Collects the data-id of SVG nodes / edge groups and the body attributes of a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, str] = {}
        self.edges: dict[str, str] = {}
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "body":
            self.body = {k: v or "" for k, v in a.items()}
        elif tag == "g" and "node" in classes:
            self.nodes[a["data-id"]] = " ".join(classes)
        elif tag == "g" and "edge-group" in classes:
            self.edges[a["data-id"]] = " ".join(classes)


def dump_dom(url: str, tmp_path: Path) -> Rendered:
    out = subprocess.run([chromium(), *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    parsed = Rendered()
    parsed.feed(out.stdout)
    return parsed


def test_every_circuit_node_is_rendered(tmp_path):
    G = induction_graph()
    page = viewer.export(G, tmp_path / "v.html")
    dom = dump_dom(page.as_uri(), tmp_path)
    assert dom.body.get("data-ready") == "true", "viewer script did not finish"
    circuit = node_ids(G)
    assert set(dom.nodes) == set(circuit)  # default view: the marked circuit only
    assert all("isolated" not in c for c in dom.nodes.values())
    assert set(dom.edges) == {e.id for e in edge_inputs(G) if e.in_circuit}
    assert dom.body["data-rendered-nodes"] == str(len(circuit))

    everything = dump_dom(page.as_uri() + "#all", tmp_path)  # toggle off through the URL
    assert set(everything.nodes) == set(G.nodes)
    assert set(everything.edges) == {e.id for e in edge_inputs(G)} and len(everything.edges) == 137
    assert all(("out" in everything.nodes[n].split()) != G.nodes[n]["in_circuit"] for n in G.nodes)


def test_pruned_and_node_only_graphs_render(tmp_path):
    P = prune(induction_graph())
    dom = dump_dom(viewer.export(P, tmp_path / "p.html").as_uri(), tmp_path)
    assert set(dom.nodes) == set(P.nodes) and len(dom.edges) == 8
    N = induction_graph()
    N.remove_edges_from(list(N.edges))
    dom = dump_dom(viewer.export(N, tmp_path / "n.html").as_uri(), tmp_path)
    assert set(dom.nodes) == set(node_ids(N)) and not dom.edges and dom.body.get("data-ready") == "true"


def test_screenshot(tmp_path):
    page = viewer.export(induction_graph(), tmp_path / "v.html")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium(), *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1400,900", "--virtual-time-budget=5000", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a blank page compresses to ~5 kB


def test_controls_with_selenium(tmp_path):
    exe = chromium()
    driver_exe = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
    except ImportError:
        webdriver = None
    if webdriver is None or driver_exe is None:
        if os.environ.get("CI"):
            pytest.fail("selenium (pip) and chromedriver (apt chromium-driver) are required in CI")
        pytest.skip("selenium or chromedriver is not installed")
    G = induction_graph()
    page = viewer.export(G, tmp_path / "v.html")
    options = webdriver.ChromeOptions()
    options.binary_location = exe
    for flag in [*CHROME_FLAGS, "--window-size=1400,900", f"--user-data-dir={tmp_path / 'sel'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_exe), options=options)
    try:
        driver.get(page.as_uri())
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true"
        assert "induction circuit" in driver.find_element(By.ID, "title").text
        assert "faithfulness" in driver.find_element(By.ID, "attrs").text

        def visible_edges() -> set[str]:
            return set(driver.execute_script(
                "return Array.from(document.querySelectorAll('.edge-group'))"
                ".map(g => g.getAttribute('data-id'));"))

        planted = {e.id for e in edge_inputs(G) if e.in_circuit}
        assert visible_edges() == planted
        # slider: |score| >= 1.0 leaves the planted inputs with |score| 1.1, 2.5, 1.4, 1.9, 3.0
        driver.execute_script("var s = document.getElementById('threshold'); s.value = '1.0';"
                              "s.dispatchEvent(new Event('input'));")
        strong = {e.id for e in edge_inputs(G) if e.in_circuit and abs(e.score) >= 1.0}
        assert visible_edges() == strong and len(strong) == 5
        assert "5 of 9 edges" in driver.find_element(By.ID, "counts").text
        isolated = driver.execute_script("return Array.from(document.querySelectorAll('.node.isolated'))"
                                         ".map(g => g.getAttribute('data-id'));")
        assert set(isolated) == {"a0.h3", "m0"}  # their only in-circuit edge is below the threshold
        # toggle: all nodes and the edges above the threshold come back
        driver.find_element(By.ID, "circuit-only").click()
        rendered = driver.execute_script("return Array.from(document.querySelectorAll('.node'))"
                                         ".map(g => g.getAttribute('data-id'));")
        assert set(rendered) == set(G.nodes)
        assert visible_edges() == {e.id for e in edge_inputs(G) if abs(e.score) >= 1.0}
        # hover: tooltip with the node's attributes, its neighbourhood highlighted
        node = driver.find_element(By.CSS_SELECTOR, '.node[data-id="a1.h2"]')
        ActionChains(driver).move_to_element(node).perform()
        tip = driver.find_element(By.ID, "tooltip")
        assert tip.is_displayed() and "a1.h2" in tip.text and "attn_head" in tip.text and "-3" in tip.text
        assert "focus" in driver.find_element(By.ID, "graph").get_attribute("class")
        # a point a quarter along the edge's curve, as an offset from the centre of the <svg>
        dx, dy = driver.execute_script("""
            var svg = document.getElementById('graph');
            var path = document.querySelector('.edge-group[data-id="a0.h1->a1.h2<k>"] .edge-hit');
            var p = path.getPointAtLength(path.getTotalLength() / 4).matrixTransform(path.getScreenCTM());
            var r = svg.getBoundingClientRect();
            return [Math.round(p.x - (r.left + r.width / 2)), Math.round(p.y - (r.top + r.height / 2))];""")
        graph = driver.find_element(By.ID, "graph")
        ActionChains(driver).move_to_element_with_offset(graph, dx, dy).perform()
        assert "a0.h1->a1.h2<k>" in tip.text and "input" in tip.text and "-2.5" in tip.text
        logs = [m for m in driver.get_log("browser") if m.get("level") == "SEVERE"]
        assert not logs, logs
    finally:
        driver.quit()


def test_large_graph_draws_the_strongest_edges_first(tmp_path):
    G = induction_graph(n_layers=4, n_heads=12)
    inputs = list(edge_inputs(G))
    assert len(inputs) > 3000
    dom = dump_dom(viewer.export(G, tmp_path / "big.html").as_uri() + "#all", tmp_path)
    assert set(dom.nodes) == set(G.nodes)
    drawn = set(dom.edges)
    assert 1500 <= len(drawn) <= 1520  # MAX_EDGES, plus ties at the threshold
    weakest = min(abs(e.score) for e in inputs if e.id in drawn)
    assert drawn == {e.id for e in inputs if abs(e.score) >= weakest}
    assert dom.body["data-visible-edges"] == str(len(drawn))
