"""The metadata of a submitted quantizer: ``submissions/<name>/submission.yaml``."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationInfo, field_validator, model_validator

from ..errors import hidden_characters
from ..limits import CONFIG_DEPTH, CONFIG_JSON_BYTES, plain_data_problem

# The reference entries every board shows beside the submitted methods: full precision and round-to-nearest.
REFERENCE_ENTRIES = ("fp32", "rtn")

# The tasks cheap enough for the pull-request job to rerun a submission's own code on
# (.github/workflows/validate-submission.yml reads this list); the site labels their results "reproduced".
REPRODUCED_IN_PULL_REQUESTS = ("digits-mlp",)

PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+$")
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("*", mode="after")
    @classmethod
    def _shown_as_written(cls, value: Any, info: ValidationInfo) -> Any:
        """Metadata is shown on the site and printed by the CLI: no control characters but a description's line
        breaks and tabs, and no invisible ones (a bidi override would show the text after it reversed)."""
        if isinstance(value, str):
            _refuse_hidden(hidden_characters(value, IN_TEXT + ("\n\t" if info.field_name == "description" else "")))
        return value


TaskId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]*$", max_length=64)]


def checked_config(config: dict[str, Any]) -> dict[str, Any]:
    """A quantizer config as the site renders it: plain JSON data, shallow and small (a ValueError otherwise)."""
    problem = plain_data_problem(config, CONFIG_DEPTH)
    if problem:
        raise ValueError(problem)
    _refuse_hidden(_hidden_in(config))
    size = len(json.dumps(config, indent=2, sort_keys=True))
    if size > CONFIG_JSON_BYTES:
        raise ValueError(f"{size} bytes as JSON, more than the {CONFIG_JSON_BYTES} allowed")
    return config


# Joiners and the soft hyphen are invisible but belong to honest text (Persian and Indic spelling, emoji
# sequences, hyphenation): metadata keeps them. Bidi controls and the other invisible characters are refused.
IN_TEXT = "\u200c\u200d\u00ad"


def _refuse_hidden(found: list[str]) -> None:
    if found:
        raise ValueError(f"holds {', '.join(found[:3])}: control or invisible characters are not allowed")


def _hidden_in(value: Any) -> list[str]:
    """The control and invisible characters of every string key and value in plain data."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found += hidden_characters(item, IN_TEXT)
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return list(dict.fromkeys(found))


# Every string is bounded: the metadata is rendered on the site and printed by the CLI.
class Author(Strict):
    name: str = Field(min_length=1, max_length=200)
    affiliation: str | None = Field(None, max_length=200)


class QuantizerReference(Strict):
    """Exactly one of: a built-in name; a file in the folder and a class in it; a pinned pip requirement and an import path."""

    builtin: str | None = Field(None, max_length=64)
    file: str | None = Field(None, max_length=200, description="a .py file inside the submission folder")
    class_name: str | None = Field(None, alias="class", max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                   description="the Quantizer subclass in that file (a Python identifier)")
    requirement: str | None = Field(None, max_length=200, description="a pinned pip requirement, e.g. my-ptq==1.2.0")
    entry: str | None = Field(None, max_length=200, description="module:Class importable once the requirement is installed")
    config: dict[str, Any] = Field(default_factory=dict, description="config the results were produced with "
                                   f"(plain data, nested at most {CONFIG_DEPTH} deep, at most {CONFIG_JSON_BYTES} "
                                   "bytes as the site shows it)")

    @field_validator("config")
    @classmethod
    def _config_is_small_plain_data(cls, config: dict[str, Any]) -> dict[str, Any]:
        return checked_config(config)

    @model_validator(mode="after")
    def _one_kind(self) -> QuantizerReference:
        kinds = [self.builtin is not None, self.file is not None or self.class_name is not None,
                 self.requirement is not None or self.entry is not None]
        if sum(kinds) != 1:
            raise ValueError("give exactly one of: builtin; file and class; requirement and entry")
        if (self.file is None) != (self.class_name is None):
            raise ValueError("file and class go together")
        if (self.requirement is None) != (self.entry is None):
            raise ValueError("requirement and entry go together")
        if self.file is not None and (not self.file.endswith(".py") or self.file.startswith(("/", "..")) or ".." in self.file.split("/")):
            raise ValueError(f"file {self.file!r} must be a .py path inside the submission folder")
        if self.requirement is not None and not PINNED.match(self.requirement):
            raise ValueError(f"requirement {self.requirement!r} must be pinned with == (e.g. my-ptq==1.2.0)")
        if self.entry is not None and not IMPORT_PATH.match(self.entry):
            raise ValueError(f"entry {self.entry!r} must look like package.module:Class")
        return self


class SubmissionSpec(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64, description="equals the folder name")
    display_name: str = Field(min_length=1, max_length=80)
    version: str = Field(min_length=1, max_length=64)
    authors: list[Author] = Field(min_length=1, max_length=100)
    description: str = Field("", max_length=10_000)
    paper: HttpUrl | None = None
    code: HttpUrl | None = None
    license: str = Field(min_length=1, max_length=200)
    contact: str = Field(min_length=3, max_length=200)
    quantizer: QuantizerReference
    tasks: list[TaskId] = Field(min_length=1, max_length=100, description="the task ids this submission has results for")

    @field_validator("tasks")
    @classmethod
    def _tasks_once(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError("a task is listed twice")
        return tasks

    @field_validator("paper", "code")
    @classmethod
    def _http_only(cls, url: HttpUrl | None) -> HttpUrl | None:
        if url is not None and url.scheme not in ("http", "https"):
            raise ValueError("links must be http(s)")
        return url
