"""A sweep's grid: ``--grid key=v1,v2`` options -> validated axes -> one recipe per point.

Keys are dotted recipe keys (``train.lr``, ``train.lambda_kl``, ``data.max_train_samples``).
Each value is read as YAML (``1e-4``, ``0``, ``true``, ``null``, a path) and checked against the
pydantic ``Recipe`` alone and in every combination, before any work starts. A sweep probes once,
so keys that change the probe (``base``, ``languages``, ``probe.*``, ``data.probe``,
``data.max_probe_samples``) are refused, and so are keys that do not change a point (``name``,
``output_dir``, ``fold.*``, ``export.*``, ``release.*``, ``plan.*``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import yaml

from lens_merge.config import EvalConfig, Recipe, with_overrides
from lens_merge.errors import ConfigError

SWEEPABLE = ("train.", "eval.", "data.")
FIXED = {"data.probe": "the sweep probes once", "data.max_probe_samples": "the sweep probes once"}


@dataclass(frozen=True)
class Point:
    """One point of the grid: its overrides (grid keys in grid order) and the full recipe."""

    index: int
    overrides: dict[str, Any]
    recipe: Recipe

    @property
    def label(self) -> str:
        """``train.lr=0.0001 train.lambda_kl=0``: the overrides, as on the command line."""
        return " ".join(f"{k}={format_value(v)}" for k, v in self.overrides.items())


def format_value(v: Any) -> str:
    """A grid value as the table shows it (``0.0001``, ``0``, ``true``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return "null" if v is None else str(v)


def _split_values(text: str) -> list[str]:
    """Split ``v1,v2`` on commas outside brackets (``[1,2],[3]`` is two values)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """Parse ``--grid`` options into ``{key: [values]}`` (keys in the order given).

    Args:
        specs: ``["train.lr=1e-4,3e-4", "train.lambda_kl=0,1"]``.

    Returns:
        The raw values, each parsed as YAML (validation is ``expand_grid``'s).

    Raises:
        ConfigError: naming the option that is not ``key=v1,v2``, a key given twice, an
            empty or repeated value.
    """
    if not specs:
        raise ConfigError("--grid: at least one KEY=V1,V2 option is needed")
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, rest = spec.partition("=")
        key = key.strip()
        if not sep or not key or not rest.strip():
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2 (e.g. train.lr=1e-4,3e-4)")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; list every value in one option")
        raw = [v.strip() for v in _split_values(rest)]
        if any(v == "" for v in raw):
            raise ConfigError(f"--grid {spec!r}: empty value")
        if len(set(raw)) != len(raw):
            raise ConfigError(f"--grid {spec!r}: a value is repeated")
        try:
            grid[key] = [yaml.safe_load(v) for v in raw]
        except yaml.YAMLError as exc:
            raise ConfigError(f"--grid {spec!r}: a value is not valid YAML ({exc})") from None
    return grid


def _check_key(key: str, recipe: Recipe) -> None:
    if key in FIXED or not key.startswith(SWEEPABLE):
        why = FIXED.get(key, "only train.*, eval.* and data.* keys change a sweep point")
        raise ConfigError(f"--grid {key}: not a sweep key ({why})")
    node: Any = recipe.model_dump()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"--grid {key}: unknown recipe key "
                              f"'{key}' (see lens_merge.config.Recipe)")
        node = node[part]
    if isinstance(node, dict):
        raise ConfigError(f"--grid {key}: names a section; give one of its keys "
                          f"({', '.join(f'{key}.{k}' for k in node)})")


def value_at(recipe: Recipe, key: str) -> Any:
    """The value of a dotted key in a recipe (``value_at(r, "train.lr")``)."""
    node: Any = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


def point_defaults(grid: dict[str, list[Any]]) -> dict[str, Any]:
    """Overrides every point gets besides its grid values: the eval's steering baseline off
    (when ``EvalConfig`` has ``steering``, and the grid does not set it)."""
    if "steering" in EvalConfig.model_fields and "eval.steering" not in grid:
        return {"eval.steering": False}
    return {}


def expand_grid(recipe: Recipe, grid: dict[str, list[Any]]) -> list[Point]:
    """The Cartesian product of the grid, each point validated as a whole recipe.

    Args:
        recipe: the sweep's recipe (the values the grid does not set).
        grid: ``parse_grid``'s output.

    Returns:
        The points in order (the last key varies fastest); override values as the recipe
        holds them after validation (``"1e-4"`` -> ``0.0001``).

    Raises:
        ConfigError: naming the bad key (unknown, not sweepable) or the bad ``key=value``.
    """
    for key, values in grid.items():
        _check_key(key, recipe)
        typed = [value_at(with_overrides(recipe, {key: v}, f"--grid {key}={format_value(v)}"),
                          key) for v in values]  # each value alone first: the message names it
        if len({repr(t) for t in typed}) != len(typed):
            raise ConfigError(f"--grid {key}: two values are the same after validation "
                              f"({', '.join(map(format_value, typed))})")
    extra = point_defaults(grid)
    points = []
    for i, combo in enumerate(itertools.product(*grid.values())):
        over = dict(zip(grid, combo, strict=True))
        label = " ".join(f"{k}={format_value(v)}" for k, v in over.items())
        r = with_overrides(recipe, {**over, **extra}, f"sweep point {label}")
        points.append(Point(i, {k: value_at(r, k) for k in grid}, r))
    return points
