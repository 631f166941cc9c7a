"""The docs stay true: every python and bash block of README.md and docs/
runs against a real server (the synthetic source), or says why it cannot
(`<!-- not run: reason -->` right above it), and every link to a file of
the project leads somewhere."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"(?:^<!-- not run: (?P<why>[^>]+?) -->\n)?^```(?P<lang>python|bash)\n"
                   r"(?P<code>.*?)^```$", re.M | re.S)
DEFAULT_ADDRESS = re.compile(r"""\(\s*"127\.0\.0\.1",\s*5000\s*\)|"127\.0\.0\.1:5000\"""")
# What the reader's own training script defines, which the examples use.
READERS_OWN = textwrap.dedent("""
    import os, sys
    import torch
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    epochs, rank, step = 1, 0, 0

    def train_step(batch):
        return batch

    def save_checkpoint(*state):
        return state
""")


THE_TWO_COMMANDS = "the README's first block: tests/ops/test_demo.py runs the demo, and the " \
                   "test command is this suite"


def blocks(path: Path, lang: str) -> List[Tuple[str, str]]:
    """(code, reason not to run it or "") of a document's blocks in `lang`."""
    found = [(m["code"], m["why"] or "") for m in BLOCK.finditer(path.read_text())
             if m["lang"] == lang]
    if path.name == "README.md" and lang == "bash":
        found[0] = (found[0][0], THE_TWO_COMMANDS)
    return found


def _runnable(lang: str) -> List[Tuple[Path, int, str]]:
    return [(path, k, code) for path in DOCS
            for k, (code, why) in enumerate(blocks(path, lang)) if not why]


@pytest.fixture(scope="module")
def docs_server(start_module_server):
    """The server every block reads from: runs of 256 events, past every event a
    block names (163), so a block reading a whole run reads 256, not 1000."""
    return start_module_server(["--workers", "2", "--frame-cache", "256M",
                                "--synthetic-events", "256"])


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_the_python_of_a_document_runs(path, docs_server, tmp_path):
    code = [READERS_OWN] + [DEFAULT_ADDRESS.sub(repr(docs_server.address), c)
                            for c, why in blocks(path, "python") if not why]
    if len(code) == 1:
        pytest.skip(f"{path.name} has no python to run")
    result = subprocess.run([sys.executable, "-c", "\n".join(code)], cwd=tmp_path,
                            env=dict(os.environ, PSANA_IPC_ADDRESS=docs_server.address),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("path, k, code", _runnable("bash"),
                         ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_a_bash_block_runs(path, k, code, docs_server, tmp_path):
    env = dict(os.environ, PSANA_IPC_ADDRESS=docs_server.address,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c",
                             DEFAULT_ADDRESS.sub(docs_server.address, code)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_block_not_run_says_why(path):
    """Each `not run` mark stands right above a block, with a reason."""
    reasons = [why for lang in ("python", "bash") for _, why in blocks(path, lang)
               if why and why != THE_TWO_COMMANDS]
    assert len(reasons) == path.read_text().count("<!-- not run:")
    assert all(len(why.split()) >= 3 for why in reasons), reasons


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_links_to_project_files_lead_somewhere(path):
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).exists(), f"{path.name} links to {target}"
