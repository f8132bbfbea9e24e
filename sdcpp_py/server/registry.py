"""The server's resident pipelines: loaded at start-up, one text encoder per encoder file."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..errors import IncompatibleModelError
from ..modelset import ModelSet
from ..pipeline import Pipeline

logger = logging.getLogger("sdcpp_py.server")


@dataclass
class Served:
    name: str
    pipe: Pipeline
    created: int
    shares_encoder_with: str | None = None


class Registry:
    """Model name -> resident Pipeline. Entries with the same ``llm`` file share its encoder."""

    def __init__(self, entries: list[ModelSet]) -> None:
        self.models: dict[str, Served] = {}
        try:
            for entry in entries:
                self._load(entry)
        except BaseException:
            self.close()
            raise

    def _load(self, entry: ModelSet) -> None:
        names = {id(m.pipe): m.name for m in self.models.values()}
        pipe, donor = Pipeline.open_set(entry, donors=[m.pipe for m in self.models.values()])
        name = entry.name or (pipe.preset.name if pipe.preset else pipe.family)
        if name in self.models:
            pipe.close()
            raise IncompatibleModelError(f"two model sets are named {name!r}: give each a \"name\"")
        shared = names[id(donor)] if donor is not None else None
        self.models[name] = Served(name, pipe, int(time.time()), shared)
        logger.info("loaded %s (%s) in %.1f s%s", name, pipe.family, pipe.load_seconds,
                    f", text encoder shared with {shared}" if shared else "")

    def get(self, name: str | None) -> Served | None:
        """The named model; with no name (or the OpenAI default names) the first one."""
        if name is None or name == "" or (name not in self.models and name.startswith(("dall-e", "gpt-image"))):
            return next(iter(self.models.values()), None)
        return self.models.get(name)

    def close(self) -> None:
        for m in reversed(list(self.models.values())):
            m.pipe.close()
        self.models.clear()
