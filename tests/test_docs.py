"""The docs keep their promises: every config key is documented, and the README opens with
the two commands that do everything."""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator

from pydantic import BaseModel

from gateway.config import Config
from tests.support import REPO

README = (REPO / "README.md").read_text()
# a dict of models is documented with a placeholder: `models.<name>.provider`
PLACEHOLDERS = {"capabilities": "<capability>"}


def _model_of(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def config_keys(model: type[BaseModel], prefix: str = "", nested: bool = False) -> Iterator[str]:
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        inner = _model_of(field.annotation)
        args = typing.get_args(field.annotation)
        if inner is not None:
            yield from config_keys(inner, path + ".", nested)
        elif (
            args and _model_of(args[-1]) is not None and typing.get_origin(field.annotation) is dict
        ):
            placeholder = PLACEHOLDERS.get(name, "<name>") if nested else "<name>"
            yield from config_keys(_model_of(args[-1]), f"{path}.{placeholder}.", True)  # type: ignore[arg-type]
        else:
            yield path


def test_every_config_key_is_documented() -> None:
    keys = list(config_keys(Config))
    assert "plans.<name>.capabilities.<capability>.rpm" in keys
    missing = [key for key in keys if f"`{key}`" not in README]
    assert missing == []


def test_every_documented_key_exists() -> None:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = {
        key
        for key in re.findall(r"`([a-z_]+(?:\.[a-z_<>]+)+)`", section)
        if key.split(".")[0] in Config.model_fields
    }
    assert len(documented) > 40
    assert documented <= set(config_keys(Config))


def test_readme_opens_with_make_run_and_make_test() -> None:
    first_block = README.split("```sh", 1)[1].split("```", 1)[0]
    assert "make run" in first_block and "make test" in first_block
