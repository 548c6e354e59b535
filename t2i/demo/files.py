"""A request's files on disk: its PNGs, the captioned grid (and its grid.md), settings.json and a zip of them all;
a completion's also the image it completed (input.png, at the model's size) and its region in settings.json.

Each request writes a folder of its own under the run folder's results/, named by time, a count and a
random token (so a name seen, or a time and count guessed, never leads to another request's files);
the newest `queue.keep_results` folders are kept. The page serves none of these folders: the event
hands a request's own files to Gradio, which serves copies (t2i.demo.page).
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import torchvision
from PIL import Image

from t2i.demo.engine import Job
from t2i.grids import save_captioned_grid
from t2i.sampling import prompt_seeds


class Results:
    """The requests' result folders under `root`, the newest `keep` kept; `model` (the model card's facts) goes
    into each settings.json."""

    def __init__(self, root: Path, keep: int, font: str | None, model: dict):
        self.root, self.keep, self.font, self.model = root, keep, font, model
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._count = 0

    def save(self, job: Job, notes: list[str], random_seed: bool) -> tuple[list[tuple[str, str]], list[str], str]:
        """(gallery entries (PNG path, caption), the files to download, the result's name)."""
        with self._lock:
            self._count += 1
            folder = self.root / f"{time.strftime('%Y%m%d-%H%M%S')}-{self._count:05d}-{secrets.token_hex(8)}"
            folder.mkdir()
            self._prune()
        settings, prompt = job.settings, job.prompt
        shown = prompt or "(empty prompt: unconditional)"
        header = f"seed {job.seed}{' (random)' if random_seed else ''} · {settings.describe()}"
        if job.kind == "complete":
            header = f"completed {int(job.region.sum())} of {job.region.numel()} codes · {header}"
        gallery, pngs = [], []
        for i, image in enumerate(job.images):
            path = folder / f"{i:02d}.png"
            torchvision.utils.save_image(image.float() / 255, path)
            loss = "" if job.losses is None else f" · Caption Loss {job.losses[i].item():.3f}"
            gallery.append((str(path), f"{shown}\n#{i + 1} of {len(job.images)} · {header}{loss}"))
            pngs.append(path)
        # the one grid writer: the caption drawn (in a CJK font when the machine has one) and in grid.md beside it
        grid_path = save_captioned_grid(job.images, [f"{shown}\n{header}"], folder / "grid.png", settings.samples,
                                        self.font)
        record = {"prompt": prompt, "seed": job.seed, "random_seed": random_seed,
                  "prompt_seed": prompt_seeds(job.seed, [prompt])[0], "settings": asdict(settings),
                  "caption_loss": None if job.losses is None else [round(x, 4) for x in job.losses.tolist()],
                  "notes": notes, "model": self.model}
        extra = []
        if job.kind == "complete":  # what was completed: the image as the model read it, the sampled cells
            extra.append(folder / "input.png")
            Image.fromarray(job.image).save(extra[0])
            record.update(task="complete", region=job.region.int().tolist())
        (folder / "settings.json").write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
        archive = folder / "images.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for path in [*pngs, grid_path, grid_path.with_suffix(".md"), folder / "settings.json", *extra]:
                zf.write(path, path.name)
        return gallery, [str(grid_path), str(archive)], folder.name

    def _prune(self):
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        for old in folders[: max(0, len(folders) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
