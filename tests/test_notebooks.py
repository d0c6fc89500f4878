"""Every chapter executes through papermill (smoke profile) and the book renders with -W."""
import json

import nbformat
import pytest

from emlib import book


def test_parameters_cell_is_found_and_unknown_names_fail(root, tmp_path):
    for src in book.chapter_sources(root):
        nb = book.read_py_notebook(src)
        params = book.parameter_defaults(nb)
        expected = {"profile", "run_dir", "seed"}
        if not src.name.startswith("00_"):
            expected |= {"model", "judge", "data_source"}
        assert expected <= set(params), src.name
        assert nb.metadata["kernelspec"]["name"] == "python3"
    with pytest.raises(TypeError, match="unknown parameter"):
        book.execute(src, tmp_path / "x.ipynb", {"profil": "smoke"})


def test_paired_ipynb_match_their_sources(root):
    for src in book.chapter_sources(root):
        twin = src.with_suffix(".ipynb")
        assert twin.exists(), f"{twin.name} missing: run `make pair`"
        a = [c.source for c in book.read_py_notebook(src).cells]
        b = [c.source for c in nbformat.read(twin, as_version=4).cells]
        assert a == b, f"{twin.name} is out of date: run `make pair`"
        assert not any(c.get("outputs") for c in nbformat.read(twin, as_version=4).cells if c.cell_type == "code")


@pytest.mark.slow
def test_all_chapters_execute_and_the_book_builds(root, tmp_path):
    summary = book.build(profile="smoke", run_dir=str(tmp_path / "run"), root=root)
    index = root / "_build" / "html" / "index.html"
    assert index.exists()
    chapters = book.chapter_sources(root)
    assert len(chapters) >= 1
    for src in chapters:
        nb = nbformat.read(tmp_path / "run" / "executed" / f"{src.stem}.ipynb", as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, f"{src.name}: {errors[0]}"
        html = root / "_build" / "html" / "notebooks" / f"{src.stem}.html"
        assert html.exists(), html
    saved = json.loads((tmp_path / "run" / "book_build.json").read_text())
    assert saved["profile"] == "smoke" and set(saved["seconds"]) >= {c.stem for c in chapters}
