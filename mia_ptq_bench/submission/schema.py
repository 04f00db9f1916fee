"""The metadata of a submitted quantizer: ``submissions/<name>/submission.yaml``."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator, model_validator

# The reference entries every board shows beside the submitted methods: full precision and round-to-nearest.
REFERENCE_ENTRIES = ("fp32", "rtn")

PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+$")
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Author(Strict):
    name: str = Field(min_length=1)
    affiliation: str | None = None


class QuantizerReference(Strict):
    """Exactly one of: a built-in name; a file in the folder and a class in it; a pinned pip requirement and an import path."""

    builtin: str | None = None
    file: str | None = Field(None, description="a .py file inside the submission folder")
    class_name: str | None = Field(None, alias="class", description="the Quantizer subclass in that file")
    requirement: str | None = Field(None, description="a pinned pip requirement, e.g. my-ptq==1.2.0")
    entry: str | None = Field(None, description="module:Class importable once the requirement is installed")
    config: dict[str, Any] = Field(default_factory=dict, description="config the results were produced with")

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
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="equals the folder name")
    display_name: str = Field(min_length=1, max_length=80)
    version: str = Field(min_length=1)
    authors: list[Author] = Field(min_length=1)
    description: str = ""
    paper: HttpUrl | None = None
    code: HttpUrl | None = None
    license: str = Field(min_length=1)
    contact: str = Field(min_length=3)
    quantizer: QuantizerReference
    tasks: list[str] = Field(min_length=1, description="the task ids this submission has results for")

    @field_validator("paper", "code")
    @classmethod
    def _http_only(cls, url: HttpUrl | None) -> HttpUrl | None:
        if url is not None and url.scheme not in ("http", "https"):
            raise ValueError("links must be http(s)")
        return url
