"""The notebooks: committed clean, runnable headless with papermill, served by JupyterLab.

Each notebook runs in smoke mode (a tiny random model, a 24-sticker set at 16 px, a
few steps) through :func:`rdtf.notebooks.run_notebook`, in a real kernel, and the test
looks at what it wrote and showed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
import torch
from built_in import built_in_dataset
from papermill.exceptions import PapermillExecutionError

from rdtf.lora import attach_lora, save_lora
from rdtf.models import build_tiny_components
from rdtf.notebooks import (
    NOTEBOOKS,
    kit_root,
    notebook_parameters,
    notebook_path,
    output_problems,
    run_all,
    run_notebook,
)

CELL_TIMEOUT_S = 240
SIZE = 16


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny model folder, a prepared 24-sticker set at 16 px and a LoRA for it under runs/."""
    root = tmp_path_factory.mktemp("notebooks")
    components = build_tiny_components(seed=0, sample_size=SIZE, image_size=SIZE)
    components.save_pretrained(root / "model")
    built_in_dataset(root, count=24, size=SIZE, seed=0)
    attach_lora(components.unet, rank=2)
    with torch.no_grad():
        for name, parameter in components.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    save_lora(components.unet, root / "runs" / "tiny-lora")
    return root


def outputs(executed: Path) -> tuple[set[str], str]:
    """Every output MIME type of an executed notebook, and all its text outputs joined."""
    kinds, texts = set(), []
    for cell in nbformat.read(executed, as_version=4).cells:
        for output in cell.get("outputs", []):
            kinds.add(output.output_type)
            data = output.get("data", {})
            kinds.update(data)
            texts += [output.get("text", ""), data.get("text/markdown", ""), data.get("text/html", "")]
    return kinds, "\n".join(texts)


def check_executed(executed: Path, name: str) -> None:
    assert executed.name == f"{name}.ipynb" and executed.is_file()
    assert executed.with_suffix(".html").stat().st_size > 10_000
    assert not list(executed.parent.glob(".*.tmp*")), "temporary files left behind"


# --------------------------------------------------------------------------- committed notebooks


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean_and_has_one_parameters_cell(name):
    path = notebook_path(name)
    assert output_problems(path) == []
    command = [sys.executable, "-m", "nbstripout", "--verify", str(path)]
    stripped = subprocess.run(command, capture_output=True, text=True)
    assert stripped.returncode == 0, stripped.stdout + stripped.stderr  # what a CI `nbstripout --verify` checks
    notebook = nbformat.read(path, as_version=4)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    assigned = re.findall(r"^(\w+) = ", tagged[0].source, flags=re.MULTILINE)
    assert list(notebook_parameters(name)) == assigned  # papermill parsed every line (it skips what it cannot)
    assert all("# " in line for line in tagged[0].source.splitlines() if " = " in line), "annotate every default"
    assert notebook.metadata.kernelspec.name == "python3"
    assert sum(cell.cell_type == "markdown" for cell in notebook.cells) >= 3


def test_output_check_flags_outputs_and_execution_counts(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    notebook.cells[0].execution_count = 1
    notebook.cells[0].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    nbformat.write(notebook, tmp_path / "dirty.ipynb")
    assert output_problems(tmp_path / "dirty.ipynb") == [
        "dirty.ipynb cell 1: has 1 output(s)",
        "dirty.ipynb cell 1: has execution count 1",
    ]


def test_bad_runs_are_refused_before_a_kernel_starts(tmp_path):
    with pytest.raises(ValueError, match=r"unknown parameters \['sizee'\]"):
        run_notebook("01_prepare_data", tmp_path, {"sizee": 16})
    with pytest.raises(FileNotFoundError, match="05_missing"):
        run_notebook("05_missing", tmp_path)
    with pytest.raises(ValueError, match="no such Jupyter kernel"):
        run_notebook("01_prepare_data", tmp_path, kernel_name="no-such-kernel")
    with pytest.raises(ValueError, match=r"unknown notebooks \['99_extra'\]"):
        run_all(tmp_path, {"99_extra": {}})
    with pytest.raises(ValueError, match=r"02_finetune_lora.*unknown parameters \['steps'\]"):
        run_all(tmp_path, {"01_prepare_data": {"count": 4}, "02_finetune_lora": {"steps": 3}})
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- smoke runs


def test_01_prepare_data(tmp_path):
    parameters = dict(
        builtin_dir=str(tmp_path / "builtin"), count=24, size=SIZE, out_dir=str(tmp_path / "prepared"), gallery_size=3
    )
    executed = run_notebook("01_prepare_data", tmp_path / "out", parameters, timeout=CELL_TIMEOUT_S)
    check_executed(executed, "01_prepare_data")
    assert (tmp_path / "prepared" / "manifest.jsonl").is_file()
    kinds, text = outputs(executed)
    assert {"text/html", "image/png", "text/markdown"} <= kinds  # gallery, histogram, skipped-files report
    assert text.count("data:image/gif;base64,") == 3 and re.search(r"[\u4e00-\u9fff]", text)  # captions in Chinese too
    assert "Sticker dataset report" in text and "Nothing was skipped" in text


def test_02_finetune_lora(workspace, tmp_path):
    parameters = dict(
        base=str(workspace / "model"), data=str(workspace / "data"), output_dir=str(tmp_path / "lora"), split=None,
        max_steps=3, batch_size=2, lora_rank=4, validate_every=3, checkpoint_every=3, log_every=1,
    )
    executed = run_notebook("02_finetune_lora", tmp_path / "out", parameters, timeout=CELL_TIMEOUT_S)
    check_executed(executed, "02_finetune_lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "lora" / "training_curves.png").is_file()
    kinds, text = outputs(executed)
    assert {"image/png", "image/gif"} <= kinds  # loss curves, last validation strip
    assert '"kind": "rdtf-lora"' in text and '"steps": 3' in text


def test_03_sample_interactive(workspace, tmp_path):
    parameters = dict(
        base=str(workspace / "model"), data=str(workspace / "data"), lora_dir=str(workspace / "runs"),
        export_dir=str(tmp_path / "stickers"), task="predict_forward", sample=1, steps=2,
    )
    executed = run_notebook("03_sample_interactive", tmp_path / "out", parameters, timeout=CELL_TIMEOUT_S)
    check_executed(executed, "03_sample_interactive")
    assert (tmp_path / "stickers" / "predict_forward-seed0.webm").is_file()
    kinds, text = outputs(executed)
    assert {"application/vnd.jupyter.widget-view+json", "image/gif"} <= kinds  # the studio, the direct call's result
    assert "telegram sticker" in text


def test_04_compare_ground_truth(workspace, tmp_path):
    parameters = dict(
        base=str(workspace / "model"), lora_path=str(workspace / "runs" / "tiny-lora"), data=str(workspace / "data"),
        tasks=["i2v", "interpolation", "predict_forward"], num_clips=2, steps=2, mean_of=2, examples_per_task=1,
        sweep_clips=1, sweep_steps=[1, 2], sweep_guidance=[1.0, 4.0], report_dir=str(tmp_path / "report"),
    )
    executed = run_notebook("04_compare_ground_truth", tmp_path / "out", parameters, timeout=CELL_TIMEOUT_S)
    check_executed(executed, "04_compare_ground_truth")
    report = tmp_path / "report"
    assert (report / "report.html").is_file()
    assert (report / "figures" / "sweep_psnr_vs_steps.png").is_file()
    assert (report / "figures" / "sweep_psnr_vs_guidance.png").is_file()
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    assert {"base", "base-mean2", "base+LoRA"} <= set(results["methods"])
    kinds, text = outputs(executed)
    assert {"image/gif", "image/png", "text/markdown"} <= kinds
    assert "| i2v |" in text and "base+LoRA" in text


def test_a_failing_cell_fails_the_run_and_the_executed_copy_shows_why(tmp_path):
    parameters = dict(source_dir=str(tmp_path / "no-such-folder"), out_dir=str(tmp_path / "prepared"))
    with pytest.raises(PapermillExecutionError, match="FileNotFoundError"):
        run_notebook("01_prepare_data", tmp_path / "out", parameters, timeout=CELL_TIMEOUT_S)
    executed = tmp_path / "out" / "01_prepare_data.ipynb"
    check_executed(executed, "01_prepare_data")
    assert "no-such-folder" in executed.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- JupyterLab


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_jupyterlab_serves_the_notebooks(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    log = tmp_path / "lab.log"
    with open(log, "wb") as handle:
        server = subprocess.Popen(
            [
                sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.root_dir={kit_root()}", f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0",
                "--ServerApp.allow_root=True",  # CI containers run as root
            ],
            env=env, stdout=handle, stderr=subprocess.STDOUT,
        )
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/contents/notebooks", headers={"Authorization": f"token {token}"}
        )
        deadline, listing = time.monotonic() + 90, None
        while listing is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    listing = json.load(response)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert listing is not None, f"JupyterLab did not serve the notebooks within 90 s:\n{log.read_text()[-3000:]}"
        names = {entry["name"] for entry in listing["content"]}
        assert {f"{name}.ipynb" for name in NOTEBOOKS} <= names
        anonymous = urllib.request.Request(f"http://127.0.0.1:{port}/api/contents/notebooks")
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(anonymous, timeout=5)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
