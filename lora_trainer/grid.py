"""Grid assembly and axis labels, shared by the CLI `grid` command, the WebUI tab and the demo strip.

Only `ImageDraw.multiline_textbbox` and `ImageDraw.multiline_text` are used for text, so it works on Pillow
9.5 (the WebUI's pin) and on current Pillow alike.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from lora_trainer.config import tag_can_name
from lora_trainer.errors import UserError
from lora_trainer.files import write_new_file
from lora_trainer.host import RenderRequest
from lora_trainer.lora.targets import network_from_file
from lora_trainer.models.base import DiffusionBackend

BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
PADDING = 4
LORA_TAG = re.compile(r"<lora:([^:<>]+):([^:<>]+)>")


DEFAULT_STRENGTHS = "0, 0.25, 0.5, 0.75, 1"
MAX_SEED = 2**32 - 1
RANDOM_SEED = -1


class GridStopped(UserError):
    """The user stopped a grid before all its images were rendered."""


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def labelled_grid(cells: list[list[Image.Image]], column_labels: list[str], row_labels: list[str],
                  title: str = "", corner: str = "") -> Image.Image:
    """Lay out `cells[row][column]` edge to edge, with column labels on top, row labels on the left.

    Every cell takes the size of the first one. Labels may be empty strings; an empty label axis takes
    no room. `title` goes above everything, wrapped between words to the grid's width. `corner` names the
    columns in the top-left corner (e.g. "LoRA strength" above the row labels, beside columns "0", "0.5").
    """
    if not cells or not cells[0]:
        raise ValueError("a grid needs at least one cell")
    rows, columns = len(cells), len(cells[0])
    if any(len(row) != columns for row in cells):
        raise ValueError("every grid row needs the same number of cells")
    if len(column_labels) != columns or len(row_labels) != rows:
        raise ValueError(f"a {rows}x{columns} grid needs {columns} column labels and {rows} row labels")
    cell_width, cell_height = cells[0][0].size
    font = _font(max(10, cell_height // 16))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        if not text:
            return 0, 0
        left, top, right, bottom = measure.multiline_textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    def wrapped(text: str, width: int) -> str:
        """`text` broken into lines between words wherever a line would be wider than `width`."""
        lines: list[str] = []
        for word in text.split(" "):
            if lines and text_size(f"{lines[-1]} {word}")[0] <= width:
                lines[-1] = f"{lines[-1]} {word}"
            else:
                lines.append(word)
        return "\n".join(lines)

    column_labels = [wrapped(label, cell_width - PADDING) for label in column_labels]
    label_width = max((text_size(label)[0] for label in [*row_labels, corner]), default=0)
    left_margin = label_width + 2 * PADDING if label_width else 0
    header_height = max((text_size(label)[1] for label in [*column_labels, corner]), default=0)
    top_margin = header_height + 2 * PADDING if header_height else 0
    title = wrapped(title, left_margin + columns * cell_width - 2 * PADDING)
    title_height = text_size(title)[1] + 2 * PADDING if title else 0

    grid = Image.new("RGB", (left_margin + columns * cell_width, title_height + top_margin + rows * cell_height),
                     BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.multiline_text((PADDING, PADDING), title, fill=TEXT_COLOUR, font=font)
    if corner:
        draw.multiline_text((PADDING, title_height + PADDING), corner, fill=TEXT_COLOUR, font=font)
    for column, label in enumerate(column_labels):
        width, _ = text_size(label)
        x = left_margin + column * cell_width + (cell_width - width) // 2
        draw.multiline_text((x, title_height + PADDING), label, fill=TEXT_COLOUR, font=font, align="center")
    for row, label in enumerate(row_labels):
        _, height = text_size(label)
        y = title_height + top_margin + row * cell_height + (cell_height - height) // 2
        draw.multiline_text((PADDING, y), label, fill=TEXT_COLOUR, font=font)
    for row, row_cells in enumerate(cells):
        for column, cell in enumerate(row_cells):
            if cell.size != (cell_width, cell_height):
                cell = cell.resize((cell_width, cell_height))
            grid.paste(cell.convert("RGB"), (left_margin + column * cell_width, title_height + top_margin
                                             + row * cell_height))
    return grid


def cell_box(grid_size: tuple[int, int], rows: int, columns: int, cell_size: tuple[int, int],
             row: int, column: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) of cell (row, column) inside a grid made by `labelled_grid`.

    The label margins are whatever is left of the grid beyond the cells, which sit at the bottom right.
    """
    cell_width, cell_height = cell_size
    left_margin = grid_size[0] - columns * cell_width
    top_margin = grid_size[1] - rows * cell_height
    left, top = left_margin + column * cell_width, top_margin + row * cell_height
    return left, top, left + cell_width, top + cell_height


MAX_STEPS, MAX_SIDE, MAX_CELLS = 150, 2048, 400
"""The largest grid: the WebUI's own limits on steps and image sides, and at most 400 images."""


@dataclass
class GridPlan:
    """A strength x file (or strength x seed) comparison: columns are strengths, rows are LoRA files,
    or seeds when there is one file. Every cell of a row uses the same seed."""

    prompt: str
    loras: list[Path]
    strengths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    seeds: list[int] = field(default_factory=lambda: [1])
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler_name: str = ""

    def __post_init__(self) -> None:
        if not self.loras or not self.strengths or not self.seeds:
            raise UserError("a grid needs at least one LoRA file, one strength and one seed")
        if len(self.loras) > 1 and len(self.seeds) > 1:
            raise UserError("grid rows are either LoRA files or seeds: pick several files or several seeds")
        if not 1 <= self.steps <= MAX_STEPS:
            raise UserError(f"a grid's sampling steps must be 1 to {MAX_STEPS} (the WebUI's range), got {self.steps}")
        if not all(8 <= side <= MAX_SIDE and side % 8 == 0 for side in (self.width, self.height)):
            raise UserError(f"a grid's width and height must be multiples of 8 from 8 to {MAX_SIDE}, got "
                            f"{self.width}x{self.height}")
        if len(self.strengths) * max(len(self.loras), len(self.seeds)) > MAX_CELLS:
            raise UserError(f"a grid of {len(self.strengths)} strengths x {max(len(self.loras), len(self.seeds))} "
                            f"rows has more than {MAX_CELLS} images: fewer strengths, files or seeds")
        for path in self.loras:
            if not tag_can_name(Path(path).stem):
                raise UserError(f"{Path(path).name}: a <lora:name:weight> tag cannot name a LoRA whose name has "
                                "':', '<' or '>' in it; rename the file")
        names = self.tag_names()
        if len(set(names.values())) < len(names):
            raise UserError("two LoRA files share a name and a folder name: "
                            f"{', '.join(str(path) for path in names)}; rename one of them")

    def tag_names(self) -> dict[Path, str]:
        """The name of each LoRA file in `<lora:name:weight>` tags: its stem, or, for files that share a stem
        (`a/style.safetensors`, `b/style.safetensors`), its folder's name and stem (`a/style`, `b/style`)."""
        stems = Counter(Path(path).stem for path in set(self.loras))
        return {Path(path): Path(path).stem if stems[Path(path).stem] == 1
                else f"{Path(path).parent.name}/{Path(path).stem}" for path in self.loras}

    def rows(self) -> list[tuple[Path, int, str]]:
        """(LoRA file, seed, row label) per row."""
        names = self.tag_names()
        if len(self.loras) > 1:
            return [(path, self.seeds[0], names[Path(path)]) for path in self.loras]
        return [(self.loras[0], seed, f"{names[Path(self.loras[0])]}, seed {seed}") for seed in self.seeds]

    def request(self, lora: Path, seed: int, strength: float) -> RenderRequest:
        """The render of one cell: strength 0 is the base model itself, without a LoRA tag."""
        tag = f"<lora:{self.tag_names()[Path(lora)]}:{strength:g}>"
        prompt = self.prompt if strength == 0 else f"{self.prompt} {tag}"
        return RenderRequest(prompt=prompt, negative_prompt=self.negative_prompt, seed=seed, steps=self.steps,
                             cfg_scale=self.cfg_scale, width=self.width, height=self.height,
                             sampler_name=self.sampler_name)

    def infotext(self) -> str:
        """Generation parameters for the PNG text of the grid, in the WebUI's style."""
        return (f"{self.prompt}\nNegative prompt: {self.negative_prompt}\nSteps: {self.steps}, Sampler: "
                f"{self.sampler_name or 'default'}, CFG scale: {self.cfg_scale:g}, Seeds: "
                f"{', '.join(map(str, self.seeds))}, Size: {self.width}x{self.height}, LoRA strengths: "
                f"{', '.join(f'{s:g}' for s in self.strengths)}, LoRAs: "
                f"{', '.join(self.tag_names().values())}")


def render_grid(plan: GridPlan, render: Callable[[RenderRequest], Image.Image],
                progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> tuple[Image.Image, list[list[Image.Image]]]:
    """Render every cell of `plan` with `render` and assemble the labelled grid. Returns (grid, cells)."""
    rows = plan.rows()
    total, done = len(rows) * len(plan.strengths), 0
    cells: list[list[Image.Image]] = []
    for lora, seed, _ in rows:
        row = []
        for strength in plan.strengths:
            if should_stop is not None and should_stop():
                raise GridStopped(f"grid stopped after {done} of {total} images")
            row.append(render(plan.request(lora, seed, strength)))
            done += 1
            if progress is not None:
                progress(done, total)
        cells.append(row)
    # The strengths as bare numbers under one "LoRA strength" heading: they fit small cells on one line.
    grid = labelled_grid(cells, [f"{s:g}" for s in plan.strengths], [label for *_, label in rows],
                         title=plan.prompt, corner="LoRA strength")
    return grid, cells


def save_png(image: Image.Image, path: Path, parameters: str) -> Path:
    """Write `image` as a new PNG with `parameters` in its text chunk (as the WebUI does); returns its path,
    numbered (`grid-2.png`) when `path` is taken."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    return write_new_file(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def tag_renderer(backend: DiffusionBackend, lora_files: dict[str, Path]) -> Callable[[RenderRequest], Image.Image]:
    """A `render` for a library backend that applies `<lora:name:weight>` tags, as the WebUI does, with the
    files of `lora_files` (tag name -> file)."""
    networks = {name: network_from_file(backend.lora_roots(), Path(path)).to(backend.device)
                for name, path in lora_files.items()}

    def render(request: RenderRequest) -> Image.Image:
        tags = LORA_TAG.findall(request.prompt)
        unknown = [name for name, _ in tags if name not in networks]
        if unknown:
            raise UserError(f"no LoRA file named {unknown[0]!r} among {sorted(networks)}")
        try:
            applied = [networks[name].applied(float(weight)) for name, weight in tags]
        except ValueError:
            raise UserError(f"a LoRA strength in {request.prompt!r} is not a number") from None
        with ExitStack() as stack:
            for context in applied:
                stack.enter_context(context)
            return backend.generate(LORA_TAG.sub("", request.prompt).strip(), request.negative_prompt, request.seed,
                                    request.steps, request.width, request.height, request.cfg_scale)

    return render


def parse_strengths(text: str) -> list[float]:
    """LoRA strengths (the grid's columns) from text like "0, 0.5, 1"; commas or spaces separate them."""
    strengths = []
    for part in _list_items(text):
        try:
            strength = float(part)
        except ValueError:
            strength = math.nan
        if not math.isfinite(strength):
            raise UserError(f"Strength {part!r} is not a number. Enter strengths separated by commas, "
                            "e.g. 0, 0.5, 1.")
        strengths.append(strength)
    if not strengths:
        raise UserError(f"Enter at least one strength, e.g. {DEFAULT_STRENGTHS}.")
    return strengths


def parse_seeds(text: str) -> list[int]:
    """Seeds from text like "1, 2"; -1 is replaced by a random seed, as in the WebUI."""
    seeds = []
    for part in _list_items(text):
        try:
            seed = int(part)
        except ValueError:
            raise UserError(f"Seed {part!r} is not a whole number. Enter seeds separated by commas, e.g. 1, 2, "
                            "or -1 for a random one.") from None
        if seed == RANDOM_SEED:
            seed = random.randint(0, MAX_SEED)
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"Seed {seed} is out of range: seeds go from 0 to {MAX_SEED} (-1 for a random one).")
        seeds.append(seed)
    if not seeds:
        raise UserError("Enter at least one seed, e.g. 1 (or -1 for a random one).")
    return seeds


def _list_items(text: str) -> list[str]:
    return [item for item in re.split(r"[,\s]+", str(text or "").strip()) if item]
