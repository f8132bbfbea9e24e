"""The server's resident pipelines: loaded at start-up, one text encoder per encoder file."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ..errors import IncompatibleModelError
from ..pipeline import Pipeline
from ..settings import ContextSettings
from .config import ModelEntry

logger = logging.getLogger("sdcpp_py.server")


@dataclass
class Served:
    name: str
    pipe: Pipeline
    created: int
    shares_encoder_with: str | None = None


class Registry:
    """Model name -> resident Pipeline. Entries with the same ``llm`` file share its encoder."""

    def __init__(self, entries: list[ModelEntry]) -> None:
        self.models: dict[str, Served] = {}
        try:
            for entry in entries:
                self._load(entry)
        except BaseException:
            self.close()
            raise

    def _load(self, entry: ModelEntry) -> None:
        settings = ContextSettings(**entry.settings)
        donor = next((m for m in self.models.values()
                      if entry.files.get("llm") and m.pipe.paths.get("llm") is not None
                      and str(m.pipe.paths["llm"]) == entry.files["llm"]), None)
        files: dict[str, Any] = dict(entry.files)
        pipe = None
        if donor is not None:
            try:
                pipe = Pipeline(**files, preset=entry.preset, settings=settings, share_encoder_with=donor.pipe)
            except IncompatibleModelError as e:
                logger.warning("%s loads its own text encoder: %s", entry.name or "model", e)
                donor = None
        if pipe is None:
            pipe = Pipeline(**files, preset=entry.preset, settings=settings)
        name = entry.name or (pipe.preset.name if pipe.preset else pipe.family)
        if name in self.models:
            pipe.close()
            raise IncompatibleModelError(f"two model sets are named {name!r}: give each a \"name\"")
        self.models[name] = Served(name, pipe, int(time.time()), donor.name if donor else None)
        logger.info("loaded %s (%s) in %.1f s%s", name, pipe.family, pipe.load_seconds,
                    f", text encoder shared with {donor.name}" if donor else "")

    def get(self, name: str | None) -> Served | None:
        """The named model; with no name (or the OpenAI default names) the first one."""
        if name is None or name == "" or (name not in self.models and name.startswith(("dall-e", "gpt-image"))):
            return next(iter(self.models.values()), None)
        return self.models.get(name)

    def close(self) -> None:
        for m in reversed(list(self.models.values())):
            m.pipe.close()
        self.models.clear()
