"""README.md's run-config table is the one generated from RunConfig (scripts/config_table.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from scripts import config_table
from task.config import RunConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_table_is_generated_from_run_config():
    text = README.read_text()
    assert config_table.with_table(text) == text, (
        "README.md's config table differs from task/config.py: run `python scripts/config_table.py`"
    )


def test_table_has_one_row_per_key_with_its_default():
    rows = config_table.markdown_table().splitlines()[2:]
    keys = [row.split(" | ")[0].removeprefix("| ").strip("`") for row in rows]
    assert keys == [info.alias for info in RunConfig.model_fields.values()]
    by_key = dict(zip(keys, rows, strict=True))
    assert by_key["resume-from"].startswith('| `resume-from` | `""` | text | a run folder')
    defaults = RunConfig()
    assert by_key["local-epochs"].startswith(f"| `local-epochs` | `{defaults.local_epochs}` | >= 1 |")
    assert by_key["cosine-lr"].startswith("| `cosine-lr` | `true` | `true`, `false` |")


class _Example(BaseModel):
    rate: float | Literal["auto"] = Field("auto", gt=0)
    step: Annotated[float, Field(ge=0, lt=1)] | Literal["auto"] = "auto"
    share: float = Field(0.5, gt=0, le=1)
    count: int = Field(3, ge=1)
    upper: float = Field(0.0, lt=2)
    anything: int = 0
    mode: Literal["a", "b"] = "a"
    name: str = Field("x", min_length=1)


@pytest.mark.parametrize(("key", "wording"), [
    ("rate", "> 0 or `auto`"), ("step", "[0, 1) or `auto`"), ("share", "(0, 1]"), ("count", ">= 1"), ("upper", "< 2"),
    ("anything", "an integer"), ("mode", "`a`, `b`"), ("name", "non-empty text"),
])
def test_allowed_values_in_words(key, wording):
    assert config_table.allowed(_Example.model_json_schema()["properties"][key]) == wording


def test_check_finds_a_stale_table_and_a_rewrite_fixes_it(tmp_path, capsys):
    readme = tmp_path / "README.md"
    stale = README.read_text().replace("| `lr` | `", "| `lr` | `0.05` was `", 1)
    assert stale != README.read_text()
    readme.write_text(stale)
    assert config_table.main(["--check", "--readme", str(readme)]) == 1
    assert "differs from task/config.py" in capsys.readouterr().err
    assert readme.read_text() == stale  # --check writes nothing
    assert config_table.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == README.read_text()
    assert config_table.main(["--check", "--readme", str(readme)]) == 0


def test_readme_without_markers_is_refused():
    with pytest.raises(ValueError, match="needs one '<!-- config-table:start"):
        config_table.with_table("# no table here\n")
