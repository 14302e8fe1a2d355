"""Every value the recipe schema allows for an extension point has exactly one registry entry: a
value added to the schema without an entry fails here, instead of falling through at run time."""

from __future__ import annotations

import typing

import pytest

from cft_adapters.formats import FORMATS
from cft_adapters.placement import STRATEGIES
from cft_adapters.recipe import DatasetSource, PlacementConfig, RecipeError, ReplayConfig, load_recipe
from cft_adapters.replay import KINDS

from conftest import SMOKE


def _literal(model: type, field: str) -> set[str]:
    return set(typing.get_args(model.model_fields[field].annotation))


def test_placement_strategies_match_the_schema() -> None:
    assert set(STRATEGIES) == _literal(PlacementConfig, "strategy")


def test_replay_kinds_match_the_schema() -> None:
    assert set(KINDS) == _literal(ReplayConfig, "kind")


def test_data_formats_match_the_schema() -> None:
    assert set(FORMATS) == _literal(DatasetSource, "format")


def test_the_literal_helper_reads_the_schema_not_a_copy() -> None:
    """The registry tests compare with the schema itself: a value added there shows up here."""
    assert "alpaca" in _literal(DatasetSource, "format")
    assert _literal(DatasetSource, "format") != set(FORMATS) | {"oasst"}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_format_reads_a_row_it_declares(name: str) -> None:
    """Each entry's declared columns are the ones its reader needs: a row holding exactly those
    columns converts, and a row missing any one of them is refused."""
    from cft_adapters.formats import RowError

    src = DatasetSource(path="builtin:smoke/en_tasks.jsonl", format=name, language="en",
                        columns={"prompt": "q", "response": "a"} if name == "columns" else None)
    fill = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
            "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    row = {c: fill.get(c, f"text of {c}") for c in FORMATS[name].columns(src)}
    prompt, answer = FORMATS[name].conversation(row, src)
    assert prompt[-1]["role"] == "user" and prompt[-1]["content"] and answer
    assert FORMATS[name].prompt({c: row[c] for c in FORMATS[name].prompt_columns(src)}, src) == prompt
    for column in FORMATS[name].columns(src):
        with pytest.raises(RowError, match=column):
            FORMATS[name].conversation({c: v for c, v in row.items() if c != column}, src)


@pytest.mark.parametrize("name", sorted(s for s, v in STRATEGIES.items() if v.needs_count))
def test_strategies_that_need_a_count_are_refused_without_one(name: str, tiny_model_path) -> None:
    """The registry's needs_count and the schema's cross-key rule say the same thing."""
    ref = "phases[1].placement.reference_phase=english" if STRATEGIES[name].needs_reference else "description=x"
    if STRATEGIES[name].needs_checkpoints:
        ref = f"phases[1].placement.reference={{base: '{tiny_model_path}', tuned: '{tiny_model_path}'}}"
    with pytest.raises(RecipeError, match="exactly one of 'fraction' and 'count'"):
        load_recipe(SMOKE, [f"phases[1].placement={{strategy: {name}}}", ref])
    load_recipe(SMOKE, [f"phases[1].placement={{strategy: {name}, count: 1}}", ref])


def test_a_strategy_without_an_entry_is_an_error_not_another_strategy() -> None:
    from cft_adapters.placement import PlacementInputs, choose_placement

    cfg = PlacementConfig(strategy="random", count=1).model_copy(update={"strategy": "made_up"})
    with pytest.raises(KeyError, match="made_up"):
        choose_placement(PlacementInputs(cfg, num_layers=4, seed=0, modules=None))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategies_that_read_checkpoints_are_the_ones_the_schema_asks_a_reference_pair_of(name: str, tiny_model_path) -> None:
    """The registry's needs_checkpoints and the schema's rule agree: such a strategy is refused without
    'reference', and every other strategy is refused with one."""
    placement = f"{{strategy: {name}, count: 1, layers: '0', reference_phase: english}}"
    pair = f"phases[1].placement.reference={{base: '{tiny_model_path}', tuned: '{tiny_model_path}'}}"
    if STRATEGIES[name].needs_checkpoints:
        with pytest.raises(RecipeError, match=f"strategy '{name}' needs 'reference'"):
            load_recipe(SMOKE, [f"phases[1].placement={{strategy: {name}, count: 1}}"])
        load_recipe(SMOKE, [f"phases[1].placement={{strategy: {name}, count: 1}}", pair])
    else:
        with pytest.raises(RecipeError, match=f"'reference' is for strategy 'reference_change', not '{name}'"):
            load_recipe(SMOKE, [f"phases[1].placement={placement}", pair])
