"""Run the kit's notebooks headless with papermill, keeping an executed copy and an HTML page of each.

The notebooks in ``notebooks/`` are the kit's tour: 01 prepares data, 02 fine-tunes a
LoRA, 03 samples interactively, 04 compares with ground truth. Each has one cell tagged
``parameters``; :func:`run_notebook` checks the parameters it is given against that cell
before starting a kernel, executes the notebook with a per-cell timeout, and writes
``<out_dir>/<name>.ipynb`` and ``<out_dir>/<name>.html`` atomically, also when a cell fails
(then the papermill error is raised after the files are written, so the failure can be
read). The notebooks change into :func:`kit_root` first, so relative paths in parameters
are relative to the kit's folder, in JupyterLab and here alike.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nbformat
import papermill
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbconvert import HTMLExporter

from rdtf.io import atomic_target

NOTEBOOKS: tuple[str, ...] = (
    "01_prepare_data",
    "02_finetune_lora",
    "03_sample_interactive",
    "04_compare_ground_truth",
)
DEFAULT_KERNEL = "python3"
#: Per-cell limit; a training cell on a full-size model can run for hours.
DEFAULT_TIMEOUT_S = 4 * 3600


def kit_root() -> Path:
    """The kit's folder (holding ``notebooks/`` and ``assets/``) for a source checkout, else the working directory."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "notebooks").is_dir() else Path.cwd()


def notebook_path(name: str) -> Path:
    """``notebooks/<name>.ipynb`` of the kit; ``name`` may carry the ``.ipynb`` suffix."""
    stem = name.removesuffix(".ipynb")
    path = kit_root() / "notebooks" / f"{stem}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"notebook {name!r}: no {path} (the kit's notebooks are {', '.join(NOTEBOOKS)})")
    return path


def notebook_parameters(name: str) -> dict[str, Any]:
    """The parameters a notebook declares (its ``parameters`` cell), with their defaults as papermill reads them."""
    return dict(papermill.inspect_notebook(str(notebook_path(name))))


def check_kernel(kernel_name: str = DEFAULT_KERNEL) -> Path:
    """The folder of the kernelspec ``kernel_name`` (``jupyter kernelspec list``); says how to add one if missing."""
    try:
        return Path(KernelSpecManager().get_kernel_spec(kernel_name).resource_dir)
    except NoSuchKernel:
        raise ValueError(
            f"kernel_name={kernel_name!r}: no such Jupyter kernel (see `jupyter kernelspec list`); install one for "
            f"this environment with `{sys.executable} -m ipykernel install --sys-prefix --name {kernel_name}`"
        ) from None


def run_notebook(
    name: str,
    out_dir: str | Path,
    parameters: Mapping[str, Any] | None = None,
    *,
    timeout: int = DEFAULT_TIMEOUT_S,
    kernel_name: str = DEFAULT_KERNEL,
    progress: bool = False,
) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with ``parameters``; returns the executed copy in ``out_dir``.

    ``timeout`` bounds each cell (seconds). Unknown parameter names raise ValueError before
    a kernel starts; a failing cell raises papermill's ``PapermillExecutionError`` after the
    executed copy and its HTML page are written.
    """
    source = notebook_path(name)
    parameters = dict(parameters or {})
    declared = notebook_parameters(name)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(f"{source.name}: unknown parameters {unknown}; it takes {', '.join(declared)}")
    if not isinstance(timeout, int) or timeout < 1:
        raise ValueError(f"timeout={timeout!r}: must be a whole number of seconds >= 1")
    check_kernel(kernel_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    executed = out / source.name
    temporary = executed.with_name(f".{executed.stem}.{secrets.token_hex(6)}.tmp.ipynb")
    try:
        papermill.execute_notebook(
            str(source),
            str(temporary),
            parameters=parameters,
            kernel_name=kernel_name,
            execution_timeout=timeout,
            cwd=str(kit_root()),
            progress_bar=progress,
            log_output=False,
        )
    finally:
        if temporary.is_file():  # papermill writes the notebook with the error in it before raising
            try:
                export_html(temporary, executed.with_suffix(".html"))
            finally:
                os.replace(temporary, executed)
    return executed


def export_html(notebook: str | Path, html_path: str | Path | None = None) -> Path:
    """An HTML page of an (executed) notebook, next to it by default; written atomically."""
    notebook = Path(notebook)
    target = Path(html_path) if html_path is not None else notebook.with_suffix(".html")
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    with atomic_target(target) as temporary:
        temporary.write_text(body, encoding="utf-8")
    return target


def run_all(
    out_dir: str | Path,
    parameters_by_notebook: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    timeout: int = DEFAULT_TIMEOUT_S,
    kernel_name: str = DEFAULT_KERNEL,
    progress: bool = False,
) -> list[Path]:
    """Run 01 -> 04 in order (each may use what the one before wrote); returns the executed copies.

    ``parameters_by_notebook`` maps a notebook name to its parameters; every name is
    checked, and every notebook's parameters too, before the first one runs.
    """
    parameters_by_notebook = dict(parameters_by_notebook or {})
    unknown = sorted(set(parameters_by_notebook) - set(NOTEBOOKS))
    if unknown:
        raise ValueError(f"parameters_by_notebook: unknown notebooks {unknown}; the kit's are {', '.join(NOTEBOOKS)}")
    for name, parameters in parameters_by_notebook.items():
        extra = sorted(set(parameters) - set(notebook_parameters(name)))
        if extra:
            raise ValueError(f"parameters_by_notebook[{name!r}]: unknown parameters {extra}")
    return [
        run_notebook(
            name,
            out_dir,
            parameters_by_notebook.get(name),
            timeout=timeout,
            kernel_name=kernel_name,
            progress=progress,
        )
        for name in NOTEBOOKS
    ]


def output_problems(path: str | Path) -> list[str]:
    """Why a committed notebook is not clean: cells with outputs or execution counts (empty list if clean)."""
    notebook = nbformat.read(Path(path), as_version=4)
    problems = []
    for number, cell in enumerate(notebook.cells, start=1):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"{Path(path).name} cell {number}: has {len(cell.outputs)} output(s)")
        if cell.get("execution_count") is not None:
            problems.append(f"{Path(path).name} cell {number}: has execution count {cell.execution_count}")
    return problems
