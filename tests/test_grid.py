"""Grids of LoRA strength x file (or seed): layout, labels, and rendering through a host or the CLI."""

from __future__ import annotations

import pytest
from PIL import Image

from lora_trainer.errors import UserError
from lora_trainer.grid import LORA_TAG, GridPlan, cell_box, labelled_grid


def _cells(rows: int, columns: int, size=(40, 30)) -> list[list[Image.Image]]:
    return [[Image.new("RGB", size, (20 * r, 30 * c, 100)) for c in range(columns)] for r in range(rows)]


@pytest.mark.parametrize(("rows", "columns"), [(1, 1), (2, 3), (4, 5)])
def test_every_cell_lands_in_its_box(rows, columns):
    cells = _cells(rows, columns)
    grid = labelled_grid(cells, [f"strength {c}" for c in range(columns)], [f"epoch {r}" for r in range(rows)],
                         title="a prompt")
    for r in range(rows):
        for c in range(columns):
            box = cell_box(grid.size, rows, columns, (40, 30), r, c)
            assert list(grid.crop(box).getdata()) == list(cells[r][c].getdata())


def test_labels_take_room_above_and_left_and_are_drawn():
    grid = labelled_grid(_cells(2, 2), ["strength 0", "strength 1"], ["epoch 1", "epoch 2"])
    left, top, _, _ = cell_box(grid.size, 2, 2, (40, 30), 0, 0)
    assert left > 0 and top > 0
    header = grid.crop((left, 0, grid.width, top))
    assert header.convert("L").getextrema()[0] < 128  # dark text on white


@pytest.mark.parametrize("cell_width", [64, 300])
def test_column_labels_wider_than_a_cell_wrap_instead_of_running_into_the_next(cell_width):
    labels = ["strength 0.25", "strength 0.5", "strength 0.75"]
    grid = labelled_grid(_cells(1, 3, size=(cell_width, 30)), labels, ["epoch 10"])
    left, top, _, _ = cell_box(grid.size, 1, 3, (cell_width, 30), 0, 0)
    header = grid.crop((0, 0, grid.width, top)).convert("L")
    # No ink on the lines between columns, and some in every column.
    for boundary in (left + cell_width, left + 2 * cell_width):
        assert min(header.getpixel((boundary, y)) for y in range(top)) > 200
    for column in range(3):
        span = header.crop((left + column * cell_width, 0, left + (column + 1) * cell_width, top))
        assert span.getextrema()[0] < 128


def test_a_title_wider_than_the_grid_wraps_instead_of_being_cut_off():
    prompt = "sks style, a red bicycle leaning on a wall at dusk, film grain"
    grid = labelled_grid(_cells(1, 2), ["0", "1"], ["a"], title=prompt)
    one_line = labelled_grid(_cells(1, 2), ["0", "1"], ["a"], title="sks")
    left, top, _, _ = cell_box(grid.size, 1, 2, (40, 30), 0, 0)
    assert grid.height > one_line.height + 10  # more than one line
    title_band = grid.crop((0, 0, grid.width, top)).convert("L")
    # No ink in the last column of pixels: nothing runs off the right edge.
    assert min(title_band.getpixel((grid.width - 1, y)) for y in range(top)) > 200


def test_a_corner_heading_names_the_columns_and_their_labels_stay_on_one_line():
    wrapped = labelled_grid(_cells(1, 3), ["strength 0.25", "strength 0.5", "strength 0.75"], ["epoch 10"])
    grid = labelled_grid(_cells(1, 3), ["0.25", "0.5", "0.75"], ["epoch 10"], corner="LoRA strength")
    left, top, _, _ = cell_box(grid.size, 1, 3, (40, 30), 0, 0)
    assert top < cell_box(wrapped.size, 1, 3, (40, 30), 0, 0)[1]  # one line, where "strength 0.25" took two
    assert grid.crop((0, 0, left, top)).convert("L").getextrema()[0] < 128  # the heading is drawn


def test_without_labels_the_grid_is_just_the_cells():
    grid = labelled_grid(_cells(2, 3), ["", "", ""], ["", ""])
    assert grid.size == (120, 60)


def test_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match="needs 2 column labels"):
        labelled_grid(_cells(1, 2), ["only one"], ["row"])


def test_plan_rows_are_files_or_seeds_but_not_both(tmp_path):
    one, two = tmp_path / "a-e0001.safetensors", tmp_path / "a-e0002.safetensors"
    assert [label for *_, label in GridPlan("p", [one, two]).rows()] == ["a-e0001", "a-e0002"]
    assert [seed for _, seed, _ in GridPlan("p", [one], seeds=[3, 4]).rows()] == [3, 4]
    with pytest.raises(UserError, match="either LoRA files or seeds"):
        GridPlan("p", [one, two], seeds=[1, 2])


def test_strength_zero_renders_without_a_lora_tag(tmp_path):
    plan = GridPlan("a castle", [tmp_path / "style.safetensors"])
    assert plan.request(plan.loras[0], 1, 0.0).prompt == "a castle"
    assert plan.request(plan.loras[0], 1, 0.5).prompt == "a castle <lora:style:0.5>"


def test_two_files_that_share_a_name_get_tags_of_their_own(tmp_path):
    first, second = tmp_path / "a" / "style.safetensors", tmp_path / "b" / "style.safetensors"
    plan = GridPlan("a castle", [first, second])
    assert [label for *_, label in plan.rows()] == ["a/style", "b/style"]
    assert plan.request(first, 1, 1.0).prompt == "a castle <lora:a/style:1>"
    assert plan.request(second, 1, 1.0).prompt == "a castle <lora:b/style:1>"


@pytest.mark.parametrize("name", ["my:lora", "x>y"])
def test_a_lora_name_no_prompt_tag_can_hold_is_refused_with_the_reason(name, tmp_path):
    with pytest.raises(UserError, match="cannot name a LoRA whose name has ':', '<' or '>'"):
        GridPlan("a castle", [tmp_path / f"{name}.safetensors"])


@pytest.mark.parametrize("strength", [1e-05, 1e+06, -2.5e-07])
def test_every_strength_reaches_the_renderer_even_in_exponent_form(strength, tmp_path):
    plan = GridPlan("a castle", [tmp_path / "style.safetensors"], strengths=[strength])
    [(name, weight)] = LORA_TAG.findall(plan.request(plan.loras[0], 1, strength).prompt)
    assert (name, float(weight)) == ("style", strength)


@pytest.mark.parametrize(("settings", "message"), [
    ({"steps": 0}, "steps must be 1 to 150"), ({"steps": 1000}, "steps must be 1 to 150"),
    ({"width": 100000}, "multiples of 8 from 8 to 2048"), ({"height": 30}, "multiples of 8"),
    ({"strengths": [index / 100 for index in range(101)], "seeds": list(range(5))}, "more than 400 images"),
])
def test_a_grid_beyond_the_webuis_limits_is_refused_before_it_renders(settings, message):
    with pytest.raises(UserError, match=message):
        GridPlan("a cat", ["style.safetensors"], **settings)
