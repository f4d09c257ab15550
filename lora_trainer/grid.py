"""Grid assembly and axis labels, shared by the CLI `grid` command, the WebUI tab and the demo strip.

Only `ImageDraw.textbbox` and `ImageDraw.text` are used for text, so it works on Pillow 9.5 (the WebUI's
pin) and on current Pillow alike.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
PADDING = 4


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def labelled_grid(cells: list[list[Image.Image]], column_labels: list[str], row_labels: list[str],
                  title: str = "") -> Image.Image:
    """Lay out `cells[row][column]` edge to edge, with column labels on top, row labels on the left.

    Every cell takes the size of the first one. Labels may be empty strings; an empty label axis takes
    no room. `title` goes above everything.
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
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label_width = max((text_size(label)[0] for label in row_labels), default=0)
    left_margin = label_width + 2 * PADDING if label_width else 0
    header_height = max((text_size(label)[1] for label in column_labels), default=0)
    top_margin = header_height + 2 * PADDING if header_height else 0
    title_height = text_size(title)[1] + 2 * PADDING if title else 0

    grid = Image.new("RGB", (left_margin + columns * cell_width, title_height + top_margin + rows * cell_height),
                     BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((PADDING, PADDING), title, fill=TEXT_COLOUR, font=font)
    for column, label in enumerate(column_labels):
        width, _ = text_size(label)
        x = left_margin + column * cell_width + (cell_width - width) // 2
        draw.text((x, title_height + PADDING), label, fill=TEXT_COLOUR, font=font)
    for row, label in enumerate(row_labels):
        _, height = text_size(label)
        y = title_height + top_margin + row * cell_height + (cell_height - height) // 2
        draw.text((PADDING, y), label, fill=TEXT_COLOUR, font=font)
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
