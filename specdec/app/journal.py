"""A bench's finished prompts on disk, so a run stopped by Ctrl-C (or a crash) resumes where it stopped.

JSON lines: the first holds the run's settings; each further line one finished prompt (every method's results for
every turn of it). A rerun with the same settings reads the finished prompts back and runs only the rest; other
settings are refused (the file names what differs). The caller removes the file once the whole run is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # as it reads back
        self.done: dict[int, dict[str, Any]] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        lines = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            return
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            raise ValueError(f"{self.path} is not a bench journal: delete it or use another --out") from None
        old = header.get("settings", {})
        changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
        if changed:
            raise ValueError(f"{self.path} holds a partial run with other settings ({', '.join(changed)}): "
                             "rerun with the same settings to resume, or delete it / use another --out")
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash: that prompt runs again
                break
            self.done[int(entry["prompt_index"])] = entry

    def record(self, prompt_index: int, entry: dict[str, Any]) -> None:
        """Append one finished prompt (flushed, so it survives an interrupt right after)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with self.path.open("a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps({"settings": self.settings}) + "\n")
            f.write(json.dumps({"prompt_index": prompt_index, **entry}) + "\n")
        self.done[prompt_index] = {"prompt_index": prompt_index, **json.loads(json.dumps(entry))}

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
